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
number is keyed by (row seed, token position, purpose): see sampling.py.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from kernels.acceptance import accept, accept_ref
from minipass.decoding import DecodeState, Output, SamplingParams
from minipass.lookahead import lookahead_inputs, num_lookahead
from minipass.model import Transformer
from minipass.sampling import ACCEPT, DRAFT, RESIDUAL, SAMPLE, sample, uniforms


def verify(model: Transformer, p: Tensor, drafts: Tensor, n_drafts: Tensor, u_accept: Tensor, u_sample: Tensor,
           q: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Accept/resample with the Triton kernel on CUDA, its torch reference elsewhere: (tokens (B, K+1), n_acc (B,))."""
    fn = accept if model.use_triton else accept_ref
    return fn(p, drafts, n_drafts, u_accept, u_sample, q=q)


def draft_from(sampling: SamplingParams, logits: Tensor, seeds: Tensor, positions: Tensor):
    """Drafts (B, L) from look-ahead logits (B, L, V), and their distributions q (None when drafts are greedy)."""
    if sampling.temperature == 0:
        return logits.argmax(-1), None  # a deterministic draft: q is one-hot on it
    q = sampling.probs(logits)
    return sample(q, uniforms(seeds, positions, DRAFT)), q


@torch.no_grad()
def pass_decode(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                sampling: SamplingParams = SamplingParams(), seeds: Optional[Sequence[int]] = None,
                stop_ids: Sequence[int] = (), on_tokens: Optional[Callable] = None, *,
                lookahead: Tensor) -> Output:
    """The paper's two-call loop with L look-ahead tokens: lookahead is (L, dim), or (n_layers, L, dim) with
    per-layer additions (lookahead.py)."""
    L = num_lookahead(model, lookahead)
    st = DecodeState(model, prompts, max_new_tokens, sampling, seeds, stop_ids, slots_per_step=L + 1,
                     on_tokens=on_tokens, draft_positions=L)
    B, ar = st.B, torch.arange(L + 1, device=st.device)
    la, adds = lookahead_inputs(lookahead, 1, 1, B)  # (B, L, dim), per-layer additions or None
    full = torch.full((B,), L, device=st.device)
    while True:
        # 1. Drafting: x_t and the look-ahead tokens, causal. x_t's K/V stay in the cache.
        embeds = torch.cat([model.embed(st.pending[:, None]), la], dim=1)  # (B, L+1, dim)
        logits = model(embeds=embeds, input_pos=st.seqlens[:, None] + ar, cache_seqlens=st.seqlens,
                       kv_len=st.host_max_len + L + 1, layer_adds=adds)
        y = sample(sampling.probs(logits[:, 0]), uniforms(st.seeds, st.seqlens + 1, SAMPLE))
        # d_k will sit at position seqlens + 1 + k (y takes seqlens + 1).
        drafts, q = draft_from(sampling, logits[:, 1:], st.seeds, st.seqlens[:, None] + 1 + ar[1:])
        one = torch.ones_like(y)
        st.commit(y[:, None], one, advance=one)
        if st.done():
            break

        # 2. Validation: y and the drafts, causal. y at position seqlens, d_k at seqlens + k.
        tokens = torch.cat([st.pending[:, None], drafts], dim=1)  # (B, L+1)
        logits = model(tokens, input_pos=st.seqlens[:, None] + ar, cache_seqlens=st.seqlens,
                       kv_len=st.host_max_len + L + 1)
        p = sampling.probs(logits)  # (B, L+1, V)
        out, n_acc = verify(model, p, drafts, full, uniforms(st.seeds, st.seqlens[:, None] + ar[1:], ACCEPT),
                            uniforms(st.seeds, st.seqlens + 1, RESIDUAL), q)
        st.record_acceptance(full, n_acc)
        # y and the accepted drafts now have valid K/V; the emitted token becomes the pending one.
        st.commit(out, n_acc + 1, advance=n_acc + 1)
        if st.done():
            break
    return st.result()


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
            start = L + 1 + b * L
            for k in range(1, L + 1):
                row = start + k - 1
                mask[row, : i + 1] = True
                mask[row, start: row + 1] = True
                offsets.append(i + k)
        self.T = T
        self.mask = mask.to(device)
        self.offsets = torch.tensor(offsets, device=device)
        self.is_lookahead = torch.arange(T, device=device) >= L + 1
        # block_start[j]: index of the first token of the block after acceptance point j, or -1 without one.
        start = torch.full((L + 1,), -1, dtype=torch.long)
        for b, i in enumerate(self.points):
            start[i] = L + 1 + b * L
        self.block_start = start.to(device)


@torch.no_grad()
def pass1_decode(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams = SamplingParams(), seeds: Optional[Sequence[int]] = None,
                 stop_ids: Sequence[int] = (), on_tokens: Optional[Callable] = None, *,
                 lookahead: Tensor, blocks: Optional[int] = 2) -> Output:
    """One forward call per iteration: verify the previous drafts and draft the next ones together.

    blocks: look-ahead blocks after acceptance points 0..blocks-1 (None: all L+1). With fewer, an iteration that
    accepts more drafts than that has no drafts for the next call, which then emits one token. The default, 2, is
    what measured fastest on a 2-core CPU: the call shrinks from 1 + L + (L+1)L tokens to 1 + 3L, and with the
    shipped embeddings accepting 2+ drafts is rare (README, "Results").
    """
    L = num_lookahead(model, lookahead)
    n_points = L + 1 if blocks is None else max(1, min(blocks, L + 1))
    layout = Pass1Layout(L, range(n_points), model.embed_tokens.weight.device)
    st = DecodeState(model, prompts, max_new_tokens, sampling, seeds, stop_ids, slots_per_step=layout.T,
                     on_tokens=on_tokens, draft_positions=L)
    B, dev = st.B, st.device
    la_embeds, adds = lookahead_inputs(lookahead, n_points, L + 1, B)  # (B, n_points * L, dim), additions
    ar = torch.arange(L + 1, device=dev)
    drafts = torch.zeros(B, L, dtype=torch.long, device=dev)
    n_drafts = torch.zeros(B, dtype=torch.long, device=dev)  # the first call has no drafts to verify
    q = None if sampling.temperature == 0 else torch.zeros(B, L, model.args.vocab_size, device=dev)
    while True:
        embeds = torch.cat([model.embed(torch.cat([st.pending[:, None], drafts], 1)), la_embeds], 1)
        hidden = model(embeds=embeds, input_pos=st.seqlens[:, None] + layout.offsets, cache_seqlens=st.seqlens,
                       mask=layout.mask, kv_len=st.host_max_len + layout.T, return_hidden=True,
                       layer_adds=adds)  # (B, T, dim)
        p = sampling.probs(model.head(hidden[:, : L + 1]))  # (B, L+1, V): targets at c_0..c_L
        out, n_acc = verify(model, p, drafts, n_drafts, uniforms(st.seeds, st.seqlens[:, None] + ar[1:], ACCEPT),
                            uniforms(st.seeds, st.seqlens + 1, RESIDUAL), q)
        st.record_acceptance(n_drafts, n_acc)

        # Next drafts: the block after the last accepted token, if the layout has one.
        start = layout.block_start[n_acc]  # (B,)
        rows = (start.clamp(min=0)[:, None] + ar[None, :L])[:, :, None].expand(-1, -1, hidden.shape[-1])
        new_seqlens = st.seqlens + n_acc + 1  # where the emitted token will sit
        drafts, q_next = draft_from(sampling, model.head(hidden.gather(1, rows)), st.seeds,
                                    new_seqlens[:, None] + ar[1:])
        if q is not None:
            q = q_next
        n_drafts = torch.where(start >= 0, L, 0)
        st.commit(out, n_acc + 1, advance=n_acc + 1)
        if st.done():
            break
    return st.result()
