"""Speculative-sampling verification in one launch: accept drafts, resample at the first rejection, add a bonus token.

The rule (Leviathan et al. 2023, Chen et al. 2023; what PaSS uses to check its look-ahead drafts)
------------------------------------------------------------------------------------------------
Row b has n_b drafts d_0..d_{n_b-1}. The verification forward pass gave target distributions p_0..p_{n_b}
(p_k is the target for draft k; p_{n_b} follows the last draft). The drafts were drawn from q_0..q_{n_b-1},
or chosen deterministically (q=None, which means q_k is one-hot on d_k). For k = 0, 1, ...:

    accept d_k           iff  u_accept[b, k] * q_k(d_k) < p_k(d_k)        (u < min(1, p/q), with no division)
    at the first rejection k, emit one token from  r = max(0, p_k - q_k)    (q=None: p_k with p_k(d_k) set to 0)
    if all n_b drafts are accepted, emit a bonus token from p_{n_b}

Sampling from a nonnegative, possibly unnormalised vector r with the uniform u = u_sample[b] is the inverse CDF in
fp32: the smallest index i with r[i] > 0 and cumsum(r)[i] > u * sum(r); if rounding leaves no such index, the last
index with r > 0. If r has no mass (p_k <= q_k everywhere after rounding) sample from p_k instead; if p_k has no mass
either, emit argmax(p_k) (index 0 for an all-zero row). The result is always in [0, V), and it is never a token of
zero mass when the distribution has mass.

Why the emitted token is distributed exactly as a sample from p_k (whatever q is): with a = sum_x min(p(x), q(x)),

    P(emit x) = q(x) * min(1, p(x)/q(x))  +  (1 - a) * max(0, p(x) - q(x)) / sum_y max(0, p(y) - q(y))
              = min(p(x), q(x))           +  max(0, p(x) - q(x))                = p(x),

because sum_y max(0, p(y) - q(y)) = 1 - a when p and q both sum to 1. A deterministic draft is the case q = one-hot:
d is kept with probability p(d), otherwise a token is drawn from p without d, so P(x) = (1 - p(d)) p(x) / (1 - p(d)).
The bonus token is drawn from p_{n_b} directly. Since p_{k+1} is the target given the accepted prefix, the emitted
sequence is distributed as autoregressive sampling from the target. A draft with q_k(d_k) = 0 and p_k(d_k) > 0 is
accepted (0 < p); one with p_k(d_k) = 0 never is. Greedy decoding needs no special case: pass one-hot p (argmax) and
deterministic drafts, and a draft is accepted iff it equals the argmax, which is also the emitted token.

Randomness enters as tensors (u_accept, u_sample), so the kernel and the torch reference agree token for token up to
fp32 summation order: they can differ only where u * mass falls within rounding of a cumsum step, or u * q(d) within
rounding of p(d).

Entry points
------------
accept(p, draft_tokens, num_drafts, u_accept, u_sample, q=None) -> (tokens, num_accepted)     Triton
accept_ref(...)                                                                              torch, same signature
    p             (B, K+1, V) float32/float16/bfloat16   target probabilities; row b uses p[b, 0..n_b]
    q             (B, K, V)   float32/float16/bfloat16   draft probabilities, or None for deterministic drafts
    draft_tokens  (B, K)      int32/int64                entries at k >= n_b are ignored
    num_drafts    (B,)        int32/int64                n_b, clamped to [0, K]
    u_accept      (B, K)      float32 in [0, 1)
    u_sample      (B,)        float32 in [0, 1)
    tokens        (B, K+1)    int64   accepted drafts, then the emitted token at index num_accepted, then -1
    num_accepted  (B,)        int64   the row emits num_accepted + 1 tokens
  Any strides are fine as long as the vocabulary dimension is contiguous. A valid draft outside [0, V) is rejected
  (it is never used as an address). Keyword block_v (a power of two) overrides the vocabulary block size.

accept_from_logits(target_logits, draft_tokens, num_drafts, u_accept, u_sample, draft_logits=None,
                   temperature=1.0, top_k=0, top_p=1.0)                                     Triton
accept_from_logits_ref(...)                                     torch: sampling_probs_ref, then accept_ref
    target_logits (B, K+1, V), draft_logits (B, K, V) or None; other tensors as above.
  The same sampling transform is applied to target and draft logits inside the kernel, so the (B, K+1, V)
  probabilities never reach memory (sampling_probs_ref is the transform in torch):
    temperature 0: one-hot on the argmax (lowest index on ties); top-k and top-p change nothing.
    otherwise softmax(logits / temperature); then top-k (0 < k < V): keep tokens whose logit >= the k-th largest
    logit (ties at the boundary all kept) and renormalise; then top-p (p < 1): keep every token whose probability
    >= t, where t is the probability of the last token, in descending order, whose exclusive cumulative probability
    is < top_p (tied tokens at the boundary all kept, so the set does not depend on the sort), and renormalise.

Grid and memory traffic
-----------------------
grid = (B,): one program per batch row, 4 or 8 warps, the vocabulary walked in blocks of BLOCK_V (default
min(4096, next_power_of_2(V))).
accept: the n_b accept tests are one vector gather of p_k(d_k) and q_k(d_k) (2 K scalars). A full distribution is
  read only at the one position j = num_accepted that needs sampling, in two passes over V:
    pass A: mass of r, mass of p_j, argmax of p_j (reads p_j and q_j once);
    pass B: running sum of per-block sums until the block whose sum crosses u * mass, then tl.cumsum inside that
            block; it stops there, so it reads about half of V on average.
  The torch reference materialises gathers, casts and a (B, V) cumsum in ~20 launches.
accept_from_logits: drafts are tested in order and the loop stops at the first rejection; testing draft k needs the
  transform's statistics of target row k (and of draft row k): max logit, kept-set threshold, normaliser. Per row:
    1 pass                    max, argmax, smallest logit (greedy stops here)
    top-k: <= 32 passes       exact threshold search (below), counting tokens
    1 pass                    normaliser of the top-k set (of all tokens without top-k)
    top-p: <= 32 + 1 passes   threshold search weighting tokens by exp2((l - max) * log2(e) / T), then normaliser
  then passes A and B as above over target (and draft) logits row j, recomputing probabilities on the fly. Under
  greedy decoding the emitted token is argmax(p_j) whatever the drafts were, so it is emitted without those passes.

Thresholds without a sort
-------------------------
A float32 x maps to the int32 key bits(x) if bits(x) >= 0 else bits(x) ^ 0x7FFFFFFF (-0.0 folded into +0.0), whose
signed order is the float order. Both thresholds have the form t = max{ logit v : F(v) >= target } with F(v) = sum
over tokens with logit >= v of a weight: weight 1 and target top_k for top-k; weight exp(l / T) and target
top_p * (mass of the top-k set) for top-p, searching only the top-k set. For top-p this is the reference's t: the
tokens strictly above t have exclusive cumulative mass < top_p and the tokens at or above it reach top_p; since
probability increases with the logit, {p >= t} is {logit >= t's logit}. (If rounding leaves no v with F(v) >=
target, t is the smallest candidate and every candidate is kept, as in the reference.)

The search keeps lo, a token's key with F(lo) >= target, and hi with F(hi) < target, probes
mid = floor((lo + hi) / 2) in one pass, and moves lo up to the smallest key >= mid or hi down to mid. It stops as
soon as no token lies strictly between lo and hi. Every step halves an interval of at most 2^32 keys, so it takes at
most 32 passes (typically 10-20 for real logits), and t = lo is exact: the top-k set equals the sorted reference's,
ties included.

Limits: the top-p criterion sums fp32 exponentials in block order while the reference sums sorted fp32
probabilities, so when the exclusive cumulative probability at the boundary is within fp32 rounding of top_p (~1e-6
relative) the two may keep a different boundary token; two different logits whose probabilities round to the same
fp32 value are a tie for the reference but not for the kernel. Probabilities are exp2((l - max) * log2(e) / T) / Z
in fp32, within a few ulp of torch.softmax, so an accept test or an inverse-CDF step within that rounding can flip.
Counts are fp32 (exact up to V = 2^24). Logits must be finite or -inf; with NaN or +inf the output is unspecified
but still in [0, V).

Example
-------
    B, K, V = 4, 3, 32000
    p = torch.softmax(torch.randn(B, K + 1, V, device="cuda"), -1)          # from the verification pass
    q = torch.softmax(torch.randn(B, K, V, device="cuda"), -1)              # the draft distributions
    drafts = torch.multinomial(q.flatten(0, 1), 1).view(B, K)
    n = torch.tensor([3, 1, 0, 2], device="cuda")
    u_accept = torch.rand(B, K, device="cuda"); u_sample = torch.rand(B, device="cuda")
    tokens, num_accepted = accept(p, drafts, n, u_accept, u_sample, q=q)   # tokens[b, :num_accepted[b] + 1]
"""

import math
import os

import torch
import triton
import triton.language as tl

_INT32_MAX = tl.constexpr(2**31 - 1)
_INT32_MIN = tl.constexpr(-(2**31))
_LOG2E = math.log2(math.e)
_FP32_MAX = 3.4028234663852886e38
_MAX_BLOCK_V = 4096


# ----------------------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _order_key(x):
    # Signed int32 order equals fp32 order, so a bisection over keys visits every float once and ends in 32 halvings.
    # -0.0 and +0.0 compare equal as floats, so they must share a key.
    x = tl.where(x == 0.0, 0.0, x)
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _floor_avg(lo, hi):
    # floor((lo + hi) / 2) without int32 overflow: keys span the whole int32 range.
    return (lo & hi) + ((lo ^ hi) >> 1)


@triton.jit
def _exp_mass(row_ptr, V, m, c, thr, BLOCK_V: tl.constexpr):
    offs0 = tl.arange(0, BLOCK_V)
    z = 0.0
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        mask = offs < V
        l = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        z += tl.sum(tl.where(mask & (_order_key(l) >= thr), tl.exp2((l - m) * c), 0.0), 0)
    return z


@triton.jit
def _search_threshold(row_ptr, V, m, c, lo, hi, target, BY_COUNT: tl.constexpr, BLOCK_V: tl.constexpr):
    """Key t = max{token key v : F(v) >= target}, F(v) = count (BY_COUNT) or exp-mass of tokens with key >= v.

    Needs lo = a token's key with F(lo) >= target (if no key qualifies, lo = the smallest key allowed, which is
    returned) and F(hi) < target."""
    offs0 = tl.arange(0, BLOCK_V)
    mid = _floor_avg(lo, hi)
    steps = 0
    # mid == lo means hi == lo + 1 or the last probe showed no token strictly inside (lo, hi): t == lo.
    # The step cap only matters for NaN logits, where the invariants do not hold.
    while (mid != lo) & (steps < 33):
        f = 0.0
        above_min = _INT32_MAX
        below_max = _INT32_MIN
        for start in range(0, V, BLOCK_V):
            offs = start + offs0
            mask = offs < V
            l = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            key = _order_key(l)
            above = mask & (key >= mid)
            if BY_COUNT:
                f += tl.sum(above.to(tl.float32), 0)
            else:
                f += tl.sum(tl.where(above, tl.exp2((l - m) * c), 0.0), 0)
            above_min = tl.minimum(above_min, tl.min(tl.where(above, key, _INT32_MAX), 0))
            below_max = tl.maximum(below_max, tl.max(tl.where(mask & (key < mid), key, _INT32_MIN), 0))
        ge = f >= target
        settled = (ge == 0) & (below_max <= lo)
        # Snapping lo to a token's key (not to mid) is what lets the search stop before 32 steps.
        lo = tl.where(ge, above_min, lo)
        hi = tl.where(ge, hi, mid)
        mid = tl.where(settled, lo, _floor_avg(lo, hi))
        steps += 1
    return lo


@triton.jit
def _row_stats(row_ptr, V, c, top_k, top_p,
               GREEDY: tl.constexpr, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr, BLOCK_V: tl.constexpr):
    """Statistics that define the transformed distribution of one logits row:
    p_i = exp2((l_i - m) * c) / z if key(l_i) >= thr else 0, or one-hot on amax when GREEDY."""
    offs0 = tl.arange(0, BLOCK_V)
    m = float("-inf")
    amax = 0
    kmin = _INT32_MAX
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        mask = offs < V
        l = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        block_max = tl.max(l, 0)
        # Strict > keeps the earliest block on ties, and tl.argmax the lowest index within a block.
        amax = tl.where(block_max > m, start + tl.argmax(l, 0), amax)
        m = tl.maximum(m, block_max)
        kmin = tl.minimum(kmin, tl.min(tl.where(mask, _order_key(l), _INT32_MAX), 0))
    # An all -inf row has no mass; a finite m keeps (l - m) from being inf - inf = NaN.
    m = tl.maximum(m, -3.4028234663852886e38)
    thr = kmin
    z = 1.0
    if not GREEDY:
        hi = _order_key(m) + 1
        if USE_TOP_K:
            thr = _search_threshold(row_ptr, V, m, c, kmin, hi, top_k, True, BLOCK_V)
        z = _exp_mass(row_ptr, V, m, c, thr, BLOCK_V)
        if USE_TOP_P:
            thr = _search_threshold(row_ptr, V, m, c, thr, hi, top_p * z, False, BLOCK_V)
            z = _exp_mass(row_ptr, V, m, c, thr, BLOCK_V)
        z = tl.where(z > 0.0, z, 1.0)
    return m, thr, z, amax


@triton.jit
def _probs(row_ptr, offs, mask, m, c, thr, z, amax, FROM_LOGITS: tl.constexpr, GREEDY: tl.constexpr):
    # fp32 probabilities at offs (a block or one index); 0 where mask is off.
    if FROM_LOGITS:
        if GREEDY:
            x = tl.where(mask & (offs == amax), 1.0, 0.0)
        else:
            l = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            x = tl.where(mask & (_order_key(l) >= thr), tl.exp2((l - m) * c) / z, 0.0)
    else:
        x = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return x


@triton.jit
def _residual(p, q_row, offs, q_mask, zero_tok, qm, qc, qthr, qz, qamax,
              FROM_LOGITS: tl.constexpr, GREEDY: tl.constexpr, HAS_Q: tl.constexpr):
    # q_mask is off at the bonus position (and past V), where r is p itself.
    if HAS_Q:
        q = _probs(q_row, offs, q_mask, qm, qc, qthr, qz, qamax, FROM_LOGITS, GREEDY)
        r = tl.maximum(p - q, 0.0)
    else:
        r = tl.where(offs == zero_tok, 0.0, tl.maximum(p, 0.0))
    return r


@triton.jit
def _sample(p_row, q_row, V, u, subtract, zero_tok,
            pm, pc, pthr, pz, pamax, qm, qc, qthr, qz, qamax,
            FROM_LOGITS: tl.constexpr, GREEDY: tl.constexpr, HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr):
    offs0 = tl.arange(0, BLOCK_V)
    # q is read only at a rejected draft's position. (A limit, not `mask & subtract`: mixing a scalar and a block
    # of booleans yields int32 in the Triton interpreter.)
    q_end = tl.where(subtract, V, 0)

    # Pass A: the masses decide which distribution to sample; argmax is the last resort.
    mass_r = 0.0
    mass_p = 0.0
    best = float("-inf")
    best_i = 0
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        mask = offs < V
        p = _probs(p_row, offs, mask, pm, pc, pthr, pz, pamax, FROM_LOGITS, GREEDY)
        r = _residual(p, q_row, offs, offs < q_end, zero_tok, qm, qc, qthr, qz, qamax, FROM_LOGITS, GREEDY, HAS_Q)
        mass_r += tl.sum(r, 0)
        mass_p += tl.sum(tl.maximum(p, 0.0), 0)
        pv = tl.where(mask, p, float("-inf"))
        block_max = tl.max(pv, 0)
        best_i = tl.where(block_max > best, start + tl.argmax(pv, 0), best_i)
        best = tl.maximum(best, block_max)
    use_r = mass_r > 0.0
    has_mass = use_r | (mass_p > 0.0)
    target = u * tl.where(use_r, mass_r, mass_p)

    # Pass B: block sums are added in the same order as in pass A, so the running sum reaches mass exactly and the
    # crossing block is found with the same arithmetic; only inside it does tl.cumsum's rounding enter.
    q_end_b = tl.where(use_r, q_end, 0)
    cum = 0.0
    tok = -1
    last = -1
    start = 0
    while has_mass & (tok < 0) & (start < V):
        offs = start + offs0
        mask = offs < V
        p = _probs(p_row, offs, mask, pm, pc, pthr, pz, pamax, FROM_LOGITS, GREEDY)
        r = _residual(p, q_row, offs, offs < q_end_b, zero_tok, qm, qc, qthr, qz, qamax, FROM_LOGITS, GREEDY, HAS_Q)
        x = tl.where(use_r, r, tl.maximum(p, 0.0))
        s = tl.sum(x, 0)
        cdf = cum + tl.cumsum(x, 0)
        # x > 0: a scan's rounding must never make a zero-mass token the first to cross.
        first = tl.min(tl.where((cdf > target) & (x > 0.0), offs, V), 0)
        last_pos = tl.max(tl.where(x > 0.0, offs, -1), 0)
        block_tok = tl.where(first < V, first, last_pos)
        tok = tl.where(cum + s > target, block_tok, tok)
        last = tl.maximum(last, last_pos)
        cum += s
        start += BLOCK_V
    # No block crossed: only when u >= 1 or an input is not finite, since for u < 1 u * mass < mass and the running
    # sum ends at exactly mass.
    tok = tl.where(tok >= 0, tok, last)
    tok = tl.where(has_mass, tok, best_i)
    return tl.minimum(tl.maximum(tok, 0), V - 1)


@triton.jit
def _write_row(tok_ptr, nacc_ptr, b, stride_tb, K, ks, drafts, j, tok):
    out = tl.where(ks < j, drafts.to(tl.int64), tl.where(ks == j, tok.to(tl.int64), -1))
    tl.store(tok_ptr + b * stride_tb + ks, out, mask=ks < K + 1)
    tl.store(nacc_ptr + b, j.to(tl.int64))


@triton.jit
def _accept_kernel(
    p_ptr, q_ptr, draft_ptr, n_ptr, ua_ptr, us_ptr, tok_ptr, nacc_ptr,
    K, V,
    stride_pb, stride_pk, stride_qb, stride_qk, stride_db, stride_dk, stride_nb,
    stride_uab, stride_uak, stride_usb, stride_tb,
    HAS_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(n_ptr + b * stride_nb)
    n = tl.minimum(tl.maximum(n, 0), K).to(tl.int32)  # clamp before narrowing

    # All accept tests at once: 2 K scalar gathers are cheaper than a dependent load chain, and only positions
    # up to the first rejection matter.
    ks = tl.arange(0, BLOCK_K)  # BLOCK_K >= K + 1: the lane at K holds the bonus slot of the output
    ks64 = ks.to(tl.int64)
    valid = ks < n
    d = tl.load(draft_ptr + b * stride_db + ks64 * stride_dk, mask=valid, other=-1)
    # Range-check before narrowing: a garbage int64 must not wrap into [0, V).
    d_ok = valid & (d >= 0) & (d < V)
    d = tl.where(d_ok, d, -1).to(tl.int32)
    p_d = tl.load(p_ptr + b * stride_pb + ks64 * stride_pk + d, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_Q:
        q_d = tl.load(q_ptr + b * stride_qb + ks64 * stride_qk + d, mask=d_ok, other=0.0).to(tl.float32)
    else:
        q_d = tl.full([BLOCK_K], 1.0, tl.float32)
    u_a = tl.load(ua_ptr + b * stride_uab + ks64 * stride_uak, mask=valid, other=1.0)
    accepted = d_ok & (u_a * q_d < p_d)
    j = tl.minimum(tl.min(tl.where(accepted, BLOCK_K, ks), 0), n)  # length of the leading run of accepts

    subtract = j < n
    zero_tok = tl.where(subtract, tl.sum(tl.where(ks == j, d, 0), 0), -1)  # the rejected draft, if any
    u = tl.load(us_ptr + b * stride_usb)
    j64 = j.to(tl.int64)
    tok = _sample(p_ptr + b * stride_pb + j64 * stride_pk, q_ptr + b * stride_qb + j64 * stride_qk, V, u,
                  subtract, zero_tok,
                  0.0, 1.0, 0, 1.0, 0, 0.0, 1.0, 0, 1.0, 0,  # logit statistics, unused for probabilities
                  False, False, HAS_Q, BLOCK_V)
    _write_row(tok_ptr, nacc_ptr, b, stride_tb, K, ks, d, j, tok)


@triton.jit
def _accept_logits_kernel(
    t_ptr, q_ptr, draft_ptr, n_ptr, ua_ptr, us_ptr, tok_ptr, nacc_ptr,
    K, V, c, top_k, top_p,
    stride_tb, stride_tk, stride_qb, stride_qk, stride_db, stride_dk, stride_nb,
    stride_uab, stride_uak, stride_usb, stride_ob,
    HAS_Q: tl.constexpr, GREEDY: tl.constexpr, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    n = tl.load(n_ptr + b * stride_nb)
    n = tl.minimum(tl.maximum(n, 0), K).to(tl.int32)  # clamp before narrowing
    t_row0 = t_ptr + b * stride_tb
    q_row0 = q_ptr + b * stride_qb

    # Transforming a row costs many passes over V, so drafts are tested one at a time and the loop stops at the
    # first rejection. On exit the statistics held are those of row j = num_accepted, the one to sample.
    k = 0
    go = True
    pm, pthr, pz, pamax = 0.0, 0, 1.0, 0
    qm, qthr, qz, qamax = 0.0, 0, 1.0, 0
    while go:
        k64 = k.to(tl.int64)
        pm, pthr, pz, pamax = _row_stats(t_row0 + k64 * stride_tk, V, c, top_k, top_p,
                                         GREEDY, USE_TOP_K, USE_TOP_P, BLOCK_V)
        go = k < n
        if go:
            d = tl.load(draft_ptr + b * stride_db + k64 * stride_dk)
            d_ok = (d >= 0) & (d < V)
            d = tl.where(d_ok, d, -1).to(tl.int32)
            p_d = _probs(t_row0 + k64 * stride_tk, d, d_ok, pm, c, pthr, pz, pamax, True, GREEDY)
            q_d = 1.0
            if HAS_Q:
                qm, qthr, qz, qamax = _row_stats(q_row0 + k64 * stride_qk, V, c, top_k, top_p,
                                                 GREEDY, USE_TOP_K, USE_TOP_P, BLOCK_V)
                q_d = _probs(q_row0 + k64 * stride_qk, d, d_ok, qm, c, qthr, qz, qamax, True, GREEDY)
            u_a = tl.load(ua_ptr + b * stride_uab + k64 * stride_uak)
            go = d_ok & (u_a * q_d < p_d)
            k += go.to(tl.int32)
    j = k

    ks = tl.arange(0, BLOCK_K)
    valid = ks < n
    drafts = tl.load(draft_ptr + b * stride_db + ks.to(tl.int64) * stride_dk, mask=valid, other=-1)
    d_ok = valid & (drafts >= 0) & (drafts < V)
    drafts = tl.where(d_ok, drafts, -1).to(tl.int32)
    if GREEDY:
        # p_j is one-hot on its argmax, and the residual of a rejected draft (or its fallback to p_j) is that same
        # one-hot, so the rule always emits argmax(p_j): no sampling pass is needed.
        tok = pamax
    else:
        subtract = j < n
        zero_tok = tl.where(subtract, tl.sum(tl.where(ks == j, drafts, 0), 0), -1)
        u = tl.load(us_ptr + b * stride_usb)
        j64 = j.to(tl.int64)
        tok = _sample(t_row0 + j64 * stride_tk, q_row0 + j64 * stride_qk, V, u, subtract, zero_tok,
                      pm, c, pthr, pz, pamax, qm, c, qthr, qz, qamax,
                      True, False, HAS_Q, BLOCK_V)
    _write_row(tok_ptr, nacc_ptr, b, stride_ob, K, ks, drafts, j, tok)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int64, torch.int32)


def _check_tensor(name, x, shape, dtypes, device, dtype_words, p_name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}.")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be {dtype_words}, got {x.dtype}.")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like {p_name}, got {x.device}.")


def _check_inputs(p_name, p, q_name, q, draft_tokens, num_drafts, u_accept, u_sample):
    if not isinstance(p, torch.Tensor):
        raise TypeError(f"{p_name} must be a torch.Tensor, got {type(p).__name__}.")
    if p.dim() != 3 or p.shape[1] < 1 or p.shape[2] < 1:
        raise ValueError(f"{p_name} must have shape (B, K+1, V) with K+1 >= 1 and V >= 1, got {tuple(p.shape)}.")
    B, K, V = p.shape[0], p.shape[1] - 1, p.shape[2]
    device = p.device
    _check_tensor(p_name, p, (B, K + 1, V), _FLOATS, device, "float32, float16 or bfloat16", p_name)
    if p.stride(2) != 1 and V > 1:
        raise ValueError(f"{p_name} must be contiguous in its last (vocabulary) dimension, got strides {p.stride()}.")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(f"{p_name} must be on a CUDA device for the Triton kernel (or set TRITON_INTERPRET=1 to "
                         f"run it on the CPU), got {device}.")
    if q is not None:
        _check_tensor(q_name, q, (B, K, V), _FLOATS, device, "float32, float16 or bfloat16", p_name)
        if q.stride(2) != 1 and V > 1:
            raise ValueError(f"{q_name} must be contiguous in its last (vocabulary) dimension, "
                             f"got strides {q.stride()}.")
    _check_tensor("draft_tokens", draft_tokens, (B, K), _INTS, device, "int32 or int64", p_name)
    _check_tensor("num_drafts", num_drafts, (B,), _INTS, device, "int32 or int64", p_name)
    _check_tensor("u_accept", u_accept, (B, K), (torch.float32,), device, "float32", p_name)
    _check_tensor("u_sample", u_sample, (B,), (torch.float32,), device, "float32", p_name)
    return B, K, V


def _launch_config(V, block_v):
    if block_v is None:
        block_v = min(_MAX_BLOCK_V, triton.next_power_of_2(V))
    elif not isinstance(block_v, int) or block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v!r}.")
    return block_v, (8 if block_v >= 2048 else 4)


def _stand_ins(K, q, draft_tokens, num_drafts, u_accept, u_sample):
    # With K = 0 the draft-side tensors are empty; every load from them is masked off, but pass a real allocation
    # so no launcher ever sees a null pointer.
    if K == 0:
        return None, num_drafts, u_sample
    return q, draft_tokens, u_accept


def accept(p, draft_tokens, num_drafts, u_accept, u_sample, q=None, *, block_v=None):
    """Verify drafts against target probabilities p: (tokens (B, K+1) int64, num_accepted (B,) int64).

    See the module docstring for the rule and the shapes. block_v (a power of two) overrides the vocabulary block."""
    B, K, V = _check_inputs("p", p, "q", q, draft_tokens, num_drafts, u_accept, u_sample)
    tokens = torch.empty((B, K + 1), dtype=torch.int64, device=p.device)
    num_accepted = torch.empty((B,), dtype=torch.int64, device=p.device)
    if B == 0:
        return tokens, num_accepted
    BLOCK_V, num_warps = _launch_config(V, block_v)
    q_arg, d_arg, ua_arg = _stand_ins(K, q, draft_tokens, num_drafts, u_accept, u_sample)
    has_q = q_arg is not None
    q_arg = q_arg if has_q else p
    _accept_kernel[(B,)](
        p, q_arg, d_arg, num_drafts, ua_arg, u_sample, tokens, num_accepted,
        K, V,
        p.stride(0), p.stride(1), q_arg.stride(0), q_arg.stride(1),
        d_arg.stride(0), d_arg.stride(-1), num_drafts.stride(0),
        ua_arg.stride(0), ua_arg.stride(-1), u_sample.stride(0), tokens.stride(0),
        HAS_Q=has_q, BLOCK_K=triton.next_power_of_2(K + 1), BLOCK_V=BLOCK_V, num_warps=num_warps,
    )
    return tokens, num_accepted


def _check_transform(temperature, top_k, top_p):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}.")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1 disables it), got {top_p!r}.")


def accept_from_logits(target_logits, draft_tokens, num_drafts, u_accept, u_sample, draft_logits=None,
                       temperature=1.0, top_k=0, top_p=1.0, *, block_v=None):
    """accept() on sampling_probs_ref(logits, temperature, top_k, top_p), with the transform fused into the kernel.

    draft_logits=None means deterministic drafts. See the module docstring for the search limits."""
    B, K, V = _check_inputs("target_logits", target_logits, "draft_logits", draft_logits,
                            draft_tokens, num_drafts, u_accept, u_sample)
    _check_transform(temperature, top_k, top_p)
    if V >= 2**24:
        raise ValueError(f"target_logits has V = {V}; the top-k search counts in fp32 and needs V < 2**24.")
    tokens = torch.empty((B, K + 1), dtype=torch.int64, device=target_logits.device)
    num_accepted = torch.empty((B,), dtype=torch.int64, device=target_logits.device)
    if B == 0:
        return tokens, num_accepted
    BLOCK_V, num_warps = _launch_config(V, block_v)
    q_arg, d_arg, ua_arg = _stand_ins(K, draft_logits, draft_tokens, num_drafts, u_accept, u_sample)
    has_q = q_arg is not None
    q_arg = q_arg if has_q else target_logits
    greedy = temperature == 0
    # Clamped so a denormal temperature cannot turn (l - max) * c into 0 * inf.
    c = 1.0 if greedy else min(_LOG2E / temperature, _FP32_MAX)
    _accept_logits_kernel[(B,)](
        target_logits, q_arg, d_arg, num_drafts, ua_arg, u_sample, tokens, num_accepted,
        K, V, c, float(top_k), float(top_p),
        target_logits.stride(0), target_logits.stride(1), q_arg.stride(0), q_arg.stride(1),
        d_arg.stride(0), d_arg.stride(-1), num_drafts.stride(0),
        ua_arg.stride(0), ua_arg.stride(-1), u_sample.stride(0), tokens.stride(0),
        HAS_Q=has_q, GREEDY=greedy, USE_TOP_K=0 < top_k < V, USE_TOP_P=top_p < 1,
        BLOCK_K=triton.next_power_of_2(K + 1), BLOCK_V=BLOCK_V, num_warps=num_warps,
    )
    return tokens, num_accepted


# ----------------------------------------------------------------------------------------------------------------------
# Torch references
# ----------------------------------------------------------------------------------------------------------------------


def _sample_ref(r, p, u):
    """Inverse-CDF sample per row of r (B, V) with u (B,), falling back to p, then to argmax(p)."""
    V = r.shape[-1]
    p_pos = p.clamp_min(0)
    mass_r, mass_p = r.sum(-1), p_pos.sum(-1)
    use_r = mass_r > 0
    x = torch.where(use_r[:, None], r, p_pos)                       # (B, V)
    mass = torch.where(use_r, mass_r, mass_p)
    hit = (x.cumsum(-1) > (u * mass)[:, None]) & (x > 0)
    first = hit.int().argmax(-1)                                    # argmax returns the first maximal index
    last_pos = V - 1 - (x > 0).flip(-1).int().argmax(-1)
    tok = torch.where(hit.any(-1), first, last_pos)
    return torch.where(mass > 0, tok, p.argmax(-1))


def accept_ref(p, draft_tokens, num_drafts, u_accept, u_sample, q=None):
    """Torch reference for accept(): same signature, same outputs, vectorised over rows."""
    B, K1, V = p.shape
    K = K1 - 1
    dev = p.device
    rows = torch.arange(B, device=dev)
    p = p.float()
    n = num_drafts.long().clamp(0, K)
    d = draft_tokens.long()
    d_ok = (torch.arange(K, device=dev) < n[:, None]) & (d >= 0) & (d < V)          # (B, K)
    d_safe = torch.where(d_ok, d, 0)[..., None]                                      # (B, K, 1)
    p_d = p[:, :K].gather(2, d_safe)[..., 0]                                         # (B, K)
    q_d = q.float().gather(2, d_safe)[..., 0] if q is not None else torch.ones_like(p_d)
    accepted = d_ok & (u_accept * q_d < p_d)
    j = accepted.long().cumprod(1).sum(1)                                            # leading run of accepts, (B,)

    p_j = p[rows, j]                                                                 # (B, V)
    r = p_j.clamp_min(0)
    if K > 0:
        rejected = j < n
        jk = j.clamp(max=K - 1)
        if q is not None:
            r = torch.where(rejected[:, None], (p_j - q.float()[rows, jk]).clamp_min(0), r)
        else:
            d_j = torch.where(rejected & d_ok[rows, jk], d[rows, jk], -1)
            r = torch.where(torch.arange(V, device=dev) == d_j[:, None], 0.0, r)
    tok = _sample_ref(r, p_j, u_sample)

    tokens = torch.full((B, K + 1), -1, dtype=torch.int64, device=dev)
    tokens[:, :K] = torch.where(torch.arange(K, device=dev) < j[:, None], d, -1)
    tokens[rows, j] = tok
    return tokens, j


def sampling_probs_ref(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The sampling transform (temperature, then top-k, then top-p) in fp32 over the last dimension."""
    logits = logits.float()
    V = logits.shape[-1]
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), V).float()
    probs = torch.softmax(logits / temperature, -1)
    if 0 < top_k < V:
        kth = logits.topk(top_k, -1).values[..., -1:]
        probs = torch.where(logits >= kth, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    if top_p < 1:
        sorted_p = probs.sort(-1, descending=True).values
        exclusive = torch.cat([torch.zeros_like(sorted_p[..., :1]), sorted_p.cumsum(-1)[..., :-1]], -1)
        last = (exclusive < top_p).sum(-1, keepdim=True) - 1
        t = sorted_p.gather(-1, last)
        probs = torch.where(probs >= t, probs, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def accept_from_logits_ref(target_logits, draft_tokens, num_drafts, u_accept, u_sample, draft_logits=None,
                           temperature=1.0, top_k=0, top_p=1.0):
    """Torch reference for accept_from_logits(): the transform, then accept_ref."""
    p = sampling_probs_ref(target_logits, temperature, top_k, top_p)
    q = None if draft_logits is None else sampling_probs_ref(draft_logits, temperature, top_k, top_p)
    return accept_ref(p, draft_tokens, num_drafts, u_accept, u_sample, q)

