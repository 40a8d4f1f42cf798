"""minipass.tokenizer on real files: the default model's tokenizer.json and Mistral's SentencePiece tokenizer.model."""

import json
import shutil

import pytest

from minipass.errors import MinipassError
from minipass.fetch import data_dir, fetch_wheel_file
from minipass.tokenizer import Tokenizer

UNICODE = ["naïve café", "日本語のテキスト", "emoji 🙂👍🏽 and 𝄞", "Ж€ ꙮ", "tab\tnew\nline  two  spaces", ""]


@pytest.fixture(scope="session")
def sp_model():
    """A genuine SentencePiece model (Mistral 7B v0.1, 32000 tokens) from a PyPI wheel."""
    return fetch_wheel_file("mistral-common", "1.13.1", "mistral_common/data/tokenizer.model.v1",
                            data_dir() / "mistral-common-1.13.1" / "tokenizer.model.v1")


@pytest.fixture
def sp_dir(tmp_path, sp_model):
    d = tmp_path / "sp"
    d.mkdir()
    shutil.copy(sp_model, d / "tokenizer.model")
    return d


@pytest.fixture(scope="session")
def smol(default_ckpt):
    return Tokenizer.from_dir(default_ckpt)


def streamed(tok, ids):
    stream = tok.stream()
    pieces = [stream.push(i) for i in ids]
    return pieces, stream.flush()


# --- SentencePiece (tokenizer.model) -----------------------------------------------------------------------------

# Golden ids from sentencepiece 0.2.3 directly: SentencePieceProcessor(model_file=...).encode(text).
SP_GOLDEN = {
    "Hello world": [22557, 1526],
    "  leading spaces": [259, 5374, 10599],
    "naïve café 日本語 🙂": [1879, 28920, 333, 28345, 28705, 29142, 29119, 30321, 28705, 29340],
    "line1\nline2\n": [1407, 28740, 13, 1081, 28750, 13],
    "x = 12345": [1318, 327, 28705, 28740, 28750, 28770, 28781, 28782],
    "𝄞 ꙮ": [28705, 243, 160, 135, 161, 28705, 237, 156, 177],  # byte fallback: <0xF0> <0x9D> <0x84> <0x9E> ...
    "def f(a, b):\n    return a+b": [801, 285, 28732, 28708, 28725, 287, 1329, 13, 2287, 604, 264, 28806, 28726],
}

# Golden ids from transformers 5.23 LlamaTokenizer.from_pretrained(dir with this tokenizer.model), legacy=False,
# encode(text, add_special_tokens=False): control tokens in the text become their ids, and the text after them gets
# no dummy-prefix space.
SP_CONTROL_GOLDEN = {
    "<s>Hello</s> world": [1, 16230, 2, 1526],
    "Hello<s>world": [22557, 1, 9471],
    "a </s>b": [264, 28705, 2, 28726],
    "[INST] Hi [/INST]</s>": [733, 16289, 28793, 15359, 733, 28748, 16289, 28793, 2],
}


# The same with legacy=True, where each piece between control tokens is encoded on its own (as Meta's and Mistral's
# reference code do); these ids are also what sentencepiece gives piece by piece.
SP_LEGACY_GOLDEN = {
    "<s>[INST] Hi [/INST]": [1, 733, 16289, 28793, 15359, 733, 28748, 16289, 28793],
    "Hello<s>world": [22557, 1, 1526],
    "a </s>b": [264, 28705, 2, 287],
}


def test_sp_golden_ids(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    for text, ids in {**SP_GOLDEN, **SP_CONTROL_GOLDEN}.items():
        assert tok.encode(text, bos=False) == ids, text
    assert tok.encode("<s>[INST] Hi [/INST]", bos=False)[:2] == [1, 28792]  # "[" without the "▁"


def test_sp_legacy_golden_ids(sp_dir):
    (sp_dir / "tokenizer_config.json").write_text(json.dumps({"legacy": True}))
    tok = Tokenizer.from_dir(sp_dir)
    for text, ids in {**SP_GOLDEN, **SP_LEGACY_GOLDEN}.items():
        assert tok.encode(text, bos=False) == ids, text


def test_sp_vocab_and_special_ids(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    assert (tok.vocab_size, tok.bos_id, tok.eos_ids) == (32000, 1, [2])
    assert (tok.token_to_id("<s>"), tok.token_to_id("</s>"), tok.token_to_id("▁Hello")) == (1, 2, 22557)
    assert tok.token_to_id("not-a-piece") is None
    assert tok.encode("<unk>", bos=False) == [0]


def test_sp_bos_handling(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    assert tok.encode("Hello world") == [1, 22557, 1526]  # SentencePiece checkpoints add BOS by default
    assert tok.encode("Hello world", bos=False) == [22557, 1526]
    assert tok.encode("", bos=True) == [1]
    (sp_dir / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert Tokenizer.from_dir(sp_dir).encode("Hello world") == [22557, 1526]


def test_sp_round_trip(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    for text in list(SP_GOLDEN) + UNICODE:
        assert tok.decode(tok.encode(text)) == text
    assert tok.decode([1, 22557, 2, 1526]) == "Hello world"  # special tokens are skipped


def test_sp_stream_multibyte(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    ids = tok.encode("Hi 𝄞 ꙮ", bos=False)
    pieces, rest = streamed(tok, ids)
    # The four byte tokens of 𝄞 and three of ꙮ say nothing until the character is complete; "▁" pieces give spaces.
    assert pieces == ["Hi", " ", "", "", "", "𝄞", " ", "", "", "ꙮ"]
    assert rest == ""
    for text in list(SP_GOLDEN) + UNICODE:
        pieces, rest = streamed(tok, tok.encode(text))
        assert "".join(pieces) + rest == text
        assert not any("\ufffd" in p for p in pieces)


def test_sp_flush_returns_incomplete_tail(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    pieces, rest = streamed(tok, [15359, 28705, 243, 160])  # "Hi", "▁", then half of 𝄞's four bytes
    assert "".join(pieces) == "Hi " and rest == tok.decode([243, 160]) != ""


def test_sp_configs_and_added_tokens(sp_dir):
    (sp_dir / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (sp_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 32001]}))
    (sp_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "__type": "AddedToken"}, "eos_token": "<|im_end|>",
        "added_tokens_decoder": {"32000": {"content": "<|im_start|>", "special": True},
                                 "32001": {"content": "<|im_end|>", "special": True}}}))
    tok = Tokenizer.from_dir(sp_dir)
    assert (tok.bos_id, tok.eos_ids, tok.vocab_size) == (1, [2, 32001], 32002)
    assert tok.encode("<|im_start|>Hello<|im_end|>", bos=False) == [32000, 16230, 32001]
    assert tok.decode([32000, 22557, 32001]) == "Hello"


def test_sp_chat_prompt(sp_dir):
    tok = Tokenizer.from_dir(sp_dir)
    # No chat template in the checkpoint: ChatML.
    assert tok.chat_prompt("Hi") == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('no system role') }}{% endif %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    (sp_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    tok = Tokenizer.from_dir(sp_dir)
    prompt = tok.chat_prompt([{"role": "user", "content": "Hi"}])
    assert prompt == "<s>[INST] Hi [/INST]"
    assert tok.encode(prompt, bos=False) == [1, 28792, 16289, 28793, 15359, 733, 28748, 16289, 28793]
    with pytest.raises(MinipassError, match="no system role"):
        tok.chat_prompt([{"role": "system", "content": "x"}])
    with pytest.raises(MinipassError, match="role"):
        tok.chat_prompt([{"text": "Hi"}])


# --- tokenizer.json (the default model) --------------------------------------------------------------------------

def test_smol_special_ids(smol):
    assert (smol.bos_id, smol.eos_ids, smol.vocab_size, smol.add_bos) == (1, [2], 49152, False)
    assert (smol.token_to_id("<|im_start|>"), smol.token_to_id("<|im_end|>")) == (1, 2)
    user = smol.encode("user", bos=False)
    assert smol.encode("<|im_start|>user<|im_end|>") == [1, *user, 2]
    assert smol.encode("Hi", bos=True)[0] == 1 and smol.encode("Hi")[0] != 1


def test_smol_digits_split(smol):
    assert smol.encode("12345") == [smol.token_to_id(d) for d in "12345"]
    assert len(smol.encode("year 2024")) == len(smol.encode("year")) + 5  # " " is one token, then four digits


def test_smol_round_trip(smol):
    for text in UNICODE + ["<|im_start|>user\nhi", "def fibonacci(n):\n    return n"]:
        assert smol.decode(smol.encode(text)) == text.replace("<|im_start|>", "")


def test_smol_stream(smol):
    ids = smol.encode("Tokyo: 東京 ok")
    pieces, rest = streamed(smol, ids)
    assert pieces == ["To", "kyo", ":", "", "", " 東", "", "京", " ok"] and rest == ""
    ids = smol.encode("<|im_start|>assistant\nOui.<|im_end|>\n")
    pieces, rest = streamed(smol, ids)
    assert pieces[0] == "" and "".join(pieces) + rest == smol.decode(ids) == "assistant\nOui.\n"
    for text in UNICODE:
        pieces, rest = streamed(smol, smol.encode(text))
        assert "".join(pieces) + rest == text


def test_smol_chat_prompt(smol):
    assert smol.chat_prompt("What is the capital of France?") == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    own_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert smol.chat_prompt(own_system) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_smol_matches_transformers(smol, default_ckpt):
    from tests.util import transformers_or_skip

    transformers = transformers_or_skip()
    ref = transformers.AutoTokenizer.from_pretrained(default_ckpt)
    texts = ["Hello world", "  two leading spaces", "x = 12345 + 6.7e-8", "naïve café 日本語 🙂",
             "def fibonacci(n):\n    if n < 2:\n        return n", "<|im_start|>user\nHi<|im_end|>\n",
             "tabs\tand\r\nCRLF", "ALL CAPS and MiXeD", "it's don't we'll", smol.chat_prompt("Why is the sky blue?")]
    for text in texts:
        assert smol.encode(text) == ref.encode(text, add_special_tokens=True), text
        assert smol.decode(smol.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True), text


# --- bad input ---------------------------------------------------------------------------------------------------

def test_missing_dir(tmp_path):
    with pytest.raises(MinipassError, match="does not exist") as e:
        Tokenizer.from_dir(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)


def test_dir_without_tokenizer(tmp_path):
    with pytest.raises(MinipassError) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(e.value) and "tokenizer.json" in str(e.value) and "tokenizer.model" in str(e.value)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_corrupt_tokenizer_file(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x00garbage{")
    with pytest.raises(MinipassError) as e:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path / name) in str(e.value)


def test_corrupt_tokenizer_config(sp_dir):
    (sp_dir / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(MinipassError) as e:
        Tokenizer.from_dir(sp_dir)
    assert str(sp_dir / "tokenizer_config.json") in str(e.value)
