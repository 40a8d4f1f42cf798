"""Exact verification of a token tree of deterministic candidates in one launch: walk the accepted path, emit one token.

The rule (PaSS token trees; sampling without replacement one candidate at a time)
---------------------------------------------------------------------------------
Row b holds a tree of N + 1 nodes whose target distributions came out of one forward pass. Node 0 is the root (the
last committed token); node i >= 1 proposes the token tokens[b, i] as the continuation of its parent's path, and
p[b, i] is the target distribution of the token that follows node i's path. A node c is a child of node a iff
parents[b, c] == a and c > a; children are tried in increasing node index. For row b (dropping the index b):

    cur = 0;  P' = max(p[0], 0) in fp32;  mass = sum(P')
    repeat:
        for each child c of cur, in index order, with t = tokens[c]:
            accept c   iff  t in [0, V)  and  P'(t) > 0  and  u_accept[c] * mass < P'(t)
            accepted:  append c to the path;  cur = c;  P' = max(p[c], 0);  mass = sum(P');  restart the loop
            rejected:  mass = max(mass - P'(t), 0);  P'(t) = 0      (a later sibling with the same token is rejected)
        no child of cur accepted (or none exists): emit one token sampled from P' with u = u_sample; stop

Sampling from the nonnegative, possibly unnormalised P' is the inverse CDF in fp32: the smallest index v with
P'(v) > 0 and cumsum(P')[v] > u * sum(P'), where sum(P') is recomputed over V (the running `mass` has accumulated
rounding); if rounding leaves no such index, the last index with P' > 0. If P' has no mass left (the rejected tokens
held all of it, up to rounding) sample max(p[cur], 0) the same way; if that has no mass either, emit argmax(p[cur])
(index 0 for an all-zero row). The emitted token of a valid row (see Invalid rows) is always in [0, V), and never a
token of zero mass when the distribution has mass. A candidate token outside [0, V) is rejected without touching P'
(it is never used as an address); a node whose parent is not a valid earlier node (padding: parent -1) is nobody's
child.

Why the output is distributed exactly as autoregressive sampling
----------------------------------------------------------------
Let P = p[cur] / sum(p[cur]) and let the children of cur carry tokens c_1, c_2, ... in the order they are tried
(distinct: a later duplicate, a token outside [0, V) or a token with P = 0 is rejected with probability 1 and changes
nothing, so drop it). Child i is tried only if children 1..i-1 were rejected; given that, it is accepted with
probability P'_i(c_i) / mass_i = P(c_i) / mass_i, where P'_i is P with c_1..c_{i-1} removed and
mass_i = 1 - sum_{r<i} P(c_r). So

    Pr(accept child i) = prod_{r<i} (1 - P(c_r) / mass_r) * P(c_i) / mass_i
                       = prod_{r<i} (mass_{r+1} / mass_r) * P(c_i) / mass_i   = P(c_i)       (mass_1 = 1),

and with probability mass_last = 1 - sum_r P(c_r) all children are rejected and the token x is drawn from P'
renormalised: Pr(emit x) = mass_last * P(x) / mass_last = P(x) for every x that is not a child's token. This is
sampling from P without replacement, one candidate at a time: the first token after cur is distributed exactly as P,
and it equals a child's token iff that child was accepted. The next token's distribution is then p[child], the
target given the accepted path, so by induction over the path the whole emitted sequence (accepted tokens, then the
emitted one) is distributed as autoregressive sampling from the targets. Greedy decoding needs no special case: pass
p one-hot on the argmax; a child is accepted iff its token is the argmax (u * 1 < 1), and the emitted token is the
argmax of the last accepted node.

Randomness enters as tensors (u_accept, u_sample), so the kernel and the torch reference agree token for token up to
fp32 summation order: they can differ only where u_accept * mass falls within rounding of P'(t), or u_sample * mass
within rounding of a cumsum step.

Invalid rows
------------
The rule reads in full the row p[cur] of every node it visits: the root, then each accepted node (its mass before
its children are tried, or the emission at the last one); the gathers P'(t) come from that same row. A row is
invalid when one of these visited rows holds a value that is not finite (NaN, +inf or -inf, read in fp32); the
walk stops at the first such row. Rows of nodes the walk never reaches are not looked at. An invalid row gets
num_accepted = -1, out_tokens all -1 and path all -1; other rows are not affected. The check rides along the
passes over V that the walk makes anyway: it costs no extra read.

Entry points
------------
accept_tree(p, tokens, parents, u_accept, u_sample, *, check_values=True, block_v=None)    Triton
accept_tree_ref(p, tokens, parents, u_accept, u_sample)                                     torch, same outputs
    p             (B, N+1, V) float32/float16/bfloat16   nonnegative; p[b, i] is the target after node i's path
    tokens        (B, N+1)    int32/int64                tokens[b, i]: node i's candidate (entry 0 is ignored)
    parents       (B, N+1)    int32/int64                parents[b, 0] = -1; node i >= 1: a parent in [0, i), or -1
                                                         for padding (unused budget; a row may have an empty tree)
    u_accept      (B, N+1)    float32 in [0, 1)          entry i is node i's accept test (entry 0 unused)
    u_sample      (B,)        float32 in [0, 1)          the uniform of the emitted token
    out_tokens    (B, N+1)    int64   the accepted nodes' tokens in path order, then the emitted token at index
                                      num_accepted, then -1
    path          (B, N)      int64   the accepted node indices in order, then -1
    num_accepted  (B,)        int64   the row emits num_accepted + 1 tokens; -1 for an invalid row
  Any strides are fine as long as the vocabulary dimension of p is contiguous. Rows need not be normalised.
  check_values=True validates the tree structure on the host (node 0's parent is -1, every other parent is -1 or an
  earlier node, no node hangs under a padding node); it synchronises with the device, so a decoder's hot path passes
  False. The kernel itself never reads out of bounds on a malformed tree: it only ever walks to larger node indices.
  Trees come padded to a common budget N + 1 (what engines with token trees use); the whole tree of a row sits in
  registers, so a flattened form with ragged node counts would need a host-side bound on them and is not offered.

  The launcher is registered with torch.library as the op minipass::accept_tree, with a fake (meta)
  implementation, so torch.compile(fullgraph=True) keeps it as one op in its graph:
      torch.ops.minipass.accept_tree(p, tokens, parents, u_accept, u_sample, check_values, block_v)
  accept_tree() checks the Python arguments and calls it. The input checks (shapes, strides, dtypes, devices) run
  once per distinct input signature and are cached; the fake implementation runs them while a graph is traced.

Grid and memory traffic
-----------------------
grid = (B,): one program per batch row, 4 or 8 warps, the vocabulary walked in blocks of BLOCK_V (default
min(4096, next_power_of_2(V))). The walk is sequential by nature. Per row:
  - parents, tokens and u_accept are loaded once as vectors of BLOCK_N = next_power_of_2(N+1) lanes; the children
    of the current node are a mask over those lanes, and the next one to try is the smallest masked lane index;
  - each visited node that has children costs one pass over V (its mass) and one scalar gather p[cur, t] per child
    tried; a visited node with no children costs nothing until the emission;
  - the rejected children's tokens of the current node are kept in a small vector (at most BLOCK_N entries, one per
    distinct rejected token with mass), which the emission passes use to zero those tokens;
  - the emission reads p[cur] in two passes:
        pass A: mass of P' (rejected tokens zeroed), mass of max(p[cur], 0), argmax of p[cur], finiteness;
        pass B: running sum of per-block sums (added in the same order as in pass A, so the running sum reaches
                the mass with the same arithmetic) until the block that crosses u * mass, then tl.cumsum inside
                that block; it stops there, so it reads half of V on average.
  So a row reads about (visited nodes with children) + 1.5 rows of V: 4.5 rows when three nodes are accepted and
  the last of them is a leaf, 1 + 1.5 when the root's children are all rejected. The torch reference steps through
  the node indices (a few dozen small launches each, on (B, V) tensors) and ends with a (B, V) cumsum.

Limits
------
  The tree lives in registers (a few BLOCK_N-lane vectors), and each child tried costs a handful of BLOCK_N-wide
  reductions, which suits trees of up to a few hundred nodes. Zeroing the rejected tokens costs one compare over the
  block per rejected token, so it grows with the number of children of the last node (a handful in practice). The
  mass pass per visited node is what "rows need not be normalised" costs; an engine whose targets are exactly
  normalised could use mass = 1 instead, at the price of exactness when they are not. All arithmetic is fp32
  whatever the input dtype; bfloat16 is untested under the Triton interpreter (it has no bfloat16). Token and node
  indices are int32 (V, N < 2^31); row offsets are int64.

Example
-------
    #        0 (root)
    #       / \\
    #      1   2        node 1 proposes token 464, node 2 token 383; node 3 (token 3290) follows node 1
    #      |
    #      3            node 4 is unused budget (parent -1)
    B, N, V = 1, 4, 32000
    parents = torch.tensor([[-1, 0, 0, 1, -1]], device="cuda")
    tokens = torch.tensor([[0, 464, 383, 3290, 0]], device="cuda")
    p = torch.softmax(tree_logits, -1)                   # (B, N+1, V): node i's output, one forward over the tree
    u_accept = torch.rand(B, N + 1, device="cuda"); u_sample = torch.rand(B, device="cuda")
    out_tokens, path, num_accepted = accept_tree(p, tokens, parents, u_accept, u_sample, check_values=False)
    # emit out_tokens[b, :num_accepted[b] + 1]; the accepted nodes path[b, :num_accepted[b]] keep their K/V
"""

import os

import torch
import triton
import triton.language as tl

_MAX_BLOCK_V = 4096


# ----------------------------------------------------------------------------------------------------------------------
# Triton
# ----------------------------------------------------------------------------------------------------------------------


@triton.jit
def _row_mass(row_ptr, V, BLOCK_V: tl.constexpr):
    # sum(max(p, 0)) in the block order pass A uses too, and whether the row holds a value that is not finite.
    offs0 = tl.arange(0, BLOCK_V)
    mass = 0.0
    n_bad = 0
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        x = tl.load(row_ptr + offs, mask=offs < V, other=0.0).to(tl.float32)
        mass += tl.sum(tl.maximum(x, 0.0), 0)
        n_bad += tl.sum(((tl.abs(x) < float("inf")) == 0).to(tl.int32), 0)
    return mass, n_bad > 0


@triton.jit
def _zero_rejected(x, offs, rejected, n_rejected, lanes):
    # rejected[:n_rejected] holds distinct tokens; a loop of block compares instead of a (BLOCK_V, BLOCK_N) compare,
    # which would not fit in registers for BLOCK_V = 4096.
    for k in range(0, n_rejected):
        t = tl.sum(tl.where(lanes == k, rejected, 0), 0)
        x = tl.where(offs == t, 0.0, x)
    return x


@triton.jit
def _sample_without(row_ptr, V, u, rejected, n_rejected, lanes, BLOCK_V: tl.constexpr):
    """Inverse-CDF sample of max(p, 0) with the rejected tokens zeroed; falls back to max(p, 0), then argmax(p).
    -1 if the row holds a value that is not finite."""
    offs0 = tl.arange(0, BLOCK_V)

    # Pass A: the masses decide which distribution to sample; argmax is the last resort.
    mass_r = 0.0
    mass_p = 0.0
    best = float("-inf")
    best_i = 0
    n_bad = 0
    for start in range(0, V, BLOCK_V):
        offs = start + offs0
        mask = offs < V
        p = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        n_bad += tl.sum(((tl.abs(p) < float("inf")) == 0).to(tl.int32), 0)
        pos = tl.maximum(p, 0.0)
        r = _zero_rejected(pos, offs, rejected, n_rejected, lanes)
        mass_r += tl.sum(r, 0)
        mass_p += tl.sum(pos, 0)
        pv = tl.where(mask, p, float("-inf"))
        block_max = tl.max(pv, 0)
        # Strict > keeps the earliest block on ties, and tl.argmax the lowest index within a block.
        best_i = tl.where(block_max > best, start + tl.argmax(pv, 0), best_i)
        best = tl.maximum(best, block_max)
    valid = n_bad == 0
    use_r = mass_r > 0.0
    has_mass = use_r | (mass_p > 0.0)
    target = u * tl.where(use_r, mass_r, mass_p)
    n_zeroed = tl.where(use_r, n_rejected, 0)

    # Pass B: block sums are added in the same order as in pass A, so the running sum reaches the mass exactly and
    # the crossing block is found with the same arithmetic; only inside it does tl.cumsum's rounding enter.
    cum = 0.0
    tok = -1
    last = -1
    start = 0
    while valid & has_mass & (tok < 0) & (start < V):
        offs = start + offs0
        mask = offs < V
        p = tl.load(row_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = _zero_rejected(tl.maximum(p, 0.0), offs, rejected, n_zeroed, lanes)
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
    # No block crossed: u * mass rounded up to mass (u close to 1), or u is NaN.
    tok = tl.where(tok >= 0, tok, last)
    tok = tl.where(has_mass, tok, best_i)
    tok = tl.minimum(tl.maximum(tok, 0), V - 1)
    return tl.where(valid, tok, -1)


@triton.jit
def _accept_tree_kernel(
    p_ptr, tok_ptr, par_ptr, ua_ptr, us_ptr, out_ptr, path_ptr, nacc_ptr,
    N1, V,
    stride_pb, stride_pn, stride_tb, stride_tn, stride_parb, stride_parn,
    stride_uab, stride_uan, stride_usb, stride_ob, stride_pathb,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_N)  # lane i is node i; BLOCK_N >= N + 1
    lanes64 = lanes.to(tl.int64)
    in_tree = lanes < N1

    # The whole tree in three vector loads. Range checks come before narrowing: a garbage int64 must not wrap into
    # a valid parent or token.
    par = tl.load(par_ptr + b * stride_parb + lanes64 * stride_parn, mask=in_tree, other=-1)
    par = tl.where(in_tree & (par >= 0) & (par < lanes), par, -1).to(tl.int32)
    tok = tl.load(tok_ptr + b * stride_tb + lanes64 * stride_tn, mask=in_tree, other=-1)
    tok = tl.where(in_tree & (tok >= 0) & (tok < V), tok, -1).to(tl.int32)  # -1: rejected, never loaded
    ua = tl.load(ua_ptr + b * stride_uab + lanes64 * stride_uan, mask=in_tree, other=1.0)
    row0 = p_ptr + b * stride_pb

    cur = 0
    j = 0                                        # accepted so far
    path = tl.full([BLOCK_N], -1, tl.int32)      # lane k: the k-th accepted node
    out = tl.full([BLOCK_N], -1, tl.int32)       # lane k: the k-th emitted token
    rejected = tl.full([BLOCK_N], -1, tl.int32)  # rejected tokens of cur's children, compacted
    n_rejected = 0
    bad = False
    go = True
    while go:
        row = row0 + cur.to(tl.int64) * stride_pn
        # children have larger indices than their parent, so the walk only moves forward and ends within N steps
        # even on a malformed tree.
        kids = (par == cur) & (lanes > cur)
        rejected = tl.full([BLOCK_N], -1, tl.int32)
        n_rejected = 0
        mass = 0.0
        if tl.max(kids.to(tl.int32), 0) > 0:
            # The row's one full read before its children are tried; a row that is not finite ends the walk.
            mass, bad = _row_mass(row, V, BLOCK_V)
        nxt = -1
        prev = cur
        trying = bad == 0
        while trying:
            c = tl.min(tl.where(kids & (lanes > prev), lanes, BLOCK_N), 0)  # next child in index order
            has_child = c < BLOCK_N
            t = tl.max(tl.where(lanes == c, tok, -1), 0)
            pt = tl.load(row + t, mask=t >= 0, other=0.0).to(tl.float32)
            seen = tl.max(tl.where(rejected == t, 1, 0), 0) > 0  # a rejected sibling's token: P'(t) = 0
            pt = tl.where(seen, 0.0, tl.maximum(pt, 0.0))
            u = tl.sum(tl.where(lanes == c, ua, 0.0), 0)
            acc = (pt > 0.0) & (u * mass < pt)
            drop = (acc == 0) & (pt > 0.0)
            # Clamped: rounding must not leave a negative mass, for which u * mass < 0 = P'(t) would accept t.
            mass = tl.where(drop, tl.maximum(mass - pt, 0.0), mass)
            rejected = tl.where(lanes == tl.where(drop, n_rejected, -1), t, rejected)
            n_rejected += drop.to(tl.int32)
            nxt = tl.where(acc, c, -1)
            prev = c
            trying = has_child & (acc == 0)
        go = nxt >= 0
        slot = tl.where(go, j, -1)
        path = tl.where(lanes == slot, nxt, path)
        out = tl.where(lanes == slot, tl.max(tl.where(lanes == nxt, tok, -1), 0), out)
        j += go.to(tl.int32)
        cur = tl.where(go, nxt, cur)

    # cur is the last accepted node (or the root), rejected its rejected children's tokens. A leaf's row is first
    # read here, so the emission checks it too.
    emitted = -1
    if bad == 0:
        u = tl.load(us_ptr + b * stride_usb)
        emitted = _sample_without(row0 + cur.to(tl.int64) * stride_pn, V, u, rejected, n_rejected, lanes, BLOCK_V)
    valid = emitted >= 0
    out = tl.where(valid, tl.where(lanes == j, emitted, out), -1)
    path = tl.where(valid, path, -1)
    tl.store(out_ptr + b * stride_ob + lanes64, out.to(tl.int64), mask=in_tree)
    tl.store(path_ptr + b * stride_pathb + lanes64, path.to(tl.int64), mask=lanes < N1 - 1)
    tl.store(nacc_ptr + b, tl.where(valid, j, -1).to(tl.int64))


# ----------------------------------------------------------------------------------------------------------------------
# Launcher, registered as the torch op minipass::accept_tree
# ----------------------------------------------------------------------------------------------------------------------

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int64, torch.int32)
# triton.jit reads the variable when the kernel is defined, so this is the mode it runs in.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Without a register limit ptxas sometimes stops at 48-80 registers and spills (sm_90 more than sm_80); the hardware's
# limit, stated, makes it keep every value in registers (at most 168 per thread: python -m minipass.kernels.lower_acceptance).
# One program per row, so the occupancy this gives up matters only when B exceeds the number of SMs.
MAX_REGISTERS = 255


def _check_tensor(name, x, shape, dtypes, device, dtype_words):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}.")
    if x.dtype not in dtypes:
        raise TypeError(f"{name} must be {dtype_words}, got {x.dtype}.")
    if x.device != device:
        raise ValueError(f"{name} must be on {device} like p, got {x.device}.")


def _check_types(**tensors):
    # Before the op call, so that a non-tensor gets this message rather than the dispatcher's.
    for name, x in tensors.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")


def _check_inputs(p, tokens, parents, u_accept, u_sample, on_device=True):
    _check_types(p=p, tokens=tokens, parents=parents, u_accept=u_accept, u_sample=u_sample)
    if p.dim() != 3 or p.shape[1] < 1 or p.shape[2] < 1:
        raise ValueError(f"p must have shape (B, N+1, V) with N+1 >= 1 and V >= 1, got {tuple(p.shape)}.")
    B, N1, V = p.shape
    device = p.device
    _check_tensor("p", p, (B, N1, V), _FLOATS, device, "float32, float16 or bfloat16")
    if p.stride(2) != 1 and V > 1:
        raise ValueError(f"p must be contiguous in its last (vocabulary) dimension, got strides {p.stride()}.")
    if on_device and device.type != "cuda" and not _INTERPRET:
        raise ValueError(f"p must be on a CUDA device for the Triton kernel (or set TRITON_INTERPRET=1 before "
                         f"importing it to run it on the CPU), got {device}.")
    _check_tensor("tokens", tokens, (B, N1), _INTS, device, "int32 or int64")
    _check_tensor("parents", parents, (B, N1), _INTS, device, "int32 or int64")
    _check_tensor("u_accept", u_accept, (B, N1), (torch.float32,), device, "float32")
    _check_tensor("u_sample", u_sample, (B,), (torch.float32,), device, "float32")
    return B, N1 - 1, V


def _check_tree(parents):
    """Host-side structure check (it syncs): node 0 is the root, parents come before children, padding is a leaf."""
    par = parents.long().cpu()
    B, N1 = par.shape
    if B == 0:
        return
    bad = (par[:, 0] != -1).nonzero()
    if len(bad):
        b = bad[0, 0].item()
        raise ValueError(f"parents[{b}, 0] must be -1 (node 0 is the root), got {par[b, 0].item()}.")
    node = torch.arange(N1)
    bad = ((par != -1) & ((par < 0) | (par >= node))).nonzero()
    if len(bad):
        b, i = bad[0].tolist()
        raise ValueError(f"parents[{b}, {i}] must be -1 (padding) or an earlier node in [0, {i}), "
                         f"got {par[b, i].item()}.")
    padding = (par == -1) & (node >= 1)                                       # (B, N+1)
    under_padding = (par >= 0) & padding.gather(1, par.clamp_min(0))
    bad = under_padding.nonzero()
    if len(bad):
        b, i = bad[0].tolist()
        raise ValueError(f"parents[{b}, {i}] = {par[b, i].item()} is a padding node (its parent is -1); "
                         f"padding nodes must not have children.")


def _check_block_v(block_v):
    if block_v is not None and (isinstance(block_v, bool) or not isinstance(block_v, int) or block_v < 16
                                or block_v & (block_v - 1)):
        raise ValueError(f"block_v must be a power of two >= 16, got {block_v!r}.")


def _pow2_at_least(x):
    return 1 << (x - 1).bit_length()


def _outputs(p, B, N):
    return (torch.empty((B, N + 1), dtype=torch.int64, device=p.device),
            torch.empty((B, N), dtype=torch.int64, device=p.device),
            torch.empty((B,), dtype=torch.int64, device=p.device))


def _plan(p, tokens, parents, u_accept, u_sample, block_v):
    """Checks and launch parameters: (B, N, V, strides, BLOCK_N, BLOCK_V, num_warps).

    They read only shapes, strides, dtypes and devices, so they are computed once per signature and cached."""
    _check_block_v(block_v)
    B, N, V = _check_inputs(p, tokens, parents, u_accept, u_sample)
    # The outputs are contiguous: rows of N + 1 tokens and of N path entries (path row stride 1 when N = 0, where
    # every store to it is masked off).
    strides = (p.stride(0), p.stride(1), tokens.stride(0), tokens.stride(1), parents.stride(0), parents.stride(1),
               u_accept.stride(0), u_accept.stride(1), u_sample.stride(0), N + 1, max(N, 1))
    return (B, N, V, strides) + launch_params(N, V, block_v)


def launch_params(N, V, block_v=None):
    """(BLOCK_N, BLOCK_V, num_warps) the launcher picks for trees of N + 1 nodes."""
    BLOCK_V = block_v or min(_MAX_BLOCK_V, _pow2_at_least(V))
    return _pow2_at_least(N + 1), BLOCK_V, (8 if BLOCK_V >= 2048 else 4)


_PLANS = {}


def _cached_plan(p, tokens, parents, u_accept, u_sample, block_v):
    key = (block_v, p.shape, p.stride(), p.dtype, p.device,
           tokens.shape, tokens.stride(), tokens.dtype, tokens.device,
           parents.shape, parents.stride(), parents.dtype, parents.device,
           u_accept.shape, u_accept.stride(), u_accept.dtype, u_accept.device,
           u_sample.shape, u_sample.stride(), u_sample.dtype, u_sample.device)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _plan(p, tokens, parents, u_accept, u_sample, block_v)
        if len(_PLANS) >= 4096:
            _PLANS.clear()
        _PLANS[key] = plan
    return plan


def _accept_tree_impl(p, tokens, parents, u_accept, u_sample, check_values, block_v):
    B, N, V, strides, BLOCK_N, BLOCK_V, num_warps = _cached_plan(p, tokens, parents, u_accept, u_sample, block_v)
    if check_values:
        _check_tree(parents)
    out_tokens, path, num_accepted = _outputs(p, B, N)
    if B == 0:
        return out_tokens, path, num_accepted
    # With N = 0 path is empty; pass a real allocation so the kernel never sees a null pointer.
    _accept_tree_kernel[(B,)](
        p, tokens, parents, u_accept, u_sample, out_tokens, path if N > 0 else out_tokens, num_accepted,
        N + 1, V, *strides,
        BLOCK_N=BLOCK_N, BLOCK_V=BLOCK_V, num_warps=num_warps, maxnreg=MAX_REGISTERS,
    )
    return out_tokens, path, num_accepted


def _accept_tree_fake(p, tokens, parents, u_accept, u_sample, check_values, block_v):
    _check_block_v(block_v)
    B, N, V = _check_inputs(p, tokens, parents, u_accept, u_sample, on_device=False)
    return _outputs(p, B, N)


_LIB = torch.library.Library("minipass", "FRAGMENT")
if not hasattr(torch.ops.minipass, "accept_tree"):  # else a second copy of this file, imported under another name
    _LIB.define("accept_tree(Tensor p, Tensor tokens, Tensor parents, Tensor u_accept, Tensor u_sample, "
                "bool check_values, int? block_v) -> (Tensor, Tensor, Tensor)")
    for _key in ("CPU", "CUDA"):
        _LIB.impl("accept_tree", _accept_tree_impl, _key)
    torch.library.register_fake("minipass::accept_tree", _accept_tree_fake, lib=_LIB)


def accept_tree(p, tokens, parents, u_accept, u_sample, *, check_values=True, block_v=None):
    """Verify a token tree per row: (out_tokens (B, N+1), path (B, N), num_accepted (B,)), all int64.

    See the module docstring for the rule, the shapes and invalid rows (num_accepted -1). check_values=False skips
    the host-side tree check (and its sync); block_v (a power of two >= 16) overrides the vocabulary block. The
    launch is the op torch.ops.minipass.accept_tree."""
    _check_types(p=p, tokens=tokens, parents=parents, u_accept=u_accept, u_sample=u_sample)
    _check_block_v(block_v)
    return torch.ops.minipass.accept_tree(p, tokens, parents, u_accept, u_sample, bool(check_values), block_v)


# ----------------------------------------------------------------------------------------------------------------------
# Torch reference
# ----------------------------------------------------------------------------------------------------------------------


def _sample_ref(r, p, u):
    """Inverse-CDF sample per row of r (B, V) with u (B,), falling back to max(p, 0), then to argmax(p)."""
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


def accept_tree_ref(p, tokens, parents, u_accept, u_sample):
    """Torch reference for accept_tree(): same outputs, vectorised over rows, one step per node index, no host sync.

    Nodes are visited in index order: node i is tried iff its parent is the current node when its turn comes. This
    is the kernel's walk, because a node's children come after it and an accepted child's later siblings are never
    tried. A row stops trying once it has reached a node whose row is not finite."""
    B, N1, V = p.shape
    N = N1 - 1
    dev = p.device
    rows = torch.arange(B, device=dev)
    p = p.float()
    tokens, parents = tokens.long(), parents.long()
    row_ok = p.isfinite().all(-1)                                   # (B, N+1)

    cur = torch.zeros(B, dtype=torch.long, device=dev)
    num_accepted = torch.zeros(B, dtype=torch.long, device=dev)
    path = torch.full((B, N), -1, dtype=torch.long, device=dev)
    slots = torch.arange(N, device=dev)
    invalid = ~row_ok[:, 0]
    P = p[:, 0].clamp_min(0)                                        # P' of the current node, (B, V)
    mass = P.sum(-1)
    for i in range(1, N1):
        t = tokens[:, i]
        tried = ~invalid & (parents[:, i] == cur) & (t >= 0) & (t < V)
        t_safe = torch.where(tried, t, 0)[:, None]                  # (B, 1)
        p_t = P.gather(1, t_safe)[:, 0]
        pt = torch.where(tried, p_t, 0.0)
        acc = (pt > 0) & (u_accept[:, i] * mass < pt)
        drop = ~acc & (pt > 0)
        mass = torch.where(drop, (mass - pt).clamp_min(0), mass)
        P = P.scatter(1, t_safe, torch.where(drop, 0.0, p_t)[:, None])
        path = torch.where(acc[:, None] & (slots == num_accepted[:, None]), i, path)
        cur = torch.where(acc, i, cur)
        P = torch.where(acc[:, None], p[:, i].clamp_min(0), P)
        mass = torch.where(acc, P.sum(-1), mass)
        num_accepted += acc.long()
        invalid |= acc & ~row_ok[:, i]

    ok = ~invalid[:, None]
    emitted = _sample_ref(torch.where(ok, P, 0.0), torch.where(ok, p[rows, cur], 0.0), u_sample)
    cols = torch.arange(N1, device=dev)
    path_tokens = tokens.gather(1, torch.cat([path, path.new_full((B, 1), -1)], 1).clamp_min(0))  # (B, N+1)
    out_tokens = torch.where(cols < num_accepted[:, None], path_tokens, -1)
    out_tokens[rows, num_accepted] = emitted
    return (torch.where(ok, out_tokens, -1), torch.where(ok, path, -1), torch.where(invalid, -1, num_accepted))
