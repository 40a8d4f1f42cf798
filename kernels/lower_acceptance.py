"""Lower the acceptance kernels to sm_80 and sm_90 cubins without a GPU, and report registers and spills.

    python -m minipass.kernels.lower_acceptance                 # every configuration below, bf16/fp16/fp32, both targets
    python -m minipass.kernels.lower_acceptance --dtype bf16

The configurations are those the launchers pick (launch_params) for a 32000-token vocabulary and for a small one,
K = 6 drafts per row (padded and flattened), a full chunk of 31 drafts, and trees of 32 and 64 nodes, with every
combination of the logits kernel's transform flags that changes its code. Needs Triton's NVIDIA backend (the
bundled ptxas), not a GPU; run it without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import acceptance, tree_acceptance

_FLOAT_ARGS = {"p_ptr", "q_ptr", "t_ptr"}           # the distributions, in the dtype under test
_FP32_ARGS = {"ua_ptr", "us_ptr"}
_FP32_SCALARS = {"c", "top_k", "top_p"}


def configurations():
    """(label, kernel, constexprs, num_warps, maxnreg) for each variant the launchers compile."""
    out = []
    for V in (32000, 1000):
        for K, T, ragged in ((6, 0, False), (0, 384, True), (31, 0, False)):
            if V == 1000 and K == 31:
                continue
            block_k, block_v, warps = acceptance.launch_params(K, T, V)
            form = "flat" if ragged else f"K={K}"
            for has_q in (True, False):
                out.append((f"accept V={V} {form} q={has_q}", acceptance._accept_kernel,
                            dict(HAS_Q=has_q, RAGGED=ragged, BLOCK_K=block_k, BLOCK_V=block_v), warps,
                            acceptance.MAX_REGISTERS))
            if K == 31:
                continue
            for has_q, greedy, top_k, top_p in ((True, False, True, True), (True, False, False, False),
                                                (False, False, True, False), (False, False, False, True),
                                                (True, True, False, False), (False, True, False, False)):
                flags = dict(HAS_Q=has_q, GREEDY=greedy, USE_TOP_K=top_k, USE_TOP_P=top_p, RAGGED=ragged,
                             BLOCK_K=block_k, BLOCK_V=block_v)
                label = f"logits V={V} {form} q={has_q} greedy={greedy} top_k={top_k} top_p={top_p}"
                out.append((label, acceptance._accept_logits_kernel, flags, warps, acceptance.MAX_REGISTERS))
        for N in (31, 63):
            block_n, block_v, warps = tree_acceptance.launch_params(N, V)
            out.append((f"tree V={V} N={N}", tree_acceptance._accept_tree_kernel,
                        dict(BLOCK_N=block_n, BLOCK_V=block_v), warps, tree_acceptance.MAX_REGISTERS))
    return out


def _signature(kernel, constexprs, dtype):
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in _FLOAT_ARGS:
            types[name] = "*" + dtype
        elif name in _FP32_ARGS:
            types[name] = "*fp32"
        elif name.endswith("_ptr"):
            types[name] = "*i64"
        else:
            types[name] = "fp32" if name in _FP32_SCALARS else "i32"
    return types


def lower(kernel, constexprs, num_warps, maxnreg, dtype, capability):
    """(registers, spill store bytes, spill load bytes) of the kernel's cubin, from the log of Triton's own ptxas run
    (so with the flags Triton uses); compiled afresh, since a cached cubin comes without its log."""
    src = ASTSource(kernel, _signature(kernel, constexprs, dtype), constexprs=constexprs)
    log = io.StringIO()
    with triton.knobs.compilation.scope(), triton.knobs.nvidia.scope(), contextlib.redirect_stdout(log):
        triton.knobs.compilation.always_compile = True
        triton.knobs.nvidia.dump_ptxas_log = True
        compiled = triton.compile(src, target=GPUTarget("cuda", capability, 32),
                                  options=dict(num_warps=num_warps, maxnreg=maxnreg))
    assert compiled.asm["cubin"]
    log = log.getvalue()
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    stores, loads = map(int, re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log).groups())
    return registers, stores, loads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], action="append",
                    help="dtype of the distributions (repeatable; default all three)")
    args = ap.parse_args()
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise SystemExit("minipass.kernels.lower_acceptance needs the compiled kernels: unset TRITON_INTERPRET.")
    print(f"{'configuration':70s} {'dtype':5s} {'warps':>5s}  {'sm_80 regs/spill B':>18s}  {'sm_90 regs/spill B':>18s}")
    for label, kernel, constexprs, warps, maxnreg in configurations():
        for dtype in args.dtype or ["bf16", "fp16", "fp32"]:
            cells = []
            for capability in (80, 90):
                registers, stores, loads = lower(kernel, constexprs, warps, maxnreg, dtype, capability)
                cells.append(f"{registers:>8d} / {stores + loads:<7d}")
            print(f"{label:70s} {dtype:5s} {warps:5d}  {cells[0]:>18s}  {cells[1]:>18s}")


if __name__ == "__main__":
    main()
