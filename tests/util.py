"""Helpers for tests: tiny random models and checkpoints written in the Hugging Face layout."""

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from safetensors.torch import save_file

from minipass.config import TINY_CONFIGS, ModelArgs
from minipass.model import Transformer


def transformers_or_skip():
    """The transformers module (with the installed `kernels` distribution, not this checkout's folder), or a skip."""
    import pytest

    from minipass.hf import import_transformers

    try:
        return import_transformers()
    except ImportError:
        pytest.skip("transformers is not installed", allow_module_level=True)

# Prompts of the greedy token-identity tests on the default model: chat turns and code.
CHAT = ["What is the capital of France?", "Write a haiku about autumn leaves.",
        "Explain in two sentences why the sky is blue.", "List three uses of a paperclip."]
CODE = ["def fibonacci(n):\n", "import numpy as np\n\ndef normalize(v):\n    \"\"\"Scale v to unit length.\"\"\"\n",
        "class Stack:\n    def __init__(self):\n",
        "def is_palindrome(s: str) -> bool:\n    \"\"\"Return True if s reads the same backwards.\"\"\"\n"]

# Distribution tests: sampling settings (temperature, top-k, top-p), draws per test, and the prompt.
SETTINGS = [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.9)]
N_SAMPLES = 20000
PROMPT = [3, 1, 4, 1]


def tiny_model(name: str = "tiny", seed: int = 0, dtype=torch.float32, embed_std: float = 1.0) -> Transformer:
    """A random model. A small embed_std flattens the output distribution (logits scale with the embeddings when
    they are tied), which the sampling tests need: a near one-hot target would test nothing."""
    torch.manual_seed(seed)
    model = Transformer(ModelArgs.from_name(name))
    model.embed_tokens.weight.data.mul_(embed_std)
    # Random norms too, so a bug that ignores a norm weight shows up.
    for mod in model.modules():
        if hasattr(mod, "eps"):
            mod.weight.data.uniform_(0.5, 1.5)
    return model.to(dtype).eval().requires_grad_(False)


def per_layer_lookahead(model: Transformer, L: int, seed: int = 1) -> Tensor:
    """Random look-ahead embeddings with random (non-zero) per-layer additions: (n_layers, L, dim)."""
    from minipass.lookahead import init_lookahead

    la = init_lookahead(model, L, "random", seed, per_layer=True)
    g = torch.Generator().manual_seed(seed + 1)
    la[1:] = torch.randn(la[1:].shape, generator=g) * model.embed_tokens.weight.std().item()
    return la.to(model.embed_tokens.weight.dtype)


def drafting_call(model: Transformer, tokens: Tensor, a: int, emb: Tensor) -> Tensor:
    """Hidden states of LA_1..LA_L after anchor a, built by hand as the paper's drafting call: x_0..x_{a-1} prefilled
    into the cache, then [x_a, LA_1..LA_L] at positions a..a+L, with any per-layer additions at the LA rows only.
    tokens: (B, n); emb: (L, dim) or (n_layers, L, dim); returns (B, L, dim)."""
    from minipass.train_lookahead import fresh_caches

    B, L = tokens.shape[0], emb.shape[-2]
    model.setup_caches(B, a + 1 + L)
    if emb.requires_grad:  # autograd needs per-layer buffers (see fresh_caches)
        fresh_caches(model, B, a + 1 + L)
    zero = torch.zeros(B, dtype=torch.long)
    if a > 0:
        model(tokens[:, :a], input_pos=torch.arange(a).expand(B, -1), cache_seqlens=zero)
    la = emb if emb.dim() == 2 else emb[0]
    adds = None if emb.dim() == 2 else F.pad(emb[1:], (0, 0, 1, 0))[:, None]  # (n_layers - 1, 1, 1 + L, dim)
    x = torch.cat([model.embed(tokens[:, a: a + 1]), la[None].expand(B, -1, -1)], 1)
    h = model(embeds=x, input_pos=torch.arange(a, a + 1 + L).expand(B, -1), cache_seqlens=zero + a,
              return_hidden=True, layer_adds=adds)
    return h[:, 1:]


def hf_state_dict(model: Transformer) -> dict:
    """The model's tensors under their Hugging Face names."""
    out = {}
    for name, t in model.state_dict().items():
        out[name if name.startswith("lm_head") else "model." + name] = t.contiguous()
    return out


def save_checkpoint(model: Transformer, path: Path, shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.args.to_hf_config(), indent=2))
    sd = hf_state_dict(model)
    if shards == 1:
        save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    names = sorted(sd)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: sd[n] for n in names[i::shards]}
        save_file(part, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def tiny_checkpoint(path, tokenizer=True):
    """A tiny random model with a byte-level tokenizer (256 bytes + <|im_end|>), in the Hugging Face layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers


    torch.manual_seed(0)
    model = Transformer(ModelArgs(**dict(TINY_CONFIGS["tiny"], vocab_size=264))).eval().requires_grad_(False)
    save_checkpoint(model, path)
    if tokenizer:
        vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
        tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens(["<|im_end|>"])
        tk.save(str(path / "tokenizer.json"))
        (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "add_bos_token": False}))
    return path


def compiled_graph_ops(fn, *args) -> tuple:
    """(outputs of fn compiled with fullgraph=True, the targets of the call_function nodes of its one graph)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    assert len(graphs) == 1
    return out, [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
