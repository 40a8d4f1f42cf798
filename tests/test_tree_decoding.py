"""Token-tree and n-gram decoding against autoregressive decoding."""

import pytest
import torch

import minipass.tree_decoding as td
from kernels.tree_acceptance import accept_tree_ref
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


def test_build_tree_merges_sources_and_respects_the_budget():
    cfg = td.TreeConfig(nodes=6, topk=2)
    la_tokens = [[10, 11], [20, 21]]
    la_probs = [[0.6, 0.3], [0.5, 0.4]]
    tokens, parents, depths, scores = td.build_tree(99, [[10, 30, 31]], la_tokens, la_probs, cfg)
    assert len(tokens) == 7 and tokens[0] == 99 and parents[0] == -1
    # The n-gram chain 10-30-31 comes first; look-ahead token 10 reuses its node instead of a duplicate.
    assert tokens[1:4] == [10, 30, 31] and parents[1:4] == [0, 1, 2]
    assert sum(1 for t, p in zip(tokens, parents) if (t, p) == (10, 0)) == 1
    for i in range(1, len(tokens)):
        assert 0 <= parents[i] < i and depths[i] == depths[parents[i]] + 1
    siblings = {}
    for t, p in zip(tokens[1:], parents[1:]):
        assert (p, t) not in siblings  # no duplicate sibling
        siblings[(p, t)] = True


def test_tree_batch_mask_is_ancestors_plus_blocks():
    cfg = td.TreeConfig(nodes=4, topk=2, blocks=2)
    tree = td.build_tree(7, [[1, 2]], [[3, 4]], [[0.9, 0.05]], cfg)
    batch = td.TreeBatch([tree], N=4, M=2, L=1, device="cpu")
    toks, par, dep, _ = tree
    m = batch.mask[0]
    for i in range(len(toks)):
        anc, j = set(), i
        while j >= 0:
            anc.add(j)
            j = par[j]
        assert {j for j in range(len(toks)) if m[i, j]} == anc
    # A block row sees its node's ancestors, the node, and itself.
    for i in range(len(toks)):
        start = int(batch.block_at[0, i])
        if start >= 0:
            seen = set(torch.nonzero(m[start]).flatten().tolist())
            assert seen == {j for j in range(len(toks)) if m[i, j]} | {start}
            assert int(batch.offsets[0, start]) == dep[i] + 1


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
    seen, real = [], td.build_tree

    def spy(root, chains, top_tokens, top_probs, tree):
        seen.append((top_tokens, top_probs))
        return real(root, chains, top_tokens, top_probs, tree)

    monkeypatch.setattr(td, "build_tree", spy)
    td.tree_decode(tiny16, [PROMPT], 3, lookahead=la, tree=cfg)
    assert seen[0] == (None, None)  # the first call has no look-ahead block before it
    top = want.topk(2, dim=-1)
    assert seen[1][0] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor(seen[1][1]), top.values, atol=1e-5, rtol=1e-5)


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
