"""kernels/acceptance.py: the Triton verification kernels against their torch references, the references against
the target distribution (chi-square), invalid rows, the flattened form against the padded one, and the launchers'
error messages. (GPU code generation: test_acceptance_lowering.py; the torch ops: test_acceptance_ops.py.)

Without a GPU the kernels run under the Triton interpreter (numpy), so shapes stay small."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from minipass.kernels.acceptance import (  # noqa: E402
    accept,
    accept_from_logits,
    accept_from_logits_ref,
    accept_ref,
    sampling_probs_ref,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ONE_MINUS_ULP = 1.0 - 2.0**-24  # the largest float32 below 1


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _to(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def _softmax(logits, dtype=torch.float32):
    return torch.softmax(logits, -1).to(dtype)


def _random_case(B, K, V, dtype, with_q, seed, sharp=5.0):
    """Target p and a nearby draft q (so drafts are often accepted), drafts sampled from q (greedy from q when the
    drafts are deterministic), ragged num_drafts."""
    g = _gen(seed)
    logits = torch.randn(B, K + 1, V, generator=g) * sharp
    p = _softmax(logits, dtype)
    q_logits = logits[:, :K] + torch.randn(B, K, V, generator=g) * 0.5
    q = _softmax(q_logits, dtype)
    if with_q:
        drafts = torch.multinomial(q.float().reshape(B * K, V), 1, generator=g).view(B, K) if K else q.argmax(-1)
    else:
        drafts = q.float().argmax(-1)                    # deterministic drafts: the draft model's greedy choice
    num_drafts = torch.randint(0, K + 1, (B,), generator=g)
    u_accept, u_sample = torch.rand(B, K, generator=g), torch.rand(B, generator=g)
    return p, (q if with_q else None), drafts, num_drafts, u_accept, u_sample


def _check_against_ref(p, drafts, num_drafts, u_accept, u_sample, q=None, **kw):
    p, drafts, num_drafts, u_accept, u_sample, q = _to(p, drafts, num_drafts, u_accept, u_sample, q)
    tokens, num_accepted = accept(p, drafts, num_drafts, u_accept, u_sample, q, **kw)
    tokens_ref, num_accepted_ref = accept_ref(p, drafts, num_drafts, u_accept, u_sample, q)
    assert torch.equal(num_accepted.cpu(), num_accepted_ref.cpu())
    assert torch.equal(tokens.cpu(), tokens_ref.cpu())
    _check_invariants(p, num_drafts, tokens, num_accepted)
    return tokens.cpu(), num_accepted.cpu()


def _check_invariants(p, num_drafts, tokens, num_accepted):
    """Shape of the output rows, and the emitted token is in range with mass wherever its distribution has mass.
    Invalid rows (num_accepted -1) are all -1; the other rows are checked."""
    p, tokens, num_accepted = p.float().cpu(), tokens.cpu(), num_accepted.cpu()
    invalid = num_accepted == -1
    assert (tokens[invalid] == -1).all()
    p, tokens, num_accepted, num_drafts = p[~invalid], tokens[~invalid], num_accepted[~invalid], num_drafts[~invalid]
    B, K1, V = p.shape
    n = num_drafts.cpu().long().clamp(0, K1 - 1)
    assert ((num_accepted >= 0) & (num_accepted <= n)).all()
    cols = torch.arange(K1)
    assert (tokens[cols > num_accepted[:, None]] == -1).all()
    emitted = tokens[torch.arange(B), num_accepted]
    assert ((emitted >= 0) & (emitted < V)).all()
    p_j = p[torch.arange(B), num_accepted]
    has_mass = (p_j > 0).any(-1)
    assert (p_j[torch.arange(B), emitted][has_mass] > 0).all()


# ----------------------------------------------------------------------------------------------------------------------
# 1. accept() against accept_ref(), token for token
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B, K, V, dtype, with_q, block_v", [
    (16, 4, 1000, torch.float32, True, None),
    (16, 4, 1000, torch.float16, False, 128),      # 8 blocks of 128, the last one partial
    (12, 3, 4099, torch.float32, False, None),     # a 4096 block and a 3-token tail
    (12, 3, 4099, torch.float16, True, None),
    (9, 6, 37, torch.float32, True, 16),
    (9, 5, 37, torch.float16, True, None),
])
def test_matches_reference(B, K, V, dtype, with_q, block_v):
    p, q, drafts, n, u_a, u_s = _random_case(B, K, V, dtype, with_q, seed=V + K)
    tokens, num_accepted = _check_against_ref(p, drafts, n, u_a, u_s, q, block_v=block_v)
    assert num_accepted.max() >= 2  # the case exercises accepted drafts, not just rejections


def test_strided_inputs():
    B, K, V = 6, 3, 300
    p, q, drafts, n, u_a, u_s = _random_case(2 * B, K, V + 5, torch.float32, True, seed=3)
    p = p[::2, :, :V]                                   # batch stride and row stride that are not (K+1)*V and V
    q = q[::2, :, 5:]
    drafts = drafts[::2].clamp(max=V - 1).t().contiguous().t()  # column-major
    n, u_s = n[::2], u_s[::2]
    u_a = u_a[::2].t().contiguous().t()
    assert not p.is_contiguous() and not q.is_contiguous() and not drafts.is_contiguous()
    _check_against_ref(p, drafts.int(), n.int(), u_a, u_s, q)


@pytest.mark.parametrize("with_q", [True, False])
def test_greedy_one_hot(with_q):
    """One-hot p and deterministic (or one-hot q) drafts: accept iff the draft is the argmax; emit the argmax."""
    B, K, V = 16, 4, 500
    g = _gen(1)
    target = torch.randn(B, K + 1, V, generator=g).argmax(-1)                       # (B, K+1)
    p = torch.nn.functional.one_hot(target, V).float()
    # Each draft is right with probability 3/4, so rows accept runs of every length.
    wrong = torch.rand(B, K, generator=g) < 0.25
    drafts = torch.where(wrong, (target[:, :K] + 1) % V, target[:, :K])
    q = torch.nn.functional.one_hot(drafts, V).float() if with_q else None
    n = torch.randint(0, K + 1, (B,), generator=g)
    u_a, u_s = torch.rand(B, K, generator=g), torch.rand(B, generator=g)
    tokens, num_accepted = _check_against_ref(p, drafts, n, u_a, u_s, q)
    run = torch.cumprod((~wrong).long(), 1).sum(1)
    expected_j = torch.minimum(run, n)
    assert torch.equal(num_accepted, expected_j)
    assert torch.equal(tokens[torch.arange(B), num_accepted], target[torch.arange(B), expected_j])


def test_disjoint_supports():
    """p lives on the first half of the vocabulary, q on the second: every draft is rejected, the residual is p."""
    B, K, V = 8, 3, 600
    g = _gen(2)
    p = torch.softmax(torch.randn(B, K + 1, V, generator=g), -1)
    p[..., V // 2:] = 0
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    q[..., : V // 2] = 0
    drafts = torch.multinomial(q.reshape(-1, V), 1, generator=g).view(B, K)
    n = torch.full((B,), K)
    u_a, u_s = torch.rand(B, K, generator=g), torch.rand(B, generator=g)
    tokens, num_accepted = _check_against_ref(p, drafts, n, u_a, u_s, q)
    assert (num_accepted == 0).all()
    assert (tokens[:, 0] < V // 2).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_p_equals_q_accepts_everything(dtype):
    B, K, V = 8, 4, 700
    p, _, drafts, n, u_a, u_s = _random_case(B, K, V, dtype, False, seed=4)
    u_a = torch.full((B, K), ONE_MINUS_ULP)           # u < 1 is all that p == q needs
    tokens, num_accepted = _check_against_ref(p, drafts, n, u_a, u_s, p[:, :K].clone())
    assert torch.equal(num_accepted, n)


def test_zero_draft_probability_with_target_mass_accepts():
    """q(d) = 0 < p(d) accepts (0 < p, no 0/0); q(d) = 0 = p(d) rejects."""
    B, K, V = 4, 3, 50
    p, q, drafts, _, _, u_s = _random_case(B, K, V, torch.float32, True, seed=5)
    q = q.clone()
    q.scatter_(2, drafts[..., None], 0.0)
    u_a = torch.full((B, K), ONE_MINUS_ULP)
    n = torch.full((B,), K)
    _, num_accepted = _check_against_ref(p, drafts, n, u_a, u_s, q)
    assert (num_accepted == K).all()
    p = p.clone()
    p[:, 1].scatter_(1, drafts[:, 1:2], 0.0)
    _, num_accepted = _check_against_ref(p, drafts, n, u_a, u_s, q)
    assert (num_accepted == 1).all()


@pytest.mark.parametrize("with_q", [True, False])
def test_no_drafts(with_q):
    """Rows with n_b = 0 and a batch with K = 0 emit one token from p_0."""
    B, K, V = 6, 3, 300
    p, q, drafts, _, u_a, u_s = _random_case(B, K, V, torch.float32, with_q, seed=6)
    tokens, num_accepted = _check_against_ref(p, drafts, torch.zeros(B, dtype=torch.long), u_a, u_s, q)
    assert (num_accepted == 0).all() and (tokens[:, 1:] == -1).all()
    p0, q0, drafts0, n0, u_a0, u_s0 = _random_case(B, 0, V, torch.float32, with_q, seed=7)
    tokens0, num_accepted0 = _check_against_ref(p0, drafts0, n0, u_a0, u_s0, q0)
    assert tokens0.shape == (B, 1) and (num_accepted0 == 0).all()


def test_residual_without_mass_falls_back_to_p():
    """p <= q everywhere (p = q shrunk by rounding-sized amounts): a rejection leaves no residual; sample p."""
    B, K, V = 8, 2, 64
    p, q, drafts, _, _, u_s = _random_case(B, K, V, torch.float32, True, seed=8)
    q = p[:, :K].clone()
    p = p.clone()
    p[:, :K] = q * (1 - 1e-6)
    u_a = torch.full((B, K), ONE_MINUS_ULP)            # rejects: p(d) <= u q(d)
    n = torch.full((B,), K)
    tokens, num_accepted = _check_against_ref(p, drafts, n, u_a, u_s, q)
    assert (num_accepted == 0).all()
    expected = (p[:, 0].cumsum(-1) <= (u_s * p[:, 0].sum(-1))[:, None]).sum(-1)
    assert torch.equal(tokens[:, 0], expected)

    # Deterministic drafts: all of p_k's mass on the draft, but less than 1, and u above it.
    p = torch.zeros(B, K + 1, V)
    p[..., 5] = 0.9999
    drafts = torch.full((B, K), 5)
    u_a = torch.full((B, K), 0.99995)
    tokens, num_accepted = _check_against_ref(p, drafts, n, u_a, u_s)
    assert (num_accepted == 0).all() and (tokens[:, 0] == 5).all()


@pytest.mark.parametrize("with_q", [True, False])
def test_rows_without_mass_emit_the_argmax(with_q):
    """All-zero p emits index 0; a (malformed) p with no positive entry emits its argmax, never a wild index."""
    B, K, V = 4, 2, 100
    p, q, drafts, _, u_a, u_s = _random_case(B, K, V, torch.float32, with_q, seed=9)
    p = torch.zeros_like(p)
    p[2:] = -torch.rand(2, K + 1, V, generator=_gen(9))
    p[3, 0, 71] = 0.0                                    # the largest entry, and it is zero
    tokens, num_accepted = _check_against_ref(p, drafts, torch.full((B,), K), u_a, u_s, q, block_v=32)
    assert (num_accepted == 0).all()
    assert tokens[:, 0].tolist() == [0, 0, p[2, 0].argmax().item(), 71]


def test_malformed_uniforms_stay_in_range():
    """u_sample of NaN, >= 1 or < 0 still yields a token with mass (the last, resp. first, one)."""
    V = 300
    p = torch.zeros(4, 1, V)
    p[:, 0, [20, 150, 280]] = torch.tensor([0.2, 0.3, 0.5])
    u_s = torch.tensor([float("nan"), 1.0, 2.5, -0.5])
    tokens, _ = _check_against_ref(p, torch.zeros(4, 0).long(), torch.zeros(4).long(), torch.zeros(4, 0), u_s,
                                   block_v=64)
    assert tokens[:, 0].tolist() == [280, 280, 280, 20]


def test_ties_zero_mass_tails_and_extreme_uniforms():
    """Exact binary fractions, so the expected tokens are known without rounding."""
    V = 1000
    support = torch.tensor([3, 10, 500, 997])                # mass 1/4 each; zero-mass head, gaps and tail
    u_s = torch.tensor([0.0, 0.25, 0.5, 0.75, ONE_MINUS_ULP, 0.2499999, 0.5000001])
    expected = torch.tensor([3, 10, 500, 997, 997, 3, 500])
    B = len(u_s)
    p = torch.zeros(B, 1, V)
    p[:, 0, support] = 0.25
    tokens, _ = _check_against_ref(p, torch.zeros(B, 0).long(), torch.zeros(B).long(), torch.zeros(B, 0), u_s,
                                   block_v=256)
    assert torch.equal(tokens[:, 0], expected)

    # Ties in the accept test: u q(d) == p(d) rejects (the test is strict).
    p = torch.zeros(2, 2, V)
    p[:, 0, 7], p[:, 0, 8], p[:, 1, 9] = 0.25, 0.75, 1.0
    q = torch.zeros(2, 1, V)
    q[:, 0, 7], q[:, 0, 11] = 0.5, 0.5
    u_a = torch.tensor([[0.5], [0.4999999]])
    tokens, num_accepted = _check_against_ref(p, torch.full((2, 1), 7), torch.ones(2).long(), u_a,
                                              torch.tensor([0.3, 0.3]), q)
    assert num_accepted.tolist() == [0, 1]
    assert tokens.tolist() == [[8, -1], [7, 9]]             # the residual max(0, p - q) lives on token 8 only


def test_garbage_past_num_drafts_and_out_of_range_inputs():
    """Entries past n_b are ignored whatever they hold; num_drafts is clamped; an out-of-range draft is rejected."""
    B, K, V = 8, 4, 200
    p, q, drafts, _, u_a, u_s = _random_case(B, K, V, torch.float32, True, seed=10, sharp=0.5)
    drafts = drafts.clone()
    n = torch.tensor([0, 1, 2, 3, 4, -3, 9, 2])
    drafts[0, :] = 10**12
    drafts[1, 1:] = -(10**12)
    drafts[2, 2:] = V
    drafts[7, 1] = V + 1                                  # invalid draft inside n: rejected
    u_a = u_a * 0                                         # would accept every valid draft
    tokens, num_accepted = _check_against_ref(p, drafts, n, u_a, u_s, q)
    assert num_accepted.tolist() == [0, 1, 2, 3, 4, 0, 4, 1]


# ----------------------------------------------------------------------------------------------------------------------
# 2. Statistics: the emitted token at each position follows the target distribution
# ----------------------------------------------------------------------------------------------------------------------


def _dirichlet(g, *shape):
    x = -torch.rand(*shape, 2, generator=g).log().sum(-1)  # Gamma(2) draws normalised: Dirichlet(2, ..., 2)
    return x / x.sum(-1, keepdim=True)


def _stat_inputs(rows_per_group, groups, K, V, with_q, seed):
    """A few fixed (p, q) configurations, each repeated over many rows with fresh drafts and uniforms."""
    g = _gen(seed)
    p_g = _dirichlet(g, groups, K + 1, V)
    q_g = _dirichlet(g, groups, K, V)
    q_g[1] = 0.7 * p_g[1, :K] + 0.3 * q_g[1]             # close to p: long accepted runs
    p_g[2, :, :2] = 0                                    # zeros in p where q has mass, and the reverse
    q_g[2, :, 5:] = 0
    p_g[2] /= p_g[2].sum(-1, keepdim=True)
    q_g[2] /= q_g[2].sum(-1, keepdim=True)
    group = torch.arange(groups).repeat_interleave(rows_per_group)
    B = len(group)
    p, q = p_g[group], q_g[group]
    if with_q:
        drafts = torch.multinomial(q.reshape(-1, V), 1, replacement=True, generator=g).view(B, K)
    else:
        drafts = p[:, :K].argmax(-1)                     # deterministic drafts: any rule that ignores the uniforms
    # Ragged, but half the rows use all K drafts so that the last positions see enough rows.
    n = torch.where(torch.rand(B, generator=g) < 0.5, K, torch.randint(0, K + 1, (B,), generator=g))
    return p, (q if with_q else None), drafts, n, torch.rand(B, K, generator=g), torch.rand(B, generator=g), group


def _accept_wrong(p, drafts, n, u_a, u_s, q=None):
    """A deliberately broken sampler: after a rejection it samples p_j instead of the residual."""
    tokens, j = accept_ref(p, drafts, n, u_a, u_s, q)
    p_j = p[torch.arange(len(j)), j]
    from_p = (p_j.cumsum(-1) <= (u_s * p_j.sum(-1))[:, None]).sum(-1).clamp(max=p.shape[-1] - 1)
    tokens[torch.arange(len(j)), j] = torch.where(j < n, from_p, tokens[torch.arange(len(j)), j])
    return tokens, j


def _chi_square_p_value(p, n, tokens, num_accepted, group, groups):
    """Pearson chi-square summed over (group, position): token at position k, given the row reached k, ~ p_k."""
    K1, V = p.shape[1], p.shape[2]
    stat, dof = 0.0, 0
    for gi in range(groups):
        rows = group == gi
        for k in range(K1):
            reached = rows & (num_accepted >= k) & (n >= k)
            counts = torch.bincount(tokens[reached, k], minlength=V).double()
            p_k = p[rows.nonzero()[0, 0], k].double()
            assert counts[p_k == 0].sum() == 0               # a zero-probability token is never emitted
            expected, order = (counts.sum() * p_k[p_k > 0]).sort()
            counts = counts[p_k > 0][order]
            # The chi-square approximation wants >= 5 expected per cell: pool the rarest tokens into one cell.
            pooled = int((expected.cumsum(0) < 5).sum()) + 1
            expected = torch.cat([expected[:pooled].sum(0, keepdim=True), expected[pooled:]])
            counts = torch.cat([counts[:pooled].sum(0, keepdim=True), counts[pooled:]])
            stat += ((counts - expected) ** 2 / expected).sum().item()
            dof += len(expected) - 1
    return torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                   torch.tensor(stat / 2, dtype=torch.float64)).item()


@pytest.mark.parametrize("with_q", [True, False])
def test_emitted_tokens_follow_the_target_distribution(with_q):
    groups, K, V = 3, 3, 8
    p, q, drafts, n, u_a, u_s, group = _stat_inputs(40_000, groups, K, V, with_q, seed=11)   # 120k rows

    tokens, num_accepted = accept_ref(p, drafts, n, u_a, u_s, q)
    assert _chi_square_p_value(p, n, tokens, num_accepted, group, groups) > 1e-3

    wrong_tokens, wrong_accepted = _accept_wrong(p, drafts, n, u_a, u_s, q)
    assert _chi_square_p_value(p, n, wrong_tokens, wrong_accepted, group, groups) < 1e-6

    # The statistics carry over to the kernel: it agrees token for token on a slice of the same rows.
    rows = torch.cat([torch.arange(gi * 40_000, gi * 40_000 + 40) for gi in range(groups)])
    _check_against_ref(p[rows], drafts[rows], n[rows], u_a[rows], u_s[rows], None if q is None else q[rows])


# ----------------------------------------------------------------------------------------------------------------------
# 3. accept_from_logits(): the fused transform
# ----------------------------------------------------------------------------------------------------------------------


def _transform_loop(row, temperature, top_k, top_p):
    """The sampling transform for one row with Python sorting: an independent check of sampling_probs_ref."""
    V = len(row)
    if temperature == 0:
        out = torch.zeros(V)
        out[max(range(V), key=lambda i: (row[i].item(), -i))] = 1
        return out
    probs = torch.softmax(row.double() / temperature, -1)
    keep = torch.ones(V, dtype=torch.bool)
    if 0 < top_k < V:
        kth = sorted(row.tolist(), reverse=True)[top_k - 1]
        keep = row >= kth
        probs = torch.where(keep, probs, 0) / probs[keep].sum()
    if top_p < 1:
        cum, t = 0.0, None
        for value in sorted(probs.tolist(), reverse=True):
            if cum < top_p:
                t = value
            cum += value
        probs = torch.where(probs >= t, probs, 0)
        probs = probs / probs.sum()
    return probs.float()


def _logits(B, K, V, seed, dtype=torch.float32, with_draft=True):
    g = _gen(seed)
    # Quarter steps make ties, including at the top-k boundary; -inf entries are a masked vocabulary.
    target = (torch.randn(B, K + 1, V, generator=g) * 8).round() / 4
    target[..., V - 3:] = float("-inf")
    draft = target[:, :K] + (torch.randn(B, K, V, generator=g) * 2).round() / 4 if with_draft else None
    drafts = torch.multinomial(torch.softmax(target[:, :K].reshape(-1, V), -1), 1, generator=g).view(B, K)
    n = torch.randint(0, K + 1, (B,), generator=g)
    u_a, u_s = torch.rand(B, K, generator=g), torch.rand(B, generator=g)
    u_s[::4] = ONE_MINUS_ULP                              # the last kept token: tests the edge of the kept set
    return target.to(dtype), None if draft is None else draft.to(dtype), drafts, n, u_a, u_s


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 5, 1.0), (0.7, 0, 0.9), (0.7, 5, 0.9), (1.0, 5, 0.9), (1.3, 40, 0.5)])
def test_transform_ref_matches_sorted_loop(temperature, top_k, top_p):
    target, *_ = _logits(3, 2, 120, seed=12)
    probs = sampling_probs_ref(target, temperature, top_k, top_p)
    for row, row_probs in zip(target.reshape(-1, 120), probs.reshape(-1, 120)):
        expected = _transform_loop(row, temperature, top_k, top_p)
        assert torch.equal(expected > 0, row_probs > 0)
        torch.testing.assert_close(row_probs, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature, top_k, top_p, dtype, with_draft", [
    (0.0, 0, 1.0, torch.float32, True),
    (0.0, 5, 0.9, torch.float16, False),
    (1.0, 0, 1.0, torch.float32, True),
    (1.0, 0, 1.0, torch.float16, False),
    (0.7, 5, 1.0, torch.float32, True),
    (0.7, 0, 0.9, torch.float16, True),
    (0.7, 5, 0.9, torch.float32, True),
    (0.7, 5, 0.9, torch.float32, False),
    (1.0, 1, 1.0, torch.float32, True),                # top-1: only the (tied) maxima survive
    (0.7, 0, 0.05, torch.float32, False),              # the top token alone exceeds top_p
])
def test_accept_from_logits_matches_reference(temperature, top_k, top_p, dtype, with_draft):
    B, K, V = 12, 3, 150
    target, draft, drafts, n, u_a, u_s = _to(*_logits(B, K, V, seed=13, dtype=dtype, with_draft=with_draft))
    tokens, num_accepted = accept_from_logits(target, drafts, n, u_a, u_s, draft, temperature, top_k, top_p)
    tokens_ref, num_accepted_ref = accept_from_logits_ref(target, drafts, n, u_a, u_s, draft,
                                                          temperature, top_k, top_p)
    assert torch.equal(num_accepted.cpu(), num_accepted_ref.cpu())
    assert torch.equal(tokens.cpu(), tokens_ref.cpu())

    # The fused path is the unfused one applied to the transformed probabilities, in torch and in Triton.
    p = sampling_probs_ref(target, temperature, top_k, top_p)
    q = None if draft is None else sampling_probs_ref(draft, temperature, top_k, top_p)
    tokens_unfused, num_accepted_unfused = accept_ref(p, drafts, n, u_a, u_s, q)
    assert torch.equal(tokens_ref, tokens_unfused) and torch.equal(num_accepted_ref, num_accepted_unfused)
    tokens_kernel, _ = accept(p, drafts, n, u_a, u_s, q)
    assert torch.equal(tokens.cpu(), tokens_kernel.cpu())
    _check_invariants(p, n, tokens, num_accepted)
    if temperature == 0 and draft is None:
        greedy = target.float().argmax(-1).cpu()
        assert torch.equal(tokens.cpu()[torch.arange(B), num_accepted.cpu()],
                           greedy[torch.arange(B), num_accepted.cpu()])


@pytest.mark.parametrize("temperature, top_k, top_p, with_draft", [
    (1.0, 0, 1.0, True), (0.7, 5, 0.9, False), (0.7, 0, 0.9, True), (1.3, 40, 0.5, True), (0.0, 5, 0.9, True),
    (1.0, 1, 0.05, True)])
def test_fused_probabilities_at_the_draft(temperature, top_k, top_p, with_draft):
    """Uniforms just below and just above p(d)/q(d) pin the kernel's transformed probabilities to 1e-3."""
    B, K, V = 32, 1, 150
    target, draft, _, _, _, u_s = _logits(B, K, V, seed=17, with_draft=with_draft)
    g = _gen(18)
    p = sampling_probs_ref(target, temperature, top_k, top_p)
    q = None if draft is None else sampling_probs_ref(draft, temperature, top_k, top_p)
    # Half the drafts from the kept set, half anywhere (often outside it, where p(d) = 0).
    kept = torch.multinomial(p[:, 0], 1, generator=g)
    anywhere = torch.randint(0, V, (B, 1), generator=g)
    drafts = torch.where(torch.arange(B)[:, None] % 2 == 0, kept, anywhere)
    p_d = p[:, 0].gather(1, drafts)[:, 0]
    q_d = torch.ones(B) if q is None else q[:, 0].gather(1, drafts)[:, 0]
    ratio = torch.where(q_d > 0, p_d / q_d.clamp_min(1e-30), 2.0)
    side = torch.where(torch.arange(B) % 4 < 2, 1 - 1e-3, 1 + 1e-3)
    u_a = (ratio * side).clamp(max=1 - 1e-3)[:, None]
    expected = (u_a[:, 0] * q_d < p_d).long()
    n = torch.ones(B, dtype=torch.long)
    args = _to(target, drafts, n, u_a, u_s, draft)
    tokens, num_accepted = accept_from_logits(*args, temperature, top_k, top_p)
    assert torch.equal(num_accepted.cpu(), expected)
    assert 0 < expected.sum() < B
    tokens_ref, _ = accept_from_logits_ref(*args, temperature, top_k, top_p)
    assert torch.equal(tokens.cpu(), tokens_ref.cpu())


def test_top_k_is_exact_on_adjacent_floats_and_signed_zeros():
    """Logits one ulp apart (every probe of the search lands on a token) and -0.0 == +0.0 at the boundary."""
    V, B = 200, 4
    g = _gen(19)
    bits = torch.tensor(1.0).view(torch.int32) + torch.randperm(V, generator=g).int()
    target = bits.view(torch.float32).repeat(B, 2, 1)             # (B, 2, V), distinct adjacent floats
    u_s = torch.tensor([0.0, 0.3, 0.7, ONE_MINUS_ULP])
    args = (torch.zeros(B, 1).long(), torch.zeros(B).long(), torch.zeros(B, 1), u_s)
    tokens, _ = accept_from_logits(*_to(target, *args), None, 1.0, 7, 1.0, block_v=64)
    top7 = target[0, 0].topk(7).indices.sort().values
    assert torch.equal(tokens[:, 0].cpu(), top7[[0, 2, 4, 6]])            # the 7 kept tokens split evenly
    tokens_ref, _ = accept_from_logits_ref(target, *args, None, 1.0, 7, 1.0)
    assert torch.equal(tokens.cpu(), tokens_ref)

    zeros = torch.tensor([2.0, 1.0, 0.0, -1.0, -0.0, -3.0]).repeat(B, 2, 1)
    tokens, _ = accept_from_logits(*_to(zeros, *args), None, 1.0, 3, 1.0)
    assert tokens[:, 0].tolist() == [0, 0, 1, 4]                   # -0.0 (index 4) ties with 0.0: kept


def test_greedy_ties_across_blocks_pick_the_lowest_index():
    V, B, K = 300, 3, 2
    target = torch.randn(B, K + 1, V, generator=_gen(20))
    target[..., [290, 70, 200]] = 9.0                    # tied maxima in blocks 4, 1 and 3 of 64
    drafts = torch.tensor([[70, 70], [290, 70], [70, 200]])
    n = torch.full((B,), K)
    args = _to(target, drafts, n, torch.rand(B, K, generator=_gen(21)), torch.rand(B, generator=_gen(22)))
    tokens, num_accepted = accept_from_logits(*args, None, 0.0, block_v=64)
    assert tokens.tolist() == [[70, 70, 70], [70, -1, -1], [70, 70, -1]]
    assert num_accepted.tolist() == [2, 0, 1]


def test_accept_from_logits_multiple_blocks_and_k0():
    B, K, V = 4, 2, 300
    target, draft, drafts, n, u_a, u_s = _to(*_logits(B, K, V, seed=14))
    for args in [(target, drafts, n, u_a, u_s, draft), (target[:, :1], drafts[:, :0], n * 0, u_a[:, :0], u_s, None)]:
        tokens, num_accepted = accept_from_logits(*args, 0.8, 7, 0.8, block_v=64)
        tokens_ref, num_accepted_ref = accept_from_logits_ref(*args, 0.8, 7, 0.8)
        assert torch.equal(tokens.cpu(), tokens_ref.cpu()) and torch.equal(num_accepted.cpu(), num_accepted_ref.cpu())


# ----------------------------------------------------------------------------------------------------------------------
# 4. Invalid rows: a value the rule reads is not finite
# ----------------------------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


def _assert_invalid_rows(tokens, num_accepted, invalid):
    invalid = torch.tensor(invalid)
    assert torch.equal(num_accepted < 0, invalid)
    assert (tokens[invalid] == -1).all() and (num_accepted[invalid] == -1).all()
    assert (tokens[~invalid] >= -1).all() and (num_accepted[~invalid] >= 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rows_reading_non_finite_probabilities_are_invalid(dtype):
    """Every row has K = 3 drafts and u_accept = 0, so a finite row accepts each draft with p_k(d_k) > 0.
    Each row plants one non-finite value; the row is invalid iff the rule reads it."""
    B, K, V = 10, 3, 50
    g = _gen(30)
    p = torch.softmax(torch.randn(B, K + 1, V, generator=g), -1)
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    drafts = torch.randint(0, V, (B, K), generator=g)
    other = (drafts + 1) % V
    n = torch.full((B,), K)
    u_a, u_s = torch.zeros(B, K), torch.rand(B, generator=g)
    p[0, 0, other[0, 0]] = NAN          # accepted row 0, only p_0(d_0) read: valid
    p[1, K, 7] = NAN                    # the bonus row, read in full: invalid
    p[2, 1, drafts[2, 1]] = INF         # p_1(d_1) = inf stops the run at 1, then p_1 is read: invalid
    p[3, 2, drafts[3, 2]] = 0.0         # rejected at 2 ...
    p[3, 2, 11] = -INF                  # ... and p_2 is read in full: invalid
    q[4, 1, drafts[4, 1]] = NAN         # q_1(d_1) = NaN stops the run at 1, and q_1 is read: invalid
    q[5, 2, other[5, 2]] = INF          # all accepted: q_2 past the bonus position is not read: valid
    p[6, 0, drafts[6, 0]] = 0.0         # rejected at 0 ...
    p[6, 2, 3] = NAN                    # ... so p_2 is never read: valid
    n[7] = 1
    p[7, 2, 5] = INF                    # past n_7 = 1: valid
    p[8, 1] = NAN                       # a whole row of NaN at the bonus position of n_8 = 1: invalid
    n[8] = 1
    p, q = p.to(dtype), q.to(dtype)
    tokens, num_accepted = _check_against_ref(p, drafts, n, u_a, u_s, q)
    _assert_invalid_rows(tokens, num_accepted, [False, True, True, True, True, False, False, False, True, False])
    assert num_accepted[[0, 5, 9]].tolist() == [K, K, K] and num_accepted[[6, 7]].tolist() == [0, 1]

    # Without q the same rows, except those planted in q, which are now finite and accept everything.
    tokens, num_accepted = _check_against_ref(p, drafts, n, u_a, u_s)
    _assert_invalid_rows(tokens, num_accepted, [False, True, True, True, False, False, False, False, True, False])

    # Valid rows are unaffected by the invalid ones: the same rows alone give the same outputs.
    valid = num_accepted >= 0
    alone, alone_j = _check_against_ref(p[valid], drafts[valid], n[valid], u_a[valid], u_s[valid])
    assert torch.equal(alone, tokens[valid]) and torch.equal(alone_j, num_accepted[valid])


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 5, 0.9), (0.0, 0, 1.0)])
def test_rows_transforming_nan_or_inf_logits_are_invalid(temperature, top_k, top_p):
    """Target row k and draft row k are transformed before draft k is tested; the row stops at the first one
    holding NaN or +inf. -inf only masks a token."""
    B, K, V = 8, 2, 60
    g = _gen(31)
    target = torch.randn(B, K + 1, V, generator=g) * 2
    draft = target[:, :K] + 0.1 * torch.randn(B, K, V, generator=g)
    drafts = target[:, :K].argmax(-1)              # the argmax of each target row: accepted at u = 0
    n = torch.full((B,), K)
    u_a, u_s = torch.zeros(B, K), torch.rand(B, generator=g)
    target[0, 0, 3] = NAN                           # the first transformed row: invalid
    target[1, K, 3] = INF                           # the bonus row: invalid
    draft[2, 1, 3] = NAN                            # draft row 1, transformed to test draft 1: invalid
    target[3, :, :V // 2] = -INF                    # masked tokens: valid
    target[4, 1, 9] = NAN                           # rejected at 0 (p(d_0) = 0), row 1 never transformed: valid
    target[4, 0, drafts[4, 0]] = -INF
    target[5] = -INF                                # no mass anywhere: valid, emits index 0
    draft[6, 0, 0] = INF                            # invalid
    args = _to(target, drafts, n, u_a, u_s, draft)
    tokens, num_accepted = accept_from_logits(*args, temperature, top_k, top_p)
    tokens_ref, num_accepted_ref = accept_from_logits_ref(*args, temperature, top_k, top_p)
    assert torch.equal(tokens.cpu(), tokens_ref.cpu()) and torch.equal(num_accepted.cpu(), num_accepted_ref.cpu())
    _assert_invalid_rows(tokens.cpu(), num_accepted.cpu(), [True, True, True, False, False, False, True, False])
    assert num_accepted[4] == 0 and tokens[5, num_accepted[5]] == 0

    # Deterministic drafts: the draft logits are not read, so rows 2 and 6 are valid.
    tokens, num_accepted = accept_from_logits(*args[:5], None, temperature, top_k, top_p)
    tokens_ref, num_accepted_ref = accept_from_logits_ref(*args[:5], None, temperature, top_k, top_p)
    assert torch.equal(tokens.cpu(), tokens_ref.cpu()) and torch.equal(num_accepted.cpu(), num_accepted_ref.cpu())
    _assert_invalid_rows(tokens.cpu(), num_accepted.cpu(), [True, True, False, False, False, False, False, False])


# ----------------------------------------------------------------------------------------------------------------------
# 5. The flattened form: drafts of all rows concatenated, cumulative counts
# ----------------------------------------------------------------------------------------------------------------------


def _flatten(p, q, drafts, n, u_a):
    """The padded inputs in the flattened form: row b contributes n_b + 1 target rows and n_b draft entries."""
    n = n.long().clamp(0, drafts.shape[1])
    cu = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)])
    take = lambda x, extra: torch.cat([x[b, : int(n[b]) + extra] for b in range(len(n))])  # noqa: E731
    return take(p, 1), None if q is None else take(q, 0), take(drafts, 0), cu, take(u_a, 0)


def _assert_flat_matches_padded(flat, padded, n, cu):
    tokens_f, j_f = (x.cpu() for x in flat)
    tokens_p, j_p = (x.cpu() for x in padded)
    assert torch.equal(j_f, j_p)
    for b in range(len(n)):
        nb, start = int(n[b]), int(cu[b]) + b
        assert torch.equal(tokens_f[start: start + nb + 1], tokens_p[b, : nb + 1])
        assert (tokens_p[b, nb + 1:] == -1).all()
    assert tokens_f.shape == (int(cu[-1]) + len(n),)


@pytest.mark.parametrize("B, K, V, dtype, with_q", [
    (9, 4, 300, torch.float32, True),
    (9, 4, 300, torch.float16, False),
    (5, 40, 37, torch.float32, True),       # rows of up to 40 drafts: two chunks of 32 accept tests
    (4, 3, 50, torch.float32, False),
])
def test_flattened_form_equals_padded_form_row_by_row(B, K, V, dtype, with_q):
    p, q, drafts, n, u_a, u_s = _random_case(B, K, V, dtype, with_q, seed=40 + K, sharp=2.0)
    if K > 32:
        n[:2] = torch.tensor([K, 35])
        u_a = u_a * 0.01                                # long runs of accepts, past the first chunk
    n[0] = 0 if K < 32 else n[0]
    p[1, 0, 5] = NAN                                    # an invalid row (read in full unless drafts are accepted)
    p_f, q_f, d_f, cu, ua_f = _flatten(p, q, drafts, n, u_a)
    padded = _check_against_ref(p, drafts, n, u_a, u_s, q)
    flat = accept(*_to(p_f, d_f, cu, ua_f, u_s), None if q_f is None else q_f.to(DEVICE))
    _assert_flat_matches_padded(flat, padded, n, cu)
    flat_ref = accept_ref(p_f, d_f, cu, ua_f, u_s, q_f)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(flat, flat_ref))
    if K > 32:
        assert padded[1].max() > 32

    cu32 = cu.int()                                     # int32 offsets and int32 drafts work the same
    flat32 = accept(*_to(p_f, d_f.int(), cu32, ua_f, u_s), None if q_f is None else q_f.to(DEVICE))
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(flat32, flat))


@pytest.mark.parametrize("temperature, top_k, top_p, with_draft", [
    (1.0, 0, 1.0, True), (0.7, 5, 0.9, False), (0.0, 0, 1.0, True), (0.8, 7, 0.8, True)])
def test_flattened_logits_equal_padded_row_by_row(temperature, top_k, top_p, with_draft):
    B, K, V = 7, 3, 150
    target, draft, drafts, n, u_a, u_s = _logits(B, K, V, seed=41, with_draft=with_draft)
    target[2, 0, 0] = NAN
    t_f, q_f, d_f, cu, ua_f = _flatten(target, draft, drafts, n, u_a)
    padded = accept_from_logits(*_to(target, drafts, n, u_a, u_s), None if draft is None else draft.to(DEVICE),
                                temperature, top_k, top_p)
    flat = accept_from_logits(*_to(t_f, d_f, cu, ua_f, u_s), None if q_f is None else q_f.to(DEVICE),
                              temperature, top_k, top_p)
    _assert_flat_matches_padded(flat, padded, n, cu)
    flat_ref = accept_from_logits_ref(t_f, d_f, cu, ua_f, u_s, q_f, temperature, top_k, top_p)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(flat, flat_ref))
    assert padded[1][2] == -1


def test_flattened_form_without_drafts():
    """T = 0: every row verifies nothing and emits one token from its only target row."""
    B, V = 4, 90
    p = torch.softmax(torch.randn(B, V, generator=_gen(42)), -1)
    u_s = torch.rand(B, generator=_gen(43))
    args = (p, torch.zeros(0, dtype=torch.long), torch.zeros(B + 1, dtype=torch.long), torch.zeros(0), u_s)
    tokens, num_accepted = accept(*_to(*args))
    tokens_ref, num_accepted_ref = accept_ref(*args)
    padded, _ = accept_ref(p[:, None], torch.zeros(B, 0).long(), torch.zeros(B).long(), torch.zeros(B, 0), u_s)
    assert torch.equal(tokens.cpu(), tokens_ref) and torch.equal(tokens_ref, padded[:, 0])
    assert (num_accepted.cpu() == 0).all() and torch.equal(num_accepted.cpu(), num_accepted_ref)


def test_flattened_offsets_are_checked_unless_told_not_to():
    B, V = 3, 40
    p = torch.softmax(torch.randn(4 + B, V, generator=_gen(44)), -1)
    drafts, u_a, u_s = torch.randint(0, V, (4,), generator=_gen(45)), torch.rand(4), torch.rand(B)
    for cu, message in [([1, 2, 3, 4], "got first 1 and last 4"), ([0, 3, 2, 4], "it decreases after row 1"),
                        ([0, 1, 2, 3], "end at T = 4")]:
        with pytest.raises(ValueError, match="cu_num_drafts must start at 0, never decrease and end at T = 4"):
            accept(*_to(p, drafts, torch.tensor(cu), u_a, u_s))
        with pytest.raises(ValueError, match=message):
            accept_from_logits(*_to(p, drafts, torch.tensor(cu), u_a, u_s))
    # Unchecked, malformed offsets are clamped into [0, T]: the outputs stay in range, nothing is read out of bounds.
    tokens, num_accepted = accept(*_to(p, drafts, torch.tensor([2, 9, -5, 3]), u_a, u_s), check_values=False)
    assert ((tokens.cpu() >= -1) & (tokens.cpu() < V)).all() and ((num_accepted >= 0) & (num_accepted <= 4)).all()


# ----------------------------------------------------------------------------------------------------------------------
# 6. Launcher errors
# ----------------------------------------------------------------------------------------------------------------------


def _good(B=2, K=2, V=16):
    p, q, drafts, n, u_a, u_s = _to(*_random_case(B, K, V, torch.float32, True, seed=0))
    return dict(p=p, draft_tokens=drafts, num_drafts=n, u_accept=u_a, u_sample=u_s, q=q)


@pytest.mark.parametrize("change, error, message", [
    (dict(p=torch.rand(2, 3, 1, 16)), ValueError, r"p must have shape \(B, K\+1, V\).*got \(2, 3, 1, 16\)"),
    (dict(p=torch.rand(4, 16)), ValueError, r"draft_tokens must have shape \(T,\) in the flattened form"),
    (dict(p=torch.ones(2, 3, 16).long()), TypeError, "p must be float32, float16 or bfloat16, got torch.int64"),
    (dict(p=torch.rand(2, 16, 3).transpose(1, 2)), ValueError, "p must be contiguous in its last"),
    (dict(p=[[0.5]]), TypeError, "p must be a torch.Tensor, got list"),
    (dict(q=torch.rand(2, 2, 17)), ValueError, r"q must have shape \(2, 2, 16\), got \(2, 2, 17\)"),
    (dict(q=torch.rand(2, 2, 16).double()), TypeError, "q must be float32, float16 or bfloat16, got torch.float64"),
    (dict(draft_tokens=torch.zeros(2, 3).long()), ValueError, r"draft_tokens must have shape \(2, 2\), got \(2, 3\)"),
    (dict(draft_tokens=torch.zeros(2, 2)), TypeError, "draft_tokens must be int32 or int64, got torch.float32"),
    (dict(num_drafts=torch.zeros(2, 1).long()), ValueError, r"num_drafts must have shape \(2,\), got \(2, 1\)"),
    (dict(u_accept=torch.rand(2, 2).double()), TypeError, "u_accept must be float32, got torch.float64"),
    (dict(u_sample=torch.rand(3)), ValueError, r"u_sample must have shape \(2,\), got \(3,\)"),
    (dict(u_sample=torch.rand(2, device="meta")), ValueError, "u_sample must be on .* like p, got meta"),
])
def test_accept_rejects_bad_inputs(change, error, message):
    kwargs = _good()
    kwargs.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
                   for k, v in change.items()})
    with pytest.raises(error, match=message):
        accept(**kwargs)


@pytest.mark.parametrize("change, message", [
    (dict(temperature=-0.5), "temperature must be a finite number >= 0, got -0.5"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_k=2.5), "top_k must be an int >= 0"),
    (dict(top_k=-1), "top_k must be an int >= 0"),
    (dict(top_p=0.0), r"top_p must be a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be a number in \(0, 1\]"),
    (dict(block_v=100), "block_v must be a power of two >= 16, got 100"),
])
def test_accept_from_logits_rejects_bad_options(change, message):
    g = _good()
    kwargs = dict(target_logits=g["p"], draft_tokens=g["draft_tokens"], num_drafts=g["num_drafts"],
                  u_accept=g["u_accept"], u_sample=g["u_sample"], draft_logits=g["q"])
    kwargs.update(change)
    with pytest.raises(ValueError, match=message):
        accept_from_logits(**kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# GPU only: bf16 (the interpreter has no bf16) and the benchmark shape
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_benchmark_shape_matches_reference(dtype):
    p, q, drafts, n, u_a, u_s = _random_case(64, 6, 32000, dtype, True, seed=15)
    _check_against_ref(p, drafts, n, u_a, u_s, q)
    _check_against_ref(p, drafts, n, u_a, u_s, None)
    target, draft, drafts, n, u_a, u_s = _to(*_logits(64, 6, 32000, seed=16, dtype=dtype))
    tokens, num_accepted = accept_from_logits(target, drafts, n, u_a, u_s, draft, 0.8, 50, 0.9)
    tokens_ref, num_accepted_ref = accept_from_logits_ref(target, drafts, n, u_a, u_s, draft, 0.8, 50, 0.9)
    # Softmax rounding differs between torch and the kernel; allow a rare boundary flip, not a systematic one.
    assert (tokens != tokens_ref).any(-1).sum() <= 1
