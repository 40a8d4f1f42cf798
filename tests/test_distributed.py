"""Tensor parallelism: two gloo processes on the CPU, each loading its shard, give the single-process outputs.

One spawn runs every check on both ranks (decoders, logits, shards, look-ahead statistics, errors) and writes its
results; the tests compare them with the same work done in this process on the whole model.
"""

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from minipass.config import TINY_CONFIGS, ModelArgs
from minipass.decoding import SamplingParams, ar_decode
from minipass.distributed import check_divisible
from minipass.errors import MinipassError
from minipass.generate import main as generate_main
from minipass.loading import load_model, load_model_shard
from minipass.lookahead import init_lookahead, load_lookahead, save_lookahead
from minipass.model import Transformer
from minipass.pass_decoding import pass1_decode, pass_decode
from minipass.tree_decoding import TreeConfig, ngram_decode, tree_decode
from tests.util import per_layer_lookahead, save_checkpoint, tiny_checkpoint, tiny_model

ROOT = Path(__file__).resolve().parent.parent
WORLD = 2
SETTINGS = {"greedy": (0.0, 0, 1.0), "t0.8-k10": (0.8, 10, 1.0), "t1-p0.9": (1.0, 0, 0.9)}
MODES = ["ar", "pass", "pass1", "ngram", "tree"]
PROMPTS = [[5, 6, 7, 8, 5, 6, 7], [9, 10], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]]  # ragged, one with repeats for n-grams
SEEDS = [11, 12, 13]
NEW_TOKENS = 16
# Untied head, no biases / tied embeddings with q/k/v, o_proj and MLP biases (o_proj's and down_proj's are added once).
CONFIGS = {"untied": dict(TINY_CONFIGS["tiny"]),
           "tied-bias": dict(TINY_CONFIGS["tiny"], tie_embeddings=True, attention_bias=True, mlp_bias=True)}


def make_model(config: str) -> Transformer:
    torch.manual_seed(1)
    model = Transformer(ModelArgs(**CONFIGS[config]))
    if model.args.tie_embeddings:  # tied logits scale with the embeddings: small ones keep sampling far from greedy
        model.embed_tokens.weight.data.mul_(0.1)
    for mod in model.modules():
        if hasattr(mod, "eps"):
            mod.weight.data.uniform_(0.5, 1.5)
    return model.eval().requires_grad_(False)


def decoders(la):
    tree = TreeConfig(nodes=6, topk=2, blocks=1)
    return {"ar": ar_decode, "pass": lambda *a, **k: pass_decode(*a, lookahead=la, **k),
            "pass1": lambda *a, **k: pass1_decode(*a, lookahead=la, **k),
            "ngram": ngram_decode, "tree": lambda *a, **k: tree_decode(*a, lookahead=la, tree=tree, **k)}


def probe_inputs():
    """A prefill of ragged rows, then 6 new tokens under a random mask (the shape of a speculative call)."""
    g = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 256, (2, 9), generator=g)
    new = torch.randint(0, 256, (2, 6), generator=g)
    mask = (torch.rand(2, 6, 6, generator=g) < 0.5) | torch.eye(6, dtype=torch.bool)
    return prefix, new, mask, torch.tensor([9, 5])


def work(model, la_file: Path, kernels: str = "torch") -> tuple[dict, dict]:
    """What both the single-process reference and every rank compute: (token lists, tensors)."""
    model.set_kernels(kernels)
    la = load_lookahead(la_file, model)  # checks the fingerprint, which a rank takes from the full table
    tokens, tensors = {}, {}
    if kernels == "triton":  # the interpreter is slow: one tree decode (a mask, ragged cache lengths) on that path
        tokens["tree/greedy"] = decoders(la)["tree"](model, PROMPTS[:2], 6).tokens
        return tokens, tensors
    for mode, decode in decoders(la).items():
        for name, setting in SETTINGS.items():
            tokens[f"{mode}/{name}"] = decode(model, PROMPTS, NEW_TOKENS, SamplingParams(*setting), seeds=SEEDS).tokens
    prefix, new, mask, lens = probe_inputs()
    model.setup_caches(2, 24)
    tensors["prefill_logits"] = model(prefix, input_pos=torch.arange(9).expand(2, -1),
                                      cache_seqlens=torch.zeros(2, dtype=torch.long))
    tensors["step_logits"] = model(new, input_pos=lens[:, None] + torch.tensor([0, 1, 1, 2, 2, 3]),
                                   cache_seqlens=lens, mask=mask)
    tensors["embed"] = model.embed(torch.arange(256).view(4, 64))
    tensors["kv_cache"] = torch.tensor(model.kv.shape)
    tensors["init_mean"] = init_lookahead(model, 3)
    tensors["init_random"] = init_lookahead(model, 3, "random", seed=4)
    return tokens, tensors


def worker(rank: int, tmp: Path):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp / 'rendezvous'}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    group = dist.group.WORLD
    results = {}
    for config in CONFIGS:
        model = load_model_shard(tmp / config, group)
        save_file(model.state_dict(), str(tmp / f"{config}.shard{rank}.safetensors"))
        tokens, tensors = work(model, tmp / f"{config}.lookahead.safetensors")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / f"{config}.rank{rank}.safetensors"))
        results[config] = tokens
    results["triton"] = work(load_model_shard(tmp / "untied", group), tmp / "untied.lookahead.safetensors",
                             kernels="triton")[0]
    for bad in ("three-kv-heads", "wrong-shape"):
        try:
            load_model_shard(tmp / bad, group)
        except MinipassError as e:
            results[bad] = str(e)
    (tmp / f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp(tmp_path_factory):
    """(tmp dir, per-rank JSON results, single-process reference results)."""
    tmp = tmp_path_factory.mktemp("tp")
    reference = {}
    for config in CONFIGS:
        model = make_model(config)
        save_checkpoint(model, tmp / config)
        save_lookahead(tmp / f"{config}.lookahead.safetensors", per_layer_lookahead(model, 3), model, config)
        full = load_model(tmp / config)
        reference[config] = work(full, tmp / f"{config}.lookahead.safetensors")
    save_checkpoint(tiny_model("tiny-untied-mha"), tmp / "three-kv-heads")
    wrong = save_checkpoint(make_model("untied"), tmp / "wrong-shape") / "model.safetensors"
    tensors = load_file(str(wrong))
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    save_file(tensors, str(wrong))
    mp.spawn(worker, args=(tmp,), nprocs=WORLD)
    ranks = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(WORLD)]
    return tmp, ranks, reference


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_every_rank_decodes_the_single_process_tokens(tp, config, mode, setting):
    _, ranks, reference = tp
    want = reference[config][0][f"{mode}/{setting}"]
    assert all(len(t) == NEW_TOKENS for t in want)
    if setting != "greedy":  # the draws matter: sampling is far from the greedy choice on this model
        assert want != reference[config][0][f"{mode}/greedy"]
    for r in range(WORLD):
        assert ranks[r][config][f"{mode}/{setting}"] == want, f"rank {r}"


def test_triton_attention_on_local_heads(tp):
    _, ranks, reference = tp
    for r in range(WORLD):
        assert ranks[r]["triton"]["tree/greedy"] == [t[:6] for t in reference["untied"][0]["tree/greedy"][:2]]


@pytest.mark.parametrize("config", list(CONFIGS))
def test_logits_and_embeddings_match_the_whole_model(tp, config):
    tmp, _, reference = tp
    want = reference[config][1]
    for r in range(WORLD):
        got = load_file(str(tmp / f"{config}.rank{r}.safetensors"))
        # Only the order of the sums differs: o_proj, down_proj and the head add up per-rank partial sums.
        torch.testing.assert_close(got["prefill_logits"], want["prefill_logits"], atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(got["step_logits"], want["step_logits"], atol=2e-5, rtol=1e-5)
        assert torch.equal(got["embed"], want["embed"])  # one rank holds each row, the others add exact zeros
        # The lookahead statistics cover the whole table, not this rank's rows.
        torch.testing.assert_close(got["init_mean"], want["init_mean"], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(got["init_random"], want["init_random"], atol=1e-6, rtol=1e-5)
    # Bitwise-identical replicated results on every rank: what lets them decide alike without a broadcast.
    ranks = [load_file(str(tmp / f"{config}.rank{r}.safetensors")) for r in range(WORLD)]
    for key in ("prefill_logits", "step_logits", "embed"):
        assert all(torch.equal(ranks[0][key], other[key]) for other in ranks[1:]), key


def megatron_shard(name: str, full: torch.Tensor, r: int, args: ModelArgs) -> torch.Tensor:
    """Rank r's part of a full tensor, written out per layer kind: KV-head groups, rows/columns, vocabulary."""
    D, n = args.head_dim, WORLD
    q_rows = args.n_heads // n * D  # the query heads that share this rank's KV heads (head h uses KV head h // G)
    kv_rows = args.n_kv_heads // n * D
    ffn, vocab = args.intermediate_size // n, args.vocab_size // n
    if name.endswith("q_proj.weight") or name.endswith("q_proj.bias"):
        return full[r * q_rows:(r + 1) * q_rows]
    if name.endswith(("k_proj.weight", "v_proj.weight", "k_proj.bias", "v_proj.bias")):
        return full[r * kv_rows:(r + 1) * kv_rows]
    if name.endswith("o_proj.weight"):
        return full[:, r * q_rows:(r + 1) * q_rows]
    if name.endswith(("gate_proj.weight", "up_proj.weight", "gate_proj.bias", "up_proj.bias")):
        return full[r * ffn:(r + 1) * ffn]
    if name.endswith("down_proj.weight"):
        return full[:, r * ffn:(r + 1) * ffn]
    if name.endswith(("o_proj.bias", "down_proj.bias")):
        return full if r == 0 else torch.zeros_like(full)
    if name in ("embed_tokens.weight", "lm_head.weight"):
        return full[r * vocab:(r + 1) * vocab]
    return full  # norms


@pytest.mark.parametrize("config", list(CONFIGS))
def test_each_rank_holds_its_megatron_shard_and_a_share_of_the_bytes(tp, config):
    tmp, _, _ = tp
    args = ModelArgs(**CONFIGS[config])
    full = load_model(tmp / config).state_dict()
    replicated = sum(t.numel() for k, t in full.items() if k.endswith("norm.weight") or "o_proj.bias" in k
                     or "down_proj.bias" in k)
    total = sum(t.numel() for t in full.values())
    for r in range(WORLD):
        shard = load_file(str(tmp / f"{config}.shard{r}.safetensors"))
        assert shard.keys() == full.keys()
        for name, t in full.items():
            assert torch.equal(shard[name], megatron_shard(name, t, r, args)), name
        assert sum(t.numel() for t in shard.values()) == (total - replicated) // WORLD + replicated
        kv = load_file(str(tmp / f"{config}.rank{r}.safetensors"))["kv_cache"].tolist()
        assert kv[3] == args.n_kv_heads // WORLD  # (layers, 2, B, H_kv local, S, D): the cache holds local heads


def test_indivisible_kv_heads_are_refused_by_every_rank(tp):
    _, ranks, _ = tp
    for r in range(WORLD):
        assert ranks[r]["three-kv-heads"] == ("cannot split the model over 2 ranks: num_key_value_heads (3) is not "
                                              "divisible by 2")


def test_a_shard_is_checked_against_the_full_shapes(tp):
    tmp, ranks, _ = tp
    with pytest.raises(MinipassError) as single:
        load_model(tmp / "wrong-shape")
    assert "'model.layers.1.self_attn.k_proj.weight' has shape [64, 64], expected [32, 64]" in str(single.value)
    for r in range(WORLD):
        assert ranks[r]["wrong-shape"] == str(single.value)


def test_divisibility_error_names_every_size():
    args = ModelArgs(**dict(TINY_CONFIGS["tiny"], vocab_size=258, intermediate_size=102))
    check_divisible(args, 2)
    with pytest.raises(MinipassError, match=r"over 4 ranks: num_key_value_heads \(2\), intermediate_size \(102\) "
                                            r"and vocab_size \(258\) are not divisible by 4"):
        check_divisible(args, 4)


def torchrun(*argv, tmp: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORLD), *argv]
    proc = subprocess.run(cmd, capture_output=True, cwd=ROOT, env=env, timeout=240)
    # Decoded by hand: text=True would turn a generated "\r\n" into "\n".
    proc.stdout, proc.stderr = proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    return proc


def test_generate_under_torchrun_prints_the_single_process_text_once(tmp_path, capsys):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    argv = ["--ckpt", str(ckpt), "--prompt", "abcabcabcab", "--max-new-tokens", "12", "--mode", "pass1",
            "--temperature", "0.8", "--top-k", "10", "--seed", "3"]
    assert generate_main(argv) == 0
    single = capsys.readouterr()
    proc = torchrun("-m", "minipass.generate", *argv, tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == single.out
    assert proc.stderr.count("[pass1] 12 tokens") == 1  # rank 1 prints nothing


def test_bench_under_torchrun_writes_one_json_with_greedy_identity(tmp_path):
    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "abcabcabcab"}) + "\n" + json.dumps({"prompt": "the cat sat"}) + "\n")
    out = tmp_path / "out.json"
    proc = torchrun("bench.py", "--ckpt", str(ckpt), "--dataset", str(prompts), "--num-prompts", "2",
                    "--max-new-tokens", "8", "--modes", "ar,pass1,tree", "--lookahead", "2", "--temperature", "0",
                    "--no-compile", "--rounds", "2", "--tree-nodes", "8", "--json", str(out), tmp=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("model: ") == 1  # the report is printed by rank 0 only
    runs = json.loads(out.read_text())["runs"]
    assert {r["mode"] for r in runs} == {"ar", "pass1", "tree"}
    assert all(r["identical_to_ar"] is True for r in runs)
    assert not list(tmp_path.glob("*.tmp"))
