"""Fuzz the attention launcher and its reference: random shapes, fp32/fp16, every cache form, masks, split-K, and
NaN / inf / zero / huge inputs (under the interpreter, small).

Asserted for every case: the launcher raises nothing but the documented ValueError/TypeError, and its output agrees
with the references as the module docstring says ("Non-finite inputs"):

- wherever `attention_ref` is finite, the kernel is finite and close to it;
- against an exact per-query oracle (float64; a key a query does not see contributes nothing, whatever its value):
  where the oracle is finite the kernel is close to it, or non-finite only where a non-finite V value lies in the
  keys of that (b, h_kv) (the documented 0 * inf); where the oracle is NaN the kernel is non-finite too, or zeros
  when every score the query sees is -inf (documented).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import math

import pytest

from minipass.kernels.attention import attention, attention_ref
from minipass.kernels.conformance import paginate

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy on inf * 0
PATHOLOGIES = ["normal", "zeros_q", "zeros_kv", "huge", "nan_q", "inf_k", "neg_inf_k", "nan_v", "inf_v", "sees_nothing"]


def _exact(q, k, v, lengths, mask, sm_scale):
    """Per-query attention in float64 over exactly the keys each query sees (B, Hq, T, D); zeros for a query that
    sees no key; NaN/inf as IEEE softmax gives them."""
    B, Hq, T, D = q.shape
    _, Hkv, S, _ = k.shape
    G = Hq // Hkv
    rel = torch.arange(S)[None, :] - lengths.long().cpu()[:, None]  # (B, S)
    new = mask.cpu() if mask is not None else torch.ones(T, T, dtype=torch.bool).tril()
    new = new.expand(B, T, T)
    vis = (rel < 0)[:, None, :] | (((rel >= 0) & (rel < T))[:, None, :]
                                   & torch.gather(new, 2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, S)))
    vis = vis[:, None].expand(B, Hq, T, S)
    kk = k.double().cpu().repeat_interleave(G, 1)  # (B, Hq, S, D)
    vv = v.double().cpu().repeat_interleave(G, 1)
    scores = torch.einsum("bhtd,bhsd->bhts", q.double().cpu(), torch.where(vis.any(2)[..., None], kk, 0.0)) * sm_scale
    # A NaN score from an invisible key must not leak: select, do not multiply.
    scores = torch.where(vis, scores, float("-inf"))
    p = torch.softmax(scores, -1)
    p = torch.where(vis, p, 0.0)
    contrib = torch.where(vis[..., None], p[..., None] * vv[:, :, None], 0.0)  # (B, Hq, T, S, D)
    out = contrib.sum(-2)
    seen = vis.any(-1)
    out = torch.where(seen[..., None], out, 0.0)
    all_neg_inf = (torch.where(vis, scores, 0.0) == float("-inf")).sum(-1) == vis.sum(-1)
    return out, all_neg_inf & seen


def _case(seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
    B, Hkv, G = r(1, 3), r(1, 3), r(1, 4)
    T = r(1, 12) if seed % 7 else r(60, 70)  # now and then past the 64-token mask word
    D = [8, 16, 24, 40, 64][r(0, 4)]
    dtype = torch.float32 if seed % 2 else torch.float16
    lengths = [r(0, 40) for _ in range(B)]
    page = [None, None, 4, 5, 16][r(0, 4)]
    layout = ["HND", "NHD"][r(0, 1)]
    S = max(lengths) + T + r(0, 20)
    if page is not None:
        S = math.ceil(S / page) * page
    mask_kind = ["causal", "shared", "per_row"][r(0, 2)]
    num_splits = [None, None, 1, 2, 4][r(0, 4)]
    pathology = PATHOLOGIES[seed % len(PATHOLOGIES)]
    sm_scale = [None, 0.1, 2.0][r(0, 2)]
    return dict(B=B, Hkv=Hkv, G=G, T=T, D=D, dtype=dtype, lengths=lengths, page=page, layout=layout, S=S,
                mask_kind=mask_kind, num_splits=num_splits, pathology=pathology, sm_scale=sm_scale, g=g)


def _inputs(c):
    g, B, Hkv, G, T, D, S, dtype = c["g"], c["B"], c["Hkv"], c["G"], c["T"], c["D"], c["S"], c["dtype"]
    q = torch.randn(B, T, Hkv * G, D, generator=g).transpose(1, 2)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, D, generator=g)
    lengths = c["lengths"]
    pick = lambda n: int(torch.randint(0, n, (1,), generator=g))  # noqa: E731
    b = pick(B)
    slot = pick(lengths[b] + T)  # a slot some query of row b may see
    kind = c["pathology"]
    if kind == "zeros_q":
        q.zero_()
    elif kind == "zeros_kv":
        k.zero_()
        v.zero_()
    elif kind == "huge":
        big = 6e4 if dtype == torch.float16 else 1e6
        q, k, v = q * big / 4, k * big / 4, v * big / 4
    elif kind == "nan_q":
        q[b, pick(Hkv * G), pick(T), pick(D)] = float("nan")
    elif kind in ("inf_k", "neg_inf_k"):
        k[b, pick(Hkv), slot] = float("inf") if kind == "inf_k" else float("-inf")
    elif kind in ("nan_v", "inf_v"):
        v[b, pick(Hkv), slot, pick(D)] = float("nan") if kind == "nan_v" else float("inf")
    for row, L in enumerate(lengths):  # never read
        k[row, :, L + T:] = float("nan")
        v[row, :, L + T:] = float("nan")
    mask = None
    if c["mask_kind"] != "causal" or kind == "sees_nothing":
        shape = (T, T) if c["mask_kind"] == "shared" else (B, T, T)
        mask = (torch.rand(shape, generator=g) < 0.4) | torch.eye(T, dtype=torch.bool)
        if kind == "sees_nothing":  # a query of a row with no prefix and an empty mask row: zero mass
            lengths[b] = 0
            mask = mask.expand(B, T, T).clone()
            mask[b, pick(T)] = False
    to = lambda x: x.to(DEVICE, dtype)  # noqa: E731
    return to(q), to(k), to(v), torch.tensor(lengths, dtype=torch.int32, device=DEVICE), (
        None if mask is None else mask.to(DEVICE))


def _run(c, q, k, v, lens, mask):
    kwargs = {}
    kc, vc = k, v
    if c["page"] is not None:
        kc, table = paginate(k, lens.tolist(), c["T"], c["page"], c["layout"], seed=3)
        vc, _ = paginate(v, lens.tolist(), c["T"], c["page"], c["layout"], seed=3)
        kwargs = dict(block_table=table, layout=c["layout"])
    elif c["layout"] == "NHD":
        kc, vc, kwargs = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), dict(layout="NHD")
    check = c["pathology"] != "sees_nothing"  # an empty mask row breaks the diagonal rule: checked calls refuse it
    out = attention(q, kc, vc, lens, mask, c["sm_scale"], check, c["num_splits"], **kwargs)
    ref = attention_ref(q, kc, vc, lens, mask, c["sm_scale"], **kwargs)
    return out, ref


@pytest.mark.parametrize("seed", range(60))
def test_fuzz_kernel_against_references(seed):
    c = _case(seed)
    q, k, v, lens, mask = _inputs(c)
    out, ref = _run(c, q, k, v, lens, mask)
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    D = c["D"]
    sm_scale = 1 / math.sqrt(D) if c["sm_scale"] is None else c["sm_scale"]
    exact, all_neg_inf = _exact(q, k, v, lens, mask, sm_scale)
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    finite_v = v.isfinite().all(-1).cpu()  # (B, Hkv, S)
    scale = max(1.0, v[v.isfinite()].abs().max().item() if v.isfinite().any() else 1.0)
    tol = (2e-5 if c["dtype"] == torch.float32 else 4e-3) * scale
    B, Hq, T, _ = q.shape
    G = Hq // k.shape[1]
    poisoned = torch.stack([~finite_v[b, :, :int(lens[b]) + T].all(-1) for b in range(B)])  # (B, Hkv)
    poisoned = poisoned.repeat_interleave(G, 1)[:, :, None, None].expand_as(out64)
    o_ok, r_ok, e_ok = out64.isfinite(), ref64.isfinite(), exact.isfinite()

    def first(bad):
        return f"{c['pathology']}: first at (b, h, t, d) = {tuple(bad.nonzero()[0].tolist())}; case {c}"

    bad = r_ok & ~((out64 - ref64).abs() <= tol)  # also catches a non-finite kernel value
    assert not bad.any(), first(bad)
    bad = e_ok & o_ok & ~((out64 - exact).abs() <= tol)
    assert not bad.any(), first(bad)
    bad = e_ok & ~o_ok & ~poisoned  # NaN only through 0 * inf of a V value the query does not see
    assert not bad.any(), first(bad)
    bad = ~e_ok & o_ok & ~(all_neg_inf[..., None] & (out64 == 0))  # all its scores -inf: zeros
    assert not bad.any(), first(bad)


def test_fuzz_errors_are_the_documented_ones():
    """Random malformed calls raise ValueError/TypeError with a message naming the argument, nothing else."""
    g = torch.Generator().manual_seed(0)
    names = ("q", "k_cache", "v_cache", "cache_seqlens", "mask", "block_table", "layout", "num_splits", "head",
             "T=", "D=", "page")
    for i in range(60):
        B, Hkv, G, T, D = [int(torch.randint(1, 4, (1,), generator=g)) for _ in range(5)]
        D *= 8
        S = int(torch.randint(1, 12, (1,), generator=g))
        q = torch.randn(B, Hkv * G, T, D, device=DEVICE)
        k = torch.randn(B, Hkv, S, D, device=DEVICE)
        lens = torch.zeros(B, dtype=torch.int32, device=DEVICE)
        kwargs = dict(q=q, k_cache=k, v_cache=k.clone(), cache_seqlens=lens, mask=None)
        broken = i % 10
        if broken == 0:
            kwargs["q"] = q[..., : D - 1]
        elif broken == 1:
            kwargs["cache_seqlens"] = torch.full((B,), S, dtype=torch.int32, device=DEVICE)
        elif broken == 2:
            kwargs["mask"] = torch.zeros(T, T, dtype=torch.bool, device=DEVICE)
        elif broken == 3:
            kwargs["k_cache"] = k.half()
        elif broken == 4:
            kwargs["block_table"] = torch.zeros(B + 1, 2, dtype=torch.int32, device=DEVICE)
        elif broken == 5:
            kwargs["layout"] = "BSHD"
        elif broken == 6:
            kwargs["num_splits"] = 100
        elif broken == 7:
            kwargs["q"] = torch.randn(B, Hkv * G + 1, T, D, device=DEVICE) if Hkv > 1 else q[:, :, :0]
        elif broken == 8:
            kwargs["block_table"] = torch.full((B, 1), 5, dtype=torch.int32, device=DEVICE)
            kwargs["k_cache"] = torch.randn(2, S, Hkv, D, device=DEVICE)
            kwargs["v_cache"] = kwargs["k_cache"].clone()
            kwargs["layout"] = "NHD"
        else:
            kwargs["cache_seqlens"] = lens.float()
        if broken in (1, 2, 8) and T > S:  # T > S is caught first: still a documented error
            pass
        with pytest.raises((ValueError, TypeError)) as info:
            attention(**kwargs)
        assert any(n in str(info.value) for n in names), str(info.value)
