"""Model configuration: a dataclass built from a Hugging Face `config.json`, plus tiny named configs for tests."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from minipass.errors import MinipassError

SUPPORTED_MODEL_TYPES = ("llama", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class ModelArgs:
    vocab_size: int = 32000
    dim: int = 4096  # hidden_size
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: Optional[int] = None  # None = n_heads (no grouping)
    head_dim: Optional[int] = None  # None = dim // n_heads
    intermediate_size: int = 11008
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # None, or a dict with "rope_type" ("linear" or "llama3") and that type's parameters, as in config.json.
    rope_scaling: Optional[dict] = None
    max_seq_len: int = 2048  # max_position_embeddings
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: Optional[int] = None
    eos_token_ids: list = field(default_factory=list)

    def __post_init__(self):
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads != 0:
            raise MinipassError(
                f"num_attention_heads ({self.n_heads}) must be a multiple of num_key_value_heads ({self.n_kv_heads})"
            )
        rope_type = (self.rope_scaling or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise MinipassError(
                f"rope scaling type {rope_type!r} is not supported; minipass supports {', '.join(SUPPORTED_ROPE_TYPES)}"
            )

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Map the fields of a Hugging Face LLaMA-family `config.json` onto ModelArgs."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise MinipassError(
                f"{source}: unsupported model_type {model_type!r}; minipass loads LLaMA-architecture checkpoints "
                f"(model_type {' or '.join(repr(t) for t in SUPPORTED_MODEL_TYPES)})"
            )
        if cfg.get("sliding_window") is not None:
            raise MinipassError(f"{source}: sliding-window attention (sliding_window={cfg['sliding_window']}) is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise MinipassError(f"{source}: hidden_act {cfg['hidden_act']!r} is not supported; LLaMA uses 'silu'")
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise MinipassError(f"{source}: missing required field(s) {', '.join(missing)}")

        # transformers >= 5 writes rope settings as "rope_parameters"; older files use rope_theta + rope_scaling.
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or rope or None
        if scaling is not None:
            scaling = dict(scaling)
            scaling["rope_type"] = scaling.pop("rope_type", scaling.pop("type", "default"))
            if scaling["rope_type"] == "default":
                scaling = None

        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            vocab_size=cfg["vocab_size"],
            dim=cfg["hidden_size"],
            n_layers=cfg["num_hidden_layers"],
            n_heads=cfg["num_attention_heads"],
            n_kv_heads=cfg.get("num_key_value_heads"),
            head_dim=cfg.get("head_dim"),
            intermediate_size=cfg["intermediate_size"],
            norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(rope_theta),
            rope_scaling=scaling,
            max_seq_len=cfg.get("max_position_embeddings", 2048),
            tie_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", False),
            mlp_bias=cfg.get("mlp_bias", False),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_json(cls, path: Path) -> "ModelArgs":
        try:
            cfg = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise MinipassError(f"{path} does not exist; a checkpoint directory needs a config.json") from None
        except (OSError, json.JSONDecodeError) as e:
            raise MinipassError(f"{path} is not a readable JSON file ({e})") from None
        return cls.from_hf_config(cfg, source=str(path))

    @classmethod
    def from_name(cls, name: str) -> "ModelArgs":
        if name not in TINY_CONFIGS:
            raise MinipassError(f"unknown config name {name!r}; known: {', '.join(TINY_CONFIGS)}")
        return cls(**TINY_CONFIGS[name])

    def to_hf_config(self) -> dict:
        """The config.json of this model, in the Hugging Face layout (used to write test checkpoints)."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.intermediate_size,
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_ids[0] if len(self.eos_token_ids) == 1 else (self.eos_token_ids or None),
        }


# Tiny models for tests: random weights, fast on a CPU. "tiny-v16" has a vocabulary small enough to enumerate
# every continuation exactly (the distribution tests of the speculative decoders).
TINY_CONFIGS = {
    "tiny": dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=128, max_seq_len=512),
    "tiny-untied-mha": dict(vocab_size=96, dim=48, n_layers=2, n_heads=3, n_kv_heads=3, intermediate_size=80,
                            max_seq_len=256, rope_theta=500000.0),
    "tiny-llama3": dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, intermediate_size=96,
                        max_seq_len=256, tie_embeddings=True,
                        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=32)),
    "tiny-v16": dict(vocab_size=16, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, intermediate_size=64,
                     max_seq_len=128, tie_embeddings=True),
}
