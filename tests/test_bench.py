"""bench.py end to end on a tiny checkpoint: every field of the JSON, greedy identity to AR, user errors."""

import importlib.util
import json
from pathlib import Path

import pytest

from tests.util import tiny_checkpoint

ROOT = Path(__file__).resolve().parent.parent
FIELDS = {"dataset", "mode", "lookahead", "temperature", "top_k", "top_p", "batch_size", "prompts", "new_tokens",
          "wall_s", "tokens_per_s", "calls", "tokens_per_call", "acceptance_by_position", "speedup_vs_ar",
          "identical_to_ar"}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench", ROOT / "bench.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    ckpt = tiny_checkpoint(root / "ckpt")
    prompts = root / "prompts.jsonl"
    lines = [{"prompt": "abcabcabcab"}, {"prompt": "the cat sat on the mat, the cat"},
             {"messages": [{"role": "user", "content": "hi"}]}]
    prompts.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return ckpt, prompts


def test_json_has_every_field_and_greedy_matches_ar(bench, setup, tmp_path, capsys):
    ckpt, prompts = setup
    out = tmp_path / "out.json"
    argv = ["--ckpt", str(ckpt), "--dataset", str(prompts), "--num-prompts", "3", "--max-new-tokens", "8",
            "--batch-size", "2", "--lookahead", "1,3", "--modes", "ar,pass,pass1,ngram,tree", "--json", str(out)]
    assert bench.main(argv) == 0
    doc = json.loads(out.read_text())
    assert {"model", "device", "dtype", "runs"} <= set(doc)
    runs = doc["runs"]
    for r in runs:
        assert FIELDS <= set(r), FIELDS - set(r)
    # Greedy and the paper's sampling setting; pass and pass1 at both L, ar/ngram/tree once per L list entry.
    settings = {(r["temperature"], r["top_k"]) for r in runs}
    assert settings == {(0.0, 0), (0.8, 10)}
    modes = {(r["mode"], r["lookahead"]) for r in runs}
    assert {("ar", 0), ("pass", 1), ("pass", 3), ("pass1", 1), ("pass1", 3), ("ngram", 0)} <= modes
    assert {m for m, _ in modes} == {"ar", "pass", "pass1", "ngram", "tree"}
    for r in runs:
        assert r["prompts"] == 3 and r["new_tokens"] > 0 and r["calls"] > 0 and r["wall_s"] > 0
        assert r["tokens_per_call"] >= 1.0  # per row: a call emits at least one token in every live row
        if r["temperature"] == 0:
            assert r["identical_to_ar"] is True, r
        else:
            assert r["identical_to_ar"] is None
        if r["mode"] == "ar":
            assert r["lookahead"] == 0 and r["speedup_vs_ar"] == 1.0 and r["tokens_per_call"] == 1.0
    assert "tok/s" in capsys.readouterr().out  # the table


@pytest.mark.parametrize("extra, message", [
    (["--modes", "ar,fast"], "unknown mode 'fast' in --modes"),
    (["--lookahead", "2,x"], "--lookahead must be integers separated by commas"),
    (["--num-prompts", "0"], "--num-prompts and --batch-size must be >= 1"),
])
def test_bad_options(bench, setup, capsys, extra, message):
    ckpt, prompts = setup
    assert bench.main(["--ckpt", str(ckpt), "--dataset", str(prompts), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
