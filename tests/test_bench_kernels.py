"""kernels/bench_kernels.py: the host-overhead mode runs anywhere; the GPU benchmark refuses to run without CUDA."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest

from minipass.kernels import attention as A
from minipass.kernels import bench_kernels


def test_host_overhead_mode(capsys):
    fwd = A._attn_fwd_kernel
    assert bench_kernels.main(["--host-overhead"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("attention launcher host time")
    assert len(lines) == 5 and all(float(line.split()[-1]) > 0 for line in lines[1:])
    assert A._attn_fwd_kernel is fwd  # the stubs are removed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU refusal")
def test_gpu_benchmark_needs_cuda(capsys):
    assert bench_kernels.main(["--only", "attention"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_attention_benchmark_runs_on_small_shapes(capsys):
    """The GPU benchmark's code path (contiguous vs paged, SDPA, the reference) on tiny shapes, timed by a stub."""
    calls = []

    def timer(fn, reps=50):
        out = fn()
        calls.append(out)
        return 1.0

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bench_kernels.bench_attention(torch.float32, device, batches=(1, 2), heads=(4, 2, 16), cases=[(1, 40)],
                                  use_flex=False, timer=timer)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and lines[2].split()[:3] == ["1", "4", "40"] and lines[3].split()[:3] == ["2", "4", "40"]
    # B = 1: triton, paged, torch ref, sdpa; B = 2: triton, paged. Paged and contiguous agree exactly.
    assert len(calls) == 6
    assert torch.equal(calls[0], calls[1]) and torch.equal(calls[4], calls[5])
    torch.testing.assert_close(calls[0], calls[2], atol=1e-5, rtol=1e-5)
