"""Token trees: many candidates per call from look-ahead top-k and context n-grams, verified exactly in one forward.

Each call feeds, per row, [root, node_1..node_N, look-ahead blocks] where the root is the pending token and the
nodes form a trie of candidate continuations (a node's parent comes before it). Node i sits at position
pos(root) + depth_i and attends to the cached prefix and its ancestors; a look-ahead block after node a has its k-th
token at pos(a) + k, attending to a's ancestors, a, and the block's tokens 1..k. One forward gives the target at every
node and, from the block after whichever node the accepted path ends at, the look-ahead distributions that seed the
next tree.

Candidates are deterministic (top-k tokens, n-gram copies), so verification is the multi-candidate rule of PASS.md:
at a node with target P, try its children in order, accept child c with probability P'(c) / sum(P') where P' is P
with the already rejected children removed; if none is accepted emit a token from P'. That is sampling without
replacement, one candidate at a time: the output is distributed exactly as autoregressive sampling (greedy: follow
the child equal to argmax P). kernels/tree_acceptance.py implements it; the accepted nodes' K/V are then moved to
consecutive cache slots with one index copy for all layers.

Trees are built on the device, for all rows at once, inside the step (no host round trip):
  1. candidates: a static *pool* of nodes (`TreeTemplate`): the root, C n-gram chains of up to `ngram_len` tokens
     each, and a fixed set of look-ahead rank paths (r_1, .., r_d): the r_1-th likeliest token one place after the
     root, then the r_2-th likeliest two places after it, ... The n-gram chains are the continuations of the latest
     earlier occurrences of the context's longest suffix (`ngram_chains`, a suffix match over the committed tokens
     as tensor ops), then, with a datastore, S more: its continuations of that suffix (datastore.store_chains); the
     look-ahead tokens are the top-k of the previous call's look-ahead block.
  2. scores: an n-gram node's is `ngram_prior ** depth`, a look-ahead node's the product of its path's look-ahead
     probabilities; or, with calibrated scores (sizing.py), the measured acceptance rates of each source by depth
     and rank.
  3. the trie: pool nodes whose token paths (root to node) are equal are one trie node, the earliest of them, with
     the larger score (its children are all of theirs); a node some ancestor of which has no token is left out;
  4. the N best nodes by score (n-gram chains first when uncalibrated), which is a subtree because a child never
     scores above its parent; then the ancestor mask, the positions, and M look-ahead blocks after the M best nodes.
`build_tree` (host, per row, plain Python) is the readable reference of steps 1-4; tests check the two agree.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from minipass.kernels.tree_acceptance import accept_tree, accept_tree_ref
from minipass.datastore import Datastore, store_chains
from minipass.decoding import Output, SamplingParams, State, clock, commit, flag_non_finite, run, start, step_for
from minipass.errors import MinipassError
from minipass.lookahead import lookahead_inputs, num_lookahead
from minipass.model import Transformer
from minipass.sampling import ACCEPT, RESIDUAL, argmax, topk, uniforms


@dataclass(frozen=True)
class TreeConfig:
    # The defaults make a 16-wide call with L = 4 (1 + N + M L): see README, "Default tree".
    nodes: int = 11  # N: candidate nodes per call (the root excluded)
    topk: int = 8  # look-ahead candidates per depth
    blocks: int = 1  # M: look-ahead blocks per call (0 = no look-ahead drafting)
    ngram_max: int = 3  # longest context suffix matched for n-gram drafts
    ngram_min: int = 1  # shortest
    ngram_len: int = 8  # tokens copied after a match
    ngram_chains: int = 4  # distinct continuations taken (most recent matches of the longest suffix first)
    ngram_prior: float = 0.6  # per-token score of an n-gram candidate (look-ahead ones score their probability)
    store_chains: int = 3  # continuations taken from a datastore, when the decoder is given one (datastore.py)
    pool: int = 0  # look-ahead rank paths considered per call (0 = 3 * nodes)
    # Calibrated scores (sizing.py), or None: (look-ahead acceptance by depth and rank, L x topk; n-gram acceptance
    # by depth, ngram_len, or by chain and depth, chains x ngram_len), each the probability that the candidate is
    # right given that its parent was. Nested tuples, so that the config stays hashable.
    calibrated: Optional[tuple] = None

    def __post_init__(self):
        if self.nodes < 1:
            raise MinipassError(f"a tree needs at least 1 candidate node, got nodes={self.nodes}")
        if self.topk < 0 or self.blocks < 0 or self.ngram_chains < 0 or self.pool < 0 or self.store_chains < 0:
            raise MinipassError("tree options topk, blocks, ngram_chains, store_chains and pool must be >= 0")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise MinipassError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if self.ngram_len < 1:
            raise MinipassError(f"ngram_len must be >= 1, got {self.ngram_len}")


# --- the static pool of candidates ------------------------------------------------------------------------------

class TreeTemplate:
    """The candidate pool of one configuration: node 0 the root, then the n-gram chain nodes (chain c, depth j+1 at
    1 + c * ngram_len + j: the context's ngram_chains, then `store` chains from a datastore), then the look-ahead
    rank paths in breadth-first order, so a node's parent always comes first. Static: built once per (config, L,
    store) on the host, used by every call."""

    def __init__(self, cfg: TreeConfig, L: int, device=None, store: int = 0):
        C, ell = cfg.ngram_chains + store, cfg.ngram_len
        parent, depth = [-1], [0]
        for c in range(C):
            for j in range(ell):
                parent.append(0 if j == 0 else len(parent) - 1)
                depth.append(j + 1)
        self.paths = self.rank_paths(cfg, L)
        where = {(): 0}
        la_start = len(parent)
        for path in self.paths:
            where[path] = len(parent)
            parent.append(where[path[:-1]])
            depth.append(len(path))
        self.P, self.la_start, self.n_chain = len(parent), la_start, C * ell
        self.C, self.ell, self.L, self.topk = C, ell, L, cfg.topk
        self.max_depth = max(depth)
        # up[i, d]: node i's ancestor at depth d (i itself at d = depth_i), -1 deeper: a taken node's ancestors
        # are one gather, with no walk from node to node.
        up = [[-1] * (self.max_depth + 1) for _ in parent]
        for i in range(len(parent)):
            j = i
            while j >= 0:
                up[i][depth[j]] = j
                j = parent[j]
        # ranks[i, d]: the rank taken at depth d + 1 on look-ahead path i, or -1 past its end.
        ranks = torch.full((len(self.paths), max(L, 1)), -1, dtype=torch.long)
        for i, path in enumerate(self.paths):
            ranks[i, : len(path)] = torch.tensor(path)
        to = partial(torch.tensor, dtype=torch.long, device=device)
        self.parent, self.depth, self.ranks = to(parent), to(depth), ranks.to(device)
        self.up = to(up)
        # Among the look-ahead blocks' tokens: block m's k-th token sees the block's tokens 1..k.
        M = cfg.blocks if L else 0
        self.blocks = torch.block_diag(*[torch.ones(L, L, dtype=torch.bool).tril()] * M).to(device) if M else None
        # Which pool nodes can be one trie node: two n-gram chain nodes at the same depth, or a look-ahead node and
        # a chain node at its depth (two look-ahead nodes never: their rank paths differ at some depth, and a top-k
        # has distinct tokens at each depth). la_match[i, k]: the entry (depth k, rank) of look-ahead path i in the
        # flattened (min(L, ell) * topk + 1) table of "look-ahead token == chain token", the last entry (True) past
        # the path's end; la_twin[c, i]: the pool index of chain c's node at path i's depth, P if it has none.
        Lm, K = min(L, ell), max(cfg.topk, 1)
        match = [[d * K + p[d] if d < min(len(p), Lm) else Lm * K for d in range(max(L, 1))] for p in self.paths]
        self.la_match = to(match).view(len(self.paths), max(L, 1))
        self.la_twin = to([[1 + c * ell + len(p) - 1 if len(p) <= ell else len(parent) for p in self.paths]
                           for c in range(C)]).view(C, len(self.paths))
        # Static score factors: n-gram chain nodes by depth; look-ahead (depth, rank) if calibrated.
        if cfg.calibrated is not None:
            la_acc, ng_acc = cfg.calibrated
            la_acc = torch.tensor(la_acc, dtype=torch.float32)
            ng = torch.tensor(ng_acc, dtype=torch.float32)
            if ng.dim() == 2 and ng.shape[0] < C:
                raise MinipassError(f"the calibrated scores have {ng.shape[0]} n-gram chains, the tree {C} (with or "
                                    "without a datastore: calibrate the tree the way it decodes)")
            ng = (ng.expand(C, -1) if ng.dim() == 1 else ng[:C])[:, :ell].cumprod(1).reshape(-1)  # (C * ell,)
        else:
            la_acc, ng = None, (cfg.ngram_prior ** torch.arange(1, ell + 1, dtype=torch.float32)).repeat(C)
        self.chain_score = torch.cat([torch.ones(1), ng, torch.zeros(len(self.paths))]).to(device)
        self.la_static = None
        if la_acc is not None:
            s = [float(torch.tensor([la_acc[d, r] for d, r in enumerate(p)]).prod()) for p in self.paths]
            self.la_static = torch.tensor(s, dtype=torch.float32, device=device)
        # Uncalibrated, n-gram chains are taken before any look-ahead candidate; calibrated, all compete on score.
        self.chains_first = cfg.calibrated is None
        key_bonus = 2.0 if self.chains_first else 0.0
        self.chain_key = self.chain_score + torch.tensor([0.0] + [key_bonus] * self.n_chain + [0.0] * len(self.paths),
                                                         device=device)

    @staticmethod
    def rank_paths(cfg: TreeConfig, L: int) -> list:
        """The look-ahead rank paths of the pool: the `pool` likeliest by calibrated scores, else by the bound
        prod 1 / (r + 1) on the probability of a rank-r token (ties: shallower, then lexicographic)."""
        if L == 0 or cfg.topk == 0 or cfg.blocks == 0:
            return []
        size = cfg.pool or 3 * cfg.nodes
        acc = cfg.calibrated[0] if cfg.calibrated is not None else [[1.0 / (r + 1) for r in range(cfg.topk)]] * L

        def weight(path):
            w = 1.0
            for d, r in enumerate(path):
                w *= acc[d][r]
            return w

        # Best-first over the rank tree; a child never weighs more than its parent and is pushed after it.
        frontier = [(-weight((r,)), 1, (r,)) for r in range(cfg.topk)]
        heapq.heapify(frontier)
        chosen = []
        while frontier and len(chosen) < size:
            _, d, path = heapq.heappop(frontier)
            chosen.append(path)
            if d < L:
                for r in range(cfg.topk):
                    heapq.heappush(frontier, (-weight(path + (r,)), d + 1, path + (r,)))
        return sorted(chosen, key=lambda p: (len(p), p))


# --- n-gram continuations from the context, as tensor ops ---------------------------------------------------------

def ngram_chains(ctx: Tensor, length: Tensor, n_min: int, n_max: int, ell: int, C: int) -> Tensor:
    """Up to C distinct continuations (B, C, ell) of the context's suffix, -1 where there is none.

    ctx: (B, S) tokens by position; length: (B,) tokens in use (the last is the root). A match of the suffix of n
    tokens ending just before position e (n <= e < length) proposes ctx[e : e + ell] (cut at length). Matches of the
    longest suffix come first, the most recent first; a continuation equal to an earlier chosen one is skipped.
    Every comparison is of whole shifted slices of the context (no per-element gathers over it), so a compiled step
    reads it at full vector width.
    """
    B, S = ctx.shape
    dev = ctx.device
    e = torch.arange(S, device=dev)
    # The context with -1 from each row's length on, and ell more -1 columns: continuation token j of a match ending
    # at e is padded[:, e + j].
    padded = torch.cat([torch.where(e < length[:, None], ctx, -1), ctx.new_full((B, ell), -1)], 1)
    keys = torch.full((B, S), -1, dtype=torch.long, device=dev)
    run_ = torch.ones(B, S, dtype=torch.bool, device=dev)
    for n in range(1, n_max + 1):
        j = n - 1  # compare ctx[e - 1 - j] with the suffix's token j places before the root
        last = ctx.gather(1, (length - 1 - j).clamp(min=0)[:, None])  # (B, 1)
        shifted = torch.cat([torch.full((B, j + 1), -1, dtype=ctx.dtype, device=dev), ctx[:, : S - j - 1]], 1)
        run_ = run_ & (shifted == last) & (length[:, None] - 1 - j >= 0)
        if n >= n_min:
            ok = run_ & (e >= n) & (e < length[:, None])
            keys = torch.where(ok, n * S + e, keys)  # longer suffixes first, then later positions
    chains = []
    for c in range(C):
        best_key = keys.amax(1)  # (B,); the match is at best_key % S
        at = (best_key.clamp(min=0) % S)[:, None] + torch.arange(ell, device=dev)
        chain = torch.where(best_key[:, None] >= 0, padded.gather(1, at), -1)  # (B, ell)
        chains.append(chain)
        if c + 1 < C:  # drop the matches that propose this same continuation
            same = padded[:, :S] == chain[:, :1]
            for j in range(1, ell):
                same = same & (padded[:, j: j + S] == chain[:, j: j + 1])
            keys = torch.where(same, -1, keys)
    return torch.stack(chains, 1) if chains else torch.full((B, 0, ell), -1, dtype=ctx.dtype, device=dev)


class NgramIndex:
    """Reference for `ngram_chains` in plain Python (a test oracle): one row's context and, for n = n_min..n_max,
    where each n-gram ends in it (most recent last)."""

    def __init__(self, tokens: Sequence[int], n_min: int, n_max: int):
        self.tokens: list = []
        self.n_min, self.n_max = n_min, n_max
        self.ends: dict = {}
        self.extend(tokens)

    def extend(self, new: Sequence[int]) -> None:
        for t in new:
            self.tokens.append(t)
            end = len(self.tokens)
            for n in range(self.n_min, min(self.n_max, end) + 1):
                self.ends.setdefault(tuple(self.tokens[end - n:end]), []).append(end)

    def continuations(self, length: int, chains: int) -> list:
        """Up to `chains` distinct continuations of up to `length` tokens that followed earlier occurrences of the
        context's longest matching suffix (longest suffix first, then most recent occurrence first)."""
        out, end = [], len(self.tokens)
        for n in range(min(self.n_max, end), self.n_min - 1, -1):
            for e in reversed(self.ends.get(tuple(self.tokens[end - n:]), ())):
                cont = self.tokens[e:e + length]
                if e < end and cont and cont not in out:
                    out.append(cont)
                    if len(out) == chains:
                        return out
        return out


def store_slots(cfg: TreeConfig, store: Optional[Datastore]) -> int:
    """Chains a tree of `cfg` takes from `store` (none without one)."""
    return min(cfg.store_chains, store.chains) if store is not None else 0


def draft_chains(index: NgramIndex, cfg: TreeConfig, store: Optional[Datastore] = None) -> list:
    """Reference of a call's chain slots (what tree_step gives build_trees): the context's ngram_chains, then, with
    a datastore, its store_chains continuations of the context's suffix; [] for an empty slot."""
    ctx = index.continuations(cfg.ngram_len, cfg.ngram_chains) if cfg.ngram_chains else []
    ctx = ctx + [[]] * (cfg.ngram_chains - len(ctx))
    S = store_slots(cfg, store)
    if not S:
        return ctx
    got = store.continuations(index.tokens, cfg.ngram_len)[:S]
    return ctx + got + [[]] * (S - len(got))


# --- the tree of one call ------------------------------------------------------------------------------------------

@dataclass
class Tree:
    """One call's trees, (B, ...) each: node 0 is the root; padding nodes have parent -1 and see only themselves."""
    tokens: Tensor  # (B, N+1)
    parents: Tensor  # (B, N+1)
    depths: Tensor  # (B, N+1)
    scores: Tensor  # (B, N+1), -1 for padding
    anchors: Tensor  # (B, M) node index of each look-ahead block's anchor, -1 for none
    mask: Tensor  # (B, T, T) among the call's new tokens
    offsets: Tensor  # (B, T) positions relative to the root
    ups: Tensor  # (B, N+1, D+1): each node's ancestor at each depth, itself at its own, -1 deeper


def build_trees(tpl: TreeTemplate, N: int, M: int, root: Tensor, chains: Tensor, la_tok: Tensor, la_prob: Tensor,
                la_valid: Tensor) -> Tree:
    """The trees of a call for every row (B,), from the pool of `tpl` (see the module docstring, steps 1-4).

    root: (B,); chains: (B, C, ell), -1 = none; la_tok, la_prob: (B, L, topk) look-ahead top-k (distinct tokens at
    each depth, as a top-k gives); la_valid: (B,).
    Every step is a fixed number of gathers, compares and sorts over the pool: no loop over levels or depths, so a
    compiled step computes each intermediate once.
    """
    B, dev = root.shape[0], root.device
    P, L = tpl.P, tpl.L
    # 1. Tokens, validity, scores and sort keys of every pool node, in pool order.
    tok = [root[:, None]]
    score, key = tpl.chain_score.expand(B, -1), tpl.chain_key.expand(B, -1)
    if tpl.n_chain:
        c = chains.reshape(B, -1)  # (B, C * ell), pool order
        tok.append(c.clamp(min=0))
    n_la = P - tpl.la_start
    if n_la:
        ranks = tpl.ranks  # (n_la, L)
        last_d = (ranks >= 0).sum(1) - 1  # depth - 1 of each path
        tok.append(la_tok[:, last_d, ranks.gather(1, last_d[:, None])[:, 0]])
        # 2. A look-ahead node's score: the product of its path's probabilities (or its calibrated score).
        if tpl.la_static is not None:
            la_score = tpl.la_static.expand(B, -1)
        else:
            depth_idx = torch.arange(ranks.shape[1], device=dev).expand_as(ranks)
            la_score = torch.where(ranks >= 0, la_prob[:, depth_idx, ranks.clamp(min=0)], 1.0).prod(-1)
        score = torch.cat([score[:, : tpl.la_start], la_score], 1)
        key = torch.cat([key[:, : tpl.la_start], la_score], 1)
    tok = torch.cat(tok, 1)  # (B, P)
    # 3. The trie. A node is in it if it and all its ancestors have a token; two nodes are one trie node iff their
    # token paths are equal, and then the earliest stands for both (its children are the union of theirs) with the
    # larger score and key. Only n-gram chain nodes come before others, so a class's earliest node is the root, the
    # node of the earliest chain that shares the path, or the node itself.
    ids = torch.arange(P, device=dev).expand(B, -1)
    rep, live = [ids[:, :1]], [torch.ones(B, 1, dtype=torch.bool, device=dev)]
    C, ell = tpl.C, tpl.ell
    if C:
        ch_live = (chains >= 0).long().cumprod(2) > 0  # (B, C, ell)
        # [b, c2, c, j]: chains c2 and c agree down to depth j + 1, and c2 has a token there
        prefix = (chains[:, :, None] == chains[:, None]).long().cumprod(3) > 0
        earlier = torch.arange(C, device=dev)[:, None] < torch.arange(C, device=dev)  # [c2, c]: c2 < c
        own = ids[:, 1: 1 + C * ell].view(B, 1, C, ell)
        twin = torch.where(prefix & earlier[:, :, None] & ch_live[:, :, None], own.transpose(1, 2), P)
        rep.append(torch.minimum(twin.amin(1), own[:, 0]).flatten(1))
        live.append(ch_live.flatten(1))
    if n_la:
        rep_la = ids[:, tpl.la_start:]
        if C:
            Lm = min(L, ell)
            same = la_tok[:, None, :Lm] == chains[:, :, :Lm, None]  # (B, C, Lm, topk)
            same = torch.cat([same.flatten(2), same.new_ones(B, C, 1)], 2)
            # A chain token equal to a look-ahead one is a token (>= 0), so the chain node is in the trie.
            twin = torch.where(same[:, :, tpl.la_match].all(-1) & la_valid[:, None, None], tpl.la_twin, P)
            rep_la = torch.minimum(twin.amin(1), rep_la)
        rep.append(rep_la)
        live.append(la_valid[:, None].expand(-1, n_la))
    rep, live = torch.cat(rep, 1), torch.cat(live, 1)  # (B, P)
    score = torch.where(live, score, -1.0)
    score = score.scatter_reduce(1, rep, score, "amax")
    key = torch.where(live, key, -1.0)
    key = key.scatter_reduce(1, rep, key, "amax")
    # 4. The N best (chains first when uncalibrated); the root always. Stable sort: ties keep parents first.
    key = torch.where(live & (rep == ids), key, -1.0)
    key = torch.cat([key.new_full((B, 1), 4.0), key[:, 1:]], 1)
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    take = order[:, : N + 1] if P >= N + 1 else torch.cat(
        [order, order.new_zeros(B, N + 1 - P)], 1)
    taken = key.gather(1, take) >= 0
    if P < N + 1:
        taken[:, P:] = False
    # Pool order among the taken nodes keeps parents before children; padding goes last.
    sel = torch.sort(torch.where(taken, take, P + torch.arange(N + 1, device=dev)), dim=1).values
    real = sel < P
    sel_c = sel.clamp(max=P - 1)
    node = torch.arange(N + 1, device=dev).expand(B, -1)
    inv = torch.full((B, P + 1), -1, dtype=torch.long, device=dev)
    inv = inv.scatter(1, torch.where(real, sel_c, P), node)  # pool index -> tree index
    # Each taken node's ancestors, as tree indices: the classes of its pool ancestors (all taken: a subtree).
    anc_pool = tpl.up[sel_c]  # (B, N+1, D + 1)
    ups = inv.gather(1, rep.gather(1, anc_pool.clamp(min=0).flatten(1))).view_as(anc_pool)
    padding = torch.where(torch.arange(ups.shape[2], device=dev) == 0, node[:, :, None], -1)  # itself at depth 0
    ups = torch.where(real[:, :, None], torch.where(anc_pool >= 0, ups, -1), padding)
    depths = torch.where(real, tpl.depth[sel_c], 0)
    parents = torch.where(depths > 0, ups.gather(2, (depths - 1).clamp(min=0)[:, :, None])[:, :, 0], -1)
    tokens = torch.where(real, tok.gather(1, sel_c), 0)
    scores = torch.where(real, score.gather(1, sel_c), -1.0)
    scores = torch.cat([scores.new_ones(B, 1), scores[:, 1:]], 1)
    return _layout(tokens, parents, depths, scores, ups, tpl.blocks if M else None, L)


def _layout(tokens: Tensor, parents: Tensor, depths: Tensor, scores: Tensor, ups: Tensor, blocks: Optional[Tensor],
            L: int) -> Tree:
    """Ancestor mask, look-ahead blocks after the M best nodes, and positions, for trees given node by node.
    ups: (B, N+1, D + 1), each node's ancestor at each depth (itself at its own depth; a padding node: itself at
    0), -1 elsewhere. blocks: the (M * L, M * L) mask among the blocks' tokens (TreeTemplate.blocks), None for M = 0."""
    B, N1 = tokens.shape
    dev = tokens.device
    M = 0 if blocks is None else blocks.shape[0] // L
    node = torch.arange(N1, device=dev)
    anchors = torch.full((B, M), -1, dtype=torch.long, device=dev)
    if M:
        best = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :M]  # root first: score 1
        anchors = torch.where(scores.gather(1, best) >= 0, best, -1)
    a = anchors.clamp(min=0).repeat_interleave(L, 1)  # (B, M * L), the anchor of each block row
    # Mask row r is node r's ancestors, or for block m's k-th token its anchor's ancestors and the anchor, then the
    # block's tokens 1..k (a static table). Written as one expression over (B, T, T), so that a compiled step
    # computes it where the attention bias reads it, with no boolean tensor stored on the way.
    rows = torch.cat([node.expand(B, -1), a], 1)  # (B, T): the node whose ancestors row r sees
    T = rows.shape[1]
    col = torch.arange(T, device=dev)
    col_depth = torch.cat([depths, depths.new_zeros(B, T - N1)], 1)  # (B, T)
    # [b, r, c]: node c (c < N1) is rows[r]'s ancestor at c's depth, i.e. an ancestor of it or itself
    seen = ups.gather(1, rows[:, :, None].expand(-1, -1, ups.shape[2])).gather(
        2, col_depth[:, None, :].expand(-1, T, -1)) == col
    if M:
        mask = torch.where(col < N1, seen, F.pad(blocks, (N1, 0, N1, 0)))  # blocks: rows and columns N1..T-1
    else:
        mask = seen
    k = torch.arange(L, device=dev).repeat(M)
    offsets = torch.cat([depths, depths.gather(1, a) + 1 + k], 1)
    return Tree(tokens, parents, depths, scores, anchors, mask, offsets, ups)


def build_tree(tpl: TreeTemplate, N: int, root: int, chains: list, la_tok: Optional[list],
               la_prob: Optional[list]) -> tuple[list, list, list, list]:
    """Reference for one row, in plain Python (the test oracle of `build_trees`): (tokens, parents, depths, scores).

    chains: lists of tokens; la_tok[d][r], la_prob[d][r]: the r-th likeliest token d + 1 places after the root and
    its probability, or None when the row has no look-ahead drafts."""
    cand = [(None, root, 1.0, 4.0)]  # (pool parent, token or None, score, key), in pool order
    for c in range(tpl.C):
        chain = chains[c] if c < len(chains) else []
        for j in range(tpl.ell):
            i = len(cand)
            cand.append((0 if j == 0 else i - 1, chain[j] if j < len(chain) else None, float(tpl.chain_score[i]),
                         float(tpl.chain_key[i])))
    where = {(): 0}
    for i, path in enumerate(tpl.paths):
        parent, where[path] = where[path[:-1]], len(cand)
        if la_tok is None:
            cand.append((parent, None, 0.0, -1.0))
            continue
        score = 1.0
        for d, r in enumerate(path):
            score *= la_prob[d][r]
        if tpl.la_static is not None:
            score = float(tpl.la_static[i])
        cand.append((parent, la_tok[len(path) - 1][path[-1]], score, score))
    # The trie: equal token paths are one node, which keeps the larger score and key and the first pool index.
    token_path = {0: ()}
    best = {}
    for i, (parent, tok, score, key) in enumerate(cand[1:], 1):
        if tok is None or parent not in token_path:
            continue
        path = token_path[parent] + (tok,)
        token_path[i] = path
        old = best.get(path)
        best[path] = (key, score, i) if old is None else (max(old[0], key), max(old[1], score), old[2])
    # The N best by key (ties: pool order), laid out in pool order.
    chosen = sorted(sorted(best, key=lambda p: (-best[p][0], best[p][2]))[:N], key=lambda p: best[p][2])
    index = {(): 0}
    tokens, parents, depths, scores = [root], [-1], [0], [1.0]
    for p in chosen:
        index[p] = len(tokens)
        tokens.append(p[-1]), parents.append(index[p[:-1]]), depths.append(len(p)), scores.append(best[p][1])
    return tokens, parents, depths, scores


# --- verification --------------------------------------------------------------------------------------------------

def verify_tree(model: Transformer, sampling: SamplingParams, logits: Tensor, tree: Tree, u_accept: Tensor,
                u_sample: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(emitted tokens (B, N+1), accepted path (B, N), its length (B,), logits finite (B,)) for targets (B, N+1, V).

    Greedy: a node is accepted iff it and each of its ancestors below the root is its parent's argmax. Siblings
    differ (a trie), so the accepted nodes form one path from the root; the deepest ends it."""
    B, N1 = tree.tokens.shape
    if sampling.greedy:
        top, target = argmax(logits)  # (B, N+1)
        ok = torch.isfinite(top).all(-1)
        below = tree.ups[:, :, 1:]  # (B, N+1, D): ancestors below the root, -1 past the node
        # Each ancestor's token against its parent's argmax, the parent being the ancestor one depth up: two
        # gathers per entry (a per-node hit gathered by ancestor was four dependent ones, compiled).
        above = tree.ups[:, :, :-1].clamp(min=0)
        hit = tree.tokens.gather(1, below.clamp(min=0).flatten(1)) == target.gather(1, above.flatten(1))
        accepted = ((below < 0) | hit.view_as(below)).all(-1)
        end = torch.where(accepted & (tree.scores >= 0), tree.depths, -1).argmax(1)  # (B,), the root if none
        n_acc = tree.depths.gather(1, end[:, None])[:, 0]
        path = below.gather(1, end[:, None, None].expand(-1, 1, below.shape[2]))[:, 0]  # (B, D)
        path = torch.cat([path, path.new_full((B, N1), -1)], 1)[:, : N1 - 1]  # (B, N)
        out = torch.cat([tree.tokens.gather(1, path.clamp(min=0)), target.new_zeros(B, 1)], 1)
        out = out.scatter(1, n_acc[:, None], target.gather(1, end[:, None]))
        return out, path, n_acc, ok
    ok = torch.isfinite(logits.amax(-1)).all(-1)
    fn = partial(accept_tree, check_values=False) if model.use_triton else accept_tree_ref
    out, path, n_acc = fn(sampling.probs(logits), tree.tokens, tree.parents, u_accept, u_sample)
    return out, path, n_acc.clamp(min=0), ok & (n_acc >= 0)


def count_depths(st: State, tree: Tree, path: Tensor, n_acc: Tensor) -> State:
    """Per depth k: attempted when the path reached depth k at a node with children, accepted when it went on."""
    B, N1 = tree.tokens.shape
    dev = path.device
    has_child = (tree.parents[:, None, :] == torch.arange(N1, device=dev)[None, :, None]).any(-1)  # (B, N+1)
    on_path = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=dev), path.clamp(min=0)], 1)[:, : N1 - 1]
    k = torch.arange(N1 - 1, device=dev)
    active = ~st["finished"][:, None]
    attempted = (k <= n_acc[:, None]) & has_child.gather(1, on_path) & active
    accepted = (k < n_acc[:, None]) & active
    return dict(st, attempted=st["attempted"] + attempted.sum(0), accepted=st["accepted"] + accepted.sum(0))


# --- the step ------------------------------------------------------------------------------------------------------

def tree_step(model: Transformer, st: State, sampling: SamplingParams, cfg: TreeConfig, tpl: TreeTemplate,
              la: Optional[Tensor], adds: Optional[Tensor], store: Optional[Datastore] = None) -> State:
    N, M, L = cfg.nodes, (cfg.blocks if tpl.L else 0), tpl.L
    seq, seeds = st["seqlens"], st["seeds"]
    B, dev = seq.shape[0], seq.device
    chains = ngram_chains(st["tokens"], seq + 1, cfg.ngram_min, cfg.ngram_max, cfg.ngram_len, cfg.ngram_chains)
    if tpl.C > cfg.ngram_chains:  # and the datastore's continuations of the context's suffix
        chains = torch.cat([chains, store_chains(store, st["tokens"], seq + 1, tpl.C - cfg.ngram_chains,
                                                 cfg.ngram_len)], 1)
    tree = build_trees(tpl, N, M, st["pending"], chains, st["la_tok"], st["la_prob"], st["la_valid"])

    embeds = model.embed(tree.tokens)  # (B, N+1, dim)
    if M:
        embeds = torch.cat([embeds, la], dim=1)
    # Every row's logits are needed: the target after each node, and each block, since which one seeds the next
    # tree is known only after verification. One head call on all of them.
    logits = model(embeds=embeds, input_pos=seq[:, None] + tree.offsets, cache_seqlens=seq, mask=tree.mask,
                   layer_adds=adds)  # (B, T, V)
    node_ids = torch.arange(N + 1, device=dev)
    call_key = (seq + 1) * (N + 1)  # uniforms keyed by the call (seqlens + 1 is new every call) and the node
    out, path, n_acc, ok = verify_tree(model, sampling, logits[:, : N + 1], tree,
                                       uniforms(seeds, call_key[:, None] + node_ids, ACCEPT),
                                       uniforms(seeds, seq + 1, RESIDUAL))
    st = flag_non_finite(st, ok, seq + 1)
    st = count_depths(st, tree, path, n_acc)

    # The accepted nodes' K/V move from slot seqlens + node to seqlens + 1 + i; a path is at most the tree's depth
    # long, so only that many slots can move.
    moved = min(N, tpl.max_depth)
    dst = seq[:, None] + node_ids[1 : moved + 1]
    src = torch.where(path[:, :moved] >= 0, seq[:, None] + path[:, :moved], dst)
    model.move_cache_slots(src, dst)

    if M:  # look-ahead top-k for the next tree: the block after the node where the path ended, if it has one
        end = torch.where(n_acc > 0, path.gather(1, (n_acc - 1).clamp(min=0)[:, None])[:, 0], 0)
        is_end = tree.anchors == end[:, None]  # (B, M)
        has_block = is_end.any(1)
        rows = N + 1 + is_end.int().argmax(1)[:, None] * L + torch.arange(L, device=dev)  # (B, L)
        la_logits = logits.gather(1, rows[:, :, None].expand(-1, -1, logits.shape[-1]))
        # The top-k of the logits, and their probabilities from the log-sum-exp: no softmax of the whole vocabulary
        # is written out (1.2-1.6x faster than a top-k of the softmax on a CPU).
        top, top_tok = topk(la_logits, cfg.topk)
        la_prob = torch.exp(top.float() - torch.logsumexp(la_logits.float(), -1, keepdim=True))
        st = dict(st, la_tok=top_tok, la_prob=la_prob, la_valid=has_block & ~st["finished"])
    return commit(st, out, n_acc + 1, advance=n_acc + 1)[0]


def _with_inputs(step, model, st, **kw):
    return step(model, st, **kw)


@torch.no_grad()
def tree_decode(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                sampling: SamplingParams = SamplingParams(), seeds: Optional[Sequence[int]] = None,
                stop_ids: Sequence[int] = (), on_tokens: Optional[Callable] = None, *,
                lookahead: Optional[Tensor] = None, tree: TreeConfig = TreeConfig(), compile=False,
                check_every: Optional[int] = None, cache_len: Optional[int] = None,
                datastore: Optional[Datastore] = None) -> Output:
    """Token-tree decoding. lookahead None (or tree.blocks == 0) drafts from context n-grams only; a datastore
    (datastore.py) adds tree.store_chains chains of its continuations of the context's suffix."""
    L = 0 if lookahead is None or tree.blocks == 0 else num_lookahead(model, lookahead)
    M = tree.blocks if L else 0
    N = tree.nodes
    T = 1 + N + M * L
    dev = model.embed_tokens.weight.device
    S = store_slots(tree, datastore)
    tpl = TreeTemplate(tree, L, dev, S)
    t0 = clock(model)
    st = start(model, prompts, max_new_tokens, seeds, stop_ids, width=T, draft_positions=N, cache_len=cache_len,
               compile=compile)
    B = len(prompts)
    k = max(tree.topk, 1)
    st["la_tok"] = torch.zeros(B, max(L, 1), k, dtype=torch.long, device=dev)
    st["la_prob"] = torch.zeros(B, max(L, 1), k, device=dev)
    st["la_valid"] = torch.zeros(B, dtype=torch.bool, device=dev)
    la, adds = lookahead_inputs(lookahead, M, N + 1, B) if M else (None, None)  # (B, M * L, dim), additions
    key = ("tree", sampling, tree, L, B, id(datastore) if S else None) + ((id(lookahead), lookahead.dtype) if M else ())
    step = step_for(partial(_with_inputs, tree_step, sampling=sampling, cfg=tree, tpl=tpl, la=la, adds=adds,
                            store=datastore.to(dev) if S else None), key, model, compile)
    return run(model, step, st, on_tokens, check_every, t0)


NGRAM = TreeConfig(nodes=8, blocks=0, ngram_len=8, ngram_chains=1)


@torch.no_grad()
def ngram_decode(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), seeds: Optional[Sequence[int]] = None,
                 stop_ids: Sequence[int] = (), on_tokens: Optional[Callable] = None, *,
                 tree: TreeConfig = NGRAM, compile=False, check_every: Optional[int] = None,
                 cache_len: Optional[int] = None) -> Output:
    """Prompt lookup: one chain copied from what followed the context's latest suffix match, verified exactly."""
    return tree_decode(model, prompts, max_new_tokens, sampling, seeds, stop_ids, on_tokens, lookahead=None,
                       tree=tree, compile=compile, check_every=check_every, cache_len=cache_len)
