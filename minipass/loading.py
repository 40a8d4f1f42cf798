"""Load a Hugging Face-layout LLaMA checkpoint directory with safetensors (never pickle).

A directory holds `config.json` and either `model.safetensors` or shards listed in `model.safetensors.index.json`.
The model is built on the meta device and its parameters are assigned straight from the files, so the weights are
allocated once, in the requested dtype, on the requested device. Under tensor parallelism (`load_model_shard`) each
rank reads only its slices of the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Union

import torch
from safetensors import SafetensorError, safe_open

from minipass.config import ModelArgs
from minipass.distributed import ROW_PARALLEL_BIASES, default_group, rank, rank_zero_first, shard_block
from minipass.errors import MinipassError
from minipass.model import Transformer, triton_attention

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
# Buffers some exporters save; they are derived from config.json here.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def parse_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise MinipassError(f"unknown dtype {name!r}; choose fp32, bf16 or fp16")
    return DTYPES[name]


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked to exist."""
    if not ckpt_dir.is_dir():
        raise MinipassError(f"checkpoint directory {ckpt_dir} does not exist")
    single, index = ckpt_dir / "model.safetensors", ckpt_dir / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MinipassError(f"{index} is not a valid safetensors index (expected a 'weight_map'): {e}") from None
        files = [ckpt_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise MinipassError(f"{f} is listed in {index.name} but does not exist")
        return files
    if any(ckpt_dir.glob("*.bin")) or any(ckpt_dir.glob("*.pt")) or any(ckpt_dir.glob("*.pth")):
        raise MinipassError(f"{ckpt_dir} has only pickle weights (.bin/.pt); minipass loads safetensors only "
                            "(convert them with safetensors' convert script first)")
    raise MinipassError(f"{ckpt_dir} has neither model.safetensors nor model.safetensors.index.json")


def hf_to_minipass_name(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def load_model(ckpt_dir: Union[str, Path], dtype: Union[str, torch.dtype] = torch.float32,
               device: Union[str, torch.device] = "cpu") -> Transformer:
    """Build the model described by `ckpt_dir/config.json` and fill it from its safetensors files."""
    ckpt_dir = Path(ckpt_dir)
    dtype = parse_dtype(dtype)
    files = checkpoint_files(ckpt_dir)
    args = ModelArgs.from_json(ckpt_dir / "config.json")
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: p.shape for name, p in model.named_parameters()}

    state = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    name = hf_to_minipass_name(key)
                    if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and args.tie_embeddings):
                        continue
                    if name not in expected:
                        raise MinipassError(f"{path}: unexpected tensor {key!r} (not part of a {args.n_layers}-layer "
                                            "LLaMA model with this config.json)")
                    shape = tuple(f.get_slice(key).get_shape())
                    if shape != tuple(expected[name]):
                        raise MinipassError(f"{path}: tensor {key!r} has shape {list(shape)}, "
                                            f"expected {list(expected[name])} from config.json")
                    tensor = f.get_tensor(key)
                    if name == "embed_tokens.weight":  # identifies the base weights (lookahead.fingerprint)
                        embedding_sample = tensor[:16].clone()
                    state[name] = tensor.to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise MinipassError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
        except OSError as e:
            raise MinipassError(f"{path} could not be read: {e}") from None

    missing = [name for name in expected if name not in state]
    if missing:
        shown = ", ".join(repr("model." + m if m != "lm_head.weight" else m) for m in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MinipassError(f"{ckpt_dir}: checkpoint is missing tensor(s) {shown}{more}")
    model.load_state_dict(state, strict=True, assign=True)
    model.embedding_sample = embedding_sample
    return model.eval().requires_grad_(False)


def load_model_shard(ckpt_dir: Union[str, Path], group, dtype: Union[str, torch.dtype] = torch.float32,
                     device: Union[str, torch.device] = "cpu") -> Transformer:
    """This rank's part of the model of `ckpt_dir`, split over the process group `group` (see distributed.py).

    Every tensor is read with safetensors' get_slice: a split one as this rank's block only (rows or columns), a
    replicated one whole, so no rank ever holds the full model: resident memory grows by this rank's shard. The
    checks are those of load_model, against the full shapes of config.json.
    """
    ckpt_dir = Path(ckpt_dir)
    dtype = parse_dtype(dtype)
    files = checkpoint_files(ckpt_dir)
    args = ModelArgs.from_json(ckpt_dir / "config.json")
    with torch.device("meta"):
        full, model = Transformer(args), Transformer(args, group)
    expected = {name: p.shape for name, p in full.named_parameters()}
    local = {name: p.shape for name, p in model.named_parameters()}
    r = rank(group)

    state = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                shapes = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
            for key, shape in shapes.items():
                name = hf_to_minipass_name(key)
                if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and args.tie_embeddings):
                    continue
                if name not in expected:
                    raise MinipassError(f"{path}: unexpected tensor {key!r} (not part of a {args.n_layers}-layer "
                                        "LLaMA model with this config.json)")
                if shape != tuple(expected[name]):
                    raise MinipassError(f"{path}: tensor {key!r} has shape {list(shape)}, "
                                        f"expected {list(expected[name])} from config.json")
                state[name] = torch.zeros(local[name], dtype=dtype, device=device)
                # The file is opened per tensor: a slice is a view of the mapped file, and a column block touches
                # pages of every row, which stay resident until the mapping closes.
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    stored = f.get_slice(key)
                    if name == "embed_tokens.weight":  # the full table's first rows (lookahead.fingerprint)
                        embedding_sample = stored[:16].clone()
                    if r == 0 or not name.endswith(ROW_PARALLEL_BIASES):
                        state[name].copy_(stored[shard_block(shape, local[name], r)])
        except SafetensorError as e:
            raise MinipassError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
        except OSError as e:
            raise MinipassError(f"{path} could not be read: {e}") from None

    missing = [name for name in expected if name not in state]
    if missing:
        shown = ", ".join(repr("model." + m if m != "lm_head.weight" else m) for m in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MinipassError(f"{ckpt_dir}: checkpoint is missing tensor(s) {shown}{more}")
    model.load_state_dict(state, strict=True, assign=True)
    model.embedding_sample = embedding_sample
    return model.eval().requires_grad_(False)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise MinipassError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MinipassError(f"device {device!r} was asked for but CUDA is not available")
    return dev


def load_checkpoint(ckpt: Union[str, Path, None], dtype: Union[str, torch.dtype, None] = None,
                    device: str = "auto", kernels: str = "auto"):
    """(model, tokenizer, checkpoint directory) for `ckpt`, or for the embedded default model when it is None.

    dtype None picks fp32 on CPU and bf16 on CUDA. kernels: 'auto' (Triton on CUDA when installed), 'triton' or
    'torch'. Under torchrun with more than one process (distributed.init_from_env), every rank loads its shard of the
    model (load_model_shard), on GPU LOCAL_RANK when the device is CUDA.
    """
    from minipass.tokenizer import Tokenizer  # the tokenizer packages are only needed once a checkpoint is loaded

    group = default_group()
    if ckpt is None:
        from minipass.smollm2 import default_checkpoint

        with rank_zero_first(group):  # converted once, on first use
            ckpt = default_checkpoint()
    dev = resolve_device(device)
    dtype = parse_dtype(dtype or ("bf16" if dev.type == "cuda" else "fp32"))
    if group is None:
        model = load_model(ckpt, dtype=dtype, device=dev)
    else:
        dev = torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" else dev
        model = load_model_shard(ckpt, group, dtype=dtype, device=dev)
    tokenizer = Tokenizer.from_dir(ckpt)
    if kernels == "triton" and (dev.type != "cuda" or triton_attention is None):
        raise MinipassError("--kernels triton needs a CUDA device and the triton package")
    if kernels == "triton" or (kernels == "auto" and dev.type == "cuda" and triton_attention is not None):
        model.set_kernels("triton")
    return model, tokenizer, Path(ckpt)
