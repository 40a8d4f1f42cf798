"""The datastore: its tables against a brute-force count, the tensor lookup against the plain-Python reference, the
file format and its refusals, the shipped file, and the tree decoder with a datastore (greedy token-identical to
autoregressive decoding on the default model; sampling distribution-identical on a tiny one)."""

import collections
import json

import pytest
import torch

import minipass.tree_decoding as td
from minipass.build_datastore import main as build_main
from minipass.datastore import Datastore, load_datastore, save_datastore, store_chains
from minipass.decoders import DEFAULT_DATASTORE_FILE, datastore_for
from minipass.decoding import SamplingParams, ar_decode
from minipass.errors import MinipassError
from minipass.lookahead import init_lookahead, load_lookahead
from tests.stats import continuation_probs, counts_of, g_test
from tests.util import N_SAMPLES, PROMPT, SETTINGS, tiny_model

NEW_TOKENS = 24  # what the greedy_setup fixture (conftest.py) generates per prompt


def stream(seed=0, n=600, V=7):
    """A token stream with separators, small enough a vocabulary that n-grams repeat with several continuations."""
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(0, V, (n,), generator=g).tolist()
    for i in range(0, n, 97):
        toks[i] = -1
    return toks


def cut(window):
    """A continuation as a draft: up to its first separator."""
    return tuple(window[: window.index(-1)] if -1 in window else window)


def test_tables_hold_the_likeliest_next_tokens_and_their_commonest_continuations():
    toks, ell, C = stream(), 4, 3
    store = Datastore(toks, 7, chains=C, ell=ell)
    padded = toks + [-1] * ell
    checked = 0
    for n in (1, 2, 3):
        follow = collections.defaultdict(list)  # n-gram -> starts of its continuations
        for e in range(n, len(toks)):
            gram = toks[e - n:e]
            if -1 not in gram and toks[e] >= 0:
                follow[tuple(gram)].append(e)
        assert store.keys[n - 1].numel() == len(follow)
        for gram, starts in follow.items():
            chains = store.continuations(list(gram), ell)
            firsts = collections.Counter(toks[e] for e in starts)
            ranked = sorted(firsts, key=lambda t: (-firsts[t], t))[:C]
            assert [c[0] for c in chains] == ranked  # the likeliest next tokens, ties to the smaller
            for c in chains:
                conts = collections.Counter(cut(padded[e:e + ell]) for e in starts if toks[e] == c[0])
                assert conts[tuple(c)] == max(conts.values())  # a commonest continuation after that token
                checked += 1
    assert checked > 100


def test_lookup_equals_the_reference():
    toks = stream(1)
    store = Datastore(toks, 7, chains=3, ell=5)
    g = torch.Generator().manual_seed(2)
    B, S = 40, 12
    ctx = torch.randint(0, 9, (B, S), generator=g)  # tokens 7, 8: suffixes the store does not hold
    length = torch.randint(0, S + 1, (B,), generator=g)
    for chains, ell in ((3, 5), (2, 7)):
        got = store_chains(store, ctx, length, chains, ell)
        assert got.shape == (B, chains, ell)
        kinds = set()
        for b in range(B):
            want = store.continuations(ctx[b, : length[b]].tolist(), ell)[:chains]
            rows = [[t for t in r if t >= 0] for r in got[b].tolist()]
            assert rows == want + [[]] * (chains - len(want))
            kinds.add(len(want))
        assert {0, chains} <= kinds  # rows with no match and rows with every chain
    with pytest.raises(MinipassError, match="holds 3 chains"):
        store_chains(store, ctx, length, 4, 5)


@pytest.mark.parametrize("vocab", [7, 70000])
def test_file_round_trip(tmp_path, vocab):
    toks = stream(3)
    path = tmp_path / "s.safetensors"
    save_datastore(str(path), toks, vocab, made_by="test")
    loaded = load_datastore(path, vocab)
    assert loaded.stream[: len(toks)].tolist() == toks  # separators survive the 16-bit form
    assert not (tmp_path / "s.safetensors.tmp").exists()


def test_file_refusals(tmp_path):
    path = tmp_path / "s.safetensors"
    save_datastore(str(path), stream(), 7)
    with pytest.raises(MinipassError, match="vocabulary of 7 tokens, the model has 8"):
        load_datastore(path, 8)
    with pytest.raises(MinipassError, match="not found"):
        load_datastore(tmp_path / "nope.safetensors", 7)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(MinipassError, match="not a minipass datastore"):
        load_datastore(tmp_path / "other.safetensors", 7)
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(MinipassError, match="cannot read datastore"):
        load_datastore(tmp_path / "bad.safetensors", 7)
    with pytest.raises(MinipassError, match=r"in \[0, 7\)"):
        Datastore([1, 9], 7)


def test_build_refuses_a_missing_file(tmp_path, capsys):
    assert build_main(["--out", str(tmp_path / "s.safetensors"), "--data", str(tmp_path / "none.jsonl")]) == 2
    assert "none.jsonl" in capsys.readouterr().err and not (tmp_path / "s.safetensors").exists()


def test_build_from_distilled_text(tmp_path, default_model, default_ckpt):
    model, tok = default_model
    texts = ["def add(a, b):\n    return a + b\n", "def sub(a, b):\n    return a - b\n"]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    out = tmp_path / "s.safetensors"
    assert build_main(["--ckpt", str(default_ckpt), "--out", str(out), "--data", str(data)]) == 0
    store = load_datastore(out, model.args.vocab_size)
    assert store.stream[: len(store)].tolist() == tok.encode(texts[0]) + [-1] + tok.encode(texts[1]) + [-1]
    first = tok.encode(texts[0])
    assert store.continuations(first[:4], 3)[0] == first[4:7]  # the text's n-grams are found, with what followed


def test_shipped_file_is_the_default(default_model):
    model, _ = default_model
    assert DEFAULT_DATASTORE_FILE.is_file()
    store, source = datastore_for(model, None, default_model=True)
    assert source == str(DEFAULT_DATASTORE_FILE) and len(store) > 100_000
    assert datastore_for(model, None, default_model=False)[0] is None
    assert datastore_for(model, "none", default_model=True)[0] is None


def test_greedy_with_the_shipped_datastore_is_token_identical_to_ar(greedy_setup):
    from minipass.decoders import DEFAULT_LOOKAHEAD_FILE

    model, tok, prompts, ref = greedy_setup
    store = load_datastore(DEFAULT_DATASTORE_FILE, model.args.vocab_size)
    la = load_lookahead(DEFAULT_LOOKAHEAD_FILE, model, 2)
    out, with_store, without = [], 0, 0
    for batch in (prompts[:4], prompts[4:]):
        res = td.tree_decode(model, batch, NEW_TOKENS, stop_ids=tok.eos_ids, lookahead=la, datastore=store)
        out += res.tokens
        with_store += res.stats.calls
        without += td.tree_decode(model, batch, NEW_TOKENS, stop_ids=tok.eos_ids, lookahead=la).stats.calls
    assert out == ref
    assert with_store < without  # the store's drafts were accepted where the others' were not


def test_sizing_replays_the_store_chains(default_model):
    """Replayed on sequences the store holds, its chains are accepted; the calibrated table has their rows."""
    from minipass import sizing

    model, tok = default_model
    seqs = [tok.encode("def add(a, b):\n    return a + b\n" * 3), tok.encode("for i in range(10):\n    print(i)\n" * 3)]
    store = Datastore(sum((s + [-1] for s in seqs), []), model.args.vocab_size)
    cal = sizing.Calibration(seqs, [3, 3], [{}, {}], [{}, {}])
    cfg = td.TreeConfig(nodes=8, blocks=0, ngram_chains=1)
    tables = sizing.acceptance_tables(cal, cfg, 0, store)
    assert len(tables[1]) == 1 + cfg.store_chains and tables[1][1][0] > 0.5
    with_store = sizing.replay(cal, cfg, 0, store)
    assert with_store > sizing.replay(cal, cfg, 0) and with_store > 3
    with pytest.raises(MinipassError, match="calibrate the tree the way it decodes"):
        td.TreeTemplate(td.TreeConfig(topk=1, ngram_chains=1, calibrated=(((0.5,),), ((0.5,) * 8,))), 1, store=2)


def test_tree_sampling_with_a_datastore_matches_autoregressive_distribution():
    """The store holds the model's own samples after the prompt, so its chains are often, not always, right."""
    model = tiny_model("tiny-v16", seed=5, embed_std=0.25)
    setting = SETTINGS[0]
    samples = ar_decode(model, [PROMPT] * 64, 3, SamplingParams(*setting), seeds=range(10**6, 10**6 + 64)).tokens
    store = Datastore(sum((PROMPT + s + [-1] for s in samples), []), model.args.vocab_size)
    cfg = td.TreeConfig(nodes=8, topk=2, blocks=1, ngram_len=3, ngram_chains=0, store_chains=3)
    la = init_lookahead(model, 2, "random", seed=1)
    exact = continuation_probs(model, PROMPT, 3, *setting)
    out = td.tree_decode(model, [PROMPT] * N_SAMPLES, 3, SamplingParams(*setting), seeds=range(N_SAMPLES),
                         lookahead=la, tree=cfg, datastore=store)
    p_value, impossible = g_test(counts_of(out.tokens, model.args.vocab_size, 3), exact)
    assert impossible == 0
    assert p_value > 1e-3, f"G-test p = {p_value}"
    assert 0 < out.stats.accepted[0] < out.stats.attempted[0]
