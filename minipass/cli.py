"""What the command lines share: their common options, and one way of reporting a user's error.

Every CLI (`python -m minipass.generate`, `bench.py`, `train_lookahead`, `eval_lookahead`, `distill`, the converter)
builds its parser from these helpers and wraps its work in `run_cli`: a MinipassError (a bad path, option or file)
prints one line and exits 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from minipass.decoders import DecoderOptions
from minipass.errors import MinipassError
from minipass.memory import keep_freed_heap
from minipass.tree_decoding import NGRAM, TreeConfig


def run_cli(work: Callable[[], None], interrupted: str = "") -> int:
    """Run a command's work: 0 on success, 2 with one line on stderr for a user error, 130 on Ctrl-C. Freed host
    memory is kept for reuse (`memory.keep_freed_heap`): a decoding process allocates the same buffers every step."""
    keep_freed_heap()
    try:
        work()
    except MinipassError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if not interrupted:
            raise
        print(f"\ninterrupted; {interrupted}", file=sys.stderr)
        return 130
    return 0


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt", default=None,
                        help="Hugging Face-layout checkpoint directory or GGUF file (default: the embedded "
                             "SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights and activations dtype; auto (default): bf16 on CUDA and on CPUs with native "
                             "bf16 dot products, fp32 otherwise")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--check-weights", action="store_true",
                        help="refuse weights that are NaN or infinite, in the file or once converted to --dtype "
                             "(one read of the weights, about the cost of one decoding step: 0.2-1.3 s for the "
                             "default model on 2 CPU cores)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first row's random stream (row i uses seed+i)")


def add_decoding_args(parser: argparse.ArgumentParser, compile_default: bool = False) -> None:
    """Options of the speculative modes and of the step."""
    parser.add_argument("--lookahead-file", default=None,
                        help="look-ahead embeddings (.safetensors); default: the ones shipped for the default model, "
                             "else untrained (mean-embedding) ones")
    parser.add_argument("--datastore", default=None,
                        help="tree: a datastore file (python -m minipass.build_datastore) whose continuations of the "
                             "context's suffix the trees also draft, or none; default: the one shipped for the "
                             "default model, else none")
    parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                        help="attention and acceptance through the Triton kernels (CUDA) or torch (default: auto)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=compile_default,
                        help="torch.compile each mode's decoding step whole (CUDA graphs on CUDA; on a CPU, inductor "
                             f"with the weights frozen into the graph) (default: {compile_default})")
    d = TreeConfig()
    parser.add_argument("--pass1-blocks", type=int, default=2,
                        help="pass1: look-ahead blocks after acceptance points 0..N-1, 0 = all L+1 (default 2)")
    parser.add_argument("--tree-nodes", default=str(d.nodes),
                        help=f"tree: candidate nodes per call, or auto: sized to the hardware ({d.nodes})")
    parser.add_argument("--tree-topk", type=int, default=d.topk,
                        help=f"tree: look-ahead candidates per depth ({d.topk})")
    parser.add_argument("--tree-blocks", type=int, default=d.blocks,
                        help=f"tree: look-ahead blocks per call, 0 = n-gram drafts only ({d.blocks})")
    parser.add_argument("--ngram-max", type=int, default=d.ngram_max, help=f"longest suffix matched ({d.ngram_max})")
    parser.add_argument("--ngram-min", type=int, default=d.ngram_min, help=f"shortest suffix matched ({d.ngram_min})")
    parser.add_argument("--ngram-len", type=int, default=d.ngram_len, help=f"tokens copied per match ({d.ngram_len})")
    parser.add_argument("--ngram-chains", type=int, default=d.ngram_chains,
                        help=f"tree: distinct n-gram continuations, 0 = look-ahead drafts only ({d.ngram_chains})")


def tree_nodes(args: argparse.Namespace):
    """--tree-nodes as an int, or None for auto."""
    if args.tree_nodes == "auto":
        return None
    try:
        return int(args.tree_nodes)
    except ValueError:
        raise MinipassError(f"--tree-nodes must be an integer or auto, got {args.tree_nodes!r}") from None


def decoder_options(args: argparse.Namespace, L: int, nodes: int, datastore=None) -> DecoderOptions:
    """DecoderOptions from the parsed options of add_decoding_args (the tree budget given explicitly)."""
    ngram = dict(ngram_max=args.ngram_max, ngram_min=args.ngram_min, ngram_len=args.ngram_len)
    tree = TreeConfig(nodes=nodes, topk=args.tree_topk, blocks=args.tree_blocks, ngram_chains=args.ngram_chains,
                      **ngram)
    ngram_cfg = TreeConfig(**{**NGRAM.__dict__, **ngram, "nodes": args.ngram_len})
    return DecoderOptions(lookahead=L, pass1_blocks=args.pass1_blocks, tree=tree, ngram=ngram_cfg,
                          compile=args.compile, datastore=datastore)
