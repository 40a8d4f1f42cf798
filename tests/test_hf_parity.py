"""Logits against an independent implementation: transformers' LlamaForCausalLM on the same safetensors files."""

import pytest
import torch

from minipass.loading import load_model
from tests.util import save_checkpoint, tiny_model, transformers_or_skip

transformers = transformers_or_skip()

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "<|im_start|>user\nWhat is 17 * 23?<|im_end|>\n<|im_start|>assistant\n"]


def hf_logits(path, ids):
    hf = transformers.LlamaForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]


def our_logits(model, ids):
    model.setup_caches(1, len(ids))
    return model(torch.tensor([ids]), input_pos=torch.arange(len(ids))[None],
                 cache_seqlens=torch.zeros(1, dtype=torch.long))[0]


@pytest.mark.parametrize("name", ["tiny", "tiny-untied-mha", "tiny-llama3"])
def test_tiny_checkpoints_match_transformers(tmp_path, name):
    model = tiny_model(name)
    path = save_checkpoint(model, tmp_path / name)
    ids = torch.randint(0, model.args.vocab_size, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    ours = our_logits(load_model(path), ids)
    torch.testing.assert_close(ours, hf_logits(path, ids), atol=1e-4, rtol=1e-4)


def test_default_model_matches_transformers(default_ckpt, default_model):
    model, tok = default_model
    hf = transformers.LlamaForCausalLM.from_pretrained(str(default_ckpt), dtype=torch.float32).eval()
    for text in PROMPTS:
        ids = tok.encode(text)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        delta = (our_logits(model, ids) - ref).abs().max().item()
        assert delta < 1e-3, f"max |delta logit| = {delta} on {text!r}"
