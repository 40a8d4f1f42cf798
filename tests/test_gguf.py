"""GGUF checkpoints: files written here with the gguf package load like the same weights from safetensors, the
default model's GGUF loads like its converted checkpoint, and what cannot be loaded is refused with one line."""

import json
import math
import shutil

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

import minipass.gguf_loader as gguf_loader  # noqa: E402
from minipass.config import ModelArgs  # noqa: E402
from minipass.decoding import ar_decode  # noqa: E402
from minipass.decoders import DEFAULT_LOOKAHEAD_FILE  # noqa: E402
from minipass.errors import MinipassError  # noqa: E402
from minipass.generate import main  # noqa: E402
from minipass.loading import load_checkpoint, load_model  # noqa: E402
from minipass.lookahead import fingerprint, load_lookahead  # noqa: E402
from minipass.model import Transformer  # noqa: E402
from minipass.tokenizer import Tokenizer  # noqa: E402
from tests.util import hf_state_dict, save_checkpoint  # noqa: E402

# A byte-level vocabulary: three control tokens, the 256 byte symbols, and a few merges.
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "1 2", "12 3", "a b"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Hugging Face name -> llama.cpp name, as llama.cpp's converter writes them.
GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
LAYER_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
               "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
               "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# Row lengths are multiples of 256, the block of the K-quants.
CONFIG = dict(dim=256, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=512, max_seq_len=256,
              rope_theta=10000.0)


def byte_vocab():
    from tokenizers import pre_tokenizers

    tokens = CONTROL + sorted(pre_tokenizers.ByteLevel.alphabet())
    tokens += ["".join(m.split(" ")) for m in MERGES] + ["xyz"]  # "xyz": in the vocabulary, made by no merge
    return tokens, [3] * len(CONTROL) + [1] * (len(tokens) - len(CONTROL))


def gguf_name(hf_name):
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{LAYER_NAMES[rest.rsplit('.', 1)[0]]}.weight"


def llama_cpp_permute(w, n_heads):
    """llama.cpp's converter reorders Q/K rows so that its interleaved RoPE computes Hugging Face's rotate-half."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def k_quant_blocks(shape, qtype, rng):
    """Random Q4_K / Q6_K data (the gguf package cannot quantize to them) with small finite fp16 scales."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    data = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
    scale_at = {Q.Q4_K: [0, 2], Q.Q6_K: [208]}[qtype]
    for at in scale_at:
        data[..., at: at + 2] = rng.uniform(1e-3, 2e-3, data.shape[:2]).astype(np.float16)[..., None].view(np.uint8)
    return data.reshape(shape[0], -1)


def encode(w, qtype, rng):
    """w (rows, cols) float32 in a GGUF tensor type: what the file stores, row for row."""
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype in (Q.Q4_K, Q.Q6_K):
        return k_quant_blocks(w.shape, qtype, rng)
    return quantize(w, qtype)


def write_gguf(path, model, qtype=Q.F32, arch="llama", pre="smollm", tokenizer_model="gpt2", add_bos=False,
               meta=None, skip=(), tensor_types=None, extra_tensors=None):
    """Write `model` as llama.cpp would: Q/K rows permuted, 2-D weights in `qtype`, norms in F32. Returns the
    weights the file holds, in Hugging Face order, dequantized (the reference for loading). meta: extra metadata,
    {key: (writer method, value)}; skip: tensors left out; tensor_types: {gguf name: (numpy data, raw type)}
    overrides; extra_tensors: {gguf name: numpy data} added."""
    a = model.args
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(a.n_layers)
    w.add_context_length(a.max_seq_len)
    w.add_embedding_length(a.dim)
    w.add_feed_forward_length(a.intermediate_size)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.norm_eps)
    w.add_rope_dimension_count(a.head_dim)
    w.add_vocab_size(a.vocab_size)
    tokens, types = byte_vocab()
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(add_bos)
    w.add_chat_template(CHATML)
    for key, (method, value) in (meta or {}).items():
        getattr(w, method)(key, value)
    rng = np.random.default_rng(0)
    reference = {}
    for hf_name, t in hf_state_dict(model).items():
        name = gguf_name(hf_name)
        if name in skip:
            continue
        x = t.float().numpy()
        stored = encode(x, qtype, rng) if x.ndim == 2 else x
        raw = qtype if x.ndim == 2 and qtype not in (Q.F32, Q.F16) else None
        if tensor_types and name in tensor_types:
            stored, raw = tensor_types[name]  # no reference: the file is meant to be refused
        elif raw is None:
            reference[hf_name] = torch.from_numpy(stored.astype(np.float32))
        else:
            reference[hf_name] = torch.from_numpy(dequantize(stored, raw))
        kind = name.split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            stored = llama_cpp_permute(stored, a.n_heads if kind == "attn_q" else a.n_kv_heads)
        w.add_tensor(name, np.ascontiguousarray(stored), raw_dtype=raw)
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return reference


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = Transformer(ModelArgs(**{**CONFIG, "vocab_size": len(byte_vocab()[0]), **overrides}))
    for mod in model.modules():
        if hasattr(mod, "eps"):
            mod.weight.data.uniform_(0.5, 1.5)
    return model.eval().requires_grad_(False)


def reference_checkpoint(model, reference, path):
    """A safetensors checkpoint of `model`'s config holding exactly the weights a GGUF file holds."""
    ref = Transformer(model.args)
    ref.load_state_dict({n[len("model."):] if n.startswith("model.") else n: t for n, t in reference.items()})
    return save_checkpoint(ref, path)


def logits(model, ids):
    model.setup_caches(1, len(ids))
    with torch.no_grad():
        return model(torch.tensor([ids]), input_pos=torch.arange(len(ids))[None],
                     cache_seqlens=torch.zeros(1, dtype=torch.long))[0]


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K],
                         ids=lambda q: q.name)
def test_gguf_loads_like_the_same_weights_from_safetensors(tmp_path, qtype):
    model = tiny(untie := qtype == Q.Q8_0, tie_embeddings=not untie)
    path = tmp_path / "m.gguf"
    reference = write_gguf(path, model, qtype)
    ref = load_model(reference_checkpoint(model, reference, tmp_path / "ref"))
    loaded = load_model(path)
    assert_same_model(loaded, ref)
    assert fingerprint(loaded) == fingerprint(ref)
    ids = [5, 70, 3, 200, 9, 41]
    assert torch.equal(logits(loaded, ids), logits(ref, ids))
    if qtype != Q.F32:  # the file really is quantized: its weights differ from the float32 originals
        assert not torch.equal(loaded.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight)


def test_dtype_and_slabs(tmp_path, monkeypatch):
    """Dequantizing a few rows at a time (Q/K: whole heads) into bf16 gives the one-shot float32 result, rounded."""
    model = tiny()
    path = tmp_path / "m.gguf"
    write_gguf(path, model, Q.Q8_0)
    whole = load_model(path)
    monkeypatch.setattr(gguf_loader, "SLAB_ELEMENTS", 3 * 256)
    sliced = load_model(path, dtype="bf16")
    sw, ss = whole.state_dict(), sliced.state_dict()
    assert all(ss[k].dtype == torch.bfloat16 and torch.equal(ss[k], sw[k].bfloat16()) for k in sw)
    assert fingerprint(sliced) == fingerprint(whole)  # the fingerprint hashes the stored rows, whatever the dtype


def test_tokenizer_from_metadata(tmp_path):
    model = tiny()
    path = tmp_path / "m.gguf"
    write_gguf(path, model)
    model, tok, _ = load_checkpoint(path, "fp32", "cpu")
    ids = {t: i for i, t in enumerate(byte_vocab()[0])}
    # smollm's split: digits one by one (so "12" never forms), then GPT-2's; " the" merges in three steps.
    assert tok.encode("the 123 ab") == [ids[t] for t in ["t", "he", "Ġ", "1", "2", "3", "Ġ", "ab"]]
    assert tok.encode(" the xyz") == [ids[t] for t in ["Ġthe", "Ġ", "x", "y", "z"]]
    assert tok.encode("<|im_end|>x") == [ids["<|im_end|>"], ids["x"]]  # control tokens stay whole
    assert (tok.bos_id, tok.eos_ids, tok.add_bos) == (1, [2], False)
    assert tok.chat_prompt("hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.decode(tok.encode("the 123 ab ünï")) == "the 123 ab ünï"


def test_llama3_pre_tokenizer(tmp_path):
    """Llama 3's split (digits in threes) and its whole-word rule (a split word that is in the vocabulary is one
    token, merges or not: llama.cpp's ignore_merges); and the file's add_bos_token."""
    model = tiny()
    path = tmp_path / "m.gguf"
    write_gguf(path, model, pre="llama-bpe", add_bos=True)
    tok = gguf_loader.GGUFCheckpoint(path).tokenizer()
    ids = {t: i for i, t in enumerate(byte_vocab()[0])}
    assert tok.encode("12345xyz", bos=False) == [ids[t] for t in ["123", "4", "5", "xyz"]]
    assert tok.add_bos and tok.encode("ab") == [1, ids["ab"]]


@pytest.mark.parametrize("n_heads, old_context, high", [(16, 32, 4.0), (4, 64, 4.0), (8, 100, 1.2)],
                         ids=["one-blended-frequency", "five-blended", "none-blended"])
def test_rope_freqs_become_llama3_scaling(tmp_path, n_heads, old_context, high):
    """llama.cpp stores Llama 3's RoPE scaling as a divisor per frequency (tensor rope_freqs.weight); it loads as
    a rope_scaling that gives the same frequencies."""
    scaling = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=high,
                   original_max_position_embeddings=old_context)
    model = tiny(rope_scaling=scaling, n_heads=n_heads, n_kv_heads=2)
    d, theta = model.args.head_dim, model.args.rope_theta
    factors = []  # llama.cpp's convert_hf_to_gguf.py, written out
    for i in range(0, d, 2):
        wavelen = 2 * math.pi * theta ** (i / d)
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / 1.0:
            factors.append(8.0)
        else:
            smooth = (old_context / wavelen - 1.0) / (high - 1.0)
            factors.append(1 / ((1 - smooth) / 8.0 + smooth))
    path = tmp_path / "m.gguf"
    reference = write_gguf(path, model, extra_tensors={"rope_freqs.weight": np.array(factors, np.float32)})
    loaded = load_model(path)
    assert loaded.args.rope_scaling["rope_type"] == "llama3"
    ref = load_model(reference_checkpoint(model, reference, tmp_path / "ref"))
    ids = list(range(3, 250, 2))  # past the original context, where the scaling matters
    assert torch.allclose(logits(loaded, ids), logits(ref, ids), atol=1e-5, rtol=0)



def test_rope_freqs_of_llama_3_1_and_refusals():
    """Llama 3.1's parameters (theta 500000, head_dim 128, factor 8, original context 8192) come back from its
    divisors; uniform divisors are linear scaling; divisors below 1 are no Llama 3 scaling."""
    def divisors(i):  # llama.cpp's formula for frequency i of 64
        wavelen = 2 * math.pi * 500000.0 ** (2 * i / 128)
        smooth = (8192 / wavelen - 1) / 3
        return 1.0 if wavelen < 2048 else 8.0 if wavelen > 8192 else 1 / ((1 - smooth) / 8 + smooth)

    factors = np.array([divisors(i) for i in range(64)], np.float32).astype(np.float64)
    scaling = gguf_loader.llama3_scaling(factors, 500000.0, 128, "t")
    assert scaling["original_max_position_embeddings"] == 8192 and scaling["factor"] == 8.0
    assert scaling["high_freq_factor"] == pytest.approx(4.0) and scaling["low_freq_factor"] == 1.0
    assert gguf_loader.llama3_scaling(np.full(64, 4.0), 500000.0, 128, "t") == {"rope_type": "linear", "factor": 4.0}
    with pytest.raises(MinipassError, match="t holds RoPE frequency factors that no Llama 3 scaling"):
        gguf_loader.llama3_scaling(np.linspace(0.5, 2.0, 64), 500000.0, 128, "t")


def test_convert_writes_what_the_loader_reads(tmp_path):
    """smollm2.convert (and weights/convert_smollm2.py) is the loader writing a Hugging Face directory."""
    from minipass.smollm2 import convert

    path = tmp_path / "m.gguf"
    write_gguf(path, tiny(), Q.Q4_0)
    out = convert(path, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors",
                                                      "tokenizer.json", "tokenizer_config.json"]
    (a, ta, _), (b, tb, _) = load_checkpoint(path, "fp32", "cpu"), load_checkpoint(out, "fp32", "cpu")
    assert_same_model(a, b)
    assert fingerprint(a) == fingerprint(b)
    text = tb.chat_prompt("the 123 xyz")
    assert ta.encode(text) == tb.encode(text) and (ta.bos_id, ta.eos_ids) == (tb.bos_id, tb.eos_ids) == (1, [2])

# The default model's GGUF, loaded directly, against the checkpoint converted from it.

@pytest.fixture(scope="module")
def default_gguf_model(default_ckpt):
    from minipass.smollm2 import fetch_gguf

    return load_checkpoint(fetch_gguf(), "fp32", "cpu")


def test_default_gguf_equals_converted_checkpoint(default_model, default_gguf_model):
    (model, tok), (gmodel, gtok, path) = default_model, default_gguf_model
    assert path.suffix == ".gguf"
    assert_same_model(gmodel, model)
    assert fingerprint(gmodel) == fingerprint(model)
    assert load_lookahead(DEFAULT_LOOKAHEAD_FILE, gmodel).shape[-2] >= 1  # the shipped file accepts it
    ids = tok.encode(tok.chat_prompt("What is the capital of France?"))
    assert (logits(gmodel, ids) - logits(model, ids)).abs().max() < 1e-4
    assert (gtok.bos_id, gtok.eos_ids, gtok.add_bos, gtok.chat_template) == \
           (tok.bos_id, tok.eos_ids, tok.add_bos, tok.chat_template)


def test_default_gguf_greedy_output_is_the_checkpoints(default_model, default_gguf_model):
    (model, tok), (gmodel, gtok, _) = default_model, default_gguf_model
    texts = [tok.chat_prompt("Write a haiku about autumn leaves."), "def fibonacci(n):\n"]
    prompts = [tok.encode(t) for t in texts]
    assert [gtok.encode(t) for t in texts] == prompts
    ours = ar_decode(gmodel, prompts, 16, stop_ids=gtok.eos_ids).tokens
    assert ours == ar_decode(model, prompts, 16, stop_ids=tok.eos_ids).tokens
    assert [len(t) for t in ours] == [16, 16]


def test_cli_takes_a_gguf(tmp_path, capsys):
    path = tmp_path / "m.gguf"
    write_gguf(path, tiny())
    code = main(["--ckpt", str(path), "--prompt", "the ab", "--max-new-tokens", "6", "--mode", "pass1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    model, tok, _ = load_checkpoint(path, "fp32", "cpu")
    expected = ar_decode(model, [tok.encode("the ab")], 6, stop_ids=tok.eos_ids).tokens[0]
    assert out == tok.decode(expected) + "\n" and "[pass1] 6 tokens" in err


# SentencePiece vocabularies ('llama'), against the genuine SentencePiece model they came from.

@pytest.fixture(scope="module")
def sp_model():
    from minipass.fetch import data_dir, fetch_wheel_file

    return fetch_wheel_file("mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1",
                            data_dir() / "mistral-common-1.13.1" / "tokenizer.model.v1")


def test_sentencepiece_vocabulary(tmp_path, sp_model):
    """What llama.cpp's converter stores of a SentencePiece model (pieces, scores, types) rebuilds a tokenizer that
    encodes and decodes as the original does."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else 1 for i in range(n)]
    w = gguf.GGUFWriter(str(tmp_path / "sp.gguf"), "llama")
    for method, value in [("add_block_count", 1), ("add_context_length", 64), ("add_embedding_length", 8),
                          ("add_feed_forward_length", 8), ("add_head_count", 1), ("add_layer_norm_rms_eps", 1e-5),
                          ("add_tokenizer_model", "llama"), ("add_token_list", [sp.id_to_piece(i) for i in range(n)]),
                          ("add_token_scores", [sp.get_score(i) for i in range(n)]), ("add_token_types", types),
                          ("add_bos_token_id", sp.bos_id()), ("add_eos_token_id", sp.eos_id()),
                          ("add_unk_token_id", sp.unk_id()), ("add_add_space_prefix", True),
                          ("add_add_bos_token", True)]:
        getattr(w, method)(value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tok = gguf_loader.GGUFCheckpoint(tmp_path / "sp.gguf").tokenizer()

    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    shutil.copy(sp_model, ref_dir / "tokenizer.model")
    (ref_dir / "tokenizer_config.json").write_text(json.dumps({"legacy": True}))
    ref = Tokenizer.from_dir(ref_dir)
    texts = ["Hello world", "naïve café", "日本語のテキスト", "emoji 🙂👍🏽 and 𝄞", "tab\tnew\nline  two  spaces",
             "  leading spaces", "def f(x):\n    return x ** 2  # square\n", "[INST] hi [/INST]", "a</s>b<s> c", ""]
    for text in texts:
        assert tok.encode(text) == ref.encode(text), text
        if "<" not in text:
            assert tok.encode(text) == [sp.bos_id()] + sp.encode(text), text
        assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text))
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.vocab_size) == (1, [2], True, 32000)


# Refusals: one sentence naming the file and what is wrong.

def refused(path, *fragments, load=load_model):
    with pytest.raises(MinipassError) as e:
        load(path)
    message = str(e.value)
    assert "\n" not in message
    for f in fragments:
        assert f in message, message
    return message


def test_unknown_architecture(tmp_path):
    path = tmp_path / "q.gguf"
    write_gguf(path, tiny(), arch="qwen2")
    refused(path, str(path), "architecture 'qwen2'", "'llama'")


def test_type_the_gguf_package_cannot_dequantize(tmp_path):
    path = tmp_path / "q.gguf"
    q8k = np.zeros((512, 292), np.uint8)  # Q8_K: llama.cpp's intermediate type, which gguf cannot dequantize
    write_gguf(path, tiny(), tensor_types={"blk.1.ffn_up.weight": (q8k, Q.Q8_K)})
    refused(path, str(path), "'blk.1.ffn_up.weight'", "type Q8_K", "cannot dequantize", "Q4_K")


def test_type_id_the_gguf_package_does_not_know(tmp_path):
    path = tmp_path / "q.gguf"
    write_gguf(path, tiny())
    data = bytearray(path.read_bytes())
    # Tensor info: name (u64 length + bytes), n_dims (u32), dims (u64 each), type (u32), offset (u64).
    name = b"blk.0.ffn_gate.weight"
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    n_dims = int.from_bytes(data[at: at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    data[type_at: type_at + 4] = (99).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    refused(path, str(path), "type id 99", "does not know")


def test_integer_tensor(tmp_path):
    path = tmp_path / "q.gguf"
    write_gguf(path, tiny(), tensor_types={"blk.0.attn_norm.weight": (np.ones(256, np.int32), None)})
    refused(path, str(path), "'blk.0.attn_norm.weight'", "dtype I32", "expected", "F32")


def test_nan_weight_with_check_weights(tmp_path):
    model = tiny()
    w = model.layers[1].mlp.down_proj.weight.numpy().copy()
    w[7, 3] = np.nan
    path = tmp_path / "q.gguf"
    write_gguf(path, model, tensor_types={"blk.1.ffn_down.weight": (w, None)})
    load_model(path)  # without the scan, nothing looks at the values
    refused(path, "'blk.1.ffn_down.weight'", "1 NaN", "corrupt", load=lambda p: load_model(p, check_weights=True))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_tokenizer_kinds(tmp_path, kind):
    path = tmp_path / "q.gguf"
    write_gguf(path, tiny(), tokenizer_model=kind)  # no scores and no unknown token: not a usable SentencePiece
    load_model(path)  # the model alone needs no tokenizer
    message = refused(path, str(path), load=lambda p: load_checkpoint(p, "fp32", "cpu"))
    assert ("kind 'bert'" in message) if kind == "bert" else ("without an unknown token" in message)


def test_unknown_pre_tokenizer(tmp_path):
    path = tmp_path / "q.gguf"
    write_gguf(path, tiny(), pre="qwen2")
    refused(path, "pre-tokenizer 'qwen2'", "smollm", load=lambda p: load_checkpoint(p, "fp32", "cpu"))


def test_mixture_of_experts(tmp_path):
    path = tmp_path / "q.gguf"
    write_gguf(path, tiny(), meta={"llama.expert_count": ("add_uint32", 8)})
    refused(path, "mixture-of-experts", "expert_count = 8")


def test_unsupported_rope_scaling(tmp_path):
    path = tmp_path / "q.gguf"
    write_gguf(path, tiny(), meta={"llama.rope.scaling.type": ("add_string", "yarn")})
    refused(path, "RoPE scaling 'yarn'")


def test_missing_metadata_and_tensors(tmp_path):
    path = tmp_path / "q.gguf"
    write_gguf(path, tiny(), skip=("blk.1.ffn_gate.weight",))
    refused(path, "missing tensor", "'model.layers.1.mlp.gate_proj.weight'")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "q.gguf"
    path.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 40)
    refused(path, str(path), "not a readable GGUF file")
    refused(tmp_path / "absent.gguf", "GGUF file", "does not exist")


def test_cli_refusal_is_one_line(tmp_path, capsys):
    path = tmp_path / "q.gguf"
    write_gguf(path, tiny(), arch="gemma")
    code = main(["--ckpt", str(path), "--prompt", "hi"])
    _, err = capsys.readouterr()
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and "'gemma'" in err
