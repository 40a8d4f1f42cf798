"""Held-out acceptance of look-ahead embeddings: how many drafts `pass` and `pass1` get accepted.

    python -m minipass.eval_lookahead --lookahead-file weights/smollm2-135m-instruct.lookahead.safetensors
    python -m minipass.eval_lookahead --lookahead 4 --dataset sharegpt          # untrained (mean-embedding) ones

Prompts are never training data: HumanEval prompts (raw code completion) or first user turns of the ShareGPT eval
split (chat format). Prints, per mode, the acceptance at each draft position (accepted / verified there), E[j] (mean
accepted drafts per verification) and tokens per forward call.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from minipass.decoding import DecodeStats, SamplingParams
from minipass.errors import MinipassError
from minipass.cli import add_model_args, add_sampling_args, run_cli
from minipass.lookahead import init_lookahead, load_lookahead
from minipass.pass_decoding import pass1_decode, pass_decode

MODES = {"pass": pass_decode, "pass1": pass1_decode}


def eval_prompts(tok, dataset: str, num: int) -> list[list[int]]:
    """Token ids of the first `num` held-out prompts of 'humaneval' or 'sharegpt'."""
    from minipass.data import humaneval_prompts, sharegpt_prompts

    if dataset == "humaneval":
        return [tok.encode(p) for p in humaneval_prompts()[:num]]
    if dataset == "sharegpt":
        return [tok.encode(tok.chat_prompt(p)) for p in sharegpt_prompts("eval")[:num]]
    raise MinipassError(f"unknown dataset {dataset!r}; use humaneval or sharegpt")


def acceptance(model, prompts: Sequence[Sequence[int]], lookahead, max_new_tokens: int,
               sampling: SamplingParams = SamplingParams(), modes: Sequence[str] = ("pass", "pass1"),
               stop_ids: Sequence[int] = (), batch_size: int = 16, seed: int = 0) -> dict:
    """{mode: DecodeStats} of decoding every prompt with the look-ahead embeddings (L, dim), in batches."""
    out = {}
    for mode in modes:
        stats = DecodeStats()
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i: i + batch_size]
            seeds = [seed + i + j for j in range(len(batch))]
            res = MODES[mode](model, batch, max_new_tokens, sampling, seeds=seeds, stop_ids=stop_ids,
                              lookahead=lookahead)
            stats = stats + res.stats
        out[mode] = stats
    return out


def format_row(mode: str, s: DecodeStats) -> str:
    acc = " ".join(f"{a:.3f}" for a in s.acceptance)
    return f"{mode:<6} {s.mean_accepted:6.3f} {s.tokens_per_call:8.3f}   {acc}"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minipass.eval_lookahead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--lookahead-file", default=None, help="embeddings to evaluate (default: untrained ones)")
    parser.add_argument("--init", default="mean", choices=["mean", "random"],
                        help="untrained embeddings when there is no --lookahead-file (default mean)")
    parser.add_argument("--lookahead", type=int, default=None,
                        help="use the first L embeddings (default: all in the file, 4 untrained)")
    parser.add_argument("--dataset", action="append", choices=["humaneval", "sharegpt"], default=None,
                        help="held-out prompt set, repeatable (default: both)")
    parser.add_argument("--modes", default="pass,pass1", help="comma-separated, from pass and pass1")
    parser.add_argument("--num-prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    add_sampling_args(parser)
    args = parser.parse_args(argv)
    args.dataset = args.dataset or ["humaneval", "sharegpt"]
    return args


def evaluate(args: argparse.Namespace) -> None:
    from minipass.loading import load_checkpoint

    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        raise MinipassError(f"--modes must list pass and/or pass1, got {args.modes!r}")
    if args.num_prompts < 1 or args.batch_size < 1:
        raise MinipassError("--num-prompts and --batch-size must be at least 1")
    sampling = SamplingParams(args.temperature, args.top_k, args.top_p)
    model, tok, _ = load_checkpoint(args.ckpt, args.dtype, args.device, check_weights=args.check_weights)
    if args.lookahead_file:
        la = load_lookahead(args.lookahead_file, model, args.lookahead)
        source = args.lookahead_file
    else:
        L = 4 if args.lookahead is None else args.lookahead
        if L < 1:
            raise MinipassError(f"--lookahead must be >= 1, got {L}")
        la = init_lookahead(model, L, args.init).to(model.embed_tokens.weight.dtype)
        source = f"untrained ({args.init})"
    setting = "greedy" if args.temperature == 0 else \
        f"temperature {args.temperature}, top-k {args.top_k}, top-p {args.top_p}"
    for dataset in args.dataset:
        prompts = eval_prompts(tok, dataset, args.num_prompts)
        res = acceptance(model, prompts, la, args.max_new_tokens, sampling, modes, tok.eos_ids,
                         args.batch_size, args.seed)
        print(f"{dataset}: {len(prompts)} prompts x {args.max_new_tokens} new tokens, {setting}, "
              f"L={la.shape[-2]} {source}")
        print(f"{'mode':<6} {'E[j]':>6} {'tok/call':>8}   acceptance by position")
        for mode, stats in res.items():
            print(format_row(mode, stats))


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: evaluate(args))


if __name__ == "__main__":
    sys.exit(main())
