"""Attention of T new tokens over a static KV cache, with an arbitrary mask among the new tokens.

This is the attention that speculative decoding needs: PaSS look-ahead blocks and token trees verify and draft
several tokens in one forward pass, and each new token may see only some of the others.

Math
----
Row b of the batch has ``L_b = cache_seqlens[b]`` committed tokens in slots ``0 .. L_b-1`` of its cache. The T new
tokens' K/V are already written at slots ``L_b .. L_b+T-1``; slots ``>= L_b+T`` are never read. New token i of row b
sees key slot s iff

    s < L_b                                       (the committed prefix: always visible)
    or  L_b <= s < L_b+T  and  mask[b, i, s-L_b]  (the new tokens: as the mask says)

and for query head h (grouped-query attention, KV head ``h // (Hq // Hkv)``):

    out[b, h, i] = sum_s softmax_s(q[b, h, i] . k[b, h_kv, s] * sm_scale) * v[b, h_kv, s]     over visible s

``mask=None`` means causal among the new tokens (``mask[i, j] = j <= i``). A query that sees no key at all (only
possible when ``L_b = 0`` and its mask row is all False) outputs zeros. ``sm_scale`` defaults to ``1/sqrt(D)``.

Shapes
------
    q            (B, Hq, T, D)     fp32/fp16/bf16, any strides with stride(-1) == 1, e.g. (B, T, Hq, D).transpose(1, 2)
    k_cache      (B, Hkv, S, D)    q's dtype, stride(-1) == 1; Hq % Hkv == 0
    v_cache      (B, Hkv, S, D)    q's dtype, stride(-1) == 1
    cache_seqlens (B,)             int32/int64, 0 <= L_b and L_b + T <= S
    mask         None, (T, T) or (B, T, T) bool, mask[..., i, i] all True
    out          (B, Hq, T, D)     contiguous, q's dtype

Grid and tiling
---------------
The query heads that share a KV head are packed into the M dimension of one tile: tile row ``r = t * G + g`` is query
token t of query head ``h_kv * G + g`` (``G = Hq // Hkv``). A program therefore reads each K/V block once for all G
heads (decoding is bandwidth-bound: this divides the K/V traffic by G compared with one program per query head), and
a (T=25, G=3) PaSS call is one 128-row tile rather than 3 tiles of 25 rows padded to 32.

Tiles (``_tile_config``): BLOCK_M = next_power_of_2(T * G) in 16..128 (..64 for D > 128), BLOCK_N = 64 (32 for
D > 128), BLOCK_D = next_power_of_2(D); fp32 uses 32 x 16 tiles because IEEE fp32 dots run on FMA units. These sizes
compile for sm_90 without register spills or shared-memory overflow; they are not tuned on hardware.

``_attn_fwd_kernel`` runs on a 1-D grid of ``B * Hkv * num_splits * num_m_blocks`` programs; program
``((b * Hkv + h_kv) * num_splits + split) * num_m_blocks + m`` computes tile rows ``m*BLOCK_M .. (m+1)*BLOCK_M-1`` of
(b, h_kv) over the keys of its split. Per program:

1. ``kv_end``: one past the last key any row of the tile may see: ``L_b + T`` with a mask, ``L_b + t_max + 1`` for
   causal (t_max: the tile's last token). Key blocks from ``kv_end`` on are skipped.
2. split-K: ``[0, kv_end)`` is cut into ``num_splits`` chunks of whole BLOCK_N blocks, sized from this row's own
   ``kv_end`` on the device, so rows of different lengths all spread evenly over the splits with no host sync. A
   program whose chunk is empty writes "nothing seen" and exits.
3. Keys below ``floor(L_b / BLOCK_N) * BLOCK_N`` are prefix keys every row sees: that loop has no mask at all. Only the
   last few blocks, which overlap the new tokens, apply the mask. For T <= 64 each tile row's mask row is read once per
   program and packed into one int64 (bit j: sees new token j); for T > 64 the mask is gathered per key block.
4. Online softmax in base 2 (scores pre-multiplied by ``sm_scale * log2(e)``) with fp32 accumulators. Invisible scores
   are set to -1e30 (finite: a row with nothing visible stays finite instead of giving ``-inf - -inf = NaN``) and their
   probabilities to exactly 0, so a row that sees nothing ends with ``l = 0`` and writes zeros.

With ``num_splits == 1`` the program normalises and writes ``out`` directly. Otherwise it writes its normalised partial
output ``o_s`` (fp32) and log2-sum-exp ``lse_s`` to scratch buffers, and ``_attn_combine_kernel`` (one program per
output row (b, h, t)) merges them: ``out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)``, ``M = max_s lse_s``.

The launcher picks ``num_splits`` from the shapes only (S stands in for the unknown lengths): one split when
``B * Hkv * num_m_blocks`` programs already fill half the GPU's SMs, otherwise enough splits for about one program per
SM, at most 64, and no more than S allows with chunks at least ``max(BLOCK_M, BLOCK_N)`` keys long (so the fp32
partial a split writes is no bigger than the K/V it reads).

Limits
------
D <= 256 (padded to a power of two, at least 16). Offsets of (b, head) bases are int64, so caches larger than 2^31
elements are fine; within one head, ``S * stride(2)`` must stay below 2^31. ``check_values=False`` skips the host sync
that validates ``cache_seqlens`` and the mask diagonal; out-of-range lengths are then clamped on the device (no
out-of-bounds reads) but give meaningless results. fp32 inputs use IEEE fp32 dot products (not TF32). bf16 does not
run under ``TRITON_INTERPRET=1`` (the numpy interpreter has no bf16): test the CPU path in fp32/fp16.

Usage
-----
    B, Hq, Hkv, T, S, D = 2, 9, 3, 5, 4096, 64
    q = torch.randn(B, T, Hq, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)  # (B, Hq, T, D) view
    k_cache = torch.zeros(B, Hkv, S, D, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.zeros_like(k_cache)
    cache_seqlens = torch.tensor([100, 2000], device="cuda", dtype=torch.int32)
    # ... write the T new tokens' K/V at slots cache_seqlens[b] .. cache_seqlens[b] + T - 1 ...
    tree = torch.tensor([[1, 0, 0, 0, 0],   # node 0: the root
                         [1, 1, 0, 0, 0],   # node 1: child of 0
                         [1, 0, 1, 0, 0],   # node 2: child of 0
                         [1, 1, 0, 1, 0],   # node 3: child of 1
                         [1, 0, 1, 0, 1]],  # node 4: child of 2
                        dtype=torch.bool, device="cuda")
    out = attention(q, k_cache, v_cache, cache_seqlens, mask=tree, check_values=False)  # (B, Hq, T, D)
"""

import contextlib
import math
from functools import lru_cache

import torch
import triton
import triton.language as tl

_MAX_SPLITS = 64


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, SEQLENS, MASK, OUT, LSE,
    qk_scale,  # sm_scale * log2(e)
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_mb, stride_mt, stride_mj,
    stride_os, stride_ob, stride_oh, stride_ot,  # OUT: (num_splits, B, Hq, T, D) scratch, or (B, Hq, T, D)
    stride_ls, stride_lb, stride_lh,  # LSE: (num_splits, B, Hq, T), contiguous in T
    T, S, HKV, NUM_SPLITS, NUM_M_BLOCKS, MIN_SPLIT_BLOCKS,
    D: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BITS: tl.constexpr,  # HAS_MASK and T <= 64: the mask is read once per program, as one int64 per row
    BLOCK_T: tl.constexpr,  # next_power_of_2(T), used with MASK_BITS
    SPLIT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # Finite stand-in for -inf: exp2(NEG - m) underflows to exactly 0 for any real m, and NEG - NEG is 0, not NaN.
    NEG: tl.constexpr = -1.0e30
    pid = tl.program_id(0)
    m_block = pid % NUM_M_BLOCKS
    split = (pid // NUM_M_BLOCKS) % NUM_SPLITS
    bh = pid // (NUM_M_BLOCKS * NUM_SPLITS)
    b = bh // HKV
    h_kv = bh % HKV

    # Clamping keeps unchecked bad lengths (check_values=False) from reading outside the cache.
    L = tl.load(SEQLENS + b).to(tl.int32)
    L = tl.minimum(tl.maximum(L, 0), S - T)

    offs_r = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # packed tile rows r = t * GROUP + g
    offs_t = offs_r // GROUP
    offs_h = h_kv * GROUP + offs_r % GROUP  # query head of each row
    row_ok = offs_t < T
    offs_d = tl.arange(0, BLOCK_D)
    if D == BLOCK_D:
        d_ok = tl.full([BLOCK_D], 1, tl.int1)  # constant mask: the compiler drops it and vectorises the loads
    else:
        d_ok = offs_d < D
    offs_n = tl.arange(0, BLOCK_N)

    if HAS_MASK:
        kv_end = L + T
    else:
        t_last = tl.minimum((m_block * BLOCK_M + BLOCK_M - 1) // GROUP, T - 1)
        kv_end = L + t_last + 1

    # Chunks are sized from this row's own length, so short rows in a long cache still spread over all splits.
    n_blocks = tl.cdiv(kv_end, BLOCK_N)
    blocks_per_split = tl.maximum(tl.cdiv(n_blocks, NUM_SPLITS), MIN_SPLIT_BLOCKS)
    lo = split * blocks_per_split * BLOCK_N
    hi = tl.minimum(lo + blocks_per_split * BLOCK_N, kv_end)

    b64 = b.to(tl.int64)
    h_kv64 = h_kv.to(tl.int64)
    if SPLIT:
        lse_ptrs = LSE + split.to(tl.int64) * stride_ls + b64 * stride_lb + offs_h.to(tl.int64) * stride_lh + offs_t
        if lo >= hi:
            # Nothing to do: tell the combine kernel this split saw no key, so it never reads its partial output.
            tl.store(lse_ptrs, tl.full([BLOCK_M], NEG, tl.float32), mask=row_ok)
            return

    q_ptrs = (Q + b64 * stride_qb + offs_h.to(tl.int64)[:, None] * stride_qh + offs_t[:, None] * stride_qt
              + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    k_base = K + b64 * stride_kb + h_kv64 * stride_kh
    v_base = V + b64 * stride_vb + h_kv64 * stride_vh

    if HAS_MASK:
        mask_rows = MASK + b64 * stride_mb + offs_t * stride_mt  # (BLOCK_M,) start of each row's mask row
    if MASK_BITS:
        # Pack each row's mask into one int64 up front. Gathering a (BLOCK_M, BLOCK_N) byte tile inside the loop
        # needs a 64-bit address per element, which overflows the register file next to a 128-row accumulator.
        offs_j = tl.arange(0, BLOCK_T)
        m = tl.load(mask_rows[:, None] + offs_j[None, :] * stride_mj, mask=row_ok[:, None] & (offs_j < T)[None, :],
                    other=0)  # (BLOCK_M, BLOCK_T)
        mask_bits = tl.sum((m != 0).to(tl.int64) << offs_j.to(tl.int64)[None, :], 1)  # distinct bits: sum == or

    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Stage 1: whole blocks of the committed prefix. Every row sees every key here: no mask, no bounds checks on keys.
    prefix_end = tl.minimum(hi, (L // BLOCK_N) * BLOCK_N)
    for start in range(lo, prefix_end, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        offs_s = start + offs_n
        k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # Stage 2: the blocks that overlap the new tokens (and the prefix tail sharing a block with them): masked.
    for start in range(tl.maximum(lo, prefix_end), hi, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        offs_s = start + offs_n
        s_ok = offs_s < hi
        k = tl.load(k_base + offs_s[:, None] * stride_ks + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                    other=0.0)
        v = tl.load(v_base + offs_s[:, None] * stride_vs + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :],
                    other=0.0)
        j = offs_s - L  # index among the new tokens; negative in the prefix
        if MASK_BITS:
            bit = tl.minimum(tl.maximum(j, 0), 63).to(tl.int64)  # j >= T only where s_ok is False
            new_vis = ((mask_bits[:, None] >> bit[None, :]) & 1) != 0
            visible = ((j < 0)[None, :] | new_vis) & s_ok[None, :]
        elif HAS_MASK:
            j_ok = (j >= 0) & (j < T)
            new_vis = tl.load(mask_rows[:, None] + j[None, :] * stride_mj, mask=row_ok[:, None] & j_ok[None, :],
                              other=0)
            visible = ((j < 0)[None, :] | (new_vis != 0)) & s_ok[None, :]
        else:
            visible = (j[None, :] <= offs_t[:, None]) & s_ok[None, :]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        qk = tl.where(visible, qk, NEG)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        # Zeroing p (not only the score) matters when a row sees nothing in this split: there m_new == NEG and
        # exp2(qk - m_new) would be 1 for every masked key.
        p = tl.where(visible, tl.exp2(qk - m_new[:, None]), 0.0)
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]  # rows that saw nothing have acc == 0: they write zeros
    o_ptrs = (OUT + b64 * stride_ob + offs_h.to(tl.int64)[:, None] * stride_oh + offs_t[:, None] * stride_ot
              + offs_d[None, :])
    if SPLIT:
        o_ptrs += split.to(tl.int64) * stride_os
        tl.store(lse_ptrs, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), NEG), mask=row_ok)
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_combine_kernel(
    O_PART, LSE_PART, OUT,
    stride_ps, stride_ls,  # per split, in elements; a row's partial is at row * D (O_PART) and row (LSE_PART)
    NUM_SPLITS,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):
    NEG: tl.constexpr = -1.0e30
    row = tl.program_id(0).to(tl.int64)  # flattened (b, h, t) of the contiguous (B, Hq, T, D) output
    offs_s = tl.arange(0, SPLITS_P2)
    offs_d = tl.arange(0, BLOCK_D)
    lse = tl.load(LSE_PART + offs_s.to(tl.int64) * stride_ls + row, mask=offs_s < NUM_SPLITS, other=NEG)
    used = lse > 0.5 * NEG  # splits that saw at least one key; the others' partials were never written
    lse_max = tl.max(lse, 0)
    w = tl.where(used, tl.exp2(lse - lse_max), 0.0)
    o = tl.load(O_PART + offs_s[:, None].to(tl.int64) * stride_ps + row * D + offs_d[None, :],
                mask=used[:, None] & (offs_d < D)[None, :], other=0.0)  # (SPLITS_P2, BLOCK_D)
    w_sum = tl.sum(w, 0)
    out = tl.sum(o * w[:, None], 0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    tl.store(OUT + row * D + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < D)


@lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # TRITON_INTERPRET on CPU: programs run one after another, splitting only costs time


def _tile_config(rows: int, block_d: int, dtype: torch.dtype, gather_mask: bool = False):
    """BLOCK_M, BLOCK_N, num_warps, num_stages for `rows` packed query rows.

    gather_mask: the mask is read per key block (T > 64), which costs a 64-bit address per tile element.

    Chosen so that the sm_90 build neither spills registers nor exceeds shared memory (checked with ptxas for
    D in {64, 128, 256}); not tuned on hardware.
    """
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMA units with their operands in registers: small tiles.
        block_m = min(32, max(16, triton.next_power_of_2(rows)))
        return block_m, 16, 8 if block_m == 32 else 4, 2
    block_m = min(128 if block_d <= 128 else 64, max(16, triton.next_power_of_2(rows)))
    block_n = (64 if block_d <= 128 else 32) // (2 if gather_mask else 1)
    num_warps = 8 if block_m * block_d >= 64 * 128 or block_d >= 256 else 4
    num_stages = 3 if block_d <= 128 else 2
    return block_m, block_n, num_warps, num_stages


def _choose_num_splits(units: int, S: int, min_split_keys: int, num_sms: int) -> int:
    """Splits of the key range per (b, h_kv, m-block); `units` programs exist before splitting."""
    if 2 * units > num_sms:
        return 1
    return max(1, min(num_sms // units, triton.cdiv(S, min_split_keys), _MAX_SPLITS))


def _check_inputs(q, k_cache, v_cache, cache_seqlens, mask):
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions, got shape {tuple(x.shape)}.")
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}.")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be None or a torch.Tensor, got {type(mask).__name__}.")

    B, Hq, T, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    if k_cache.shape[0] != B or k_cache.shape[3] != D:
        raise ValueError(f"k_cache must have shape (B={B}, Hkv, S, D={D}) to match q {tuple(q.shape)}, "
                         f"got {tuple(k_cache.shape)}.")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}.")
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads Hq={Hq} must be a multiple of the KV heads Hkv={Hkv}.")
    if T == 0 or T > S:
        raise ValueError(f"the number of new tokens T={T} must be in 1..S={S} (the cache length).")
    if D > 256:
        raise ValueError(f"head dim D={D} is not supported; expected D <= 256.")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must have shape ({B},), got {tuple(cache_seqlens.shape)}.")
    if mask is not None and mask.shape not in ((T, T), (B, T, T)):
        raise ValueError(f"mask must have shape ({T}, {T}) or ({B}, {T}, {T}), got {tuple(mask.shape)}.")

    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"q must be float16, bfloat16 or float32, got {q.dtype}.")
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {x.dtype}.")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}.")
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be torch.bool, got {mask.dtype}.")

    tensors = [("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)]
    for name, x in tensors + ([("mask", mask)] if mask is not None else []):
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}.")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {x.stride()}.")


def _check_values(cache_seqlens, mask, T, S):
    lengths = cache_seqlens.tolist()  # host sync: the hot path passes check_values=False
    for b, L in enumerate(lengths):
        if L < 0:
            raise ValueError(f"cache_seqlens[{b}] = {L} must be >= 0.")
        if L + T > S:
            raise ValueError(f"cache_seqlens[{b}] + T = {L} + {T} = {L + T} exceeds the cache length S = {S}.")
    if mask is not None and not bool(mask.diagonal(dim1=-2, dim2=-1).all()):
        raise ValueError("mask diagonal must be all True (each new token sees itself).")


def attention(q, k_cache, v_cache, cache_seqlens, mask=None, sm_scale=None, check_values=True, num_splits=None):
    """Attention of q's T new tokens over the cache (math, shapes and grid in the module docstring).

    q: (B, Hq, T, D); k_cache, v_cache: (B, Hkv, S, D) with the new tokens' K/V already at slots L_b .. L_b+T-1;
    cache_seqlens: (B,) int32/int64 L_b; mask: None (causal), (T, T) or (B, T, T) bool among the new tokens;
    sm_scale: defaults to 1/sqrt(D). check_values: validate lengths and the mask diagonal (one host sync; pass False
    in a decoding loop). num_splits: split-K override for tests and tuning; None picks it from the shapes, an explicit
    value also lets each split be as short as one key block. Returns (B, Hq, T, D), contiguous, in q's dtype.
    """
    _check_inputs(q, k_cache, v_cache, cache_seqlens, mask)
    B, Hq, T, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    if check_values:
        _check_values(cache_seqlens, mask, T, S)
    group = Hq // Hkv
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)

    block_d = max(16, triton.next_power_of_2(D))
    rows = T * group
    mask_bits = mask is not None and T <= 64
    block_m, block_n, num_warps, num_stages = _tile_config(rows, block_d, q.dtype, mask is not None and not mask_bits)
    num_m_blocks = triton.cdiv(rows, block_m)
    # A split at least as long as the tile is tall writes an fp32 partial no bigger than the K/V it reads.
    min_split_blocks = triton.cdiv(max(block_m, block_n), block_n)
    if num_splits is None:
        units = B * Hkv * num_m_blocks
        num_splits = _choose_num_splits(units, S, min_split_blocks * block_n, _num_sms(q.device))
    else:
        num_splits = int(num_splits)
        if not 1 <= num_splits <= _MAX_SPLITS:
            raise ValueError(f"num_splits must be in 1..{_MAX_SPLITS}, got {num_splits}.")
        min_split_blocks = 1

    out = torch.empty((B, Hq, T, D), device=q.device, dtype=q.dtype)
    split = num_splits > 1
    if split:
        o_part = torch.empty((num_splits, B, Hq, T, D), device=q.device, dtype=torch.float32)
        lse_part = torch.empty((num_splits, B, Hq, T), device=q.device, dtype=torch.float32)
        target, lse_arg = o_part, lse_part
        stride_o = o_part.stride()
        stride_l = lse_part.stride()[:3]
    else:
        target, lse_arg = out, out  # LSE is unused without splits
        stride_o = (0,) + out.stride()
        stride_l = (0, 0, 0)
    if mask is None:
        mask_arg, stride_m = q, (0, 0, 0)
    else:
        mask_arg = mask.view(torch.uint8)  # same bytes; Triton loads bool pointers as uint8 either way
        stride_m = ((0,) + mask.stride()) if mask.dim() == 2 else mask.stride()

    grid = (B * Hkv * num_splits * num_m_blocks,)
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        _attn_fwd_kernel[grid](
            q, k_cache, v_cache, cache_seqlens, mask_arg, target, lse_arg,
            sm_scale * 1.4426950408889634,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            *stride_m, *stride_o[:4], *stride_l,
            T, S, Hkv, num_splits, num_m_blocks, min_split_blocks,
            D=D, GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
            HAS_MASK=mask is not None, MASK_BITS=mask_bits, BLOCK_T=triton.next_power_of_2(T),
            SPLIT=split,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            num_warps=num_warps, num_stages=num_stages,
        )
        if split:
            _attn_combine_kernel[(B * Hq * T,)](
                o_part, lse_part, out, o_part.stride(0), lse_part.stride(0), num_splits,
                D=D, BLOCK_D=block_d, SPLITS_P2=max(2, triton.next_power_of_2(num_splits)),
                num_warps=4 if block_d >= 128 else 2,
            )
    return out


def visibility_mask(cache_seqlens, mask, T, S):
    """The explicit (B, T, S) bool mask: new token i of row b sees slot s. Plain torch, any device."""
    B = cache_seqlens.shape[0]
    L = cache_seqlens.to(torch.int64)[:, None]  # (B, 1)
    rel = torch.arange(S, device=cache_seqlens.device)[None, :] - L  # (B, S): index among the new tokens
    is_new = (rel >= 0) & (rel < T)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=cache_seqlens.device).tril()
    mask = mask.expand(B, T, T)
    new_vis = torch.gather(mask, 2, rel.clamp(0, T - 1)[:, None, :].expand(B, T, S))  # (B, T, S)
    return (rel < 0)[:, None, :] | (is_new[:, None, :] & new_vis)


def attention_ref(q, k_cache, v_cache, cache_seqlens, mask=None, sm_scale=None):
    """Plain torch reference: fp32 math, output in q's dtype.

    Memory: materialises the (B, Hq, T, S) scores and reads the whole cache, including slots it then ignores
    (zeroed first so garbage in slots >= L_b + T cannot leak in as 0 * NaN).
    """
    B, Hq, T, D = q.shape
    _, Hkv, S, _ = k_cache.shape
    group = Hq // Hkv
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else float(sm_scale)
    visible = visibility_mask(cache_seqlens, mask, T, S)  # (B, T, S)
    in_range = visible.any(1)[:, None, :, None]  # (B, 1, S, 1): slots some query reads
    k = torch.where(in_range, k_cache.float(), 0.0)
    v = torch.where(in_range, v_cache.float(), 0.0)
    qf = q.float().reshape(B, Hkv, group, T, D)
    scores = torch.einsum("bhgtd,bhsd->bhgts", qf, k) * sm_scale  # (B, Hkv, G, T, S)
    vis = visible[:, None, None]  # (B, 1, 1, T, S)
    p = torch.softmax(scores.masked_fill(~vis, float("-inf")), dim=-1)
    p = p.masked_fill(~vis, 0.0)  # a row with nothing visible is all NaN after softmax: make it zeros
    out = torch.einsum("bhgts,bhsd->bhgtd", p, v)
    return out.reshape(B, Hq, T, D).to(q.dtype)
