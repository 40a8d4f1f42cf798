"""Lower the attention kernels to sm_80 / sm_90 cubins without a GPU and report ptxas's registers and spills.

    python -m tests.lower_attention                # the full grid of the launcher's choices, both targets
    python -m tests.lower_attention --grid small   # a few shapes

Used by tests/test_attention_lowering.py (in a subprocess: under TRITON_INTERPRET the kernels cannot be compiled).
The grid is planned with meta tensors through `attention_plan`, so what is lowered is exactly what the launcher
would launch (same constexprs, launch options and Triton specialisation of the int arguments); configurations that
give the same compile key are lowered once. Prints one line per variant and, last, one JSON line with all results.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def grid(kind="full", page_sizes=(16,)):
    """(dtype name, D, T, G, masked, num_splits, layout, page_size) of the launcher calls to lower.

    Cache forms: contiguous head-major (the model's cache) and token-major, and paged NHD and HND for each page size
    (each page size is a variant of its own; the layouts differ in strides only)."""
    if kind == "small":
        return [("fp16", 128, 25, 3, True, 1, "HND", None), ("bf16", 128, 25, 4, True, 4, "NHD", 16),
                ("bf16", 64, 512, 8, False, 1, "HND", None), ("fp16", 128, 100, 1, True, 2, "HND", 16)]
    forms = [("HND", None), ("NHD", None)] + [(layout, p) for p in page_sizes for layout in ("NHD", "HND")]
    out = []
    for dt, D, T, G, masked, splits, (layout, page) in itertools.product(
            ["fp16", "bf16"], [64, 128], [1, 5, 13, 25, 64, 100, 512], [1, 3, 4, 8], [False, True], [1, 4], forms):
        out.append((dt, D, T, G, masked, splits, layout, page))
    return out


def plan_for(dt, D, T, G, masked, splits, layout, page, B=2, Hkv=2, S=4096):
    from minipass.kernels.attention import attention_plan

    dtype = DTYPES[dt]
    meta = dict(device="meta", dtype=dtype)
    q = torch.empty(B, T, Hkv * G, D, **meta).transpose(1, 2)
    if page is None:
        shape = (B, Hkv, S, D) if layout == "HND" else (B, S, Hkv, D)
        table = None
    else:
        pages = B * S // page
        shape = (pages, Hkv, page, D) if layout == "HND" else (pages, page, Hkv, D)
        table = torch.empty(B, S // page, device="meta", dtype=torch.int32)
    k = torch.empty(shape, **meta)
    lens = torch.empty(B, device="meta", dtype=torch.int32)
    mask = torch.empty(B, T, T, device="meta", dtype=torch.bool) if masked else None
    plan = attention_plan(q, k, k, lens, mask, splits, block_table=table, layout=layout)
    return plan, (q, k, lens, mask, table)


def _mock_args(plan, tensors):
    from triton.runtime.jit import MockTensor

    q, k, lens, mask, table = tensors
    mock = lambda dtype: MockTensor(dtype)  # noqa: E731 - alignment 16, like a fresh torch allocation
    return plan.fwd_args(mock(q.dtype), mock(k.dtype), mock(k.dtype), mock(lens.dtype),
                         None if mask is None else mock(torch.uint8), None if table is None else mock(table.dtype),
                         mock(q.dtype), mock(torch.float32), mock(torch.float32), 0.125)


def lower(kernel, args, kwargs, capability):
    """Compile `kernel` as `kernel[grid](*args, **kwargs)` would for an sm_<capability> GPU; return ptxas's figures."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args, specialization, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=target, options=options.__dict__)
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"no ptxas report for {kernel.__name__} (is the Triton cache disabled?):\n{text}")
    return dict(regs=int(regs.group(1)), spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)),
                shared=compiled.metadata.shared)


def _lower_variant(job):
    name, capability, config = job
    from minipass.kernels import attention as A

    plan, tensors = plan_for(*config)
    if name == "fwd":
        kernel, args = A._attn_fwd_kernel, _mock_args(plan, tensors)
        kwargs = dict(**plan.constexprs, **plan.options)
    else:
        from triton.runtime.jit import MockTensor

        kernel = A._attn_combine_kernel
        args = (MockTensor(torch.float32), MockTensor(torch.float32), MockTensor(tensors[0].dtype), *plan.combine_args)
        kwargs = dict(**plan.combine_constexprs, **plan.combine_options)
    return name, capability, config, lower(kernel, args, kwargs, capability)


def variants(configs):
    """Unique (kernel name, config) by compile key: the first config of each key stands for the others."""
    seen, jobs = {}, []
    for config in configs:
        plan, tensors = plan_for(*config)
        fwd_key = ("fwd", config[0], plan.specialization())
        if fwd_key not in seen:
            seen[fwd_key] = config
            jobs.append(("fwd", config))
        if plan.num_splits > 1:
            comb_key = ("combine", config[0], tuple(sorted(plan.combine_constexprs.items())))
            if comb_key not in seen:
                seen[comb_key] = config
                jobs.append(("combine", config))
    return jobs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=["small", "full"], default="full")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--pages", type=int, nargs="+", default=[16], help="page sizes of the paged forms")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1))
    args = parser.parse_args(argv)
    # A compile served from Triton's cache runs no ptxas and so reports nothing: use a fresh cache (before the import).
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="lower_attention_")
    jobs = [(name, cap, config) for (name, config), cap in itertools.product(variants(grid(args.grid, args.pages)), args.arch)]
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for name, cap, config, res in pool.map(_lower_variant, jobs):
            dt, D, T, G, masked, splits, layout, page = config
            form = f"{layout}{'' if page is None else f' paged {page}'}"
            print(f"sm_{cap} {name:<7} {dt} D={D:<3} T={T:<3} G={G} {'masked' if masked else 'causal'} "
                  f"splits={splits} {form:<14} regs={res['regs']:<3} spill={res['spill_stores']}/{res['spill_loads']}"
                  f" smem={res['shared']}", flush=True)
            results.append(dict(kernel=name, arch=cap, config=config, **res))
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
