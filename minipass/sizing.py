"""Size the token tree to the hardware: the budget that maximises tokens per second on the measured cost curve.

A call of width T = 1 + N + M L costs t(T); it emits 1 + (accepted nodes) tokens. Both sides are measured:

1. Calibration (`calibrate`): the model's own continuations of a few prompts from the training side of the data
   (never the evaluation prompts), decoded autoregressively with the benchmark's sampling setting, and, at every
   position a of them, the look-ahead top-k a drafting call after token a gives (one forward per sequence, blocks
   after every anchor under one mask, as in training).
2. Acceptance statistics (`acceptance_tables`): for each draft source, the probability that a candidate is right
   given that its parent was: look-ahead candidates by depth and rank, n-gram chain tokens by chain and depth.
3. The tree for a budget N. With deterministic candidates and the multi-candidate rule, child c of a node is on the
   accepted path with probability P(c), whatever its siblings are (sampling without replacement: PASS.md), so the
   expected number of accepted tokens is the sum over the tree's nodes of the probability that the node's path is
   the continuation, and the best tree of N nodes is the N nodes with the largest path probabilities: the dynamic
   programme over budgets that Sequoia (Chen et al. 2024) needs for sampled drafts, whose acceptance depends on
   the siblings tried before, collapses here to taking the best nodes, which is what the tree builder does with
   calibrated scores. Two scorings are candidates: the calibrated one (each source's measured acceptance by depth
   and rank) and the per-call one (the look-ahead probabilities themselves, n-gram chains first).
4. The budget (`size_tree`): every candidate (N, M, scoring) is replayed on the calibration sequences with the
   tree builder itself (`tree_decoding.build_tree`): a call accepts the longest path of its tree that the sequence
   continues with, which is exactly what verification does (greedy: by construction; sampling: the emitted tokens
   are distributed as the sequence's, and a child is accepted iff the emitted token is its token), seeds the next
   call with the look-ahead of the block after the path's end if that node has one, and moves on. The chosen
   candidate maximises replayed tokens per call / t(1 + N + M L). Candidates fill the widths the cost curve
   measured (`candidates`), and every look-ahead length up to the given one is tried (`size_tree`).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from minipass.decoding import SamplingParams, ar_decode
from minipass.model import Transformer
from minipass.datastore import Datastore
from minipass.tree_decoding import NgramIndex, TreeConfig, TreeTemplate, build_tree, draft_chains, store_slots

BUDGETS = (2, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 64)
# Prompts per source that the shipped look-ahead (the first 480) and datastore (all 960) were distilled from
# (weights/README.md): skipped here, so that calibration measures drafts on prompts neither has seen.
TRAINED_ON = 960


@dataclass
class Calibration:
    """Sequences (prompt + the model's continuation) and, per sequence, the look-ahead top-k after each anchor."""
    sequences: list  # token lists
    starts: list  # index of each prompt's last token (the first root)
    top_tokens: list  # per sequence: {anchor a: (L, k) tokens of the drafting call after token a}
    top_probs: list  # per sequence: {anchor a: (L, k) probabilities}
    seconds: float = 0.0

    def truncated(self, L: int) -> "Calibration":
        """The calibration of the first L look-ahead tokens: look-ahead token k attends only to the tokens before
        it, so the first L of a longer block draft exactly what a block of L would (lookahead.py)."""
        cut = lambda per_seq: [{a: v[:L] for a, v in d.items()} for d in per_seq]  # noqa: E731
        return Calibration(self.sequences, self.starts, cut(self.top_tokens), cut(self.top_probs), self.seconds)


@dataclass
class Plan:
    tree: TreeConfig
    report: dict = field(default_factory=dict)
    lookahead: int = 0  # L: the first L look-ahead tokens of the block are the tree's (0: none)


def calibration_prompts(dataset: str, tok, n: int) -> list:
    """Prompts like the data set's, from the training side of the data (never its evaluation prompts), past those
    the shipped look-ahead was distilled from."""
    if dataset == "humaneval":
        texts = _code(n)
    elif dataset == "sharegpt":
        texts = [tok.chat_prompt(t) for t in _chat(n)]
    else:  # a user's prompt file: half code, half chat
        texts = _code(n // 2) + [tok.chat_prompt(t) for t in _chat(n - n // 2)]
    return [tok.encode(t) for t in texts]


@lru_cache(maxsize=None)
def _code(n: int) -> list:
    from minipass.distill import code_prompts  # parses the standard library: seconds, so once per process

    return code_prompts(TRAINED_ON + n, 0)[TRAINED_ON:]


@lru_cache(maxsize=None)
def _chat(n: int) -> list:
    from minipass.distill import sharegpt_train_prompts

    return sharegpt_train_prompts(TRAINED_ON + n, 0)[TRAINED_ON:]


def fit(prompts: list, room: int) -> list:
    """Prompts cut to their last `room` tokens, so that prompt and continuation fit the model's context."""
    return [p[-room:] for p in prompts]


@torch.no_grad()
def calibrate(model: Transformer, lookahead: Tensor, prompts: list, sampling: SamplingParams, max_new_tokens: int,
              topk: int, stop_ids=(), seed: int = 1000) -> Calibration:
    """The model's continuations of `prompts` and the look-ahead top-k after each of their tokens."""
    from minipass.train_lookahead import lookahead_forward, make_layout

    t0 = time.perf_counter()
    L = lookahead.shape[-2]
    outs = ar_decode(model, prompts, max_new_tokens, sampling, seeds=[seed + i for i in range(len(prompts))],
                     stop_ids=stop_ids).tokens
    cal = Calibration([], [], [], [])
    device = model.embed_tokens.weight.device
    for p, out in zip(prompts, outs):
        seq = list(p) + list(out)
        start = len(p) - 1
        cal.sequences.append(seq), cal.starts.append(start)
        tops, probs = {}, {}
        layout = make_layout(len(seq), L, 1, offset=start, device=device)
        if layout.anchors.numel():
            hidden = lookahead_forward(model, torch.tensor([seq], device=device), lookahead, layout)
            la = hidden[0, len(seq):].view(-1, L, hidden.shape[-1])  # (anchors, L, dim)
            top = torch.softmax(model.head(la).float(), -1).topk(topk, dim=-1)
            for i, a in enumerate(layout.anchors.tolist()):
                tops[a], probs[a] = top.indices[i].tolist(), top.values[i].tolist()
        cal.top_tokens.append(tops), cal.top_probs.append(probs)
    cal.seconds = time.perf_counter() - t0
    return cal


def acceptance_tables(cal: Calibration, cfg: TreeConfig, L: int, store: Optional[Datastore] = None) -> tuple:
    """(look-ahead acceptance (L, topk), n-gram acceptance (chains, ngram_len)): each the fraction of candidates
    that were the continuation among those whose parent was (smoothed towards 0 with one pseudo-count)."""
    la_hit = [[0] * cfg.topk for _ in range(L)]
    la_try = [0] * L
    C = max(cfg.ngram_chains + store_slots(cfg, store), 1)
    ng_hit = [[0] * cfg.ngram_len for _ in range(C)]
    ng_try = [[0] * cfg.ngram_len for _ in range(C)]
    for seq, start, tops in zip(cal.sequences, cal.starts, cal.top_tokens):
        index = NgramIndex(seq[: start + 1], cfg.ngram_min, cfg.ngram_max)
        for root in range(start, len(seq) - 1):
            truth = seq[root + 1:]
            a = root - 1  # the look-ahead that seeds a tree rooted at `root` comes from the block after root - 1
            if a in tops:
                for d in range(L):
                    if d >= len(truth):
                        break
                    la_try[d] += 1
                    ranks = tops[a][d]
                    if truth[d] in ranks:
                        la_hit[d][ranks.index(truth[d])] += 1
                    else:
                        break
            for c, chain in enumerate(draft_chains(index, cfg, store)):
                for j, t in enumerate(chain[: len(truth)]):
                    ng_try[c][j] += 1
                    if t != truth[j]:
                        break
                    ng_hit[c][j] += 1
            index.extend([seq[root + 1]])
    la = tuple(tuple(round(h / (la_try[d] + 1), 4) for h in la_hit[d]) for d in range(L))
    ng = tuple(tuple(round(h / (t + 1), 4) for h, t in zip(ng_hit[c], ng_try[c])) for c in range(C))
    return la, ng


def replay(cal: Calibration, cfg: TreeConfig, L: int, store: Optional[Datastore] = None) -> float:
    """Tokens per call of tree decoding with `cfg` on the calibration sequences (see the module docstring, 4)."""
    M = cfg.blocks if L else 0
    tpl = TreeTemplate(cfg, L if M else 0, store=store_slots(cfg, store))
    calls = emitted = 0
    for seq, start, tops, probs in zip(cal.sequences, cal.starts, cal.top_tokens, cal.top_probs):
        index = NgramIndex(seq[: start + 1], cfg.ngram_min, cfg.ngram_max)
        root, seeds = start, None  # the first call has no look-ahead block before it
        while root < len(seq) - 1:
            chains = draft_chains(index, cfg, store)
            la_tok = tops.get(seeds) if seeds is not None else None
            la_prob = probs.get(seeds) if seeds is not None else None
            tokens, parents, depths, scores = build_tree(tpl, cfg.nodes, seq[root], chains, la_tok, la_prob)
            node, n = 0, 0
            while root + 1 + n < len(seq):
                child = next((i for i in range(1, len(tokens)) if parents[i] == node
                              and tokens[i] == seq[root + 1 + n]), None)
                if child is None:
                    break
                node, n = child, n + 1
            out = min(n + 1, len(seq) - 1 - root)
            calls += 1
            emitted += out
            anchors = sorted(range(len(tokens)), key=lambda i: -scores[i])[:M]
            seeds = root + n if node in anchors else None  # the block after the path's last node
            index.extend(seq[root + 1: root + 1 + out])
            root += out
    return emitted / max(calls, 1)


def candidates(base: TreeConfig, cal: Calibration, L: int, widths: Optional[Sequence[int]] = None,
               store: Optional[Datastore] = None) -> list:
    """Tree configurations to replay: one or two look-ahead blocks, per-call or calibrated scores, and every budget
    N in BUDGETS, or, given `widths`, the budgets whose calls are exactly those widths (N = W - 1 - M L >= 1).

    A call's cost need not be smooth in its width: a CPU's matrix products run in blocks of rows (AMX tiles hold 16),
    and the default model's 17-wide tree step measured 1.46x an AR step where the 16-wide one measured 1.30x. So
    the budgets are fitted to the widths the cost curve measured, and never priced by interpolating across a step."""
    tables = acceptance_tables(cal, base, L, store)
    blocks = (1, 2) if L and base.blocks else (0,)
    if widths is None:
        sizes = [(N, M) for N in BUDGETS for M in blocks]
    else:
        sizes = [(W - 1 - M * L, M) for W in sorted(set(widths)) for M in blocks if W - 1 - M * L >= 1]
    out = []
    for N, M in sizes:
        for calibrated in (None, tables):
            out.append(replace(base, nodes=N, blocks=M if L else base.blocks, calibrated=calibrated))
    return out


def size_tree(model: Transformer, lookahead: Optional[Tensor], sampling: SamplingParams, dataset: str, tok,
              t_of: Callable[[int], float], base_tree: TreeConfig = TreeConfig(), num_prompts: int = 6,
              max_new_tokens: int = 64, quiet: bool = True, widths: Optional[Sequence[int]] = None,
              datastore: Optional[Datastore] = None) -> Plan:
    """The tree (budget, blocks, scoring, look-ahead length) with the most replayed tokens per call / t(width)
    (module docstring). widths: the call widths t_of was measured at; the candidates then fill them exactly (see
    `candidates`). Every look-ahead length up to the tensor's L is a candidate (Plan.lookahead): a block's later
    tokens draft worse than its first ones, so at a given width a shorter block leaves room for more nodes (the
    default model's ShareGPT calibration, 8 wide: 1.62 replayed tokens per call with 1 look-ahead token, 1.50 with
    4)."""
    L = 0 if lookahead is None else lookahead.shape[-2]
    width = max(widths) if widths else 1 + max(BUDGETS) + 2 * L
    prompts = fit(calibration_prompts(dataset, tok, num_prompts), model.args.max_seq_len // 2 - width)
    cal = calibrate(model, lookahead, prompts, sampling, max_new_tokens, max(base_tree.topk, 1), tok.eos_ids)
    t0 = time.perf_counter()
    rows = []
    for Lc in (range(L, 0, -1) if L and base_tree.blocks else (L,)):
        cal_c = cal.truncated(Lc) if Lc != L else cal
        for cfg in candidates(base_tree, cal_c, Lc, widths, datastore):
            T = 1 + cfg.nodes + (cfg.blocks if Lc else 0) * Lc
            tpc = replay(cal_c, cfg, Lc, datastore)
            rows.append((tpc / t_of(T), tpc, T, cfg, Lc))
    default_tpc = replay(cal, base_tree, L, datastore)
    rate, tpc, T, cfg, Lc = max(rows, key=lambda r: r[0])
    default_T = 1 + base_tree.nodes + (base_tree.blocks if L else 0) * L
    summary = (f"N={cfg.nodes} M={cfg.blocks if Lc else 0} L={Lc} "
               f"{'calibrated' if cfg.calibrated else 'per-call'} scores, width {T}: {tpc:.2f} tokens/call replayed, "
               f"est. {rate * t_of(1):.2f}x ar (default N={base_tree.nodes} L={L}: {default_tpc:.2f} tokens/call, "
               f"est. {default_tpc / t_of(default_T) * t_of(1):.2f}x); calibration {cal.seconds:.0f} s on "
               f"{len(prompts)} prompts, replay {time.perf_counter() - t0:.1f} s")
    if not quiet:
        print(f"\nsizing: {dataset} {'greedy' if sampling.greedy else f'T={sampling.temperature:g}'}: {summary}",
              file=sys.stderr)
    report = {"nodes": cfg.nodes, "blocks": cfg.blocks if Lc else 0, "lookahead": Lc,
              "calibrated": cfg.calibrated is not None, "width": T, "replayed_tokens_per_call": round(tpc, 4),
              "estimated_speedup": round(rate * t_of(1), 4),
              "default_replayed_tokens_per_call": round(default_tpc, 4), "summary": summary,
              "candidates": [{"nodes": c.nodes, "blocks": c.blocks if lc else 0, "lookahead": lc,
                              "calibrated": c.calibrated is not None, "width": w,
                              "replayed_tokens_per_call": round(tp, 4), "estimated_speedup": round(r * t_of(1), 4)}
                             for r, tp, w, c, lc in rows]}
    return Plan(cfg, report, Lc)
