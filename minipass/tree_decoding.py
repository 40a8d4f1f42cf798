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

Trees are built on the host, from data fetched in the step's one host sync (the emitted tokens, which also extend the
context the n-gram index searches, and the look-ahead top-k). The sizes are static: N nodes (unused ones are padding
that nobody attends to) and M blocks of L look-ahead tokens.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import partial
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from kernels.tree_acceptance import accept_tree, accept_tree_ref
from minipass.decoding import DecodeState, Output, SamplingParams
from minipass.errors import MinipassError
from minipass.lookahead import lookahead_inputs, num_lookahead
from minipass.model import Transformer
from minipass.sampling import ACCEPT, RESIDUAL, uniforms


@dataclass
class TreeConfig:
    nodes: int = 16  # N: candidate nodes per call (the root excluded)
    topk: int = 3  # look-ahead candidates per depth
    blocks: int = 2  # M: look-ahead blocks per call (0 = no look-ahead drafting)
    ngram_max: int = 3  # longest context suffix matched for n-gram drafts
    ngram_min: int = 1  # shortest
    ngram_len: int = 8  # tokens copied after a match
    ngram_chains: int = 2  # distinct continuations taken (most recent matches of the longest suffix first)
    ngram_prior: float = 0.6  # per-token score of an n-gram candidate (look-ahead ones score their probability)

    def __post_init__(self):
        if self.nodes < 1:
            raise MinipassError(f"a tree needs at least 1 candidate node, got nodes={self.nodes}")
        if self.topk < 0 or self.blocks < 0 or self.ngram_chains < 0:
            raise MinipassError("tree options topk, blocks and ngram_chains must be >= 0")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise MinipassError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")


class NgramIndex:
    """One row's context and, for n = ngram_min..ngram_max, where each n-gram ends in it (most recent last)."""

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


def build_tree(root: int, chains: list, la_tokens: Optional[list], la_probs: Optional[list], cfg: TreeConfig):
    """A trie of at most cfg.nodes candidates under `root`: the n-gram chains first, then look-ahead paths best-first
    by the product of their probabilities (la_tokens[d][r]: the r-th likeliest token d+1 places after the root).

    Returns (tokens, parents, depths, scores), node 0 being the root.
    """
    tokens, parents, depths, scores = [root], [-1], [0], [1.0]
    index = {}

    def add(parent: int, tok: int, score: float) -> Optional[int]:
        node = index.get((parent, tok))
        if node is not None:
            scores[node] = max(scores[node], score)
            return node
        if len(tokens) > cfg.nodes:
            return None
        index[(parent, tok)] = len(tokens)
        tokens.append(tok), parents.append(parent), depths.append(depths[parent] + 1), scores.append(score)
        return len(tokens) - 1

    for chain in chains:
        node, score = 0, 1.0
        for tok in chain:
            score *= cfg.ngram_prior
            node = add(node, tok, score)
            if node is None:
                break
    if la_tokens and cfg.topk:
        heap = [(-la_probs[0][r], 0, 0, r) for r in range(cfg.topk)]
        while heap:
            neg, parent, d, r = heapq.heappop(heap)
            node = add(parent, la_tokens[d][r], -neg)
            if node is None:
                break
            if d + 1 < len(la_tokens):
                for r2 in range(cfg.topk):
                    heapq.heappush(heap, (neg * la_probs[d + 1][r2], node, d + 1, r2))
    return tokens, parents, depths, scores


class TreeBatch:
    """The static-shape tensors of one call for a batch of trees (see the module docstring for the layout)."""

    def __init__(self, trees: list, N: int, M: int, L: int, device):
        B, T = len(trees), 1 + N + M * L
        tokens = np.zeros((B, T), dtype=np.int64)
        parents = np.full((B, N + 1), -1, dtype=np.int64)
        offsets = np.zeros((B, T), dtype=np.int64)
        mask = np.zeros((B, T, T), dtype=bool)
        block_at = np.full((B, N + 1), -1, dtype=np.int64)  # call index of the block after node i, or -1
        idx = np.arange(T)
        mask[:, idx, idx] = True  # padding nodes see only themselves
        self.has_child = []
        for b, (tok, par, dep, score) in enumerate(trees):
            n = len(tok)
            tokens[b, :n], parents[b, :n], offsets[b, :n] = tok, par, dep
            for i in range(1, n):  # parents come first, so a parent's row already holds its ancestors
                mask[b, i, :n] |= mask[b, par[i], :n]
            self.has_child.append(np.isin(np.arange(n), par[1:]))
            # Blocks after the M likeliest nodes (the root first: its score is 1).
            for m, a in enumerate(sorted(range(n), key=lambda i: -score[i])[:M]):
                start = 1 + N + m * L
                block_at[b, a] = start
                rows = slice(start, start + L)
                mask[b, rows, :n] = mask[b, a, :n]
                mask[b, rows, rows] = np.tril(np.ones((L, L), dtype=bool))
                offsets[b, rows] = dep[a] + 1 + np.arange(L)
        self.T = T
        to = lambda x: torch.from_numpy(x).to(device)  # noqa: E731
        self.tokens, self.parents, self.offsets = to(tokens), to(parents), to(offsets)
        self.mask, self.block_at = to(mask), to(block_at)


@torch.no_grad()
def tree_decode(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                sampling: SamplingParams = SamplingParams(), seeds: Optional[Sequence[int]] = None,
                stop_ids: Sequence[int] = (), on_tokens: Optional[Callable] = None, *,
                lookahead: Optional[Tensor] = None, tree: TreeConfig = TreeConfig()) -> Output:
    """Token-tree decoding. lookahead None (or tree.blocks == 0) drafts from context n-grams only."""
    L = 0 if lookahead is None or tree.blocks == 0 else num_lookahead(model, lookahead)
    M = tree.blocks if L else 0
    N = tree.nodes
    T = 1 + N + M * L
    st = DecodeState(model, prompts, max_new_tokens, sampling, seeds, stop_ids, slots_per_step=T,
                     on_tokens=on_tokens)
    attempted, accepted = [0] * N, [0] * N  # per depth, counted on the host where the trees live
    B, dev = st.B, st.device
    contexts = [NgramIndex(p, tree.ngram_min, tree.ngram_max) for p in prompts]
    la_embeds, adds = lookahead_inputs(lookahead, M, N + 1, B) if M else (None, None)  # (B, M * L, dim), additions
    la_top = [None] * B  # per row: (tokens (L, k), probs (L, k)) from the last call's block, if it had one
    node_ids = torch.arange(N + 1, device=dev)
    verify = partial(accept_tree, check_values=False) if model.use_triton else accept_tree_ref
    pending = [p[-1] for p in prompts]
    while True:
        trees = []
        for b in range(B):
            chains = contexts[b].continuations(tree.ngram_len, tree.ngram_chains) if tree.ngram_chains else []
            tops = la_top[b]
            trees.append(build_tree(pending[b], chains, tops and tops[0], tops and tops[1], tree))
        batch = TreeBatch(trees, N, M, L, dev)

        embeds = model.embed(batch.tokens)  # (B, T, dim)
        if M:
            embeds = torch.cat([embeds[:, : N + 1], la_embeds], dim=1)
        hidden = model(embeds=embeds, input_pos=st.seqlens[:, None] + batch.offsets, cache_seqlens=st.seqlens,
                       mask=batch.mask, kv_len=st.host_max_len + T, return_hidden=True, layer_adds=adds)
        p = sampling.probs(model.head(hidden[:, : N + 1]))  # (B, N+1, V): the target after every node
        # Uniforms keyed by the call (seqlens + 1 is new every call) and the node.
        call_key = (st.seqlens + 1) * (N + 1)
        out, path, n_acc = verify(p, batch.tokens[:, : N + 1], batch.parents,
                                  uniforms(st.seeds, call_key[:, None] + node_ids, ACCEPT),
                                  uniforms(st.seeds, st.seqlens + 1, RESIDUAL))

        # The accepted nodes' K/V move from slot seqlens + node to seqlens + 1 + i.
        i = node_ids[1:]
        dst = st.seqlens[:, None] + i
        src = torch.where(path >= 0, st.seqlens[:, None] + path, dst)
        model.move_cache_slots(src, dst)

        # Look-ahead distributions for the next tree: the block after the node where the path ended.
        if M:
            end = torch.where(n_acc > 0, path.gather(1, (n_acc - 1).clamp(min=0)[:, None])[:, 0], 0)
            start = batch.block_at.gather(1, end[:, None])[:, 0]
            rows = (start.clamp(min=0)[:, None] + torch.arange(L, device=dev))[:, :, None]
            la_logits = model.head(hidden.gather(1, rows.expand(-1, -1, hidden.shape[-1])))  # (B, L, V)
            top = torch.softmax(la_logits.float(), -1).topk(tree.topk, dim=-1)
        keep = st.commit(out, n_acc + 1, advance=n_acc + 1)

        # The step's host sync: what was emitted (for the contexts and the next roots), the look-ahead top-k.
        keep_h, out_h, n_acc_h, path_h = keep.tolist(), out.tolist(), n_acc.tolist(), path.tolist()
        if M:
            has_block, top_tok, top_p = (start >= 0).tolist(), top.indices.tolist(), top.values.tolist()
        for b in range(B):
            if keep_h[b] == 0:
                continue
            count_depths(attempted, accepted, batch.has_child[b], path_h[b], n_acc_h[b])
            contexts[b].extend(out_h[b][: keep_h[b]])
            pending[b] = out_h[b][keep_h[b] - 1]
            la_top[b] = (top_tok[b], top_p[b]) if M and has_block[b] else None
        if st.done():
            break
    result = st.result()
    result.stats.attempted, result.stats.accepted = attempted, accepted
    return result


NGRAM = TreeConfig(nodes=8, blocks=0, ngram_len=8, ngram_chains=1)


@torch.no_grad()
def ngram_decode(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), seeds: Optional[Sequence[int]] = None,
                 stop_ids: Sequence[int] = (), on_tokens: Optional[Callable] = None, *,
                 tree: TreeConfig = NGRAM) -> Output:
    """Prompt lookup: one chain copied from what followed the context's latest suffix match, verified exactly."""
    return tree_decode(model, prompts, max_new_tokens, sampling, seeds, stop_ids, on_tokens, lookahead=None,
                       tree=tree)


def count_depths(attempted: list, accepted: list, has_child, path: list, n_acc: int) -> None:
    """Per depth k: attempted when the path reached depth k at a node with children, accepted when it went on."""
    node = 0
    for k in range(len(attempted)):
        if not has_child[node]:
            return
        attempted[k] += 1
        if k >= n_acc:
            return
        accepted[k] += 1
        node = path[k]
