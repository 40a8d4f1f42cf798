import pytest
import torch

from minipass.config import ModelArgs
from minipass.model import Transformer, attention_layout, attention_torch
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


def test_attention_layout_gathers_each_rows_last_keys_in_decoding_order():
    # Row 0 has 70 cached tokens and a tree mask (new token 2 sees 0 and itself, not its sibling 1); row 1 has none
    # and is causal. A row at position p sums the slots below cut = 16 * (p // 16) - 16 where they are, and its
    # last keys from the cut on gathered in the order a one-token call at p holds them: the committed slots, then
    # its attended new tokens.
    seqlens = torch.tensor([70, 0])
    m = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    causal = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    layout = attention_layout(seqlens, torch.stack([m, causal]), 3, 200)
    assert layout.bias is None
    early, keys, late = layout.recent
    early, keys, late = early.view(2, 3, 200) == 0, keys.view(2, 3, 32), late.view(2, 3, 32) == 0
    assert early.sum(-1).tolist() == [[48] * 3, [0] * 3]  # positions 70, 71, 71: cut 48; positions 0, 1, 2: cut 0
    assert torch.equal(early, torch.arange(200) < early.sum(-1, keepdim=True))  # the slots below the cut
    assert late.sum(-1).tolist() == [[23, 24, 24], [1, 2, 3]]  # from the cut up to the row itself
    assert torch.equal(late, torch.arange(32) < late.sum(-1, keepdim=True))
    assert keys[0, 2, :24].tolist() == list(range(48, 70)) + [70, 72]  # new token 2 after its parent: 71 skipped
    assert keys[0, 1, :24].tolist() == list(range(48, 72))
    assert keys[1, 2, :3].tolist() == [0, 1, 2]
    wide = attention_layout(seqlens, None, 33, 200)  # wider calls (a prefill): one mask over the slots
    assert wide.recent is None and torch.equal(wide.bias[1] == 0, torch.ones(33, 200, dtype=torch.bool).tril())


def test_attention_row_does_not_depend_on_the_call_width():
    # A query row's output is the same bits whether it comes alone (an AR step), in a narrow chain or in a wider
    # call; bf16, grouped heads, a causal chain after 300 cached slots of a 512-slot cache.
    torch.manual_seed(0)
    W, L, S = 17, 300, 512
    q = torch.randn(1, 9, W, 64, dtype=torch.bfloat16)
    k, v = (torch.randn(1, 3, S, 64, dtype=torch.bfloat16) for _ in range(2))
    wide = attention_torch(q, k, v, attention_layout(torch.tensor([L]), None, W, S))
    for T in (1, 2, 5):
        for t in range(0, W - T + 1, T):
            narrow = attention_torch(q[:, :, t:t + T], k, v, attention_layout(torch.tensor([L + t]), None, T, S))
            assert torch.equal(narrow, wide[:, :, t:t + T]), (T, t)


def random_tree_mask(T: int, g: torch.Generator) -> torch.Tensor:
    """The ancestor mask (T, T) of a random tree over T nodes in topological order (node 0 the root)."""
    mask = torch.eye(T, dtype=torch.bool)
    for i in range(1, T):
        mask[i] |= mask[int(torch.randint(0, i, (1,), generator=g))]
    return mask


def rows_keep_their_bits(dtype, M: int, K: int, N: int) -> bool:
    """Whether this CPU's batched product of (M, K) by (K, N) matrices gives its first rows the bits they get in a
    product of their own: what the attention's scores and its product with V need for a row to get the same bits in
    a wide call as alone (MKL's fp32 products on the AMD EPYC do not, from M = 6 rows on; its bf16 ones do)."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, M, K, generator=g).to(dtype), torch.randn(3, K, N, generator=g).to(dtype)
    return torch.equal((a @ b)[:, :3], a[:, :3] @ b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_tree_attention_row_is_the_one_token_calls(dtype):
    # A tree node's attention output has the bits of the one-token call an autoregressive decode makes at its
    # position, whose cache holds the node's ancestors at consecutive slots: the keys of a tree row are packed
    # (attention_layout). Without the packing, the softmax's sum groups the same terms differently and 1-ulp
    # differences appear (in this test, in most trees).
    g = torch.Generator().manual_seed(0)
    S, Hq, Hkv, D, T = 512, 9, 3, 64, 25
    G = Hq // Hkv
    if not (rows_keep_their_bits(dtype, G * T, D, S) and rows_keep_their_bits(dtype, G * T, S, D)):
        pytest.skip(f"this CPU's {dtype} batched products give a row other bits among {G * T} rows than among {G}")
    for trial in range(6):
        B = 2
        L = torch.randint(1, S - 2 * T, (B,), generator=g)
        mask = torch.stack([random_tree_mask(T, g) for _ in range(B)])
        q = torch.randn(B, Hq, T, D, generator=g).to(dtype)
        k, v = (torch.randn(B, Hkv, S, D, generator=g).to(dtype) * 2 for _ in range(2))
        out = attention_torch(q, k, v, attention_layout(L, mask, T, S))
        for b in range(B):
            for i in range(T):
                path = mask[b, i].nonzero()[:, 0]  # the node's ancestors and itself, in call order = by depth
                n = int(L[b]) + len(path)  # the one-token call's committed length, itself included
                kc, vc = k[b:b + 1].clone(), v[b:b + 1].clone()
                kc[:, :, int(L[b]):n], vc[:, :, int(L[b]):n] = k[b:b + 1, :, L[b] + path], v[b:b + 1, :, L[b] + path]
                one = attention_torch(q[b:b + 1, :, i:i + 1], kc, vc, attention_layout(torch.tensor([n - 1]), None, 1, S))
                assert torch.equal(one[0, :, 0], out[b, :, i]), (trial, b, i)


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


def tree_vs_one_token_calls(model, forward, mask, g):
    """Logits of a T-token call whose new tokens form the tree of `mask` (T, T) after a ragged prefix of 2 rows,
    and the logits of the same tokens from one-token calls down each node's path (an autoregressive decode): a list
    of (b, node, call's logits, one-token call's logits)."""
    B, T, V = 2, mask.shape[0], model.args.vocab_size
    lens = [21, 40]
    prefix = torch.randint(0, V, (B, max(lens)), generator=g)
    new = torch.randint(0, V, (B, T), generator=g)
    depth = mask.sum(-1) - 1
    model.setup_caches(B, 128)

    def prefill(rows):
        model.kv_store.zero_()
        model(prefix[rows], input_pos=torch.arange(max(lens)).expand(len(rows), -1),
              cache_seqlens=torch.zeros(len(rows), dtype=torch.long))

    L = torch.tensor(lens)
    prefill([0, 1])
    wide = forward(model, new, L[:, None] + depth, L, mask.expand(B, T, T))
    out = []
    for b in range(B):
        for i in range(T):
            path = mask[i].nonzero()[:, 0]  # ancestors and the node, in call order = by depth
            prefill([b, b])
            for d, j in enumerate(path.tolist()):
                seq = torch.tensor([lens[b] + d] * 2)
                one = forward(model, new[[b, b], j:j + 1], seq[:, None], seq, torch.ones(B, 1, 1, dtype=torch.bool))
            out.append((b, i, wide[b, i], one[0, 0]))
    return out


@pytest.mark.parametrize("dtype, head_dim", [(torch.bfloat16, 16), (torch.float32, 16), (torch.bfloat16, 32)])
@pytest.mark.parametrize("compiled", [False, True])
def test_tree_logits_are_the_one_token_calls(dtype, head_dim, compiled):
    """A tree call's logits at every node are bit for bit those of the one-token calls an autoregressive decode
    makes down the node's path, eager and compiled with the CPU options of the decoding steps: what makes greedy
    tree decoding token-identical to AR in any dtype. A causal chain in a call of the same width is checked first:
    if the machine's matrix products round a row differently by the number of rows, no layout can help, and the
    test says so instead of failing, except where the products are minipass's CPU kernels (bf16 on a CPU that
    prefers them), which sum a row alike in any call: there it fails. Heads of 32 take minipass's CPU attention
    operator where it runs (the tiny model's 16 stay on torch's attention)."""
    from minipass.decoding import compile_fn
    from minipass.kernels import cpu_bf16

    model = tiny_model("tiny", dtype=dtype)
    if head_dim != model.args.head_dim:
        torch.manual_seed(0)
        args = ModelArgs(**{**model.args.__dict__, "dim": head_dim * model.args.n_heads, "head_dim": head_dim})
        model = Transformer(args).to(dtype).eval().requires_grad_(False)

    def fwd(m, tokens, pos, seq, mask):
        return m(tokens, input_pos=pos, cache_seqlens=seq, mask=mask)

    torch._dynamo.reset()  # a frozen graph of an earlier model could pass the guards of this one
    forward = compile_fn(fwd, torch.device("cpu")) if compiled else fwd
    g = torch.Generator().manual_seed(4)
    T = 13
    with torch.no_grad():
        chain = tree_vs_one_token_calls(model, forward, torch.ones(T, T, dtype=torch.bool).tril(), g)
        if not all(torch.equal(a, b) for _, _, a, b in chain):
            assert not (dtype == torch.bfloat16 and cpu_bf16.preferred()), \
                f"a causal chain's rows differ from the one-token calls' through minipass's CPU kernels"
            pytest.skip(f"this CPU's {dtype} products give a row other bits in a {T}-row call than alone")
        trees = [tree_vs_one_token_calls(model, forward, random_tree_mask(T, g), g) for _ in range(3)]
    differ = [(b, i) for tree in trees for b, i, a, ref in tree if not torch.equal(a, ref)]
    assert not differ, f"nodes whose logits differ from the one-token calls': {differ}"


@pytest.mark.parametrize("kernel", ["cpu_bf16", "torch"])
def test_a_lone_row_gets_the_bits_it_gets_among_more_rows(kernel, monkeypatch):
    # model.product: an eager one-row call has the bits of the same row in a wider call, through minipass's CPU
    # kernel (its sums do not depend on the other rows) and through torch's product, where a product of many inputs
    # takes the row as one of two (oneDNN's one-row bf16 kernel on the AMD EPYC rounds otherwise from 1280 inputs on).
    from minipass.kernels import cpu_bf16
    from minipass.model import WIDE_INPUT, product

    if kernel == "cpu_bf16" and not cpu_bf16.preferred():
        pytest.skip(f"the model does not take minipass's CPU kernels here: {cpu_bf16.why_not() or 'AMX'}")
    if kernel == "torch":
        monkeypatch.setattr(cpu_bf16, "fits", lambda x, weight: False)
    g = torch.Generator().manual_seed(0)
    for inputs in (576, WIDE_INPUT + 512):
        linear = torch.nn.Linear(inputs, 576, bias=False).to(torch.bfloat16)
        x = torch.randn(1, 8, inputs, generator=g).to(torch.bfloat16)
        with torch.no_grad():
            # unit-scale weights: with the default init's small ones the one-row kernel happened to round alike
            linear.weight.copy_(torch.randn(576, inputs, generator=g))
            wide = product(linear, x)
            if kernel == "torch":
                assert torch.equal(wide, linear(x))
            for t in range(8):
                one = product(linear, x[:, t:t + 1])
                assert one.shape == (1, 1, 576)
                assert torch.equal(one[0, 0], wide[0, t]), (inputs, t)
