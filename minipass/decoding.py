"""Batched decoding state shared by every decoder, and plain autoregressive decoding.

Every decoder keeps, per row b: `seqlens[b]`, the number of tokens whose K/V are in the cache (the committed
sequence minus its last token), and `pending[b]`, that last committed token, which the next forward call feeds in
first at position `seqlens[b]`. A prompt of n tokens is prefilled with its first n-1 tokens and leaves its last as
the pending token, so the autoregressive loop and the speculative loops all start from the same state.

Rows are independent: prompts of different lengths (right-padded into one tensor), their own random streams and
their own stop. A finished row keeps its slot and keeps computing until the whole batch is done; what it produces
after its stop is discarded. The loop synchronises with the host once per step, to decide whether to stop.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from minipass.errors import MinipassError
from minipass.model import Transformer
from minipass.sampling import SAMPLE, check_sampling_args, logits_to_probs, sample, uniforms


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_k, self.top_p)

    def probs(self, logits: Tensor) -> Tensor:
        return logits_to_probs(logits, self.temperature, self.top_k, self.top_p)


@dataclass
class DecodeStats:
    calls: int = 0  # decoding forward calls (the prompt's prefill is not counted)
    row_calls: int = 0  # sum over rows of the calls made while the row was unfinished
    tokens: int = 0  # tokens emitted, all rows
    accepted: list = field(default_factory=list)  # per draft position: drafts accepted
    attempted: list = field(default_factory=list)  # per draft position: drafts verified
    wall_s: float = 0.0

    @property
    def tokens_per_call(self) -> float:
        return self.tokens / max(self.row_calls, 1)

    @property
    def acceptance(self) -> list:
        return [a / t if t else 0.0 for a, t in zip(self.accepted, self.attempted)]

    @property
    def mean_accepted(self) -> float:
        """E[j]: mean accepted drafts per verification (the verifications are the first-position attempts)."""
        return sum(self.accepted) / self.attempted[0] if self.attempted and self.attempted[0] else 0.0


@dataclass
class Output:
    tokens: list  # per row, the generated ids (a stop token that ended the row included)
    stats: DecodeStats


class DecodeState:
    """Per-row decoding state on the model's device; see the module docstring."""

    def __init__(self, model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: SamplingParams, seeds: Optional[Sequence[int]], stop_ids: Sequence[int],
                 slots_per_step: int, on_tokens: Optional[Callable] = None, draft_positions: int = 0):
        if not prompts:
            raise MinipassError("no prompts given")
        if any(len(p) == 0 for p in prompts):
            raise MinipassError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise MinipassError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        context = model.args.max_seq_len
        longest = max(len(p) for p in prompts)
        # Room for every emitted token plus the widest forward call that may follow the last commit.
        capacity = longest + max_new_tokens + slots_per_step
        if capacity > context:
            raise MinipassError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} (and "
                                f"{slots_per_step} working slots) exceeds the model's context of {context} tokens")
        vocab = model.args.vocab_size
        for p in prompts:
            if min(p) < 0 or max(p) >= vocab:
                raise MinipassError(f"prompt token id out of range [0, {vocab}): {min(p)}..{max(p)}")
        seeds = list(range(len(prompts))) if seeds is None else list(seeds)
        if len(seeds) != len(prompts):
            raise MinipassError(f"got {len(seeds)} seeds for {len(prompts)} prompts")

        device = model.embed_tokens.weight.device
        self.model, self.device, self.sampling = model, device, sampling
        self.B, self.max_new_tokens, self.on_tokens = len(prompts), max_new_tokens, on_tokens
        self.seeds = torch.tensor(seeds, dtype=torch.long, device=device)
        self.stop_ids = torch.tensor(sorted(set(stop_ids)) or [-1], dtype=torch.long, device=device)
        model.setup_caches(self.B, capacity)

        lens = torch.tensor([len(p) for p in prompts], device=device)
        self.seqlens = lens - 1
        self.pending = torch.tensor([p[-1] for p in prompts], device=device)
        self.host_max_len = longest - 1  # max(seqlens), refreshed by the one sync per step
        self.out = torch.zeros(self.B, max_new_tokens + slots_per_step, dtype=torch.long, device=device)
        self.n_out = torch.zeros(self.B, dtype=torch.long, device=device)
        self.finished = torch.zeros(self.B, dtype=torch.bool, device=device)
        self.row_calls = torch.zeros(self.B, dtype=torch.long, device=device)
        self.attempted = torch.zeros(draft_positions, dtype=torch.long, device=device)
        self.accepted = torch.zeros(draft_positions, dtype=torch.long, device=device)
        self.stats = DecodeStats()
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # time this call's work only
        self._t0 = time.perf_counter()

        if longest > 1:  # prefill every prompt but its last token, right-padded
            tokens = torch.zeros(self.B, longest - 1, dtype=torch.long, device=device)
            for b, p in enumerate(prompts):
                tokens[b, : len(p) - 1] = torch.tensor(p[:-1])
            positions = torch.arange(longest - 1, device=device).expand(self.B, -1)
            zeros = torch.zeros(self.B, dtype=torch.long, device=device)
            model(tokens, input_pos=positions, cache_seqlens=zeros, kv_len=longest - 1,
                  logits_index=torch.zeros(self.B, 1, dtype=torch.long, device=device))

    def commit(self, tokens: Tensor, n_emit: Tensor, advance: Tensor) -> Tensor:
        """Append `n_emit[b]` tokens of `tokens[b]` (B, W) to each unfinished row; returns the count kept per row.

        A row's output stops at its first stop token or at max_new_tokens; tokens past that are dropped. The last
        kept token becomes the row's pending token, and the row's cache length grows by `advance[b]` (the new
        tokens whose K/V the call left in consecutive slots). Finished rows keep nothing and stay where they are.
        """
        W = tokens.shape[1]
        idx = torch.arange(W, device=self.device)
        is_stop = torch.isin(tokens, self.stop_ids) & (idx < n_emit[:, None])
        # Keep up to and including the first stop token, and no more than the row's remaining budget.
        first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, W + 1)
        keep = torch.minimum(torch.minimum(n_emit, first_stop), self.max_new_tokens - self.n_out)
        keep = torch.where(self.finished, 0, keep)
        slots = (self.n_out[:, None] + idx).clamp(max=self.out.shape[1] - 1)
        self.out.scatter_(1, slots, torch.where(idx < keep[:, None], tokens, self.out.gather(1, slots)))

        self.stats.calls += 1
        self.row_calls += (~self.finished).long()
        self.n_out += keep
        last = tokens.gather(1, (keep - 1).clamp(min=0)[:, None])[:, 0]
        self.pending = torch.where(keep > 0, last, self.pending)
        self.finished = self.finished | (first_stop <= keep) | (self.n_out >= self.max_new_tokens)
        # A row that is done stays where it is, so its later (discarded) calls stay inside the cache.
        self.seqlens = self.seqlens + torch.where(self.finished, 0, advance)
        return keep

    def record_acceptance(self, n_drafts: Tensor, n_accepted: Tensor) -> None:
        """Count, per draft position k, the drafts verified (the first k were accepted) and accepted. Call before
        commit(), so rows that were already finished are left out."""
        k = torch.arange(self.attempted.shape[0], device=self.device)
        active = ~self.finished[:, None]
        self.attempted += ((k < n_drafts[:, None]) & (k <= n_accepted[:, None]) & active).sum(0)
        self.accepted += ((k < n_accepted[:, None]) & active).sum(0)

    def done(self) -> bool:
        """The loop's one host sync per step: streams new tokens if asked to, and tells whether all rows are done."""
        if self.on_tokens is not None:
            self.on_tokens(self.out, self.n_out)
        all_done, longest = torch.stack([self.finished.all().long(), self.seqlens.max()]).tolist()
        self.host_max_len = longest  # lets the torch attention path skip the cache slots nobody uses yet
        return bool(all_done)

    def result(self) -> Output:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.wall_s = time.perf_counter() - self._t0
        n_out = self.n_out.tolist()
        self.stats.tokens = sum(n_out)
        self.stats.row_calls = int(self.row_calls.sum())
        self.stats.attempted, self.stats.accepted = self.attempted.tolist(), self.accepted.tolist()
        out = self.out.tolist()
        return Output(tokens=[row[:n] for row, n in zip(out, n_out)], stats=self.stats)


@torch.no_grad()
def ar_decode(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
              sampling: SamplingParams = SamplingParams(), seeds: Optional[Sequence[int]] = None,
              stop_ids: Sequence[int] = (), on_tokens: Optional[Callable] = None) -> Output:
    """Autoregressive decoding: one forward call per token. The reference every other decoder must reproduce."""
    st = DecodeState(model, prompts, max_new_tokens, sampling, seeds, stop_ids, slots_per_step=1,
                     on_tokens=on_tokens)
    while True:
        logits = model(st.pending[:, None], input_pos=st.seqlens[:, None], cache_seqlens=st.seqlens,
                       kv_len=st.host_max_len + 1)
        probs = sampling.probs(logits[:, 0])  # (B, V)
        # The token decided here sits at position seqlens + 1 of its row.
        token = sample(probs, uniforms(st.seeds, st.seqlens + 1, SAMPLE))
        ones = torch.ones_like(token)
        st.commit(token[:, None], ones, advance=ones)
        if st.done():
            break
    return st.result()
