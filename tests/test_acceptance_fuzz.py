"""Fuzz of the three acceptance launchers and their references: random small and odd shapes, fp32/fp16, padded and
flattened forms, drafts and tree tokens out of range, and rows holding NaN, +inf, -inf, no mass or -inf logits only.

Asserted for every case: the launcher raises nothing (bad shapes raise the documented ValueError/TypeError), every
output index is -1 or inside the vocabulary, a row is either valid (num_accepted in [0, n_b], its emitted token in
[0, V)) or invalid (num_accepted -1 and all its outputs -1), and the kernel equals the reference exactly.
Seeded: the cases are the same on every run. Under the Triton interpreter, so shapes stay small."""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from minipass.kernels.acceptance import accept, accept_from_logits, accept_from_logits_ref, accept_ref  # noqa: E402
from minipass.kernels.tree_acceptance import accept_tree, accept_tree_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = 16


def _poison(rng, g, x, kinds):
    """Write a few special values into random rows of x (..., V), in place."""
    flat = x.view(-1, x.shape[-1])
    for _ in range(rng.randint(0, max(2, flat.shape[0] // 2)) if flat.shape[0] else 0):
        row, kind = rng.randrange(flat.shape[0]), rng.choice(kinds)
        if kind == "zero_row":
            flat[row] = 0.0
        elif kind == "neg_inf_row":
            flat[row] = float("-inf")
        else:
            flat[row, rng.randrange(flat.shape[1])] = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"),
                                                      "zero": 0.0, "negative": -0.5}[kind]
    return x


def _wild_tokens(rng, g, shape, V):
    """Tokens mostly in [0, V), some out of range on both sides, including values that do not fit in int32."""
    t = torch.randint(0, V, shape, generator=g)
    wild = torch.tensor([-1, V, V + 5, -(10**12), 10**12])
    mask = torch.rand(shape, generator=g) < 0.15
    return torch.where(mask, wild[torch.randint(0, len(wild), shape, generator=g)], t)


def _check_outputs(tokens, num_accepted, n, V, path=None):
    tokens, num_accepted = tokens.cpu(), num_accepted.cpu()
    assert ((tokens >= -1) & (tokens < V)).all()
    invalid = num_accepted == -1
    assert ((num_accepted >= 0) & (num_accepted <= n) | invalid).all()
    if tokens.dim() == 2:                                        # padded rows (the flattened form is checked padded)
        assert (tokens[invalid] == -1).all()
        emitted = tokens[~invalid].gather(1, num_accepted[~invalid, None])
        assert ((emitted >= 0) & (emitted < V)).all()
    if path is not None:
        assert (path.cpu()[invalid] == -1).all()


def _flatten(p, q, drafts, n, u_a):
    cu = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)])
    take = lambda x, extra: torch.cat([x[b, : int(n[b]) + extra] for b in range(len(n))])  # noqa: E731
    return take(p, 1), None if q is None else take(q, 0), take(drafts, 0), cu, take(u_a, 0)


def _same(a, b):
    assert len(a) == len(b) and all(torch.equal(x.cpu(), y.cpu()) for x, y in zip(a, b))


def _to(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def _chain_case(rng, g, logits):
    B, K, V = rng.randint(1, 5), rng.randint(0, 5), rng.choice([3, 7, 19, 37, 70])
    dtype = rng.choice([torch.float32, torch.float16])
    sharp = rng.choice([0.5, 2.0, 6.0])
    x = torch.randn(B, K + 1, V, generator=g) * sharp
    y = x[:, :K] + torch.randn(B, K, V, generator=g) * 0.5
    if logits:
        kinds = ["nan", "inf", "-inf", "neg_inf_row", "zero"]
        p, q = _poison(rng, g, x, kinds), _poison(rng, g, y, kinds)
    else:
        kinds = ["nan", "inf", "-inf", "zero_row", "zero", "negative"]
        p, q = _poison(rng, g, torch.softmax(x, -1), kinds), _poison(rng, g, torch.softmax(y, -1), kinds)
    q = q if rng.random() < 0.6 else None
    # Mostly the target's argmax, so that runs of accepts happen; some other and out-of-range drafts.
    drafts = torch.where(torch.rand(B, K, generator=g) < 0.6, x[:, :K].argmax(-1), _wild_tokens(rng, g, (B, K), V))
    n = torch.randint(0, K + 1, (B,), generator=g)
    u_a = torch.rand(B, K, generator=g) ** 2
    u_s = torch.rand(B, generator=g)
    int_dtype = rng.choice([torch.int32, torch.int64])
    drafts = drafts.clamp(-(2**31), 2**31 - 1).to(int_dtype) if int_dtype == torch.int32 else drafts
    return p.to(dtype), None if q is None else q.to(dtype), drafts, n.to(int_dtype), u_a, u_s


@pytest.mark.parametrize("seed", range(CASES))
def test_accept_fuzz(seed):
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    p, q, drafts, n, u_a, u_s = _chain_case(rng, g, logits=False)
    V = p.shape[-1]
    n_ragged = n.clone()
    n = torch.where(torch.rand(len(n), generator=g) < 0.2, torch.tensor(99), n)      # clamped to K
    padded = accept(*_to(p, drafts, n, u_a, u_s, q))
    _same(padded, accept_ref(p, drafts, n, u_a, u_s, q))
    _check_outputs(*padded, n.long().clamp(0, p.shape[1] - 1), V)

    p_f, q_f, d_f, cu, ua_f = _flatten(p, q, drafts, n_ragged.long(), u_a)
    flat = accept(*_to(p_f, d_f, cu, ua_f, u_s, q_f))
    _same(flat, accept_ref(p_f, d_f, cu, ua_f, u_s, q_f))
    _same(flat[1:], accept(*_to(p, drafts, n_ragged, u_a, u_s, q))[1:])
    assert ((flat[0].cpu() >= -1) & (flat[0].cpu() < V)).all()


@pytest.mark.parametrize("seed", range(CASES))
def test_accept_from_logits_fuzz(seed):
    rng, g = random.Random(100 + seed), torch.Generator().manual_seed(100 + seed)
    target, draft, drafts, n, u_a, u_s = _chain_case(rng, g, logits=True)
    V = target.shape[-1]
    options = (rng.choice([0.0, 0.6, 1.0, 1.7]), rng.choice([0, 1, 3, V]), rng.choice([1.0, 0.9, 0.3]))
    padded = accept_from_logits(*_to(target, drafts, n, u_a, u_s, draft), *options)
    _same(padded, accept_from_logits_ref(target, drafts, n, u_a, u_s, draft, *options))
    _check_outputs(*padded, n.long(), V)

    t_f, q_f, d_f, cu, ua_f = _flatten(target, draft, drafts, n.long(), u_a)
    flat = accept_from_logits(*_to(t_f, d_f, cu, ua_f, u_s, q_f), *options)
    _same(flat, accept_from_logits_ref(t_f, d_f, cu, ua_f, u_s, q_f, *options))
    assert torch.equal(flat[1].cpu(), padded[1].cpu())


def _random_tree(rng, N):
    parents = [-1]
    for i in range(1, N + 1):
        parents.append(-1 if rng.random() < 0.15 else rng.choice([a for a in range(i) if a == 0 or parents[a] >= 0]))
    return parents


@pytest.mark.parametrize("seed", range(CASES))
def test_accept_tree_fuzz(seed):
    rng, g = random.Random(200 + seed), torch.Generator().manual_seed(200 + seed)
    B, N, V = rng.randint(1, 5), rng.randint(0, 9), rng.choice([3, 7, 19, 37, 70])
    dtype = rng.choice([torch.float32, torch.float16])
    p = torch.softmax(torch.randn(B, N + 1, V, generator=g) * rng.choice([0.5, 2.0, 6.0]), -1)
    p = _poison(rng, g, p, ["nan", "inf", "-inf", "zero_row", "zero", "negative"]).to(dtype)
    parents = torch.tensor([_random_tree(rng, N) for _ in range(B)])
    # Half the candidates are their parent's argmax, so that paths get accepted.
    best = p.float().nan_to_num(0.0).argmax(-1).gather(1, parents.clamp_min(0))
    tokens = torch.where(torch.rand(B, N + 1, generator=g) < 0.5, best, _wild_tokens(rng, g, (B, N + 1), V))
    u_a, u_s = torch.rand(B, N + 1, generator=g) ** 2, torch.rand(B, generator=g)
    int_dtype = rng.choice([torch.int32, torch.int64])
    tokens = tokens.clamp(-(2**31), 2**31 - 1).to(int_dtype) if int_dtype == torch.int32 else tokens
    out = accept_tree(*_to(p, tokens, parents.to(int_dtype), u_a, u_s))
    _same(out, accept_tree_ref(p, tokens, parents, u_a, u_s))
    out_tokens, path, num_accepted = out
    _check_outputs(out_tokens, num_accepted, N, V, path)
    assert ((path.cpu() >= -1) & (path.cpu() <= N)).all()


@pytest.mark.parametrize("seed", range(6))
def test_bad_shapes_raise_the_documented_errors(seed):
    """One input of a valid call changed in shape, rank, dtype or kind: a ValueError or TypeError that names it."""
    rng, g = random.Random(300 + seed), torch.Generator().manual_seed(300 + seed)
    p, q, drafts, n, u_a, u_s = _chain_case(rng, g, logits=False)
    B, K1, V = p.shape
    q = torch.rand(B, K1 - 1, V) if q is None else q
    kwargs = dict(p=p, draft_tokens=drafts, num_drafts=n, u_accept=u_a, u_sample=u_s, q=q)
    name = rng.choice(sorted(kwargs))
    x = kwargs[name]
    kwargs[name] = rng.choice([x[..., :-1] if x.dim() and x.shape[-1] else x[None], x.unsqueeze(0),
                               x.to(torch.float64) if x.is_floating_point() else x.float(), x.tolist()])
    with pytest.raises((ValueError, TypeError), match="must"):
        accept(**{k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()})
