"""The sampling transform (temperature, top-k, top-p), inverse-CDF sampling, and counter-based random numbers.

Randomness is an input. Every random number is a pure function of (row seed, position, stream), computed with an
integer hash on whatever device the tensors live on: no generator state, no host sync, and a row draws the same
numbers whichever rows share its batch. Decoders name the token position a number decides and the purpose
(stream), so a given decision always sees the same uniform.
"""

from __future__ import annotations

import torch
from torch import Tensor

from minipass.errors import MinipassError
from minipass.kernels import cpu_bf16

# Streams: one per purpose, so the uniforms of different decisions about the same position are independent.
SAMPLE, DRAFT, ACCEPT, RESIDUAL = 0, 1, 2, 3

_MASK32 = 0xFFFFFFFF


def _hash32(x: Tensor) -> Tensor:
    # A 32-bit integer finaliser (Wellons' "lowbias32" constants). Both multipliers are below 2**31, so every product
    # of a 32-bit value fits in int64: no reliance on overflow behaviour, identical results on CPU and CUDA.
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _MASK32
    return x ^ (x >> 15)


def uniforms(seeds: Tensor, positions: Tensor, stream: int) -> Tensor:
    """Uniform floats in [0, 1), float32, shaped like `positions`.

    seeds: (B,) int64 per-row seeds. positions: (B, ...) int64 counters (token positions). stream: a small int.
    """
    seeds = seeds.reshape(seeds.shape + (1,) * (positions.dim() - 1)).long()
    x = _hash32(seeds ^ 0x5BD1E995)
    x = _hash32(x ^ (seeds >> 32))
    x = _hash32(x ^ positions.long())
    x = _hash32(x ^ (positions.long() >> 32) ^ (stream * 0x9E3779B1 & _MASK32))
    return (x >> 8).float() * (1.0 / (1 << 24))  # 24 bits: exactly representable in fp32


def check_sampling_args(temperature: float, top_k: int, top_p: float) -> None:
    if not temperature >= 0:
        raise MinipassError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not (isinstance(top_k, int) and top_k >= 0):
        raise MinipassError(f"top_k must be an integer >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise MinipassError(f"top_p must be in (0, 1] (1 = off), got {top_p}")


def argmax(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(max, index of its first occurrence) over the last dim, as `logits.max(-1)` gives them.

    Written as two plain reductions, a max and then the least index equal to it (an int32 min), because those
    vectorise: a compiled max-with-index tracks an int64 index per lane and is 2-2.7x slower on a CPU (measured on
    (64, 17, 256) fp32 and (1, 17, 49152) bf16 logits). A row with a NaN has no index equal to its max (NaN); it
    gets V - 1 (the callers flag such rows as not finite from the max). On a CPU with AVX512, minipass's kernel
    gives the same in one pass (kernels/cpu_bf16.argmax: ~4x faster on a tree's 8 rows of 49152 logits).
    """
    if cpu_bf16.topk_fits(logits, 1):
        return cpu_bf16.argmax(logits)
    top = logits.amax(-1)
    V = logits.shape[-1]
    ids = torch.arange(V, dtype=torch.int32, device=logits.device)
    index = torch.where(logits == top[..., None], ids, V - 1).amin(-1)
    return top, index.long()


def topk(x: Tensor, k: int) -> tuple:
    """(values, indices) of the k largest entries along the last dim, descending. On a CPU with AVX512, minipass's
    kernel (kernels/cpu_bf16.topk: one pass over the row, ~25x faster than torch.topk at 8 of 49152 logits), which
    orders equal values by index; elsewhere torch.topk. Callers depend on neither tie order."""
    if cpu_bf16.topk_fits(x, k):
        return cpu_bf16.topk(x, k)
    top = x.topk(k, dim=-1)
    return top.values, top.indices


def logits_to_probs(logits: Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """The target distribution p over the last dim, float32, after temperature, then top-k, then top-p.

    temperature 0 is greedy: one-hot on the argmax (lowest index on ties).
    top-k keeps every token whose logit is >= the k-th largest (ties at the boundary all kept).
    top-p keeps every token whose probability is >= t, where t is the probability of the last token, in descending
    order, whose exclusive cumulative probability is < top_p: the set does not depend on how ties are sorted.
    """
    logits = logits.float()
    if temperature == 0:
        return torch.zeros_like(logits).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    logits = logits / temperature
    if 0 < top_k < logits.shape[-1]:
        kth = topk(logits, top_k)[0][..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs = probs.sort(dim=-1, descending=True).values
        exclusive = sorted_probs.cumsum(-1) - sorted_probs
        # The last rank whose exclusive cumulative mass is below top_p; rank 0 always qualifies.
        last = (exclusive < top_p).sum(-1, keepdim=True) - 1
        threshold = sorted_probs.gather(-1, last)
        probs = probs.masked_fill(probs < threshold, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling: the smallest index i with cumsum(probs)[i] > u * sum(probs).

    probs: (..., V) nonnegative; u: (...) uniforms in [0, 1). Returns int64 (...). A zero-probability token is never
    returned when the row has mass; an all-zero row gives index 0.
    """
    cdf = probs.float().cumsum(-1)
    total = cdf[..., -1:].contiguous()
    idx = torch.searchsorted(cdf, u.float()[..., None] * total, right=True)
    # u * total can round up to total; the first index reaching total is the last token with mass.
    last = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(idx, last).squeeze(-1)
