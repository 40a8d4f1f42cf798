"""PaSS decoding: drafts from look-ahead embeddings, verified with the speculative-sampling rule.

`pass_decode` is the paper's loop, two forward calls per iteration:
  1. drafting   [x_t, LA_1..LA_L]  ->  y ~ p(.|x_<=t) exactly, and drafts d_k ~ q_k from the look-ahead outputs;
  2. validation [y, d_1..d_L]      ->  targets P_0..P_L; accept d_k with prob min(1, P_{k-1}(d_k) / q_k(d_k)), at the
     first rejection emit a token from normalize(max(0, P_{k-1} - q_k)), else a bonus token from P_L.
`pass1_decode` (ours) does both in one call: [x_t, d_1..d_L, B_0, .., B_L], where the look-ahead block B_i sits after
the acceptance point c_i (= d_i) under the mask, so whichever j drafts are accepted, block B_j has already drafted the
tokens after the emitted one. See PASS.md for the layout.

Output is distributed exactly as autoregressive sampling (token-identical when greedy), whatever the drafts. The
same sampling transform (temperature, top-k, top-p) gives the targets p and the draft distributions q. Every random
number is keyed by (row seed, token position, purpose): see sampling.py. Each iteration is one step function of the
state (decoding.py), compilable whole.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from minipass.kernels.acceptance import accept, accept_ref
from minipass.decoding import (Output, SamplingParams, State, choose, clock, commit, flag_non_finite,
                               record_acceptance, run, start, step_for)
from minipass.lookahead import lookahead_inputs, num_lookahead
from minipass.model import Transformer
from minipass.sampling import ACCEPT, DRAFT, RESIDUAL, SAMPLE, argmax, sample, uniforms


def verify(model: Transformer, p: Tensor, drafts: Tensor, n_drafts: Tensor, u_accept: Tensor, u_sample: Tensor,
           q: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Accept/resample with the Triton kernel on CUDA, its torch reference elsewhere: (tokens (B, K+1), n_acc (B,))."""
    if model.use_triton:
        return accept(p, drafts, n_drafts, u_accept, u_sample, q=q, check_values=False)
    return accept_ref(p, drafts, n_drafts, u_accept, u_sample, q=q)


def verify_chain(model: Transformer, sampling: SamplingParams, logits: Tensor, drafts: Tensor, n_drafts: Tensor,
                 u_accept: Tensor, u_sample: Tensor, q: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Verify drafts (B, K) against the target logits (B, K+1, V): (tokens (B, K+1), n_acc (B,), logits finite (B,)).

    Greedy needs no distributions: a draft is accepted iff it equals the argmax, and the emitted token is the argmax
    after the last accepted draft, so the tokens are the targets' argmaxes themselves."""
    K = drafts.shape[1]
    if sampling.greedy:
        top, target = argmax(logits)  # (B, K+1)
        ok = torch.isfinite(top).all(-1)
        hit = (drafts == target[:, :K]) & (torch.arange(K, device=drafts.device) < n_drafts[:, None])
        return target, hit.long().cumprod(1).sum(1), ok
    ok = torch.isfinite(logits.amax(-1)).all(-1)
    tokens, n_acc = verify(model, sampling.probs(logits), drafts, n_drafts, u_accept, u_sample, q)
    return tokens, n_acc.clamp(min=0), ok & (n_acc >= 0)  # n_acc = -1: the kernel found the row invalid


def draft_from(sampling: SamplingParams, logits: Tensor, seeds: Tensor, positions: Tensor):
    """Drafts (B, L) from look-ahead logits (B, L, V), and their distributions q (None when drafts are greedy)."""
    if sampling.greedy:
        return argmax(logits)[1], None  # a deterministic draft: q is one-hot on it
    q = sampling.probs(logits)
    return sample(q, uniforms(seeds, positions, DRAFT)).clamp(max=logits.shape[-1] - 1), q


# --- pass: the paper's two calls per iteration ----------------------------------------------------------------------

def pass_step(model: Transformer, st: State, sampling: SamplingParams, la: Tensor, adds: Optional[Tensor]) -> State:
    L = la.shape[1]
    seeds = st["seeds"]
    ar = torch.arange(L + 1, device=seeds.device)
    full = torch.full_like(st["seqlens"], L)
    # 1. Drafting: x_t and the look-ahead tokens, causal. x_t's K/V stay in the cache.
    seq = st["seqlens"]
    embeds = torch.cat([model.embed(st["pending"][:, None]), la], dim=1)  # (B, L+1, dim)
    logits = model(embeds=embeds, input_pos=seq[:, None] + ar, cache_seqlens=seq, layer_adds=adds)
    y, ok = choose(sampling, logits[:, 0], uniforms(seeds, seq + 1, SAMPLE))
    st = flag_non_finite(st, ok, seq + 1)
    # d_k will sit at position seqlens + 1 + k (y takes seqlens + 1).
    drafts, q = draft_from(sampling, logits[:, 1:], seeds, seq[:, None] + 1 + ar[1:])
    one = torch.ones_like(y)
    st, _ = commit(st, y[:, None], one, advance=one)

    # 2. Validation: y and the drafts, causal. y at position seqlens, d_k at seqlens + k.
    seq = st["seqlens"]
    tokens = torch.cat([st["pending"][:, None], drafts], dim=1)  # (B, L+1)
    logits = model(tokens, input_pos=seq[:, None] + ar, cache_seqlens=seq)
    out, n_acc, ok = verify_chain(model, sampling, logits, drafts, full, uniforms(seeds, seq[:, None] + ar[1:], ACCEPT),
                                  uniforms(seeds, seq + 1, RESIDUAL), q)
    st = flag_non_finite(st, ok, seq + 1)
    st = record_acceptance(st, full, n_acc)
    # y and the accepted drafts now have valid K/V; the emitted token becomes the pending one.
    return commit(st, out, n_acc + 1, advance=n_acc + 1)[0]


@torch.no_grad()
def pass_decode(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                sampling: SamplingParams = SamplingParams(), seeds: Optional[Sequence[int]] = None,
                stop_ids: Sequence[int] = (), on_tokens: Optional[Callable] = None, *,
                lookahead: Tensor, compile=False, check_every: Optional[int] = None,
                cache_len: Optional[int] = None) -> Output:
    """The paper's two-call loop with L look-ahead tokens: lookahead is (L, dim), or (n_layers, L, dim) with
    per-layer additions (lookahead.py)."""
    L = num_lookahead(model, lookahead)
    t0 = clock(model)
    st = start(model, prompts, max_new_tokens, seeds, stop_ids, width=L + 1, draft_positions=L, cache_len=cache_len,
               compile=compile)
    la, adds = lookahead_inputs(lookahead, 1, 1, len(prompts))  # (B, L, dim), per-layer additions or None
    step = step_for(partial(_with_inputs, pass_step, sampling=sampling, la=la, adds=adds),
                    ("pass", sampling, L, _tensor_key(lookahead), len(prompts)), model, compile)
    return run(model, step, st, on_tokens, check_every, t0)


def _with_inputs(step, model, st, **kw):
    return step(model, st, **kw)


def _tensor_key(t: Tensor) -> tuple:
    # Compiled steps bake their look-ahead tensors in: a different tensor must be a different compiled step.
    return (id(t), t.shape, t.dtype)


# --- pass1: one call per iteration ----------------------------------------------------------------------------------

class Pass1Layout:
    """The new tokens of one pass1 call, with their position offsets and mask (static for a given L).

    Index 0..L: c_0 = x_t, c_i = d_i (offset i; causal among themselves).
    Then one block of L look-ahead tokens after each acceptance point i in `points`: its k-th token (k = 1..L) has
    offset i + k and sees c_0..c_i and the block's tokens 1..k.
    """

    def __init__(self, L: int, points: Sequence[int], device):
        self.L, self.points = L, list(points)
        T = L + 1 + len(self.points) * L
        mask = torch.zeros(T, T, dtype=torch.bool)
        offsets = list(range(L + 1))
        mask[: L + 1, : L + 1] = torch.tril(torch.ones(L + 1, L + 1, dtype=torch.bool))
        for b, i in enumerate(self.points):
            start_ = L + 1 + b * L
            for k in range(1, L + 1):
                row = start_ + k - 1
                mask[row, : i + 1] = True
                mask[row, start_: row + 1] = True
                offsets.append(i + k)
        self.T = T
        self.mask = mask.to(device)
        self.offsets = torch.tensor(offsets, device=device)
        # block_start[j]: index of the first token of the block after acceptance point j, or -1 without one.
        start = torch.full((L + 1,), -1, dtype=torch.long)
        for b, i in enumerate(self.points):
            start[i] = L + 1 + b * L
        self.block_start = start.to(device)


def pass1_step(model: Transformer, st: State, sampling: SamplingParams, layout: Pass1Layout, la: Tensor,
               adds: Optional[Tensor]) -> State:
    L = layout.L
    seeds, seq = st["seeds"], st["seqlens"]
    ar = torch.arange(L + 1, device=seq.device)
    drafts, n_drafts = st["drafts"], st["n_drafts"]
    embeds = torch.cat([model.embed(torch.cat([st["pending"][:, None], drafts], 1)), la], 1)
    # Every row's logits are needed: the targets at c_0..c_L, and each block, since which block drafts the next
    # call is known only after verification. One head call on all of them.
    logits = model(embeds=embeds, input_pos=seq[:, None] + layout.offsets, cache_seqlens=seq, mask=layout.mask,
                   layer_adds=adds)  # (B, T, V)
    out, n_acc, ok = verify_chain(model, sampling, logits[:, : L + 1], drafts, n_drafts,
                                  uniforms(seeds, seq[:, None] + ar[1:], ACCEPT), uniforms(seeds, seq + 1, RESIDUAL),
                                  st.get("q"))
    st = flag_non_finite(st, ok, seq + 1)
    st = record_acceptance(st, n_drafts, n_acc)

    # Next drafts: the block after the last accepted token, if the layout has one.
    start_ = layout.block_start[n_acc]  # (B,)
    rows = (start_.clamp(min=0)[:, None] + ar[None, :L])[:, :, None].expand(-1, -1, logits.shape[-1])
    new_seqlens = seq + n_acc + 1  # where the emitted token will sit
    drafts, q = draft_from(sampling, logits.gather(1, rows), seeds, new_seqlens[:, None] + ar[1:])
    st, _ = commit(st, out, n_acc + 1, advance=n_acc + 1)
    st = dict(st, drafts=drafts, n_drafts=torch.where(start_ >= 0, L, 0))
    if q is not None:
        st["q"] = q
    return st


@torch.no_grad()
def pass1_decode(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), seeds: Optional[Sequence[int]] = None,
                 stop_ids: Sequence[int] = (), on_tokens: Optional[Callable] = None, *,
                 lookahead: Tensor, blocks: Optional[int] = 2, compile=False,
                 check_every: Optional[int] = None, cache_len: Optional[int] = None) -> Output:
    """One forward call per iteration: verify the previous drafts and draft the next ones together.

    blocks: look-ahead blocks after acceptance points 0..blocks-1 (None: all L+1). With fewer, an iteration that
    accepts more drafts than that has no drafts for the next call, which then emits one token. Two blocks keep most
    of the acceptance (2+ accepted drafts are rare with the shipped embeddings) at a much narrower call than L + 1.
    """
    L = num_lookahead(model, lookahead)
    n_points = L + 1 if blocks is None else max(1, min(blocks, L + 1))
    layout = Pass1Layout(L, range(n_points), model.embed_tokens.weight.device)
    t0 = clock(model)
    st = start(model, prompts, max_new_tokens, seeds, stop_ids, width=layout.T, draft_positions=L,
               cache_len=cache_len, compile=compile)
    B, dev = len(prompts), st["seqlens"].device
    la, adds = lookahead_inputs(lookahead, n_points, L + 1, B)  # (B, n_points * L, dim), additions
    st["drafts"] = torch.zeros(B, L, dtype=torch.long, device=dev)
    st["n_drafts"] = torch.zeros(B, dtype=torch.long, device=dev)  # the first call has no drafts to verify
    if not sampling.greedy:
        st["q"] = torch.zeros(B, L, model.args.vocab_size, device=dev)
    step = step_for(partial(_with_inputs, pass1_step, sampling=sampling, layout=layout, la=la, adds=adds),
                    ("pass1", sampling, L, n_points, _tensor_key(lookahead), B), model, compile)
    return run(model, step, st, on_tokens, check_every, t0)
