"""The command line: user errors give one line and exit code 2; a run streams what ar_decode produces."""

import subprocess
import sys

import pytest
import torch

from minipass.decoding import ar_decode
from minipass.generate import main
from minipass.lookahead import init_lookahead, save_lookahead
from tests.util import tiny_model


def run_main(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("argv,message", [
    (["--ckpt", "/no/such/dir"], "checkpoint directory /no/such/dir does not exist"),
    (["--temperature", "-1"], "temperature must be >= 0"),
    (["--top-p", "1.5", "--temperature", "1"], "top_p must be in (0, 1]"),
    (["--top-k", "-2", "--temperature", "1"], "top_k must be an integer >= 0"),
    (["--mode", "pass", "--lookahead", "0"], "--lookahead must be >= 1"),
    (["--mode", "tree", "--datastore", "/no/such.safetensors"], "datastore file not found: /no/such.safetensors"),
    (["--max-new-tokens", "9000"], "exceeds the model's context of 8192 tokens"),
    pytest.param(["--dtype", "fp32", "--device", "cuda:7"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_user_errors_exit_2_with_one_line(capsys, default_ckpt, argv, message):
    code, out, err = run_main(capsys, "--prompt", "hello", *argv)
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_lookahead_file_for_another_model(capsys, default_ckpt, tmp_path):
    other = tiny_model("tiny")
    f = tmp_path / "other.safetensors"
    save_lookahead(f, init_lookahead(other, 4), other, "tiny")
    code, _, err = run_main(capsys, "--prompt", "hi", "--mode", "pass1", "--lookahead-file", str(f))
    assert code == 2 and "expected [L, 576]" in err


def test_datastore_for_another_vocabulary(capsys, default_ckpt, tmp_path):
    from minipass.datastore import save_datastore

    f = tmp_path / "other.safetensors"
    save_datastore(str(f), [1, 2, 3], 16)
    code, _, err = run_main(capsys, "--prompt", "hi", "--mode", "tree", "--datastore", str(f))
    assert code == 2 and "made for a vocabulary of 16 tokens, the model has 49152" in err


def test_no_traceback_from_the_real_entry_point(default_ckpt):
    proc = subprocess.run([sys.executable, "-m", "minipass.generate", "--ckpt", "/no/such/dir", "--prompt", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "does not exist" in proc.stderr


@pytest.mark.parametrize("mode", ["ar", "tree"])
def test_streamed_text_is_the_greedy_output(capsys, default_model, mode):
    model, tok = default_model
    code, out, err = run_main(capsys, "--prompt", "def add(a, b):", "--max-new-tokens", "12", "--mode", mode,
                              "--dtype", "fp32")
    assert code == 0
    ids = ar_decode(model, [tok.encode("def add(a, b):")], 12, stop_ids=tok.eos_ids).tokens[0]
    assert out == tok.decode(ids) + "\n"
    assert f"[{mode}] 12 tokens" in err
