"""The model and the decoders give the same results through the Triton kernels (interpreted on the CPU here) and
through torch."""

import pytest
import torch
import torch._dynamo

import minipass.decoding as dec
from minipass.decoding import SamplingParams, ar_decode
from minipass.lookahead import init_lookahead
from minipass.pass_decoding import pass1_decode, pass_decode
from minipass.tree_decoding import TreeConfig, ngram_decode, tree_decode
from tests.util import tiny_model

# The compiled-step tests' decode: two ragged prompts, a tree with look-ahead and n-gram candidates.
PROMPTS = [[5, 6, 7, 8, 5, 6, 7, 2], [9, 10, 9]]
TREE = TreeConfig(nodes=6, topk=2, blocks=1, ngram_len=3, ngram_chains=2)


@pytest.fixture
def both():
    torch_model = tiny_model("tiny", seed=3)
    triton_model = tiny_model("tiny", seed=3)
    triton_model.set_kernels("triton")
    return torch_model, triton_model


def test_logits_match_through_both_attention_paths(both):
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 256, (2, 11), generator=g)
    new = torch.randint(0, 256, (2, 6), generator=g)
    mask = torch.rand(2, 6, 6, generator=g) < 0.5
    mask |= torch.eye(6, dtype=torch.bool)
    lens = torch.tensor([11, 7])  # row 1 keeps only 7 of its prefix tokens: ragged cache lengths
    outs = []
    for model in both:
        model.setup_caches(2, 32)
        a = model(prefix, input_pos=torch.arange(11).expand(2, -1), cache_seqlens=torch.zeros(2, dtype=torch.long))
        pos = lens[:, None] + torch.tensor([0, 1, 1, 2, 2, 3])
        b = model(new, input_pos=pos, cache_seqlens=lens, mask=mask)
        outs.append((a, b))
    torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-4, rtol=1e-4)


def test_decoders_agree_through_both_paths(both):
    prompts = [[5, 6, 7, 8, 5, 6], [9, 10]]
    la = init_lookahead(both[0], 2, "random")
    res = []
    for model in both:
        res.append((pass1_decode(model, prompts, 6, lookahead=la).tokens,
                    tree_decode(model, prompts, 6, lookahead=la, tree=TreeConfig(nodes=6, topk=2, blocks=1)).tokens))
    assert res[0] == res[1]


@pytest.mark.parametrize("mode", ["ar", "pass", "pass1", "ngram", "tree"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_compiled_step_holds_the_triton_ops_and_decodes_like_eager(both, mode, temperature):
    """Every mode's step through the Triton kernels (interpreted here) compiles whole (fullgraph=True, once for the
    decode), its one graph calls the kernels as the torch ops minipass::attention, and when sampling
    minipass::accept (chains) or minipass::accept_tree (trees), and it decodes what the eager step decodes; greedy,
    that is autoregressive greedy output."""
    torch_model, model = both
    la = init_lookahead(torch_model, 2, "random")
    decode = {"ar": ar_decode, "pass": lambda *a, **k: pass_decode(*a, lookahead=la, **k),
              "pass1": lambda *a, **k: pass1_decode(*a, lookahead=la, **k), "ngram": ngram_decode,
              "tree": lambda *a, **k: tree_decode(*a, lookahead=la, tree=TREE, **k)}[mode]
    prompts = PROMPTS
    sampling = SamplingParams(temperature, 5 if temperature else 0)
    targets = []

    def backend(gm, example_inputs):  # records the graph, runs it as traced
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    dec._COMPILED.clear()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            out = decode(model, prompts, 8, sampling, seeds=[1, 2], compile={"backend": backend})
    finally:
        dec._COMPILED.clear()
    assert out.tokens == decode(model, prompts, 8, sampling, seeds=[1, 2]).tokens
    if temperature == 0:
        assert out.tokens == ar_decode(torch_model, prompts, 8).tokens
    expected = {"minipass.attention"}
    if temperature and mode != "ar":
        expected.add("minipass.accept" if mode in ("pass", "pass1") else "minipass.accept_tree")
    assert expected <= {t for t in targets if t.startswith("minipass.")}, sorted(set(targets))


def test_inductor_compiles_the_tree_step_around_the_triton_ops(both):
    """Inductor (as --compile uses it, C++ kernels for the rest of the step on the CPU) around the Triton ops:
    a sampled tree decode through the compiled step gives the eager step's tokens."""
    torch_model, model = both
    la = init_lookahead(torch_model, 2, "random")
    tree, prompts = TREE, PROMPTS
    sampling = SamplingParams(0.8, 5)
    dec._COMPILED.clear()
    try:
        out = tree_decode(model, prompts, 8, sampling, seeds=[1, 2], lookahead=la, tree=tree, compile={"options": {}})
    finally:
        dec._COMPILED.clear()
    assert out.tokens == tree_decode(model, prompts, 8, sampling, seeds=[1, 2], lookahead=la, tree=tree).tokens
