"""Look-ahead embeddings: the only parameters PaSS adds to a frozen model (L vectors of the hidden size).

They are fed as input embeddings after the last real token: look-ahead token k sits at RoPE position pos(x_t) + k,
attends to the prefix and to the earlier look-ahead tokens of its own block, and its output is a draft of the token
k positions after the next one. Because look-ahead token k only attends to tokens 1..k of its block, embeddings
trained for L_max serve every L <= L_max by truncation.

Per-layer variant (more, still tiny, parameters): besides the input embedding, each look-ahead token k has a learned
vector added to the residual stream before every later layer (n_layers x L x dim in all; deep prompt tuning applied
at the look-ahead positions only). The real tokens never see the look-ahead tokens, so their outputs are unchanged.
In memory a look-ahead is one tensor: (L, dim) embeddings, or (n_layers, L, dim) where [0] are the embeddings and [l]
the additions before layer l. Truncation to the first L tokens holds for both.

File format: safetensors with an fp32 tensor "lookahead" (L, hidden_size), for the per-layer variant also
"layer_additions" (n_layers - 1, L, hidden_size), and metadata `lookahead` (L), `hidden_size`, `base_fingerprint`
(see `fingerprint`) and `base_model` (a name, for messages).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from minipass.distributed import embedding_moments
from minipass.errors import MinipassError
from minipass.model import Transformer

TENSOR = "lookahead"
LAYERS = "layer_additions"


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


def init_lookahead(model: Transformer, L: int, how: str = "mean", seed: int = 0, per_layer: bool = False) -> Tensor:
    """Untrained embeddings (L, dim), fp32: the mean token embedding (default), or small random vectors. per_layer:
    (n_layers, L, dim) with zero layer additions (the same function as the embeddings alone)."""
    # Statistics of the whole table, also when its rows are split over tensor-parallel ranks.
    mean, std = embedding_moments(model.embed_tokens.weight, model.group)
    if how == "mean":
        emb = mean.expand(L, -1).clone()
    elif how == "random":
        g = torch.Generator().manual_seed(seed)
        emb = (torch.randn(L, mean.shape[0], generator=g) * std).to(mean.device)
    else:
        raise MinipassError(f"unknown look-ahead init {how!r}; use 'mean' or 'random'")
    if per_layer:
        emb = torch.cat([emb[None], emb.new_zeros(model.args.n_layers - 1, L, mean.shape[0])])
    return emb


def num_lookahead(model: Transformer, lookahead: Tensor) -> int:
    """L of a look-ahead tensor, (L, dim) or (n_layers, L, dim), checked against the model."""
    a = model.args
    ok = lookahead.dim() == 2 or (lookahead.dim() == 3 and lookahead.shape[0] == a.n_layers)
    if not ok or lookahead.shape[-2] < 1 or lookahead.shape[-1] != a.dim:
        raise MinipassError(f"look-ahead tensor must be (L, {a.dim}) or ({a.n_layers}, L, {a.dim}) with L >= 1, "
                            f"got shape {list(lookahead.shape)}")
    return lookahead.shape[-2]


def lookahead_inputs(lookahead: Tensor, n_blocks: int, n_real: int, B: int) -> tuple[Tensor, Optional[Tensor]]:
    """What a call of B rows, each n_real real tokens followed by n_blocks look-ahead blocks, feeds the model for the
    blocks: their input embeddings (B, n_blocks * L, dim) and the forward's layer_adds (n_layers - 1, 1, T, dim), zero
    at the real tokens (None without per-layer additions)."""
    emb = lookahead if lookahead.dim() == 2 else lookahead[0]
    embeds = emb.repeat(n_blocks, 1)[None].expand(B, -1, -1)
    if lookahead.dim() == 2:
        return embeds, None
    adds = lookahead[1:].repeat(1, n_blocks, 1)  # (n_layers - 1, n_blocks * L, dim)
    adds = torch.cat([adds.new_zeros(adds.shape[0], n_real, adds.shape[2]), adds], dim=1)
    return embeds, adds[:, None]


def save_lookahead(path: Union[str, Path], emb: Tensor, model: Transformer, base_model: str = "") -> None:
    """Write the embeddings (L, dim) or (n_layers, L, dim) atomically (a temp file renamed into place)."""
    path = Path(path)
    L = num_lookahead(model, emb)
    meta = {"lookahead": str(L), "hidden_size": str(emb.shape[-1]),
            "base_fingerprint": fingerprint(model), "base_model": base_model}
    emb = emb.detach().float().cpu()
    tensors = {TENSOR: emb.contiguous()} if emb.dim() == 2 else {TENSOR: emb[0].contiguous(),
                                                                 LAYERS: emb[1:].contiguous()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)


def load_lookahead(path: Union[str, Path], model: Transformer, L: Optional[int] = None,
                   dtype: Optional[torch.dtype] = None) -> Tensor:
    """The first L look-aheads of `path`, (L, dim) or with per-layer additions (n_layers, L, dim), on the model's
    device, in `dtype` (default the model's), checked against the model."""
    path = Path(path)
    if not path.is_file():
        raise MinipassError(f"look-ahead file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if TENSOR not in f.keys():
                raise MinipassError(f"{path} has no tensor {TENSOR!r}; it is not a look-ahead embeddings file")
            emb = f.get_tensor(TENSOR)
            layers = f.get_tensor(LAYERS) if LAYERS in f.keys() else None
    except SafetensorError as e:
        raise MinipassError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
    dim = model.args.dim
    if emb.dim() != 2 or emb.shape[1] != dim:
        raise MinipassError(f"{path}: tensor {TENSOR!r} has shape {list(emb.shape)}, expected [L, {dim}] for this "
                            "model's hidden size")
    n_layers = model.args.n_layers
    if layers is not None and list(layers.shape) != [n_layers - 1, *emb.shape]:
        raise MinipassError(f"{path}: tensor {LAYERS!r} has shape {list(layers.shape)}, expected "
                            f"{[n_layers - 1, *emb.shape]} (one addition per later layer and look-ahead token)")
    want = fingerprint(model)
    if meta.get("base_fingerprint") != want:
        made_for = meta.get("base_model") or "another model"
        raise MinipassError(f"{path} was trained for {made_for} (fingerprint {meta.get('base_fingerprint')}), "
                            f"not for this checkpoint (fingerprint {want})")
    L = emb.shape[0] if L is None else L
    if not 1 <= L <= emb.shape[0]:
        raise MinipassError(f"--lookahead must be between 1 and {emb.shape[0]} (the embeddings in {path}), got {L}")
    if layers is not None:
        emb = torch.cat([emb[None], layers])  # (n_layers, L_file, dim)
    weight = model.embed_tokens.weight
    return emb[..., :L, :].to(device=weight.device, dtype=dtype or weight.dtype)
