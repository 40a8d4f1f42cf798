"""kernels/cpu_bf16: the bf16 product for CPUs with AVX512-BF16, against its torch reference and F.linear; its rows'
bits whatever the number of rows; its packed weights kept only while the weight is unchanged; the attention operator
against softmax attention in float64, and a token's bits whatever the call."""

import pytest
import torch
import torch.nn.functional as F

from minipass.kernels import cpu_bf16
from minipass.kernels.cpu_bf16 import TILE, linear_reference, pack, unpack

needs_kernel = pytest.mark.skipif(not cpu_bf16.available(),
                                  reason=f"the kernel does not run here: {cpu_bf16.why_not()}")


def bf16(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(torch.bfloat16)


@pytest.mark.parametrize("n, k", [(64, 2), (150, 96), (576, 576), (17, 1536)])
def test_pack_unpack_round_trip(n, k):
    w = bf16(n, k)
    packed = pack(w)
    assert packed.shape == (-(-n // TILE), k // 2, TILE, 2)
    assert torch.equal(unpack(packed, n), w)
    assert not unpack(packed, packed.shape[0] * TILE)[n:].any()  # the padding rows are zero


def test_reference_is_a_linear_product():
    x, w = bf16(5, 96, seed=1), bf16(150, 96, seed=2)
    got = linear_reference(x, pack(w), 150).float()
    want = x.float() @ w.float().T
    # one bf16 rounding of an fp32 sum: within half a bf16 step of the exact product, plus the fp32 sum's error
    assert torch.allclose(got, want, rtol=2 ** -8, atol=1e-3)


@needs_kernel
@pytest.mark.parametrize("m, n, k", [(1, 64, 2), (3, 150, 96), (6, 70, 576), (9, 17, 1536), (64, 200, 64)])
def test_kernel_is_its_reference(m, n, k):
    x, w = bf16(m, k, seed=3), bf16(n, k, seed=4, scale=0.05)
    assert torch.equal(cpu_bf16.linear(x, w), linear_reference(x, pack(w), n))


@needs_kernel
def test_a_row_has_the_same_bits_in_any_call():
    x, w = bf16(cpu_bf16.MAX_ROWS, 576, seed=5), bf16(1000, 576, seed=6)
    every = cpu_bf16.linear(x, w)
    for m in range(1, cpu_bf16.MAX_ROWS + 1):
        assert torch.equal(cpu_bf16.linear(x[:m], w), every[:m]), m
    for i in range(0, cpu_bf16.MAX_ROWS, 7):
        assert torch.equal(cpu_bf16.linear(x[i:i + 1], w), every[i:i + 1]), i
    # and as a slice of a 3-D input, with a bias added after the rounding
    b = bf16(1000, seed=7)
    assert torch.equal(cpu_bf16.linear(x.view(2, -1, 576), w, b), (every + b).view(2, -1, 1000))


@needs_kernel
def test_the_packed_weight_follows_the_weight():
    x, w = bf16(2, 64, seed=8), bf16(70, 64, seed=9)
    before = cpu_bf16.linear(x, w)
    assert torch.equal(cpu_bf16.linear(x, w), before)  # from the kept packing
    with torch.no_grad():
        w.mul_(2)  # in place: its version changes
    assert torch.equal(cpu_bf16.linear(x, w), linear_reference(x, pack(w), 70))
    assert not torch.equal(cpu_bf16.linear(x, w), before)


@needs_kernel
def test_a_misfit_packed_weight_is_refused():
    x, w = bf16(2, 64), bf16(70, 64)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.minipass_cpu.linear_bf16(x, pack(w)[:, :16].contiguous(), 70)
    with pytest.raises(RuntimeError, match="does not fit"):
        torch.ops.minipass_cpu.linear_bf16(x, pack(w), 200)


@needs_kernel
def test_compiled_with_frozen_weights_gives_the_eager_bits():
    from minipass.decoding import compile_fn

    linear = torch.nn.Linear(96, 150, bias=True).to(torch.bfloat16)
    x = bf16(3, 96, seed=10)

    def f(x):
        return cpu_bf16.linear(x, linear.weight, linear.bias)

    with torch.no_grad():
        compiled = compile_fn(f, torch.device("cpu"))
        assert torch.equal(compiled(x), f(x))


def test_fits_only_small_bf16_cpu_calls():
    w = bf16(8, 64)
    assert not cpu_bf16.fits(bf16(2, 64).float(), w.float())
    assert not cpu_bf16.fits(bf16(cpu_bf16.MAX_ROWS + 1, 64), w)
    assert not cpu_bf16.fits(bf16(2, 63), bf16(8, 63))
    assert cpu_bf16.fits(bf16(2, 64), w) == cpu_bf16.preferred()


def test_the_kernel_agrees_with_f_linear():
    if not cpu_bf16.available():
        pytest.skip(f"the kernel does not run here: {cpu_bf16.why_not()}")
    x, w = bf16(4, 576, seed=11), bf16(300, 576, seed=12, scale=0.05)
    got, want = cpu_bf16.linear(x, w).float(), F.linear(x, w).float()
    assert torch.allclose(got, want, rtol=2 ** -7, atol=1e-2)


@needs_kernel
def test_stacked_weights_give_each_output_its_own_bits():
    x = bf16(5, 96, seed=19)
    ws = [bf16(150, 96, seed=20), bf16(40, 96, seed=21), bf16(40, 96, seed=22)]
    bs = [None, bf16(40, seed=23), None]
    got = cpu_bf16.linears(x, ws, bs)
    for y, w, b in zip(got, ws, bs):
        assert torch.equal(y, cpu_bf16.linear(x, w, b))
    with torch.no_grad():
        ws[2].add_(1)  # the last weight changes: the stacked packing is made again
    assert torch.equal(cpu_bf16.linears(x, ws, bs)[2], cpu_bf16.linear(x, ws[2]))


def decoding_call(B, T, Hq, H, S, D, seed):
    """q, k, v and a split of each token's slots (cut, keys) as a decoding call's layout makes them: keys past the cut,
    some of them none (-1)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = bf16(B, T, Hq, D, seed=seed), bf16(B, H, S, D, seed=seed + 1), bf16(B, H, S, D, seed=seed + 2)
    cut = torch.randint(0, S - 8, (B, T), generator=g)
    keys = cut[:, :, None] + torch.randint(0, 8, (B, T, 6), generator=g)
    keys = torch.where(torch.rand(B, T, 6, generator=g) < 0.3, -1, keys)
    return q, k, v, cut, keys


@needs_kernel
@pytest.mark.parametrize("B, T, Hq, H, S, D", [(1, 1, 9, 3, 40, 64), (2, 5, 4, 4, 70, 32), (1, 3, 6, 2, 33, 128)])
def test_attend_is_softmax_attention_over_each_tokens_slots(B, T, Hq, H, S, D):
    q, k, v, cut, keys = decoding_call(B, T, Hq, H, S, D, seed=40)
    got = cpu_bf16.attend(q, k, v, cut, keys, D ** -0.5)
    want = cpu_bf16.attend_reference(q, k, v, cut, keys, D ** -0.5)
    assert got.shape == q.shape and got.dtype == torch.bfloat16
    assert torch.allclose(got.double(), want, rtol=2 ** -7, atol=2 ** -9)  # one bf16 rounding, and the fp32 exp
    # the same slots in another order of the keys: the same attention (within rounding), so order is all keys carry
    swapped = keys.flip(-1)
    assert torch.allclose(cpu_bf16.attend(q, k, v, cut, swapped, D ** -0.5).double(), want, rtol=2 ** -7, atol=2 ** -9)


@needs_kernel
def test_attend_gives_a_token_the_same_bits_in_any_call():
    # A token's output depends on its own row, slots and keys: alone, among other tokens, on one thread or two.
    q, k, v, cut, keys = decoding_call(2, 12, 9, 3, 300, 64, seed=50)
    together = cpu_bf16.attend(q, k, v, cut, keys, 0.125)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_bf16.attend(q, k, v, cut, keys, 0.125), together)
    finally:
        torch.set_num_threads(threads)
    for b in range(2):
        for t in range(12):
            alone = cpu_bf16.attend(q[b:b + 1, t:t + 1], k[b:b + 1], v[b:b + 1], cut[b:b + 1, t:t + 1],
                                    keys[b:b + 1, t:t + 1], 0.125)
            assert torch.equal(alone, together[b:b + 1, t:t + 1]), (b, t)
    # a token without any slot gets zeros, not NaN
    none = cpu_bf16.attend(q[:1, :1], k[:1], v[:1], torch.zeros(1, 1, dtype=torch.long),
                           torch.full((1, 1, 4), -1), 0.125)
    assert torch.equal(none, torch.zeros_like(none))


@needs_kernel
def test_attend_refuses_what_it_cannot_read():
    q, k, v, cut, keys = decoding_call(1, 2, 6, 3, 20, 64, seed=60)
    with pytest.raises(RuntimeError, match="cut 21 is outside the cache's 0 .. 20 slots"):
        cpu_bf16.attend(q, k, v, torch.full((1, 2), 21), keys, 1.0)
    with pytest.raises(RuntimeError, match="key slot 20 is past the cache's 20 slots"):
        cpu_bf16.attend(q, k, v, cut, torch.full((1, 2, 3), 20), 1.0)
    with pytest.raises(RuntimeError, match="must be int64 CPU tensors"):
        cpu_bf16.attend(q, k, v, cut[:, :1], keys, 1.0)
    q48, k48 = bf16(1, 2, 6, 48), bf16(1, 3, 20, 48)
    assert not cpu_bf16.attention_fits(q48.transpose(1, 2), k48)  # the model keeps such heads on torch's attention
    with pytest.raises(RuntimeError, match="Hq a multiple of H_kv, D a multiple of 32"):
        cpu_bf16.attend(q48, k48, k48, cut, keys, 1.0)


def swiglu_mlp(scale=1.0, seed=70, H=64):
    return (bf16(5, 96, seed=seed, scale=scale), bf16(H, 96, seed=seed + 1, scale=0.3), bf16(H, 96, seed=seed + 2, scale=0.3),
            bf16(40, H, seed=seed + 3, scale=0.3))


@needs_kernel
@pytest.mark.parametrize("scale", [1.0, 30.0])  # 30: gate values far out on both sides, where silu is 0 or g
def test_mlp_is_the_products_with_swiglu_between(scale):
    x, gate, up, down = swiglu_mlp(scale)
    got = cpu_bf16.mlp(x, gate, up, down)
    g, u = cpu_bf16.linears(x, [gate, up], [None, None])
    h = (F.silu(g.float()).to(torch.bfloat16).float() * u.float()).to(torch.bfloat16)  # rounded where eager rounds
    want = cpu_bf16.linear(h, down)
    assert got.shape == (5, 40) and got.dtype == torch.bfloat16
    assert torch.isfinite(got).all()
    assert torch.allclose(got.float(), want.float(), rtol=2 ** -6, atol=1e-2 * scale)
    assert (got == want).float().mean() > 0.9  # the kernel's exp moves an odd silu by an ulp, no more


@needs_kernel
def test_mlp_gives_a_row_the_same_bits_in_any_call():
    x, gate, up, down = swiglu_mlp()
    together = cpu_bf16.mlp(x, gate, up, down)
    for r in range(5):
        assert torch.equal(cpu_bf16.mlp(x[r:r + 1], gate, up, down), together[r:r + 1])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(cpu_bf16.mlp(x, gate, up, down), together)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
def test_mlp_takes_only_what_it_can_run():
    x, gate, up, down = swiglu_mlp(H=48)
    lin = lambda w, bias=False: torch.nn.Linear(  # noqa: E731
        w.shape[1], w.shape[0], bias=bias, dtype=torch.bfloat16).requires_grad_(False)
    assert not cpu_bf16.mlp_fits(x, lin(gate), lin(up), lin(down))  # hidden size 48: not a multiple of 32
    x, gate, up, down = swiglu_mlp()
    assert cpu_bf16.mlp_fits(x, lin(gate), lin(up), lin(down))
    assert not cpu_bf16.mlp_fits(x, lin(gate), lin(up), lin(down, bias=True))
    with pytest.raises(RuntimeError, match=r"mlp_bf16 \(down\): packed weight of shape"):
        torch.ops.minipass_cpu.mlp_bf16(x, pack(torch.cat([gate, up])), pack(down), 64, 80)


def stable_topk(x, k):
    ref = torch.sort(x, dim=-1, descending=True, stable=True)
    return ref.values[..., :k], ref.indices[..., :k]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, k", [((1, 49152), 8), ((2, 3, 1000), 10), ((5, 17), 17), ((1, 40), 1)])
def test_topk_is_the_first_k_of_a_stable_descending_sort(dtype, shape, k):
    """Values and indices as torch.sort(descending=True, stable=True) gives them first: equal values (bf16 has many)
    in order of index, and the k-th place to the lowest index among equal values; row lengths off the 16-lane
    blocks; the leading dims kept. The values are torch.topk's."""
    x = torch.randn(*shape).to(dtype)
    values, indices = cpu_bf16.topk(x, k)
    ref_values, ref_indices = stable_topk(x, k)
    assert values.dtype == dtype and indices.dtype == torch.long and values.shape == (*shape[:-1], k)
    assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices)
    assert torch.equal(values, x.topk(k, dim=-1).values)


@needs_kernel
def test_topk_rows_with_ties_and_masked_values():
    """Rows of few distinct values (ties everywhere, at the k-th place too), rows masked to -inf but for a few values
    (top-k sampling's output: fewer finite values than k), an ascending row (every value enters the list)."""
    g = torch.Generator().manual_seed(1)
    ties = torch.randint(0, 4, (3, 300), generator=g).float()
    masked = torch.full((2, 100), float("-inf"))
    masked[0, [7, 50, 3]] = torch.tensor([1.0, 2.0, 1.0])
    masked[1, 99] = 0.5
    ascending = torch.arange(500, dtype=torch.float32)[None]
    for x, k in [(ties, 8), (ties.bfloat16(), 40), (masked, 5), (ascending, 7)]:
        values, indices = cpu_bf16.topk(x, k)
        ref_values, ref_indices = stable_topk(x, k)
        assert torch.equal(values, ref_values) and torch.equal(indices, ref_indices), x


@needs_kernel
def test_topk_skips_nan_and_refuses_what_it_cannot_read():
    x = torch.tensor([[1.0, float("nan"), 3.0, 2.0]])
    values, indices = cpu_bf16.topk(x, 2)
    assert values.tolist() == [[3.0, 2.0]] and indices.tolist() == [[2, 3]]
    values, indices = cpu_bf16.topk(x, 4)  # only 3 values that are not NaN: the 4th place is NaN, index 0
    assert values[0, :3].tolist() == [3.0, 2.0, 1.0] and values[0, 3].isnan() and indices[0, 3] == 0
    for bad, k, what in [(x, 5, "at least k values"), (x, 0, "k = 0"), (x.long(), 1, "fp32 or bf16")]:
        with pytest.raises(RuntimeError, match=what):
            cpu_bf16.ops().topk_rows(bad, k)
    assert not cpu_bf16.topk_fits(x.double(), 1) and not cpu_bf16.topk_fits(x, 5) and cpu_bf16.topk_fits(x, 4)


def two_reductions(x):
    """sampling.argmax's torch path: the max, then the least index equal to it (V - 1 where none is: a NaN row)."""
    top = x.amax(-1)
    ids = torch.arange(x.shape[-1], dtype=torch.int32)
    return top, torch.where(x == top[..., None], ids, x.shape[-1] - 1).amin(-1).long()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_is_the_two_reductions(dtype):
    """The max and its first index as the two reductions give them: ties within a lane and across lanes and blocks,
    rows off the 16-lane blocks, all -inf, +inf, NaN (NaN, the last index), one value; a slice of rows as the tree
    verifies them (the rows of a wider call's logits), the leading dims kept."""
    g = torch.Generator().manual_seed(3)
    rows = [torch.randn(49152, generator=g), torch.randint(0, 3, (300,), generator=g).float(),
            torch.randint(0, 2, (37,), generator=g).float(), torch.full((21,), float("-inf")),
            torch.tensor([1.0, float("inf"), 2.0, float("inf")]), torch.tensor([1.0, float("nan"), 5.0]),
            torch.tensor([float("nan")]), torch.tensor([-3.0])]
    ascending = torch.arange(100, dtype=torch.float32)
    rows += [ascending, ascending.flip(0), torch.cat([torch.zeros(16), torch.ones(1), torch.zeros(15), torch.ones(1)])]
    for row in rows:
        x = row.to(dtype)[None]
        top, index = cpu_bf16.argmax(x)
        want_top, want_index = two_reductions(x)
        assert top.dtype == dtype and index.dtype == torch.long
        assert torch.equal(index, want_index), row
        assert torch.equal(top, want_top) or (top.isnan().all() and want_top.isnan().all()), row
    logits = torch.randn(2, 8, 1000, generator=g).to(dtype)
    logits[0, 1, 500] = logits[0, 1, 900] = 99.0  # a tie at the max, in different blocks
    for x in (logits, logits[:1, :5], logits[:, 2:7]):
        top, index = cpu_bf16.argmax(x)
        want_top, want_index = two_reductions(x)
        assert top.shape == x.shape[:-1] and torch.equal(top, want_top) and torch.equal(index, want_index)
    with pytest.raises(RuntimeError, match="fp32 or bf16"):
        cpu_bf16.ops().argmax_rows(logits[0].double())


def test_no_kernel_where_a_gradient_is_wanted(monkeypatch):
    """The operators have no backward: a product, MLP, attention or top-k whose input carries a gradient stays on
    torch's operations (training), and the same call without autograd takes the kernel (decoding)."""
    monkeypatch.setattr(cpu_bf16, "preferred", lambda: True)
    monkeypatch.setattr(cpu_bf16, "available", lambda: True)
    x, w = bf16(4, 64), bf16(96, 64, seed=1)
    q, k = bf16(1, 4, 2, 32), bf16(1, 2, 16, 32)
    gate, up, down = (torch.nn.Linear(64, 96, bias=False).to(torch.bfloat16).requires_grad_(False) for _ in range(3))
    down = torch.nn.Linear(96, 64, bias=False).to(torch.bfloat16).requires_grad_(False)
    checks = lambda a, b: (cpu_bf16.fits(a, w), cpu_bf16.mlp_fits(a, gate, up, down),  # noqa: E731
                           cpu_bf16.attention_fits(b, k), cpu_bf16.topk_fits(a.float(), 3))
    assert checks(x, q) == (True,) * 4
    xg, qg = x.clone().requires_grad_(), q.clone().requires_grad_()
    assert checks(xg, qg) == (False,) * 4
    with torch.no_grad():
        assert checks(xg, qg) == (True,) * 4
    up.requires_grad_(True)  # a weight that trains
    assert not cpu_bf16.mlp_fits(x, gate, up, down)
