"""Tests for kernels/attention.py: the Triton kernel against two torch references, metamorphic mask checks, errors.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (numpy; no bf16), so shapes are small.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import math

import pytest
import torch.nn.functional as F

from minipass.kernels.attention import attention, attention_ref
from tests.util import compiled_graph_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LOW_PRECISION = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])  # interpreter: no bf16


def _dtype_id(value):
    return str(value).removeprefix("torch.") if isinstance(value, torch.dtype) else None


def _make_inputs(B, Hkv, group, T, S, D, lengths, dtype, seed=0, nan_tail=True, seqlens_dtype=torch.int32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, Hkv * group, D, generator=g).to(DEVICE, dtype).transpose(1, 2)  # the model's layout
    k = torch.randn(B, Hkv, S, D, generator=g).to(DEVICE, dtype)
    v = torch.randn(B, Hkv, S, D, generator=g).to(DEVICE, dtype)
    lengths = torch.tensor(lengths, dtype=seqlens_dtype, device=DEVICE)
    if nan_tail:  # slots >= L_b + T must never be read
        for b, L in enumerate(lengths.tolist()):
            k[b, :, L + T:] = float("nan")
            v[b, :, L + T:] = float("nan")
    return q, k, v, lengths


def _random_mask(kind, B, T, seed=0):
    if kind == "causal":
        return None
    g = torch.Generator().manual_seed(seed + 1)
    shape = (T, T) if kind == "shared" else (B, T, T)
    mask = torch.rand(shape, generator=g) < 0.5
    mask |= torch.eye(T, dtype=torch.bool)
    return mask.to(DEVICE)


def _sdpa_reference(q, k, v, lengths, mask, sm_scale=None):
    """Independent reference: per row, cut the cache at L_b + T, spell out each query's visible slots, call SDPA."""
    B, Hq, T, D = q.shape
    group = Hq // k.shape[1]
    out = torch.zeros(B, Hq, T, D, dtype=torch.float32, device=q.device)
    for b, L in enumerate(lengths.tolist()):
        allowed = torch.zeros(T, L + T, dtype=torch.bool, device=q.device)
        allowed[:, :L] = True
        if mask is None:
            allowed[:, L:] = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        else:
            allowed[:, L:] = mask if mask.dim() == 2 else mask[b]
        kb = k[b, :, :L + T].float().repeat_interleave(group, dim=0)  # (Hq, L+T, D)
        vb = v[b, :, :L + T].float().repeat_interleave(group, dim=0)
        seen = allowed.any(1)  # SDPA gives NaN for a row that sees nothing; the kernel must give zeros
        if seen.any():
            o = F.scaled_dot_product_attention(q[b].float()[:, seen], kb, vb, attn_mask=allowed[seen], scale=sm_scale)
            out[b][:, seen] = o
    return out


def _torch_lowp_reference(q, k, v, lengths, mask, sm_scale=None):
    """What plain torch gets in q's dtype (matmuls in that dtype, softmax in fp32): the error budget for the kernel."""
    B, Hq, T, D = q.shape
    group = Hq // k.shape[1]
    scale = 1 / math.sqrt(D) if sm_scale is None else sm_scale
    out = torch.zeros_like(q, memory_format=torch.contiguous_format)
    for b, L in enumerate(lengths.tolist()):
        allowed = torch.ones(T, L + T, dtype=torch.bool, device=q.device)
        allowed[:, L:] = torch.ones(T, T, dtype=torch.bool, device=q.device).tril() if mask is None else (
            mask if mask.dim() == 2 else mask[b])
        kb = k[b, :, :L + T].repeat_interleave(group, dim=0)
        vb = v[b, :, :L + T].repeat_interleave(group, dim=0)
        scores = (q[b] @ kb.transpose(1, 2)) * scale  # (Hq, T, L+T) in q's dtype
        p = torch.softmax(scores.float().masked_fill(~allowed, float("-inf")), dim=-1).to(q.dtype)
        out[b] = p @ vb
    return out


def _assert_matches(out, ref_fp32, ref_lowp, dtype):
    assert out.dtype == dtype and out.is_contiguous()
    assert not out.isnan().any()
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref_fp32.float(), atol=1e-5, rtol=1e-5)
    else:
        # flash-attention's rule: at most twice torch's own error in the same dtype, plus a little.
        err = (out.float() - ref_fp32.float()).abs().max().item()
        torch_err = (ref_lowp.float() - ref_fp32.float()).abs().max().item()
        assert err <= 2 * torch_err + 1e-4, f"kernel error {err} vs torch {dtype} error {torch_err}"


def _check(q, k, v, lengths, mask, dtype, **kwargs):
    out = attention(q, k, v, lengths, mask, **kwargs)
    sm_scale = kwargs.get("sm_scale")
    ref = attention_ref(q.float(), k.float(), v.float(), lengths, mask, sm_scale=sm_scale)
    sdpa = _sdpa_reference(q, k, v, lengths, mask, sm_scale=sm_scale)
    torch.testing.assert_close(ref, sdpa, atol=1e-5, rtol=1e-5)  # the two references agree
    lowp = None if dtype == torch.float32 else _torch_lowp_reference(q, k, v, lengths, mask, sm_scale)
    _assert_matches(out, ref, lowp, dtype)
    _assert_matches(attention_ref(q, k, v, lengths, mask, sm_scale=sm_scale), ref, lowp, dtype)
    return out


@pytest.mark.parametrize("dtype", [torch.float32] + LOW_PRECISION, ids=_dtype_id)
@pytest.mark.parametrize("mask_kind", ["causal", "shared", "per_row"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("group", [1, 3])
@pytest.mark.parametrize("T", [1, 5, 25])
def test_matches_references(T, group, D, mask_kind, dtype):
    # L = 133 puts whole unmasked prefix blocks before the masked ones; L = 0 and 7 start inside the first block.
    B, Hkv, S = 3, 2, 192
    q, k, v, lengths = _make_inputs(B, Hkv, group, T, S, D, [0, 7, 133], dtype, seed=T * 7 + group + D)
    _check(q, k, v, lengths, _random_mask(mask_kind, B, T, seed=T), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=_dtype_id)
@pytest.mark.parametrize("mask_kind", ["causal", "per_row"])
@pytest.mark.parametrize("T, num_splits, lengths", [
    (1, 3, [0, 9, 250]),  # rows 0 and 1 have one key block: most of their splits are empty
    (5, 2, [3, 120, 64]),
    (25, 7, [0, 31, 230]),  # more splits than row 1 has blocks
])
def test_split_k(T, num_splits, lengths, mask_kind, dtype):
    B, Hkv, group, S, D = 3, 1, 3, 256, 64
    seqlens_dtype = torch.int64 if T == 5 else torch.int32
    q, k, v, lengths = _make_inputs(B, Hkv, group, T, S, D, lengths, dtype, seed=T, seqlens_dtype=seqlens_dtype)
    _check(q, k, v, lengths, _random_mask(mask_kind, B, T, seed=T), dtype, num_splits=num_splits)


@pytest.mark.parametrize("num_splits", [None, 3])
def test_long_mask_odd_head_dim_strided_cache(num_splits):
    # T > 64 reads the mask per key block instead of as one int64 per row; D = 40 is padded to 64; the cache is a
    # (B, S, Hkv, D) buffer seen as (B, Hkv, S, D); sm_scale is not the default.
    B, Hkv, group, T, S, D = 2, 2, 2, 70, 160, 40
    q, _, _, lengths = _make_inputs(B, Hkv, group, T, S, D, [0, 90], torch.float32, nan_tail=False)
    g = torch.Generator().manual_seed(5)
    k = torch.randn(B, S, Hkv, D, generator=g).to(DEVICE).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D, generator=g).to(DEVICE).transpose(1, 2)
    mask = _random_mask("per_row", B, T, seed=3)
    _check(q, k, v, lengths, mask, torch.float32, sm_scale=0.3, num_splits=num_splits)


def _tree_mask(parents):
    """Node i sees itself and its ancestors; parents[i] < i, parents[0] = -1 (the root)."""
    T = len(parents)
    mask = torch.eye(T, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
    return mask


def _pass_mask(L):
    """PaSS one-call layout: c_0..c_L causal, then blocks B_0..B_L of L tokens; B_i's k-th token sees c_0..c_i
    and B_i's tokens 1..k."""
    T = (L + 1) + (L + 1) * L
    mask = torch.zeros(T, T, dtype=torch.bool)
    mask[:L + 1, :L + 1] = torch.ones(L + 1, L + 1, dtype=torch.bool).tril()
    for i in range(L + 1):
        start = L + 1 + i * L
        mask[start:start + L, :i + 1] = True
        mask[start:start + L, start:start + L] = torch.ones(L, L, dtype=torch.bool).tril()
    return mask


def _assert_each_query_is_plain_attention(q, k, v, lengths, mask, out):
    """Query i's output == the last row of causal attention over the prefix followed by i's visible new tokens only.

    Checked twice: with the kernel itself on the compacted sequences (one batch row per query, ragged lengths, T = 1)
    and with SDPA.
    """
    B, Hq, T, D = q.shape
    seqs = []
    for b, L in enumerate(lengths.tolist()):
        for i in range(T):
            seen = torch.nonzero(mask[b, i]).flatten()
            assert seen[-1].item() == i  # queries see only earlier tokens: i is the last of its sequence
            seqs.append((b, i, torch.cat([torch.arange(L, device=q.device), L + seen])))
    S = max(len(idx) for _, _, idx in seqs)
    k_c = torch.zeros(len(seqs), k.shape[1], S, D, dtype=k.dtype, device=k.device)
    v_c = torch.zeros_like(k_c)
    q_c = torch.stack([q[b, :, i] for b, i, _ in seqs])[:, :, None]  # (B*T, Hq, 1, D)
    for n, (b, i, idx) in enumerate(seqs):
        k_c[n, :, :len(idx)] = k[b][:, idx]
        v_c[n, :, :len(idx)] = v[b][:, idx]
    lengths_c = torch.tensor([len(idx) - 1 for _, _, idx in seqs], dtype=torch.int32, device=q.device)
    compact = attention(q_c, k_c, v_c, lengths_c)  # (B*T, Hq, 1, D): plain causal, no mask
    expected = out.permute(0, 2, 1, 3).reshape(B * T, Hq, D)
    torch.testing.assert_close(compact[:, :, 0], expected, atol=1e-5, rtol=1e-5)
    group = Hq // k.shape[1]
    for n, (b, i, idx) in enumerate(seqs):
        kb = k[b][:, idx].repeat_interleave(group, 0)
        vb = v[b][:, idx].repeat_interleave(group, 0)
        sdpa = F.scaled_dot_product_attention(q[b, :, i:i + 1], kb, vb)  # one query, sees all of idx
        torch.testing.assert_close(sdpa[:, 0], out[b, :, i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_splits", [None, 2])
def test_tree_mask_is_attention_over_ancestors(num_splits):
    B, Hkv, group, D = 2, 1, 3, 64
    trees = [[-1, 0, 0, 1, 1, 2, 3, 3, 5, 0, 9], [-1, 0, 1, 2, 0, 4, 0, 6, 7, 7, 1]]
    T = len(trees[0])
    mask = torch.stack([_tree_mask(p) for p in trees]).to(DEVICE)  # (B, T, T): a different tree per row
    q, k, v, lengths = _make_inputs(B, Hkv, group, T, 96, D, [0, 70], torch.float32)
    out = attention(q, k, v, lengths, mask, num_splits=num_splits)
    _assert_each_query_is_plain_attention(q, k, v, lengths, mask, out)


def test_pass_lookahead_mask():
    la = 4
    mask = _pass_mask(la).to(DEVICE)  # (25, 25), shared by the rows
    T = mask.shape[0]
    B, Hkv, group, D = 2, 1, 3, 64
    q, k, v, lengths = _make_inputs(B, Hkv, group, T, 128, D, [3, 70], torch.float32)
    out = attention(q, k, v, lengths, mask)
    _assert_each_query_is_plain_attention(q, k, v, lengths, mask.expand(B, T, T), out)
    # The real tokens c_0..c_L do not see the blocks: a causal call over them alone gives the same outputs.
    alone = attention(q[:, :, :la + 1], k, v, lengths)
    torch.testing.assert_close(alone, out[:, :, :la + 1], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("num_splits", [None, 2])
def test_query_that_sees_nothing_gives_zeros(num_splits):
    B, Hkv, group, T, S, D = 2, 1, 2, 5, 80, 64
    q, k, v, lengths = _make_inputs(B, Hkv, group, T, S, D, [0, 40], torch.float32)
    mask = _random_mask("per_row", B, T)
    mask[:, 2] = False  # row 0 (L = 0) query 2 sees nothing; row 1's query 2 still sees the prefix
    out = attention(q, k, v, lengths, mask, check_values=False, num_splits=num_splits)
    assert not out.isnan().any()
    assert (out[0, :, 2] == 0).all()
    torch.testing.assert_close(out, attention_ref(q, k, v, lengths, mask), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, _sdpa_reference(q, k, v, lengths, mask), atol=1e-5, rtol=1e-5)


def _valid_inputs():
    B, Hkv, group, T, S, D = 2, 2, 2, 3, 16, 64
    q, k, v, lengths = _make_inputs(B, Hkv, group, T, S, D, [0, 5], torch.float32, nan_tail=False)
    return q, k, v, lengths, torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril()


def test_check_values_rejects_bad_lengths_and_diagonal():
    q, k, v, lengths, mask = _valid_inputs()
    bad_mask = mask.clone()
    bad_mask[1, 1] = False
    with pytest.raises(ValueError, match="mask diagonal must be all True"):
        attention(q, k, v, lengths, bad_mask)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] \+ T = 14 \+ 3 = 17 exceeds the cache length S = 16"):
        attention(q, k, v, torch.tensor([0, 14], dtype=torch.int32, device=DEVICE), mask)
    with pytest.raises(ValueError, match=r"cache_seqlens\[0\] = -1 must be >= 0"):
        attention(q, k, v, torch.tensor([-1, 0], dtype=torch.int32, device=DEVICE), mask)
    out = attention(q, k, v, lengths, bad_mask, check_values=False)  # the hot path does not sync to check
    assert out.shape == q.shape


def _rebuild(**changes):
    q, k, v, lengths, mask = _valid_inputs()
    args = dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lengths, mask=mask)
    args.update(changes)
    return args


@pytest.mark.parametrize("change, error, message", [
    (lambda a: dict(q=a["q"][0]), ValueError, r"q must have 4 dimensions, got shape \(4, 3, 64\)"),
    (lambda a: dict(k_cache=a["k_cache"][:1]), ValueError, r"k_cache must have shape \(B=2, Hkv, S, D=64\)"),
    (lambda a: dict(v_cache=a["v_cache"][:, :, :8]), ValueError, r"v_cache must have the shape of k_cache"),
    (lambda a: dict(q=torch.randn(2, 3, 3, 64, device=DEVICE)), ValueError,
     r"query heads Hq=3 must be a multiple of the KV heads Hkv=2"),
    (lambda a: dict(q=torch.randn(2, 4, 17, 64, device=DEVICE), mask=None), ValueError, r"T=17 must be in 1..S=16"),
    (lambda a: dict(cache_seqlens=a["cache_seqlens"][:1]), ValueError, r"cache_seqlens must have shape \(2,\)"),
    (lambda a: dict(mask=a["mask"][:2]), ValueError, r"mask must have shape \(3, 3\) or \(2, 3, 3\), got \(2, 3\)"),
    (lambda a: dict(k_cache=a["k_cache"].half()), TypeError, r"k_cache must have q's dtype torch.float32"),
    (lambda a: dict(q=a["q"].double(), k_cache=a["k_cache"].double(), v_cache=a["v_cache"].double()), TypeError,
     r"q must be float16, bfloat16 or float32, got torch.float64"),
    (lambda a: dict(mask=a["mask"].int()), TypeError, r"mask must be torch.bool, got torch.int32"),
    (lambda a: dict(cache_seqlens=a["cache_seqlens"].float()), TypeError, r"cache_seqlens must be int32 or int64"),
    (lambda a: dict(cache_seqlens=torch.zeros(2, dtype=torch.int32, device="meta")), ValueError,
     r"cache_seqlens must be on q's device"),
    (lambda a: dict(v_cache=a["v_cache"].to("meta")), ValueError, r"v_cache must be on q's device"),
    (lambda a: dict(k_cache=torch.randn(2, 2, 64, 16, device=DEVICE).transpose(2, 3)), ValueError,
     r"k_cache must be contiguous in its last dim"),
    (lambda a: dict(q=torch.randn(2, 4, 3, 320, device=DEVICE), k_cache=torch.randn(2, 2, 16, 320, device=DEVICE),
                    v_cache=torch.randn(2, 2, 16, 320, device=DEVICE)), ValueError, r"head dim D=320 is not supported"),
    (lambda a: dict(mask=[[True]]), TypeError, r"mask must be None or a torch.Tensor, got list"),
])
def test_input_errors(change, error, message):
    args = _rebuild()
    args.update(change(args))
    with pytest.raises(error, match=message):
        attention(**args)


def test_default_scale_and_split_heuristic_run():
    # sm_scale defaults to 1/sqrt(D); num_splits=None picks splits from the shapes (1 on the CPU interpreter).
    q, k, v, lengths, mask = _valid_inputs()
    out = attention(q, k, v, lengths, mask)
    ref = attention_ref(q, k, v, lengths, mask, sm_scale=1 / math.sqrt(q.shape[-1]))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# The launcher as a torch operator, its per-signature cache, and the variants it makes Triton compile
# ----------------------------------------------------------------------------------------------------------------------


def _compile_inputs():
    B, Hkv, group, T, S, D = 2, 2, 2, 5, 64, 32
    q, k, v, lengths = _make_inputs(B, Hkv, group, T, S, D, [3, 40], torch.float32)
    return q, k, v, lengths, _random_mask("per_row", B, T)


def _step(q, k, v, lengths, mask):
    return attention(q * 1.5, k, v, lengths, mask, check_values=False).sum(-1)


def test_compiles_with_fullgraph_as_one_operator():
    args = _compile_inputs()
    out, targets = compiled_graph_ops(_step, *args)
    assert torch.equal(out, _step(*args))
    targets = [str(t) for t in targets]
    assert [t for t in targets if "minipass" in t] == ["minipass.attention"], targets
    # Through AOTAutograd (fake tensors: the operator's fake implementation) and Inductor, which compiles the rest
    # (with a C++ compiler on CPU).
    import shutil

    for backend in ("aot_eager", "inductor") if shutil.which("g++") or shutil.which("c++") else ("aot_eager",):
        torch._dynamo.reset()
        torch.testing.assert_close(torch.compile(_step, fullgraph=True, backend=backend)(*args), _step(*args),
                                   atol=1e-5, rtol=1e-5)


def test_operator_registration_passes_opcheck():
    q, k, v, lengths, mask = _compile_inputs()
    torch.library.opcheck(torch.ops.minipass.attention.default, (q, k, v, lengths, mask, None, 0.3, None, "HND"))
    torch.library.opcheck(torch.ops.minipass.attention.default, (q, k, v, lengths, None, None, None, 2, "HND"))


def test_checks_and_configuration_are_cached_per_signature():
    from minipass.kernels import attention as A

    q, k, v, lengths, mask = _compile_inputs()
    plan = A.attention_plan(q, k, v, lengths, mask)
    assert A.attention_plan(q, k, v, lengths, mask) is plan  # same signature: no checks, no configuration
    assert A.attention_plan(q.clone(), k.clone(), v.clone(), lengths.clone(), mask.clone()) is plan  # values: same
    assert A.attention_plan(q.contiguous(), k, v, lengths, mask) is not plan  # other strides
    assert A.attention_plan(q, k, v, lengths, None) is not plan
    # A cached signature still rejects what it must: errors are raised before anything is cached.
    with pytest.raises(ValueError, match="mask must have shape"):
        attention(q, k, v, lengths, mask[:, :2])
    with pytest.raises(ValueError, match="mask must have shape"):
        attention(q, k, v, lengths, mask[:, :2])


def _prefill_plans(B, group, masked, paged, dtype=torch.float16, D=128, Hkv=2, S=4096, num_sms=132):
    """Plans (as on a 132-SM GPU) for T = 1..512 new tokens, built from meta tensors."""
    from minipass.kernels.attention import attention_plan

    meta = dict(device="meta", dtype=dtype)
    lens = torch.empty(B, device="meta", dtype=torch.int32)
    if paged:
        k = torch.empty(B * S // 16, 16, Hkv, D, **meta)
        table = torch.empty(B, S // 16, device="meta", dtype=torch.int32)
    else:
        k, table = torch.empty(B, Hkv, S, D, **meta), None
    for T in range(1, 513):
        q = torch.empty(B, T, Hkv * group, D, **meta).transpose(1, 2)
        mask = torch.empty(B, T, T, device="meta", dtype=torch.bool) if masked else None
        yield attention_plan(q, k, k, lens, mask, block_table=table, layout="NHD" if paged else "HND",
                             num_sms=num_sms)


def _variants(plans):
    fwd, combine = set(), set()
    for plan in plans:
        fwd.add(plan.specialization())
        if plan.num_splits > 1:
            combine.add(tuple(sorted(plan.combine_constexprs.items())))
    return fwd, combine


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("group", [1, 3, 4, 8])
def test_prefill_lengths_compile_a_handful_of_variants(group, paged):
    # Before bucketing, T = 1..512 gave ~80 distinct specialisations (next_pow2(T), T % 16, splits == 1, ...).
    per_model = set()
    for B in (1, 64):
        fwd_causal, comb_causal = _variants(_prefill_plans(B, group, False, paged))
        fwd_masked, comb_masked = _variants(_prefill_plans(B, group, True, paged))
        assert len(fwd_causal) <= 3  # BLOCK_M in {16, 32, 64}
        assert len(fwd_masked) <= 4  # the same, mask packed in bits (T <= 64), plus gathered (T > 64)
        assert len(comb_causal | comb_masked) <= 1
        per_model |= fwd_causal | fwd_masked
    assert len(per_model) <= 7, sorted(per_model)  # both mask kinds, B = 1 and 64: 3 + 4


def test_specialization_follows_tritons_rule():
    """`AttentionPlan.specialization` models Triton's int specialisation (1 / multiple of 16 / other)."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    def triton_class(v):
        kind, key = native_specialize_impl(BaseBackend, v, False, True, True)[:2]
        return 1 if kind == "constexpr" else 16 if key == "D" else 0

    for value in (1, 2, 15, 16, 17, 32, 48, 4096, 4097, 3 * 2**20):
        assert triton_class(value) == (1 if value == 1 else 16 if value % 16 == 0 else 0)


def test_empty_batch():
    q, k, v, lengths = _make_inputs(1, 2, 2, 3, 16, 64, [0], torch.float32)
    out = attention(q[:0], k[:0], v[:0], lengths[:0])
    assert out.shape == (0, 4, 3, 64)
