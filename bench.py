"""Benchmark: autoregressive decoding vs PaSS and token trees, on your checkpoint, your hardware, your prompts.

    python bench.py                                   # default model, both prompt sets, greedy + top-k 10 / T 0.8
    python bench.py --ckpt path/to/llama --lookahead-file la.safetensors --dataset prompts.jsonl
    python bench.py --modes ar,pass,pass1 --lookahead 1,2,4,6,8 --temperature 0 --plot sweep.png
    python bench.py --modes ar,tree --tree-nodes auto,11          # the auto-sized tree against the default one
    python bench.py --modes ar,tree --curve-widths 1,8,16,32      # fewer compiled widths for the cost curve
    python bench.py --modes ar,tree --profile 30                  # and where each mode's time per call goes

Every mode decodes the same prompts with the same seeds. The timed runs come in rounds: each round runs every
configuration once, in an order rotated from round to round, so a slow phase of a shared machine spreads over all
modes instead of landing on one. A configuration's tokens/s is the median over rounds (with its min-max spread), and
its speed-up the median of its per-round ratios to the autoregressive run of the same round. Before the rounds,
every configuration is warmed up (its step compiled, the longest prompt prefilled, every weight read), and that
time is reported apart. Greedy runs say whether the output was token-identical to autoregressive decoding.

On a shared CPU the bench measures what other processes take (/proc/stat, during every timed run and before every
round): a round runs on the cores they leave free, a round they disturb stops and runs again on fewer threads
(not under torchrun, whose ranks must run the same rounds), and the JSON keeps the per-run figures
(`other_load_rounds`) and the rounds' threads (`round_log`).

Printed under the table: the hardware ceiling (memory read bandwidth, measured, and the weights-read bound on
tokens/s it implies; and the same for a buffer of the weights' size read over and over, which a last-level cache
larger than the weights serves faster than memory), the measured cost t(T) of one forward of T new tokens relative
to t(1), and the sizes chosen for the speculation when they are sized automatically (sizing.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch._inductor.config

from minipass.cli import add_decoding_args, add_model_args, decoder_options, run_cli
from minipass.data import humaneval_prompts, jsonl_prompts, sharegpt_prompts
from minipass.decoders import LOOKAHEAD_MODES, MODES, datastore_for, lookahead_for, make_decoder
from minipass.decoding import (CACHE_ROUNDING, DecodeStats, SamplingParams, compile_fn, prefill_width,
                               steady_guards)
from minipass.distributed import default_group, finish, init_from_env, rank
from minipass.errors import MinipassError
from minipass.loading import load_checkpoint
from minipass.tree_decoding import TreeConfig

PAPER_SAMPLING = (0.8, 10, 1.0)  # the paper's setting: temperature 0.8, top-k 10
UNSTABLE_SPREAD = 0.15  # a configuration whose tokens/s varied more than this over the rounds is flagged
BUSY_CORES = 0.25  # a timed run during which other processes took more CPU than this (in cores) is flagged
CURVE_WIDTHS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64)  # forward widths measured for the cost curve (and the sizing)
CURVE_ROUNDS = 25  # timed calls of each width for the cost curve (a few seconds against minutes of compiling)
CURVE_BLOCK = (2, 3)  # per round, each width: calls not timed, then calls timed (their median is the round's)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--modes", default="ar,pass,pass1,ngram,tree",
                   help=f"comma-separated, from {','.join(MODES)} (ar always runs: it is the baseline)")
    p.add_argument("--lookahead", default="4", help="look-ahead tokens L, or a comma-separated sweep (1,2,4,6,8)")
    p.add_argument("--dataset", default="humaneval,sharegpt",
                   help="humaneval, sharegpt (held-out first turns, chat format), or a JSONL file of "
                        "{\"prompt\": text} / {\"messages\": [...]} lines; comma-separated")
    p.add_argument("--num-prompts", type=int, default=3, help="prompts per data set (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of every configuration (default 3)")
    p.add_argument("--temperature", type=float, default=None,
                   help="one sampling setting (default: greedy and the paper's top-k 10 / temperature 0.8)")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    add_decoding_args(p, compile_default=True)
    p.set_defaults(tree_nodes="auto")
    p.add_argument("--calibration-prompts", type=int, default=6,
                   help="--tree-nodes auto: prompts of the calibration run per data set and setting (default 6)")
    p.add_argument("--curve-widths", default=",".join(map(str, CURVE_WIDTHS)),
                   help="widths T of the measured cost curve, comma-separated (1 is always measured: the curve is "
                        "read relative to t(1)); each is one more compiled forward, so fewer widths shorten the "
                        f"set-up where compiling is slow (default {','.join(map(str, CURVE_WIDTHS))})")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (default: torch's choice, lowered for a round when other processes "
                        "keep cores busy: see CpuMeter)")
    p.add_argument("--peer", choices=["hf"], default=None,
                   help="also time transformers' generate on the same weights, plain and with prompt lookup")
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="after the rounds, profile whole decodes of each configuration's first prompt (two each, "
                        "in alternation; torch.profiler, with shapes, every compiled kernel an event) and print the "
                        "K operations with the most self time per decoding call, one column per mode (JSON: profile)")
    p.add_argument("--json", default=None, help="write the figures to this JSON file")
    p.add_argument("--plot", default=None, help="write speed-up and tokens per call against L to this PNG")
    return p.parse_args(argv)


def load_prompts(spec: str, tok, n: int) -> tuple[str, list]:
    """(name, token ids per prompt) for a data set name or a JSONL file."""
    if spec == "humaneval":
        texts = humaneval_prompts()[:n]
    elif spec == "sharegpt":
        texts = [tok.chat_prompt(t) for t in sharegpt_prompts("eval")[:n]]
    else:
        texts = [tok.chat_prompt(r["messages"]) if "messages" in r else r["prompt"] for r in jsonl_prompts(spec)[:n]]
        spec = Path(spec).stem
    return spec, [tok.encode(t) for t in texts]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def load_average() -> Optional[list]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


class CpuMeter:
    """CPU time that other processes take on the cores this one may use: a shared machine's noise, measured.

    Linux only (/proc/stat); elsewhere `others` returns None. Steal time (a hypervisor's other guests) counts as
    taken."""

    def __init__(self):
        try:
            self.cpus = {f"cpu{c}" for c in os.sched_getaffinity(0)}
            self.tick = os.sysconf("SC_CLK_TCK")
            self.sample()
        except (AttributeError, OSError, ValueError):
            self.cpus = None

    def sample(self) -> Optional[tuple]:
        """(busy CPU seconds of the cores, this process's CPU seconds, wall seconds), or None."""
        if self.cpus is None:
            return None
        busy = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *ticks = line.split()
                if name in self.cpus:  # user nice system idle iowait irq softirq steal ...
                    t = [int(x) for x in ticks[:8]]
                    busy += sum(t) - t[3] - t[4]
        return busy / self.tick, time.process_time(), time.perf_counter()

    @staticmethod
    def others(a: Optional[tuple], b: Optional[tuple]) -> Optional[float]:
        """Cores' worth of CPU that other processes used between samples a and b; None for less than half a
        second, over which /proc/stat's clock ticks (10 ms) are too coarse to tell."""
        if a is None or b is None or b[2] - a[2] < 0.5:
            return None
        return max(0.0, ((b[0] - a[0]) - (b[1] - a[1])) / (b[2] - a[2]))

    def idle_others(self, seconds: float = 0.6) -> Optional[float]:
        """Cores' worth of CPU that other processes use while this one sleeps for `seconds`."""
        a = self.sample()
        time.sleep(seconds)
        return self.others(a, self.sample())


def round_threads(base: int, cores: int, others: Optional[float]) -> int:
    """Threads for a round on a CPU: torch's `base`, less the cores other processes keep busy (measured just
    before the round). A parallel region waits for its slowest thread, so one thread sharing a core with another
    process stalls every matrix product; on 2 cores such runs were measured 20-70x slower, not 2x."""
    if others is None:
        return base
    return max(1, min(base, cores - int(others + 0.5)))


class Progress:
    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.perf_counter()

    def step(self, what: str) -> None:
        self.done += 1
        bar = "#" * (20 * self.done // max(self.total, 1))
        print(f"\rbench [{bar:<20}] {self.done}/{self.total} {what:<52} {time.perf_counter() - self.t0:6.0f}s",
              end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


# --- the hardware ceiling and the cost curve ----------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def read_bandwidth(device: torch.device, nbytes: int, sums: int, untimed: int = 0) -> float:
    """GB/s of the fastest of `sums` timed sums of an fp32 buffer of `nbytes`, after `untimed` sums not timed."""
    n = max(nbytes // 4, 1)
    x = torch.ones(n, device=device)
    for _ in range(untimed):
        x.sum()
    best = float("inf")
    for _ in range(sums):
        sync(device)
        t0 = time.perf_counter()
        x.sum()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    del x
    return n * 4 / best / 1e9


def memory_bandwidth(device: torch.device, sums: int = 5) -> float:
    """Read bandwidth in GB/s: the best of a few sums of a buffer far larger than the caches (1 GB on a CPU,
    whose last-level cache may hold a few hundred MB; 4 GB on a GPU)."""
    return read_bandwidth(device, 4 << 30 if device.type == "cuda" else 1 << 30, sums=sums)


def ceiling_bandwidths(device: torch.device, nbytes: int, rounds: int = 5) -> tuple:
    """GB/s of (the memory, a buffer of `nbytes` read again and again), measured in alternation, `rounds` of each,
    best of each. The second is what a decode's steps meet, reading their weights over and over: where the
    last-level cache holds them (the Intel Xeon's 300 MiB against the default model's 0.27 GB) it is that cache's
    rate, not the memory's (39-56 against 32 GB/s there, as the host's other work leaves the cache); elsewhere the two
    agree. In alternation because a shared host's memory rate can change by half within minutes (the AMD EPYC: 31 to
    61 GB/s), and two figures taken one after the other would then differ for that reason alone."""
    memory, resident = 0.0, 0.0
    for _ in range(rounds):
        memory = max(memory, memory_bandwidth(device, sums=1))
        resident = max(resident, read_bandwidth(device, nbytes, sums=2, untimed=1))
    return memory, resident


def last_level_cache(device: torch.device, root: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> Optional[int]:
    """Bytes of the last-level cache the weights would have to fit in: a CPU's highest cache level (Linux sysfs), a
    GPU's L2; None where unknown."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None) or None
    best = None
    for index in sorted(root.glob("index*")):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level, text = int((index / "level").read_text()), (index / "size").read_text().strip().upper()
            size = int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        except (OSError, ValueError):
            continue
        best = max(best or (level, size), (level, size))  # the highest level, the largest at it
    return best[1] if best else None


def resident_note(memory: float, resident: float, nbytes: int, llc: Optional[int]) -> str:
    """What the resident figure means next to the memory's: the weights fit in the last-level cache, or they do not
    and a gap between the two is the memory's rate moving during the measurement."""
    if llc is not None and nbytes <= llc:
        return f" of it (the weights fit in the {llc / 2 ** 20:.0f} MiB last-level cache)"
    if resident > 1.3 * memory:
        if llc is None:
            return " of it (faster than the memory's rate: a cache may hold the weights)"
        return (f" of it (the weights are larger than the {llc / 2 ** 20:.0f} MiB last-level cache: the gap between the "
                "two rates is the memory's rate varying on a shared host)")
    return " of it"


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def cost_curve(model, widths, batch: int, context: int, compile, cache_len: int = 0) -> dict:
    """Seconds per forward of T new tokens (causal) per row after `context` cached tokens, for each T in widths:
    timed after 2 warm-ups (below), compiled like the decoding steps when `compile` is set (and then timed
    with the guard checks of a decode's later steps, `decoding.steady_guards`).

    A compiled call attends over the whole cache, so its attention costs what the cache's length says: pass the
    decodes' `cache_len` for a curve that prices their calls (the least length that fits is used otherwise).

    Every width is compiled and warmed up first; the timed calls then come in CURVE_ROUNDS rounds, one short block
    of calls of each width per round in an order rotated from round to round, so a slow period of a shared machine
    lands on every width alike instead of on the one being measured (the curve is read relative to t(1): one slow
    width-1 block would make every wider call look cheap), and the rounds are read by curve_from_rounds.

    Within a round a width is timed after CURVE_BLOCK[0] calls of its own, as a decode's steps run: one compiled
    step after another. Each compiled width holds its own frozen copy of the weights (decoding.compile_fn), and a
    CPU whose last-level cache holds the weights (the Intel Xeon's 300 MiB against 0.27 GB) serves them from there
    only to calls of the copy read last: one call of each width in turn read every width from memory and priced a
    12-wide call at 1.17x t(1), where 12-wide forwards called one after another cost 1.31x the one-token forward
    and a decode's 12-wide tree steps 1.31-1.40x its AR steps (README, *Sizing the tree to the machine*)."""
    device = model.embed_tokens.weight.device
    g = torch.Generator().manual_seed(0)
    model.setup_caches(batch, max(cache_len, context + max(widths) + 1))
    ids = torch.randint(0, model.args.vocab_size, (batch, context + max(widths)), generator=g).to(device)
    zeros = torch.zeros(batch, dtype=torch.long, device=device)
    seq = torch.full((batch,), context, device=device)
    with torch.no_grad():
        model(ids[:, :context], input_pos=torch.arange(context, device=device).expand(batch, -1),
              cache_seqlens=zeros, kv_len=context, logits_index=zeros[:, None])

    def forward(m, tokens, pos, seqlens):
        return m(tokens, input_pos=pos, cache_seqlens=seqlens)

    widths, calls = list(widths), {}
    with torch.no_grad():
        for T in widths:
            fn = compile_fn(forward, device, None if compile is True else dict(compile)) if compile else forward
            tokens, pos = ids[:, context: context + T], seq[:, None] + torch.arange(T, device=device)
            for _ in range(2):  # compiles, then runs once more
                fn(model, tokens, pos, seq)
            calls[T] = (fn, tokens, pos)
    times = {T: [] for T in widths}
    with torch.no_grad(), steady_guards() if compile else contextlib.nullcontext():
        for r in range(CURVE_ROUNDS):
            for T in widths[r % len(widths):] + widths[:r % len(widths)]:
                fn, tokens, pos = calls[T]
                for _ in range(CURVE_BLOCK[0]):
                    fn(model, tokens, pos, seq)
                block = []
                for _ in range(CURVE_BLOCK[1]):
                    sync(device)
                    t0 = time.perf_counter()
                    fn(model, tokens, pos, seq)
                    sync(device)
                    block.append(time.perf_counter() - t0)
                times[T].append(statistics.median(block))
    return curve_from_rounds(times)


def curve_from_rounds(times: dict) -> dict:
    """The cost curve from `times[T][r]`, the seconds of width T's call in round r: t(T) = the median of t(1) times
    the median over the rounds of t(T) / t(1) within a round. The two calls of a round are a few tens of milliseconds
    apart, so a slow period of a shared machine slows both terms of a ratio, where medians taken width by width
    each land wherever the slow rounds of that width happened to fall. (The smallest width stands in for 1 if 1
    was not measured.)"""
    ref = times[1] if 1 in times else times[min(times)]
    return {T: statistics.median(ref) * statistics.median(t / r for t, r in zip(ts, ref)) for T, ts in times.items()}


def envelope(curve: dict) -> dict:
    """The measured curve made non-decreasing in T: t(T) = the least t(T') measured at any T' >= T. A call of T
    tokens can always run as the wider call (padded), so a narrower width that measured slower than a wider one was
    disturbed, and left as measured it would steer the sizing away from every width near it."""
    out, least = {}, float("inf")
    for T in sorted(curve, reverse=True):
        least = min(least, curve[T])
        out[T] = least
    return dict(sorted(out.items()))


def interpolate(curve: dict) -> Callable[[int], float]:
    """t(T) between the measured widths, linear (and flat beyond the ends)."""
    xs = sorted(curve)

    def t(T: int) -> float:
        if T <= xs[0]:
            return curve[xs[0]]
        for a, b in zip(xs, xs[1:]):
            if T <= b:
                return curve[a] + (curve[b] - curve[a]) * (T - a) / (b - a)
        return curve[xs[-1]] * T / xs[-1]

    return t


def op_key(name: str, shapes) -> str:
    """An operation's name and input shapes, read alike in every mode's profile: the compiled graph's number and hash
    dropped from its kernels' and wrapper's names (and a kernel's number within its graph), and the first input's
    shape (its leading size is the call's width, which differs from mode to mode) left out, so that the rows of one
    product line up across columns."""
    name = re.sub(r"^graph_\d+_", "", name)
    name = re.sub(r"^((cpp|triton)_.*)_\d+$", r"\1", name)  # a generated kernel's number within its graph
    name = re.sub(r"(CompiledFxGraph) \S+", r"\1", name)
    name = re.sub(r"(Torch-Compiled Region): \S+", r"\1", name)
    rest = [list(x) for x in (shapes or [])[1:] if x]
    return f"{name[:60]} {rest}" if rest else name[:60]


PROFILE_ROUNDS = 2  # profiled decodes per configuration, in alternation (see profile_decodes)


def profile_decodes(configs: list, model, prompt: list, args, stop_ids) -> dict:
    """{label: {op: self microseconds per decoding call}} from profiled decodes of `prompt`, PROFILE_ROUNDS per
    configuration, the configurations in alternation (in an order rotated from round to round) and their figures
    averaged, so that a slow spell of a shared machine does not land on one column alone. Prefill included, spread
    over the decode's calls, as the tokens/s column counts it. The profiler's own cost per event inflates the many
    small operations: read the columns against each other, not as wall times."""
    out = {cfg.label or cfg.mode: {} for cfg in configs}
    for r in range(PROFILE_ROUNDS):
        for cfg in configs[r % len(configs):] + configs[: r % len(configs)]:
            with torch.profiler.profile(record_shapes=True) as prof:
                res = cfg.decode(model, [prompt], args.max_new_tokens, cfg.sampling, seeds=[args.seed],
                                 stop_ids=stop_ids)
            scale = 1.0 / (max(res.stats.calls, 1) * PROFILE_ROUNDS)
            ops = out[cfg.label or cfg.mode]  # the column of this configuration, over the rounds
            for e in prof.key_averages(group_by_input_shape=True):
                key = op_key(e.key, e.input_shapes)
                ops[key] = ops.get(key, 0.0) + e.self_cpu_time_total * scale
    return out


def profile_table(profiles: dict, k: int) -> str:
    """The k operations with the most self time per call in any mode, one column per mode, and each mode's total."""
    modes = list(profiles)
    keys = sorted(set().union(*profiles.values()), key=lambda op: -max(p.get(op, 0.0) for p in profiles.values()))
    lines = [f"  {'self us per decoding call':84s}" + "".join(f"{m:>10s}" for m in modes)]
    for op in keys[:k]:
        lines.append(f"  {op[:84]:84s}" + "".join(f"{profiles[m].get(op, 0.0):10.1f}" for m in modes))
    lines.append(f"  {'all operations':84s}" + "".join(f"{sum(profiles[m].values()):10.1f}" for m in modes))
    return "\n".join(lines)


# --- configurations and runs ----------------------------------------------------------------------------------------

@dataclass
class Config:
    dataset: str
    sampling: SamplingParams
    mode: str
    L: int
    decode: Optional[Callable]
    label: str = ""  # mode as printed (tree@11 for a fixed budget next to the auto-sized one)
    width: int = 1  # new tokens per forward call
    sizes: dict = field(default_factory=dict)  # the options that size it, for the JSON
    warmup_s: float = 0.0
    rounds: list = field(default_factory=list)  # (wall_s, DecodeStats, outputs) per round
    others: list = field(default_factory=list)  # cores' worth of CPU other processes took during each round's run


def run_config(cfg: Config, model, prompts, args, stop_ids) -> tuple:
    """Decode every prompt in batches; returns (outputs, merged DecodeStats)."""
    total, outputs = DecodeStats(), []
    for i in range(0, len(prompts), args.batch_size):
        batch = prompts[i:i + args.batch_size]
        seeds = [args.seed + i + j for j in range(len(batch))]
        out = cfg.decode(model, batch, args.max_new_tokens, cfg.sampling, seeds=seeds, stop_ids=stop_ids)
        outputs += out.tokens
        total = total + out.stats
    return outputs, total


def hf_decoder(ckpt, dtype, device, prompt_lookup: bool) -> Callable:
    """transformers' generate on the same weights, with the decoders' signature (one prompt at a time)."""
    from minipass.hf import import_transformers

    transformers = import_transformers()

    hf = transformers.LlamaForCausalLM.from_pretrained(str(ckpt), dtype=dtype).to(device).eval()

    def decode(model, prompts, max_new_tokens, sampling, seeds, stop_ids):
        gen = dict(max_new_tokens=max_new_tokens, eos_token_id=list(stop_ids) or None, pad_token_id=0,
                   do_sample=sampling.temperature > 0)
        if prompt_lookup:
            gen["prompt_lookup_num_tokens"] = 10
        if sampling.temperature > 0:
            gen.update(temperature=sampling.temperature, top_k=sampling.top_k or None, top_p=sampling.top_p)
        outputs, tokens, wall = [], 0, 0.0
        for p, seed in zip(prompts, seeds):
            ids = torch.tensor([p], device=device)
            torch.manual_seed(seed)
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), **gen)[0, len(p):].tolist()
            sync(device)
            wall += time.perf_counter() - t0
            outputs.append(out)
            tokens += len(out)
        stats = DecodeStats(calls=tokens, row_calls=tokens, tokens=tokens, wall_s=wall)
        return type("Output", (), {"tokens": outputs, "stats": stats})()

    return decode


def ideal_speedup(run: tuple, ar_run: tuple) -> float:
    """The speed-up over AR of one round (wall, DecodeStats, outputs) if each of its decoding calls took what an AR
    call of the same round took, its prefill as measured: the most that cheaper calls can give at these tokens per
    call. The prefill, the same work in every mode, is what keeps it below tokens per call."""
    (_, s, _), (ar_wall, ar, _) = run, ar_run
    per_call = (ar.wall_s - ar.prefill_s) / max(ar.calls, 1)
    return (s.tokens / (s.prefill_s + s.calls * per_call)) / (ar.tokens / ar_wall) if per_call > 0 else 0.0


def summarize(cfg: Config, ar: Config, gb: float, bound: float, cost_of: Callable, batch_size: int,
              n_prompts: int) -> dict:
    """The record of one configuration over its rounds."""
    tps = [s.tokens / w if w else 0.0 for w, s, _ in cfg.rounds]
    _, stats, outputs = cfg.rounds[0]
    median = statistics.median(tps)
    greedy = cfg.sampling.temperature == 0
    speedups = [1.0] * len(tps)
    if cfg is not ar:
        ar_tps = [s.tokens / w for w, s, _ in ar.rounds]
        speedups = [t / a if a else 0.0 for t, a in zip(tps, ar_tps)]
    hf = cfg.mode.startswith("hf")
    ideal = None if hf else statistics.median(ideal_speedup(r, a) for r, a in zip(cfg.rounds, ar.rounds))
    same, rows_same = None, None
    if greedy:
        # Row by row: a prompt counts as identical if every round gave autoregressive decoding's tokens.
        rows = [all(out[i] == ar.rounds[0][2][i] for _, _, out in cfg.rounds) for i in range(n_prompts)]
        rows_same = 1.0 if cfg is ar else sum(rows) / len(rows)
        same = rows_same == 1.0
    wall = statistics.median(w for w, _, _ in cfg.rounds)
    per_call = wall / stats.calls if stats.calls else None
    return {
        "dataset": cfg.dataset, "mode": cfg.label or cfg.mode, "lookahead": cfg.L,
        "temperature": cfg.sampling.temperature, "top_k": cfg.sampling.top_k, "top_p": cfg.sampling.top_p,
        "batch_size": batch_size, "prompts": n_prompts, "new_tokens": stats.tokens, "wall_s": round(wall, 4),
        "tokens_per_s": round(median, 3), "tokens_per_s_rounds": [round(t, 3) for t in tps],
        "spread": round((max(tps) - min(tps)) / median, 4) if median else None,
        "calls": None if hf else stats.calls,
        "tokens_per_call": None if hf else round(stats.tokens_per_call, 4),
        "time_per_call_ms": None if hf or per_call is None else round(per_call * 1e3, 3),
        "acceptance_by_position": [round(a, 4) for a in stats.acceptance],
        "mean_accepted": round(stats.mean_accepted, 4) if stats.attempted else None,
        "weights_gb_per_s": None if hf or not wall else round(gb * stats.calls / wall, 3),
        "share_of_bound": round(median / bound, 4) if bound and cfg.mode == "ar" else None,
        "speedup_vs_ar": round(statistics.median(speedups), 4), "speedup_rounds": [round(x, 4) for x in speedups],
        "speedup_at_ar_call_cost": None if ideal is None else round(ideal, 4),
        "prefill_share": None if hf else round(statistics.median(s.prefill_s / w if w else 0.0
                                                                  for w, s, _ in cfg.rounds), 4),
        "identical_to_ar": same, "identical_rows": rows_same, "width": cfg.width, "sizes": cfg.sizes, "warmup_s": round(cfg.warmup_s, 2),
        "model_cost_vs_ar": None if hf else round(cost_of(cfg.width), 4),
        "other_load_rounds": [None if x is None else round(x, 2) for x in cfg.others],
    }


# --- output ----------------------------------------------------------------------------------------------------------

def setting_label(r: dict) -> str:
    return "greedy" if r["temperature"] == 0 else f"T{r['temperature']:g} k{r['top_k']} p{r['top_p']:g}"


def sampling_label(sampling: SamplingParams) -> str:
    return setting_label({"temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p})


def print_table(runs: list) -> None:
    head = (f"{'dataset':<10} {'setting':<12} {'mode':<9} {'L':>2} {'tok/s':>7} {'spread':>6} {'speedup':>7} "
            f"{'tok/call':>8} {'call/ar':>7} {'ideal':>6} {'GB/s':>6} {'same':>4}  acceptance by position")
    print(head)
    print("-" * len(head))
    for r in runs:
        same = {True: "yes", False: f"{100 * (r['identical_rows'] or 0):.0f}%", None: "-"}[r["identical_to_ar"]]
        acc = " ".join(f"{a:.2f}" for a in r["acceptance_by_position"][:8])
        cost = r["time_per_call_ms"] / r["_ar_ms"] if r["time_per_call_ms"] and r.get("_ar_ms") else None
        print(f"{r['dataset']:<10} {setting_label(r):<12} {r['mode']:<9} {r['lookahead']:>2} "
              f"{r['tokens_per_s']:>7.1f} {100 * (r['spread'] or 0):>5.0f}% {r['speedup_vs_ar']:>6.2f}x "
              f"{(r['tokens_per_call'] or 0):>8.2f} {(f'{cost:.2f}x' if cost else '-'):>7} "
              f"{(f'{ideal:.2f}x' if (ideal := r.get('speedup_at_ar_call_cost')) else '-'):>6} "
              f"{(r['weights_gb_per_s'] or 0):>6.1f} {same:>4}  {acc}")


LEGEND = """\
tok/s     tokens per second over whole generate calls (prefill included): the median over the rounds
spread    (max - min) / median of tok/s over the rounds; above 15% the row is flagged as measured on an unstable machine
speedup   the median over the rounds of tok/s / the autoregressive tok/s of the same round and setting
tok/call  tokens emitted per forward call and batch row (1 for ar; pass counts its drafting and validation calls)
call/ar   wall time per forward call (verification and tree building included) / that of ar: speedup = tok/call / call/ar
ideal     the speed-up if each of the mode's calls took what an ar call takes, the prefill (the same work in every mode,
          in every tok/s) as measured: the most that cheaper calls can reach with these tokens per call
GB/s      weight bytes read per second: calls x weight size / wall time
same      greedy only: yes if the output is token-identical to autoregressive decoding, else the share of prompts
          that are (in bf16 the CPU's matrix products round differently at other call widths: see the README)
acceptance by position   per draft position (tree: per depth), the fraction of verified drafts accepted
setting   greedy = temperature 0; Tt kk pp = temperature t, top-k k (0 = off), top-p p (1 = off)
L         look-ahead tokens; mode tree@N is the tree with a fixed budget of N nodes next to the auto-sized one"""


def plot(runs: list, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MinipassError("--plot needs matplotlib (pip install 'minipass[plot]')") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    keys = sorted({(r["dataset"], r["temperature"], r["mode"]) for r in runs if r["mode"] in LOOKAHEAD_MODES})
    for dataset, temp, mode in keys:
        pts = sorted((r["lookahead"], r["speedup_vs_ar"], r["tokens_per_call"]) for r in runs
                     if (r["dataset"], r["temperature"], r["mode"]) == (dataset, temp, mode))
        label = f"{mode} {dataset} {'greedy' if temp == 0 else f'T={temp:g}'}"
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
    ax1.axhline(1.0, color="gray", lw=0.8)
    ax1.set(xlabel="look-ahead tokens L", ylabel="speed-up vs autoregressive", title="Speed-up")
    ax2.set(xlabel="look-ahead tokens L", ylabel="tokens per forward call", title="Tokens per call")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    tmp.replace(path)


# --- main --------------------------------------------------------------------------------------------------------------

def parse_list(text: str, what: str, allow_auto: bool = False) -> list:
    out = []
    for x in text.split(","):
        x = x.strip()
        if allow_auto and x == "auto":
            out.append(None)
            continue
        try:
            out.append(int(x))
        except ValueError:
            raise MinipassError(f"{what} must be integers separated by commas"
                                f"{' (or auto)' if allow_auto else ''}, got {text!r}") from None
    return out


def bench(args: argparse.Namespace) -> None:
    from minipass import sizing

    load_start = load_average()
    if args.profile < 0:
        raise MinipassError(f"--profile must be >= 0 (operations to print), got {args.profile}")
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    for m in modes:
        if m not in MODES:
            raise MinipassError(f"unknown mode {m!r} in --modes; choose from {', '.join(MODES)}")
    modes = ["ar"] + [m for m in modes if m != "ar"]
    lookaheads = parse_list(args.lookahead, "--lookahead")
    budgets = parse_list(args.tree_nodes, "--tree-nodes", allow_auto=True)
    if args.num_prompts < 1 or args.batch_size < 1 or args.rounds < 1:
        raise MinipassError("--num-prompts, --batch-size and --rounds must be >= 1")
    widths = parse_list(args.curve_widths, "--curve-widths")
    if min(widths) < 1:
        raise MinipassError(f"--curve-widths must be >= 1, got {args.curve_widths!r}")
    widths = sorted(set(widths) | {1})
    settings = [SamplingParams(), SamplingParams(*PAPER_SAMPLING)] if args.temperature is None else \
        [SamplingParams(args.temperature, args.top_k, args.top_p)]

    model, tok, ckpt = load_checkpoint(args.ckpt, args.dtype, args.device, args.kernels,
                                   check_weights=args.check_weights)
    device = model.embed_tokens.weight.device
    compile_ = args.compile
    datasets = [load_prompts(d.strip(), tok, args.num_prompts) for d in args.dataset.split(",") if d.strip()]
    lookahead = {L: lookahead_for(model, args.lookahead_file, L, default_model=args.ckpt is None)
                 for L in lookaheads} if any(m in LOOKAHEAD_MODES for m in modes) else {}
    store, store_source = datastore_for(model, args.datastore, args.ckpt is None) if "tree" in modes else (None, "none")
    for L, (_, source) in lookahead.items():
        if source.startswith("untrained"):
            print(f"bench: no --lookahead-file; using untrained (mean-embedding) look-ahead tokens, which draft "
                  "poorly", file=sys.stderr)
            break

    # The ceiling: how fast could a step be if it only read the weights once at the measured bandwidth?
    print("bench: measuring the memory bandwidth and the forward cost curve ...", file=sys.stderr)
    # The memory's rate, and the same with a buffer of the weights' size read over and over, in alternation.
    nbytes = weight_bytes(model)
    bandwidth, resident = ceiling_bandwidths(device, nbytes)
    llc = last_level_cache(device)
    gb = nbytes / 1e9
    bound = bandwidth / gb * args.batch_size  # tokens/s if a step cost exactly one read of the weights
    resident_bound = resident / gb * args.batch_size
    context = int(statistics.median(len(p) for _, ps in datasets for p in ps)) + args.max_new_tokens // 2
    # Every decode below gets one cache length, and the curve is measured at it: the attention of a compiled call
    # spans the whole cache, and at the curve's context alone a wide call's attention would look cheaper than in
    # the decodes.
    longest = max(len(p) for _, ps in datasets for p in ps)
    cache_len = longest + args.max_new_tokens + max(widths)
    cache_len = curve_cache = min(model.args.max_seq_len, cache_len + (-cache_len) % CACHE_ROUNDING)
    t_curve = time.perf_counter()
    curve = cost_curve(model, widths, args.batch_size, context, compile_, curve_cache)
    curve_s = time.perf_counter() - t_curve
    if default_group() is not None:  # under torchrun every rank sizes its trees from rank 0's curve: the ranks of
        box = [curve]  # one model must make calls of the same widths
        torch.distributed.broadcast_object_list(box, src=0, group=default_group())
        curve = box[0]
    used = envelope(curve)  # what the sizing and the model_cost column read
    t_of = interpolate(used)
    cost_of = lambda T: t_of(T) / used[1]  # noqa: E731

    # Configurations: every (dataset, setting) group has its ar baseline first. Decoders are made once the widest
    # call is known: every run then uses one cache length, so a compiled step is compiled once per configuration.
    groups, specs, sizing_report = [], [], []
    base_nodes = TreeConfig().nodes  # the base budget; --tree-nodes auto or a fixed budget replaces it per tree
    for name, prompts in datasets:
        for sampling in settings:
            group = [Config(name, sampling, "ar", 0, None)]
            specs.append(("ar", decoder_options(args, lookaheads[0], base_nodes, store), None))
            for m in modes[1:]:
                for L in (lookaheads if m in LOOKAHEAD_MODES else [0]):
                    opts = decoder_options(args, L or lookaheads[0], base_nodes, store)
                    la = lookahead[L][0] if m in LOOKAHEAD_MODES else None
                    if m == "ngram":
                        cfg = Config(name, sampling, m, 0, None, width=1 + opts.ngram.nodes,
                                     sizes={"nodes": opts.ngram.nodes})
                    elif m == "pass":
                        cfg = Config(name, sampling, m, L, None, width=L + 1)
                    elif m == "pass1":
                        n_points = L + 1 if not opts.pass1_blocks else min(opts.pass1_blocks, L + 1)
                        cfg = Config(name, sampling, m, L, None, width=L + 1 + n_points * L,
                                     sizes={"blocks": n_points})
                    if m != "tree":
                        group.append(cfg)
                        specs.append((m, opts, la))
                        continue
                    for nodes in budgets:
                        label = "tree" if nodes is None or len(budgets) == 1 else f"tree@{nodes}"
                        if nodes is None:
                            plan = sizing.size_tree(model, la, sampling, name, tok, t_of, base_tree=opts.tree,
                                                    num_prompts=args.calibration_prompts,
                                                    max_new_tokens=args.max_new_tokens, quiet=False,
                                                    widths=sorted(used), datastore=store)
                            tree, Lt = plan.tree, plan.lookahead  # the first Lt look-ahead tokens
                            sizing_report.append({"dataset": name, "setting": sampling_label(sampling), "L": L,
                                                  **plan.report})
                        else:
                            tree, Lt = replace(opts.tree, nodes=nodes), L
                        M = tree.blocks
                        group.append(Config(name, sampling, m, Lt, None, label=label, width=1 + tree.nodes + M * Lt,
                                            sizes={"nodes": tree.nodes, "blocks": M,
                                                   "calibrated": tree.calibrated is not None}))
                        specs.append((m, replace(opts, tree=tree), la[..., :Lt, :].contiguous()))
            if args.peer:
                try:
                    from minipass.hf import import_transformers

                    import_transformers()
                except ImportError:
                    print("bench: --peer hf skipped: transformers is not installed", file=sys.stderr)
                else:
                    dtype = model.embed_tokens.weight.dtype
                    for label, lookup in (("hf", False), ("hf-lookup", True)):
                        group.append(Config(name, sampling, label, 0, hf_decoder(ckpt, dtype, device, lookup)))
                        specs.append(None)
            groups.append((prompts, group))
    cache_len = max(cache_len, longest + args.max_new_tokens + max(cfg.width for _, g in groups for cfg in g))
    configs = [cfg for _, g in groups for cfg in g]
    for cfg, spec in zip(configs, specs):
        if spec is not None:
            mode, opts, la = spec
            cfg.decode = make_decoder(mode, replace(opts, cache_len=cache_len), la)

    # Warm-up: each configuration decodes the longest prompt (its largest prefill) through every part of its step;
    # a compiled step compiles here. The weights have been read by the cost curve already.
    n_configs = sum(len(g) for _, g in groups)
    progress = Progress(n_configs * (1 + args.rounds))
    for prompts, group in groups:
        longest = max(prompts, key=len)
        for cfg in group:
            t0 = time.perf_counter()
            cfg.decode(model, [longest] * min(args.batch_size, len(prompts)), min(16, args.max_new_tokens),
                       cfg.sampling, seeds=list(range(min(args.batch_size, len(prompts)))), stop_ids=tok.eos_ids)
            if cfg is group[0] and compile_ and device.type == "cpu":
                # A compiled CPU prefill compiles once per width bucket (decoding.start), shared by every
                # configuration (one cache length): each bucket the prompts fall in is compiled here, not in a round.
                buckets = {}
                for i in range(0, len(prompts), args.batch_size):  # the batches run_config makes
                    batch = prompts[i:i + args.batch_size]
                    buckets.setdefault((len(batch), prefill_width(max(map(len, batch)) - 1)), batch)
                for batch in buckets.values():
                    cfg.decode(model, batch, 1, cfg.sampling, stop_ids=tok.eos_ids)
            cfg.warmup_s = time.perf_counter() - t0
            progress.step(f"warm-up {cfg.dataset} {cfg.label or cfg.mode} L={cfg.L} T={cfg.sampling.temperature:g}")
    # The rounds. On a CPU with no --threads, each round runs on the cores other processes leave free; a round during
    # which other processes took cores it was using is run again (at most --rounds times in all), so the paired
    # ratios of a round always compare runs made under the same conditions.
    meter = CpuMeter()
    # Not under torchrun: every rank must run the same rounds, and each one would count the others as load.
    adapt = args.threads is None and device.type == "cpu" and meter.cpus is not None and default_group() is None
    base_threads, cores = torch.get_num_threads(), len(meter.cpus or ())
    round_log, repeats, r = [], 0, 0
    while r < args.rounds:
        threads = round_threads(base_threads, cores, meter.idle_others()) if adapt else torch.get_num_threads()
        torch.set_num_threads(threads)
        disturbed, rerun = False, False
        for prompts, group in groups:
            order = group[r % len(group):] + group[: r % len(group)]
            for cfg in order:
                if rerun:
                    break  # this round runs again: no need to finish it
                before = meter.sample()
                outputs, stats = run_config(cfg, model, prompts, args, tok.eos_ids)
                others = meter.others(before, meter.sample())
                cfg.others.append(others)
                cfg.rounds.append((stats.wall_s, stats, outputs))
                disturbed |= adapt and others is not None and threads + others > cores + BUSY_CORES
                rerun = disturbed and repeats < args.rounds
                progress.step(f"round {r + 1} {cfg.dataset} {cfg.label or cfg.mode} L={cfg.L} "
                              f"T={cfg.sampling.temperature:g} {threads}t")
        round_log.append({"round": r + 1, "threads": threads, "disturbed": disturbed})
        if rerun:
            repeats += 1
            progress.total += n_configs
            for cfg in configs:  # forget the round: it runs again on the cores now free
                del cfg.rounds[r:], cfg.others[r:]
            continue
        r += 1
    torch.set_num_threads(base_threads)
    progress.close()
    load_end = load_average()
    profiles = []
    if args.profile:  # after the timed rounds, which the profiler would slow
        for prompts, group in groups:
            cfgs = [cfg for cfg in group if not cfg.mode.startswith("hf")]
            profiles.append({"dataset": cfgs[0].dataset, "setting": sampling_label(cfgs[0].sampling),
                             "ops_us_per_call": profile_decodes(cfgs, model, prompts[0], args, tok.eos_ids)})

    runs = []
    for prompts, group in groups:
        ar = group[0]
        for cfg in group:
            runs.append(summarize(cfg, ar, gb, bound, cost_of, args.batch_size, len(prompts)))
        ar_ms = runs[-len(group)]["time_per_call_ms"]
        for rec in runs[-len(group):]:
            rec["_ar_ms"] = ar_ms

    print(f"model: {ckpt}  device: {device_name(device)}  dtype: {model.embed_tokens.weight.dtype}  "
          f"weights: {gb:.3f} GB  prompts: {args.num_prompts} x {args.max_new_tokens} new tokens, "
          f"batch {args.batch_size}, {args.rounds} rounds, step {'compiled' if compile_ else 'eager'}")
    if "tree" in modes:
        print(f"tree drafts: look-ahead, context n-grams, datastore {store_source}"
              + (f" ({len(store)} tokens)" if store is not None else ""))
    print_table(runs)
    print()
    print(LEGEND)
    print()
    ar_runs = [r for r in runs if r["mode"] == "ar"]
    print(f"ceiling: memory read bandwidth {bandwidth:.1f} GB/s (best of 5 sums of 1 GB) / {gb:.3f} GB of weights = "
          f"{bound:.1f} tokens/s if a step only read the weights once; ar reaches "
          + ", ".join(f"{r['tokens_per_s']:.1f} ({100 * r['share_of_bound']:.0f}%)" for r in ar_runs))
    print(f"         a buffer of the weights' size read over and over, as a decode's steps read them: {resident:.1f} "
          f"GB/s, {resident_bound:.1f} tokens/s; ar reaches "
          + ", ".join(f"{100 * r['tokens_per_s'] / resident_bound:.0f}%" for r in ar_runs)
          + resident_note(bandwidth, resident, nbytes, llc))
    print("prefill: the prompts' forward, the same work in every mode and inside every tok/s, took "
          + ", ".join(f"{100 * r['prefill_share']:.0f}%" for r in ar_runs) + " of ar's wall time (the column ideal "
          "prices every other call at ar's)")
    print(f"cost curve (one forward of T new tokens per row at {context} cached tokens in a {curve_cache}-slot cache, "
          f"{'compiled' if compile_ else 'eager'}, {CURVE_ROUNDS} interleaved rounds of blocks of calls, median ratio "
          "to T=1): " +
          "  ".join(f"T={T}: {1e3 * t:.1f} ms ({t / curve[1]:.2f}x)" for T, t in curve.items()))
    if used != curve:
        print("  read as non-decreasing in T (a narrower call can run as a wider one): " +
              "  ".join(f"T={T}: {1e3 * used[T]:.1f} ms" for T in curve if used[T] != curve[T]))
    warm = sum(cfg.warmup_s for _, g in groups for cfg in g)
    print(f"set-up time (not in the figures above): cost curve {curve_s:.0f} s, warm-up and compilation of the "
          f"steps {warm:.0f} s")
    for s in sizing_report:
        print(f"sized tree ({s['dataset']}, {s['setting']}, L={s['L']}): {s['summary']}")
    for prof in profiles:
        print(f"profile ({prof['dataset']}, {prof['setting']}, {PROFILE_ROUNDS} decodes of the first prompt per "
              "mode in alternation, prefill included, self time per decoding call, under the profiler):")
        print(profile_table(prof["ops_us_per_call"], args.profile))
    unstable = [r for r in runs if (r["spread"] or 0) > UNSTABLE_SPREAD]
    for r in unstable:
        print(f"warning: {r['dataset']} {setting_label(r)} {r['mode']} L={r['lookahead']}: tokens/s varied by "
              f"{100 * r['spread']:.0f}% over the rounds {r['tokens_per_s_rounds']}: the machine was not quiet "
              "(the paired speed-ups are the figures to trust)", file=sys.stderr)
    lowered = [x["round"] for x in round_log if x["threads"] < base_threads]
    if repeats or lowered:
        print(f"warning: other processes kept cores busy: {repeats} round(s) were run again after being disturbed, "
              f"and rounds {lowered} ran on fewer than {base_threads} threads (round_log in the JSON)",
              file=sys.stderr)
    busy = [x for r in runs for x in r["other_load_rounds"] if x is not None and x > BUSY_CORES]
    if busy and default_group() is None:  # under torchrun the other ranks are the load
        print(f"warning: other processes took up to {max(busy):.1f} cores' worth of CPU during {len(busy)} of the "
              f"{sum(len(r['other_load_rounds']) for r in runs)} timed runs (other_load_rounds in the JSON): the "
              "machine was shared while it was measured", file=sys.stderr)
    for r in runs:
        r.pop("_ar_ms", None)
    if args.json and rank() == 0:
        doc = {"model": str(ckpt), "device": device_name(device), "dtype": str(model.embed_tokens.weight.dtype),
               "compiled": bool(compile_), "rounds": args.rounds, "datastore": store_source, "load_average_start": load_start,
               "load_average_end": load_end, "bandwidth_gb_per_s": round(bandwidth, 2), "weights_gb": round(gb, 4),
               "bound_tokens_per_s": round(bound, 2), "resident_gb_per_s": round(resident, 4),
               "resident_bound_tokens_per_s": round(resident_bound, 2), "last_level_cache_bytes": llc,
               "cost_curve": {str(T): {"ms": round(1e3 * t, 3), "vs_t1": round(t / curve[1], 4),
                                      "used_ms": round(1e3 * used[T], 3)} for T, t in curve.items()},
               "cost_curve_context": context, "cost_curve_cache_len": curve_cache, "cost_curve_s": round(curve_s, 1),
               "sizing": sizing_report, "unstable": [r["mode"] for r in unstable], "round_log": round_log,
               "profile": profiles, "runs": runs}
        tmp = Path(args.json).with_name(Path(args.json).name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        tmp.replace(args.json)
    if args.plot and rank() == 0:
        plot(runs, args.plot)


def main(argv=None) -> int:
    args = parse_args(argv)
    init_from_env()  # under torchrun: tensor parallel over the processes, rank 0 prints and writes files
    # --profile: each kernel of a compiled CPU step one profiler event, for the steps this run compiles
    events = torch._inductor.config.patch({"cpp.enable_kernel_profile": True}) if args.profile > 0 \
        else contextlib.nullcontext()
    with events:
        return finish(run_cli(lambda: bench(args)))  # under torchrun: the ranks leave together


if __name__ == "__main__":
    sys.exit(main())
