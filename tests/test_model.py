import pytest
import torch

from minipass.config import ModelArgs
from minipass.model import attention_bias, attention_torch
from tests.util import tiny_model

CONFIGS = ["tiny", "tiny-untied-mha", "tiny-llama3"]


def full_forward(model, seq):
    """Logits of every position of one sequence in a single call from an empty cache."""
    model.setup_caches(1, len(seq) + 1)
    x = torch.tensor([seq])
    return model(x, input_pos=torch.arange(len(seq))[None], cache_seqlens=torch.zeros(1, dtype=torch.long))[0]


@pytest.mark.parametrize("name", CONFIGS)
def test_incremental_decoding_matches_full_forward(name):
    model = tiny_model(name)
    seq = torch.randint(0, model.args.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = full_forward(model, seq)
    # Prefill 25 tokens, then feed the rest in chunks of 1, 3 and 11 tokens.
    model.setup_caches(1, 64)
    pos, chunks, got = 0, [25, 1, 3, 11], []
    for n in chunks:
        x = torch.tensor([seq[pos:pos + n]])
        got.append(model(x, input_pos=torch.arange(pos, pos + n)[None],
                         cache_seqlens=torch.tensor([pos]))[0])
        pos += n
    torch.testing.assert_close(torch.cat(got), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", CONFIGS)
def test_ragged_batch_matches_rows_alone(name):
    model = tiny_model(name)
    g = torch.Generator().manual_seed(2)
    lens = [5, 17, 1, 11]
    seqs = [torch.randint(0, model.args.vocab_size, (n,), generator=g).tolist() for n in lens]
    nxt = [3, 4, 5, 6]
    refs = [full_forward(model, s + [t]) for s, t in zip(seqs, nxt)]

    # Right-padded prefill of every row from an empty cache, then one more token per row at its own length.
    B, T = len(seqs), max(lens)
    tokens = torch.zeros(B, T, dtype=torch.long)
    for b, s in enumerate(seqs):
        tokens[b, :len(s)] = torch.tensor(s)
    model.setup_caches(B, 40)
    prefill = model(tokens, input_pos=torch.arange(T).expand(B, -1), cache_seqlens=torch.zeros(B, dtype=torch.long))
    lens_t = torch.tensor(lens)
    step = model(torch.tensor(nxt)[:, None], input_pos=lens_t[:, None], cache_seqlens=lens_t)
    for b, (s, ref) in enumerate(zip(seqs, refs)):
        torch.testing.assert_close(prefill[b, :len(s)], ref[:len(s)], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(step[b, 0], ref[len(s)], atol=1e-5, rtol=1e-5)


def test_mask_among_new_tokens_is_metamorphic():
    """With a tree mask, each new token's logits equal a causal run over only the tokens it may see."""
    model = tiny_model("tiny")
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(0, 256, (9,), generator=g).tolist()
    # A tree over 6 new tokens: parents[i] is the new token i hangs from (-1 = the cached prefix).
    parents = [-1, 0, 0, 1, 2, 2]
    new = torch.randint(0, 256, (6,), generator=g).tolist()
    T = len(new)
    mask = torch.eye(T, dtype=torch.bool)
    depth = []
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] |= mask[p]
        depth.append(0 if p < 0 else depth[p] + 1)
    model.setup_caches(1, 32)
    L = len(prefix)
    model(torch.tensor([prefix]), input_pos=torch.arange(L)[None], cache_seqlens=torch.zeros(1, dtype=torch.long))
    logits = model(torch.tensor([new]), input_pos=(L + torch.tensor(depth))[None], cache_seqlens=torch.tensor([L]),
                   mask=mask)[0]
    for i in range(T):
        path = [j for j in range(T) if mask[i, j]]
        ref = full_forward(model, prefix + [new[j] for j in path])[-1]
        torch.testing.assert_close(logits[i], ref, atol=1e-5, rtol=1e-5)


def test_attention_bias_layout():
    # Row 0 has 2 cached tokens, row 1 none; 3 new tokens with a custom mask for row 0 and causal for row 1.
    seqlens = torch.tensor([2, 0])
    m = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 1, 1]], dtype=torch.bool)
    causal = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    bias = attention_bias(seqlens, torch.stack([m, causal]), 3, 6)
    assert bias.dtype == torch.float32 and set(bias.unique().tolist()) == {0.0, float("-inf")}
    full = bias == 0
    expect0 = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    expect1 = torch.tensor([[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(full[0], expect0) and torch.equal(full[1], expect1)
    assert torch.equal(attention_bias(seqlens, None, 3, 6)[1] == 0, expect1)


def test_attention_row_does_not_depend_on_the_call_width():
    # A query row's output is the same bits whether it comes alone (an AR step), in a narrow chain or in a wider
    # call; bf16, grouped heads, a causal chain after 300 cached slots of a 512-slot cache.
    torch.manual_seed(0)
    W, L, S = 17, 300, 512
    q = torch.randn(1, 9, W, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 3, S, 64, dtype=torch.bfloat16) for _ in range(2))
    bias = attention_bias(torch.tensor([L]), None, W, S).to(torch.bfloat16)
    wide = attention_torch(q, k, v, bias)
    for T in (1, 2, 5):
        for t in range(0, W - T + 1, T):
            narrow = attention_torch(q[:, :, t:t + T], k, v, bias[:, t:t + T])
            assert torch.equal(narrow, wide[:, :, t:t + T]), (T, t)


def test_llama3_rope_scaling_changes_only_low_frequencies():
    from minipass.model import rope_frequencies

    base = ModelArgs.from_name("tiny-llama3")
    plain = ModelArgs(**{**base.__dict__, "rope_scaling": None})
    scaled, ref = rope_frequencies(base), rope_frequencies(plain)
    assert torch.equal(scaled[0], ref[0])  # the highest frequency is untouched
    torch.testing.assert_close(scaled[-1], ref[-1] / 8.0)  # the lowest is divided by `factor`


def test_logits_index_selects_positions():
    model = tiny_model("tiny")
    seq = list(range(10, 22))
    ref = full_forward(model, seq)
    model.setup_caches(2, 16)
    x = torch.tensor([seq, seq])
    idx = torch.tensor([[11], [3]])
    out = model(x, input_pos=torch.arange(12).expand(2, -1), cache_seqlens=torch.zeros(2, dtype=torch.long),
                logits_index=idx)
    torch.testing.assert_close(out[:, 0], ref[[11, 3]], atol=1e-5, rtol=1e-5)
