"""kernels/tree_acceptance.py: the Triton tree verification kernel against its torch reference, the reference against
a plain per-row loop, the emitted sequences against their exact distribution (G-test), and the launcher's errors.

Without a GPU the kernel runs under the Triton interpreter (numpy), so shapes stay small."""

import os
import random

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from minipass.kernels.tree_acceptance import accept_tree, accept_tree_ref  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ONE_MINUS_ULP = 1.0 - 2.0**-24  # the largest float32 below 1


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _to(*tensors):
    return [t.to(DEVICE) for t in tensors]


def _random_trees(B, N, max_depth, p, seed, empty_rows=(), dup=0.2, wild=0.08):
    """Random trees (B, N+1) with interleaved padding, several children per node and depths up to max_depth.

    A node's token is usually drawn from its parent's target (so paths get accepted), sometimes a copy of an earlier
    sibling's token (a duplicate, rejected whenever the first one is), sometimes out of [0, V)."""
    rng = random.Random(seed)
    V = p.shape[-1]
    parents = torch.full((B, N + 1), -1, dtype=torch.long)
    tokens = torch.full((B, N + 1), 123456, dtype=torch.long)  # garbage at the root and in padding: never read
    g = _gen(seed)
    for b in range(B):
        depth = {0: 0}
        children = {0: []}
        for i in range(1, N + 1):
            if b in empty_rows or rng.random() < 0.15:
                continue                                            # padding
            open_nodes = [a for a in depth if depth[a] < max_depth]
            # Half the time extend the newest open node, so chains reach every depth up to max_depth.
            a = open_nodes[-1] if rng.random() < 0.5 else rng.choice(open_nodes)
            parents[b, i] = a
            depth[i], children[i] = depth[a] + 1, []
            roll = rng.random()
            if roll < dup and children[a]:
                tokens[b, i] = tokens[b, rng.choice(children[a])]
            elif roll < dup + wild:
                tokens[b, i] = rng.choice([V, V + 7, -1, -(10**12), 10**12])
            else:
                tokens[b, i] = torch.multinomial(p[b, a].float(), 1, generator=g).item()
            children[a].append(i)
    return tokens, parents


def _check_against_ref(p, tokens, parents, u_accept, u_sample, **kw):
    p, tokens, parents, u_accept, u_sample = _to(p, tokens, parents, u_accept, u_sample)
    out, path, num_accepted = accept_tree(p, tokens, parents, u_accept, u_sample, **kw)
    out_ref, path_ref, num_accepted_ref = accept_tree_ref(p, tokens, parents, u_accept, u_sample)
    assert torch.equal(num_accepted.cpu(), num_accepted_ref.cpu())
    assert torch.equal(path.cpu(), path_ref.cpu())
    assert torch.equal(out.cpu(), out_ref.cpu())
    _check_invariants(p, tokens, parents, out, path, num_accepted)
    return out.cpu(), path.cpu(), num_accepted.cpu()


def _check_invariants(p, tokens, parents, out, path, num_accepted):
    """The path is a chain of parent links from the root with its tokens in out_tokens; the emitted token is in
    range, has mass, and is none of the last node's children's tokens (all of them were tried and rejected)."""
    p, tokens, parents = p.float().cpu(), tokens.cpu(), parents.cpu()
    out, path, num_accepted = out.cpu(), path.cpu(), num_accepted.cpu()
    B, N1, V = p.shape
    for b in range(B):
        j = num_accepted[b].item()
        if j == -1:                                               # an invalid row
            assert (out[b] == -1).all() and (path[b] == -1).all()
            continue
        cur = 0
        for k in range(j):
            node = path[b, k].item()
            assert parents[b, node] == cur and out[b, k] == tokens[b, node]
            cur = node
        assert (path[b, j:] == -1).all() and (out[b, j + 1:] == -1).all()
        emitted = out[b, j].item()
        assert 0 <= emitted < V
        kids = [i for i in range(cur + 1, N1) if parents[b, i] == cur]
        kid_tokens = [t for t in tokens[b, kids].tolist() if 0 <= t < V]
        residual = p[b, cur].clamp_min(0)
        residual[kid_tokens] = 0
        if residual.sum() > 0:
            assert emitted not in kid_tokens and residual[emitted] > 0


def _case(B, N, depth, V, dtype, seed, sharp=None, empty_rows=()):
    """Random targets (flat to peaked: the sharpness cycles over rows unless given), trees and uniforms."""
    g = _gen(seed)
    sharp = torch.tensor([3.0, 6.0, 12.0]).repeat(B)[:B, None, None] if sharp is None else sharp
    p = torch.softmax(torch.randn(B, N + 1, V, generator=g) * sharp, -1).to(dtype)
    tokens, parents = _random_trees(B, N, depth, p, seed, empty_rows)
    # Accept uniforms skewed towards 0 so that paths go deep: agreeing token for token needs no uniformity.
    return p, tokens, parents, torch.rand(B, N + 1, generator=g) ** 3, torch.rand(B, generator=g)


# ----------------------------------------------------------------------------------------------------------------------
# 1. accept_tree() against accept_tree_ref(), token for token
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("B, N, depth, V, dtype, block_v", [
    (6, 1, 1, 1000, torch.float32, None),
    (8, 7, 3, 1000, torch.float16, 128),       # 8 blocks of 128, the last one partial
    (6, 13, 6, 4099, torch.float32, None),     # a 4096 block and a 3-token tail
    (8, 30, 4, 1000, torch.float32, 256),
    (6, 30, 6, 4099, torch.float16, None),
    (8, 13, 2, 37, torch.float32, 16),
])
def test_matches_reference(B, N, depth, V, dtype, block_v):
    p, tokens, parents, u_a, u_s = _case(B, N, depth, V, dtype, seed=N + depth + V, empty_rows=(1,))
    out, path, num_accepted = _check_against_ref(p, tokens, parents, u_a, u_s, block_v=block_v)
    assert num_accepted[1] == 0 and (path[1] == -1).all()            # the empty tree emits one token from p[0]
    assert num_accepted.max() >= min(depth, 2)                     # the case exercises accepted paths
    if N >= 13:                                                    # ... and the awkward trees
        real = parents >= 0
        assert (real & ((tokens < 0) | (tokens >= V))).any()
        siblings = real[:, :, None] & (parents[:, :, None] == parents[:, None, :]) & ~torch.eye(N + 1, dtype=bool)
        assert (siblings & (tokens[:, :, None] == tokens[:, None, :])).any()
        assert (torch.stack([torch.bincount(r[r >= 0], minlength=N + 1) for r in parents]) >= 3).any()


def test_no_tree_budget():
    """N = 0: only the root; every row emits one token from p[0]."""
    p, tokens, parents, u_a, u_s = _case(5, 0, 1, 300, torch.float32, seed=1)
    out, path, num_accepted = _check_against_ref(p, tokens, parents, u_a, u_s, block_v=64)
    assert out.shape == (5, 1) and path.shape == (5, 0) and (num_accepted == 0).all()


def test_strided_int32_inputs():
    B, N, V = 5, 9, 300
    p, tokens, parents, u_a, u_s = _case(2 * B, N, 3, V + 5, torch.float32, seed=2)
    p = p[::2, :, :V]                                         # strides that are not (N+1)*V and V
    tokens = tokens[::2].clamp(-1, V + 1).int().t().contiguous().t()       # column-major int32
    parents = parents[::2].int().t().contiguous().t()
    u_a, u_s = u_a[::2].t().contiguous().t(), u_s[::2]
    assert not p.is_contiguous() and not tokens.is_contiguous() and not u_a.is_contiguous()
    _check_against_ref(p, tokens, parents, u_a, u_s, block_v=64)


def test_greedy_one_hot_follows_the_argmax():
    """One-hot targets: the path follows the first child whose token is the argmax, the emitted token is the argmax
    of the last accepted node, whatever the uniforms."""
    B, N, V = 8, 13, 500
    g = _gen(3)
    target = torch.randint(0, V, (B, N + 1), generator=g)
    p = torch.nn.functional.one_hot(target, V).float()
    tokens, parents = _random_trees(B, N, 4, p, seed=3, dup=0.3, wild=0.1)
    # Half the candidates are wrong, so paths stop at every depth.
    wrong = (torch.rand(B, N + 1, generator=g) < 0.5) & (tokens >= 0) & (tokens < V)
    tokens = torch.where(wrong, (tokens + 1) % V, tokens)
    u_a, u_s = torch.rand(B, N + 1, generator=g), torch.rand(B, generator=g)
    out, path, num_accepted = _check_against_ref(p, tokens, parents, u_a, u_s, block_v=128)
    for b in range(B):
        cur, expected_path = 0, []
        while True:
            hit = [i for i in range(cur + 1, N + 1) if parents[b, i] == cur and tokens[b, i] == target[b, cur]]
            if not hit:
                break
            cur = hit[0]
            expected_path.append(cur)
        assert path[b, :num_accepted[b]].tolist() == expected_path
        assert out[b, num_accepted[b]] == target[b, cur]
    assert num_accepted.max() >= 2 and (num_accepted == 0).any()


def test_duplicate_siblings_and_out_of_range_tokens():
    """A sibling repeating a rejected token is rejected too (u = 0 would accept anything with mass); out-of-range
    candidates are rejected; the emitted token avoids every rejected token."""
    V = 64
    p = torch.zeros(3, 6, V)
    p[:, 0, [3, 9, 20]] = torch.tensor([0.5, 0.25, 0.25])
    p[:, 1:] = 1.0 / V
    parents = torch.tensor([[-1, 0, 0, 0, 0, 0]] * 3)
    tokens = torch.tensor([[0, 3, 3, 9, 20, 7],           # 3 rejected, its duplicate too, 9 accepted
                           [0, V, -1, 10**12, 9, 3],       # out of range x3, then 9 accepted
                           [0, 3, 3, 9, 9, 20]])           # 3, 3, 9, 9 rejected (u = 1); 20 accepted
    u_a = torch.tensor([[0.0, ONE_MINUS_ULP, 0.0, 0.0, 0.0, 0.0],
                        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                        [0.0, ONE_MINUS_ULP, 0.0, ONE_MINUS_ULP, 0.0, ONE_MINUS_ULP]])
    u_s = torch.tensor([0.5, 0.5, 0.5])
    out, path, num_accepted = _check_against_ref(p, tokens, parents, u_a, u_s, block_v=16)
    assert path[:, 0].tolist() == [3, 4, 5]
    assert out[:, 0].tolist() == [9, 9, 20]

    # All children rejected: the emitted token is sampled from p[0] without 3 and 9, i.e. always 20.
    u_a[:, 1:] = ONE_MINUS_ULP
    tokens[2, 5] = 3
    out, path, num_accepted = _check_against_ref(p[2:].repeat(4, 1, 1), tokens[2:].repeat(4, 1),
                                                 parents[2:].repeat(4, 1), u_a[2:].repeat(4, 1),
                                                 torch.tensor([0.0, 0.3, 0.7, ONE_MINUS_ULP]), block_v=16)
    assert (num_accepted == 0).all() and (out[:, 0] == 20).all()


def test_rows_without_mass():
    """All-zero targets accept nothing and emit index 0; a zero target below an accepted node emits 0; children that
    hold all the mass, all rejected (u = 1, outside the contract), leave P' empty: sample p[cur] itself."""
    B, N, V = 4, 5, 200
    p, tokens, parents, u_a, u_s = _case(B, N, 2, V, torch.float32, seed=4)
    parents[:] = torch.tensor([-1, 0, 1, 0, 3, 0])
    p[0] = 0
    p[1, 1] = 0
    tokens[1, 1] = p[1, 0].argmax()
    u_a[1, 1] = 0.0                                       # node 1 is accepted; p[1, 1] is all zero
    p[2, 0] = 0
    p[2, 0, [17, 150]] = torch.tensor([0.375, 0.625])
    tokens[2, [1, 3, 5]] = torch.tensor([150, 17, 150])
    u_a[2] = 1.0
    out, path, num_accepted = _check_against_ref(p, tokens, parents, u_a, u_s, block_v=64)
    assert num_accepted[:3].tolist() == [0, 1, 0]
    assert out[0, 0] == 0 and out[1, 1] == 0
    assert out[2, 0] == (17 if u_s[2] * 1.0 < 0.375 else 150)


def test_uniform_edges():
    """Exact binary fractions, so the expected tokens are known without rounding: u_sample at 0, on a cumsum step
    (the inverse CDF is strict: cumsum > u * mass), inside steps and just below 1 over a zero-mass head, gaps and
    tail; u_accept * mass == P'(t) rejects (the accept test is strict too)."""
    V = 1000
    p = torch.zeros(8, 2, V)
    p[:, 0, [3, 10, 500, 997]] = 0.25
    p[:, 1, 42] = 1.0
    parents = torch.tensor([[-1, 0]] * 8)
    tokens = torch.tensor([[0, 10]] * 6 + [[0, V]] * 2)           # the last two rows: an out-of-range candidate
    u_a = torch.tensor([[0.0, 0.5]] * 4 + [[0.0, 0.25], [0.0, 0.2499999], [0.0, 0.0], [0.0, 0.0]])
    u_s = torch.tensor([0.0, 0.5, 0.75, ONE_MINUS_ULP, 0.5, 0.5, 0.5, 0.25])
    out, _, num_accepted = _check_against_ref(p, tokens, parents, u_a, u_s, block_v=256)
    # Rows 0-4: token 10 rejected, P' = 0.25 on each of {3, 500, 997}. Rows 6-7: P' = p[0], u * mass on a step.
    assert out[[0, 1, 2, 3, 4, 6, 7], 0].tolist() == [3, 500, 997, 997, 500, 500, 10]
    assert num_accepted.tolist() == [0, 0, 0, 0, 0, 1, 0, 0] and out[5].tolist() == [10, 42]


def test_rows_visiting_non_finite_targets_are_invalid():
    """One tree for all rows: root -> 1 -> 2 -> 3, root -> 4. u_accept = 0 accepts every candidate with mass, so a
    finite row walks to node 3. Each row plants one non-finite value; the row is invalid iff the walk visits it."""
    B, V = 8, 30
    parents = torch.tensor([[-1, 0, 1, 2, 0]] * B)
    p = torch.softmax(torch.randn(B, 5, V, generator=_gen(50)), -1)
    tokens = torch.tensor([[0, 4, 5, 6, 7]] * B)
    u_a, u_s = torch.zeros(B, 5), torch.rand(B, generator=_gen(51))
    p[0, 0, 9] = float("nan")                                     # the root: invalid
    p[1, 2, 1] = float("inf")                                     # node 2, on the path: invalid
    p[2, 3, 0] = -float("inf")                                    # node 3, the leaf where the walk ends: invalid
    p[3, 4, 2] = float("nan")                                     # node 4 is never reached: valid
    p[4, 1, 5] = 0.0                                              # node 2 rejected, the walk ends at node 1 ...
    p[4, 2, 8] = float("nan")                                     # ... and never visits node 2: valid
    p[5, 0] = float("nan")                                        # a whole row: invalid
    tokens[6, 1] = V + 3                                          # root's first child out of range ...
    p[6, 1, 3] = float("nan")                                     # ... so node 1's row is not visited: valid
    for dtype in (torch.float32, torch.float16):
        out, path, num_accepted = _check_against_ref(p.to(dtype), tokens, parents, u_a, u_s)
        assert (num_accepted == -1).tolist() == [True, True, True, False, False, True, False, False]
        assert num_accepted[[3, 4, 6, 7]].tolist() == [3, 1, 1, 3]  # row 6 takes node 4 after node 1 is rejected
        assert (out[num_accepted == -1] == -1).all() and (path[num_accepted == -1] == -1).all()


# ----------------------------------------------------------------------------------------------------------------------
# 2. The reference against a plain per-row loop of the rule
# ----------------------------------------------------------------------------------------------------------------------


def _accept_tree_loop(p, tokens, parents, u_accept, u_sample):
    """The rule for one row at a time, in float64 Python arithmetic: an independent check of accept_tree_ref."""
    B, N1, V = p.shape
    out = torch.full((B, N1), -1, dtype=torch.long)
    path = torch.full((B, N1 - 1), -1, dtype=torch.long)
    num_accepted = torch.zeros(B, dtype=torch.long)
    for b in range(B):
        row_p = [[max(float(x), 0.0) for x in p[b, i].tolist()] for i in range(N1)]
        cur, accepted = 0, []
        P = list(row_p[0])
        mass = sum(P)
        while True:
            nxt = None
            for c in range(cur + 1, N1):
                t = int(tokens[b, c])
                if int(parents[b, c]) != cur or not 0 <= t < V:
                    continue
                if P[t] > 0 and float(u_accept[b, c]) * mass < P[t]:
                    nxt = c
                    break
                mass = max(mass - P[t], 0.0)
                P[t] = 0.0
            if nxt is None:
                break
            accepted.append(nxt)
            cur = nxt
            P = list(row_p[cur])
            mass = sum(P)
        x = P if sum(P) > 0 else row_p[cur]
        total = sum(x)
        if total > 0:
            cum, tok = 0.0, max(v for v in range(V) if x[v] > 0)
            for v in range(V):
                cum += x[v]
                if x[v] > 0 and cum > float(u_sample[b]) * total:
                    tok = v
                    break
        else:
            raw = p[b, cur].tolist()
            tok = raw.index(max(raw))
        j = len(accepted)
        num_accepted[b] = j
        path[b, :j] = torch.tensor(accepted, dtype=torch.long)
        out[b, :j] = tokens[b, accepted]
        out[b, j] = tok
    return out, path, num_accepted


@pytest.mark.parametrize("N, depth, V, sharp", [(7, 3, 50, 2.0), (13, 6, 20, 1.0), (30, 4, 11, 0.5)])
def test_reference_matches_plain_loop(N, depth, V, sharp):
    B = 300
    p, tokens, parents, u_a, u_s = _case(B, N, depth, V, torch.float32, seed=5 + N, sharp=sharp, empty_rows=(7,))
    p[3] = 0                                                      # a row with no mass anywhere
    p[4, :, : V // 2] = 0                                         # zeros that candidates hit
    got = accept_tree_ref(p, tokens, parents, u_a, u_s)
    expected = _accept_tree_loop(p, tokens, parents, u_a, u_s)
    for a, e in zip(got, expected):
        assert torch.equal(a, e)
    assert got[2].max() >= 3


# ----------------------------------------------------------------------------------------------------------------------
# 3. Statistics: the emitted sequence follows the autoregressive distribution
# ----------------------------------------------------------------------------------------------------------------------

# A fixed tree over a vocabulary of 6: node 3 repeats node 1's token (so it is never accepted and its child 7 is
# unreachable), node 8 is at depth 3, node 10 is padding.
#                        0   1  2  3  4  5  6  7  8  9   10
_STAT_PARENTS = torch.tensor([-1, 0, 0, 0, 1, 1, 2, 3, 4, 5, -1])
_STAT_TOKENS = torch.tensor([0, 2, 4, 2, 0, 3, 1, 5, 5, 3, 0])
_STAT_V = 6


def _stat_targets(seed):
    g = _gen(seed)
    x = -torch.rand(len(_STAT_PARENTS), _STAT_V, generator=g).log()     # Dirichlet(1, ..., 1) per node
    x = x / x.sum(-1, keepdim=True)
    x[_STAT_PARENTS[1:].clamp_min(0), _STAT_TOKENS[1:]] += 0.3          # children's tokens likely: deep paths
    x[4, 2] = 0                                                          # a zero the sampler must respect
    return x / x.sum(-1, keepdim=True)


def _exact_sequences(p):
    """{sequence code: probability} of the emitted sequences under autoregressive sampling over the tree: a token
    continues the sequence iff it is the token of a child of the current node (the first such child)."""
    V = _STAT_V
    p = p.double() / p.double().sum(-1, keepdim=True)
    probs = {}

    def walk(node, prob, code, scale):
        for x in range(V):
            q = prob * p[node, x].item()
            if q == 0:
                continue
            kids = [c for c in range(len(_STAT_PARENTS)) if _STAT_PARENTS[c] == node and _STAT_TOKENS[c] == x]
            if kids:
                walk(kids[0], q, code + (x + 1) * scale, scale * (V + 1))
            else:
                key = code + (x + 1) * scale
                probs[key] = probs.get(key, 0.0) + q
    walk(0, 1.0, 0, 1)
    return probs


def _sequence_codes(out):
    # Sequence (x_1, .., x_n) -> sum_k (x_k + 1) (V+1)^k; the -1 padding adds nothing.
    scale = (_STAT_V + 1) ** torch.arange(out.shape[1], dtype=torch.long)
    return ((out + 1) * scale).sum(1)


def _g_test(observed, expected):
    """p-value of a G-test; cells expected below 5 (zero-probability cells included) are pooled into one."""
    observed, expected = observed.double(), expected.double()
    big = expected >= 5
    obs = torch.cat([observed[big], observed[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    if exp[-1] == 0:
        if obs[-1] > 0:
            return 0.0
        obs, exp = obs[:-1], exp[:-1]
    g = 2 * torch.where(obs > 0, obs * torch.log(obs / exp), torch.zeros_like(obs)).sum()
    df = len(obs) - 1
    return torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), g / 2).item()


def _p_values(p, out):
    """(first token ~ p[0], whole sequence ~ its exact distribution) G-test p-values."""
    rows = len(out)
    first = torch.bincount(out[:, 0], minlength=_STAT_V)
    p_first = _g_test(first, p[0].double() / p[0].double().sum() * rows)
    exact = _exact_sequences(p)
    seen, counts = _sequence_codes(out).unique(return_counts=True)
    observed_by_code = dict(zip(seen.tolist(), counts.tolist()))
    cells = sorted(set(exact) | set(observed_by_code))                # impossible sequences get cells too
    observed = torch.tensor([observed_by_code.get(c, 0) for c in cells])
    expected = torch.tensor([exact.get(c, 0.0) for c in cells], dtype=torch.float64) * rows
    return p_first, _g_test(observed, expected)


def _stat_inputs(rows, seed):
    g = _gen(seed)
    p = _stat_targets(seed).expand(rows, -1, -1)
    N1 = len(_STAT_PARENTS)
    return (p, _STAT_TOKENS.expand(rows, N1), _STAT_PARENTS.expand(rows, N1),
            torch.rand(rows, N1, generator=g), torch.rand(rows, generator=g))


def _accept_tree_wrong(p, tokens, parents, u_a, u_s):
    """A deliberately broken verifier: the emitted token comes from p[cur] with the rejected children NOT removed."""
    out, path, num_accepted = accept_tree_ref(p, tokens, parents, u_a, u_s)
    rows = torch.arange(len(out))
    cur = torch.where(num_accepted > 0, path.gather(1, (num_accepted - 1).clamp_min(0)[:, None])[:, 0], 0)
    p_cur = p[rows, cur].float()
    out[rows, num_accepted] = (p_cur.cumsum(-1) <= (u_s * p_cur.sum(-1))[:, None]).sum(-1).clamp(max=_STAT_V - 1)
    return out, path, num_accepted


def test_emitted_sequences_follow_the_autoregressive_distribution():
    """150k rows over one fixed tree and fixed targets, fresh uniforms per row. G-tests: the first token against
    p[0], and the whole emitted sequence against its exact distribution, which contains the second token given that
    the first is a child's token (cell (x1, x2) has probability p[0](x1) p[child](x2)) and so on down the tree. The
    same tests must fail on a verifier that forgets to remove the rejected children before the fallback sample."""
    rows = 150_000
    p, tokens, parents, u_a, u_s = _stat_inputs(rows, seed=11)
    out, path, num_accepted = accept_tree_ref(p, tokens, parents, u_a, u_s)
    assert (num_accepted == 3).sum() > 1000                            # depth 3 is reached often
    p_first, p_seq = _p_values(p[0], out)
    assert p_first > 1e-3 and p_seq > 1e-3

    out_w, _, _ = _accept_tree_wrong(p, tokens, parents, u_a, u_s)
    p_first_w, p_seq_w = _p_values(p[0], out_w)
    assert p_first_w < 1e-6 and p_seq_w < 1e-6

    # The statistics carry over to the kernel: it agrees token for token on a slice of the same rows.
    _check_against_ref(*(x[:48] for x in (p, tokens, parents, u_a, u_s)))


# ----------------------------------------------------------------------------------------------------------------------
# 4. Launcher errors
# ----------------------------------------------------------------------------------------------------------------------


def _good(B=2, N=3, V=16):
    p, tokens, parents, u_a, u_s = _case(B, N, 2, V, torch.float32, seed=0)
    parents[:] = torch.tensor([-1, 0, 0, 1])
    p, tokens, parents, u_a, u_s = _to(p, tokens, parents, u_a, u_s)
    return dict(p=p, tokens=tokens, parents=parents, u_accept=u_a, u_sample=u_s)


@pytest.mark.parametrize("change, error, message", [
    (dict(p=torch.rand(2, 16)), ValueError, r"p must have shape \(B, N\+1, V\).*got \(2, 16\)"),
    (dict(p=torch.ones(2, 4, 16, dtype=torch.int64)), TypeError,
     "p must be float32, float16 or bfloat16, got torch.int64"),
    (dict(p=torch.rand(2, 16, 4).transpose(1, 2)), ValueError, "p must be contiguous in its last"),
    (dict(p=[[0.5]]), TypeError, "p must be a torch.Tensor, got list"),
    (dict(tokens=torch.zeros(2, 5).long()), ValueError, r"tokens must have shape \(2, 4\), got \(2, 5\)"),
    (dict(tokens=torch.zeros(2, 4)), TypeError, "tokens must be int32 or int64, got torch.float32"),
    (dict(parents=torch.zeros(4).long()), ValueError, r"parents must have shape \(2, 4\), got \(4,\)"),
    (dict(parents=torch.zeros(2, 4, dtype=torch.int16)), TypeError, "parents must be int32 or int64, got torch.int16"),
    (dict(u_accept=torch.rand(2, 4).double()), TypeError, "u_accept must be float32, got torch.float64"),
    (dict(u_sample=torch.rand(3)), ValueError, r"u_sample must have shape \(2,\), got \(3,\)"),
    (dict(u_sample=torch.rand(2, device="meta")), ValueError, "u_sample must be on"),
    (dict(parents=torch.tensor([[-1, 0, 0, 1], [0, 0, 0, 1]])), ValueError,
     r"parents\[1, 0\] must be -1 \(node 0 is the root\), got 0"),
    (dict(parents=torch.tensor([[-1, 0, 0, 1], [-1, 0, 2, 1]])), ValueError,
     r"parents\[1, 2\] must be -1 \(padding\) or an earlier node in \[0, 2\), got 2"),
    (dict(parents=torch.tensor([[-1, 0, -5, 1], [-1, 0, 0, 1]])), ValueError,
     r"parents\[0, 2\] must be -1 \(padding\) or an earlier node in \[0, 2\), got -5"),
    (dict(parents=torch.tensor([[-1, 0, 0, 1], [-1, -1, 0, 1]])), ValueError,
     r"parents\[1, 3\] = 1 is a padding node"),
    (dict(block_v=100), ValueError, "block_v must be a power of two >= 16, got 100"),
])
def test_rejects_bad_inputs(change, error, message):
    kwargs = _good()
    kwargs.update({k: (v.to(DEVICE) if isinstance(v, torch.Tensor) and v.device.type != "meta" else v)
                   for k, v in change.items()})
    with pytest.raises(error, match=message):
        accept_tree(**kwargs)


def test_check_values_false_skips_the_tree_check_and_stays_in_bounds():
    """A malformed tree is not validated on the hot path, and the kernel still only walks forward in range: a
    parent at or after its child, a parent below -1, or under padding is simply nobody's child."""
    kwargs = _good()
    kwargs["parents"] = torch.tensor([[5, 0, 7, 2], [-1, 0, -(10**12), 10**12]], device=DEVICE)
    kwargs["u_accept"] = torch.zeros_like(kwargs["u_accept"])
    out, path, num_accepted = accept_tree(**kwargs, check_values=False)
    out_ref, path_ref, num_accepted_ref = accept_tree_ref(**kwargs)
    assert torch.equal(out.cpu(), out_ref.cpu()) and torch.equal(path.cpu(), path_ref.cpu())
    assert torch.equal(num_accepted.cpu(), num_accepted_ref.cpu())
    assert ((out.cpu() >= -1) & (out.cpu() < 16)).all() and (num_accepted.cpu() <= 1).all()


# ----------------------------------------------------------------------------------------------------------------------
# GPU only: bf16 (the interpreter has no bf16) and a realistic shape
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_realistic_shape_matches_reference(dtype):
    p, tokens, parents, u_a, u_s = _case(32, 63, 6, 49152, dtype, seed=21, empty_rows=(0,))
    _check_against_ref(p, tokens, parents, u_a, u_s, check_values=False)
