"""kernels/attention.py over paged caches and both layouts, and kernels/kv_cache.py (the K/V writer).

Under the interpreter (fp32) the paged and the token-major kernels run the same arithmetic as the contiguous
head-major one, in the same order: their outputs must be bit-identical, not merely close.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest

from minipass.kernels.attention import attention, attention_ref, gather_cache
from minipass.kernels.conformance import attention_inputs, paginate, to_form
from minipass.kernels.kv_cache import reshape_and_cache, reshape_and_cache_ref, slot_mapping_for
from tests.test_attention_kernel import _assert_each_query_is_plain_attention, _tree_mask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

SHAPES = [  # (B, Hkv, G, T, D, lengths): ragged, 0, inside a page; odd D; T past the 64-token mask word
    (3, 2, 3, 5, 40, [0, 17, 70]),
    (2, 1, 4, 1, 64, [33, 0]),
    (2, 2, 1, 25, 64, [3, 50]),
    (1, 1, 2, 70, 32, [20]),
]
FORMS = {"NHD": ("NHD", None), "NHD paged 16": ("NHD", 16), "HND paged 32": ("HND", 32), "NHD paged 64": ("NHD", 64)}


def _form(k, v, lengths, T, layout, page_size, seed=0):
    if page_size is None:
        assert layout == "NHD"
        return k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous(), dict(layout="NHD")
    kp, table = paginate(k, lengths, T, page_size, layout, seed=seed)
    vp, _ = paginate(v, lengths, T, page_size, layout, seed=seed)
    return kp, vp, dict(layout=layout, block_table=table)


@pytest.mark.parametrize("num_splits", [None, 3])
@pytest.mark.parametrize("mask_kind", ["causal", "shared", "per_row"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"T{s[3]}-G{s[2]}-D{s[4]}")
def test_every_cache_form_is_bit_identical_to_the_contiguous_cache(shape, mask_kind, num_splits):
    B, Hkv, G, T, D, lengths = shape
    q, k, v, lens, mask = attention_inputs(B, Hkv, G, T, D, lengths, mask_kind, torch.float32, DEVICE, seed=T)
    expected = attention(q, k, v, lens, mask, num_splits=num_splits)
    assert not expected.isnan().any()
    for name, (layout, page_size) in FORMS.items():
        kf, vf, kwargs = _form(k, v, lengths, T, layout, page_size, seed=T + D)
        out = attention(q, kf, vf, lens, mask, num_splits=num_splits, **kwargs)
        assert torch.equal(out, expected), name
        torch.testing.assert_close(attention_ref(q, kf, vf, lens, mask, **kwargs), attention_ref(q, k, v, lens, mask),
                                   atol=0, rtol=0, equal_nan=True)


def test_paged_float16_matches_contiguous():
    B, Hkv, G, T, D, lengths = SHAPES[0]
    q, k, v, lens, mask = attention_inputs(B, Hkv, G, T, D, lengths, "per_row", torch.float16, DEVICE, seed=1)
    expected = attention(q, k, v, lens, mask)
    kf, vf, kwargs = _form(k, v, lengths, T, "HND", 16)
    assert torch.equal(attention(q, kf, vf, lens, mask, **kwargs), expected)


@pytest.mark.parametrize("layout, page_size", [("NHD", 16), ("HND", 32)])
def test_tree_query_is_causal_attention_over_its_ancestors_on_a_paged_cache(layout, page_size):
    B, Hkv, G, D = 2, 1, 3, 64
    trees = [[-1, 0, 0, 1, 1, 2, 3, 3, 5, 0, 9], [-1, 0, 1, 2, 0, 4, 0, 6, 7, 7, 1]]
    T = len(trees[0])
    mask = torch.stack([_tree_mask(p) for p in trees]).to(DEVICE)  # (B, T, T): a different tree per row
    lengths = [5, 70]  # row 0 ends inside its first page, row 1 in its third or fifth
    q, k, v, lens, _ = attention_inputs(B, Hkv, G, T, D, lengths, "causal", torch.float32, DEVICE, seed=4)
    kp, vp, kwargs = _form(k, v, lengths, T, layout, page_size, seed=9)
    out = attention(q, kp, vp, lens, mask, **kwargs)
    _assert_each_query_is_plain_attention(q, k, v, lens, mask, out)


def test_block_table_entries_past_the_used_pages_are_ignored():
    B, Hkv, G, T, D, lengths = SHAPES[2]
    q, k, v, lens, mask = attention_inputs(B, Hkv, G, T, D, lengths, "causal", torch.float32, DEVICE)
    kp, vp, kwargs = _form(k, v, lengths, T, "NHD", 16)
    table = kwargs["block_table"]
    used = (table >= 0).sum(1)
    garbage = table.clone()
    for b in range(B):
        garbage[b, used[b]:] = 10**6  # out of the pool: would fault if read unclamped, fail check_values if used
    kwargs["block_table"] = garbage
    assert torch.equal(attention(q, kp, vp, lens, mask, **kwargs), attention(q, k, v, lens, mask))


def test_paged_call_of_the_readme():
    """The worked example of README "Porting the kernels": a vLLM-style pool, block table and slot mapping."""
    B, Hq, Hkv, D, page_size, num_pages = 2, 4, 2, 64, 16, 64
    g = torch.Generator().manual_seed(0)
    k_pages = torch.zeros(num_pages, page_size, Hkv, D, device=DEVICE)  # (num_pages, page_size, Hkv, D)
    v_pages = torch.zeros_like(k_pages)
    block_table = torch.randperm(num_pages, generator=g)[:B * 8].view(B, 8).int().to(DEVICE)  # 8 pages a row
    cache_seqlens = torch.tensor([37, 90], dtype=torch.int32, device=DEVICE)  # tokens already cached per row
    T = 3
    k_new = torch.randn(B, T, Hkv, D, generator=g).to(DEVICE)
    v_new = torch.randn(B, T, Hkv, D, generator=g).to(DEVICE)
    q = torch.randn(B, T, Hq, D, generator=g).to(DEVICE).transpose(1, 2)
    slots = slot_mapping_for(block_table, cache_seqlens, T, page_size)  # (B * T,)
    reshape_and_cache(k_new.flatten(0, 1), v_new.flatten(0, 1), k_pages, v_pages, slots, layout="NHD")
    out = attention(q, k_pages, v_pages, cache_seqlens, None, block_table=block_table, layout="NHD")
    # The same tokens in a contiguous (B, Hkv, S, D) cache.
    k_rows = gather_cache(k_pages, block_table, "NHD")
    for b in range(B):
        L = int(cache_seqlens[b])
        torch.testing.assert_close(k_rows[b, :, L:L + T], k_new[b].transpose(0, 1), atol=0, rtol=0)
    v_rows = gather_cache(v_pages, block_table, "NHD")
    torch.testing.assert_close(out, attention(q, k_rows.contiguous(), v_rows.contiguous(), cache_seqlens), atol=0,
                               rtol=0)


def _paged_args():
    B, Hkv, G, T, D, lengths = 2, 2, 2, 3, 64, [0, 5]
    q, k, v, lens, mask = attention_inputs(B, Hkv, G, T, D, lengths, "shared", torch.float32, DEVICE, S=32)
    kp, vp, kwargs = _form(k, v, lengths, T, "NHD", 16)
    return dict(q=q, k_cache=kp, v_cache=vp, cache_seqlens=lens, mask=mask, **kwargs)


@pytest.mark.parametrize("change, error, message", [
    (lambda a: dict(layout="BHSD"), ValueError, r"layout must be 'HND' or 'NHD', got 'BHSD'"),
    (lambda a: dict(block_table=a["block_table"][:1]), ValueError, r"block_table must have shape \(B=2, max_pages\)"),
    (lambda a: dict(block_table=a["block_table"].float()), TypeError, r"block_table must be int32 or int64"),
    (lambda a: dict(block_table=a["block_table"].tolist()), TypeError, r"block_table must be None or a torch.Tensor"),
    (lambda a: dict(block_table=a["block_table"].to("meta")), ValueError, r"block_table must be on q's device"),
    (lambda a: dict(k_cache=a["k_cache"][..., :32], v_cache=a["v_cache"][..., :32]), ValueError,
     r"k_cache must have shape \(num_pages, page_size, Hkv, D=64\) \(NHD, paged\)"),
    (lambda a: dict(layout="HND"), ValueError, r"query heads Hq=4 must be a multiple of the KV heads Hkv=16"),
    (lambda a: dict(cache_seqlens=torch.tensor([0, 30], dtype=torch.int32, device=DEVICE)), ValueError,
     r"cache_seqlens\[1\] \+ T = 30 \+ 3 = 33 exceeds the cache length S = 32"),
    (lambda a: dict(block_table=torch.tensor([[0, 1], [9, 2]], dtype=torch.int32, device=DEVICE)), ValueError,
     r"block_table\[1\] holds page 9 among the 1 pages that row 1 uses; page ids must be in 0..4"),
    (lambda a: dict(num_splits=0), ValueError, r"num_splits must be None or an int in 1..64, got 0"),
])
def test_paged_input_errors(change, error, message):
    args = _paged_args()
    args.update(change(args))
    with pytest.raises(error, match=message):
        attention(**args)


def test_contiguous_token_major_shape_error():
    q, k, v, lens, mask = attention_inputs(2, 2, 2, 3, 64, [0, 5], "causal", torch.float32, DEVICE, S=32)
    with pytest.raises(ValueError, match=r"k_cache must have shape \(B=2, S, Hkv, D=64\) \(NHD\)"):
        attention(q, k[:1].transpose(1, 2), v[:1].transpose(1, 2), lens, mask, layout="NHD")


def test_paged_attention_compiles_with_fullgraph():
    args = _paged_args()

    def step(q, k, v, lens, mask, table):
        return attention(q, k, v, lens, mask, check_values=False, block_table=table, layout="NHD") * 2

    inputs = [args[n] for n in ("q", "k_cache", "v_cache", "cache_seqlens", "mask", "block_table")]
    torch._dynamo.reset()
    assert torch.equal(torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs), step(*inputs))


# ----------------------------------------------------------------------------------------------------------------------
# The K/V writer
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("key_dtype, cache_dtype", [(torch.float32, torch.float32), (torch.float32, torch.float16),
                                                    (torch.float16, torch.float16)])
def test_writer_matches_reference(layout, key_dtype, cache_dtype):
    g = torch.Generator().manual_seed(3)
    N, H, D, P, num_pages = 11, 3, 40, 16, 3
    buf = torch.randn(N, H, 2 * D, generator=g).to(DEVICE, key_dtype)
    key, value = buf[..., :D], buf[..., D:]
    slots = torch.randperm(num_pages * P, generator=g)[:N]
    slots[[2, 7]] = -1  # padding tokens: not written
    slots = slots.to(DEVICE)
    shape = (num_pages, P, H, D) if layout == "NHD" else (num_pages, H, P, D)
    k0, v0 = torch.randn(shape, generator=g).to(DEVICE, cache_dtype), torch.randn(shape, generator=g).to(DEVICE,
                                                                                                      cache_dtype)
    k_ref, v_ref, k_out, v_out = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    reshape_and_cache_ref(key, value, k_ref, v_ref, slots, layout)
    reshape_and_cache(key, value, k_out, v_out, slots, layout)
    assert torch.equal(k_out, k_ref) and torch.equal(v_out, v_ref)
    assert not torch.equal(k_out, k0)
    written = (k_out != k0).flatten(0, 1 if layout == "NHD" else 0)
    assert written.any()


def test_writer_on_the_models_contiguous_cache():
    """The model's (B, Hkv, S, D) cache is layout HND with one page per row: slot = b * S + s."""
    from minipass.model import KVCache, cache_index

    g = torch.Generator().manual_seed(5)
    B, H, S, D, T = 2, 2, 24, 16, 4
    k_cache = torch.randn(B, H, S, D, generator=g).to(DEVICE)
    v_cache = torch.randn(B, H, S, D, generator=g).to(DEVICE)
    k_new = torch.randn(B, T, H, D, generator=g).to(DEVICE)
    v_new = torch.randn(B, T, H, D, generator=g).to(DEVICE)
    lens = torch.tensor([3, 17], device=DEVICE)
    cache = KVCache.zeros(B, H, S, D, device=DEVICE)
    cache.k.copy_(k_cache), cache.v.copy_(v_cache)
    cache.write(k_new, v_new, cache.rows(cache_index(lens, T, H, S)))
    model_k, model_v = cache.k, cache.v
    table = torch.arange(B, device=DEVICE)[:, None]
    slots = slot_mapping_for(table, lens, T, S)
    reshape_and_cache(k_new.flatten(0, 1), v_new.flatten(0, 1), k_cache, v_cache, slots, layout="HND")
    assert torch.equal(k_cache, model_k) and torch.equal(v_cache, model_v)


def test_slot_mapping_marks_positions_past_the_table():
    table = torch.tensor([[4, 1], [0, 3]], device=DEVICE)
    slots = slot_mapping_for(table, torch.tensor([6, 14], device=DEVICE), 3, 8)
    assert slots.tolist() == [4 * 8 + 6, 4 * 8 + 7, 1 * 8 + 0, 3 * 8 + 6, 3 * 8 + 7, -1]


def _writer_args():
    key = torch.randn(4, 2, 16, device=DEVICE)
    cache = torch.zeros(3, 8, 2, 16, device=DEVICE)
    return dict(key=key, value=key.clone(), k_cache=cache, v_cache=cache.clone(),
                slot_mapping=torch.tensor([0, 9, -1, 23], device=DEVICE))


@pytest.mark.parametrize("change, error, message", [
    (lambda a: dict(key=a["key"][0]), ValueError, r"key must have shape \(N, Hkv, D\), got \(2, 16\)"),
    (lambda a: dict(value=a["value"][:3]), ValueError, r"value must have the shape of key"),
    (lambda a: dict(k_cache=a["k_cache"][..., :8], v_cache=a["v_cache"][..., :8]), ValueError,
     r"k_cache must have shape \(num_pages, page_size, Hkv, D\) with Hkv=2, D=16 \(NHD\)"),
    (lambda a: dict(layout="HND"), ValueError, r"k_cache must have shape \(num_pages, Hkv, page_size, D\)"),
    (lambda a: dict(slot_mapping=a["slot_mapping"][:2]), ValueError, r"slot_mapping must have shape \(4,\)"),
    (lambda a: dict(slot_mapping=a["slot_mapping"].float()), TypeError, r"slot_mapping must be int32 or int64"),
    (lambda a: dict(key=a["key"].int()), TypeError, r"key must be float16, bfloat16 or float32, got torch.int32"),
    (lambda a: dict(slot_mapping=torch.tensor([0, 9, -1, 24], device=DEVICE)), ValueError,
     r"slot_mapping holds slot 24; slots must be < num_pages \* page_size = 24"),
    (lambda a: dict(slot_mapping=torch.tensor([0, 9, 9, 1], device=DEVICE)), ValueError,
     r"slot_mapping holds a slot twice"),
    (lambda a: dict(k_cache=torch.zeros(3, 8, 16, 2, device=DEVICE).transpose(2, 3)), ValueError,
     r"k_cache must be contiguous in its last dim"),
])
def test_writer_input_errors(change, error, message):
    args = _writer_args()
    args.update(change(args))
    with pytest.raises(error, match=message):
        reshape_and_cache(**args)


def test_writer_skips_out_of_range_slots_without_checks():
    args = _writer_args()
    args["slot_mapping"] = torch.tensor([0, 9, 10**6, 23], device=DEVICE)
    reshape_and_cache(**args, check_values=False)
    k = args["k_cache"]
    assert torch.equal(k[0, 0], args["key"][0]) and torch.equal(k[2, 7], args["key"][3])
    assert (k != 0).flatten(0, 1).any(-1).any(-1).sum() == 3


def test_writer_compiles_with_fullgraph():
    args = _writer_args()

    def step(key, value, k_cache, v_cache, slot_mapping):
        reshape_and_cache(key * 2, value, k_cache, v_cache, slot_mapping, check_values=False)
        return k_cache.sum()

    eager = {n: t.clone() for n, t in args.items()}
    compiled = {n: t.clone() for n, t in args.items()}
    torch._dynamo.reset()
    total = torch.compile(step, fullgraph=True, backend="aot_eager")(**compiled)
    assert torch.equal(total, step(**eager))
    assert torch.equal(compiled["k_cache"], eager["k_cache"]) and torch.equal(compiled["v_cache"], eager["v_cache"])
