"""The attention kernels lowered to sm_80 and sm_90 cubins (no GPU needed): what the launcher picks compiles, with no
register spills for 16-bit dtypes at D <= 128 and registers to spare.

The grid (tests/lower_attention.py): fp16/bf16, D in {64, 128}, T in {1, 5, 13, 25, 64, 100, 512}, G in {1, 3, 4, 8},
causal and masked, with and without split-K, contiguous HND and NHD caches and paged NHD and HND caches (16-token
pages), planned through `attention_plan` exactly as a launch would; configurations that share a compile key are
lowered once (60 kernels per target). Runs in a subprocess without TRITON_INTERPRET (under the interpreter the
kernels are not compilable objects); about a minute of CPU per target.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_REGISTERS = 240  # of 255: headroom for the next change (today's maximum is 217, the gathered-mask D = 128 tile)


@pytest.fixture(scope="module")
def lowered():
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.nvidia import compiler

    if not any(os.path.exists(os.path.join(os.path.dirname(compiler.__file__), "bin", name))
               for name in ("ptxas", "ptxas-blackwell")) and shutil.which("ptxas") is None:
        pytest.skip("no ptxas in the Triton NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when it is unset; 1 is its default
    result = subprocess.run([sys.executable, "-m", "tests.lower_attention", "--grid", "full"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _describe(r):
    dt, D, T, G, masked, splits, layout, page = r["config"]
    form = layout if page is None else f"{layout} paged {page}"
    return (f"sm_{r['arch']} {r['kernel']} {dt} D={D} T={T} G={G} {'masked' if masked else 'causal'} "
            f"splits={splits} {form}: {r['regs']} registers, {r['spill_stores']} B spill stores")


def test_every_configuration_lowers_for_both_targets(lowered):
    kinds = {(r["arch"], r["kernel"]) for r in lowered}
    assert kinds == {(80, "fwd"), (90, "fwd"), (80, "combine"), (90, "combine")}
    paged = {r["config"][7] is not None for r in lowered if r["kernel"] == "fwd"}
    assert paged == {True, False}


def test_no_spills_for_16_bit_dtypes(lowered):
    spilled = [_describe(r) for r in lowered if r["spill_stores"] or r["spill_loads"]]
    assert not spilled, "\n".join(spilled)


def test_register_headroom(lowered):
    tight = [_describe(r) for r in lowered if r["regs"] > MAX_REGISTERS]
    assert not tight, "\n".join(tight)
