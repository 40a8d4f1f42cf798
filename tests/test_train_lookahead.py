"""Training the look-ahead embeddings: the block mask against plain forwards, the loss against a per-anchor
reference, the frozen base, resume, truncation, and the command line's errors."""

import json
import re

import pytest
import torch
import torch.nn.functional as F

import minipass.train_lookahead as tl
from minipass.kernels import cpu_bf16
from minipass.loading import load_checkpoint
from minipass.lookahead import init_lookahead, load_lookahead
from tests.util import drafting_call, per_layer_lookahead, tiny_checkpoint, tiny_model

ZERO = torch.zeros(1, dtype=torch.long)


def plain_hidden(model, tokens):
    """Final hidden states of a plain causal forward of `tokens` (B, n)."""
    B, n = tokens.shape
    model.setup_caches(B, n)
    return model(tokens, input_pos=torch.arange(n).expand(B, -1), cache_seqlens=ZERO.expand(B),
                 return_hidden=True)


def block_hidden(hidden, layout, b):
    n, L = layout.n, layout.L
    return hidden[:, n + b * L: n + (b + 1) * L]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("tiny", seed=3)


# --- the mask ----------------------------------------------------------------------------------------------------

def random_lookahead(model, L, per_layer):
    return per_layer_lookahead(model, L) if per_layer else init_lookahead(model, L, "random")


@pytest.mark.parametrize("per_layer", [False, True], ids=["embeddings", "per-layer"])
@pytest.mark.parametrize("n,L,stride,offset", [(40, 3, 2, 1), (33, 5, 1, 0), (24, 1, 4, 3), (19, 8, 3, 2)])
def test_real_tokens_are_unchanged_by_the_blocks(tiny, n, L, stride, offset, per_layer):
    tokens = torch.randint(0, tiny.args.vocab_size, (2, n), generator=torch.Generator().manual_seed(n))
    layout = tl.make_layout(n, L, stride, offset)
    assert layout.anchors.numel() > 0
    hidden = tl.lookahead_forward(tiny, tokens, random_lookahead(tiny, L, per_layer), layout)
    torch.testing.assert_close(tiny.head(hidden[:, :n]), tiny.head(plain_hidden(tiny, tokens)))


@pytest.mark.parametrize("per_layer", [False, True], ids=["embeddings", "per-layer"])
@pytest.mark.parametrize("n,L,stride,offset", [(40, 3, 2, 1), (33, 5, 1, 0), (19, 8, 3, 2)])
def test_blocks_match_the_drafting_call(tiny, n, L, stride, offset, per_layer):
    tokens = torch.randint(0, tiny.args.vocab_size, (2, n), generator=torch.Generator().manual_seed(n))
    emb = random_lookahead(tiny, L, per_layer)
    layout = tl.make_layout(n, L, stride, offset)
    hidden = tl.lookahead_forward(tiny, tokens, emb, layout)
    assert int(layout.anchors[-1]) + 1 + L <= n - 1 < int(layout.anchors[-1]) + stride + 1 + L  # last fitting
    for b, a in enumerate(layout.anchors.tolist()):
        torch.testing.assert_close(tiny.head(block_hidden(hidden, layout, b)),
                                   tiny.head(drafting_call(tiny, tokens, a, emb)))


def test_blocks_match_the_drafting_call_on_the_default_model(default_model):
    model, tok = default_model
    tokens = torch.tensor([tok.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
                                      "    if n < 2:\n        return n\n")])
    n, L = tokens.shape[1], 4
    emb = init_lookahead(model, L, "random")
    layout = tl.make_layout(n, L, 9, 2)
    hidden = tl.lookahead_forward(model, tokens, emb, layout)
    torch.testing.assert_close(model.head(hidden[:, :n]), model.head(plain_hidden(model, tokens)),
                               atol=2e-4, rtol=1e-4)
    for b in (0, len(layout.anchors) - 1):
        a = int(layout.anchors[b])
        torch.testing.assert_close(model.head(block_hidden(hidden, layout, b)),
                                   model.head(drafting_call(model, tokens, a, emb)), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("per_layer", [False, True], ids=["embeddings", "per-layer"])
@pytest.mark.parametrize("L_max,L", [(6, 1), (6, 3), (8, 5)])
def test_truncated_embeddings_give_the_same_drafts(tiny, L_max, L, per_layer):
    """Look-ahead token k sees tokens 1..k of its block only, so the first L of L_max embeddings draft positions
    1..L exactly as the full block does."""
    n = 30
    tokens = torch.randint(0, tiny.args.vocab_size, (2, n), generator=torch.Generator().manual_seed(L))
    emb = random_lookahead(tiny, L_max, per_layer)
    full, short = tl.make_layout(n, L_max, 2, 1), tl.make_layout(n, L, 2, 1)
    h_full = tl.lookahead_forward(tiny, tokens, emb, full)
    h_short = tl.lookahead_forward(tiny, tokens, emb[..., :L, :], short)
    for b in range(len(full.anchors)):  # the short layout has these anchors and more
        assert full.anchors[b] == short.anchors[b]
        torch.testing.assert_close(tiny.head(block_hidden(h_short, short, b)),
                                   tiny.head(block_hidden(h_full, full, b)[:, :L]), atol=1e-6, rtol=1e-6)


# --- the loss ----------------------------------------------------------------------------------------------------

def reference_loss(model, tokens, emb, layout, loss):
    """The same loss from one drafting call per anchor and one plain forward for the targets."""
    p = model.head(plain_hidden(model, tokens)).float()  # (B, n, V)
    terms = []
    for a in layout.anchors.tolist():
        logq = F.log_softmax(model.head(drafting_call(model, tokens, a, emb)).float(), -1)  # (B, L, V)
        src = torch.arange(a + 1, a + 1 + layout.L)  # real tokens that predict the same positions
        if loss == "ce":
            terms.append(-logq.gather(-1, tokens[:, src + 1, None])[..., 0])
        else:
            logp = F.log_softmax(p[:, src], -1)
            terms.append((logp.exp() * (logp - logq)).sum(-1))
    return torch.stack(terms).mean()


@pytest.mark.parametrize("per_layer", [False, True], ids=["embeddings", "per-layer"])
@pytest.mark.parametrize("loss", ["ce", "kl"])
@pytest.mark.parametrize("chunk_rows", [1024, 7])
def test_loss_and_gradient_match_a_per_anchor_reference(tiny, loss, chunk_rows, per_layer, monkeypatch):
    monkeypatch.setattr(tl, "LOSS_CHUNK_ROWS", chunk_rows)
    n, L = 36, 4
    tokens = torch.randint(0, tiny.args.vocab_size, (2, n), generator=torch.Generator().manual_seed(7))
    layout = tl.make_layout(n, L, 3, 2)
    emb = torch.nn.Parameter(random_lookahead(tiny, L, per_layer))
    value, hits, blocks = tl.lookahead_loss(tiny, tokens, emb, layout, loss)
    assert blocks == 2 * len(layout.anchors) and hits.shape == (L,)

    ref_emb = torch.nn.Parameter(emb.detach().clone())
    ref = reference_loss(tiny, tokens, ref_emb, layout, loss)
    ref.backward()
    assert value == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(emb.grad, ref_emb.grad, atol=1e-7, rtol=1e-4)


@pytest.mark.skipif(not cpu_bf16.preferred(), reason=f"minipass's CPU bf16 kernels are not taken here: {cpu_bf16.why_not()}")
def test_bf16_gradient_where_the_cpu_kernels_run(monkeypatch):
    """The CPU bf16 operators have no backward: in bf16 on a CPU that takes them, the loss's gradient (logits made
    in chunks of few rows, which the kernels would take when decoding) is the one torch's own operations give."""
    model = tiny_model(dtype=torch.bfloat16)
    n, L = 36, 3
    tokens = torch.randint(0, model.args.vocab_size, (2, n), generator=torch.Generator().manual_seed(7))
    layout = tl.make_layout(n, L, 3, 2)
    start = per_layer_lookahead(model, L).float()
    monkeypatch.setattr(tl, "LOSS_CHUNK_ROWS", 24)

    def gradient():
        emb = torch.nn.Parameter(start.clone())
        tl.lookahead_loss(model, tokens, emb, layout, "ce")
        return emb.grad

    with_kernels = gradient()
    monkeypatch.setattr(cpu_bf16, "preferred", lambda: False)
    assert torch.equal(with_kernels, gradient())


@pytest.mark.parametrize("loss,factor", [("ce", 0.95), ("kl", 0.8)])  # a random model's own entropy bounds ce
def test_training_steps_lower_the_loss_and_change_only_the_embeddings(loss, factor):
    model = tiny_model("tiny", seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # Text with structure: the embeddings can learn what tends to come two or three tokens later.
    text = torch.tensor([[(7 * i) % 23 + 40 for i in range(64)], [(5 * i) % 19 + 90 for i in range(64)]])
    layout = tl.make_layout(64, 3, 2)
    emb = torch.nn.Parameter(init_lookahead(model, 3))
    opt = torch.optim.Adam([emb], lr=0.05)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        losses.append(tl.lookahead_loss(model, text, emb, layout, loss)[0])
        opt.step()
    assert losses[-1] < factor * losses[0] and losses[-1] == min(losses)
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# --- the command line --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    ckpt = tiny_checkpoint(root / "ckpt")
    text = root / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 60 + "Pack my box with five dozen jugs. " * 60)
    chat = root / "chat.jsonl"
    chat.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": f"Count to {i}."},
                                                        {"role": "assistant", "content": " ".join(map(str, range(i)))}]})
                              for i in range(5, 40)) + "\n")
    return root, ckpt, text, chat


def cli(ckpt, out, *extra):
    return ["--ckpt", str(ckpt), "--out", str(out), "--device", "cpu", "--lookahead", "3", "--seq-len", "32",
            "--stride", "2", "--batch-size", "2", "--steps", "6", "--val-sequences", "2", "--eval-every", "3",
            "--lr", "0.02", *extra]


def test_resume_continues_the_same_run(cli_setup, monkeypatch, capsys):
    root, ckpt, text, chat = cli_setup
    args = ["--data", str(text), "--data", f"distill:{chat}", "--loss", "kl"]
    whole = tl.train(tl.parse_args(cli(ckpt, root / "whole.safetensors", *args)))

    real_lr_at = tl.lr_at

    def crash_at_step_4(step, steps, lr):
        if step == 4:
            raise KeyboardInterrupt
        return real_lr_at(step, steps, lr)

    out = root / "resumed.safetensors"
    monkeypatch.setattr(tl, "lr_at", crash_at_step_4)
    assert tl.main(cli(ckpt, out, *args)) == 130  # the checkpoint of step 3 survives
    monkeypatch.setattr(tl, "lr_at", real_lr_at)
    resumed = tl.train(tl.parse_args(cli(ckpt, out, *args, "--resume")))
    assert torch.equal(resumed, whole)

    err = capsys.readouterr().err
    assert "resuming at step 3" in err and "step 6: val loss" in err
    model = load_checkpoint(ckpt, "fp32", "cpu")[0]
    assert not torch.equal(whole, init_lookahead(model, 3))  # training did something
    model = load_checkpoint(ckpt, "fp32", "cpu")[0]
    assert torch.equal(load_lookahead(out, model), whole)


def test_per_layer_training_writes_layer_additions(cli_setup):
    root, ckpt, text, _ = cli_setup
    out = root / "per-layer.safetensors"
    trained = tl.train(tl.parse_args(cli(ckpt, out, "--data", str(text), "--per-layer")))
    model = load_checkpoint(ckpt, "fp32", "cpu")[0]
    assert trained.shape == (model.args.n_layers, 3, model.args.dim)
    assert trained[1:].abs().sum() > 0  # the additions (initialised to zero) trained
    assert torch.equal(load_lookahead(out, model), trained)
    assert torch.equal(load_lookahead(out, model, 2), trained[:, :2])


def test_resume_refuses_other_options(cli_setup, capsys):
    root, ckpt, text, _ = cli_setup
    out = root / "other.safetensors"
    assert tl.main(cli(ckpt, out, "--data", str(text), "--steps", "3")) == 0
    assert tl.main(cli(ckpt, out, "--data", str(text), "--steps", "3", "--lr", "0.5", "--resume")) == 2
    assert "was made with --lr 0.02, not 0.5" in capsys.readouterr().err


def error_of(capsys, argv) -> str:
    assert tl.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_bad_data_files(cli_setup, capsys):
    root, ckpt, _, _ = cli_setup
    out = root / "bad.safetensors"
    empty = root / "empty.txt"
    empty.write_text("  \n")
    assert f"data file {empty} is empty" in error_of(capsys, cli(ckpt, out, "--data", str(empty)))
    binary = root / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 10)
    assert f"data file {binary} could not be read as UTF-8 text" in error_of(capsys, cli(ckpt, out, "--data",
                                                                                          str(binary)))
    missing = root / "missing.jsonl"
    assert f"data file {missing} does not exist" in error_of(capsys, cli(ckpt, out, "--data", str(missing)))
    assert "make it with python -m minipass.distill" in error_of(capsys, cli(ckpt, out, "--data",
                                                                             f"distill:{missing}"))
    broken = root / "broken.jsonl"
    broken.write_text('{"text": "fine"}\n{"text": \n')
    assert f"{broken}:2 is not valid JSON" in error_of(capsys, cli(ckpt, out, "--data", str(broken)))
    assert "neither sharegpt, code" in error_of(capsys, cli(ckpt, out, "--data", "wikipedia"))
    short = root / "short.txt"
    short.write_text("too short")
    assert "gives 0 sequences of 32 tokens" in error_of(capsys, cli(ckpt, out, "--data", str(short)))


def test_lookahead_too_long_for_the_sequence(cli_setup, capsys):
    root, ckpt, text, _ = cli_setup
    err = error_of(capsys, cli(ckpt, root / "x.safetensors", "--data", str(text), "--lookahead", "31"))
    assert "--lookahead 31 needs --seq-len of at least 33" in err


def test_checkpoint_without_tokenizer(tmp_path, cli_setup, capsys):
    _, _, text, _ = cli_setup
    ckpt = tiny_checkpoint(tmp_path / "bare", tokenizer=False)
    err = error_of(capsys, cli(ckpt, tmp_path / "x.safetensors", "--data", str(text)))
    assert f"checkpoint {ckpt} has no tokenizer" in err


def test_init_from_a_trained_file_goes_on_from_it(cli_setup, capsys):
    root, ckpt, text, _ = cli_setup
    first = root / "first.safetensors"
    trained = tl.train(tl.parse_args(cli(ckpt, first, "--data", str(text), "--per-layer")))
    final = re.findall(r"step 6: val loss ([0-9.]+)", capsys.readouterr().err)
    assert len(final) == 1
    # Same data and validation sequences: the second run starts where the first ended.
    again = tl.train(tl.parse_args(cli(ckpt, root / "second.safetensors", "--data", str(text), "--per-layer",
                                       "--init", str(first))))
    assert f"step 0: val loss {final[0]}" in capsys.readouterr().err
    assert not torch.equal(again, trained)
    # The first L of a longer file.
    shorter = tl.train(tl.parse_args(cli(ckpt, root / "third.safetensors", "--data", str(text), "--per-layer",
                                         "--init", str(first), "--lookahead", "2", "--steps", "1")))
    assert shorter.shape == (trained.shape[0], 2, trained.shape[2])


def test_init_file_refused(cli_setup, capsys):
    root, ckpt, text, _ = cli_setup
    per_layer = root / "init-per-layer.safetensors"
    assert tl.main(cli(ckpt, per_layer, "--data", str(text), "--per-layer", "--steps", "1")) == 0
    capsys.readouterr()
    err = error_of(capsys, cli(ckpt, root / "x.safetensors", "--data", str(text), "--init", str(per_layer)))
    assert f"--init {per_layer} has per-layer additions; give --per-layer too" in err
    err = error_of(capsys, cli(ckpt, root / "x.safetensors", "--data", str(text), "--per-layer", "--init",
                               str(per_layer), "--lookahead", "5"))
    assert "--lookahead must be between 1 and 3" in err
    missing = root / "missing.safetensors"
    assert f"look-ahead file {missing} does not exist" in error_of(capsys, cli(ckpt, root / "x.safetensors", "--data",
                                                                               str(text), "--init", str(missing)))
