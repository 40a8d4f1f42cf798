"""Sizing the tree: the calibration replay predicts what tree decoding does, and the choice follows the cost curve."""

import pytest

from minipass import sizing
from minipass.decoding import SamplingParams
from minipass.tree_decoding import TreeConfig, tree_decode
from tests.util import per_layer_lookahead, tiny_model

PROMPTS = [[5, 6, 7, 1, 6, 7, 2, 9, 6, 7, 2, 9, 3], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [8, 8, 8, 1, 8, 8]]
NEW = 24


@pytest.fixture(scope="module")
def setup():
    model = tiny_model("tiny", seed=3, embed_std=0.5)
    la = per_layer_lookahead(model, 3)
    cal = sizing.calibrate(model, la, PROMPTS, SamplingParams(), NEW, topk=2)
    return model, la, cal


CONFIGS = [TreeConfig(nodes=6, topk=2, blocks=2, ngram_len=3, ngram_chains=2),
           TreeConfig(nodes=3, topk=2, blocks=1, ngram_len=2, ngram_chains=1),
           TreeConfig(nodes=8, topk=2, blocks=2, ngram_len=3, ngram_chains=0)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["both", "small", "lookahead-only"])
def test_replay_predicts_greedy_tree_decoding_exactly(setup, cfg):
    """Replaying a tree configuration on the calibration sequences gives the tokens per call that greedy tree
    decoding of the same prompts really makes: the replay is the decoder's walk, not an estimate of it."""
    model, la, cal = setup
    out = tree_decode(model, PROMPTS, NEW, lookahead=la, tree=cfg)
    assert [p + t for p, t in zip(PROMPTS, out.tokens)] == cal.sequences
    assert sizing.replay(cal, cfg, 3) == pytest.approx(out.stats.tokens_per_call, rel=1e-9)



@pytest.mark.parametrize("L", [1, 2])
def test_a_truncated_calibration_replays_the_shorter_lookahead_exactly(setup, L):
    """The first L look-ahead tokens of a longer block draft what a block of L does: the calibration cut to L
    replays greedy tree decoding with the look-ahead tensor cut to L."""
    model, la, cal = setup
    short = la[..., :L, :].contiguous()
    cut = cal.truncated(L)
    direct = sizing.calibrate(model, short, PROMPTS, SamplingParams(), NEW, topk=2)
    # (a longer block leaves out the last anchors of a sequence, whose block would run past its end)
    for ta, tb, pa, pb in zip(cut.top_tokens, direct.top_tokens, cut.top_probs, direct.top_probs):
        assert ta and ta.keys() <= tb.keys()
        assert all(ta[a] == tb[a] for a in ta)
        assert all(pytest.approx(x, rel=1e-4, abs=1e-6) == y for a in ta for x, y in zip(pa[a], pb[a]))
    cfg = CONFIGS[0]
    out = tree_decode(model, PROMPTS, NEW, lookahead=short, tree=cfg)
    assert sizing.replay(cut, cfg, L) == pytest.approx(out.stats.tokens_per_call, rel=1e-9)

def test_replay_with_calibrated_scores(setup):
    model, la, cal = setup
    tables = sizing.acceptance_tables(cal, CONFIGS[0], 3)
    la_acc, ng_acc = tables
    assert len(la_acc) == 3 and all(len(r) == 2 for r in la_acc) and len(ng_acc) == 2
    assert all(0 <= x <= 1 for row in la_acc + ng_acc for x in row)
    cfg = TreeConfig(nodes=6, topk=2, blocks=2, ngram_len=3, ngram_chains=2, calibrated=tables)
    out = tree_decode(model, PROMPTS, NEW, lookahead=la, tree=cfg)
    assert sizing.replay(cal, cfg, 3) == pytest.approx(out.stats.tokens_per_call, rel=1e-9)


def test_acceptance_tables_count_what_they_say():
    """Look-ahead depth 1 rank 0 accepted 2 of 3 times (one pseudo-count in the denominator), then depth 2."""
    cal = sizing.Calibration(sequences=[[1, 2, 3, 4, 5]], starts=[0], top_tokens=[{}], top_probs=[{}])
    # Roots 0..3; the tree rooted at r is seeded by the block after r - 1 (root 0 has none).
    cal.top_tokens[0] = {0: [[3, 9], [4, 9]], 1: [[4, 9], [9, 9]], 2: [[9, 5], [9, 9]]}
    cal.top_probs[0] = {a: [[0.6, 0.4], [0.6, 0.4]] for a in (0, 1, 2)}
    la, _ = sizing.acceptance_tables(cal, TreeConfig(topk=2, ngram_chains=1, ngram_len=2), 2)
    # Depth 1: roots 1, 2, 3 tried; rank 0 right at roots 1 and 2, rank 1 right at root 3. Depth 2: tried at
    # roots 1 and 2 (after a depth-1 hit, with a token left): right at root 1 (rank 0).
    assert la[0] == (round(2 / 4, 4), round(1 / 4, 4))
    assert la[1] == (round(1 / 3, 4), 0.0)


def synthetic_calibration(n: int = 200) -> sizing.Calibration:
    """Look-ahead drafts that are right at rank 0 or rank 1 in turn (so that wider trees accept more), no repeats
    for the n-gram source to find."""
    seq = list(range(1000, 1000 + n))
    tops, probs = {}, {}
    for a in range(n - 1):
        tops[a] = [[seq[a + 1 + d] if (a + d) % 2 == 0 else 7, 7 if (a + d) % 2 == 0 else seq[a + 1 + d]]
                   if a + 1 + d < n else [7, 8] for d in range(1, 4)]
        probs[a] = [[0.5, 0.4]] * 3
    return sizing.Calibration([seq], [0], [tops], [probs])


def test_the_budget_follows_the_cost_curve():
    """A flat cost curve (a wide call costs what one token costs) buys a bigger tree than a steep one."""
    cal = synthetic_calibration()
    base = TreeConfig(topk=2, blocks=2, ngram_len=3, ngram_chains=1)

    def best(t_of):
        rows = [(sizing.replay(cal, c, 3) / t_of(1 + c.nodes + c.blocks * 3), c) for c in
                sizing.candidates(base, cal, 3)]
        return max(rows, key=lambda r: r[0])[1]

    flat, steep = best(lambda T: 1.0), best(lambda T: float(T))
    most = max(sizing.replay(cal, c, 3) for c in sizing.candidates(base, cal, 3))
    assert sizing.replay(cal, flat, 3) == most > 2.4  # flat: the most tokens per call, whatever the width
    assert steep.nodes < flat.nodes


def test_candidates_fill_the_measured_widths_exactly():
    """Given the widths the cost curve measured, every candidate's call is one of them (a call's cost can jump
    between two measured widths, so none is priced by interpolation), with one or two blocks where both fit."""
    cal = synthetic_calibration(40)
    base = TreeConfig(topk=2, blocks=2, ngram_len=3, ngram_chains=1)
    L = 3
    cands = sizing.candidates(base, cal, L, widths=[1, 2, 6, 8, 16])
    sizes = {(c.nodes, c.blocks) for c in cands}
    assert {1 + c.nodes + c.blocks * L for c in cands} <= {6, 8, 16}
    assert sizes == {(2, 1), (4, 1), (1, 2), (12, 1), (9, 2)}
    assert all(c.nodes >= 1 for c in cands)
    # without widths: the fixed budgets
    assert {c.nodes for c in sizing.candidates(base, cal, L)} == set(sizing.BUDGETS)
