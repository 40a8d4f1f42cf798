"""Time per call of each mode's compiled decoding step, and how much of it is outside the model forward.

    python -m minipass.bench_step                       # tiny random model, batch 64, greedy, every mode
    python -m minipass.bench_step --modes tree --batch-size 1 --rounds 9
    python -m minipass.bench_step --ckpt default --batch-size 1 --profile 15   # the default model, bf16 where native

The step of a mode (what `decoding.run` calls once per iteration) is compiled as the decoders compile it
(`decoding.compile_fn`), and so are the mode's forward calls alone, with the inputs the step gave them
(recorded from one eager call of the step): same widths, masks, positions and cache. The difference is the time the
step spends around the forward: building trees, verification, sampling, cache moves, the commit, and the compiled
wrapper's own host work. That difference of two larger figures is noisy on a shared machine, so the around-forward
time is also measured directly ("stand-in"): the step compiled once more with each forward replaced by a read of the
output it gave (a (B, T, vocab) copy, which the real forward's head also writes). Each round runs `--steps`
consecutive steps from the same state, then as many forwards, then as many stand-in steps; figures are medians over
rounds with the spread (min..max) of the per-call time.

The tiny model (2 layers, dim 64) makes the forward cheap, so the figures are dominated by what a step does around
it, which is what a GPU pays in full per step. bench.py measures whole decodes on real checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from dataclasses import replace
from unittest import mock

import torch
import torch._inductor.config

from minipass import decoding, pass_decoding, tree_decoding
from minipass.config import ModelArgs
from minipass.decoders import (LOOKAHEAD_MODES, MODES, DecoderOptions, datastore_for, lookahead_for, make_decoder,
                               with_tree)
from minipass.cli import run_cli
from minipass.decoding import SamplingParams
from minipass.loading import load_checkpoint
from minipass.lookahead import init_lookahead
from minipass.model import Transformer

# The module whose `run` each mode's decoder calls.
_LOOP = {"ar": decoding, "pass": pass_decoding, "pass1": pass_decoding, "ngram": tree_decoding,
         "tree": tree_decoding}


class _Captured(Exception):
    def __init__(self, step, st):
        self.step, self.st = step, st


def _capture(*args, **kwargs):
    model, step, st = args[:3]
    raise _Captured(step, st)


def step_and_state(decode, loop_module, model, prompts, max_new_tokens, sampling):
    """The (possibly compiled) step a decoder would loop over and the state after its prefill."""
    with mock.patch.object(loop_module, "run", _capture):
        try:
            decode(model, prompts, max_new_tokens, sampling)
        except _Captured as c:
            return c.step, c.st
    raise RuntimeError("the decoder returned without entering its loop")


@contextlib.contextmanager
def forward_replaced(model: Transformer, forward):
    """model.forward is `forward` inside the block."""
    model.forward = forward
    try:
        yield
    finally:
        del model.forward


def forward_calls(model: Transformer, step, st) -> list:
    """The keyword arguments of every model forward one eager call of `step` makes."""
    calls = []
    original = model.forward

    def record(*args, **kwargs):
        calls.append(dict(kwargs, tokens=args[0]) if args else dict(kwargs))
        return original(*args, **kwargs)

    with forward_replaced(model, record):
        step(model, st)
    return calls


def _call_key(kw: dict) -> tuple:
    x = kw["tokens"] if kw.get("embeds") is None else kw["embeds"]
    index = kw.get("logits_index")
    return (kw.get("embeds") is None, tuple(x.shape), None if index is None else tuple(index.shape),
            bool(kw.get("return_hidden")))


def stand_in_forward(calls: list, outputs: list):
    """A model forward that returns, for a call shaped like one of `calls`, the output that call gave (recorded).
    The output is made to depend on the call's input, so that a compiled step cannot fold what follows it into
    constants."""
    table = {}
    for kw, out in zip(calls, outputs):
        if table.setdefault(_call_key(kw), out).shape != out.shape:
            raise RuntimeError("two forward calls of one step take the same inputs but give different outputs")

    def forward(tokens=None, **kw):
        kw = kw if tokens is None else dict(kw, tokens=tokens)
        x = kw["tokens"] if kw.get("embeds") is None else kw["embeds"]
        out = table[_call_key(kw)]
        return out + (x.reshape(x.shape[0], -1)[:, :1] * 0).to(out.dtype).view(-1, *[1] * (out.dim() - 1))

    return forward


def timed(fn, steps: int) -> float:
    t = time.perf_counter()
    fn(steps)
    return (time.perf_counter() - t) / steps * 1e3


def per_call_table(prof, calls: int, k: int) -> str:
    """The k operations with the most self CPU time, per call: name, input shapes, count, microseconds."""
    rows = sorted(prof.key_averages(group_by_input_shape=True), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in rows) / calls
    lines = [f"  {'self us':>8s} {'count':>6s}  operation (input shapes); all: {total:.0f} us per call"]
    for e in rows[:k]:
        shapes = str(e.input_shapes)[:70] if e.input_shapes else ""
        lines.append(f"  {e.self_cpu_time_total / calls:8.1f} {e.count / calls:6.1f}  {e.key[:60]} {shapes}")
    return "\n".join(lines)


def fmt(xs) -> str:
    return f"{statistics.median(xs):7.2f} ({min(xs):.2f}..{max(xs):.2f})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--config", default="tiny", help="a tiny model config name (minipass.config.TINY_CONFIGS)")
    p.add_argument("--ckpt", default=None,
                   help="a checkpoint directory, or 'default' for the default model, instead of a tiny random model")
    p.add_argument("--dtype", default="auto", help="with --ckpt: auto, bf16, fp16 or fp32")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="consecutive steps per round")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--eager", action="store_true", help="time the steps uncompiled")
    p.add_argument("--tree", default=None, metavar="N,M,L",
                   help="the tree mode's nodes N, look-ahead blocks M and look-ahead tokens L (default: the default "
                        "tree; bench.py prints the sizes it picks)")
    p.add_argument("--datastore", default=None,
                   help="tree: a datastore file, or none (default: the shipped one with --ckpt default, else none)")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="also print, per mode, the K costliest operations of one round of steps, of forwards and of "
                        "stand-in steps (torch.profiler, with shapes)")
    args = p.parse_args(argv)
    return run_cli(lambda: bench(args))


def bench(args) -> None:
    if args.profile:  # each generated kernel its own profiler event
        torch._inductor.config.cpp.enable_kernel_profile = True
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    L = DecoderOptions().lookahead
    if args.tree:
        nodes, blocks, L = (int(v) for v in args.tree.split(","))
    if args.ckpt:
        model, _, _ = load_checkpoint(None if args.ckpt == "default" else args.ckpt, args.dtype, device="cpu")
        lookahead, _ = lookahead_for(model, None, L, default_model=args.ckpt == "default")
        store = datastore_for(model, args.datastore, default_model=args.ckpt == "default")[0]
        name = "default" if args.ckpt == "default" else args.ckpt
    else:
        model = Transformer(ModelArgs.from_name(args.config)).eval().requires_grad_(False)
        lookahead = init_lookahead(model, L, "random", seed=1)
        store = datastore_for(model, args.datastore, default_model=False)[0]
        name = args.config
    # Prompts over a few token ids repeat their n-grams, so the n-gram drafts find matches (ids past the first
    # hundred: a real vocabulary's first ones are control tokens).
    g = torch.Generator().manual_seed(0)
    first = 100 if model.args.vocab_size > 1000 else 0
    prompts = torch.randint(first, first + 16, (args.batch_size, args.prompt_len), generator=g).tolist()
    options = DecoderOptions(compile=not args.eager, cache_len=args.prompt_len + 192, datastore=store)
    if args.tree:
        options = with_tree(replace(options, lookahead=L), nodes=nodes, blocks=blocks)
    sampling = SamplingParams()  # greedy
    print(f"{name} model ({model.embed_tokens.weight.dtype}), batch {args.batch_size}, prompt {args.prompt_len} tokens, greedy, "
          f"{'eager' if args.eager else 'compiled'}, {torch.get_num_threads()} threads; ms per call, median "
          f"(min..max) over {args.rounds} rounds of {args.steps} steps")
    print(f"{'mode':6s} {'width':>5s} {'compile s':>9s} {'step ms':>20s} {'forward ms':>20s} {'outside ms':>20s} "
          f"{'stand-in ms':>20s}")
    for mode in args.modes.split(","):
        decode = make_decoder(mode, options, lookahead if mode in LOOKAHEAD_MODES else None)
        with torch.no_grad():
            step, st0 = step_and_state(decode, _LOOP[mode], model, prompts, 128, sampling)
            eager_step = getattr(step, "_torchdynamo_orig_callable", step)
            calls = forward_calls(model, eager_step, st0)
            width = "+".join(str((c["tokens"] if c.get("embeds") is None else c["embeds"]).shape[1]) for c in calls)

            def forwards(m, calls):  # the inputs are arguments, not constants that freezing would fold
                return [m(**kw) for kw in calls]

            fwd = forwards if args.eager else decoding.compile_fn(forwards, st0["seqlens"].device)
            t = time.perf_counter()
            st1 = step(model, st0)  # compiles
            step(model, st1)  # and again, were the second call's state to need another variant
            fwd(model, calls)
            compile_s = time.perf_counter() - t
            # The step once more, with each forward replaced by a read of the output it gave: what the step costs
            # around its forwards, measured directly rather than as a difference of two larger figures.
            stand_in = stand_in_forward(calls, [model(**kw) for kw in calls])

            def around(m, s):  # a function of its own, so that it compiles apart from `step`
                return eager_step(m, s)

            bare = around if args.eager else decoding.compile_fn(around, st0["seqlens"].device)
            with forward_replaced(model, stand_in):
                bare(model, bare(model, st1))

            def run_steps(n):
                s = st1
                for _ in range(n):
                    s = step(model, s)

            def run_forwards(n):
                for _ in range(n):
                    fwd(model, calls)

            def run_bare(n):
                s = st1
                with forward_replaced(model, stand_in):
                    for _ in range(n):
                        s = bare(model, s)

            step_ms, fwd_ms, bare_ms = [], [], []
            with decoding.steady_guards():  # as decoding.run steps, from its third step on
                for _ in range(args.rounds):  # interleaved, so that a slow spell of the machine hits all three
                    step_ms.append(timed(run_steps, args.steps))
                    fwd_ms.append(timed(run_forwards, args.steps))
                    bare_ms.append(timed(run_bare, args.steps))
        outside = [s - f for s, f in zip(step_ms, fwd_ms)]
        print(f"{mode:6s} {width:>5s} {compile_s:9.1f} {fmt(step_ms):>20s} {fmt(fwd_ms):>20s} {fmt(outside):>20s} "
              f"{fmt(bare_ms):>20s}", flush=True)
        if args.profile:
            for what, fn in (("step", run_steps), ("forward", run_forwards), ("stand-in step", run_bare)):
                with torch.no_grad(), decoding.steady_guards(), torch.profiler.profile(record_shapes=True) as prof:
                    fn(args.steps)
                print(f"--- {mode}, {what}: per call, the {args.profile} costliest operations")
                print(per_call_table(prof, args.steps, args.profile), flush=True)


if __name__ == "__main__":
    sys.exit(main())
