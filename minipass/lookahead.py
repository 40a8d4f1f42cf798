"""Look-ahead embeddings: the only parameters PaSS adds to a frozen model (L vectors of the hidden size).

They are fed as input embeddings after the last real token: look-ahead token k sits at RoPE position pos(x_t) + k,
attends to the prefix and to the earlier look-ahead tokens of its own block, and its output is a draft of the token
k positions after the next one. Because look-ahead token k only attends to tokens 1..k of its block, embeddings
trained for L_max serve every L <= L_max by truncation.

File format: safetensors with one fp32 tensor "lookahead" (L, hidden_size) and metadata `lookahead` (L),
`hidden_size`, `base_fingerprint` (see `fingerprint`) and `base_model` (a name, for messages).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from minipass.errors import MinipassError
from minipass.model import Transformer

TENSOR = "lookahead"


def fingerprint(model: Transformer) -> str:
    """A short hash identifying the base weights: the architecture plus the first rows of the embedding matrix.

    Models loaded from a checkpoint hash the stored tensor (so the load dtype does not matter); see loading.py.
    """
    stored = getattr(model, "embedding_sample", None)
    sample = stored if stored is not None else model.embed_tokens.weight[:16].detach().cpu()
    return fingerprint_from(model.args, sample)


def fingerprint_from(args, embedding_sample: Tensor) -> str:
    h = hashlib.sha256()
    h.update(f"{args.vocab_size} {args.dim} {args.n_layers} {args.n_heads} {args.n_kv_heads}".encode())
    h.update(str(embedding_sample.dtype).encode())
    h.update(embedding_sample.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def init_lookahead(model: Transformer, L: int, how: str = "mean", seed: int = 0) -> Tensor:
    """Untrained embeddings (L, dim), fp32: the mean token embedding (default), or small random vectors."""
    w = model.embed_tokens.weight.detach().float()
    if how == "mean":
        return w.mean(0).expand(L, -1).clone()
    if how == "random":
        g = torch.Generator().manual_seed(seed)
        return (torch.randn(L, w.shape[1], generator=g) * w.std().item()).to(w.device)
    raise MinipassError(f"unknown look-ahead init {how!r}; use 'mean' or 'random'")


def save_lookahead(path: Union[str, Path], emb: Tensor, model: Transformer, base_model: str = "") -> None:
    """Write the embeddings atomically (a temp file renamed into place)."""
    path = Path(path)
    meta = {"lookahead": str(emb.shape[0]), "hidden_size": str(emb.shape[1]),
            "base_fingerprint": fingerprint(model), "base_model": base_model}
    tmp = path.with_name(path.name + ".tmp")
    save_file({TENSOR: emb.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
    tmp.replace(path)


def load_lookahead(path: Union[str, Path], model: Transformer, L: Optional[int] = None) -> Tensor:
    """The first L embeddings (L, dim) of `path`, on the model's device and dtype, checked against the model."""
    path = Path(path)
    if not path.is_file():
        raise MinipassError(f"look-ahead file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if TENSOR not in f.keys():
                raise MinipassError(f"{path} has no tensor {TENSOR!r}; it is not a look-ahead embeddings file")
            emb = f.get_tensor(TENSOR)
    except SafetensorError as e:
        raise MinipassError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
    dim = model.args.dim
    if emb.dim() != 2 or emb.shape[1] != dim:
        raise MinipassError(f"{path}: tensor {TENSOR!r} has shape {list(emb.shape)}, expected [L, {dim}] for this "
                            "model's hidden size")
    want = fingerprint(model)
    if meta.get("base_fingerprint") != want:
        made_for = meta.get("base_model") or "another model"
        raise MinipassError(f"{path} was trained for {made_for} (fingerprint {meta.get('base_fingerprint')}), "
                            f"not for this checkpoint (fingerprint {want})")
    L = emb.shape[0] if L is None else L
    if not 1 <= L <= emb.shape[0]:
        raise MinipassError(f"--lookahead must be between 1 and {emb.shape[0]} (the embeddings in {path}), got {L}")
    weight = model.embed_tokens.weight
    return emb[:L].to(device=weight.device, dtype=weight.dtype)
