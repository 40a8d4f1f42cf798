"""Attention of T new tokens over a KV cache (contiguous or paged), with an arbitrary mask among the new tokens.

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

Cache forms
-----------
"Slot s of row b" is found in one of four ways, chosen by the arguments (``layout`` and ``block_table``); the kernel
reads each form in place, with no copy:

    block_table  layout  k_cache / v_cache               slot s of row b, KV head h
    None         "HND"   (B, Hkv, S, D)   (the default)  k_cache[b, h, s]
    None         "NHD"   (B, S, Hkv, D)                  k_cache[b, s, h]
    (B, P_max)   "NHD"   (num_pages, page_size, Hkv, D)  k_cache[block_table[b, s // page_size], s % page_size, h]
    (B, P_max)   "HND"   (num_pages, Hkv, page_size, D)  k_cache[block_table[b, s // page_size], h, s % page_size]

The paged forms are vLLM's and flash-attn's ``flash_attn_with_kvcache(..., block_table=...)`` ("NHD") and the
head-major variant ("HND"). ``block_table`` is int32 (or int64); page ids need not be ordered or distinct across
rows, any page size >= 1 works (16, 32, 64, ... are the usual ones) and need not divide the lengths, and a row's
capacity is ``S = P_max * page_size``. Only the table entries of the pages that hold slots ``< L_b + T`` are read;
the rest (e.g. -1 padding) are ignored.

Shapes
------
    q            (B, Hq, T, D)     fp32/fp16/bf16, any strides with stride(-1) == 1, e.g. (B, T, Hq, D).transpose(1, 2)
    k_cache      see the table     q's dtype, stride(-1) == 1, any other strides (views of a bigger buffer are fine)
    v_cache      k_cache's shape   q's dtype, stride(-1) == 1 (its strides may differ from k_cache's)
    cache_seqlens (B,)             int32/int64, 0 <= L_b and L_b + T <= S
    mask         None, (T, T) or (B, T, T) bool, mask[..., i, i] all True
    block_table  None or (B, P_max) int32/int64, entries in 0 .. num_pages-1 for the pages a row uses
    out          (B, Hq, T, D)     contiguous, q's dtype

Grid and tiling
---------------
The query heads that share a KV head are packed into the M dimension of one tile: tile row ``r = t * G + g`` is query
token t of query head ``h_kv * G + g`` (``G = Hq // Hkv``). A program therefore reads each K/V block once for all G
heads (decoding is bandwidth-bound: this divides the K/V traffic by G compared with one program per query head), and
a (T=25, G=3) PaSS call is one 128-row tile rather than 3 tiles of 25 rows padded to 32.

Tiles (``_tile_config``): BLOCK_M = next_power_of_2(T * G) clamped to 16..BLOCK_M_MAX, BLOCK_D = next_power_of_2(D)
(at least 16). 16-bit dtypes, D <= 128: BLOCK_M_MAX = 64, BLOCK_N = 64, 8 warps, 3 pipeline stages; D > 128: 32 x 32
tiles, 8 warps, 2 stages. fp32 uses IEEE fp32 dots on FMA units: 32 x 16 tiles. For 16-bit D <= 128 every
configuration the launcher picks (contiguous and paged) compiles for sm_80 and sm_90 with no register spills and at
most 217 of the 255 registers (ptxas of Triton 3.9; tests/test_attention_lowering.py checks it). D = 256 was checked
on a few shapes only (no spills, ~170 registers) and fp32 not at all.
128-row tiles would halve the K/V reads of calls with more than 64 packed rows, but at D = 128 they spill on sm_80.
None of this is tuned on hardware.

``_attn_fwd_kernel`` runs on a 1-D grid of ``B * Hkv * num_splits * num_m_blocks`` programs; program
``((b * Hkv + h_kv) * num_splits + split) * num_m_blocks + m`` computes tile rows ``m*BLOCK_M .. (m+1)*BLOCK_M-1`` of
(b, h_kv) over the keys of its split. Per program:

1. ``kv_end``: one past the last key any row of the tile may see: ``L_b + T`` with a mask, ``L_b + t_max + 1`` for
   causal (t_max: the tile's last token). Key blocks from ``kv_end`` on are skipped.
2. split-K: ``[0, kv_end)`` is cut into ``num_splits`` chunks of whole BLOCK_N blocks, sized from this row's own
   ``kv_end`` on the device, so rows of different lengths all spread evenly over the splits with no host sync. A
   program whose chunk is empty writes "nothing seen" and exits.
3. Whole key blocks that every row of the tile sees (below ``L_b``, and for causal below ``L_b + t_min + 1``, t_min:
   the tile's first token) run in a loop with no mask at all, software-pipelined. Only the remaining blocks, at most
   ``ceil(T / BLOCK_N) + 1`` with a mask, apply it, in a loop that is not pipelined (prefetching there cost up to 60
   registers and spilled on sm_80). For T <= 64 each tile row's mask row is read once per program and packed into
   two int32 words (bit j: sees new token j); for T > 64 the mask is gathered per key block.
4. Paged caches: each key block looks up the page of each of its keys in the row's block table (a BLOCK_N-wide int32
   gather that stays in L1), so a block may straddle pages of any size; everything else is the contiguous code.
5. Online softmax in base 2 (scores pre-multiplied by ``sm_scale * log2(e)``) with fp32 accumulators. Invisible scores
   are set to -1e30 (finite: a row with nothing visible stays finite instead of giving ``-inf - -inf = NaN``) and their
   probabilities to exactly 0, so a row that sees nothing ends with ``l = 0`` and writes zeros. A NaN ``l`` (NaN
   inputs) is kept NaN through the split-K combine.

With ``num_splits == 1`` the program normalises and writes ``out`` directly. Otherwise it writes its normalised partial
output ``o_s`` (fp32) and log2-sum-exp ``lse_s`` to scratch buffers, and ``_attn_combine_kernel`` (one program per
output row (b, h, t)) merges them: ``out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)``, ``M = max_s lse_s``.

The launcher picks ``num_splits`` from the shapes only (S stands in for the unknown lengths): one split when
``B * Hkv * num_m_blocks`` programs already fill half the GPU's SMs, otherwise enough splits for about one program per
SM, at most 64, and no more than S allows with chunks at least ``max(BLOCK_M, BLOCK_N)`` keys long (so the fp32
partial a split writes is no bigger than the K/V it reads).

Host cost and compiled variants
-------------------------------
The shape/dtype/stride/device checks and the configuration (tiles, splits, strides, grid) run once per distinct input
signature and are cached (``attention_plan``); a call with a known signature only allocates the output and launches:
about 8-12 us of host CPU time on this project's 2-core CPU with the launch stubbed out (``python -m
minipass.kernels.bench_kernels --host-overhead``), of which ~3 us is the operator dispatch, against 19-26 us before the cache.
Lengths, the number of splits, T, S and the mask/scratch strides are not specialised on by Triton
(``do_not_specialize``), and calls with and without split-K share one variant, so a process compiles one forward
variant per (dtype, D, BLOCK_M in {16, 32, 64}, mask kind: causal / packed bits / gathered, paged or not, page size):
T = 1..512 new tokens compile 3 causal variants and 4 masked ones, plus one combine kernel (tests/
test_attention_kernel.py counts them), for D a multiple of 16 (otherwise the q/out strides, which stay specialised
for vectorised access, add variants by T % 16).

``attention`` is registered as the torch operator ``torch.ops.minipass.attention`` (with a fake implementation), so
``torch.compile(fullgraph=True)`` graphs contain it as one node. Keep ``check_values=False`` there: checking values
is a host sync.

Limits
------
D <= 256 (padded to a power of two, at least 16). Offsets of (b, head) bases and of pages are int64, so caches larger
than 2^31 elements are fine; within one head of one row (one page when paged), ``S * stride(slot)`` must stay below
2^31. ``check_values=False`` skips the host sync that validates ``cache_seqlens``, the block table and the mask
diagonal; out-of-range lengths and page ids are then clamped on the device (no out-of-bounds reads) but give
meaningless results. fp32 inputs use IEEE fp32 dot products (not TF32). bf16 does not run under
``TRITON_INTERPRET=1`` (the numpy interpreter has no bf16): test the CPU path in fp32/fp16.

Non-finite inputs (tests/test_attention_fuzz.py): where ``attention_ref`` is finite the kernel is finite and agrees
with it; where the exact math is NaN/inf (a NaN or +inf score, or an inf/NaN V value with a nonzero weight, among the
keys a query sees) the kernel is non-finite too, with two exceptions: (1) a query whose visible scores are all -inf
outputs zeros (it sees "nothing"; the reference gives NaN); (2) a non-finite V value at a slot that the query does not
see, but another query of the same (b, h_kv) does, can make the query's output NaN too (0 * inf in the P @ V product;
``attention_ref`` does the same for every query of the row, the kernel only for the queries whose tile loads that key
block). Slots ``>= L_b + T`` are never read, whatever they hold.

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

    # The same over a vLLM-style paged cache: 16-token pages, row b's pages listed in block_table[b].
    k_pages = torch.zeros(1024, 16, Hkv, D, device="cuda", dtype=torch.bfloat16)   # (num_pages, page_size, Hkv, D)
    v_pages = torch.zeros_like(k_pages)
    block_table = torch.randperm(1024, device="cuda")[:B * 256].view(B, 256).int()  # (B, P_max), S = 256 * 16
    out = attention(q, k_pages, v_pages, cache_seqlens, tree, check_values=False, block_table=block_table,
                    layout="NHD")
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

_MAX_SPLITS = 64
_MASK_WORD = 64  # T <= _MASK_WORD: a tile row's mask fits in two 32-bit words, read once per program
_LAYOUTS = ("HND", "NHD")

# Runtime ints that change with the call (lengths, T, splits) or only feed scalar address arithmetic: Triton would
# otherwise compile a variant per (value == 1, value % 16 == 0) pattern of each. The q/out and K/V strides stay
# specialised: their divisibility by 16 is what lets the tile loads and stores vectorise.
_FWD_NO_SPECIALIZE = ("stride_tb", "stride_mb", "stride_mt", "stride_ls", "stride_lb", "stride_lh",
                      "T", "S", "HKV", "GROUP", "NUM_SPLITS", "NUM_M_BLOCKS", "MIN_SPLIT_BLOCKS", "NUM_PAGES")
_COMBINE_NO_SPECIALIZE = ("stride_ls", "NUM_SPLITS")


@triton.jit
def _slot_offsets(offs_s, s_ok, table_row, num_pages, stride_kb, stride_ks, stride_vb, stride_vs,
                  PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr):
    """Offsets of key slots ``offs_s`` (BLOCK_N,) from the row's K and V base pointers.

    Contiguous: ``s * stride_slot`` (the base pointers include the row). Paged: ``page * stride_page + (s % page_size)
    * stride_slot`` with ``page = block_table[b, s // page_size]``, clamped into the pool; ``s_ok`` masks the table
    reads of slots past the key range (their K/V loads are masked too).
    """
    if PAGED:
        page = tl.load(table_row + offs_s // PAGE_SIZE, mask=s_ok, other=0)
        page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
        in_page = offs_s % PAGE_SIZE
        return page * stride_kb + in_page * stride_ks, page * stride_vb + in_page * stride_vs
    else:
        return offs_s * stride_ks, offs_s * stride_vs


@triton.jit(do_not_specialize=_FWD_NO_SPECIALIZE)
def _attn_fwd_kernel(
    Q, K, V, SEQLENS, MASK, TABLE, OUT, O_PART, LSE,
    qk_scale,  # sm_scale * log2(e)
    stride_qb, stride_qh, stride_qt,
    stride_kb, stride_kh, stride_ks,  # (row or page, head, slot) strides of the cache, whatever the layout
    stride_vb, stride_vh, stride_vs,
    stride_tb,  # block table row stride (paged only)
    stride_mb, stride_mt, stride_mj,
    stride_ob, stride_oh, stride_ot,  # OUT: (B, Hq, T, D), contiguous
    stride_ps,  # O_PART: (num_splits, B, Hq, T, D) fp32 scratch (splits only), contiguous: per split, OUT's strides
    stride_ls, stride_lb, stride_lh,  # LSE: (num_splits, B, Hq, T) fp32 scratch, contiguous in T (splits only)
    T, S, HKV, GROUP, NUM_SPLITS, NUM_M_BLOCKS, MIN_SPLIT_BLOCKS, NUM_PAGES,
    D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_MASK: tl.constexpr,
    MASK_BITS: tl.constexpr,  # HAS_MASK and T <= 64: the mask is read once per program, as two int32 words per row
    PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
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

    # Keys [0, kv_end) are the ones some row of the tile may see; keys [0, full_end) are seen by every row.
    if HAS_MASK:
        kv_end = L + T
        full_end = L
    else:
        t_last = tl.minimum((m_block * BLOCK_M + BLOCK_M - 1) // GROUP, T - 1)
        kv_end = L + t_last + 1
        full_end = L + (m_block * BLOCK_M) // GROUP + 1  # causal: up to the tile's first token

    # Chunks are sized from this row's own length, so short rows in a long cache still spread over all splits.
    n_blocks = tl.cdiv(kv_end, BLOCK_N)
    blocks_per_split = tl.maximum(tl.cdiv(n_blocks, NUM_SPLITS), MIN_SPLIT_BLOCKS)
    lo = split * blocks_per_split * BLOCK_N
    hi = tl.minimum(lo + blocks_per_split * BLOCK_N, kv_end)

    b64 = b.to(tl.int64)
    h_kv64 = h_kv.to(tl.int64)
    # With splits, the program writes its partial result to the O_PART and LSE scratch buffers of the combine kernel.
    # This is a runtime branch, so that calls with and without splits share one compiled variant; without splits,
    # lo = 0 < hi, and O_PART and LSE are never written.
    lse_ptrs = LSE + split.to(tl.int64) * stride_ls + b64 * stride_lb + offs_h.to(tl.int64) * stride_lh + offs_t
    if lo >= hi:
        # Nothing to do: tell the combine kernel this split saw no key, so it never reads its partial output.
        tl.store(lse_ptrs, tl.full([BLOCK_M], NEG, tl.float32), mask=row_ok)
        return

    q_ptrs = (Q + b64 * stride_qb + offs_h.to(tl.int64)[:, None] * stride_qh + offs_t[:, None] * stride_qt
              + offs_d[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)

    if PAGED:  # rows are found through the block table; the bases hold only the head
        k_base = K + h_kv64 * stride_kh
        v_base = V + h_kv64 * stride_vh
        table_row = TABLE + b64 * stride_tb
    else:
        k_base = K + b64 * stride_kb + h_kv64 * stride_kh
        v_base = V + b64 * stride_vb + h_kv64 * stride_vh
        table_row = TABLE

    if HAS_MASK:
        mask_b = MASK + b64 * stride_mb
        mask_rows = offs_t * stride_mt  # (BLOCK_M,) int32 offset of each row's mask row
    if MASK_BITS:
        # Pack each row's mask into two int32 words up front (bit j: sees new token j), so that the loop tests bits
        # instead of gathering a (BLOCK_M, BLOCK_N) byte tile per key block.
        offs_j = tl.arange(0, 32)
        m_lo = tl.load(mask_b + mask_rows[:, None] + offs_j[None, :] * stride_mj,
                       mask=row_ok[:, None] & (offs_j < T)[None, :], other=0)  # (BLOCK_M, 32)
        m_hi = tl.load(mask_b + mask_rows[:, None] + (offs_j + 32)[None, :] * stride_mj,
                       mask=row_ok[:, None] & (offs_j + 32 < T)[None, :], other=0)
        bits_lo = tl.sum((m_lo != 0).to(tl.int32) << offs_j[None, :], 1)  # distinct bits: sum == or
        bits_hi = tl.sum((m_hi != 0).to(tl.int32) << offs_j[None, :], 1)

    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Stage 1: whole blocks of keys that every row sees (the committed prefix; for causal, also the new tokens before
    # the tile's first one): no mask, no bounds checks on keys. This is the long loop, software-pipelined.
    prefix_end = tl.minimum(hi, (full_end // BLOCK_N) * BLOCK_N)
    for start in range(lo, prefix_end, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        offs_s = start + offs_n
        k_off, v_off = _slot_offsets(offs_s, offs_s < prefix_end, table_row, NUM_PAGES, stride_kb, stride_ks,
                                     stride_vb, stride_vs, PAGED, PAGE_SIZE)
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    # Stage 2: the few blocks that overlap the new tokens (and the prefix tail sharing a block with them): masked.
    # Not software-pipelined: prefetching the mask and K/V of the next blocks cost up to 60 registers (and spilled on
    # sm_80), for a loop of a few iterations (ceil(T / BLOCK_N) + 1 at most with a mask).
    for start in tl.range(tl.maximum(lo, prefix_end), hi, BLOCK_N, num_stages=1):
        start = tl.multiple_of(start, BLOCK_N)
        offs_s = start + offs_n
        s_ok = offs_s < hi
        k_off, v_off = _slot_offsets(offs_s, s_ok, table_row, NUM_PAGES, stride_kb, stride_ks, stride_vb, stride_vs,
                                     PAGED, PAGE_SIZE)
        k = tl.load(k_base + k_off[:, None] + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        v = tl.load(v_base + v_off[:, None] + offs_d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
        j = offs_s - L  # index among the new tokens; negative in the prefix
        if MASK_BITS:
            bit = tl.minimum(tl.maximum(j, 0), 63)  # j >= T only where s_ok is False
            word = tl.where((bit < 32)[None, :], bits_lo[:, None], bits_hi[:, None])
            new_vis = ((word >> (bit & 31)[None, :]) & 1) != 0
            visible = ((j < 0)[None, :] | new_vis) & s_ok[None, :]
        elif HAS_MASK:
            j_ok = (j >= 0) & (j < T)
            new_vis = tl.load(mask_b + mask_rows[:, None] + j[None, :] * stride_mj,
                              mask=row_ok[:, None] & j_ok[None, :], other=0)
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

    # l == 0 exactly: the row saw nothing (acc == 0, write zeros). A NaN l (NaN inputs) must stay NaN, also in LSE.
    seen = l_i != 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out_ok = row_ok[:, None] & d_ok[None, :]
    o_offs = b64 * stride_ob + offs_h.to(tl.int64)[:, None] * stride_oh + offs_t[:, None] * stride_ot + offs_d[None, :]
    if NUM_SPLITS > 1:
        tl.store(O_PART + split.to(tl.int64) * stride_ps + o_offs, out, mask=out_ok)
        tl.store(lse_ptrs, tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), NEG), mask=row_ok)
    else:
        tl.store(OUT + o_offs, out.to(OUT.dtype.element_ty), mask=out_ok)


@triton.jit(do_not_specialize=_COMBINE_NO_SPECIALIZE)
def _attn_combine_kernel(
    O_PART, LSE_PART, OUT,
    stride_ps, stride_ls,  # per split, in elements; a row's partial is at row * D (O_PART) and row (LSE_PART)
    NUM_SPLITS,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[row] = sum_s 2^(lse_s - M) o_s[row] / sum_s 2^(lse_s - M), M = max_s lse_s, over the splits that saw a key."""
    NEG: tl.constexpr = -1.0e30
    row = tl.program_id(0).to(tl.int64)  # flattened (b, h, t) of the contiguous (B, Hq, T, D) output
    offs_d = tl.arange(0, BLOCK_D)
    lse_max = tl.load(LSE_PART + row)
    for s in range(1, NUM_SPLITS):
        lse_max = tl.maximum(lse_max, tl.load(LSE_PART + s * stride_ls + row))
    acc = tl.zeros([BLOCK_D], tl.float32)
    w_sum = 0.0
    for s in range(0, NUM_SPLITS):
        lse = tl.load(LSE_PART + s * stride_ls + row)
        if (lse > 0.5 * NEG) | (lse != lse):  # saw a key (NaN: NaN inputs); the others' partials were never written
            w = tl.exp2(lse - lse_max)
            acc += w * tl.load(O_PART + s * stride_ps + row * D + offs_d, mask=offs_d < D, other=0.0)
            w_sum += w
    out = acc / tl.where(w_sum > 0.0, w_sum, 1.0)
    tl.store(OUT + row * D + offs_d, out.to(OUT.dtype.element_ty), mask=offs_d < D)


# ----------------------------------------------------------------------------------------------------------------------
# Launcher: checks and configuration, cached per input signature
# ----------------------------------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # TRITON_INTERPRET on CPU: programs run one after another, splitting only costs time


def _tile_config(rows: int, block_d: int, dtype: torch.dtype):
    """BLOCK_M, BLOCK_N, num_warps, num_stages for `rows` packed query rows (same for every cache form, so that the
    paged and contiguous kernels sum in the same order).

    16-bit dtypes, D <= 128: 16-, 32- or 64-row tiles, 64 keys per block, 8 warps, 3 pipeline stages. With ptxas
    (tests/test_attention_lowering.py, every configuration chosen here, contiguous and paged, sm_80 and sm_90): no
    spills and at most 217 registers. The alternatives measured: 128-row tiles (halving the K/V reads of calls with
    more than 64 packed rows) need 255 registers at D = 128 and spill on sm_80 with a mask or paging, on sm_90 too
    with a mask; 4 warps make ptxas 12.x cap small tiles at 128 or 168 registers and spill 4-16 bytes.
    """
    if dtype == torch.float32:
        # IEEE fp32 dots run on FMA units with their operands in registers: small tiles.
        block_m = min(32, max(16, triton.next_power_of_2(rows)))
        return block_m, 16, 8 if block_m == 32 else 4, 2
    if block_d <= 128:
        block_m = min(64, max(16, triton.next_power_of_2(rows)))
        return block_m, 64, 8, 3
    block_m = min(32, max(16, triton.next_power_of_2(rows)))  # D > 128: ~170 registers at 32 x 32 (64 rows: 255)
    return block_m, 32, 8, 2


def _choose_num_splits(units: int, S: int, min_split_keys: int, num_sms: int) -> int:
    """Splits of the key range per (b, h_kv, m-block); `units` programs exist before splitting."""
    if units == 0 or 2 * units > num_sms:
        return 1
    return max(1, min(num_sms // units, triton.cdiv(S, min_split_keys), _MAX_SPLITS))


def _check_inputs(q, k_cache, v_cache, cache_seqlens, mask, block_table, layout):
    """Shape/dtype/stride/device checks (no value is read). Returns (B, Hq, T, D, Hkv, S, page_size, num_pages)."""
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
        if x.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions, got shape {tuple(x.shape)}.")
    if not isinstance(cache_seqlens, torch.Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}.")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be None or a torch.Tensor, got {type(mask).__name__}.")
    if block_table is not None and not isinstance(block_table, torch.Tensor):
        raise TypeError(f"block_table must be None or a torch.Tensor, got {type(block_table).__name__}.")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'HND' or 'NHD', got {layout!r}.")

    B, Hq, T, D = q.shape
    paged = block_table is not None
    if layout == "HND":
        _, Hkv, S, _ = k_cache.shape
        expected = "(num_pages, Hkv, page_size, D={D})" if paged else "(B={B}, Hkv, S, D={D})"
    else:
        _, S, Hkv, _ = k_cache.shape
        expected = "(num_pages, page_size, Hkv, D={D})" if paged else "(B={B}, S, Hkv, D={D})"
    page_size, num_pages = S, k_cache.shape[0]
    if paged:
        if block_table.dim() != 2 or block_table.shape[0] != B:
            raise ValueError(f"block_table must have shape (B={B}, max_pages), got {tuple(block_table.shape)}.")
        S = block_table.shape[1] * page_size
    if (not paged and k_cache.shape[0] != B) or k_cache.shape[3] != D or (paged and k_cache.shape[0] == 0):
        raise ValueError(f"k_cache must have shape {expected.format(B=B, D=D)} ({layout}"
                         f"{', paged' if paged else ''}) to match q {tuple(q.shape)}, got {tuple(k_cache.shape)}.")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}.")
    if Hq == 0 or Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"the number of query heads Hq={Hq} must be a multiple of the KV heads Hkv={Hkv}.")
    if T == 0 or T > S:
        raise ValueError(f"the number of new tokens T={T} must be in 1..S={S} (the cache length).")
    if not 1 <= D <= 256:
        raise ValueError(f"head dim D={D} is not supported; expected 1 <= D <= 256.")
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
    if paged and block_table.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"block_table must be int32 or int64, got {block_table.dtype}.")

    tensors = [("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)]
    tensors += [("mask", mask)] if mask is not None else []
    tensors += [("block_table", block_table)] if paged else []
    for name, x in tensors:
        if x.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {x.device}.")
    for name, x in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {x.stride()}.")
    return B, Hq, T, D, Hkv, S, page_size, num_pages


class AttentionPlan:
    """Everything the launcher derives from an input signature: the kernel configuration and its non-pointer
    arguments. ``constexprs``/``int_args`` are what Triton compiles a variant for (see ``specialization``)."""

    __slots__ = ("out_shape", "dtype", "device", "default_scale", "grid", "int_args", "constexprs", "options",
                 "num_splits", "part_shape", "combine_grid", "combine_args", "combine_constexprs", "combine_options",
                 "paged", "masked", "cuda_index", "S", "page_size", "num_pages", "fwd_kwargs", "combine_kwargs")

    def fwd_args(self, q, k_cache, v_cache, cache_seqlens, mask, block_table, out, o_part, lse, qk_scale):
        """Positional arguments of `_attn_fwd_kernel` (tensors, or Triton mock tensors when lowering offline)."""
        mask_arg = q if mask is None else mask
        table_arg = cache_seqlens if block_table is None else block_table
        return (q, k_cache, v_cache, cache_seqlens, mask_arg, table_arg, out, o_part, lse, qk_scale, *self.int_args)

    def specialization(self):
        """The part of Triton's compile key this plan determines: constexprs, launch options, and for each int argument
        Triton specialises on, whether it is 1 / a multiple of 16 / neither."""
        names = _attn_fwd_kernel.arg_names[10:10 + len(self.int_args)]
        ints = tuple((n, 1 if v == 1 else 16 if v % 16 == 0 else 0)
                     for n, v in zip(names, self.int_args) if n not in _FWD_NO_SPECIALIZE)
        return tuple(sorted(self.constexprs.items())), tuple(sorted(self.options.items())), ints


def _make_plan(q, k_cache, v_cache, cache_seqlens, mask, block_table, layout, num_splits, num_sms=None):
    B, Hq, T, D, Hkv, S, page_size, num_pages = _check_inputs(q, k_cache, v_cache, cache_seqlens, mask, block_table,
                                                              layout)
    if num_splits is not None and not (isinstance(num_splits, int) and 1 <= num_splits <= _MAX_SPLITS):
        raise ValueError(f"num_splits must be None or an int in 1..{_MAX_SPLITS}, got {num_splits!r}.")
    group = Hq // Hkv
    paged = block_table is not None
    block_d = max(16, triton.next_power_of_2(D))
    rows = T * group
    mask_bits = mask is not None and T <= _MASK_WORD
    block_m, block_n, num_warps, num_stages = _tile_config(rows, block_d, q.dtype)
    num_m_blocks = triton.cdiv(rows, block_m)
    # A split at least as long as the tile is tall writes an fp32 partial no bigger than the K/V it reads.
    min_split_blocks = triton.cdiv(max(block_m, block_n), block_n)
    if num_splits is None:
        units = B * Hkv * num_m_blocks
        sms = _num_sms(q.device) if num_sms is None else num_sms
        num_splits = _choose_num_splits(units, S, min_split_blocks * block_n, sms)
    else:
        min_split_blocks = 1

    # Cache strides as (row or page, head, slot) whatever the layout.
    def cache_strides(x):
        return (x.stride(0), x.stride(1), x.stride(2)) if layout == "HND" else (x.stride(0), x.stride(2), x.stride(1))

    stride_o = (Hq * T * D, T * D, D)  # the contiguous (B, Hq, T, D) output
    if num_splits > 1:
        stride_p = (B * Hq * T * D,)
        stride_l = (B * Hq * T, Hq * T, T)
    else:
        stride_p = (0,)
        stride_l = (0, 0, 0)
    if mask is None:
        stride_m = (0, 0, 0)
    else:
        stride_m = ((0,) + mask.stride()) if mask.dim() == 2 else mask.stride()

    plan = AttentionPlan()
    plan.out_shape = (B, Hq, T, D)
    plan.dtype, plan.device = q.dtype, q.device
    plan.cuda_index = q.device.index if q.device.type == "cuda" else None
    plan.default_scale = 1.0 / math.sqrt(D)
    plan.num_splits = num_splits
    plan.paged, plan.masked = paged, mask is not None
    plan.S, plan.page_size, plan.num_pages = S, page_size, num_pages
    plan.grid = (B * Hkv * num_splits * num_m_blocks,)
    plan.int_args = (
        q.stride(0), q.stride(1), q.stride(2),
        *cache_strides(k_cache), *cache_strides(v_cache),
        block_table.stride(0) if paged else 0,
        *stride_m, *stride_o, *stride_p, *stride_l,
        T, S, Hkv, group, num_splits, num_m_blocks, min_split_blocks, num_pages,
    )
    plan.constexprs = dict(
        D=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, HAS_MASK=mask is not None, MASK_BITS=mask_bits,
        PAGED=paged, PAGE_SIZE=page_size if paged else 1,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    plan.options = dict(num_warps=num_warps, num_stages=num_stages)
    plan.part_shape = (num_splits, B, Hq, T, D)
    plan.combine_grid = (B * Hq * T,)
    plan.combine_args = (B * Hq * T * D, B * Hq * T, num_splits)
    plan.combine_constexprs = dict(D=D, BLOCK_D=block_d)
    plan.combine_options = dict(num_warps=4 if block_d >= 128 else 2)
    plan.fwd_kwargs = {**plan.constexprs, **plan.options}
    plan.combine_kwargs = {**plan.combine_constexprs, **plan.combine_options}
    return plan


_PLANS: dict = {}
_MAX_PLANS = 512


def _signature(q, k_cache, v_cache, cache_seqlens, mask, block_table, layout, num_splits):
    """Everything `_make_plan` reads, as a hashable key. Raises AttributeError for a non-tensor argument."""
    return (q.shape, q.stride(), q.dtype, q.device,
            k_cache.shape, k_cache.stride(), k_cache.dtype, k_cache.device,
            v_cache.shape, v_cache.stride(), v_cache.dtype, v_cache.device,
            cache_seqlens.shape, cache_seqlens.dtype, cache_seqlens.device,
            None if mask is None else (mask.shape, mask.stride(), mask.dtype, mask.device),
            None if block_table is None else (block_table.shape, block_table.stride(), block_table.dtype,
                                              block_table.device),
            layout, num_splits)


def attention_plan(q, k_cache, v_cache, cache_seqlens, mask=None, num_splits=None, *, block_table=None, layout="HND",
                   num_sms=None):
    """The launcher's checks and configuration for these inputs (cached by signature). Reads shapes, strides, dtypes
    and devices only, so meta tensors work. `num_sms` overrides the device's SM count (to plan for a GPU offline)."""
    if num_sms is not None:
        return _make_plan(q, k_cache, v_cache, cache_seqlens, mask, block_table, layout, num_splits, num_sms)
    try:
        key = _signature(q, k_cache, v_cache, cache_seqlens, mask, block_table, layout, num_splits)
    except AttributeError:  # not a tensor: the checks say which
        key = None
    plan = _PLANS.get(key) if key is not None else None
    if plan is None:
        plan = _make_plan(q, k_cache, v_cache, cache_seqlens, mask, block_table, layout, num_splits)
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _launch(q, k_cache, v_cache, cache_seqlens, mask, block_table, sm_scale, num_splits, layout):
    plan = attention_plan(q, k_cache, v_cache, cache_seqlens, mask, num_splits, block_table=block_table,
                          layout=layout)
    out = torch.empty(plan.out_shape, device=q.device, dtype=q.dtype)
    if plan.grid[0] == 0:  # B == 0
        return out
    qk_scale = (plan.default_scale if sm_scale is None else sm_scale) * 1.4426950408889634
    if plan.num_splits > 1:
        o_part = torch.empty(plan.part_shape, device=q.device, dtype=torch.float32)
        lse = torch.empty(plan.part_shape[:4], device=q.device, dtype=torch.float32)
    else:
        o_part = lse = _unused_buffer(q.device)
    mask_arg = None if mask is None else mask.view(torch.uint8)  # same bytes; Triton loads bool pointers as uint8
    args = plan.fwd_args(q, k_cache, v_cache, cache_seqlens, mask_arg, block_table, out, o_part, lse, qk_scale)
    if plan.cuda_index is not None and plan.cuda_index != torch.cuda.current_device():
        with torch.cuda.device(plan.cuda_index):
            _run(plan, args, o_part, lse, out)
    else:
        _run(plan, args, o_part, lse, out)
    return out


@lru_cache(maxsize=None)
def _unused_buffer(device):
    """An fp32 stand-in for the scratch buffers of calls without splits (never read or written)."""
    return torch.empty(1, device=device, dtype=torch.float32)


def _run(plan, args, o_part, lse, out):
    _attn_fwd_kernel[plan.grid](*args, **plan.fwd_kwargs)
    if plan.num_splits > 1:
        _attn_combine_kernel[plan.combine_grid](o_part, lse, out, *plan.combine_args, **plan.combine_kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# The torch operator (compiled graphs see one node) and the public function
# ----------------------------------------------------------------------------------------------------------------------

# Defined with the low-level torch.library API rather than @torch.library.custom_op: the latter's Python wrapper costs
# ~20 us per eager call, this one ~4 us (both measured on CPU, the kernel stubbed out). FRAGMENT: the other kernel
# files may add their operators to the same namespace.
_LIB = torch.library.Library("minipass", "FRAGMENT")
_LIB.define("attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor cache_seqlens, Tensor? mask, "
            "Tensor? block_table, float? sm_scale, int? num_splits, str layout) -> Tensor")
_LIB.impl("attention", _launch, "CompositeExplicitAutograd")


@torch.library.register_fake("minipass::attention", lib=_LIB)
def _attention_fake(q, k_cache, v_cache, cache_seqlens, mask, block_table, sm_scale, num_splits, layout):
    B, Hq, T, D, *_ = _check_inputs(q, k_cache, v_cache, cache_seqlens, mask, block_table, layout)
    return q.new_empty((B, Hq, T, D))


def _check_values(cache_seqlens, mask, block_table, plan):
    T, S = plan.out_shape[2], plan.S
    lengths = cache_seqlens.tolist()  # host sync: the hot path passes check_values=False
    for b, L in enumerate(lengths):
        if L < 0:
            raise ValueError(f"cache_seqlens[{b}] = {L} must be >= 0.")
        if L + T > S:
            raise ValueError(f"cache_seqlens[{b}] + T = {L} + {T} = {L + T} exceeds the cache length S = {S}.")
    if mask is not None and not bool(mask.diagonal(dim1=-2, dim2=-1).all()):
        raise ValueError("mask diagonal must be all True (each new token sees itself).")
    if block_table is not None:
        page_size, num_pages = plan.page_size, plan.num_pages
        for b, (L, row) in enumerate(zip(lengths, block_table.tolist())):
            used = row[:triton.cdiv(L + T, page_size)]
            bad = [p for p in used if not 0 <= p < num_pages]
            if bad:
                raise ValueError(f"block_table[{b}] holds page {bad[0]} among the {len(used)} pages that row {b} uses; "
                                 f"page ids must be in 0..{num_pages - 1}.")


def attention(q, k_cache, v_cache, cache_seqlens, mask=None, sm_scale=None, check_values=True, num_splits=None, *,
              block_table=None, layout="HND"):
    """Attention of q's T new tokens over the cache (math, shapes and grid in the module docstring).

    q: (B, Hq, T, D); k_cache, v_cache: (B, Hkv, S, D) with the new tokens' K/V already at slots L_b .. L_b+T-1, or
    another cache form (``layout="NHD"``: (B, S, Hkv, D); with ``block_table`` (B, P_max) int32: a paged cache
    (num_pages, page_size, Hkv, D) for "NHD" or (num_pages, Hkv, page_size, D) for "HND");
    cache_seqlens: (B,) int32/int64 L_b; mask: None (causal), (T, T) or (B, T, T) bool among the new tokens;
    sm_scale: defaults to 1/sqrt(D). check_values: validate lengths, page ids and the mask diagonal (one host sync;
    pass False in a decoding loop and in compiled graphs). num_splits: split-K override for tests and tuning; None
    picks it from the shapes, an explicit value also lets each split be as short as one key block.
    Returns (B, Hq, T, D), contiguous, in q's dtype. Runs as the operator ``torch.ops.minipass.attention``.
    """
    if check_values:
        plan = attention_plan(q, k_cache, v_cache, cache_seqlens, mask, num_splits, block_table=block_table,
                              layout=layout)
        _check_values(cache_seqlens, mask, block_table, plan)
    if num_splits is not None and not isinstance(num_splits, int):
        raise ValueError(f"num_splits must be None or an int in 1..{_MAX_SPLITS}, got {num_splits!r}.")
    return torch.ops.minipass.attention(q, k_cache, v_cache, cache_seqlens, mask, block_table,
                                        None if sm_scale is None else float(sm_scale), num_splits, layout)


# ----------------------------------------------------------------------------------------------------------------------
# Torch reference
# ----------------------------------------------------------------------------------------------------------------------


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


def gather_cache(cache, block_table=None, layout="HND"):
    """Any cache form as a (B, Hkv, S, D) tensor (a copy when paged or NHD). Paged: S = P_max * page_size; page ids
    out of the pool (padding) are clamped, so the slots they stand for hold some page's data, not an error."""
    if block_table is None:
        return cache if layout == "HND" else cache.transpose(1, 2)
    pages = cache if layout == "NHD" else cache.transpose(1, 2)  # (num_pages, page_size, Hkv, D)
    B, P_max = block_table.shape
    ids = block_table.long().clamp(0, pages.shape[0] - 1)
    rows = pages[ids.flatten()].reshape(B, P_max * pages.shape[1], pages.shape[2], pages.shape[3])
    return rows.transpose(1, 2)  # (B, Hkv, S, D)


def attention_ref(q, k_cache, v_cache, cache_seqlens, mask=None, sm_scale=None, *, block_table=None, layout="HND"):
    """Plain torch reference: fp32 math, output in q's dtype. Takes the same cache forms as `attention`.

    Memory: materialises the (B, Hq, T, S) scores and reads the whole cache, including slots it then ignores
    (zeroed first so garbage in slots >= L_b + T cannot leak in as 0 * NaN).
    """
    k_cache = gather_cache(k_cache, block_table, layout)
    v_cache = gather_cache(v_cache, block_table, layout)
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
