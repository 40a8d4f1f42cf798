"""Read llama.cpp's GGUF files: a LLaMA-architecture model's config, its weights in any dtype, and its tokenizer.

A GGUF file holds a whole model: the hyperparameters as `llama.*` metadata, the vocabulary as `tokenizer.ggml.*`
metadata, and the tensors, each in its own type (F32, F16, BF16, or a block quantization such as Q8_0, Q4_1, Q4_K
or Q6_K). Reading one means
- mapping the metadata onto a Hugging Face `config.json`, which `ModelArgs.from_hf_config` then reads like any other,
- renaming llama.cpp tensors (`blk.3.attn_q.weight`) to Hugging Face names (`model.layers.3.self_attn.q_proj.weight`),
- dequantizing each tensor with the `gguf` package, a slab of rows at a time, straight into the requested dtype
  (the quantization's rounding stays: the result is the quantized model, exactly),
- undoing llama.cpp's Q/K row permutation: llama.cpp rotates adjacent pairs (x0, x1), (x2, x3), ... while
  Hugging Face's rotate-half RoPE pairs (x_i, x_{i+D/2}); its converter reorders each head's rows so that the
  interleaved form computes the same thing, and we put them back,
- rebuilding the tokenizer from the vocabulary: byte-level BPE (`gpt2`, split as `tokenizer.ggml.pre` says) as a
  `tokenizers` object, SentencePiece (`llama`) as a SentencePiece model.

`loading.load_checkpoint` loads a `.gguf` path this way; `smollm2.convert` writes the same config, tensors and
tokenizer out as a Hugging Face directory.
"""

from __future__ import annotations

import math
import re
import struct
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

from minipass.errors import MinipassError

ARCHITECTURE = "llama"
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
# llama.cpp writes Llama 3.1's RoPE scaling as per-frequency divisors in this tensor instead of in the metadata.
ROPE_FREQS = "rope_freqs.weight"
_INTEGER_TYPES = ("I8", "I16", "I32", "I64")
# Token types, the same numbers in llama.cpp and SentencePiece.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_REQUIRED = object()
# Elements dequantized per slab: bounds the float32 temporary whatever the tensor's size.
SLAB_ELEMENTS = 1 << 22

# `tokenizer.ggml.pre` -> how llama.cpp splits text before byte-level BPE (the same as the upstream tokenizer.json).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL_SPLITS = {"smollm": "smollm", "llama-bpe": "llama3", "llama3": "llama3", "llama-v3": "llama3"}


def unpermute_qk(w, n_heads: int):
    """Undo llama.cpp's Q/K row order (interleaved RoPE pairs) to get Hugging Face's rotate-half order.

    Within each head, GGUF row 2i holds HF row i and GGUF row 2i+1 holds HF row i + head_dim/2. w: (rows, cols),
    a numpy array or a torch tensor.
    """
    rows, cols = w.shape
    return w.reshape(n_heads, rows // n_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def is_gguf(path: Path) -> bool:
    """Whether `path` names a GGUF file: a .gguf name that is not a directory, or a file with the GGUF magic."""
    if path.is_dir():
        return False
    if path.suffix.lower() == ".gguf":
        return True
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def dequantizable_types() -> list[str]:
    """Names of the tensor types the installed `gguf` package can dequantize (tried on one block of zeros)."""
    from gguf import GGML_QUANT_SIZES
    from gguf.quants import dequantize

    names = []
    for qtype, (_, block_bytes) in GGML_QUANT_SIZES.items():
        try:
            dequantize(np.zeros((1, block_bytes), np.uint8), qtype)
        except Exception:  # NotImplementedError, or a type this package only half knows
            continue
        names.append(qtype.name)
    return names


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown version"


class GGUFCheckpoint:
    """A GGUF file opened for loading: `config` (Hugging Face config.json fields), `tensors()`, `tokenizer()`."""

    def __init__(self, path):
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise MinipassError(f"GGUF file {self.path} does not exist")
        try:
            self.reader = gguf.GGUFReader(str(self.path))
        except ValueError as e:
            unknown = re.search(r"(\d+)\)? is not a valid GGMLQuantizationType", str(e))
            if unknown:
                raise MinipassError(f"{self.path} has a tensor of type id {unknown.group(1)}, which the installed gguf "
                                    f"package ({_gguf_version()}) does not know; update gguf or convert the file to "
                                    "another type") from None
            raise MinipassError(f"{self.path} is not a readable GGUF file: {e}") from None
        except (OSError, KeyError, IndexError, UnicodeDecodeError, struct.error) as e:
            raise MinipassError(f"{self.path} is not a readable GGUF file (truncated or corrupt?): {e}") from None
        # Every field but the vocabulary arrays, which only the tokenizer needs and which are slow to unpack.
        self.meta = {name: field.contents() for name, field in self.reader.fields.items()
                     if not name.startswith("tokenizer.ggml.")}
        arch = self.meta.get("general.architecture")
        if arch != ARCHITECTURE:
            raise MinipassError(f"{self.path} holds a model of GGUF architecture {arch!r}; minipass loads "
                                f"LLaMA-architecture files ({ARCHITECTURE!r}) only")
        if self._get("expert_count", 0):
            raise MinipassError(f"{self.path} is a mixture-of-experts model (llama.expert_count = "
                                f"{self._get('expert_count')}), which minipass does not support")
        self._by_name = {t.name: t for t in self.reader.tensors}
        self.config = self._config()

    def _get(self, key: str, default=_REQUIRED):
        value = self.meta.get(f"{ARCHITECTURE}.{key}", default)
        if value is _REQUIRED:
            raise MinipassError(f"{self.path} has no {ARCHITECTURE}.{key} in its metadata, which a LLaMA model needs")
        return value

    def _field(self, key: str, default=None):
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def _config(self) -> dict:
        n_heads, dim = self._get("attention.head_count"), self._get("embedding_length")
        head_dim = self._get("attention.key_length", None) or self._get("rope.dimension_count", None) \
            or dim // n_heads
        for key in ("attention.value_length", "rope.dimension_count"):
            if self._get(key, head_dim) != head_dim:
                raise MinipassError(f"{self.path} has {ARCHITECTURE}.{key} = {self._get(key)} but head size "
                                    f"{head_dim}; minipass supports models that rotate and attend over whole heads")
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        vocab = self._get("vocab_size", None) or (len(tokens.data) if tokens is not None else None)
        if vocab is None:
            vocab = int(self._by_name["token_embd.weight"].shape[-1]) if "token_embd.weight" in self._by_name else 0
        # Values are stored as float32; the shortest float32 repr gives back the intended decimal (1e-05).
        eps = float(str(np.float32(self._get("attention.layer_norm_rms_epsilon"))))
        theta = float(str(np.float32(self._get("rope.freq_base", 10000.0))))
        bos_id, eos_ids = self._special_ids()
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": dim,
            "intermediate_size": self._get("feed_forward_length"),
            "num_hidden_layers": self._get("block_count"),
            "num_attention_heads": n_heads,
            "num_key_value_heads": self._get("attention.head_count_kv", n_heads),
            "head_dim": head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": eps,
            "rope_theta": int(theta) if theta.is_integer() else theta,
            "rope_scaling": self._rope_scaling(theta, head_dim),
            "max_position_embeddings": self._get("context_length"),
            "vocab_size": vocab,
            "tie_word_embeddings": "output.weight" not in self._by_name,
            "attention_bias": False,
            "mlp_bias": False,
            "torch_dtype": "float32",
            "bos_token_id": bos_id,
            "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        }

    def _rope_scaling(self, theta: float, head_dim: int) -> Optional[dict]:
        kind = self._get("rope.scaling.type", "none")
        if kind == "linear":
            return {"rope_type": "linear", "factor": float(self._get("rope.scaling.factor"))}
        if kind != "none":
            raise MinipassError(f"{self.path} uses RoPE scaling {kind!r} ({ARCHITECTURE}.rope.scaling.type); minipass "
                                "supports none, linear, and Llama 3's (a rope_freqs tensor)")
        if ROPE_FREQS not in self._by_name:
            return None
        from gguf.quants import dequantize

        t = self._by_name[ROPE_FREQS]
        factors = dequantize(t.data, t.tensor_type).astype(np.float64).reshape(-1)
        return llama3_scaling(factors, theta, head_dim, f"{self.path}: tensor {ROPE_FREQS!r}")

    def _special_ids(self) -> tuple[Optional[int], list[int]]:
        """(BOS id, stop ids): EOS, then llama.cpp's end-of-turn and end-of-message tokens when the file names them."""
        bos = self._field("tokenizer.ggml.bos_token_id")
        eos = self._field("tokenizer.ggml.eos_token_id")
        template = self.meta.get("tokenizer.chat_template")
        tokens = self.reader.fields.get("tokenizer.ggml.tokens")
        if template and "<|im_end|>" in template and tokens is not None:
            # Some ChatML GGUFs mark <|im_start|> as EOS, but a chat turn ends with <|im_end|>: use the token the
            # chat template closes turns with, as the upstream Hugging Face configs do.
            names = tokens.contents()
            if "<|im_end|>" in names:
                eos = names.index("<|im_end|>")
        stops = [eos] + [self._field(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        return bos, list(dict.fromkeys(i for i in stops if i is not None))

    def hf_name(self, name: str) -> str:
        if name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[name]
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", name)
        if not m or m.group(2) not in _LAYER_NAMES:
            raise MinipassError(f"{self.path}: tensor {name!r} has no counterpart in a LLaMA model (an architecture "
                                "variant minipass does not support?)")
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.weight"

    def tensors(self) -> Iterator["GGUFTensor"]:
        """The model's tensors under their Hugging Face names (RoPE frequency factors are part of the config)."""
        heads = {"attn_q": self.config["num_attention_heads"], "attn_k": self.config["num_key_value_heads"]}
        for t in self.reader.tensors:
            if t.name == ROPE_FREQS:
                continue
            kind = t.name.split(".")[-2] if t.name.startswith("blk.") else None
            yield GGUFTensor(self.path, t, self.hf_name(t.name), heads.get(kind))

    def tokenizer(self):
        """The minipass Tokenizer described by the file's metadata."""
        from minipass.tokenizer import Tokenizer

        model, tok_config = self.tokenizer_parts()
        configs = {"config.json": self.config, "tokenizer_config.json": tok_config}
        if isinstance(model, bytes):
            import sentencepiece

            try:
                sp = sentencepiece.SentencePieceProcessor(model_proto=model)
            except RuntimeError as e:  # e.g. a piece listed twice
                raise MinipassError(f"{self.path}: its SentencePiece vocabulary is not a valid model: {e}") from None
            return Tokenizer(self.path, sp=sp, configs=configs)
        return Tokenizer(self.path, hf=model, configs=configs)

    def tokenizer_parts(self):
        """(model, tokenizer_config.json contents): a `tokenizers.Tokenizer` for byte-level BPE vocabularies, or the
        serialized SentencePiece model (bytes) for SentencePiece ones."""
        kind = self._field("tokenizer.ggml.model")
        if kind is None:
            raise MinipassError(f"{self.path} has no tokenizer in its metadata (tokenizer.ggml.model)")
        if kind == "gpt2":
            return self._byte_level_bpe()
        if kind == "llama":
            return self._sentencepiece()
        raise MinipassError(f"{self.path} has a tokenizer of kind {kind!r} (tokenizer.ggml.model); minipass builds "
                            "GPT-2-style byte-level BPE ('gpt2') and SentencePiece ('llama') tokenizers only")

    def _vocab(self):
        tokens = self._field("tokenizer.ggml.tokens")
        types = self._field("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        return tokens, types

    def _tokenizer_config(self, tokens: list, add_bos: bool, **extra) -> dict:
        bos_id, eos_ids = self.config["bos_token_id"], self._special_ids()[1]
        pad_id = self._field("tokenizer.ggml.padding_token_id", eos_ids[0] if eos_ids else None)
        name = (lambda i: tokens[i] if i is not None and 0 <= i < len(tokens) else None)
        return {
            **extra,
            "bos_token": name(bos_id),
            "eos_token": name(eos_ids[0]) if eos_ids else None,
            "pad_token": name(pad_id),
            "add_bos_token": bool(self._field("tokenizer.ggml.add_bos_token", add_bos)),
            "model_max_length": self.config["max_position_embeddings"],
            "chat_template": self.meta.get("tokenizer.chat_template"),
        }

    def _byte_level_bpe(self):
        from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

        pre = self._field("tokenizer.ggml.pre")
        split = BYTE_LEVEL_SPLITS.get(pre)
        if split is None:
            raise MinipassError(f"{self.path} has a byte-level BPE tokenizer with pre-tokenizer {pre!r} "
                                "(tokenizer.ggml.pre), whose text splitting minipass does not know; known: "
                                f"{', '.join(BYTE_LEVEL_SPLITS)}")
        tokens, types = self._vocab()
        merges = [tuple(m.split(" ", 1)) for m in self._field("tokenizer.ggml.merges", [])]
        # Llama 3 takes a pre-tokenized word that is itself in the vocabulary whole (llama.cpp's ignore_merges).
        tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False,
                                   ignore_merges=split == "llama3"))
        if split == "smollm":
            tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                  use_regex=True)])
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        # Unregistered, "<|im_start|>" would be split into 7 ordinary tokens and the chat format would silently break.
        control = [t for t, kind in zip(tokens, types) if kind == _CONTROL]
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        # llama.cpp also matches user-defined tokens whole in the text, without making them special.
        tok.add_tokens([AddedToken(t, special=False, normalized=False)
                        for t, kind in zip(tokens, types) if kind == _USER_DEFINED])
        config = self._tokenizer_config(tokens, add_bos=split == "llama3", tokenizer_class="PreTrainedTokenizerFast")
        config.update({"add_prefix_space": False, "clean_up_tokenization_spaces": False,
                       "additional_special_tokens": control})
        return tok, config

    def _sentencepiece(self):
        tokens, types = self._vocab()
        scores = self._field("tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk = self._field("tokenizer.ggml.unknown_token_id")
        if unk is None:
            unk = next((i for i, kind in enumerate(types) if kind == _UNKNOWN), None)
        if unk is None or not 0 <= unk < len(tokens):
            raise MinipassError(f"{self.path} has a SentencePiece tokenizer without an unknown token "
                                "(tokenizer.ggml.unknown_token_id)")
        types = [kind if kind in (_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE) else _NORMAL for kind in types]
        types[unk] = _UNKNOWN
        model = sentencepiece_model(
            tokens, scores, types, unk_id=unk, bos_id=self.config["bos_token_id"],
            eos_id=self._field("tokenizer.ggml.eos_token_id"), pad_id=self._field("tokenizer.ggml.padding_token_id"),
            add_dummy_prefix=bool(self._field("tokenizer.ggml.add_space_prefix", True)),
            remove_extra_whitespaces=bool(self._field("tokenizer.ggml.remove_extra_whitespaces", False)),
            precompiled_charsmap=bytes(self._field("tokenizer.ggml.precompiled_charsmap", []) or b""))
        # llama.cpp gives the text after every special token its own dummy-prefix space, as Meta's and Mistral's
        # reference tokenizers do: the "legacy" behaviour (see tokenizer.py).
        config = self._tokenizer_config(tokens, add_bos=True, tokenizer_class="LlamaTokenizer", legacy=True)
        config["unk_token"] = tokens[unk]
        return model, config


class GGUFTensor:
    """One tensor of GGUF file `source`: `key` (its GGUF name), `name` (its Hugging Face name), `shape` (outermost
    first), `dtype` (the GGUF type's name); `read(dtype, device)` dequantizes it, `head(n)` gives its first n rows in
    float32, `stored_finite()` whether its values in the file are all finite."""

    def __init__(self, source: Path, t, name: str, qk_heads: Optional[int]):
        self.source, self._t, self.key, self.name, self._qk_heads = source, t, t.name, name, qk_heads
        # GGUF lists dimensions innermost first.
        self.shape = tuple(reversed([int(d) for d in t.shape]))
        self.dtype = t.tensor_type.name
        self.is_float = self.dtype not in _INTEGER_TYPES

    def _dequantize(self, rows: slice) -> np.ndarray:
        from gguf.quants import dequantize

        try:
            w = dequantize(self._t.data[rows], self._t.tensor_type)
        except NotImplementedError:
            raise MinipassError(f"{self.source}: tensor {self.key!r} has type {self.dtype}, which the installed "
                                f"gguf package cannot dequantize; it can: {', '.join(dequantizable_types())}") from None
        # float32 views of the memory-mapped file are read-only, which torch.from_numpy warns about.
        return w if w.flags.writeable else w.copy()

    def read(self, dtype: torch.dtype, device) -> torch.Tensor:
        """The tensor in `dtype` on `device`, dequantized SLAB_ELEMENTS at a time (whole heads for Q and K, whose
        rows are reordered head by head)."""
        out = torch.empty(self.shape, dtype=dtype, device=device)
        if len(self.shape) == 1:
            out.copy_(torch.from_numpy(self._dequantize(slice(None))).reshape(self.shape))
            return out
        rows, row_size = self.shape[0], math.prod(self.shape[1:])
        unit = rows // self._qk_heads if self._qk_heads else 1  # rows per slab come in these units
        step = max(1, SLAB_ELEMENTS // (row_size * unit)) * unit
        for r in range(0, rows, step):
            w = torch.from_numpy(self._dequantize(slice(r, r + step))).reshape(-1, *self.shape[1:])
            if self._qk_heads:
                w = unpermute_qk(w, w.shape[0] // unit)
            out[r: r + step].copy_(w)
        return out

    def head(self, n: int) -> torch.Tensor:
        return torch.from_numpy(self._dequantize(slice(0, n))).reshape(-1, *self.shape[1:])

    def stored_finite(self) -> bool:
        return bool(torch.isfinite(self.read(torch.float32, "cpu")).all())


def llama3_scaling(factors: np.ndarray, theta: float, head_dim: int, what: str) -> Optional[dict]:
    """Llama 3's rope_scaling parameters that give llama.cpp's per-frequency divisors `factors` (head_dim // 2,).

    llama.cpp divides frequency i by factors[i]: 1 at short wavelengths, `factor` at long ones, a smooth blend in
    between (Hugging Face's 'llama3' rope type). The blend is linear in 1 / wavelength, so with low_freq_factor fixed
    at 1 (only the ratios of the four parameters matter) two blended frequencies give the rest; with fewer, Meta's
    high_freq_factor 4 is assumed. The parameters found are checked against every factor.
    """
    from minipass.config import ModelArgs
    from minipass.model import rope_frequencies

    if factors.shape != (head_dim // 2,):
        raise MinipassError(f"{what} has {factors.size} values, expected {head_dim // 2} (one per RoPE frequency)")
    if np.all(factors == 1):
        return None
    factor = float(factors.max())
    if np.all(factors == factor):
        return {"rope_type": "linear", "factor": factor}
    refusal = MinipassError(f"{what} holds RoPE frequency factors that no Llama 3 scaling (factor, low and high "
                            "frequency factors, original context) reproduces; minipass cannot apply them")
    if factor <= 1 or factors.min() < 1:
        raise refusal
    base = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    u = base / (2 * math.pi)  # 1 / wavelength
    blend = np.flatnonzero((factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6)))
    s = (1 / factors - 1 / factor) / (1 - 1 / factor)  # 0 at long wavelengths, 1 at short ones
    if len(blend) >= 2:
        a, b = blend[0], blend[-1]
        # s = (old * u - 1) / (high - 1), i.e. old * u - s * high = 1 - s, at frequencies a and b.
        old, high = np.linalg.solve([[u[a], -s[a]], [u[b], -s[b]]], [1 - s[a], 1 - s[b]])
    elif len(blend) == 1:
        high = 4.0
        old = (1 + s[blend[0]] * (high - 1)) / u[blend[0]]
    else:  # a sharp step between the short (factor 1) and the long (factor `factor`) wavelengths
        short, long = u[factors == 1].min(), u[factors == factor].max()
        if long >= short:
            raise refusal
        old = 1 / math.sqrt(short * long)
        high = old * short / 2 + 0.5
    if old <= 0 or high <= 1:
        raise refusal
    expected = torch.from_numpy(base / factors).float()
    # The original context is a whole number of tokens; keep the rounded one if it gives the same frequencies.
    for context in (round(old), float(old)):
        scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": float(high),
                   "original_max_position_embeddings": context}
        args = ModelArgs(dim=head_dim, n_heads=1, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling)
        if torch.allclose(rope_frequencies(args), expected, rtol=1e-5, atol=0):
            return scaling
    raise refusal


def sentencepiece_model(tokens, scores, types, unk_id: int, bos_id, eos_id, pad_id, add_dummy_prefix: bool,
                        remove_extra_whitespaces: bool, precompiled_charsmap: bytes = b"") -> bytes:
    """A serialized SentencePiece BPE model (the protobuf `ModelProto`, written by hand so that no protobuf package
    is needed) with these pieces, scores and types; what llama.cpp's SentencePiece tokenizer computes."""

    def varint(n: int) -> bytes:
        n &= (1 << 64) - 1  # negative ids (-1 = none) are 64-bit two's complement in protobuf
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    def number(field: int, n: int) -> bytes:
        return varint(field << 3) + varint(int(n))

    def blob(field: int, data: bytes) -> bytes:
        return varint(field << 3 | 2) + varint(len(data)) + data

    out = bytearray()
    for piece, score, kind in zip(tokens, scores, types):
        entry = blob(1, piece.encode("utf-8")) + varint(2 << 3 | 5) + struct.pack("<f", score)
        out += blob(1, entry + (number(3, kind) if kind != _NORMAL else b""))
    byte_fallback = any(kind == _BYTE for kind in types)
    trainer = (number(3, 2) + number(4, len(tokens)) + number(35, byte_fallback) + number(40, unk_id)
               + number(41, -1 if bos_id is None else bos_id) + number(42, -1 if eos_id is None else eos_id)
               + number(43, -1 if pad_id is None else pad_id))  # model_type 2 = BPE
    out += blob(2, trainer)
    normalizer = (blob(1, b"identity") + blob(2, precompiled_charsmap) + number(3, add_dummy_prefix)
                  + number(4, remove_extra_whitespaces) + number(5, 1))
    out += blob(3, normalizer)
    return bytes(out)
