"""Conformance suite: check a port of minipass's kernels against the torch references, and print a pass/fail table.

    python -m minipass.kernels.conformance                      # every section on the project's own kernels, full grid
                                                       # (CUDA if available, else the Triton interpreter on CPU)
    python -m minipass.kernels.conformance --grid quick         # the small grid the project's tests use
    python -m minipass.kernels.conformance --only accept_tree   # one section (names below)

From your own code, with your copy of a kernel (same signature as the project's; see each check's docstring):

    from .conformance import check_accept, check_attention, print_table
    results = check_attention(my_attention, grid="full", device="cuda", forms=["HND", "NHD paged"])
    results += check_accept(my_accept, grid="full", device="cuda", flattened=False)  # a port of the padded form
    print_table(results)
    assert all(r.ok for r in results)

The sections, one per kernel, each a function ``check_<kernel>(fn, grid="quick", device=None, ...) -> list[Result]``:

    attention            fn(q, k_cache, v_cache, cache_seqlens, mask, sm_scale=None, *, block_table, layout)
                         in the four cache forms (``forms=`` selects); no NaN, max error within TOLERANCE
    reshape_and_cache    fn(key, value, k_cache, v_cache, slot_mapping, layout), in place; caches bit-identical
    accept               fn(p, draft_tokens, num_drafts, u_accept, u_sample, q), padded and flattened forms
                         (``flattened=False`` checks the padded form only); outputs equal
    accept_from_logits   fn(target_logits, draft_tokens, num_drafts, u_accept, u_sample, draft_logits, temperature,
                         top_k, top_p), both forms; outputs equal
    accept_tree          fn(p, tokens, parents, u_accept, u_sample); outputs equal

Each builds its own inputs, calls ``fn`` on `device` (default: CUDA if available, else CPU) and compares with the
reference in the kernel's file; a case that raises is a failure, with the exception in the table, and bf16 cases
are skipped on CPU. The grids: "quick" covers every axis in a few cases per section, "full" adds larger shapes and
more combinations. Sections are registered in ``SECTIONS`` (name -> function running the check on the project's own
kernel), which is what ``main`` runs; a new kernel family adds its ``check_*`` function and one ``SECTIONS`` entry.
``print_table`` is shared.

The acceptance kernels are compared exactly, every output element as int64: randomness enters as tensors, so a
conforming kernel agrees token for token. (A port that sums in another order can differ where a uniform falls within
fp32 rounding of a sampling boundary, which the grid's random uniforms hit rarely; the detail then names the one
differing row.)

The inputs are adversarial where a port typically goes wrong. Attention and the writer: ragged lengths including 0
and lengths that end inside a key block and a page, slots past each row's ``L_b + T`` and unused pages filled with
NaN (a port that reads them fails), odd head dims (padded tiles), grouped-query heads, per-row masks, page sizes that
do not divide the lengths, page ids in random order, -1 padding in the block table and the slot mapping, strided
key/value views. Acceptance: ragged draft counts (0 and K included), invalid rows (NaN, +inf and -inf: num_accepted
-1), draft tokens outside the vocabulary, rows without mass, no drafts, the flattened (cu_num_drafts) form, strided
inputs with int32 counts, logits on quarter steps (ties, at the top-k cut too) under several sampling transforms,
and in the full grid two vocabulary blocks and rows of more than 32 drafts; trees with padding nodes, siblings,
repeated and out-of-range candidate tokens, root-only trees and invalid rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import sys
from typing import Callable, Iterable, Optional

import torch

# ----------------------------------------------------------------------------------------------------------------------
# Shared: results and the table
# ----------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    section: str
    case: str
    status: str  # "pass", "FAIL" or "skip"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "FAIL"


def run_case(section: str, case: str, body: Callable[[], tuple]) -> Result:
    """Run one case: ``body()`` returns (ok, detail); an exception is a failure that names it."""
    try:
        ok, detail = body()
    except Exception as e:  # noqa: BLE001 - any error of the port under test is a failed case, not a crash
        return Result(section, case, "FAIL", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160])
    return Result(section, case, "pass" if ok else "FAIL", detail)


def print_table(results: Iterable[Result], file=None) -> None:
    """One line per case (section, case, status, detail), then a count per section."""
    file = sys.stdout if file is None else file
    results = list(results)
    if not results:
        print("no cases", file=file)
        return
    w_sec = max(len("section"), *(len(r.section) for r in results))
    w_case = max(len("case"), *(len(r.case) for r in results))
    print(f"{'section':<{w_sec}}  {'case':<{w_case}}  result  detail", file=file)
    for r in results:
        print(f"{r.section:<{w_sec}}  {r.case:<{w_case}}  {r.status:<6}  {r.detail}", file=file)
    for section in dict.fromkeys(r.section for r in results):
        rs = [r for r in results if r.section == section]
        counts = {s: sum(r.status == s for r in rs) for s in ("pass", "FAIL", "skip")}
        print(f"{section}: {counts['pass']} passed, {counts['FAIL']} failed, {counts['skip']} skipped", file=file)


def _default_device(device):
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype_supported(dtype, device) -> bool:
    # The Triton interpreter (CPU) runs numpy, which has no bf16.
    return not (dtype == torch.bfloat16 and device.type == "cpu")


# Max abs error allowed against the fp32 reference, for inputs ~ N(0, 1) (outputs are |x| < ~4).
TOLERANCE = {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}

# ----------------------------------------------------------------------------------------------------------------------
# Attention: cache forms and inputs
# ----------------------------------------------------------------------------------------------------------------------

# A cache form: (layout, page_size or None). The names are what `forms=` selects.
ATTENTION_FORMS = {"HND": ("HND", None), "NHD": ("NHD", None), "NHD paged": ("NHD", 16), "HND paged": ("HND", 16)}


def paginate(cache: torch.Tensor, lengths, T: int, page_size: int, layout: str = "NHD", seed: int = 0,
             spare_pages: int = 3):
    """A contiguous (B, Hkv, S, D) cache as a paged pool and its block table, as an engine would hold them.

    Each row's pages are taken in random order from a shuffled pool with `spare_pages` extra pages; pool pages no row
    uses are NaN, and so are the slots past ``L_b + T`` inside a row's last page; table entries past the pages a row
    uses are -1. S must be a multiple of page_size. Returns (pages, block_table int32): pages is
    (num_pages, page_size, Hkv, D) for "NHD", (num_pages, Hkv, page_size, D) for "HND".
    """
    B, H, S, D = cache.shape
    if S % page_size:
        raise ValueError(f"S={S} must be a multiple of page_size={page_size}.")
    P_max = S // page_size
    g = torch.Generator().manual_seed(seed)
    used = [math.ceil((L + T) / page_size) for L in lengths]
    num_pages = sum(used) + spare_pages
    order = torch.randperm(num_pages, generator=g).tolist()
    pool = torch.full((num_pages, page_size, H, D), float("nan"), dtype=cache.dtype, device=cache.device)
    table = torch.full((B, P_max), -1, dtype=torch.int32)
    by_page = cache.transpose(1, 2).reshape(B, P_max, page_size, H, D)  # (B, P_max, page_size, Hkv, D)
    nxt = 0
    for b, (L, n) in enumerate(zip(lengths, used)):
        for p in range(n):
            page = order[nxt]
            nxt += 1
            table[b, p] = page
            pool[page] = by_page[b, p]
            past = L + T - p * page_size  # slots of this page at or past L_b + T
            if past < page_size:
                pool[page, max(past, 0):] = float("nan")
    pages = pool if layout == "NHD" else pool.transpose(1, 2).contiguous()
    return pages, table.to(cache.device)


def attention_inputs(B, Hkv, G, T, D, lengths, mask_kind, dtype, device, S=None, seed=0):
    """q (B, Hq, T, D) as a (B, T, Hq, D) view, contiguous (B, Hkv, S, D) k/v with NaN past each row's L_b + T,
    int32 lengths, and a mask: "causal" (None), "shared" (T, T) or "per_row" (B, T, T), random with a true diagonal.
    S defaults to the longest L_b + T rounded up to a multiple of 64, plus 64."""
    if S is None:
        S = (max(lengths) + T + 63) // 64 * 64 + 64
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hkv * G, D, generator=g).to(device, dtype).transpose(1, 2)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    for b, L in enumerate(lengths):  # never read
        k[b, :, L + T:] = float("nan")
        v[b, :, L + T:] = float("nan")
    k, v = k.to(device, dtype), v.to(device, dtype)
    lens = torch.tensor(lengths, dtype=torch.int32, device=device)
    mask = None
    if mask_kind != "causal":
        shape = (T, T) if mask_kind == "shared" else (B, T, T)
        mask = (torch.rand(shape, generator=g) < 0.5) | torch.eye(T, dtype=torch.bool)
        mask = mask.to(device)
    return q, k, v, lens, mask


def to_form(k, v, lengths, T, form, seed=0):
    """Contiguous (B, Hkv, S, D) k/v in the cache form `form` (a key of ATTENTION_FORMS): (k, v, kwargs for the call)."""
    layout, page_size = ATTENTION_FORMS[form]
    if page_size is None:
        if layout == "HND":
            return k, v, {}
        return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), {"layout": "NHD"}
    kp, table = paginate(k, lengths, T, page_size, layout, seed=seed)
    vp, table_v = paginate(v, lengths, T, page_size, layout, seed=seed)
    assert torch.equal(table, table_v)
    return kp, vp, {"layout": layout, "block_table": table}


# (B, Hkv, G, T, D, lengths): odd head dims, GQA, lengths 0 and inside a block/page, T above the 64-token mask word.
_ATTENTION_SHAPES_QUICK = [(3, 2, 3, 5, 40, [0, 17, 70]), (2, 1, 4, 1, 64, [33, 0]), (2, 2, 1, 25, 64, [3, 50]),
                           (1, 1, 2, 70, 32, [20])]
_ATTENTION_SHAPES_FULL = _ATTENTION_SHAPES_QUICK + [(4, 2, 2, 13, 128, [0, 1, 63, 200]), (2, 4, 1, 3, 80, [15, 16]),
                                                    (1, 8, 1, 1, 128, [1000])]


def attention_cases(grid="quick"):
    """(shape, mask kind, form, dtype) of the attention grid. quick: every axis covered, ~30 cases; full: all
    combinations of the full shapes (~250)."""
    masks = ["causal", "shared", "per_row"]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    forms = list(ATTENTION_FORMS)
    if grid == "full":
        return list(itertools.product(_ATTENTION_SHAPES_FULL, masks, forms, dtypes))
    cases = []
    for i, shape in enumerate(_ATTENTION_SHAPES_QUICK):
        for j, form in enumerate(forms):
            cases.append((shape, masks[(i + j) % 3], form, dtypes[(i + j) % 2]))  # fp32/fp16: they run on CPU too
    cases += [(_ATTENTION_SHAPES_QUICK[0], "per_row", "NHD paged", torch.bfloat16),
              (_ATTENTION_SHAPES_QUICK[2], "causal", "HND", torch.bfloat16)]
    return cases


def check_attention(fn, grid="quick", device=None, forms: Optional[Iterable[str]] = None, sm_scale=None,
                    section="attention") -> list:
    """Check ``fn(q, k_cache, v_cache, cache_seqlens, mask, sm_scale=None, *, block_table=None, layout="HND")``
    against `minipass.kernels.attention.attention_ref` over the grid.

    The contract (README "Porting the kernels"): q (B, Hq, T, D); the cache in one of the forms of ATTENTION_FORMS
    (for contiguous HND no keyword is passed, so a port of only the original form can be checked with
    ``forms=["HND"]``); cache_seqlens (B,) int32; mask None (causal among the new tokens), (T, T) or (B, T, T) bool.
    Returns (B, Hq, T, D). Checked: shape, dtype, no NaN (slots past L_b + T and unused pages are NaN), and the max
    error against the fp32 reference (TOLERANCE per dtype). Cases in a form not in `forms`, or in bf16 on CPU, are
    skipped.
    """
    from .attention import attention_ref

    device = _default_device(device)
    forms = set(ATTENTION_FORMS if forms is None else forms)
    results = []
    for n, ((B, Hkv, G, T, D, lengths), mask_kind, form, dtype) in enumerate(attention_cases(grid)):
        name = (f"B={B} Hq={Hkv * G} Hkv={Hkv} T={T} D={D} L={lengths} {mask_kind} [{form}] "
                f"{str(dtype).removeprefix('torch.')}")
        if form not in forms or not _dtype_supported(dtype, device):
            results.append(Result(section, name, "skip", "form not selected" if form not in forms else "no bf16 on CPU"))
            continue

        def body(B=B, Hkv=Hkv, G=G, T=T, D=D, lengths=lengths, mask_kind=mask_kind, form=form, dtype=dtype, n=n):
            q, k, v, lens, mask = attention_inputs(B, Hkv, G, T, D, lengths, mask_kind, dtype, device, seed=n)
            kf, vf, kwargs = to_form(k, v, lengths, T, form, seed=n)
            ref = attention_ref(q.float(), kf.float(), vf.float(), lens, mask, sm_scale, **kwargs)
            out = fn(q, kf, vf, lens, mask, sm_scale=sm_scale, **kwargs)
            if tuple(out.shape) != (B, Hkv * G, T, D) or out.dtype != dtype:
                return False, f"returned {tuple(out.shape)} {out.dtype}, expected {(B, Hkv * G, T, D)} {dtype}"
            if out.isnan().any():
                return False, "NaN in the output (read a slot past L_b + T, or an unused page?)"
            err = (out.float() - ref).abs().max().item()
            return err <= TOLERANCE[dtype], f"max err {err:.2e} (tol {TOLERANCE[dtype]:.0e})"

        results.append(run_case(section, name, body))
    return results


# ----------------------------------------------------------------------------------------------------------------------
# reshape_and_cache (the K/V writer)
# ----------------------------------------------------------------------------------------------------------------------


def reshape_and_cache_cases(grid="quick"):
    """(N, Hkv, D, page_size, num_pages, layout, key dtype, cache dtype, padded)."""
    cases = [(7, 2, 40, 16, 4, "NHD", torch.float32, torch.float32, True),
             (33, 3, 64, 32, 3, "HND", torch.float16, torch.float16, False),
             (5, 1, 128, 7, 2, "NHD", torch.float32, torch.float16, True),
             (64, 8, 64, 64, 2, "HND", torch.bfloat16, torch.bfloat16, True)]
    if grid == "full":
        cases += [(N, H, D, P, 6, layout, dt, dt, pad) for N, H, D, P, layout, dt, pad in itertools.product(
            [1, 50], [1, 4], [48, 128], [16, 64], ["NHD", "HND"], [torch.float16, torch.bfloat16], [True, False])]
    return cases


def check_reshape_and_cache(fn, grid="quick", device=None, section="reshape_and_cache") -> list:
    """Check ``fn(key, value, k_cache, v_cache, slot_mapping, layout)`` (in place) against
    `minipass.kernels.kv_cache.reshape_and_cache_ref`: key/value (N, Hkv, D) views of a (N, Hkv, 2D) buffer, slots in random
    order with -1 padding (skipped); the whole caches must come out bit-identical to the reference's."""
    from .kv_cache import reshape_and_cache_ref

    device = _default_device(device)
    results = []
    for n, (N, H, D, P, num_pages, layout, kdt, cdt, padded) in enumerate(reshape_and_cache_cases(grid)):
        name = (f"N={N} Hkv={H} D={D} page={P} pages={num_pages} {layout} {str(kdt).removeprefix('torch.')}->"
                f"{str(cdt).removeprefix('torch.')}{' -1 padding' if padded else ''}")
        if not (_dtype_supported(kdt, device) and _dtype_supported(cdt, device)):
            results.append(Result(section, name, "skip", "no bf16 on CPU"))
            continue

        def body(N=N, H=H, D=D, P=P, num_pages=num_pages, layout=layout, kdt=kdt, cdt=cdt, padded=padded, n=n):
            g = torch.Generator().manual_seed(n)
            buf = torch.randn(N, H, 2 * D, generator=g).to(device, kdt)
            key, value = buf[..., :D], buf[..., D:]  # strided views
            capacity = num_pages * P
            slots = torch.randperm(capacity, generator=g)[:N]
            if padded:
                slots[::3] = -1
            slots = slots.to(device)
            shape = (num_pages, P, H, D) if layout == "NHD" else (num_pages, H, P, D)
            k0 = torch.randn(shape, generator=g).to(device, cdt)
            v0 = torch.randn(shape, generator=g).to(device, cdt)
            k_ref, v_ref = k0.clone(), v0.clone()
            reshape_and_cache_ref(key, value, k_ref, v_ref, slots, layout)
            k_out, v_out = k0.clone(), v0.clone()
            fn(key, value, k_out, v_out, slots, layout)
            same = torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
            return same, "bit-identical" if same else "caches differ from the reference"

        results.append(run_case(section, name, body))
    return results


# ----------------------------------------------------------------------------------------------------------------------
# Acceptance: accept, accept_from_logits (padded and flattened forms), accept_tree
# ----------------------------------------------------------------------------------------------------------------------
#   accept(p, draft_tokens, num_drafts, u_accept, u_sample, q)                      -> (tokens, num_accepted)
#   accept_from_logits(target_logits, draft_tokens, num_drafts, u_accept, u_sample, draft_logits,
#                      temperature, top_k, top_p)                                   -> (tokens, num_accepted)
#   accept_tree(p, tokens, parents, u_accept, u_sample)                             -> (out_tokens, path, num_accepted)
# with the shapes, forms and invalid-row contract of kernels/acceptance.py and kernels/tree_acceptance.py. A case is
# (name, dtype of the targets, the arguments in call order), built on the CPU; the reference runs on those, the port
# on their copies on the device.


def _on(device, args):
    """The tensors of `args` on `device` with their strides and offsets (a plain .to() makes a strided view
    contiguous, which would hide the strided case); other arguments as they are."""
    moved = []
    for a in args:
        if isinstance(a, torch.Tensor):
            storage = a.as_strided((a.untyped_storage().nbytes() // a.element_size(),), (1,), 0)  # the whole buffer
            a = storage.to(device).as_strided(a.shape, a.stride(), a.storage_offset())
        moved.append(a)
    return moved


def _compare(got, expected) -> str:
    """'' if the outputs are equal, else a sentence naming the first difference."""
    if not isinstance(got, (tuple, list)) or len(got) != len(expected):
        return (f"returned {type(got).__name__} of {len(got) if isinstance(got, (tuple, list)) else '?'} items, "
                f"expected a tuple of {len(expected)} tensors")
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


def _check_exact(section, fn, cases, ref, device) -> list:
    """Each case's outputs from ``fn`` equal to ``ref``'s, element for element."""
    results = []
    for name, dtype, args in cases:
        if not _dtype_supported(dtype, device):
            results.append(Result(section, name, "skip", "no bf16 on CPU"))
            continue

        def body(args=args):
            expected = ref(*args)
            detail = _compare(fn(*_on(device, args)), expected)
            return not detail, detail or "equal to the reference"

        results.append(run_case(section, name, body))
    return results


def _poison_rows(x, seed):
    """NaN, +inf and -inf in three rows of x (..., V), in place (no-op on smaller batches)."""
    flat = x.view(-1, x.shape[-1])
    for row, value in zip(range(0, flat.shape[0], 3), (float("nan"), float("inf"), float("-inf"))):
        flat[row, (seed + row) % flat.shape[1]] = value
    return x


def _chain(B, K, V, dtype, with_q, seed, logits=False, invalid=False, wild=False, no_mass=False):
    """Padded inputs (p, q, drafts, num_drafts, u_accept, u_sample): targets (probabilities or logits), drafts mostly
    the target's argmax (long accepted runs), ragged num_drafts (0 and K included), uniforms."""
    g = torch.Generator().manual_seed(seed)
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

    def take(x, extra):
        return torch.cat([x[b, : int(n[b]) + extra] for b in range(len(n))])

    return take(p, 1), None if q is None else take(q, 0), take(drafts, 0), cu, take(u_a, 0)


def _chain_grid(grid="quick", logits=False):
    """(case name, padded inputs, whether the flattened form is checked too) for the chain kernels."""
    cases = [
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
    for dtype, name in [(torch.float16, "fp16"), (torch.bfloat16, "bf16")]:
        cases.append((f"B=5 K=3 V=77 {name}, q, invalid rows", dict(B=5, K=3, V=77, dtype=dtype, with_q=True,
                                                                    invalid=True), True))
    if grid == "full":
        cases += [
            ("B=4 K=6 V=4099 fp32, two vocabulary blocks", dict(B=4, K=6, V=4099, dtype=torch.float32,
                                                                 with_q=True), True),
            ("B=3 K=40 V=31 fp32, rows longer than 32 drafts", dict(B=3, K=40, V=31, dtype=torch.float32,
                                                                   with_q=False), True),
            ("B=9 K=7 V=1000 fp16, drafts out of range, invalid rows",
             dict(B=9, K=7, V=1000, dtype=torch.float16, with_q=True, wild=True, invalid=True), True),
        ]
    return [(name, _chain(**kw, seed=i, logits=logits), flat) for i, (name, kw, flat) in enumerate(cases)]


def accept_cases(grid="quick", flattened=True):
    """(case, dtype, args of accept) over the chain grid, each in the padded form and (flattened=True) the flattened
    form, plus one case of strided inputs: views of bigger buffers with batch and row strides that are not V's,
    column-major drafts and int32 counts."""
    cases = []
    for name, (p, q, drafts, n, u_a, u_s), flat in _chain_grid(grid, logits=False):
        cases.append((f"padded {name}", p.dtype, (p, drafts, n, u_a, u_s, q)))
        if flat and flattened:
            p_f, q_f, d_f, cu, ua_f = _flatten(p, q, drafts, n, u_a)
            cases.append((f"flattened {name}", p.dtype, (p_f, d_f, cu, ua_f, u_s, q_f)))
    p, q, drafts, n, u_a, u_s = _chain(8, 3, 300, torch.float32, True, seed=99)
    p = torch.cat([p, p], -1)[::2, :, 1:301]  # (4, 3 + 1, 300), strides (2 * 4 * 600, 600, 1)
    q = q.transpose(0, 1).contiguous().transpose(0, 1)[::2]  # (4, 3, 300), strides (2 * 300, 8 * 300, 1)
    cases.append(("padded B=4 K=3 V=300 fp32, strided inputs, int32 counts", p.dtype,
                  (p, drafts[::2].t().contiguous().t(), n[::2].int(), u_a[::2], u_s[::2], q)))
    return cases


def check_accept(fn, grid="quick", device=None, flattened=True, section="accept") -> list:
    """Check ``fn(p, draft_tokens, num_drafts, u_accept, u_sample, q)`` against `minipass.kernels.acceptance.accept_ref` over
    `accept_cases`: (tokens, num_accepted) must be equal to the reference's, element for element (compared as int64,
    so int32 outputs are fine). Pass ``flattened=False`` for a port of the padded form only. Cases in bf16 on CPU
    are skipped."""
    from .acceptance import accept_ref

    return _check_exact(section, fn, accept_cases(grid, flattened), accept_ref, _default_device(device))


# (temperature, top_k, top_p): the plain distribution, greedy, and top-k / top-p cuts, k = 1 included.
_TRANSFORMS = [(1.0, 0, 1.0), (0.0, 0, 1.0), (0.7, 5, 0.9), (1.3, 40, 0.5), (0.8, 1, 1.0)]


def accept_from_logits_cases(grid="quick", flattened=True):
    """(case, dtype, args of accept_from_logits) over the chain grid with logits on quarter steps (tied logits, at the
    top-k cut too), in both forms. quick: one sampling transform per case, in turn among the first three; full: every
    transform on every case."""
    transforms = _TRANSFORMS[:3] if grid != "full" else _TRANSFORMS
    cases = []
    for i, (name, (t, q, drafts, n, u_a, u_s), flat) in enumerate(_chain_grid(grid, logits=True)):
        t = (t.float() * 4).round().div(4).to(t.dtype)
        for options in [transforms[i % len(transforms)]] if grid != "full" else transforms:
            label = f"{name}, T={options[0]} top_k={options[1]} top_p={options[2]}"
            cases.append((f"padded {label}", t.dtype, (t, drafts, n, u_a, u_s, q, *options)))
            if flat and flattened:
                t_f, q_f, d_f, cu, ua_f = _flatten(t, q, drafts, n, u_a)
                cases.append((f"flattened {label}", t.dtype, (t_f, d_f, cu, ua_f, u_s, q_f, *options)))
    return cases


def check_accept_from_logits(fn, grid="quick", device=None, flattened=True, section="accept_from_logits") -> list:
    """Check ``fn(target_logits, draft_tokens, num_drafts, u_accept, u_sample, draft_logits, temperature, top_k,
    top_p)`` against `minipass.kernels.acceptance.accept_from_logits_ref` over `accept_from_logits_cases`, exactly as
    `check_accept` does (temperature, top_k and top_p are passed as Python numbers)."""
    from .acceptance import accept_from_logits_ref

    cases = accept_from_logits_cases(grid, flattened)
    return _check_exact(section, fn, cases, accept_from_logits_ref, _default_device(device))


def _tree(B, N, V, dtype, seed, invalid=False, depth=3):
    """Random trees (p, tokens, parents, u_accept, u_sample) with padding nodes, siblings, repeated and out-of-range
    candidate tokens, and peaked targets."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(B, N + 1, V, generator=g) * 4, -1)
    parents = torch.full((B, N + 1), -1, dtype=torch.long)
    tokens = torch.zeros(B, N + 1, dtype=torch.long)
    roll = torch.rand(B, N + 1, 3, generator=g)
    for b in range(B):
        level = [0] * (N + 1)
        for i in range(1, N + 1):
            if roll[b, i, 0] < 0.15:
                continue  # padding
            open_nodes = [a for a in range(i) if (a == 0 or parents[b, a] >= 0) and level[a] < depth]
            a = open_nodes[int(roll[b, i, 1] * len(open_nodes))]
            parents[b, i], level[i] = a, level[a] + 1
            r = float(roll[b, i, 2])
            tokens[b, i] = V + 3 if r < 0.08 else int(p[b, a].argmax()) if r < 0.7 else int(r * 1000) % V
    if invalid:
        _poison_rows(p, seed)
    u_a, u_s = torch.rand(B, N + 1, generator=g) ** 2, torch.rand(B, generator=g)
    return p.to(dtype), tokens, parents, u_a, u_s


def accept_tree_cases(grid="quick"):
    """(case, dtype, args of accept_tree) over random padded trees."""
    cases = [
        ("B=5 N=7 V=37 fp32", dict(B=5, N=7, V=37, dtype=torch.float32)),
        ("B=4 N=13 V=101 fp32, depth 6", dict(B=4, N=13, V=101, dtype=torch.float32, depth=6)),
        ("B=6 N=9 V=50 fp32, invalid rows (NaN, +inf, -inf)", dict(B=6, N=9, V=50, dtype=torch.float32,
                                                                   invalid=True)),
        ("B=3 N=0 V=20 fp32, root only", dict(B=3, N=0, V=20, dtype=torch.float32)),
        ("B=4 N=5 V=63 fp16, invalid rows", dict(B=4, N=5, V=63, dtype=torch.float16, invalid=True)),
        ("B=4 N=7 V=63 bf16", dict(B=4, N=7, V=63, dtype=torch.bfloat16)),
    ]
    if grid == "full":
        cases += [("B=4 N=30 V=4099 fp32, two vocabulary blocks", dict(B=4, N=30, V=4099, dtype=torch.float32)),
                  ("B=8 N=63 V=200 fp16, invalid rows", dict(B=8, N=63, V=200, dtype=torch.float16, invalid=True))]
    return [(name, kw["dtype"], _tree(**kw, seed=i)) for i, (name, kw) in enumerate(cases)]


def check_accept_tree(fn, grid="quick", device=None, section="accept_tree") -> list:
    """Check ``fn(p, tokens, parents, u_accept, u_sample)`` against `minipass.kernels.tree_acceptance.accept_tree_ref` over
    `accept_tree_cases`: (out_tokens, path, num_accepted) must be equal to the reference's, element for element.
    Cases in bf16 on CPU are skipped."""
    from .tree_acceptance import accept_tree_ref

    return _check_exact(section, fn, accept_tree_cases(grid), accept_tree_ref, _default_device(device))


# ----------------------------------------------------------------------------------------------------------------------
# The project's own kernels
# ----------------------------------------------------------------------------------------------------------------------


def _own_attention(grid, device):
    from .attention import attention

    def call(*args, **kwargs):
        return attention(*args, check_values=True, **kwargs)

    def call_split(*args, **kwargs):
        return attention(*args, check_values=True, num_splits=3, **kwargs)

    return check_attention(call, grid, device) + check_attention(call_split, grid, device, section="attention split-K")


def _own_reshape_and_cache(grid, device):
    from .kv_cache import reshape_and_cache

    return check_reshape_and_cache(reshape_and_cache, grid, device)


def _own_accept(grid, device):
    from .acceptance import accept

    return check_accept(accept, grid, device)


def _own_accept_from_logits(grid, device):
    from .acceptance import accept_from_logits

    return check_accept_from_logits(accept_from_logits, grid, device)


def _own_accept_tree(grid, device):
    from .tree_acceptance import accept_tree

    def call(*args):
        return accept_tree(*args, check_values=False)

    return check_accept_tree(call, grid, device)


# name -> function(grid, device) -> list[Result], run on the project's own kernels by main().
SECTIONS = {
    "attention": _own_attention,
    "reshape_and_cache": _own_reshape_and_cache,
    "accept": _own_accept,
    "accept_from_logits": _own_accept_from_logits,
    "accept_tree": _own_accept_tree,
}


def run(grid="quick", device=None, only=None) -> list:
    results = []
    for name, section in SECTIONS.items():
        if only in (None, name):
            results += section(grid, device)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=["quick", "full"], default="full")
    parser.add_argument("--only", choices=list(SECTIONS), default=None)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu (Triton interpreter)")
    args = parser.parse_args(argv)
    device = _default_device(args.device)
    if device.type == "cpu":
        import os

        if "triton" in sys.modules and not os.environ.get("TRITON_INTERPRET"):
            print("error: on CPU the kernels run under TRITON_INTERPRET=1, which must be set before triton is "
                  "imported", file=sys.stderr)
            return 2
    results = run(args.grid, device, args.only)
    print_table(results)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    if not torch.cuda.is_available():
        import os

        os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton
    sys.exit(main())
