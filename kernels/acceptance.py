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
zero mass when the distribution has mass (for a valid row; see Invalid rows).

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

Invalid rows
------------
A row is invalid when a value the rule reads is not finite (NaN, +inf or -inf; probabilities are read in fp32).
The rule reads p_k(d_k) and q_k(d_k) for each draft it tests, then all of p_j and, after a rejection with q given,
all of q_j (j = num_accepted). A non-finite p_k(d_k) or q_k(d_k) fails the accept test, so the row stops at that
k = j and the full read of p_j or q_j finds it: a row is invalid iff p_j, or q_j when it is read, holds a value
that is not finite. Values the rule never reads (p_k(x) for x != d_k and k < j, rows past j) are not looked at.
An invalid row gets num_accepted = -1 and all its output tokens -1; no token of it is emitted. Other rows are not
affected. The check rides along pass A (below): it costs no extra read. (Uniforms are not checked: NaN or values
outside [0, 1) still give a token of the row, the last or first with mass.)

Entry points
------------
accept(p, draft_tokens, num_drafts, u_accept, u_sample, q=None, *, check_values=True, block_v=None)
    -> (tokens, num_accepted)                                                                     Triton
accept_ref(p, draft_tokens, num_drafts, u_accept, u_sample, q=None)                               torch, same outputs
  Padded form (p is 3-D):
    p             (B, K+1, V) float32/float16/bfloat16   target probabilities; row b uses p[b, 0..n_b]
    q             (B, K, V)   float32/float16/bfloat16   draft probabilities, or None for deterministic drafts
    draft_tokens  (B, K)      int32/int64                entries at k >= n_b are ignored
    num_drafts    (B,)        int32/int64                n_b, clamped to [0, K]
    u_accept      (B, K)      float32 in [0, 1)
    u_sample      (B,)        float32 in [0, 1)
    tokens        (B, K+1)    int64   accepted drafts, then the emitted token at index num_accepted, then -1
    num_accepted  (B,)        int64   the row emits num_accepted + 1 tokens; -1 for an invalid row
  Flattened form (p is 2-D), the layout of an engine's verification batch: row b's query tokens are its last
  token and its n_b drafts, all rows concatenated, and the model's outputs for them are p's rows as they come.
  With T = sum n_b and start_b = cu_num_drafts[b]:
    p             (T+B, V)    float32/float16/bfloat16   row b's targets p_0..p_{n_b} are rows start_b + b + k
    q             (T, V)      float32/float16/bfloat16   row b's draft k is row start_b + k; or None
    draft_tokens  (T,)        int32/int64                row b's drafts are entries start_b .. start_b + n_b - 1
    num_drafts    (B+1,)      int32/int64                cu_num_drafts: 0, n_0, n_0 + n_1, ..., T
    u_accept      (T,)        float32 in [0, 1)          laid out like draft_tokens
    u_sample      (B,)        float32 in [0, 1)
    tokens        (T+B,)      int64   laid out like p: row b's entries start_b + b .. start_b + b + n_b hold its
                                      accepted drafts, the emitted token at offset num_accepted, then -1
    num_accepted  (B,)        int64   as in the padded form
  The same kernel serves both forms (only the row offsets differ), so a row's output does not depend on the form.
  check_values=True checks cu_num_drafts on the host (0 first, T last, never decreasing), which synchronises; a
  hot path passes False, and the kernel then clamps each row's extent into [0, T] so that it never reads or writes
  out of bounds (with malformed offsets the rows are garbage, but every output entry is -1 or in [0, V)). The reference pads the flattened rows to the longest one, which reads cu_num_drafts on the host.
  Any strides are fine as long as the vocabulary dimension is contiguous. A valid draft outside [0, V) is rejected
  (it is never used as an address). Keyword block_v (a power of two) overrides the vocabulary block size.

accept_from_logits(target_logits, draft_tokens, num_drafts, u_accept, u_sample, draft_logits=None,
                   temperature=1.0, top_k=0, top_p=1.0, *, check_values=True, block_v=None)   Triton
accept_from_logits_ref(...)                                     torch: sampling_probs_ref, then accept_ref's rule
    target_logits (B, K+1, V) or (T+B, V), draft_logits (B, K, V) or (T, V) or None; other tensors as above.
  Invalid rows: the logits rows the kernel transforms are read in full (target rows 0..j, and the draft rows of the
  drafts it tests, 0..min(j, n_b - 1)). Target row k and draft row k are transformed before draft k is tested, and
  the row stops at the first transformed row holding NaN or +inf (-inf masks a token and is fine): the row is then
  invalid, with the same outputs as above. The check rides along the first pass over each row.
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
min(4096, next_power_of_2(V))), the drafts in chunks of BLOCK_K = min(32, next_power_of_2(K + 1)) (flattened:
of T + 1).
accept: the accept tests are vector gathers of p_k(d_k) and q_k(d_k), one chunk of drafts at a time, stopping at
  the chunk of the first rejection (one chunk for K < 32). A full distribution is read only at the one position
  j = num_accepted that needs sampling, in two passes over V:
    pass A: mass of r, mass of p_j, argmax of p_j, finiteness of p_j (and q_j) (reads p_j and q_j once);
    pass B: running sum of per-block sums until the block whose sum crosses u * mass, then tl.cumsum inside that
            block; it stops there, so it reads about half of V on average.
  The torch reference materialises gathers, casts and a (B, V) cumsum in ~20 launches.
accept_from_logits: drafts are tested in order and the loop stops at the first rejection; testing draft k needs the
  transform's statistics of target row k (and of draft row k): max logit, kept-set threshold, normaliser. Per row:
    1 pass                    max, argmax, smallest logit, NaN/+inf check (greedy stops here)
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
Counts are fp32 (exact up to V = 2^24).

Torch ops
---------
The launchers are registered with torch.library as minipass::accept and minipass::accept_from_logits, with fake
(meta) implementations, so torch.compile(fullgraph=True) keeps each call as one op in its graph:
    torch.ops.minipass.accept(p, draft_tokens, num_drafts, u_accept, u_sample, q, check_values, block_v)
    torch.ops.minipass.accept_from_logits(target_logits, draft_tokens, num_drafts, u_accept, u_sample,
                                          draft_logits, temperature, top_k, top_p, check_values, block_v)
accept() and accept_from_logits() check the Python arguments and call these. The input checks (shapes, strides,
dtypes, devices) run once per distinct input signature and are cached, so a decoding loop pays a dictionary
lookup per call; the fake implementations run them while a graph is traced.

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
    # The step cap is a guard: rows holding NaN, for which the invariants fail, are never searched.
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
    p_i = exp2((l_i - m) * c) / z if key(l_i) >= thr else 0, or one-hot on amax when GREEDY; and whether the row
    holds NaN or +inf (then the other statistics are meaningless)."""
    offs0 = tl.arange(0, BLOCK_V)
    m = float("-inf")
    amax = 0
    kmin = _INT32_MAX
    n_bad = 0
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        mask = offs < V
        l = tl.load(row_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
        block_max = tl.max(l, 0)
        # Strict > keeps the earliest block on ties, and tl.argmax the lowest index within a block.
        amax = tl.where(block_max > m, start + tl.argmax(l, 0), amax)
        m = tl.maximum(m, block_max)
        kmin = tl.minimum(kmin, tl.min(tl.where(mask, _order_key(l), _INT32_MAX), 0))
        # -inf is a masked token; NaN and +inf have no meaning as logits (l != l is NaN).
        n_bad += tl.sum(((l != l) | (l == float("inf"))).to(tl.int32), 0)
    bad = n_bad > 0
    # An all -inf row has no mass; a finite m keeps (l - m) from being inf - inf = NaN (also in an invalid row,
    # whose probabilities are computed and discarded).
    m = tl.where(bad, 0.0, tl.maximum(m, -3.4028234663852886e38))
    thr = kmin
    z = 1.0
    if not GREEDY:
        if n_bad == 0:
            hi = _order_key(m) + 1
            if USE_TOP_K:
                thr = _search_threshold(row_ptr, V, m, c, kmin, hi, top_k, True, BLOCK_V)
            z = _exp_mass(row_ptr, V, m, c, thr, BLOCK_V)
            if USE_TOP_P:
                thr = _search_threshold(row_ptr, V, m, c, thr, hi, top_p * z, False, BLOCK_V)
                z = _exp_mass(row_ptr, V, m, c, thr, BLOCK_V)
            z = tl.where(z > 0.0, z, 1.0)
    return m, thr, z, amax, bad


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
def _sample(p_row, q_row, V, u, subtract, zero_tok,
            pm, pc, pthr, pz, pamax, qm, qc, qthr, qz, qamax,
            FROM_LOGITS: tl.constexpr, GREEDY: tl.constexpr, HAS_Q: tl.constexpr, BLOCK_V: tl.constexpr):
    """The emitted token in [0, V), or -1 if p_row (or q_row, when it is read) holds a value that is not finite.

    Transformed logits rows were checked by _row_stats; only raw probabilities are checked here, in pass A."""
    offs0 = tl.arange(0, BLOCK_V)
    # q is read only at a rejected draft's position. (A limit, not `mask & subtract`: mixing a scalar and a block
    # of booleans yields int32 in the Triton interpreter.)
    q_end = tl.where(subtract, V, 0)

    # Pass A: the masses decide which distribution to sample; argmax is the last resort. The finiteness check
    # rides along: it needs no extra read.
    mass_r = 0.0
    mass_p = 0.0
    best = float("-inf")
    best_i = 0
    n_bad = 0
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        mask = offs < V
        p = _probs(p_row, offs, mask, pm, pc, pthr, pz, pamax, FROM_LOGITS, GREEDY)
        if HAS_Q:
            q = _probs(q_row, offs, offs < q_end, qm, qc, qthr, qz, qamax, FROM_LOGITS, GREEDY)
            r = tl.maximum(p - q, 0.0)
            if not FROM_LOGITS:
                n_bad += tl.sum(((tl.abs(q) < float("inf")) == 0).to(tl.int32), 0)
        else:
            r = tl.where(offs == zero_tok, 0.0, tl.maximum(p, 0.0))
        if not FROM_LOGITS:
            n_bad += tl.sum(((tl.abs(p) < float("inf")) == 0).to(tl.int32), 0)
        mass_r += tl.sum(r, 0)
        mass_p += tl.sum(tl.maximum(p, 0.0), 0)
        pv = tl.where(mask, p, float("-inf"))
        block_max = tl.max(pv, 0)
        best_i = tl.where(block_max > best, start + tl.argmax(pv, 0), best_i)
        best = tl.maximum(best, block_max)
    valid = n_bad == 0
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
    while valid & has_mass & (tok < 0) & (start < V):
        offs = start + offs0
        mask = offs < V
        p = _probs(p_row, offs, mask, pm, pc, pthr, pz, pamax, FROM_LOGITS, GREEDY)
        if HAS_Q:
            q = _probs(q_row, offs, offs < q_end_b, qm, qc, qthr, qz, qamax, FROM_LOGITS, GREEDY)
            r = tl.maximum(p - q, 0.0)
        else:
            r = tl.where(offs == zero_tok, 0.0, tl.maximum(p, 0.0))
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
    # No block crossed: only when u >= 1 or u is NaN, since for u < 1 u * mass < mass and the running sum ends at
    # exactly mass.
    tok = tl.where(tok >= 0, tok, last)
    tok = tl.where(has_mass, tok, best_i)
    tok = tl.minimum(tl.maximum(tok, 0), V - 1)
    return tl.where(valid, tok, -1)


@triton.jit
def _row_extent(n_ptr, b, stride_nb, K, T, RAGGED: tl.constexpr):
    """Row b's first draft (flattened form; 0 when padded), its number of drafts n_b and its output length."""
    if RAGGED:
        # Clamped so that a malformed cu_num_drafts cannot move a row outside the flattened tensors.
        start = tl.load(n_ptr + b * stride_nb)
        end = tl.load(n_ptr + (b + 1) * stride_nb)
        start = tl.minimum(tl.maximum(start, 0), T)
        end = tl.minimum(tl.maximum(end, start), T)
        n = (end - start).to(tl.int32)
        out_len = n + 1
        start = start.to(tl.int64)
    else:
        n = tl.load(n_ptr + b * stride_nb)
        n = tl.minimum(tl.maximum(n, 0), K).to(tl.int32)  # clamp before narrowing
        out_len = K + 1
        start = b * 0
    return start, n, out_len


@triton.jit
def _write_row(out_row, nacc_ptr, b, out_len, d_row, stride_dk, j, tok, BLOCK_K: tl.constexpr):
    """Accepted drafts, then tok at index j, then -1 up to out_len; an invalid row (tok = -1) is all -1."""
    j = tl.where(tok >= 0, j, -1)
    lanes = tl.arange(0, BLOCK_K)
    for k0 in range(0, out_len, BLOCK_K):
        ks = k0 + lanes
        # Accepted drafts passed the range check, so they are re-read rather than carried in registers.
        d = tl.load(d_row + ks.to(tl.int64) * stride_dk, mask=ks < j, other=-1).to(tl.int64)
        out = tl.where(ks < j, d, tl.where(ks == j, tok.to(tl.int64), -1))
        tl.store(out_row + ks, out, mask=ks < out_len)
    tl.store(nacc_ptr + b, j.to(tl.int64))


@triton.jit
def _accept_kernel(
    p_ptr, q_ptr, draft_ptr, n_ptr, ua_ptr, us_ptr, tok_ptr, nacc_ptr,
    K, T, V,
    stride_pb, stride_pk, stride_qb, stride_qk, stride_db, stride_dk, stride_nb,
    stride_uab, stride_uak, stride_usb, stride_tb,
    HAS_Q: tl.constexpr, RAGGED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    start, n, out_len = _row_extent(n_ptr, b, stride_nb, K, T, RAGGED)
    p_row0 = p_ptr + b * stride_pb + start * stride_pk
    q_row0 = q_ptr + b * stride_qb + start * stride_qk
    d_row = draft_ptr + b * stride_db + start * stride_dk
    ua_row = ua_ptr + b * stride_uab + start * stride_uak

    # Accept tests BLOCK_K at a time: 2 BLOCK_K scalar gathers are cheaper than a dependent load chain, and the
    # loop stops at the chunk holding the first rejection.
    lanes = tl.arange(0, BLOCK_K)
    j = 0
    zero_tok = -1
    k0 = 0
    go = n > 0
    while go:
        ks = k0 + lanes
        ks64 = ks.to(tl.int64)
        valid = ks < n
        d = tl.load(d_row + ks64 * stride_dk, mask=valid, other=-1)
        # Range-check before narrowing: a garbage int64 must not wrap into [0, V).
        d_ok = valid & (d >= 0) & (d < V)
        d = tl.where(d_ok, d, -1).to(tl.int32)
        p_d = tl.load(p_row0 + ks64 * stride_pk + d, mask=d_ok, other=0.0).to(tl.float32)
        if HAS_Q:
            q_d = tl.load(q_row0 + ks64 * stride_qk + d, mask=d_ok, other=0.0).to(tl.float32)
        else:
            q_d = tl.full([BLOCK_K], 1.0, tl.float32)
        u_a = tl.load(ua_row + ks64 * stride_uak, mask=valid, other=1.0)
        # A value that is not finite stops the run there; row j is then read in full and reported invalid.
        finite = (tl.abs(p_d) < float("inf")) & (tl.abs(q_d) < float("inf"))
        accepted = d_ok & finite & (u_a * q_d < p_d)
        first = tl.min(tl.where(accepted, k0 + BLOCK_K, ks), 0)  # first lane not accepted, or the chunk's end
        j = tl.minimum(first, n)
        zero_tok = tl.sum(tl.where(ks == j, d, 0), 0)            # the rejected draft, if it is in this chunk
        k0 += BLOCK_K
        go = (first == k0) & (k0 < n)

    subtract = j < n
    zero_tok = tl.where(subtract, zero_tok, -1)
    u = tl.load(us_ptr + b * stride_usb)
    j64 = j.to(tl.int64)
    tok = _sample(p_row0 + j64 * stride_pk, q_row0 + j64 * stride_qk, V, u, subtract, zero_tok,
                  0.0, 1.0, 0, 1.0, 0, 0.0, 1.0, 0, 1.0, 0,  # logit statistics, unused for probabilities
                  False, False, HAS_Q, BLOCK_V)
    _write_row(tok_ptr + b * stride_tb + start, nacc_ptr, b, out_len, d_row, stride_dk, j, tok, BLOCK_K)


@triton.jit
def _accept_logits_kernel(
    t_ptr, q_ptr, draft_ptr, n_ptr, ua_ptr, us_ptr, tok_ptr, nacc_ptr,
    K, T, V, c, top_k, top_p,
    stride_tb, stride_tk, stride_qb, stride_qk, stride_db, stride_dk, stride_nb,
    stride_uab, stride_uak, stride_usb, stride_ob,
    HAS_Q: tl.constexpr, GREEDY: tl.constexpr, USE_TOP_K: tl.constexpr, USE_TOP_P: tl.constexpr,
    RAGGED: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    start, n, out_len = _row_extent(n_ptr, b, stride_nb, K, T, RAGGED)
    t_row0 = t_ptr + b * stride_tb + start * stride_tk
    q_row0 = q_ptr + b * stride_qb + start * stride_qk
    d_row = draft_ptr + b * stride_db + start * stride_dk
    ua_row = ua_ptr + b * stride_uab + start * stride_uak

    # Transforming a row costs many passes over V, so drafts are tested one at a time and the loop stops at the
    # first rejection, or at the first transformed row holding NaN or +inf (the row is then invalid). On exit the
    # statistics held are those of row j = num_accepted, the one to sample.
    k = 0
    go = True
    bad = False
    pm, pthr, pz, pamax = 0.0, 0, 1.0, 0
    qm, qthr, qz, qamax = 0.0, 0, 1.0, 0
    zero_tok = -1
    while go:
        k64 = k.to(tl.int64)
        pm, pthr, pz, pamax, bad = _row_stats(t_row0 + k64 * stride_tk, V, c, top_k, top_p,
                                              GREEDY, USE_TOP_K, USE_TOP_P, BLOCK_V)
        go = (k < n) & (bad == 0)
        if go:
            d = tl.load(d_row + k64 * stride_dk)
            d_ok = (d >= 0) & (d < V)
            d = tl.where(d_ok, d, -1).to(tl.int32)
            zero_tok = d
            p_d = _probs(t_row0 + k64 * stride_tk, d, d_ok, pm, c, pthr, pz, pamax, True, GREEDY)
            q_d = 1.0
            if HAS_Q:
                qm, qthr, qz, qamax, bad = _row_stats(q_row0 + k64 * stride_qk, V, c, top_k, top_p,
                                                      GREEDY, USE_TOP_K, USE_TOP_P, BLOCK_V)
                q_d = _probs(q_row0 + k64 * stride_qk, d, d_ok, qm, c, qthr, qz, qamax, True, GREEDY)
            u_a = tl.load(ua_row + k64 * stride_uak)
            go = (bad == 0) & d_ok & (u_a * q_d < p_d)
            k += go.to(tl.int32)
    j = k

    tok = -1
    if GREEDY:
        # p_j is one-hot on its argmax, and the residual of a rejected draft (or its fallback to p_j) is that same
        # one-hot, so the rule always emits argmax(p_j): no sampling pass is needed.
        tok = tl.where(bad, -1, pamax)
    elif bad == 0:
        subtract = j < n
        u = tl.load(us_ptr + b * stride_usb)
        j64 = j.to(tl.int64)
        tok = _sample(t_row0 + j64 * stride_tk, q_row0 + j64 * stride_qk, V, u, subtract,
                      tl.where(subtract, zero_tok, -1),
                      pm, c, pthr, pz, pamax, qm, c, qthr, qz, qamax,
                      True, False, HAS_Q, BLOCK_V)
    _write_row(tok_ptr + b * stride_ob + start, nacc_ptr, b, out_len, d_row, stride_dk, j, tok, BLOCK_K)


# ----------------------------------------------------------------------------------------------------------------------
# Launchers, registered as the torch ops minipass::accept and minipass::accept_from_logits
# ----------------------------------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int64, torch.int32)
_MAX_BLOCK_K = 32
# Without a register limit ptxas sometimes stops at 48-80 registers and spills (sm_90 more than sm_80); the hardware's
# limit, stated, makes it keep every value in registers (at most 168 per thread: python -m minipass.kernels.lower_acceptance).
# One program per row, so the occupancy this gives up matters only when B exceeds the number of SMs.
MAX_REGISTERS = 255
# triton.jit reads the variable when the kernels are defined, so this is the mode they run in.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check_tensor(name, x, shape, dtypes, device, dtype_words, p_name):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}.")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be {dtype_words}, got {x.dtype}.")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like {p_name}, got {x.device}.")


def _check_types(**tensors):
    # Before the op call, so that a non-tensor gets this message rather than the dispatcher's.
    for name, x in tensors.items():
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")


def _check_inputs(p_name, p, q_name, q, draft_tokens, num_drafts, u_accept, u_sample, on_device=True):
    """(B, K, T, V) of valid inputs: K for the padded form, T = total drafts for the flattened one (the other 0)."""
    _check_types(**{p_name: p, q_name: q}, draft_tokens=draft_tokens, num_drafts=num_drafts, u_accept=u_accept,
                 u_sample=u_sample)
    floats = "float32, float16 or bfloat16"
    device = p.device
    if p.dim() == 3 and p.shape[1] >= 1 and p.shape[2] >= 1:
        B, K, T, V = p.shape[0], p.shape[1] - 1, 0, p.shape[2]
        q_shape, d_shape, n_shape, n_name = (B, K, V), (B, K), (B,), "num_drafts"
    elif p.dim() == 2 and p.shape[1] >= 1:
        # Flattened: the number of rows comes from cu_num_drafts, the total of drafts from draft_tokens.
        if draft_tokens.dim() != 1:
            raise ValueError(f"draft_tokens must have shape (T,) in the flattened form ({p_name} is 2-D), got "
                             f"{tuple(draft_tokens.shape)}.")
        if num_drafts.dim() != 1 or num_drafts.shape[0] < 1:
            raise ValueError(f"cu_num_drafts must have shape (B+1,) in the flattened form ({p_name} is 2-D), got "
                             f"{tuple(num_drafts.shape)}.")
        T, B, K, V = draft_tokens.shape[0], num_drafts.shape[0] - 1, 0, p.shape[1]
        if p.shape[0] != T + B:
            raise ValueError(f"{p_name} must have T + B = {T + B} rows in the flattened form (T = {T} drafts, "
                             f"B = {B} rows: each row's drafts and one more), got {p.shape[0]}.")
        q_shape, d_shape, n_shape, n_name = (T, V), (T,), (B + 1,), "cu_num_drafts"
    else:
        raise ValueError(f"{p_name} must have shape (B, K+1, V), or (T+B, V) for flattened drafts, with K+1 >= 1 and "
                         f"V >= 1, got {tuple(p.shape)}.")
    _check_tensor(p_name, p, p.shape, _FLOATS, device, floats, p_name)
    if p.stride(-1) != 1 and V > 1:
        raise ValueError(f"{p_name} must be contiguous in its last (vocabulary) dimension, got strides {p.stride()}.")
    if on_device and device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"{p_name} must be on a CUDA device for the Triton kernel (or set TRITON_INTERPRET=1 before "
                         f"importing it to run it on the CPU), got {device}.")
    if q is not None:
        _check_tensor(q_name, q, q_shape, _FLOATS, device, floats, p_name)
        if q.stride(-1) != 1 and V > 1:
            raise ValueError(f"{q_name} must be contiguous in its last (vocabulary) dimension, "
                             f"got strides {q.stride()}.")
    _check_tensor("draft_tokens", draft_tokens, d_shape, _INTS, device, "int32 or int64", p_name)
    _check_tensor(n_name, num_drafts, n_shape, _INTS, device, "int32 or int64", p_name)
    _check_tensor("u_accept", u_accept, d_shape, (torch.float32,), device, "float32", p_name)
    _check_tensor("u_sample", u_sample, (B,), (torch.float32,), device, "float32", p_name)
    return B, K, T, V


def _check_cu_num_drafts(cu_num_drafts, T):
    """Host-side check of the flattened form's offsets (it syncs)."""
    cu = cu_num_drafts.long().cpu()
    falls = (cu.diff() < 0).nonzero()
    if cu[0] != 0 or cu[-1] != T or len(falls):
        where = f"; it decreases after row {int(falls[0, 0])}" if len(falls) else ""
        raise ValueError(f"cu_num_drafts must start at 0, never decrease and end at T = {T} (draft_tokens.shape[0]), "
                         f"got first {int(cu[0])} and last {int(cu[-1])}{where}.")


def _check_block_v(block_v):
    if block_v is not None and (isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 16
                                or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v!r}.")


def _pow2_at_least(x):
    return 1 << (x - 1).bit_length()


def _outputs(p, B, K, T, ragged):
    # The kernel writes every padded entry; the flattened tokens are filled first so that entries no row covers
    # (malformed offsets passed unchecked) read -1.
    tokens = torch.full((T + B,), -1, dtype=torch.int64, device=p.device) if ragged \
        else torch.empty((B, K + 1), dtype=torch.int64, device=p.device)
    return tokens, torch.empty((B,), dtype=torch.int64, device=p.device)


def _plan(p_name, p, q_name, q, draft_tokens, num_drafts, u_accept, u_sample, block_v):
    """Checks and launch parameters: (B, K, T, V, ragged, has_q, no_drafts, strides, BLOCK_K, BLOCK_V, num_warps).

    They read only shapes, strides, dtypes and devices, so they are computed once per signature and cached."""
    _check_block_v(block_v)
    B, K, T, V = _check_inputs(p_name, p, q_name, q, draft_tokens, num_drafts, u_accept, u_sample)
    ragged = p.dim() == 2
    # Without drafts the draft-side tensors are empty; every load from them is masked off, but the launch passes
    # real allocations (num_drafts, u_sample) so that the kernel never sees a null pointer.
    no_drafts = K == 0 and T == 0
    has_q = q is not None and not no_drafts
    q_arg = q if has_q else p
    d_arg, ua_arg = (num_drafts, u_sample) if no_drafts else (draft_tokens, u_accept)
    if ragged:
        # Row b's target k is row start_b + b + k of p; its draft k is entry start_b + k of q and the others.
        strides = (p.stride(0), p.stride(0), 0, q_arg.stride(0), 0, d_arg.stride(0), num_drafts.stride(0),
                   0, ua_arg.stride(0), u_sample.stride(0), 1)
    else:
        strides = (p.stride(0), p.stride(1), q_arg.stride(0), q_arg.stride(1), d_arg.stride(0), d_arg.stride(-1),
                   num_drafts.stride(0), ua_arg.stride(0), ua_arg.stride(-1), u_sample.stride(0), K + 1)
    return (B, K, T, V, ragged, has_q, no_drafts, strides) + launch_params(K, T, V, block_v)


def launch_params(K, T, V, block_v=None):
    """(BLOCK_K, BLOCK_V, num_warps) the launchers pick: K drafts per row (padded) or T in all (flattened)."""
    BLOCK_V = block_v or min(_MAX_BLOCK_V, _pow2_at_least(V))
    return min(_MAX_BLOCK_K, _pow2_at_least(max(K, T) + 1)), BLOCK_V, (8 if BLOCK_V >= 2048 else 4)


_PLANS = {}


def _cached_plan(p_name, p, q_name, q, draft_tokens, num_drafts, u_accept, u_sample, block_v):
    key = (p_name, block_v, p.shape, p.stride(), p.dtype, p.device,
           None if q is None else (q.shape, q.stride(), q.dtype, q.device),
           draft_tokens.shape, draft_tokens.stride(), draft_tokens.dtype, draft_tokens.device,
           num_drafts.shape, num_drafts.stride(), num_drafts.dtype, num_drafts.device,
           u_accept.shape, u_accept.stride(), u_accept.dtype, u_accept.device,
           u_sample.shape, u_sample.stride(), u_sample.dtype, u_sample.device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(p_name, p, q_name, q, draft_tokens, num_drafts, u_accept, u_sample, block_v)
        if len(_PLANS) >= 4096:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


_LIB = torch.library.Library("minipass", "FRAGMENT")


def _define(schema, impl, fake):
    name = schema.split("(")[0]
    if hasattr(torch.ops.minipass, name):  # a second copy of this file, imported under another name
        return
    _LIB.define(schema)
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, impl, key)
    torch.library.register_fake(f"minipass::{name}", fake, lib=_LIB)


def _accept_impl(p, draft_tokens, num_drafts, u_accept, u_sample, q, check_values, block_v):
    B, K, T, V, ragged, has_q, no_drafts, strides, BLOCK_K, BLOCK_V, num_warps = _cached_plan(
        "p", p, "q", q, draft_tokens, num_drafts, u_accept, u_sample, block_v)
    if ragged and check_values:
        _check_cu_num_drafts(num_drafts, T)
    tokens, num_accepted = _outputs(p, B, K, T, ragged)
    if B == 0:
        return tokens, num_accepted
    _accept_kernel[(B,)](
        p, q if has_q else p, num_drafts if no_drafts else draft_tokens, num_drafts,
        u_sample if no_drafts else u_accept, u_sample, tokens, num_accepted,
        K, T, V, *strides,
        HAS_Q=has_q, RAGGED=ragged, BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V,
        num_warps=num_warps, maxnreg=MAX_REGISTERS,
    )
    return tokens, num_accepted


def _accept_fake(p, draft_tokens, num_drafts, u_accept, u_sample, q, check_values, block_v):
    _check_block_v(block_v)
    B, K, T, V = _check_inputs("p", p, "q", q, draft_tokens, num_drafts, u_accept, u_sample, on_device=False)
    return _outputs(p, B, K, T, p.dim() == 2)


_define("accept(Tensor p, Tensor draft_tokens, Tensor num_drafts, Tensor u_accept, Tensor u_sample, Tensor? q, "
        "bool check_values, int? block_v) -> (Tensor, Tensor)", _accept_impl, _accept_fake)


def accept(p, draft_tokens, num_drafts, u_accept, u_sample, q=None, *, check_values=True, block_v=None):
    """Verify drafts against target probabilities p: (tokens, num_accepted), int64.

    Padded form: p (B, K+1, V), num_drafts (B,) -> tokens (B, K+1). Flattened form: p (T+B, V), draft_tokens (T,),
    num_drafts holding cu_num_drafts (B+1,) -> tokens (T+B,). See the module docstring for the rule, the shapes and
    invalid rows (num_accepted -1). check_values=False skips the host-side check of cu_num_drafts (and its sync);
    block_v (a power of two >= 16) overrides the vocabulary block. The launch is the op torch.ops.minipass.accept."""
    _check_types(p=p, q=q, draft_tokens=draft_tokens, num_drafts=num_drafts, u_accept=u_accept, u_sample=u_sample)
    _check_block_v(block_v)
    return torch.ops.minipass.accept(p, draft_tokens, num_drafts, u_accept, u_sample, q, bool(check_values), block_v)


def _check_transform(temperature, top_k, top_p):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}.")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {top_k!r}.")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p must be a number in (0, 1] (1 disables it), got {top_p!r}.")


def _check_vocabulary(V):
    if V >= 2**24:
        raise ValueError(f"target_logits has V = {V}; the top-k search counts in fp32 and needs V < 2**24.")


def _accept_logits_impl(target_logits, draft_tokens, num_drafts, u_accept, u_sample, draft_logits,
                        temperature, top_k, top_p, check_values, block_v):
    B, K, T, V, ragged, has_q, no_drafts, strides, BLOCK_K, BLOCK_V, num_warps = _cached_plan(
        "target_logits", target_logits, "draft_logits", draft_logits, draft_tokens, num_drafts, u_accept, u_sample,
        block_v)
    _check_vocabulary(V)
    if ragged and check_values:
        _check_cu_num_drafts(num_drafts, T)
    tokens, num_accepted = _outputs(target_logits, B, K, T, ragged)
    if B == 0:
        return tokens, num_accepted
    greedy = temperature == 0
    # Clamped so a denormal temperature cannot turn (l - max) * c into 0 * inf.
    c = 1.0 if greedy else min(_LOG2E / temperature, _FP32_MAX)
    _accept_logits_kernel[(B,)](
        target_logits, draft_logits if has_q else target_logits, num_drafts if no_drafts else draft_tokens,
        num_drafts, u_sample if no_drafts else u_accept, u_sample, tokens, num_accepted,
        K, T, V, c, float(top_k), float(top_p), *strides,
        HAS_Q=has_q, GREEDY=greedy, USE_TOP_K=0 < top_k < V, USE_TOP_P=top_p < 1, RAGGED=ragged,
        BLOCK_K=BLOCK_K, BLOCK_V=BLOCK_V, num_warps=num_warps, maxnreg=MAX_REGISTERS,
    )
    return tokens, num_accepted


def _accept_logits_fake(target_logits, draft_tokens, num_drafts, u_accept, u_sample, draft_logits,
                        temperature, top_k, top_p, check_values, block_v):
    _check_block_v(block_v)
    B, K, T, V = _check_inputs("target_logits", target_logits, "draft_logits", draft_logits,
                               draft_tokens, num_drafts, u_accept, u_sample, on_device=False)
    _check_vocabulary(V)
    return _outputs(target_logits, B, K, T, target_logits.dim() == 2)


_define("accept_from_logits(Tensor target_logits, Tensor draft_tokens, Tensor num_drafts, Tensor u_accept, "
        "Tensor u_sample, Tensor? draft_logits, float temperature, int top_k, float top_p, bool check_values, "
        "int? block_v) -> (Tensor, Tensor)", _accept_logits_impl, _accept_logits_fake)


def accept_from_logits(target_logits, draft_tokens, num_drafts, u_accept, u_sample, draft_logits=None,
                       temperature=1.0, top_k=0, top_p=1.0, *, check_values=True, block_v=None):
    """accept() on sampling_probs_ref(logits, temperature, top_k, top_p), with the transform fused into the kernel.

    draft_logits=None means deterministic drafts. Both forms of accept() (padded, flattened); see the module
    docstring for the search limits and invalid rows. The launch is the op torch.ops.minipass.accept_from_logits."""
    _check_types(target_logits=target_logits, draft_logits=draft_logits, draft_tokens=draft_tokens,
                 num_drafts=num_drafts, u_accept=u_accept, u_sample=u_sample)
    _check_transform(temperature, top_k, top_p)
    _check_block_v(block_v)
    return torch.ops.minipass.accept_from_logits(target_logits, draft_tokens, num_drafts, u_accept, u_sample,
                                                 draft_logits, float(temperature), top_k, float(top_p),
                                                 bool(check_values), block_v)


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


def _accept_padded_ref(p, draft_tokens, num_drafts, u_accept, u_sample, q, tested, p_ok, q_ok):
    """The rule on the padded form. tested (B, K): drafts the rule may test at all; p_ok (B, K+1), q_ok (B, K) or
    None: rows that hold no value the rule rejects, when it reads them in full (row j, and q's after a rejection)."""
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
    accepted = d_ok & tested & p_d.isfinite() & q_d.isfinite() & (u_accept * q_d < p_d)
    j = accepted.long().cumprod(1).sum(1)                                            # leading run of accepts, (B,)

    invalid = ~p_ok[rows, j]
    p_j = torch.where(invalid[:, None], 0.0, p[rows, j])                             # (B, V)
    r = p_j.clamp_min(0)
    if K > 0:
        rejected = j < n
        jk = j.clamp(max=K - 1)
        if q is not None:
            invalid |= rejected & ~q_ok[rows, jk]
            q_j = torch.where(invalid[:, None], 0.0, q.float()[rows, jk])
            r = torch.where(rejected[:, None], (p_j - q_j).clamp_min(0), r)
        else:
            d_j = torch.where(rejected & d_ok[rows, jk], d[rows, jk], -1)
            r = torch.where(torch.arange(V, device=dev) == d_j[:, None], 0.0, r)
    tok = _sample_ref(r, p_j, u_sample)

    tokens = torch.full((B, K + 1), -1, dtype=torch.int64, device=dev)
    tokens[:, :K] = torch.where(torch.arange(K, device=dev) < j[:, None], d, -1)
    tokens[rows, j] = tok
    return torch.where(invalid[:, None], -1, tokens), torch.where(invalid, -1, j)


def _padded_from_flat(p, draft_tokens, cu_num_drafts, u_accept, q):
    """The flattened form's rows padded to the longest one (which reads it on the host), and the map back."""
    R, V = p.shape
    T, B = draft_tokens.shape[0], cu_num_drafts.shape[0] - 1
    dev = p.device
    cu = cu_num_drafts.long()
    start = cu[:-1].clamp(0, T)                                                      # as the kernel clamps
    n = torch.maximum(cu[1:].clamp(0, T), start) - start
    K = int(n.max()) if B > 0 else 0
    k = torch.arange(K + 1, device=dev)
    rows = (start + torch.arange(B, device=dev))[:, None] + k                        # (B, K+1) rows of p
    idx = (start[:, None] + k[:K]).clamp(max=max(T - 1, 0))                          # (B, K) draft entries
    pad = lambda x: x[idx] if T > 0 else x.new_zeros((B, K) + tuple(x.shape[1:]))   # noqa: E731
    p_pad = p[rows.clamp(max=R - 1)]
    q_pad = None if q is None else pad(q)
    return p_pad, pad(draft_tokens), n, pad(u_accept), q_pad, (rows, k <= n[:, None], R)


def _flat_from_padded(tokens, back):
    rows, keep, R = back
    out = torch.full((R,), -1, dtype=torch.int64, device=tokens.device)
    out[rows[keep]] = tokens[keep]
    return out


def accept_ref(p, draft_tokens, num_drafts, u_accept, u_sample, q=None):
    """Torch reference for accept(): same signature and outputs, both forms, vectorised over rows."""
    if p.dim() == 2:
        p_pad, d_pad, n, ua_pad, q_pad, back = _padded_from_flat(p, draft_tokens, num_drafts, u_accept, q)
        tokens, j = accept_ref(p_pad, d_pad, n, ua_pad, u_sample, q_pad)
        return _flat_from_padded(tokens, back), j
    K = p.shape[1] - 1
    p_ok = p.isfinite().all(-1)
    q_ok = None if q is None else q.isfinite().all(-1)
    tested = torch.ones(p.shape[0], K, dtype=torch.bool, device=p.device)
    return _accept_padded_ref(p, draft_tokens, num_drafts, u_accept, u_sample, q, tested, p_ok, q_ok)


def sampling_probs_ref(logits, temperature=1.0, top_k=0, top_p=1.0):
    """The sampling transform (temperature, then top-k, then top-p) in fp32 over the last dimension. A row of -inf
    has no mass (all zeros); rows holding NaN or +inf come out as NaN."""
    logits = logits.float()
    V = logits.shape[-1]
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), V).float()
    probs = torch.softmax(logits / temperature, -1)
    probs = torch.where((logits == float("-inf")).all(-1, keepdim=True), 0.0, probs)
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


def _logits_ok(logits):
    # -inf masks a token; NaN and +inf make the row invalid.
    return ~(logits.isnan() | (logits == float("inf"))).any(-1)


def accept_from_logits_ref(target_logits, draft_tokens, num_drafts, u_accept, u_sample, draft_logits=None,
                           temperature=1.0, top_k=0, top_p=1.0):
    """Torch reference for accept_from_logits(): the transform, then the rule of accept_ref, both forms."""
    if target_logits.dim() == 2:
        t_pad, d_pad, n, ua_pad, q_pad, back = _padded_from_flat(target_logits, draft_tokens, num_drafts, u_accept,
                                                                 draft_logits)
        tokens, j = accept_from_logits_ref(t_pad, d_pad, n, ua_pad, u_sample, q_pad, temperature, top_k, top_p)
        return _flat_from_padded(tokens, back), j
    p = sampling_probs_ref(target_logits, temperature, top_k, top_p)
    q = None if draft_logits is None else sampling_probs_ref(draft_logits, temperature, top_k, top_p)
    # The kernel transforms target row k, then draft row k, before testing draft k: a draft is tested only if
    # both are valid, and the row stops at the first invalid one.
    p_ok = _logits_ok(target_logits)
    q_ok = None if draft_logits is None else _logits_ok(draft_logits)
    tested = p_ok[:, :-1] if q_ok is None else p_ok[:, :-1] & q_ok
    return _accept_padded_ref(p, draft_tokens, num_drafts, u_accept, u_sample, q, tested, p_ok, q_ok)
