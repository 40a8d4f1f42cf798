"""GPU code generation without a GPU: the acceptance kernels lowered to sm_80 and sm_90 cubins (bf16 inputs) for
configurations the launchers pick, with ptxas reporting no register spills.

The interpreter runs code that the GPU compiler may reject, so this is the check that the kernels compile at all.
It runs in a subprocess because under TRITON_INTERPRET the kernels are not compilable objects. The full table (all
configurations and dtypes) is printed by `python -m minipass.kernels.lower_acceptance`."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

# The realistic vocabulary (BLOCK_V 4096, 8 warps) for every kernel and form, and the small-vocabulary variants
# that spilled before the register limit was stated.
SELECTED = [
    "accept V=32000 K=6 q=True",
    "accept V=32000 flat q=False",
    "logits V=32000 K=6 q=True greedy=False top_k=True top_p=True",
    "logits V=32000 flat q=True greedy=False top_k=False top_p=False",
    "logits V=32000 K=6 q=False greedy=True top_k=False top_p=False",
    "tree V=32000 N=63",
    "logits V=1000 flat q=True greedy=False top_k=True top_p=True",
    "tree V=1000 N=63",
]

_LOWER = textwrap.dedent("""
    import json, sys
    from minipass.kernels.lower_acceptance import configurations, lower
    selected = set(json.loads(sys.argv[1]))
    for label, kernel, constexprs, warps, maxnreg in configurations():
        if label in selected:
            for capability in (80, 90):
                print(json.dumps([label, capability, *lower(kernel, constexprs, warps, maxnreg, "bf16", capability)]))
""")


def test_kernels_lower_to_sm80_and_sm90_without_spills():
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _LOWER, json.dumps(SELECTED)], cwd=root, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("[")]
    assert sorted({(label, cc) for label, cc, *_ in rows}) == sorted((label, cc) for label in SELECTED
                                                                     for cc in (80, 90))
    spills = [(label, cc, stores, loads) for label, cc, registers, stores, loads in rows if stores or loads]
    assert not spills
    assert all(0 < registers <= 255 for _, _, registers, _, _ in rows)
