"""Command line: generate text with a checkpoint (the embedded default model when no --ckpt is given).

    python -m minipass.generate --prompt "Write a haiku about the sea." --chat
    python -m minipass.generate --ckpt path/to/llama --prompt "def fib(n):" --temperature 0.8 --top-k 10

One prompt streams its completion to stdout; several --prompt options run as one batch and print each completion.
"""

from __future__ import annotations

import argparse
import sys

from functools import partial
from pathlib import Path

from minipass.decoding import SamplingParams, ar_decode
from minipass.distributed import init_from_env
from minipass.errors import MinipassError
from minipass.loading import load_checkpoint
from minipass.lookahead import init_lookahead, load_lookahead
from minipass.pass_decoding import pass1_decode, pass_decode
from minipass.tree_decoding import NGRAM, TreeConfig, ngram_decode, tree_decode

MODES = {"ar": ar_decode, "pass": pass_decode, "pass1": pass1_decode, "ngram": ngram_decode, "tree": tree_decode}
LOOKAHEAD_MODES = ("pass", "pass1", "tree")
# Trained look-ahead embeddings shipped for the default model (see weights/README.md for how they were made).
DEFAULT_LOOKAHEAD_FILE = Path(__file__).resolve().parent.parent / "weights" / "smollm2-135m-instruct.lookahead.safetensors"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options shared with bench.py and the training script."""
    parser.add_argument("--ckpt", default=None,
                        help="Hugging Face-layout checkpoint directory (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                        help="weights and activations dtype (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first row's random stream (row i uses seed+i)")


def add_decoding_args(parser: argparse.ArgumentParser) -> None:
    """Options of the speculative modes, shared with bench.py."""
    parser.add_argument("--lookahead-file", default=None,
                        help="look-ahead embeddings (.safetensors); default: the ones shipped for the default model, "
                             "else untrained (mean-embedding) ones")
    parser.add_argument("--kernels", default="auto", choices=["auto", "triton", "torch"],
                        help="attention and acceptance through the Triton kernels (CUDA) or torch (default: auto)")
    d = TreeConfig()
    parser.add_argument("--pass1-blocks", type=int, default=2,
                        help="pass1: look-ahead blocks after acceptance points 0..N-1, 0 = all L+1 (default 2)")
    parser.add_argument("--tree-nodes", type=int, default=d.nodes, help=f"tree: candidate nodes per call ({d.nodes})")
    parser.add_argument("--tree-topk", type=int, default=d.topk,
                        help=f"tree: look-ahead candidates per depth ({d.topk})")
    parser.add_argument("--tree-blocks", type=int, default=d.blocks,
                        help=f"tree: look-ahead blocks per call, 0 = n-gram drafts only ({d.blocks})")
    parser.add_argument("--ngram-max", type=int, default=d.ngram_max, help=f"longest suffix matched ({d.ngram_max})")
    parser.add_argument("--ngram-min", type=int, default=d.ngram_min, help=f"shortest suffix matched ({d.ngram_min})")
    parser.add_argument("--ngram-len", type=int, default=d.ngram_len, help=f"tokens copied per match ({d.ngram_len})")
    parser.add_argument("--ngram-chains", type=int, default=d.ngram_chains,
                        help=f"tree: distinct n-gram continuations, 0 = look-ahead drafts only ({d.ngram_chains})")


def lookahead_for(model, args, L: int, quiet: bool = False):
    """The look-ahead embeddings (L, dim) of a PaSS mode: --lookahead-file, the shipped ones for the default model,
    or untrained (mean-embedding) ones."""
    if L < 1:
        raise MinipassError(f"--lookahead must be >= 1, got {L}")
    path = args.lookahead_file
    if path is None and args.ckpt is None and DEFAULT_LOOKAHEAD_FILE.is_file():
        path = DEFAULT_LOOKAHEAD_FILE
    if path is not None:
        return load_lookahead(path, model, L)
    if not quiet:
        print(f"minipass: no --lookahead-file; using {L} untrained (mean-embedding) look-ahead tokens, "
              "which draft poorly", file=sys.stderr)
    return init_lookahead(model, L).to(model.embed_tokens.weight.dtype)


def make_decoder(mode: str, model, args, L: int, quiet: bool = False):
    """decode(model, prompts, max_new_tokens, sampling, seeds=, stop_ids=, on_tokens=) for a mode and options."""
    if mode not in MODES:
        raise MinipassError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    if mode == "ar":
        return ar_decode
    ngram = dict(ngram_max=args.ngram_max, ngram_min=args.ngram_min, ngram_len=args.ngram_len)
    if mode == "ngram":
        return partial(ngram_decode, tree=TreeConfig(**{**NGRAM.__dict__, **ngram, "nodes": args.ngram_len}))
    lookahead = lookahead_for(model, args, L, quiet)
    if mode == "pass":
        return partial(pass_decode, lookahead=lookahead)
    if mode == "pass1":
        return partial(pass1_decode, lookahead=lookahead, blocks=args.pass1_blocks or None)
    tree = TreeConfig(nodes=args.tree_nodes, topk=args.tree_topk, blocks=args.tree_blocks,
                      ngram_chains=args.ngram_chains, **ngram)
    return partial(tree_decode, lookahead=lookahead, tree=tree)


class StdoutStream:
    """on_tokens callback: writes row 0's newly committed tokens to stdout as text."""

    def __init__(self, tok):
        self.decoder, self.printed = tok.stream(), 0

    def __call__(self, out, n_out) -> None:
        n = int(n_out[0])
        sys.stdout.write("".join(self.decoder.push(t) for t in out[0, self.printed:n].tolist()))
        sys.stdout.flush()
        self.printed = n

    def close(self) -> None:
        sys.stdout.write(self.decoder.flush() + "\n")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minipass.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--prompt", action="append", required=True, help="prompt text (repeat for a batch)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the model's chat template")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    add_sampling_args(parser)
    parser.add_argument("--mode", default="ar", choices=list(MODES), help="decoding algorithm (default: ar)")
    parser.add_argument("--lookahead", type=int, default=4, help="look-ahead tokens L (default 4)")
    add_decoding_args(parser)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    init_from_env()  # under torchrun: tensor parallel over the processes, rank 0 prints
    try:
        sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
        model, tok, _ = load_checkpoint(args.ckpt, args.dtype, args.device, args.kernels)
        decode = make_decoder(args.mode, model, args, args.lookahead)
        texts = [tok.chat_prompt(p) if args.chat else p for p in args.prompt]
        prompts = [tok.encode(t) for t in texts]
        seeds = [args.seed + i for i in range(len(prompts))]

        printer = StdoutStream(tok) if len(prompts) == 1 else None
        result = decode(model, prompts, args.max_new_tokens, sampling, seeds=seeds, stop_ids=tok.eos_ids,
                        on_tokens=printer)
        if printer is not None:
            printer.close()
        else:
            for i, ids in enumerate(result.tokens):
                print(f"--- [{i}] {args.prompt[i]!r}\n{tok.decode(ids)}")
        s = result.stats
        print(f"[{args.mode}] {s.tokens} tokens in {s.wall_s:.2f} s ({s.tokens / s.wall_s:.1f} tokens/s, "
              f"{s.tokens_per_call:.2f} tokens per call)", file=sys.stderr)
    except MinipassError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
