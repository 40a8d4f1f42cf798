"""A datastore of the model's own continuations: n-gram drafts that the context does not hold.

The context's n-grams (tree_decoding.ngram_chains) draft well where the output repeats the prompt, and the
look-ahead drafts one or two tokens; neither knows what the model writes after `for i in range(` when the context
has not said it yet. A datastore does: token text the model itself wrote (`python -m minipass.distill`, the same
self-distilled data the look-ahead embeddings are trained on), indexed by every n-gram (n = 1..3) with, per n-gram,
its S likeliest next tokens and, for each, the continuation of ngram_len tokens that followed most often. A tree
then holds S more chains: the continuations of the longest suffix of the context that the store holds (Retrieval-
based speculative decoding, He et al. 2024, drafts from a corpus in the same way). Drafts never change what is
emitted (verification is exact); they change how many tokens a call emits.

    python -m minipass.build_datastore --out weights/NAME.datastore.safetensors --data data/distill-code.jsonl ...

The file holds the token stream only (uint16, or int32 for vocabularies of 65535 tokens or more; documents
separated by -1, stored as 0xFFFF in 16 bits) and the vocabulary size; the tables are built from it when it is
loaded (deterministically, about half a second for 400k tokens).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from minipass.errors import MinipassError

SEPARATOR_16 = 0xFFFF  # vocabularies below 65535 tokens are stored in 16 bits, this being the separator
PAD = 64  # separators after the stream: a continuation of up to PAD tokens can be read from any start
BITS = 20  # bits per token in a packed n-gram key (vocabularies up to 1M tokens); n <= 3, and n above them
N_MAX = 3


class Datastore:
    """The tables of a token stream: for n = 1..n_max, the sorted packed keys of the n-grams it holds and, per key,
    the start of the continuation of each of its `chains` likeliest next tokens (-1 where it has fewer)."""

    def __init__(self, tokens: Sequence[int], vocab_size: int, chains: int = 3, ell: int = 8, n_max: int = N_MAX,
                 device=None):
        if not 1 <= n_max <= N_MAX:
            raise MinipassError(f"a datastore matches n-grams of 1..{N_MAX} tokens, got n_max={n_max}")
        if vocab_size >= 1 << BITS:
            raise MinipassError(f"a datastore packs token ids in {BITS} bits; a vocabulary of {vocab_size} is larger")
        self.vocab_size, self.chains, self.ell, self.n_max = vocab_size, chains, ell, n_max
        toks = np.asarray(list(tokens), dtype=np.int64)
        if toks.size and (toks.max() >= vocab_size or toks.min() < -1):
            raise MinipassError(f"datastore tokens must be in [0, {vocab_size}) or -1 (a separator), got "
                                f"{toks.min()}..{toks.max()}")
        # The stream, PAD separators after it: a continuation read at any start stops at the first -1.
        self.stream = np.concatenate([toks, np.full(max(PAD, ell), -1, dtype=np.int64)])
        self.keys, self.starts = [], []
        for n in range(1, n_max + 1):
            k, s = self._table(n)
            self.keys.append(torch.from_numpy(k).to(device))
            self.starts.append(torch.from_numpy(s).to(device))
        self.tokens = torch.from_numpy(self.stream).to(device)

    def __len__(self) -> int:
        return len(self.stream) - max(PAD, self.ell)

    def to(self, device) -> "Datastore":
        """The tables on `device` (self if they are there)."""
        if self.tokens.device == torch.device(device):
            return self
        other = object.__new__(Datastore)
        other.__dict__.update(self.__dict__)
        other.keys, other.starts = [k.to(device) for k in self.keys], [s.to(device) for s in self.starts]
        other.tokens = self.tokens.to(device)
        return other

    def _table(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        s, ell, C = self.stream, self.ell, self.chains
        e = np.arange(n, len(s) - ell)  # a continuation starts at e after the n-gram s[e - n : e]
        ok = s[e] >= 0
        for j in range(1, n + 1):
            ok &= s[e - j] >= 0
        e = e[ok]
        key = pack([s[e - n + j] for j in range(n)])
        first = s[e]
        # A hash of the continuation up to its first separator, for counting equal continuations.
        h = np.zeros(len(e), dtype=np.uint64)
        alive = np.ones(len(e), dtype=bool)
        for j in range(ell):
            alive &= s[e + j] >= 0
            h = h * np.uint64(1000003) + np.where(alive, s[e + j] + 1, 0).astype(np.uint64)
        order = np.lexsort((e, h, first, key))  # by key, first token, continuation, then position
        key, first, h, e = key[order], first[order], h[order], e[order]
        # Runs of equal (key, first, continuation): the most frequent continuation of each (key, first) stands for
        # it, at its latest position; (key, first) pairs rank by count within a key (ties: the smaller token).
        new3 = np.r_[True, (key[1:] != key[:-1]) | (first[1:] != first[:-1]) | (h[1:] != h[:-1])]
        r3 = np.flatnonzero(new3)
        c3 = np.diff(np.r_[r3, len(e)])
        last3 = np.r_[r3[1:], len(e)] - 1
        k3, f3 = key[r3], first[r3]
        new2 = np.r_[True, (k3[1:] != k3[:-1]) | (f3[1:] != f3[:-1])]
        g2 = np.cumsum(new2) - 1  # (key, first) group of each run
        c2 = np.bincount(g2, weights=c3).astype(np.int64)
        # the best run of each group: the largest count, the earliest run on ties
        o = np.lexsort((np.arange(len(r3)), -c3, g2))
        best = o[np.r_[True, g2[o][1:] != g2[o][:-1]]]
        start2, k2, f2 = e[last3[best]], k3[best], f3[best]
        # per key, the groups by count (descending), then token
        o = np.lexsort((f2, -c2, k2))
        k2, start2 = k2[o], start2[o]
        newk = np.r_[True, k2[1:] != k2[:-1]]
        rk = np.flatnonzero(newk)
        rank = np.arange(len(k2)) - np.repeat(rk, np.diff(np.r_[rk, len(k2)]))
        keys = k2[rk]
        starts = np.full((len(keys), C), -1, dtype=np.int64)
        sel = rank < C
        starts[(np.cumsum(newk) - 1)[sel], rank[sel]] = start2[sel]
        return keys, starts

    def continuations(self, context: Sequence[int], length: Optional[int] = None) -> list:
        """Reference (plain Python, the test oracle of `store_chains`): the chains (of up to `length` tokens,
        default ell) of the longest suffix of `context` (up to n_max tokens) that the store holds; [] if none."""
        for n in range(min(self.n_max, len(context)), 0, -1):
            key = int(pack([np.asarray([t], dtype=np.int64) for t in context[-n:]])[0])
            keys = self.keys[n - 1].cpu().numpy()
            i = int(np.searchsorted(keys, key))
            if i < len(keys) and keys[i] == key:
                out = []
                for st in self.starts[n - 1][i].tolist():
                    if st < 0:
                        break
                    chain = []
                    for t in self.stream[st: st + (length or self.ell)].tolist():
                        if t < 0:
                            break
                        chain.append(t)
                    out.append(chain)
                return out
        return []


def pack(cols: list):
    """Packed keys of n-grams given as n int64 columns (oldest token first), numpy arrays (the tables) or tensors
    (the lookup in a step): BITS bits per token, the length n in the top bits, so n-grams of any n differ."""
    n = len(cols)
    key = cols[0] * 0 + (n << (BITS * N_MAX))
    for j, c in enumerate(cols):
        key = key | (c << (BITS * (n - 1 - j)))
    return key


def store_chains(store: Datastore, ctx: Tensor, length: Tensor, chains: int, ell: int) -> Tensor:
    """(B, chains, ell) continuations of the longest suffix of each row's context that the store holds, -1 where
    there are none (chains <= store.chains, ell <= PAD).

    ctx: (B, S) tokens by position; length: (B,) tokens in use. Tensor ops only (a compiled step runs them): per n,
    the suffix's packed key and one binary search in the store's sorted keys."""
    if chains > store.chains or ell > max(PAD, store.ell):
        raise MinipassError(f"the datastore holds {store.chains} chains of up to {max(PAD, store.ell)} tokens per "
                            f"n-gram; asked for {chains} of {ell}")
    B = ctx.shape[0]
    dev = ctx.device
    start = torch.full((B, chains), -1, dtype=torch.long, device=dev)
    found = torch.zeros(B, dtype=torch.bool, device=dev)
    for n in range(store.n_max, 0, -1):
        pos = (length[:, None] - n + torch.arange(n, device=dev)).clamp(min=0)
        grams = ctx.gather(1, pos)  # (B, n), oldest first
        key = pack([grams[:, j] for j in range(n)])
        keys = store.keys[n - 1]
        if keys.numel() == 0:
            continue
        i = torch.searchsorted(keys, key).clamp(max=keys.numel() - 1)
        hit = (keys[i] == key) & (length >= n) & ~found
        start = torch.where(hit[:, None], store.starts[n - 1][i, :chains], start)
        found = found | hit
    at = start.clamp(min=0)[:, :, None] + torch.arange(ell, device=dev)
    chains = torch.where(start[:, :, None] >= 0, store.tokens[at], -1)
    return torch.where((chains >= 0).long().cumprod(2) > 0, chains, -1)


# --- the file --------------------------------------------------------------------------------------------------

def save_datastore(path: str, tokens: Sequence[int], vocab_size: int, made_by: str = "") -> None:
    from safetensors.torch import save_file

    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    t = torch.tensor(list(tokens), dtype=torch.int32)
    if vocab_size < SEPARATOR_16:  # two bytes a token, the separator -1 stored as 0xFFFF
        t = torch.where(t < 0, SEPARATOR_16, t).to(torch.uint16)
    save_file({"tokens": t}, str(tmp),
              metadata={"format": "minipass-datastore", "vocab_size": str(vocab_size), "made_by": made_by})
    tmp.replace(out)


def load_datastore(path, vocab_size: int, chains: int = 3, ell: int = 8, device=None) -> Datastore:
    """A datastore file for a model of `vocab_size` tokens (refused, in one sentence, if it was made for another)."""
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise MinipassError(f"datastore file not found: {p}")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != "minipass-datastore" or "tokens" not in f.keys():
                raise MinipassError(f"{p} is not a minipass datastore (no 'tokens' tensor or format metadata)")
            tokens = f.get_tensor("tokens")
    except MinipassError:
        raise
    except Exception as e:  # a truncated or foreign file
        raise MinipassError(f"cannot read datastore {p}: {e}") from None
    made_for = int(meta.get("vocab_size", -1))
    if made_for != vocab_size:
        raise MinipassError(f"datastore {p} was made for a vocabulary of {made_for} tokens, the model has {vocab_size}")
    tokens = tokens.long()
    if vocab_size < SEPARATOR_16:
        tokens = torch.where(tokens == SEPARATOR_16, -1, tokens)
    return Datastore(tokens.tolist(), vocab_size, chains, ell, device=device)
