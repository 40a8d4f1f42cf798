"""bench.py end to end on a tiny checkpoint: every field of the JSON, greedy identity to AR, user errors."""

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

from tests.util import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"dataset", "mode", "lookahead", "temperature", "top_k", "top_p", "batch_size", "prompts", "new_tokens",
          "wall_s", "tokens_per_s", "calls", "tokens_per_call", "acceptance_by_position", "speedup_vs_ar",
          "identical_to_ar", "tokens_per_s_rounds", "speedup_rounds", "spread", "time_per_call_ms", "width",
          "warmup_s", "model_cost_vs_ar", "identical_rows", "other_load_rounds", "speedup_at_ar_call_cost",
          "prefill_share"}
TOP = {"model", "device", "dtype", "runs", "rounds", "load_average_start", "load_average_end", "bandwidth_gb_per_s",
       "weights_gb", "bound_tokens_per_s", "resident_gb_per_s", "resident_bound_tokens_per_s", "cost_curve", "sizing",
       "compiled", "round_log", "profile"}
PRODUCTS = {"minipass_cpu::linear_bf16", "aten::linear", "aten::addmm"}  # products with the weight second


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "bench.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ckpt = tiny_checkpoint(root / "ckpt")
    prompts = root / "prompts.jsonl"
    lines = [{"prompt": "abcabcabcab"}, {"prompt": "the cat sat on the mat, the cat"},
             {"messages": [{"role": "user", "content": "hi"}]}]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return ckpt, prompts


def test_json_has_every_field_and_greedy_matches_ar(bench, setup, tmp_path, capsys):
    ckpt, prompts = setup
    out = tmp_path / "out.json"
    argv = ["--ckpt", str(ckpt), "--dataset", str(prompts), "--num-prompts", "3", "--max-new-tokens", "8",
            "--batch-size", "2", "--lookahead", "1,3", "--modes", "ar,pass,pass1,ngram,tree", "--json", str(out),
            "--rounds", "2", "--no-compile", "--tree-nodes", "auto,16", "--calibration-prompts", "2"]
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    assert TOP <= set(doc), TOP - set(doc)
    assert doc["rounds"] == 2 and doc["bandwidth_gb_per_s"] > 0 and doc["bound_tokens_per_s"] > 0
    assert doc["resident_bound_tokens_per_s"] == pytest.approx(
        doc["bound_tokens_per_s"] * doc["resident_gb_per_s"] / doc["bandwidth_gb_per_s"], rel=0.02)
    curve = doc["cost_curve"]
    assert curve["1"]["vs_t1"] == 1.0 and all(c["ms"] > 0 for c in curve.values()) and len(curve) >= 5
    assert len(doc["load_average_start"]) == 3
    log = doc["round_log"]  # every round, the repeated ones included, with the threads it ran on
    assert len(log) >= 2 and all(x["threads"] >= 1 for x in log)
    runs = doc["runs"]
    for r in runs:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert len(r["tokens_per_s_rounds"]) == 2 and len(r["speedup_rounds"]) == 2
        assert len(r["other_load_rounds"]) == 2 and all(x is None or x >= 0 for x in r["other_load_rounds"])
        assert min(r["tokens_per_s_rounds"]) <= r["tokens_per_s"] <= max(r["tokens_per_s_rounds"])
        assert r["spread"] == pytest.approx((max(r["tokens_per_s_rounds"]) - min(r["tokens_per_s_rounds"]))
                                            / r["tokens_per_s"], abs=1e-3)
    # The auto-sized tree next to the fixed 16-node one; the sizing says what it chose, per data set and setting.
    assert {r["mode"] for r in runs} >= {"tree", "tree@16"}
    assert len(doc["sizing"]) == 4  # one data set: greedy and the paper's setting, L = 1 and 3
    for s in doc["sizing"]:
        # the tree may use the first lookahead <= L look-ahead tokens; every candidate is a width the curve measured
        assert 1 <= s["lookahead"] <= s["L"] and s["nodes"] >= 1 and s["candidates"]
        assert s["width"] == 1 + s["nodes"] + s["blocks"] * s["lookahead"]
        assert {c["width"] for c in s["candidates"]} <= {int(T) for T in curve}
        best = max(c["estimated_speedup"] for c in s["candidates"])
        assert s["estimated_speedup"] == best
    ar = [r for r in runs if r["mode"] == "ar"]
    assert all(r["share_of_bound"] > 0 for r in ar)
    # Greedy and the paper's sampling setting; pass and pass1 at both L, ar/ngram/tree once per L list entry.
    settings = {(r["temperature"], r["top_k"]) for r in runs}
    assert settings == {(0.0, 0), (0.8, 10)}
    modes = {(r["mode"], r["lookahead"]) for r in runs}
    assert {("ar", 0), ("pass", 1), ("pass", 3), ("pass1", 1), ("pass1", 3), ("ngram", 0)} <= modes
    assert {m for m, _ in modes} == {"ar", "pass", "pass1", "ngram", "tree", "tree@16"}
    for r in runs:
        assert r["prompts"] == 3 and r["new_tokens"] > 0 and r["calls"] > 0 and r["wall_s"] > 0
        assert r["tokens_per_call"] >= 1.0  # per row: a call emits at least one token in every live row
        if r["temperature"] == 0:
            assert r["identical_to_ar"] is True and r["identical_rows"] == 1.0, r
        else:
            assert r["identical_to_ar"] is None and r["identical_rows"] is None
        if r["mode"] == "ar":
            assert r["lookahead"] == 0 and r["speedup_vs_ar"] == 1.0 and r["tokens_per_call"] == 1.0
            assert r["speedup_at_ar_call_cost"] == pytest.approx(1.0, abs=1e-3)
        # (ideal_speedup's arithmetic is checked on fixed statistics below: here the rounds' times are whatever the
        # machine gave, and with batch 2 a call's tokens per row and per call part once a row is done)
        assert 0 < r["prefill_share"] < 1 and r["speedup_at_ar_call_cost"] > 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "ceiling: memory read bandwidth" in out and "cost curve" in out  # table and figures
    assert "read over and over" in out  # the ceiling with the weights read again and again
    assert "spread " in out and "call/ar " in out and "ideal " in out  # the legend


def test_ideal_speedup_prices_every_call_at_ars(bench):
    from minipass.decoding import DecodeStats

    # AR: 0.2 s of prefill, then 80 calls in 0.8 s (10 ms each); a mode with the same prefill and 40 calls for the
    # same 80 tokens would take 0.2 + 40 * 0.01 = 0.6 s at that cost: 1.0 / 0.6 of AR's rate, whatever it took.
    ar = DecodeStats(calls=80, row_calls=80, tokens=80, wall_s=1.0, prefill_s=0.2)
    tree = DecodeStats(calls=40, row_calls=40, tokens=80, wall_s=0.9, prefill_s=0.2)
    assert bench.ideal_speedup((0.9, tree, None), (1.0, ar, None)) == pytest.approx(1 / 0.6)
    assert bench.ideal_speedup((1.0, ar, None), (1.0, ar, None)) == pytest.approx(1.0)
    # without a prefill the bound is the tokens per call itself
    ar0 = DecodeStats(calls=80, row_calls=80, tokens=80, wall_s=0.8, prefill_s=0.0)
    tree0 = DecodeStats(calls=40, row_calls=40, tokens=80, wall_s=0.7, prefill_s=0.0)
    assert bench.ideal_speedup((0.7, tree0, None), (0.8, ar0, None)) == pytest.approx(2.0)


def test_the_sizing_reads_the_cost_curve_non_decreasing(bench):
    """A narrower width measured slower than a wider one (a disturbed measure) is read at the wider one's cost;
    the rest is left as measured, and the interpolation runs between the points read."""
    curve = {1: 10.0, 2: 12.0, 4: 11.0, 8: 16.0, 16: 14.0, 32: 20.0}
    used = bench.envelope(curve)
    assert used == {1: 10.0, 2: 11.0, 4: 11.0, 8: 14.0, 16: 14.0, 32: 20.0}
    assert all(used[a] <= used[b] for a, b in zip(sorted(used), sorted(used)[1:]))
    t = bench.interpolate(used)
    assert t(1) == 10.0 and t(12) == 14.0 and t(24) == pytest.approx(17.0)
    assert bench.envelope({1: 3.0, 4: 5.0}) == {1: 3.0, 4: 5.0}


def test_the_cost_curve_is_read_round_by_round(bench):
    """A slow period that lands on one width's calls in some rounds and on both widths in others: each width's own
    median reads T = 8 at 2.4x T = 1, the ratios within the rounds read the 1.2x every undisturbed round shows."""
    t1 = [10.0, 10.0, 10.0, 20.0, 20.0, 20.0, 10.0]
    t8 = [24.0, 24.0, 24.0, 24.0, 24.0, 24.0, 12.0]
    curve = bench.curve_from_rounds({1: t1, 8: t8})
    assert curve[1] == 10.0 and curve[8] == pytest.approx(12.0)
    assert bench.curve_from_rounds({2: [4.0, 8.0, 4.0], 4: [5.0, 10.0, 5.0]}) == {2: 4.0, 4: 5.0}  # no width 1


def test_the_cost_curve_times_each_width_after_calls_of_its_own(bench, setup, monkeypatch):
    """A decode calls one compiled step again and again, and each compiled width holds its own copy of the weights:
    each width is timed in a block of its own calls, never right after another width's, and every width comes in
    every round."""
    from minipass.loading import load_checkpoint

    ckpt, _ = setup
    model, _, _ = load_checkpoint(str(ckpt), "fp32", "cpu", "torch")
    widths, seen, timed = [1, 3, 4], [], []
    forward = type(model).forward

    def spy(self, *args, **kwargs):
        seen.append(kwargs["input_pos"].shape[1])
        return forward(self, *args, **kwargs)

    clock = time.perf_counter

    def perf_counter():  # calls made when a timer starts or stops
        timed.append(len(seen))
        return clock()

    monkeypatch.setattr(type(model), "forward", spy)
    monkeypatch.setattr(bench.time, "perf_counter", perf_counter)
    curve = bench.cost_curve(model, widths, batch=1, context=6, compile=False)
    assert sorted(curve) == widths
    warm, block = bench.CURVE_BLOCK
    calls = seen[1 + 2 * len(widths):]  # after the prefill and two warm-up calls per width
    n = warm + block
    assert len(calls) == bench.CURVE_ROUNDS * len(widths) * n
    blocks = [calls[i: i + n] for i in range(0, len(calls), n)]
    assert all(len(set(b)) == 1 for b in blocks)
    for r in range(bench.CURVE_ROUNDS):
        assert sorted(b[0] for b in blocks[r * len(widths): (r + 1) * len(widths)]) == widths
    # The timers start and stop around each timed call: every one comes right after a call of its own width.
    assert len(timed) == 2 * bench.CURVE_ROUNDS * len(widths) * block
    assert all(seen[k] == seen[k - 1] for k in timed[0::2])


def test_profile_lines_up_each_modes_operations(bench, setup, tmp_path, capsys):
    """--profile: profiled decodes of each configuration after the rounds, its operations' self time per decoding
    call, one column per mode, the same operation on the same row whatever the call's width."""
    ckpt, prompts = setup
    out = tmp_path / "out.json"
    argv = ["--ckpt", str(ckpt), "--dataset", str(prompts), "--num-prompts", "2", "--max-new-tokens", "6",
            "--modes", "ar,ngram", "--temperature", "0", "--rounds", "1", "--no-compile", "--curve-widths", "2",
            "--profile", "8", "--json", str(out)]
    assert bench.main(argv) == 0
    import torch._inductor.config

    assert not torch._inductor.config.cpp.enable_kernel_profile  # set for that run only
    doc = json.loads(out.read_text())
    assert len(doc["profile"]) == 1  # one data set, one setting
    prof = doc["profile"][0]
    assert prof["setting"] == "greedy"
    cols = prof["ops_us_per_call"]
    assert set(cols) == {"ar", "ngram"}
    assert all(cols[m] and all(v >= 0 for v in cols[m].values()) and sum(cols[m].values()) > 0 for m in cols)
    # the weight products, called at width 1 by ar and 9 by ngram, are one row each
    products = [op for op in cols["ar"] if op.split()[0] in PRODUCTS and "[[" in op]
    assert products and all(op in cols["ngram"] for op in products)
    text = capsys.readouterr().out
    assert "profile (prompts, greedy" in text and "all operations" in text
    table = text[text.index("self us per decoding call"):]
    assert len([line for line in table.splitlines()[1:] if line.strip()]) >= 8 + 1


def test_profile_decodes_alternates_and_averages(bench, monkeypatch):
    """Every configuration is profiled PROFILE_ROUNDS times, in alternation, and its figures are the average of its
    rounds' self times per decoding call."""
    import types

    import torch

    order, times = [], {"a": iter([100.0, 300.0]), "b": iter([40.0, 80.0])}  # us of one op, round by round

    class Profile:  # stands in for torch.profiler.profile: one event, the decode's next time
        def __init__(self, **kwargs):
            self.events = []

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def key_averages(self, group_by_input_shape=False):
            return self.events

    profiles = []

    def make_profile(**kwargs):
        profiles.append(Profile(**kwargs))
        return profiles[-1]

    def config(label, calls):
        def decode(model, prompts, n, sampling, seeds, stop_ids):
            order.append(label)
            profiles[-1].events.append(types.SimpleNamespace(key="graph_2_cpp_fused_add_3", input_shapes=[],
                                                             self_cpu_time_total=next(times[label])))
            return types.SimpleNamespace(stats=types.SimpleNamespace(calls=calls))
        return types.SimpleNamespace(label=label, mode=label, decode=decode, sampling=None)

    monkeypatch.setattr(torch.profiler, "profile", make_profile)
    args = types.SimpleNamespace(max_new_tokens=4, seed=0)
    out = bench.profile_decodes([config("a", 2), config("b", 4)], None, [1, 2], args, [])
    assert bench.PROFILE_ROUNDS == 2 and order == ["a", "b", "b", "a"]  # the second round starts from b
    # a: (100 / 2 + 300 / 2) / 2 = 100 us per call; b: (40 / 4 + 80 / 4) / 2 = 15
    assert out == {"a": {"cpp_fused_add": pytest.approx(100.0)}, "b": {"cpp_fused_add": pytest.approx(15.0)}}


def test_op_key_reads_alike_across_widths(bench):
    assert bench.op_key("graph_3_cpp_fused_add_mul_7", []) == bench.op_key("graph_11_cpp_fused_add_mul_13", []) \
        == "cpp_fused_add_mul"
    assert bench.op_key("## Call CompiledFxGraph f1a2b ##", []) == bench.op_key("## Call CompiledFxGraph x9 ##", [])
    one = bench.op_key("minipass_cpu::linear_bf16", [[1, 576], [96, 288, 32, 2], []])
    eight = bench.op_key("minipass_cpu::linear_bf16", [[8, 576], [96, 288, 32, 2], []])
    assert one == eight == "minipass_cpu::linear_bf16 [[96, 288, 32, 2]]"
    assert one != bench.op_key("minipass_cpu::linear_bf16", [[1, 576], [30, 288, 32, 2], []])


def test_curve_widths(bench, setup, tmp_path):
    """--curve-widths measures those widths and t(1), nothing else."""
    ckpt, prompts = setup
    out = tmp_path / "out.json"
    argv = ["--ckpt", str(ckpt), "--dataset", str(prompts), "--num-prompts", "1", "--max-new-tokens", "4",
            "--modes", "ar", "--temperature", "0", "--rounds", "1", "--no-compile", "--curve-widths", "4,2,4",
            "--json", str(out)]
    assert bench.main(argv) == 0
    curve = json.loads(out.read_text())["cost_curve"]
    assert sorted(curve, key=int) == ["1", "2", "4"] and curve["1"]["vs_t1"] == 1.0
    assert all(0 < c["used_ms"] <= c["ms"] for c in curve.values())


@pytest.mark.parametrize("extra, message", [
    (["--modes", "ar,fast"], "unknown mode 'fast' in --modes"),
    (["--lookahead", "2,x"], "--lookahead must be integers separated by commas"),
    (["--num-prompts", "0"], "--num-prompts, --batch-size and --rounds must be >= 1"),
    (["--tree-nodes", "many"], "--tree-nodes must be integers separated by commas (or auto)"),
    (["--curve-widths", "1,0"], "--curve-widths must be >= 1, got '1,0'"),
    (["--profile", "-1"], "--profile must be >= 0 (operations to print), got -1"),
    (["--curve-widths", "1,wide"], "--curve-widths must be integers separated by commas"),
])
def test_bad_options(bench, setup, capsys, extra, message):
    ckpt, prompts = setup
    assert bench.main(["--ckpt", str(ckpt), "--dataset", str(prompts), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err


@pytest.mark.skipif(not Path("/proc/stat").exists() or not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_cpu_meter_sees_another_process(bench):
    """The meter that flags a shared machine: a busy child process shows up as about one core, this process's own
    work does not."""
    import subprocess

    meter = bench.CpuMeter()
    a = meter.sample()
    end = time.perf_counter() + 0.8
    while time.perf_counter() < end:  # this process's own CPU time is not "other"
        pass
    own = meter.others(a, meter.sample())
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 4: pass"])
    try:
        time.sleep(0.5)
        busy = meter.idle_others(1.5)
    finally:
        child.kill()
        child.wait()
    assert busy > own + 0.5 and busy > 0.6, (own, busy)


def test_round_threads(bench):
    """A round uses torch's threads less the cores other processes keep busy, never fewer than one."""
    assert bench.round_threads(2, 2, 0.0) == 2
    assert bench.round_threads(2, 2, 0.2) == 2  # background noise is not a busy core
    assert bench.round_threads(2, 2, 1.0) == 1
    assert bench.round_threads(2, 2, 2.0) == 1
    assert bench.round_threads(8, 16, 3.4) == 8
    assert bench.round_threads(16, 16, 3.6) == 12
    assert bench.round_threads(4, 4, None) == 4  # no measurement: torch's choice


def test_the_last_level_cache_is_read_from_sysfs(bench, tmp_path):
    for name, level, kind, size in [("index0", 1, "Data", "48K"), ("index1", 1, "Instruction", "32K"),
                                    ("index2", 2, "Unified", "1024K"), ("index3", 3, "Unified", "32768K")]:
        d = tmp_path / name
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "type").write_text(f"{kind}\n")
        (d / "size").write_text(f"{size}\n")
    assert bench.last_level_cache(bench.torch.device("cpu"), tmp_path) == 32 << 20
    assert bench.last_level_cache(bench.torch.device("cpu"), tmp_path / "missing") is None


def test_the_ceiling_says_a_cache_holds_the_weights_only_when_it_can(bench):
    mib = 1 << 20
    assert "fit in the 300 MiB last-level cache" in bench.resident_note(32.0, 50.0, 269_000_000, 300 * mib)
    # larger than the cache: a faster "resident" read is the memory's rate moving, not a cache
    note = bench.resident_note(36.5, 60.8, 269_000_000, 32 * mib)
    assert "larger than the 32 MiB last-level cache" in note and "fit" not in note
    assert bench.resident_note(36.5, 37.0, 269_000_000, 32 * mib) == " of it"
    assert "may hold" in bench.resident_note(36.5, 60.8, 269_000_000, None)


def test_the_two_bandwidths_are_measured_in_alternation(bench, monkeypatch):
    order = []
    monkeypatch.setattr(bench, "read_bandwidth", lambda device, nbytes, sums, untimed=0: order.append(nbytes) or
                        float(nbytes))
    memory, resident = bench.ceiling_bandwidths(bench.torch.device("cpu"), 1000, rounds=3)
    assert order == [1 << 30, 1000] * 3 and (memory, resident) == (float(1 << 30), 1000.0)
