"""The model and the decoders give the same results through the Triton kernels (interpreted on the CPU here) and
through torch."""

import pytest
import torch

from minipass.lookahead import init_lookahead
from minipass.pass_decoding import pass1_decode
from minipass.tree_decoding import TreeConfig, tree_decode
from tests.util import tiny_model


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
