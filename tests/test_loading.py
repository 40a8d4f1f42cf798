import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from minipass.errors import MinipassError
from minipass.loading import load_model
from tests.util import save_checkpoint, tiny_model


@pytest.fixture
def ckpt(tmp_path):
    model = tiny_model("tiny")
    return model, save_checkpoint(model, tmp_path / "ckpt")


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip(ckpt):
    model, path = ckpt
    assert same_weights(load_model(path), model)


def test_sharded_checkpoint(tmp_path):
    model = tiny_model("tiny-untied-mha")
    path = save_checkpoint(model, tmp_path / "sharded", shards=3)
    assert not (path / "model.safetensors").exists()
    assert same_weights(load_model(path), model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dtype(ckpt, dtype):
    model, path = ckpt
    loaded = load_model(path, dtype=dtype)
    assert all(p.dtype == dtype for p in loaded.parameters())
    assert torch.equal(loaded.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.weight.to(dtype))


def expect_error(path, *fragments):
    with pytest.raises(MinipassError) as e:
        load_model(path)
    for f in fragments:
        assert f in str(e.value), str(e.value)


def test_missing_directory(tmp_path):
    expect_error(tmp_path / "nope", "nope", "does not exist")


def test_missing_config(ckpt):
    _, path = ckpt
    (path / "config.json").unlink()
    expect_error(path, "config.json", "does not exist")


def test_missing_weights(ckpt):
    _, path = ckpt
    (path / "model.safetensors").unlink()
    expect_error(path, "neither model.safetensors nor model.safetensors.index.json")


def test_pickle_only_checkpoint_is_refused(ckpt):
    _, path = ckpt
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    expect_error(path, "pickle", "safetensors only")


def test_unsupported_model_type(ckpt):
    _, path = ckpt
    cfg = json.loads((path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (path / "config.json").write_text(json.dumps(cfg))
    expect_error(path, "unsupported model_type 'gpt2'", "config.json")


def rewrite(path, fn):
    f = path / "model.safetensors"
    sd = load_file(str(f))
    fn(sd)
    save_file(sd, str(f))


def test_missing_tensor(ckpt):
    _, path = ckpt
    rewrite(path, lambda sd: sd.pop("model.layers.1.mlp.down_proj.weight"))
    expect_error(path, "missing tensor", "'model.layers.1.mlp.down_proj.weight'")


def test_unexpected_tensor(ckpt):
    _, path = ckpt
    rewrite(path, lambda sd: sd.update({"model.layers.7.mlp.down_proj.weight": torch.zeros(2)}))
    expect_error(path, "unexpected tensor 'model.layers.7.mlp.down_proj.weight'")


def test_wrong_shape(ckpt):
    _, path = ckpt
    rewrite(path, lambda sd: sd.update({"model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}))
    expect_error(path, "'model.layers.0.self_attn.k_proj.weight'", "shape [64, 64]", "expected [32, 64]")


def test_truncated_file(ckpt):
    _, path = ckpt
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    expect_error(path, "model.safetensors is not a valid safetensors file")


def test_corrupt_header(ckpt):
    _, path = ckpt
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    expect_error(path, "model.safetensors is not a valid safetensors file")


def test_shard_listed_but_absent(tmp_path):
    path = save_checkpoint(tiny_model("tiny"), tmp_path / "s", shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    expect_error(path, "model-00002-of-00002.safetensors", "does not exist")


def test_config_mismatch_reports_shape(ckpt):
    _, path = ckpt
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 100
    (path / "config.json").write_text(json.dumps(cfg))
    expect_error(path, "'model.layers.0.mlp.down_proj.weight'", "shape [64, 128]", "expected [64, 100]")


def poison(path, key, index, value):
    def fn(sd):
        sd[key] = sd[key].clone()
        sd[key][index] = value
    rewrite(path, fn)


def test_integer_weights_are_refused(ckpt):
    _, path = ckpt
    rewrite(path, lambda sd: sd.update({"model.norm.weight": torch.ones(64, dtype=torch.int32)}))
    expect_error(path, "model.safetensors", "tensor 'model.norm.weight' has dtype I32", "expected",
                 "floating-point")


@pytest.mark.parametrize("value, found", [(float("nan"), "1 NaN and 0 infinite"), (float("inf"), "0 NaN and 1 inf")])
def test_check_weights_refuses_a_non_finite_weight(ckpt, value, found):
    model, path = ckpt
    poison(path, "model.layers.1.mlp.down_proj.weight", (5, 17), value)
    assert load_model(path).layers[1].mlp.down_proj.weight[5, 17].isfinite().item() is False  # not scanned
    for dtype in ("fp32", "bf16"):
        with pytest.raises(MinipassError) as e:
            load_model(path, dtype=dtype, check_weights=True)
        message = str(e.value)
        assert "'model.layers.1.mlp.down_proj.weight'" in message and found in message and "corrupt" in message
    assert same_weights(load_model(save_checkpoint(model, path.parent / "clean"), check_weights=True), model)


def test_check_weights_tells_overflow_from_corruption(ckpt):
    _, path = ckpt
    poison(path, "model.layers.0.self_attn.o_proj.weight", (1, 2), 1e6)  # finite in fp32, beyond fp16's 65504
    assert load_model(path, dtype="bf16", check_weights=True) is not None
    with pytest.raises(MinipassError, match=r"'model.layers.0.self_attn.o_proj.weight' has 0 NaN and 1 infinite "
                                            r"value\(s\) once converted to float16.*bf16 or fp32"):
        load_model(path, dtype="fp16", check_weights=True)


def test_cli_check_weights(tmp_path, capsys):
    from minipass.generate import main
    from tests.util import tiny_checkpoint

    path = tiny_checkpoint(tmp_path / "ckpt")
    poison(path, "model.layers.0.mlp.up_proj.weight", (3, 4), float("nan"))
    # Without the scan, decoding meets the NaN in its first step and stops with the row and position.
    assert main(["--ckpt", str(path), "--prompt", "hi", "--max-new-tokens", "2"]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("error: non-finite logits") and "batch row 0 at token position 2" in err
    assert err.count("\n") == 1
    assert main(["--ckpt", str(path), "--prompt", "hi", "--check-weights"]) == 2
    _, err = capsys.readouterr()
    assert err.startswith("error: ") and err.count("\n") == 1 and "'model.layers.0.mlp.up_proj.weight'" in err
