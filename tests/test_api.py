"""The Python API: the README's example runs as written, and the API agrees with the decoders it wraps."""

import re
from pathlib import Path

import pytest

import minipass
from minipass.decoding import ar_decode
from minipass.errors import MinipassError

README = Path(__file__).resolve().parent.parent / "README.md"


def readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Use it from Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def m(default_ckpt):
    return minipass.load(dtype="fp32", device="cpu")


def test_readme_example_runs(default_ckpt, capsys):
    exec(compile(readme_example(), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert re.search(r"\d+ tokens in \d+ calls \(\d\.\d\d per call\)", out)


def test_generate_matches_the_decoder(m):
    tok = m.tokenizer
    ids = tok.encode(tok.chat_prompt("Name a colour."))
    want = ar_decode(m.model, [ids], 12, stop_ids=tok.eos_ids).tokens[0]
    for prompt, chat in (("Name a colour.", True), (ids, False), ([{"role": "user", "content": "Name a colour."}],
                                                                   False)):
        r = m.generate(prompt, max_new_tokens=12, chat=chat)
        assert r.ids == [want] and r.texts == [tok.decode(want)]


def test_batch_rows_follow_their_seeds(m):
    prompts = ["def add(a, b):", "The capital of France is"]
    batch = m.generate(prompts, mode="pass1", max_new_tokens=10, temperature=0.8, top_k=10, seed=5)
    alone = m.generate([prompts[1]], mode="pass1", max_new_tokens=10, temperature=0.8, top_k=10, seed=6)
    assert batch.ids[1] == alone.ids[0]


def test_stream_yields_the_generated_text(m):
    pieces = list(m.stream("def square(x):", mode="tree", max_new_tokens=16))
    assert len(pieces) > 1 and "".join(pieces) == m.generate("def square(x):", max_new_tokens=16).texts[0]


def test_bad_prompt_and_mode(m):
    with pytest.raises(MinipassError, match="a prompt must be a string"):
        m.generate([[1, "x"]])
    with pytest.raises(MinipassError, match="unknown mode 'fast'"):
        m.generate("hi", mode="fast")
    with pytest.raises(MinipassError, match="unknown mode"):
        list(m.stream("hi", mode="fast"))


def test_tree_mode_drafts_from_the_shipped_datastore(m):
    from minipass.decoders import DEFAULT_DATASTORE_FILE

    assert m.datastore() is not None and m.datastore() is m.datastore()  # loaded once
    tok = m.tokenizer
    ids = tok.encode("def is_even(n):\n")
    want = ar_decode(m.model, [ids], 16, stop_ids=tok.eos_ids).tokens[0]
    assert m.generate(ids, mode="tree", max_new_tokens=16).ids == [want]
    off = minipass.api.Minipass(m.model, tok, m.checkpoint, default_model=True, datastore_file="none")
    assert off.datastore() is None and off.generate(ids, mode="tree", max_new_tokens=16).ids == [want]
    assert DEFAULT_DATASTORE_FILE.is_file()
