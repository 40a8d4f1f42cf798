"""kernels/cpu_bf16: the bf16 product for CPUs with AVX512-BF16, against its torch reference and F.linear; its rows'
bits whatever the number of rows; its packed weights kept only while the weight is unchanged."""

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
@pytest.mark.parametrize("m, n, k", [(1, 64, 2), (3, 150, 96), (9, 17, 1536), (64, 200, 64)])
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
@pytest.mark.parametrize("R, S, D", [(1, 1, 32), (9, 40, 64), (4, 33, 128)])
def test_attention_products_are_their_references(R, S, D):
    q, k, v = bf16(2, 3, R, D, seed=13), bf16(2, 3, S + 5, D, seed=14), bf16(2, 3, S + 5, D, seed=15)
    k, v = k[:, :, :S], v[:, :, :S]  # a slice of a longer cache, as the model reads it
    scores = cpu_bf16.scores(q, k)
    assert torch.equal(scores, cpu_bf16.scores_reference(q, k))
    assert torch.allclose(scores, q.float() @ k.float().transpose(-1, -2), rtol=1e-5, atol=1e-4)
    p = torch.softmax(scores, dim=-1)
    mixed = cpu_bf16.mix(p, v)
    assert torch.equal(mixed, cpu_bf16.mix_reference(p, v))
    assert torch.allclose(mixed, p @ v.float(), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_attention_rows_have_the_same_bits_in_any_call():
    q, k, v = bf16(1, 3, 12, 64, seed=16), bf16(1, 3, 70, 64, seed=17), bf16(1, 3, 70, 64, seed=18)
    scores = cpu_bf16.scores(q, k)
    p = torch.softmax(scores, dim=-1)
    mixed = cpu_bf16.mix(p, v)
    for r in range(12):
        assert torch.equal(cpu_bf16.scores(q[:, :, r:r + 1], k), scores[:, :, r:r + 1])
        assert torch.equal(cpu_bf16.mix(p[:, :, r:r + 1], v), mixed[:, :, r:r + 1])


@needs_kernel
def test_attention_products_stop_at_each_rows_span():
    # Batch row b reads slots 0 .. n[b] - 1 only: its scores there have the bits of the whole cache's, 0 after; the
    # mix leaves out whatever p holds from n[b] on (garbage here, which the full mix would add).
    q, k, v = bf16(3, 3, 5, 64, seed=31), bf16(3, 3, 50, 64, seed=32), bf16(3, 3, 50, 64, seed=33)
    n = torch.tensor([17, 0, 50])
    full, part = cpu_bf16.scores(q, k), cpu_bf16.scores(q, k, n)
    assert torch.equal(part, cpu_bf16.scores_reference(q, k, n))
    inside = (torch.arange(50) < n[:, None])[:, None, None]  # (B, 1, 1, S)
    assert torch.equal(part, torch.where(inside, full, 0.0))
    p = torch.softmax(full, dim=-1)
    mixed = cpu_bf16.mix(p, v, n)
    assert torch.equal(mixed, cpu_bf16.mix_reference(p, v, n))
    assert torch.equal(mixed, cpu_bf16.mix(torch.where(inside, p, 0.0), v))
    assert not torch.equal(mixed[0], cpu_bf16.mix(p, v)[0])  # row 0's p past its span was not read
    with pytest.raises(RuntimeError, match="int64 CPU tensor of slots per batch row"):
        cpu_bf16.scores(q, k, n[:2])


@needs_kernel
def test_attention_products_refuse_what_they_cannot_read():
    q, k = bf16(1, 3, 2, 48), bf16(1, 3, 8, 48)
    assert not cpu_bf16.attention_fits(q, k)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        cpu_bf16.scores(q, k)
    with pytest.raises(RuntimeError, match="must be fp32"):
        cpu_bf16.mix(bf16(1, 3, 2, 8), bf16(1, 3, 8, 64))


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
