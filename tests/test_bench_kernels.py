"""kernels/bench_kernels.py: the host-overhead mode runs anywhere; the GPU benchmark refuses to run without CUDA."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest

from kernels import attention as A
from kernels import bench_kernels


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
