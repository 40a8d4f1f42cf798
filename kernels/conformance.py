"""Conformance checks for ports of the kernels: hand in a callable with the documented signature, get pass/fail rows.

    python -m kernels.conformance             # the project's own kernels: a CUDA GPU, or TRITON_INTERPRET=1 on CPU

Each check_* function calls the port over a grid of cases (odd shapes, ragged counts, dtypes, invalid rows, both
input forms where a kernel has two) and compares every output with the torch reference in this package, exactly:
randomness enters as tensors, so a conforming kernel agrees token for token. (A port that sums in another order can
differ where a uniform falls within fp32 rounding of a sampling boundary, which the grid's random uniforms hit
rarely; the detail then names the one differing row.) Each returns a list of rows
dict(kernel=..., case=..., ok=bool, detail=str); format_table(rows) renders them. quick=True runs a smaller grid.
"""

from __future__ import annotations

import os
import sys

import torch

from kernels.acceptance import accept_from_logits_ref, accept_ref
from kernels.tree_acceptance import accept_tree_ref


def format_table(rows) -> str:
    """The rows as a fixed-width table: kernel, case, PASS/FAIL, detail."""
    width = max([len(r["case"]) for r in rows] + [4])
    kernel_width = max([len(r["kernel"]) for r in rows] + [6])
    lines = [f"{'kernel':{kernel_width}s}  {'case':{width}s}  result  detail"]
    for r in rows:
        lines.append(f"{r['kernel']:{kernel_width}s}  {r['case']:{width}s}  {'PASS' if r['ok'] else 'FAIL':6s}  "
                     f"{r['detail']}")
    return "\n".join(lines)


# ======================================================================================================================
# Acceptance kernels: accept, accept_from_logits (padded and flattened forms), accept_tree
# ======================================================================================================================
#   accept(p, draft_tokens, num_drafts, u_accept, u_sample, q)                      -> (tokens, num_accepted)
#   accept_from_logits(target_logits, draft_tokens, num_drafts, u_accept, u_sample, draft_logits,
#                      temperature, top_k, top_p)                                   -> (tokens, num_accepted)
#   accept_tree(p, tokens, parents, u_accept, u_sample)                             -> (out_tokens, path, num_accepted)
# with the shapes, forms and invalid-row contract of kernels/acceptance.py and kernels/tree_acceptance.py.


def _compare(got, expected):
    """'' if the outputs are equal, else a sentence naming the first difference."""
    if not isinstance(got, (tuple, list)) or len(got) != len(expected):
        return f"returned {type(got).__name__} of {len(got) if isinstance(got, (tuple, list)) else '?'} items, " \
               f"expected a tuple of {len(expected)} tensors"
    for i, (g, e) in enumerate(zip(got, expected)):
        if not isinstance(g, torch.Tensor):
            return f"output {i} is a {type(g).__name__}, expected a tensor"
        g = g.detach().cpu()
        if g.shape != e.shape:
            return f"output {i} has shape {tuple(g.shape)}, expected {tuple(e.shape)}"
        g, e = g.long(), e.cpu().long()
        if not torch.equal(g, e):
            row = int((g != e).reshape(len(g), -1).any(-1).nonzero()[0, 0]) if g.dim() else 0
            return f"output {i} differs first in row {row}: got {g[row].tolist()}, expected {e[row].tolist()}"
    return ""


def _run(kernel, case, fn, args, ref_args, ref):
    try:
        expected = ref(*ref_args)
        detail = _compare(fn(*args), expected)
    except Exception as e:  # a port's failure of any kind is a failed row, not a crash of the suite
        detail = f"raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return dict(kernel=kernel, case=case, ok=not detail, detail=detail or "equal to the reference")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _poison_rows(x, seed):
    """NaN, +inf and -inf in three rows of x (..., V), in place (no-op on smaller batches)."""
    flat = x.view(-1, x.shape[-1])
    for row, value in zip(range(0, flat.shape[0], 3), (float("nan"), float("inf"), float("-inf"))):
        flat[row, (seed + row) % flat.shape[1]] = value
    return x


def _chain(B, K, V, dtype, with_q, seed, logits=False, invalid=False, wild=False, no_mass=False):
    """Padded inputs: targets (probabilities or logits), drafts mostly the target's argmax (long accepted runs),
    ragged num_drafts (0 and K included), uniforms."""
    g = _gen(seed)
    x = torch.randn(B, K + 1, V, generator=g) * 3
    y = x[:, :K] + torch.randn(B, K, V, generator=g) * 0.5
    p, q = (x, y) if logits else (torch.softmax(x, -1), torch.softmax(y, -1))
    drafts = x[:, :K].argmax(-1)
    if wild:
        out = torch.tensor([-1, V, V + 7, 10**12, -(10**12)])
        pick = torch.rand(B, K, generator=g) < 0.3
        drafts = torch.where(pick, out[torch.randint(0, len(out), (B, K), generator=g)], drafts)
    n = torch.randint(0, K + 1, (B,), generator=g)
    if B > 1:
        n[0], n[-1] = 0, K
    if invalid:
        _poison_rows(p, seed)
        _poison_rows(q, seed + 1)
    if no_mass:
        p[::2] = float("-inf") if logits else 0.0
    u_a, u_s = torch.rand(B, K, generator=g) ** 2, torch.rand(B, generator=g)
    return p.to(dtype), q.to(dtype) if with_q else None, drafts, n, u_a, u_s


def _flatten(p, q, drafts, n, u_a):
    """The padded inputs in the flattened form (row b: n_b + 1 target rows, n_b drafts) and cu_num_drafts."""
    n = n.long().clamp(0, drafts.shape[1])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)])
    take = lambda x, extra: torch.cat([x[b, : int(n[b]) + extra] for b in range(len(n))])  # noqa: E731
    return take(p, 1), None if q is None else take(q, 0), take(drafts, 0), cu, take(u_a, 0)


def _chain_grid(quick, device, logits):
    """(case name, padded inputs, whether to also check the flattened form) for the chain kernels."""
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device.type == "cuda" else [])
    grid = [
        ("B=5 K=4 V=101 fp32, q", dict(B=5, K=4, V=101, dtype=torch.float32, with_q=True), True),
        ("B=3 K=3 V=37 fp32, deterministic drafts", dict(B=3, K=3, V=37, dtype=torch.float32, with_q=False), True),
        ("B=6 K=5 V=63 fp32, drafts out of range", dict(B=6, K=5, V=63, dtype=torch.float32, with_q=True,
                                                        wild=True), True),
        ("B=7 K=3 V=45 fp32, invalid rows (NaN, +inf, -inf)",
         dict(B=7, K=3, V=45, dtype=torch.float32, with_q=True, invalid=True), True),
        ("B=4 K=2 V=29 fp32, rows without mass", dict(B=4, K=2, V=29, dtype=torch.float32, with_q=False,
                                                      no_mass=True), False),
        ("B=3 K=0 V=50 fp32, no drafts", dict(B=3, K=0, V=50, dtype=torch.float32, with_q=True), True),
    ]
    for dtype in dtypes[1:]:
        name = {torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        grid.append((f"B=5 K=3 V=77 {name}, q, invalid rows", dict(B=5, K=3, V=77, dtype=dtype, with_q=True,
                                                                   invalid=True), True))
    if not quick:
        grid += [
            ("B=4 K=6 V=4099 fp32, two vocabulary blocks", dict(B=4, K=6, V=4099, dtype=torch.float32,
                                                                 with_q=True), True),
            ("B=3 K=40 V=31 fp32, rows longer than 32 drafts", dict(B=3, K=40, V=31, dtype=torch.float32,
                                                                   with_q=False), True),
            ("B=9 K=7 V=1000 fp16, drafts out of range, invalid rows",
             dict(B=9, K=7, V=1000, dtype=torch.float16, with_q=True, wild=True, invalid=True), True),
        ]
    return [(name, _chain(**kw, seed=i, logits=logits), flat) for i, (name, kw, flat) in enumerate(grid)]


def _on(device, tensors):
    return [None if t is None else t.to(device) for t in tensors]


def check_accept(fn, *, device=None, quick=False, flattened=True):
    """Rows of pass/fail for fn(p, draft_tokens, num_drafts, u_accept, u_sample, q) against accept_ref, in the
    padded form and (flattened=True) the flattened form, plus one case of strided inputs."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    rows = []
    for name, (p, q, drafts, n, u_a, u_s), flat in _chain_grid(quick, device, logits=False):
        args = (p, drafts, n, u_a, u_s, q)
        rows.append(_run("accept", f"padded {name}", fn, _on(device, args), args, accept_ref))
        if flat and flattened:
            p_f, q_f, d_f, cu, ua_f = _flatten(p, q, drafts, n, u_a)
            args = (p_f, d_f, cu, ua_f, u_s, q_f)
            rows.append(_run("accept", f"flattened {name}", fn, _on(device, args), args, accept_ref))
    p, q, drafts, n, u_a, u_s = _chain(8, 3, 300, torch.float32, True, seed=99)
    p = torch.cat([p, p], -1)[::2, :, 1:301]                          # batch and row strides that are not V's
    q = q.transpose(0, 1).contiguous().transpose(0, 1)[::2]
    args = (p, drafts[::2].t().contiguous().t(), n[::2].int(), u_a[::2], u_s[::2], q)
    rows.append(_run("accept", "padded B=4 K=3 V=300 fp32, strided inputs, int32 counts", fn, _on(device, args),
                     args, accept_ref))
    return rows


_TRANSFORMS = [(1.0, 0, 1.0), (0.0, 0, 1.0), (0.7, 5, 0.9), (1.3, 40, 0.5), (0.8, 1, 1.0)]


def check_accept_from_logits(fn, *, device=None, quick=False, flattened=True):
    """Rows of pass/fail for fn(target_logits, draft_tokens, num_drafts, u_accept, u_sample, draft_logits,
    temperature, top_k, top_p) against accept_from_logits_ref, over sampling transforms and both forms."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    transforms = _TRANSFORMS[:3] if quick else _TRANSFORMS
    rows = []
    for i, (name, (t, q, drafts, n, u_a, u_s), flat) in enumerate(_chain_grid(quick, device, logits=True)):
        t = (t.float() * 4).round().div(4).to(t.dtype)            # quarter steps: tied logits, at the top-k cut too
        for temperature, top_k, top_p in [transforms[i % len(transforms)]] if quick else transforms:
            options = (temperature, top_k, top_p)
            label = f"{name}, T={temperature} top_k={top_k} top_p={top_p}"
            args = (t, drafts, n, u_a, u_s, q, *options)
            rows.append(_run("accept_from_logits", f"padded {label}", fn, _on(device, args[:6]) + list(options),
                             args, accept_from_logits_ref))
            if flat and flattened:
                t_f, q_f, d_f, cu, ua_f = _flatten(t, q, drafts, n, u_a)
                args = (t_f, d_f, cu, ua_f, u_s, q_f, *options)
                rows.append(_run("accept_from_logits", f"flattened {label}", fn,
                                 _on(device, args[:6]) + list(options), args, accept_from_logits_ref))
    return rows


def _tree(B, N, V, dtype, seed, invalid=False, depth=3):
    """Random trees with padding, siblings, repeated and out-of-range candidate tokens, and peaked targets."""
    g = _gen(seed)
    p = torch.softmax(torch.randn(B, N + 1, V, generator=g) * 4, -1)
    parents = torch.full((B, N + 1), -1, dtype=torch.long)
    tokens = torch.zeros(B, N + 1, dtype=torch.long)
    roll = torch.rand(B, N + 1, 3, generator=g)
    for b in range(B):
        level = [0] * (N + 1)
        for i in range(1, N + 1):
            if roll[b, i, 0] < 0.15:
                continue                                               # padding
            open_nodes = [a for a in range(i) if (a == 0 or parents[b, a] >= 0) and level[a] < depth]
            a = open_nodes[int(roll[b, i, 1] * len(open_nodes))]
            parents[b, i], level[i] = a, level[a] + 1
            r = float(roll[b, i, 2])
            tokens[b, i] = V + 3 if r < 0.08 else int(p[b, a].argmax()) if r < 0.7 else int(r * 1000) % V
    if invalid:
        _poison_rows(p, seed)
    u_a, u_s = torch.rand(B, N + 1, generator=g) ** 2, torch.rand(B, generator=g)
    return p.to(dtype), tokens, parents, u_a, u_s


def check_accept_tree(fn, *, device=None, quick=False):
    """Rows of pass/fail for fn(p, tokens, parents, u_accept, u_sample) against accept_tree_ref."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    grid = [
        ("B=5 N=7 V=37 fp32", dict(B=5, N=7, V=37, dtype=torch.float32)),
        ("B=4 N=13 V=101 fp32, depth 6", dict(B=4, N=13, V=101, dtype=torch.float32, depth=6)),
        ("B=6 N=9 V=50 fp32, invalid rows (NaN, +inf, -inf)", dict(B=6, N=9, V=50, dtype=torch.float32,
                                                                   invalid=True)),
        ("B=3 N=0 V=20 fp32, root only", dict(B=3, N=0, V=20, dtype=torch.float32)),
        ("B=4 N=5 V=63 fp16, invalid rows", dict(B=4, N=5, V=63, dtype=torch.float16, invalid=True)),
    ]
    if device.type == "cuda":
        grid.append(("B=4 N=7 V=63 bf16", dict(B=4, N=7, V=63, dtype=torch.bfloat16)))
    if not quick:
        grid += [("B=4 N=30 V=4099 fp32, two vocabulary blocks", dict(B=4, N=30, V=4099, dtype=torch.float32)),
                 ("B=8 N=63 V=200 fp16, invalid rows", dict(B=8, N=63, V=200, dtype=torch.float16, invalid=True))]
    rows = []
    for i, (name, kw) in enumerate(grid):
        args = _tree(**kw, seed=i)
        rows.append(_run("accept_tree", name, fn, _on(device, args), args, accept_tree_ref))
    return rows


def acceptance_rows(quick=False):
    """The acceptance checks on the project's own kernels."""
    from kernels.acceptance import accept, accept_from_logits
    from kernels.tree_acceptance import accept_tree

    return (check_accept(accept, quick=quick) + check_accept_from_logits(accept_from_logits, quick=quick)
            + check_accept_tree(lambda *args: accept_tree(*args, check_values=False), quick=quick))


def main() -> None:
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
        sys.exit("kernels.conformance runs the Triton kernels: it needs a CUDA GPU, or TRITON_INTERPRET=1 to run "
                 "them on the CPU (slowly).")
    rows = acceptance_rows(quick="--quick" in sys.argv[1:])
    print(format_table(rows))
    failed = sum(not r["ok"] for r in rows)
    print(f"{len(rows) - failed} of {len(rows)} cases pass")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
