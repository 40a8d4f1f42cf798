"""minipass.bench_step: it times the step a decoder loops over and that step's own forward calls."""

import pytest
import torch

from minipass import bench_step, tree_decoding
from minipass.decoders import DecoderOptions, make_decoder
from minipass.decoding import SamplingParams
from minipass.lookahead import init_lookahead
from tests.util import tiny_checkpoint, tiny_model


def test_captured_step_and_forwards_are_the_decoders():
    model = tiny_model("tiny", seed=0)
    la = init_lookahead(model, 4, "random", seed=1)
    opts = DecoderOptions()
    decode = make_decoder("tree", opts, la)
    prompts = [[1, 2, 3, 1, 2], [4, 5, 4, 5, 4, 5]]
    with torch.no_grad():
        step, st = bench_step.step_and_state(decode, tree_decoding, model, prompts, 8, SamplingParams())
        calls = bench_step.forward_calls(model, step, st)
    T = 1 + opts.tree.nodes + opts.tree.blocks * 4
    assert len(calls) == 1 and calls[0]["embeds"].shape[:2] == (2, T)
    assert calls[0]["mask"].shape == (2, T, T)
    assert "forward" not in vars(model)  # the recorder is removed again


def test_prints_a_row_per_mode(capsys):
    bench_step.main(["--modes", "ar,ngram", "--batch-size", "2", "--prompt-len", "8", "--steps", "2", "--rounds", "2",
                     "--eager"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[2:]}
    assert set(rows) == {"ar", "ngram"}
    assert rows["ar"][1] == "1" and rows["ngram"][1] == str(1 + tree_decoding.NGRAM.nodes)
    assert all(float(rows[m][3]) > 0 and float(rows[m][5]) > 0 for m in rows)  # step and forward ms
    assert all(float(rows[m][9]) > 0 for m in rows)  # the step with stand-in forwards


def test_a_tree_of_given_sizes_is_that_wide(capsys):
    # --tree N,M,L: 1 root + N nodes + M blocks of L look-ahead tokens
    bench_step.main(["--modes", "tree", "--tree", "2,1,1", "--batch-size", "2", "--prompt-len", "8", "--steps", "2",
                     "--rounds", "2", "--eager"])
    (row,) = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert row[:2] == ["tree", "4"]


def test_stand_in_forward_returns_the_recorded_output_of_a_call_of_that_shape():
    model = tiny_model("tiny", seed=0)
    tokens = torch.tensor([[1, 2, 3], [4, 5, 6]])
    kw = dict(tokens=tokens, input_pos=torch.arange(3).expand(2, -1), cache_seqlens=torch.zeros(2, dtype=torch.long))
    model.setup_caches(2, 64, call_width=3, prefill_len=0)
    with torch.no_grad():
        out = model(**kw)
        forward = bench_step.stand_in_forward([kw], [out])
        assert torch.equal(forward(**kw), out)
        assert torch.equal(forward(tokens + 7, input_pos=kw["input_pos"], cache_seqlens=kw["cache_seqlens"]), out)
        with pytest.raises(KeyError):  # a call of another width has no recorded output
            forward(tokens[:, :2], input_pos=kw["input_pos"][:, :2], cache_seqlens=kw["cache_seqlens"])


def test_times_a_checkpoint_given_by_path(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    bench_step.main(["--ckpt", str(ckpt), "--dtype", "fp32", "--modes", "ar", "--batch-size", "1", "--prompt-len", "6",
                     "--steps", "2", "--rounds", "1", "--eager"])
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{ckpt} model (torch.float32), batch 1")
    assert out[2].split()[:2] == ["ar", "1"]


def test_a_missing_checkpoint_is_one_line_and_exit_code_2(tmp_path, capsys):
    assert bench_step.main(["--ckpt", str(tmp_path / "nowhere"), "--modes", "ar"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "nowhere") in err[0]
