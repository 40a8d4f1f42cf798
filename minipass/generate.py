"""Command line: generate text with a checkpoint (the embedded default model when no --ckpt is given).

    python -m minipass.generate --prompt "Write a haiku about the sea." --chat
    python -m minipass.generate --ckpt path/to/llama --prompt "def fib(n):" --temperature 0.8 --top-k 10

One prompt streams its completion to stdout; several --prompt options run as one batch and print each completion.
"""

from __future__ import annotations

import argparse
import sys

from minipass.cli import add_decoding_args, add_model_args, add_sampling_args, decoder_options, run_cli, tree_nodes
from minipass.decoders import LOOKAHEAD_MODES, MODES, datastore_for, lookahead_for, make_decoder
from minipass.decoding import SamplingParams
from minipass.distributed import finish, init_from_env
from minipass.loading import load_checkpoint
from minipass.tree_decoding import TreeConfig


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


def generate(args: argparse.Namespace) -> None:
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    model, tok, _ = load_checkpoint(args.ckpt, args.dtype, args.device, args.kernels,
                                   check_weights=args.check_weights)
    # A one-off generation has no calibration run to size the tree on: auto means the default budget here.
    store = datastore_for(model, args.datastore, args.ckpt is None)[0] if args.mode == "tree" else None
    options = decoder_options(args, args.lookahead, tree_nodes(args) or TreeConfig().nodes, store)
    la = None
    if args.mode in LOOKAHEAD_MODES:
        la, source = lookahead_for(model, args.lookahead_file, args.lookahead, default_model=args.ckpt is None)
        if source.startswith("untrained"):
            print(f"minipass: no --lookahead-file; using {args.lookahead} untrained (mean-embedding) look-ahead "
                  "tokens, which draft poorly", file=sys.stderr)
    decode = make_decoder(args.mode, options, la)
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


def main(argv=None) -> int:
    args = parse_args(argv)
    init_from_env()  # under torchrun: tensor parallel over the processes, rank 0 prints
    return finish(run_cli(lambda: generate(args)))  # under torchrun: the ranks leave together


if __name__ == "__main__":
    sys.exit(main())
