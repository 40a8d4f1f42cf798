"""PaSS decoders against autoregressive decoding: token-identical when greedy, distribution-identical when sampling."""

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import minipass.pass_decoding as pd
from minipass.kernels.acceptance import accept_ref
from minipass.decoding import SamplingParams, ar_decode
from minipass.errors import MinipassError
from minipass.lookahead import init_lookahead, load_lookahead, save_lookahead
from minipass.sampling import sample
from tests.stats import continuation_probs, counts_of, g_test
from tests.util import CHAT, CODE, N_SAMPLES, PROMPT, SETTINGS, drafting_call, per_layer_lookahead, tiny_model

DECODERS = {"pass": pd.pass_decode, "pass1": pd.pass1_decode}

NEW_TOKENS = 24  # what the greedy_setup fixture (conftest.py) generates per prompt


def test_ar_batch_matches_rows_alone(greedy_setup):
    model, tok, prompts, ref = greedy_setup
    for batch in (prompts[:4], prompts[4:]):
        assert len({len(p) for p in batch}) > 1  # different lengths
    out = ar_decode(model, prompts[:4], NEW_TOKENS, stop_ids=tok.eos_ids).tokens
    out += ar_decode(model, prompts[4:], NEW_TOKENS, stop_ids=tok.eos_ids).tokens
    assert out == ref


@pytest.mark.parametrize("mode", ["pass", "pass1"])
@pytest.mark.parametrize("L", [1, 3, 6])
def test_greedy_is_token_identical_to_ar(greedy_setup, mode, L):
    model, tok, prompts, ref = greedy_setup
    la = init_lookahead(model, L)
    decode = DECODERS[mode]
    for p, r in zip(prompts, ref):
        assert decode(model, [p], NEW_TOKENS, stop_ids=tok.eos_ids, lookahead=la).tokens[0] == r
    batched = []
    for batch in (prompts[:4], prompts[4:]):
        batched += decode(model, batch, NEW_TOKENS, stop_ids=tok.eos_ids, lookahead=la).tokens
    assert batched == ref


@pytest.mark.parametrize("mode", ["pass", "pass1"])
def test_greedy_with_per_layer_additions_is_token_identical_to_ar(greedy_setup, mode):
    model, tok, prompts, ref = greedy_setup
    la = per_layer_lookahead(model, 3)
    assert la.shape == (model.args.n_layers, 3, model.args.dim)
    batched = []
    for batch in (prompts[:4], prompts[4:]):
        batched += DECODERS[mode](model, batch, NEW_TOKENS, stop_ids=tok.eos_ids, lookahead=la).tokens
    assert batched == ref


def test_pass1_with_a_block_after_every_acceptance_point_is_token_identical(greedy_setup):
    model, tok, prompts, ref = greedy_setup
    la = init_lookahead(model, 3)
    out = pd.pass1_decode(model, prompts[:4], NEW_TOKENS, stop_ids=tok.eos_ids, lookahead=la, blocks=None).tokens
    assert out == ref[:4]


def test_stats_are_consistent(greedy_setup):
    model, tok, prompts, _ = greedy_setup
    la = init_lookahead(model, 3)
    for decode, calls_per_iter in ((pd.pass_decode, 2), (pd.pass1_decode, 1)):
        s = decode(model, prompts[4:5], NEW_TOKENS, lookahead=la).stats
        assert s.tokens == NEW_TOKENS
        assert len(s.attempted) == 3 and all(a <= t for a, t in zip(s.accepted, s.attempted))
        # Attempts at a position need every earlier draft accepted.
        assert all(s.attempted[k + 1] <= s.accepted[k] for k in range(2))
        # Each verification emits accepted drafts + 1 (pass adds the exact first token of its drafting call).
        verifications = s.attempted[0]
        emitted = sum(s.accepted) + verifications + (verifications if calls_per_iter == 2 else 0)
        assert abs(s.tokens - emitted) <= 4  # the last iteration may be cut by max_new_tokens
        assert s.tokens_per_call >= 1.0 / calls_per_iter * 0.99


# --- sampling: distribution-identical to autoregressive sampling -------------------------------------------------



@pytest.fixture(scope="module")
def tiny16():
    return tiny_model("tiny-v16", seed=5, embed_std=0.25)


def draw(decode, model, la, setting, seed0=0):
    sp = SamplingParams(*setting)
    out = decode(model, [PROMPT] * N_SAMPLES, 3, sp, seeds=range(seed0, seed0 + N_SAMPLES), lookahead=la)
    assert all(len(t) == 3 for t in out.tokens)
    return counts_of(out.tokens, model.args.vocab_size, 3), out.stats


@pytest.mark.parametrize("mode", ["pass", "pass1"])
@pytest.mark.parametrize("setting", SETTINGS, ids=["t1", "t0.7-k5", "p0.9"])
def test_sampling_matches_autoregressive_distribution(tiny16, mode, setting):
    la = init_lookahead(tiny16, 3, "random", seed=1)
    exact = continuation_probs(tiny16, PROMPT, 3, *setting)
    counts, stats = draw(DECODERS[mode], tiny16, la, setting)
    p_value, impossible = g_test(counts, exact)
    assert impossible == 0, "sampled a continuation that has probability 0 under the target"
    assert p_value > 1e-3, f"G-test p = {p_value}"
    assert stats.accepted[0] > 0 and stats.attempted[0] > stats.accepted[0]  # both branches were exercised


def residual_from_target(model, p, drafts, n_drafts, u_accept, u_sample, q):
    """A planted bug: at a rejection, sample from the target instead of the residual max(0, p - q)."""
    tokens, n_acc = accept_ref(p, drafts, n_drafts, u_accept, u_sample, q=q)
    rows = torch.arange(len(n_acc))
    wrong = sample(p[rows, n_acc], u_sample)
    tokens[rows, n_acc] = torch.where(n_acc < n_drafts, wrong, tokens[rows, n_acc])
    return tokens, n_acc


@pytest.mark.parametrize("mode", ["pass", "pass1"])
def test_sampling_with_per_layer_additions_matches_autoregressive_distribution(tiny16, mode):
    setting = SETTINGS[1]
    exact = continuation_probs(tiny16, PROMPT, 3, *setting)
    counts, stats = draw(DECODERS[mode], tiny16, per_layer_lookahead(tiny16, 3), setting)
    p_value, impossible = g_test(counts, exact)
    assert impossible == 0 and p_value > 1e-3, f"G-test p = {p_value}"
    assert stats.accepted[0] > 0 and stats.attempted[0] > stats.accepted[0]


@pytest.mark.parametrize("mode", ["pass", "pass1"])
def test_drafts_come_from_the_per_layer_additions(tiny16, mode, monkeypatch):
    """Exactness holds whatever the drafts, so this checks the decoders really apply the additions: the first
    drafting logits equal a hand-built drafting call with them, and differ from the embeddings alone."""
    la = per_layer_lookahead(tiny16, 3)
    prompt = torch.tensor([PROMPT])
    want = tiny16.head(drafting_call(tiny16, prompt, len(PROMPT) - 1, la))  # (1, L, V)
    without = tiny16.head(drafting_call(tiny16, prompt, len(PROMPT) - 1, la[0]))
    assert (want - without).abs().max() > 1e-2
    seen, real = [], pd.draft_from

    def spy(sampling, logits, *rest):
        seen.append(logits.clone())
        return real(sampling, logits, *rest)

    monkeypatch.setattr(pd, "draft_from", spy)
    DECODERS[mode](tiny16, [PROMPT], 4, lookahead=la)
    torch.testing.assert_close(seen[0], want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mode", ["pass", "pass1"])
def test_distribution_test_rejects_planted_bug(tiny16, mode, monkeypatch):
    setting = SETTINGS[0]
    la = init_lookahead(tiny16, 3, "random", seed=1)
    exact = continuation_probs(tiny16, PROMPT, 3, *setting)
    monkeypatch.setattr(pd, "verify", residual_from_target)
    counts, _ = draw(DECODERS[mode], tiny16, la, setting)
    p_value, _ = g_test(counts, exact)
    assert p_value < 1e-6, f"the G-test failed to notice a wrong residual (p = {p_value})"


# --- batch: a row's output does not depend on the other rows -----------------------------------------------------

@pytest.mark.parametrize("mode", ["ar", "pass", "pass1"])
def test_rows_are_independent_of_the_batch(default_model, mode):
    model, tok = default_model
    prompts = [tok.encode(tok.chat_prompt(c)) for c in CHAT[:2]] + [tok.encode(c) for c in CODE[:2]]
    seeds = [11, 12, 13, 14]
    sp = SamplingParams(0.8, 10, 1.0)
    extra = {} if mode == "ar" else {"lookahead": init_lookahead(model, 3)}
    decode = ar_decode if mode == "ar" else DECODERS[mode]
    together = decode(model, prompts, 16, sp, seeds=seeds, **extra).tokens
    for i in range(4):
        alone = decode(model, [prompts[i]], 16, sp, seeds=[seeds[i]], **extra).tokens[0]
        assert alone == together[i]
    # And a reordered batch gives each row the same output.
    order = [2, 0, 3, 1]
    shuffled = decode(model, [prompts[i] for i in order], 16, sp, seeds=[seeds[i] for i in order], **extra).tokens
    assert [shuffled[order.index(i)] for i in range(4)] == together


# --- bad input ---------------------------------------------------------------------------------------------------

def test_lookahead_file_round_trip_and_truncation(tmp_path, tiny16):
    la = init_lookahead(tiny16, 4, "random")
    f = tmp_path / "la.safetensors"
    save_lookahead(f, la, tiny16, "tiny-v16")
    torch.testing.assert_close(load_lookahead(f, tiny16), la)
    torch.testing.assert_close(load_lookahead(f, tiny16, 2), la[:2])


def test_per_layer_file_round_trip_and_truncation(tmp_path, tiny16):
    la = per_layer_lookahead(tiny16, 4)
    f = tmp_path / "la.safetensors"
    save_lookahead(f, la, tiny16, "tiny-v16")
    torch.testing.assert_close(load_lookahead(f, tiny16), la)
    torch.testing.assert_close(load_lookahead(f, tiny16, 2), la[:, :2])


def test_per_layer_file_with_wrong_layer_count(tmp_path, tiny16):
    f = tmp_path / "la.safetensors"
    la = per_layer_lookahead(tiny16, 2)
    save_lookahead(f, la, tiny16)
    with safe_open(str(f), framework="pt") as h:
        meta, tensors = h.metadata(), {k: h.get_tensor(k) for k in h.keys()}
    tensors["layer_additions"] = tensors["layer_additions"][:-1]  # one layer short
    save_file(tensors, str(f), metadata=meta)
    n = tiny16.args.n_layers
    with pytest.raises(MinipassError, match=rf"'layer_additions' has shape \[{n - 2}, 2, 32\], expected "
                                            rf"\[{n - 1}, 2, 32\]"):
        load_lookahead(f, tiny16)


@pytest.mark.parametrize("L", [0, 5])
def test_lookahead_count_out_of_range(tmp_path, tiny16, L):
    f = tmp_path / "la.safetensors"
    save_lookahead(f, init_lookahead(tiny16, 4), tiny16)
    with pytest.raises(MinipassError, match=f"--lookahead must be between 1 and 4 .*got {L}"):
        load_lookahead(f, tiny16, L)


def test_lookahead_file_for_another_model(tmp_path, tiny16):
    f = tmp_path / "la.safetensors"
    other = tiny_model("tiny-v16", seed=6)
    save_lookahead(f, init_lookahead(other, 2), other, "another-tiny")
    with pytest.raises(MinipassError, match="trained for another-tiny .* not for this checkpoint"):
        load_lookahead(f, tiny16)


def test_lookahead_file_wrong_hidden_size(tmp_path, tiny16):
    f = tmp_path / "la.safetensors"
    big = tiny_model("tiny")
    save_lookahead(f, init_lookahead(big, 2), big)
    with pytest.raises(MinipassError, match=r"has shape \[2, 64\], expected \[L, 32\]"):
        load_lookahead(f, tiny16)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(temperature=1.0, top_k=-1), "top_k must be an integer >= 0"),
])
def test_bad_sampling_options(kwargs, message):
    with pytest.raises(MinipassError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("mode", ["ar", "pass", "pass1"])
def test_prompt_longer_than_context(tiny16, mode):
    decode = ar_decode if mode == "ar" else DECODERS[mode]
    extra = {} if mode == "ar" else {"lookahead": init_lookahead(tiny16, 2)}
    with pytest.raises(MinipassError, match="exceeds the model's context of 128 tokens"):
        decode(tiny16, [[1] * 120], 8, **extra)


@pytest.mark.parametrize("mode", ["pass", "pass1"])
def test_empty_or_misshaped_lookahead_is_refused(tiny16, mode):
    with pytest.raises(MinipassError, match=r"with L >= 1, got shape \[0, 32\]"):
        DECODERS[mode](tiny16, [[1, 2]], 4, lookahead=torch.zeros(0, 32))
    n = tiny16.args.n_layers
    with pytest.raises(MinipassError, match=rf"must be \(L, 32\) or \({n}, L, 32\).*got shape \[{n + 1}, 2, 32\]"):
        DECODERS[mode](tiny16, [[1, 2]], 4, lookahead=torch.zeros(n + 1, 2, 32))
