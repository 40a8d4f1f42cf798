"""The look-ahead embeddings shipped for the default model: they load as the default, truncate, and the decoders
that use them stay token-identical to autoregressive greedy decoding (trained drafts get accepted far more often than
untrained ones, so this exercises the multi-token acceptance paths on the real model)."""

import pytest
import torch

from minipass.errors import MinipassError
from minipass.decoders import DEFAULT_LOOKAHEAD_FILE, lookahead_for
from minipass.lookahead import load_lookahead
from minipass.pass_decoding import pass1_decode, pass_decode
from minipass.tree_decoding import tree_decode

NEW_TOKENS = 24  # what the greedy_setup fixture (conftest.py) generates per prompt


def test_shipped_file_is_the_default_and_truncates(default_model):
    model, _ = default_model
    assert DEFAULT_LOOKAHEAD_FILE.is_file()
    full = load_lookahead(DEFAULT_LOOKAHEAD_FILE, model)
    assert full.shape == (model.args.n_layers, 8, model.args.dim)  # embeddings and per-layer additions
    la, source = lookahead_for(model, None, 3, default_model=True)
    assert torch.equal(la, full[:, :3]) and source == str(DEFAULT_LOOKAHEAD_FILE)
    with pytest.raises(MinipassError, match="9"):
        lookahead_for(model, None, 9, default_model=True)
    untrained, source = lookahead_for(model, None, 3, default_model=False)
    assert source.startswith("untrained") and not torch.equal(untrained, full[:, :3])


@pytest.mark.parametrize("mode", ["pass", "pass1", "tree"])
def test_greedy_with_shipped_embeddings_is_token_identical_to_ar(greedy_setup, mode):
    model, tok, prompts, ref = greedy_setup
    la = load_lookahead(DEFAULT_LOOKAHEAD_FILE, model, 8 if mode != "tree" else 4)
    decode = {"pass": pass_decode, "pass1": pass1_decode, "tree": tree_decode}[mode]
    out, accepted = [], 0
    for batch in (prompts[:4], prompts[4:]):
        res = decode(model, batch, NEW_TOKENS, stop_ids=tok.eos_ids, lookahead=la)
        out += res.tokens
        accepted += sum(res.stats.accepted)
    assert out == ref
    assert accepted > 0  # the drafts were really used
