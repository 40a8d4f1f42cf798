"""Token-tree and n-gram decoding against autoregressive decoding."""

import pytest
import torch

import minipass.tree_decoding as td
from minipass.kernels.tree_acceptance import accept_tree_ref
from minipass.decoding import SamplingParams
from minipass.errors import MinipassError
from minipass.lookahead import init_lookahead
from minipass.sampling import sample
from tests.stats import continuation_probs, counts_of, g_test
from tests.util import N_SAMPLES, PROMPT, SETTINGS, drafting_call, per_layer_lookahead, tiny_model

NEW_TOKENS = 24  # what the greedy_setup fixture (conftest.py) generates per prompt


def test_ngram_index_prefers_longest_then_latest_match():
    idx = td.NgramIndex([5, 6, 7, 1, 6, 7, 2, 9, 6, 7], n_min=1, n_max=3)
    # Suffix (6, 7) occurred twice before: the latest continuation first, then the older one.
    assert idx.continuations(3, 2) == [[2, 9, 6], [1, 6, 7]]
    idx.extend([2])
    assert idx.continuations(2, 5) == [[9, 6]]  # (6, 7, 2) occurred once: longest suffix wins, then shorter
    assert td.NgramIndex([1, 2, 3], 1, 3).continuations(4, 2) == []


@pytest.mark.parametrize("n_min, n_max, ell, C", [(1, 3, 4, 2), (2, 2, 3, 3), (1, 1, 5, 1)])
def test_device_ngram_chains_equal_the_host_index(n_min, n_max, ell, C):
    g = torch.Generator().manual_seed(0)
    B, S = 16, 40
    ctx = torch.randint(0, 4, (B, S), generator=g)  # a small alphabet: many repeats
    length = torch.randint(1, S + 1, (B,), generator=g)
    got = td.ngram_chains(ctx, length, n_min, n_max, ell, C)
    for b in range(B):
        want = td.NgramIndex(ctx[b, : length[b]].tolist(), n_min, n_max).continuations(ell, C)
        rows = [[t for t in row if t >= 0] for row in got[b].tolist()]
        assert rows[: len(want)] == want and all(not r for r in rows[len(want):])


def random_seeds(g, B, L, k, V):
    """Look-ahead top-k per row: distinct tokens per depth (some shared with the chains), sorted probabilities."""
    tok = torch.stack([torch.stack([torch.randperm(V, generator=g)[:k] for _ in range(L)]) for _ in range(B)])
    prob = torch.rand(B, L, k, generator=g).sort(-1, descending=True).values * 0.9
    return tok, prob


@pytest.mark.parametrize("cfg, L, S", [(td.TreeConfig(nodes=6, topk=2, ngram_len=3, ngram_chains=2), 3, 0),
                                       (td.TreeConfig(nodes=16, topk=3), 4, 0),
                                       (td.TreeConfig(nodes=9, topk=3, ngram_len=4, ngram_chains=1, pool=40), 5, 0),
                                       (td.TreeConfig(nodes=5, blocks=0, ngram_len=5, ngram_chains=1), 0, 0),
                                       (td.TreeConfig(nodes=7, topk=2, ngram_len=3, ngram_chains=1,
                                                      calibrated=(((0.5, 0.2),) * 3, (0.6, 0.5, 0.4))), 3, 0),
                                       (td.TreeConfig(nodes=8, topk=2, ngram_len=3, ngram_chains=1,
                                                      calibrated=(((0.5, 0.2),) * 2,
                                                                  ((0.6, 0.5, 0.4), (0.7, 0.4, 0.3),
                                                                   (0.3, 0.2, 0.1)))), 2, 2)],
                         ids=["small", "default", "deep", "ngram-only", "calibrated", "datastore-chains"])
def test_device_trees_equal_the_host_reference(cfg, L, S):
    """build_trees (all rows at once, tensor ops) builds the same tries as build_tree (one row, plain Python), over
    random rows whose n-gram chains and look-ahead candidates share tokens, so the merge is exercised. S: chains
    from a datastore after the context's (calibrated per chain)."""
    g = torch.Generator().manual_seed(1)
    B, V, M = 24, 6, (cfg.blocks if L else 0)
    tpl = td.TreeTemplate(cfg, L, store=S)
    C = tpl.C
    root = torch.randint(0, V, (B,), generator=g)
    chains = torch.randint(0, V, (B, C, cfg.ngram_len), generator=g)
    cut = torch.randint(0, cfg.ngram_len + 1, (B, C), generator=g)
    chains = torch.where(torch.arange(cfg.ngram_len) < cut[:, :, None], chains, -1)  # chains of any length
    la_tok, la_prob = random_seeds(g, B, max(L, 1), max(cfg.topk, 1), V)
    la_valid = torch.rand(B, generator=g) < 0.8
    tree = td.build_trees(tpl, cfg.nodes, M, root, chains, la_tok, la_prob, la_valid)
    merged = 0
    for b in range(B):
        rows = [[t for t in c if t >= 0] for c in chains[b].tolist()]
        ok = bool(la_valid[b])
        want = td.build_tree(tpl, cfg.nodes, int(root[b]), rows, la_tok[b].tolist() if ok else None,
                             la_prob[b].tolist() if ok else None)
        n = len(want[0])
        assert tree.tokens[b, :n].tolist() == want[0]
        assert tree.parents[b].tolist() == want[1] + [-1] * (cfg.nodes + 1 - n)
        assert tree.depths[b, :n].tolist() == want[2]
        torch.testing.assert_close(tree.scores[b, :n], torch.tensor(want[3]))
        siblings = list(zip(want[1][1:], want[0][1:]))
        assert len(set(siblings)) == len(siblings)  # a trie: no two children of a node share a token
        merged += n - 1 < cfg.nodes
    assert merged > 0 or cfg.nodes <= 6  # some rows had fewer candidates than the budget


def test_tree_mask_is_ancestors_plus_blocks():
    cfg = td.TreeConfig(nodes=6, topk=2, blocks=2, ngram_len=2, ngram_chains=1)
    L, B = 2, 4
    g = torch.Generator().manual_seed(2)
    tpl = td.TreeTemplate(cfg, L)
    la_tok, la_prob = random_seeds(g, B, L, 2, 9)
    tree = td.build_trees(tpl, cfg.nodes, cfg.blocks, torch.full((B,), 8), torch.tensor([[[1, 2]]] * B),
                          la_tok, la_prob, torch.ones(B, dtype=torch.bool))
    N1 = cfg.nodes + 1
    for b in range(B):
        par, m = tree.parents[b].tolist(), tree.mask[b]
        for i in range(N1):
            anc, j = set(), i
            while j >= 0:
                anc.add(j)
                j = par[j]
            assert {j for j in range(N1 + cfg.blocks * L) if m[i, j]} == anc
        # Block m after its anchor: the anchor's ancestors, the anchor, and the block's tokens up to itself.
        assert tree.anchors[b, 0] == 0  # the root is the likeliest node
        for k in range(cfg.blocks):
            a = int(tree.anchors[b, k])
            for i in range(L):
                row = N1 + k * L + i
                seen = set(torch.nonzero(m[row]).flatten().tolist())
                assert seen == {j for j in range(N1) if m[a, j]} | set(range(N1 + k * L, row + 1))
                assert int(tree.offsets[b, row]) == int(tree.depths[b, a]) + 1 + i


@pytest.mark.parametrize("variant", ["tree", "tree-lookahead-only", "ngram"])
def test_greedy_is_token_identical_to_ar(greedy_setup, variant):
    model, tok, prompts, ref = greedy_setup
    if variant == "ngram":
        decode = td.ngram_decode
    else:
        cfg = td.TreeConfig(ngram_chains=0) if variant == "tree-lookahead-only" else td.TreeConfig()
        la = init_lookahead(model, 4)

        def decode(m, ps, n, **kw):
            return td.tree_decode(m, ps, n, lookahead=la, tree=cfg, **kw)
    for p, r in zip(prompts, ref):
        assert decode(model, [p], NEW_TOKENS, stop_ids=tok.eos_ids).tokens[0] == r
    batched = []
    for batch in (prompts[:4], prompts[4:]):
        batched += decode(model, batch, NEW_TOKENS, stop_ids=tok.eos_ids).tokens
    assert batched == ref


def test_greedy_with_per_layer_additions_is_token_identical_to_ar(greedy_setup):
    model, tok, prompts, ref = greedy_setup
    la = per_layer_lookahead(model, 3)
    batched = []
    for batch in (prompts[:4], prompts[4:]):
        batched += td.tree_decode(model, batch, NEW_TOKENS, stop_ids=tok.eos_ids, lookahead=la).tokens
    assert batched == ref


@pytest.fixture(scope="module")
def tiny16():
    return tiny_model("tiny-v16", seed=5, embed_std=0.25)


def draw_tree(model, setting, cfg, la=None):
    la = init_lookahead(model, 3, "random", seed=1) if la is None else la
    out = td.tree_decode(model, [PROMPT] * N_SAMPLES, 3, SamplingParams(*setting), seeds=range(N_SAMPLES),
                         lookahead=la, tree=cfg)
    assert all(len(t) == 3 for t in out.tokens)
    return counts_of(out.tokens, model.args.vocab_size, 3), out.stats


# Several children per node: three look-ahead candidates per depth, and an n-gram chain from the prompt.
TREE = td.TreeConfig(nodes=10, topk=3, blocks=2, ngram_len=3, ngram_chains=1)


@pytest.mark.parametrize("setting", SETTINGS, ids=["t1", "t0.7-k5", "p0.9"])
def test_tree_sampling_matches_autoregressive_distribution(tiny16, setting):
    exact = continuation_probs(tiny16, PROMPT, 3, *setting)
    counts, stats = draw_tree(tiny16, setting, TREE)
    p_value, impossible = g_test(counts, exact)
    assert impossible == 0
    assert p_value > 1e-3, f"G-test p = {p_value}"
    assert 0 < stats.accepted[0] < stats.attempted[0]


def test_tree_sampling_with_per_layer_additions_matches_autoregressive_distribution(tiny16):
    setting = SETTINGS[1]
    exact = continuation_probs(tiny16, PROMPT, 3, *setting)
    counts, stats = draw_tree(tiny16, setting, TREE, per_layer_lookahead(tiny16, 3))
    p_value, impossible = g_test(counts, exact)
    assert impossible == 0 and p_value > 1e-3, f"G-test p = {p_value}"
    assert 0 < stats.accepted[0] < stats.attempted[0]


def test_tree_candidates_come_from_the_per_layer_additions(tiny16, monkeypatch):
    """The look-ahead top-k the second tree is built from equal a hand-built drafting call with the additions."""
    la = per_layer_lookahead(tiny16, 3)
    cfg = td.TreeConfig(nodes=6, topk=2, blocks=1, ngram_chains=0)
    want = torch.softmax(tiny16.head(drafting_call(tiny16, torch.tensor([PROMPT]), len(PROMPT) - 1, la))[0], -1)
    seen, real = [], td.build_trees

    def spy(tpl, N, M, root, chains, la_tok, la_prob, la_valid):
        seen.append((la_tok.clone(), la_prob.clone(), la_valid.clone()))
        return real(tpl, N, M, root, chains, la_tok, la_prob, la_valid)

    monkeypatch.setattr(td, "build_trees", spy)
    td.tree_decode(tiny16, [PROMPT], 3, lookahead=la, tree=cfg)
    assert not seen[0][2].any()  # the first call has no look-ahead block before it
    top = want.topk(2, dim=-1)
    assert seen[1][2].all() and seen[1][0][0].tolist() == top.indices.tolist()
    torch.testing.assert_close(seen[1][1][0], top.values, atol=1e-5, rtol=1e-5)


def fallback_keeps_rejected(p, tokens, parents, u_accept, u_sample):
    """A planted bug: when no child is accepted, sample from the full target, rejected children included."""
    out, path, n_acc = accept_tree_ref(p, tokens, parents, u_accept, u_sample)
    rows = torch.arange(len(n_acc))
    cur = torch.where(n_acc > 0, path.gather(1, (n_acc - 1).clamp(min=0)[:, None])[:, 0], 0)
    out[rows, n_acc] = sample(p[rows, cur], u_sample)
    return out, path, n_acc


def test_tree_distribution_test_rejects_planted_bug(tiny16, monkeypatch):
    setting = SETTINGS[0]
    exact = continuation_probs(tiny16, PROMPT, 3, *setting)
    monkeypatch.setattr(td, "accept_tree_ref", fallback_keeps_rejected)
    counts, _ = draw_tree(tiny16, setting, TREE)
    p_value, _ = g_test(counts, exact)
    assert p_value < 1e-6, f"the G-test failed to notice the planted bug (p = {p_value})"


@pytest.mark.parametrize("setting", SETTINGS[:1], ids=["t1"])
def test_ngram_sampling_matches_autoregressive_distribution(tiny16, setting):
    exact = continuation_probs(tiny16, PROMPT, 3, *setting)
    out = td.ngram_decode(tiny16, [PROMPT] * N_SAMPLES, 3, SamplingParams(*setting), seeds=range(N_SAMPLES))
    p_value, impossible = g_test(counts_of(out.tokens, 16, 3), exact)
    assert impossible == 0 and p_value > 1e-3, f"G-test p = {p_value}"


def test_bad_tree_options():
    with pytest.raises(MinipassError, match="ngram_min <= ngram_max"):
        td.TreeConfig(ngram_min=3, ngram_max=2)
    with pytest.raises(MinipassError, match="at least 1 candidate node"):
        td.TreeConfig(nodes=0)
    with pytest.raises(MinipassError, match="must be >= 0"):
        td.TreeConfig(topk=-1)
