"""Load a checkpoint: a Hugging Face-layout LLaMA directory with safetensors (never pickle), or a GGUF file.

A directory holds `config.json` and either `model.safetensors` or shards listed in `model.safetensors.index.json`;
a GGUF file holds everything in one (see gguf_loader.py). The model is built on the meta device and its parameters
are assigned straight from the files, tensor by tensor, so the weights are allocated once, in the requested dtype, on
the requested device. Every tensor is checked against the config (name, shape, a floating-point type) before it is
read; `check_weights` also scans the weights for NaN and infinite values. Under tensor parallelism
(`load_model_shard`) each rank reads only its slices of the tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Union

import torch
from safetensors import SafetensorError, safe_open

from minipass.config import ModelArgs
from minipass.distributed import ROW_PARALLEL_BIASES, default_group, rank, rank_zero_first, shard_block
from minipass.errors import MinipassError
from minipass.gguf_loader import GGUFCheckpoint, is_gguf
from minipass.model import Transformer, triton_attention

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
# Buffers some exporters save; they are derived from config.json here.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# Rows of the embedding matrix that identify the base weights (lookahead.fingerprint).
FINGERPRINT_ROWS = 16


def parse_dtype(name: Union[str, torch.dtype]) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise MinipassError(f"unknown dtype {name!r}; choose fp32, bf16 or fp16")
    return DTYPES[name]


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory, checked to exist."""
    if not ckpt_dir.is_dir():
        if ckpt_dir.is_file():
            raise MinipassError(f"checkpoint {ckpt_dir} is a file but not a GGUF file; --ckpt takes a checkpoint "
                                "directory or a .gguf file")
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


class SafetensorsTensor:
    """One tensor of a safetensors file, with the interface of gguf_loader.GGUFTensor."""

    def __init__(self, source: Path, f, key: str):
        self.source, self._f, self.key, self.name = source, f, key, key
        view = f.get_slice(key)
        self.shape, self.dtype = tuple(view.get_shape()), view.get_dtype()
        self.is_float = self.dtype.startswith("F") or self.dtype == "BF16"  # F64/F32/F16/F8_*, BF16; not I*/U*/BOOL

    def read(self, dtype: torch.dtype, device) -> torch.Tensor:
        try:
            return self._f.get_tensor(self.key).to(device=device, dtype=dtype)
        except SafetensorError as e:
            raise MinipassError(f"{self.source} is not a valid safetensors file (truncated or corrupt?): {e}") from None

    def head(self, n: int) -> torch.Tensor:
        return self._f.get_slice(self.key)[:n].clone()

    def stored_finite(self) -> bool:
        with safe_open(str(self.source), framework="pt", device="cpu") as f:  # the loading pass has closed it
            return bool(torch.isfinite(f.get_tensor(self.key)).all())


def _safetensors_tensors(files: list[Path]) -> Iterable[SafetensorsTensor]:
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    yield SafetensorsTensor(path, f, key)
        except SafetensorError as e:
            raise MinipassError(f"{path} is not a valid safetensors file (truncated or corrupt?): {e}") from None
        except OSError as e:
            raise MinipassError(f"{path} could not be read: {e}") from None


def build_model(args: ModelArgs, tensors: Iterable, dtype: torch.dtype, device, check_weights: bool = False,
                origin: str = "config.json", source: Union[str, Path] = "") -> Transformer:
    """A model of `args` whose parameters are `tensors` (SafetensorsTensor or GGUFTensor, Hugging Face names), each
    checked and read in `dtype` on `device`. origin names where `args` came from, source the checkpoint, in
    messages."""
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: p.shape for name, p in model.named_parameters()}
    float_types = "GGUF float or quantized type" if origin != "config.json" else "floating-point dtype"

    state, stored = {}, {}
    embedding_sample = None
    for t in tensors:
        name = hf_to_minipass_name(t.name)
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and args.tie_embeddings):
            continue
        if name not in expected:
            raise MinipassError(f"{t.source}: unexpected tensor {t.key!r} (not part of a {args.n_layers}-layer "
                                f"LLaMA model with this {origin})")
        if t.shape != tuple(expected[name]):
            raise MinipassError(f"{t.source}: tensor {t.key!r} has shape {list(t.shape)}, "
                                f"expected {list(expected[name])} from {origin}")
        if not t.is_float:
            raise MinipassError(f"{t.source}: tensor {t.key!r} has dtype {t.dtype}, expected model weights of a "
                                f"{float_types} (F32, BF16, F16, ...); the file was written wrongly or is not a "
                                "model checkpoint")
        state[name] = t.read(dtype, device)
        stored[name] = t
        if name == "embed_tokens.weight":
            embedding_sample = t.head(FINGERPRINT_ROWS)

    missing = [name for name in expected if name not in state]
    if missing:
        shown = ", ".join(repr("model." + m if m != "lm_head.weight" else m) for m in missing[:3])
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise MinipassError(f"{source}: checkpoint is missing tensor(s) {shown}{more}")
    if check_weights:
        check_finite(state, stored, dtype)
    model.load_state_dict(state, strict=True, assign=True)
    model.embedding_sample = embedding_sample
    return model.eval().requires_grad_(False)


def check_finite(state: dict, stored: dict, dtype: torch.dtype) -> None:
    """Refuse the first weight with a NaN or an infinite value, telling a corrupt file from an overflowing dtype.

    min and max propagate NaN and show an infinity, so the scan is one read of the weights (torch.aminmax), one flag
    per tensor and a single host sync for all of them.
    """
    flags = torch.stack([torch.isfinite(torch.stack(torch.aminmax(w))).all() for w in state.values()]).tolist()
    for (name, w), ok in zip(state.items(), flags):
        if ok:
            continue
        t = stored[name]
        n_nan, n_inf = int(torch.isnan(w).sum()), int(torch.isinf(w).sum())
        found = f"{t.source}: tensor {t.key!r} has {n_nan} NaN and {n_inf} infinite value(s)"
        if t.stored_finite():
            raise MinipassError(f"{found} once converted to {str(dtype).replace('torch.', '')}, whose range its "
                                "values exceed; load it in a dtype of wider range (bf16 or fp32)")
        raise MinipassError(f"{found} (stored as {t.dtype}); the checkpoint is corrupt (a bad conversion, or "
                            "training that diverged)")


def load_model(ckpt: Union[str, Path], dtype: Union[str, torch.dtype] = torch.float32,
               device: Union[str, torch.device] = "cpu", check_weights: bool = False) -> Transformer:
    """The model of a checkpoint directory (config.json + safetensors) or of a GGUF file, in `dtype` on `device`.

    check_weights: also refuse weights that are NaN or infinite (in the file, or once converted to `dtype`).
    """
    ckpt = Path(ckpt)
    dtype = parse_dtype(dtype)
    if is_gguf(ckpt):
        return load_gguf(GGUFCheckpoint(ckpt), dtype, device, check_weights)
    files = checkpoint_files(ckpt)
    args = ModelArgs.from_json(ckpt / "config.json")
    return build_model(args, _safetensors_tensors(files), dtype, device, check_weights, source=ckpt)


def load_gguf(gguf: GGUFCheckpoint, dtype: torch.dtype, device, check_weights: bool = False) -> Transformer:
    args = ModelArgs.from_hf_config(gguf.config, source=str(gguf.path))
    return build_model(args, gguf.tensors(), dtype, device, check_weights, origin="GGUF metadata",
                       source=gguf.path)


def _cpu_probe(name: str) -> bool:
    """torch.cpu's capability probe `name` (private, not in every build): False where it is missing or fails."""
    probe = getattr(torch.cpu, name, None)
    try:
        return bool(probe is not None and probe())
    except RuntimeError:
        return False


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX tiles, which inductor's C++ GEMM template multiplies bf16 with
    (decoding.compile_options)."""
    return _cpu_probe("_is_amx_tile_supported")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 dot products natively (x86 AVX512-BF16 or AMX, Arm BF16): then bf16 weights,
    half the bytes of fp32, are the faster choice for decoding, which reads every weight once per step."""
    if _cpu_probe("_is_avx512_bf16_supported") or cpu_has_amx():
        return True
    try:
        with open("/proc/cpuinfo") as f:
            flags = set()
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags |= set(line.split(":", 1)[1].split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def default_dtype(device: torch.device) -> torch.dtype:
    """--dtype auto: bf16 on CUDA and on CPUs with native bf16 dot products, fp32 otherwise."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


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
                    device: str = "auto", kernels: str = "auto", check_weights: bool = False):
    """(model, tokenizer, checkpoint path) for `ckpt`, a checkpoint directory or a GGUF file, or for the embedded
    default model when it is None.

    dtype None or 'auto' picks `default_dtype` for the device. kernels: 'auto' (Triton on CUDA when installed),
    'triton' or 'torch'. check_weights: refuse weights that are NaN or infinite (see load_model). Under torchrun
    with more than one process (distributed.init_from_env), every rank loads its shard of the model
    (load_model_shard), on GPU LOCAL_RANK when the device is CUDA.
    """
    from minipass.tokenizer import Tokenizer  # the tokenizer packages are only needed once a checkpoint is loaded

    group = default_group()
    if ckpt is None:
        from minipass.smollm2 import default_checkpoint

        with rank_zero_first(group):  # converted once, on first use
            ckpt = default_checkpoint()
    ckpt = Path(ckpt)
    dev = resolve_device(device)
    dtype = default_dtype(dev) if dtype in (None, "auto") else parse_dtype(dtype)
    if kernels == "triton" and (dev.type != "cuda" or triton_attention is None):
        raise MinipassError("--kernels triton needs a CUDA device and the triton package")
    if group is not None:
        if is_gguf(ckpt):
            raise MinipassError(f"{ckpt}: tensor parallelism reads safetensors checkpoints, shard by shard; convert "
                                "the GGUF file to a checkpoint directory first (python weights/convert_smollm2.py "
                                "--gguf FILE --out DIR)")
        dev = torch.device("cuda", torch.cuda.current_device()) if dev.type == "cuda" else dev
        model = load_model_shard(ckpt, group, dtype=dtype, device=dev)
        tokenizer = Tokenizer.from_dir(ckpt)
    elif is_gguf(ckpt):
        gguf = GGUFCheckpoint(ckpt)
        tokenizer = gguf.tokenizer()  # before the weights: an unsupported tokenizer is refused in a moment
        model = load_gguf(gguf, dtype, dev, check_weights)
    else:
        model = load_model(ckpt, dtype=dtype, device=dev, check_weights=check_weights)
        tokenizer = Tokenizer.from_dir(ckpt)
    if kernels == "triton" or (kernels == "auto" and dev.type == "cuda" and triton_attention is not None):
        model.set_kernels("triton")
    return model, tokenizer, ckpt
