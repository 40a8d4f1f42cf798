"""Decoding memory is estimated before the KV cache is allocated, and a run that cannot fit is refused with figures."""

import platform
import re
import subprocess
import sys

import pytest
import torch

import minipass.memory as memory
from minipass.decoding import ar_decode
from minipass.errors import MinipassError
from minipass.generate import main
from tests.util import tiny_checkpoint, tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_bytes_is_what_setup_caches_allocates(dtype):
    model = tiny_model("tiny-untied-mha", dtype=dtype)
    model.setup_caches(3, 40)
    a = model.args
    assert memory.kv_cache_bytes(a, 3, 40, dtype) == model.kv.numel() * model.kv.element_size() \
        == a.n_layers * 2 * 3 * a.n_kv_heads * 40 * a.head_dim * dtype.itemsize


def figures(message):
    return [int(n.replace(",", "")) for n in re.findall(r"([\d,]+) bytes", message)]


def test_huge_batch_is_refused_before_any_allocation(monkeypatch):
    model = tiny_model("tiny")
    monkeypatch.setattr(memory, "available_memory", lambda device: (50_000_000, "a test's limit"))
    a, B, S = model.args, 4096, 512
    kv = a.n_layers * 2 * B * a.n_kv_heads * S * a.head_dim * 4  # 268 MB in float32
    with pytest.raises(MinipassError) as e:
        model.setup_caches(B, S)
    message = str(e.value)
    needed, kv_figure, activations, available = figures(message)
    assert kv_figure == kv and needed == kv + activations and available == 50_000_000
    assert activations > B * S * a.dim * 4  # at least one float32 hidden state per prefilled token
    assert f"decode {B} row(s) of {S} cache slots" in message and "a test's limit" in message
    assert "--batch-size" in message and "--max-new-tokens" in message
    assert model.kv is None  # nothing was allocated
    model.setup_caches(2, S)  # what fits still runs
    assert model.kv.shape[2] == 2


@pytest.mark.parametrize("mode", ["ar", "pass", "pass1", "ngram", "tree"])
def test_every_decoder_is_covered(monkeypatch, mode):
    from functools import partial

    from minipass.lookahead import init_lookahead
    from minipass.pass_decoding import pass1_decode, pass_decode
    from minipass.tree_decoding import ngram_decode, tree_decode

    model = tiny_model("tiny")
    la = init_lookahead(model, 2)
    decode = {"ar": ar_decode, "pass": partial(pass_decode, lookahead=la), "pass1": partial(pass1_decode, lookahead=la),
              "ngram": ngram_decode, "tree": partial(tree_decode, lookahead=la)}[mode]
    monkeypatch.setattr(memory, "available_memory", lambda device: (1_000_000, "a test's limit"))
    with pytest.raises(MinipassError, match="not enough memory to decode 64 row"):
        decode(model, [[1, 2, 3]] * 64, 400)
    assert len(decode(model, [[1, 2, 3]], 4).tokens[0]) == 4


def test_estimate_grows_with_the_call_and_the_prefill():
    model = tiny_model("tiny")
    ar = memory.check_decode_memory(model, 2, 300, call_width=1, prefill_len=10)
    wide = memory.check_decode_memory(model, 2, 300, call_width=40, prefill_len=10)
    long_prompt = memory.check_decode_memory(model, 2, 300, call_width=1, prefill_len=250)
    kv = memory.kv_cache_bytes(model.args, 2, 300, torch.float32)
    assert kv < ar < wide and ar < long_prompt
    assert memory.check_decode_memory(model, 2, 300) >= long_prompt  # default: the longest prompt that fits


def test_available_memory_on_this_machine():
    available, where = memory.available_memory("cpu")
    total = next(int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal:"))
    assert 0 < available <= total and where


@pytest.mark.parametrize("version", [1, 2])
def test_cgroup_headroom(tmp_path, version):
    proc = tmp_path / "cgroup"
    group = tmp_path / "sys" / ("memory/job" if version == 1 else "job")
    group.mkdir(parents=True)
    gib = 1 << 30
    if version == 2:
        proc.write_text("0::/job\n")
        names, stat = ("memory.max", "memory.current"), "inactive_file"
    else:
        proc.write_text("5:cpu:/\n4:memory:/job\n")
        names, stat = ("memory.limit_in_bytes", "memory.usage_in_bytes"), "total_inactive_file"
    (group / names[0]).write_text(f"{8 * gib}\n")
    (group / names[1]).write_text(f"{5 * gib}\n")
    (group / "memory.stat").write_text(f"anon 123\n{stat} {gib}\n")
    assert memory.cgroup_headroom(proc, tmp_path / "sys") == 4 * gib  # 8 - 5 + 1 of reclaimable page cache
    (group / names[0]).write_text("max\n" if version == 2 else f"{(1 << 63) - 4096}\n")
    assert memory.cgroup_headroom(proc, tmp_path / "sys") is None


def test_cli_refuses_in_one_line(tmp_path, capsys, monkeypatch):
    path = tiny_checkpoint(tmp_path / "ckpt")
    monkeypatch.setattr(memory, "available_memory", lambda device: (100_000, "a test's limit"))
    code = main(["--ckpt", str(path), "--prompt", "hello", "--max-new-tokens", "400"])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: not enough memory") and err.count("\n") == 1, err


def test_real_entry_point_exits_2_without_traceback(tmp_path):
    path = tiny_checkpoint(tmp_path / "ckpt")
    # The entry point as `python -m minipass.generate` runs it, with the available memory pinned low.
    code = ("import runpy, sys, minipass.memory as m; m.available_memory = lambda d: (100_000, 'a test limit'); "
            f"sys.argv = ['generate', '--ckpt', {str(path)!r}, '--prompt', 'hi', '--prompt', 'yo']; "
            "runpy.run_module('minipass.generate', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.startswith("error: not enough memory to decode 2 row(s)")
    assert proc.stderr.count("\n") == 1 and proc.stdout == ""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_freed_heap_is_kept_on_glibc():
    """Both mallopt calls are accepted (glibc refuses an out-of-range value with 0, e.g. an mmap threshold over
    32 MB), and applying them again is harmless."""
    assert memory.keep_freed_heap()
    assert memory.keep_freed_heap()
    x = torch.ones(8 << 20, dtype=torch.uint8)  # allocations still work, from the heap
    assert int(x.sum()) == 8 << 20
