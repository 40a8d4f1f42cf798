"""Train look-ahead embeddings for a frozen model (PASS.md, "Training the look-ahead embeddings").

    python -m minipass.train_lookahead --out weights/smollm2-135m-instruct.lookahead.safetensors
    python -m minipass.train_lookahead --ckpt path/to/llama --out la.safetensors --lookahead 8 --data sharegpt

Only the L embeddings (L, dim) train; the base model is frozen (no gradient, no optimizer state). Each training
sequence x_0..x_{n-1} goes through the model once, with a block of L look-ahead tokens after every S-th anchor a,
all under one mask among the new tokens:

    new tokens   [x_0 .. x_{n-1}, B_a1[1..L], B_a2[1..L], ...]
    x_i          position i,      sees x_0..x_i                  (no block: its logits are the plain forward's)
    B_a[k]       position a + k,  sees x_0..x_a and B_a[1..k]    (exactly the drafting call after x_a)

B_a[k] is trained towards the token at position a + 1 + k: `ce` against the data's token there, or `kl` against the
model's own distribution of it, p(. | x_0..x_{a+k}), which is the output of real token a + k in the same forward.
Averaged over the data, that target is the marginal p(x_{a+1+k} | x_<=a) a draft should learn. A step costs one
forward and backward of n (1 + L/S) tokens, however many anchors it trains.

Data (`--data`, repeatable; every source gives the same number of training sequences, a small one is repeated):
`sharegpt` (train-split conversations in the chat format), `code` (the running Python's standard library sources),
`distill:FILE` (the model's own generations, see distill.py), or a `.jsonl` ({"text"} or {"messages"} per line) or
`.txt` file. HumanEval and the ShareGPT eval split are never read here.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from minipass.errors import MinipassError
from minipass.cli import add_model_args, run_cli
from minipass.data import read_data_file, render_chat
from minipass.lookahead import lookahead_inputs
from minipass.model import KVCache, Transformer

DEFAULT_DATA = ("distill:data/distill-sharegpt.jsonl", "distill:data/distill-code.jsonl")  # the shipped recipe
LOSS_CHUNK_ROWS = 1024  # look-ahead outputs per loss chunk: bounds the (rows, vocab) logits held at once


# --- data -----------------------------------------------------------------------------------------------------------

def source_texts(spec: str, tok, seed: int) -> Iterator[str]:
    """The documents of one --data source in a seeded random order, rendered lazily (chat templates are slow)."""
    rng = random.Random(seed)
    if spec == "sharegpt":
        from minipass.data import stdlib_files, sharegpt_conversations

        convs = sharegpt_conversations("train")
        rng.shuffle(convs)
        return (t for t in (render_chat(tok, c) for c in convs) if t)
    if spec == "code":
        files = stdlib_files()
        rng.shuffle(files)
        return (p.read_text(encoding="utf-8", errors="replace") for p in files)
    if spec.startswith("distill:"):
        path = Path(spec[len("distill:"):])
        if not path.is_file():
            raise MinipassError(f"distillation file {path} does not exist; make it with python -m minipass.distill")
    else:
        path = Path(spec)
        if path.suffix not in (".jsonl", ".txt"):
            raise MinipassError(f"--data {spec!r} is neither sharegpt, code, distill:FILE nor a .jsonl or .txt file")
    texts = read_data_file(path, tok)
    rng.shuffle(texts)
    return iter(texts)


def pack(texts: Iterator[str], tok, seq_len: int, n_seqs: int) -> list[list[int]]:
    """Up to n_seqs sequences of seq_len tokens from the documents, concatenated in order (no padding)."""
    stream: list[int] = []
    for text in texts:
        stream += tok.encode(text)
        if not text.endswith(tok.eos_token):  # a boundary the model knows, between unrelated documents
            stream += tok.eos_ids[:1]
        if len(stream) >= seq_len * n_seqs:
            break
    return [stream[i: i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)][:n_seqs]


@dataclass
class Dataset:
    train: Tensor  # (N, seq_len) token ids
    val: Tensor  # (N_val, seq_len)
    summary: str


def load_data(specs: list, tok, seq_len: int, n_train: int, n_val: int, seed: int) -> Dataset:
    """Validation sequences come first from each source's shuffled documents and training sequences after them, so
    the two never share a document (but for the one that straddles the cut). Every source gives n_train / len(specs)
    training sequences; one that has fewer is repeated."""
    train, val, notes = [], [], []
    for i, spec in enumerate(specs):
        want_val = n_val // len(specs) + (i < n_val % len(specs))
        want_train = -(-n_train // len(specs))
        seqs = pack(source_texts(spec, tok, seed + i), tok, seq_len, want_val + want_train)
        if len(seqs) < want_val + 1:
            raise MinipassError(f"--data {spec} gives {len(seqs)} sequences of {seq_len} tokens, but at least "
                                f"{want_val + 1} are needed ({want_val} for validation, one for training)")
        val += seqs[:want_val]
        own = seqs[want_val:]
        train += (own * -(-want_train // len(own)))[:want_train]
        notes.append(f"{spec}: {len(own)} sequences" + (f" (x{want_train / len(own):.1f})" if len(own) < want_train
                                                         else ""))
    random.Random(seed).shuffle(train)
    return Dataset(torch.tensor(train), torch.tensor(val).view(-1, seq_len), "; ".join(notes))


# --- one training forward: look-ahead blocks under the mask -----------------------------------------------------

@dataclass
class Layout:
    """New tokens of one training forward: n real tokens, then a block of L look-ahead tokens per anchor."""
    n: int
    L: int
    anchors: Tensor  # (nb,) anchor a of each block: it sees real tokens 0..a
    positions: Tensor  # (T,) RoPE positions: i for real token i, a + k for token k of a's block
    mask: Tensor  # (T, T) bool, True where a new token may attend

    @property
    def T(self) -> int:
        return self.positions.shape[0]


def make_layout(n: int, L: int, stride: int, offset: int = 0, device=None) -> Layout:
    """Blocks after anchors offset, offset + stride, ... up to n - 2 - L, the last anchor whose L targets (up to
    position a + 1 + L) are all in the sequence."""
    anchors = torch.arange(offset, n - 1 - L, stride)  # (nb,)
    nb = anchors.shape[0]
    T = n + nb * L
    row_anchor = anchors.repeat_interleave(L)  # (nb*L,) for each look-ahead token
    row_block = torch.arange(nb).repeat_interleave(L)
    k = torch.arange(1, L + 1).repeat(nb)  # (nb*L,) index within its block, 1..L
    col = torch.arange(T)
    col_block = torch.where(col >= n, (col - n) // L, -1)  # (T,) block of each new token, -1 for real tokens
    sees_real = col[None, :] <= row_anchor[:, None]  # (nb*L, T): real tokens 0..a
    sees_own = (col_block[None, :] == row_block[:, None]) & (col[None, :] <= n + torch.arange(nb * L)[:, None])
    mask = torch.zeros(T, T, dtype=torch.bool)
    mask[:n, :n] = torch.tril(torch.ones(n, n, dtype=torch.bool))
    mask[n:] = sees_real | sees_own
    positions = torch.cat([torch.arange(n), row_anchor + k])
    return Layout(n, L, anchors.to(device), positions.to(device), mask.to(device))


def fresh_caches(model: Transformer, B: int, T: int) -> None:
    """Give every layer its own new K/V buffers (B, H_kv, T, D) for one training forward.

    setup_caches() puts all layers' caches in one store, and autograd cannot record the in-place K/V writes of
    tokens that carry gradients into one base shared by all layers; new buffers each step also drop the last step's
    graph.
    """
    a, w = model.args, model.embed_tokens.weight
    model.kv_store = None  # no longer the layers' cache
    for layer in model.layers:
        layer.self_attn.kv_cache = KVCache.zeros(B, a.n_kv_heads, T, a.head_dim, dtype=w.dtype, device=w.device)
    n = B * a.n_kv_heads * T  # each layer's store: K at rows [0, n), V at [n, 2n)
    model.kv_row_offsets = torch.tensor([0, n], device=w.device).repeat(a.n_layers, 1)[:, :, None]
    model.cache_batch_size, model.cache_len = B, T


def lookahead_forward(model: Transformer, tokens: Tensor, emb: Tensor, layout: Layout) -> Tensor:
    """Final hidden states (B, T, dim) of the sequences `tokens` (B, n) with the blocks of `layout` inserted; emb is
    (L, dim) or, with per-layer additions, (n_layers, L, dim)."""
    B, n = tokens.shape
    nb = layout.anchors.shape[0]
    blocks, adds = lookahead_inputs(emb.to(model.embed_tokens.weight.dtype), nb, n, B)  # (B, nb*L, dim), adds
    x = torch.cat([model.embed(tokens), blocks], dim=1)  # (B, T, dim)
    fresh_caches(model, B, layout.T)
    zeros = torch.zeros(B, dtype=torch.long, device=tokens.device)
    return model(embeds=x, input_pos=layout.positions.expand(B, -1), cache_seqlens=zeros, mask=layout.mask,
                 kv_len=layout.T, return_hidden=True, layer_adds=adds)


def lookahead_loss(model: Transformer, tokens: Tensor, emb: Tensor, layout: Layout, loss: str = "ce",
                   backward: bool = True, decay: float = 1.0) -> tuple[float, Tensor, int]:
    """Mean loss over every block output, and per position k the hits of its argmax on the model's greedy token.

    The greedy token at B_a[k]'s target is the argmax of real token a + k's output: what greedy verification would
    accept there given the data's tokens in between, so the hit rate is an acceptance proxy. With backward, the
    gradient reaches `emb.grad`. The (rows, vocab) logits are made in chunks from detached hidden states, whose
    gradient is then sent through the model in one backward call. On CUDA the forward runs under bf16 autocast.
    Returns (loss, hits (L,), blocks per position).
    """
    B, n = tokens.shape
    L, nb = layout.L, layout.anchors.shape[0]
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=tokens.is_cuda)
    with autocast:
        hidden = lookahead_forward(model, tokens, emb, layout)  # (B, T, dim)
    la = hidden[:, n:].view(B, nb, L, -1)  # (B, nb, L, dim)
    la_out = la.detach().requires_grad_(backward)
    real = hidden[:, :n].detach()  # (B, n, dim): its outputs are targets, never trained
    # B_a[k] (k = 1..L) predicts the token at a + 1 + k, which real token a + k predicts too.
    src = layout.anchors[:, None] + torch.arange(1, L + 1, device=tokens.device)  # (nb, L)
    total, hits = 0.0, torch.zeros(L, dtype=torch.long, device=tokens.device)
    weights = decay ** torch.arange(L, device=tokens.device, dtype=torch.float32)
    weights = weights * L / weights.sum()  # (L,) mean 1
    per_chunk = max(1, LOSS_CHUNK_ROWS // (B * L))
    for c in range(0, nb, per_chunk):
        rows = src[c: c + per_chunk]  # (cb, L)
        lo, hi = int(rows[0, 0]), int(rows[-1, -1]) + 1  # the real tokens this chunk's targets come from
        with autocast:
            with torch.no_grad():
                p = model.head(real[:, lo:hi]).float()[:, rows - lo]  # (B, cb, L, V): one head pass per token
            logq = F.log_softmax(model.head(la_out[:, c: c + per_chunk]).float(), dim=-1)  # (B, cb, L, V)
        if loss == "ce":
            per = -logq.gather(-1, tokens[:, rows + 1, None])[..., 0]  # (B, cb, L)
        else:
            per = F.kl_div(logq, F.log_softmax(p, dim=-1), log_target=True, reduction="none").sum(-1)
        chunk_loss = (per * weights).sum()
        if backward:
            (chunk_loss / (B * nb * L)).backward()
        total += chunk_loss.item()
        hits += (logq.detach().argmax(-1) == p.argmax(-1)).sum((0, 1))
    if backward:
        la.backward(la_out.grad)
    return total / (B * nb * L), hits, B * nb


# --- training loop ----------------------------------------------------------------------------------------------

def lr_at(step: int, steps: int, lr: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to a tenth of the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".state.safetensors")


# Options that fix what a run computes (data order and learning-rate schedule included): --resume continues the
# same run, so it refuses a state made with different ones.
RUN_OPTIONS = ("lookahead", "data", "seq_len", "stride", "batch_size", "lr", "loss", "position_decay", "init",
               "per_layer", "val_sequences", "seed", "steps")


def save_state(path: Path, emb: Tensor, opt: torch.optim.Adam, step: int, elapsed: float, args, base: str) -> None:
    """Resume state: embeddings and Adam moments (safetensors) with a JSON of the run in the metadata; atomic."""
    st = opt.state[emb]
    tensors = {"lookahead": emb.detach(), "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
    meta = {"step": step, "adam_step": float(st["step"]), "elapsed_s": elapsed, "base_fingerprint": base,
            "options": {k: getattr(args, k) for k in RUN_OPTIONS}}
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.float().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"state": json.dumps(meta)})
    tmp.replace(path)


def load_state(path: Path, emb: Tensor, opt: torch.optim.Adam, args, base: str) -> tuple[int, float]:
    """Restore the embeddings and Adam moments saved by save_state; returns (step, elapsed seconds)."""
    if not path.is_file():
        raise MinipassError(f"--resume: there is no resume state {path}; run without --resume to start training")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["state"])
            tensors = {k: f.get_tensor(k) for k in ("lookahead", "exp_avg", "exp_avg_sq")}
    except (SafetensorError, KeyError, ValueError) as e:
        raise MinipassError(f"--resume: {path} is not a valid resume state: {e}") from None
    if meta["base_fingerprint"] != base:
        raise MinipassError(f"--resume: {path} was made for another base checkpoint")
    for k in RUN_OPTIONS:
        made = meta["options"].get(k, False)  # states from before an option existed ran without it
        if made != getattr(args, k):
            raise MinipassError(f"--resume: {path} was made with --{k.replace('_', '-')} {made}, "
                                f"not {getattr(args, k)}")
    with torch.no_grad():
        emb.copy_(tensors["lookahead"])
    opt.state[emb] = {"step": torch.tensor(meta["adam_step"]), "exp_avg": tensors["exp_avg"].to(emb.device),
                      "exp_avg_sq": tensors["exp_avg_sq"].to(emb.device)}
    return meta["step"], meta["elapsed_s"]


def evaluate(model: Transformer, val: Tensor, emb: Tensor, layout: Layout, loss: str, batch_size: int,
             decay: float = 1.0):
    """Validation (loss, acceptance proxy per position (L,)) with the fixed layout."""
    total, hits, blocks = 0.0, 0, 0
    with torch.no_grad():
        for i in range(0, val.shape[0], batch_size):
            batch = val[i: i + batch_size].to(emb.device)
            value, h, nb = lookahead_loss(model, batch, emb, layout, loss, backward=False, decay=decay)
            total, hits, blocks = total + value * nb, hits + h, blocks + nb
    return total / blocks, hits.float() / blocks


def fmt_acc(acc) -> str:
    return " ".join(f"{a:.2f}" for a in acc.tolist())


def train(args) -> Tensor:
    """Run the training the options describe; returns the trained look-ahead, (L, dim) or (n_layers, L, dim), fp32."""
    from minipass.loading import load_checkpoint
    from minipass.lookahead import fingerprint, init_lookahead, load_lookahead, save_lookahead

    t_start = time.perf_counter()
    L, n, S = args.lookahead, args.seq_len, args.stride
    if L < 1 or S < 1 or args.steps < 1 or args.batch_size < 1:
        raise MinipassError("--lookahead, --stride, --steps and --batch-size must all be at least 1")
    if n < L + 2:
        raise MinipassError(f"--lookahead {L} needs --seq-len of at least {L + 2} (a block after anchor a predicts "
                            f"up to position a + 1 + L), got {n}")
    if args.ckpt and Path(args.ckpt).is_dir() and not any(
            (Path(args.ckpt) / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise MinipassError(f"checkpoint {args.ckpt} has no tokenizer (tokenizer.json or tokenizer.model), which "
                            "training needs to read its data")
    torch.manual_seed(args.seed)
    model, tok, ckpt_dir = load_checkpoint(args.ckpt, args.dtype, args.device, kernels="torch",
                                           check_weights=args.check_weights)
    if n > model.args.max_seq_len:
        raise MinipassError(f"--seq-len {n} exceeds the model's context of {model.args.max_seq_len} tokens")
    device, base = model.embed_tokens.weight.device, fingerprint(model)

    if args.init in ("mean", "random"):  # (L, dim) or (n_layers, L, dim)
        emb = init_lookahead(model, L, args.init, args.seed, per_layer=args.per_layer)
    else:  # a trained file, to go on training from
        emb = load_lookahead(args.init, model, L, dtype=torch.float32)
        if (emb.dim() == 3) != args.per_layer:
            has = "has" if emb.dim() == 3 else "has no"
            raise MinipassError(f"--init {args.init} {has} per-layer additions; give --per-layer "
                                f"{'too' if emb.dim() == 3 else 'only with such a file'}")
    data = load_data(args.data, tok, n, args.steps * args.batch_size, args.val_sequences, args.seed)
    print(f"data: {data.summary}; {data.val.shape[0]} validation sequences of {n} tokens", file=sys.stderr)
    emb = torch.nn.Parameter(emb.float().to(device))
    opt = torch.optim.Adam([emb], lr=args.lr)
    start, elapsed = 0, 0.0
    out = Path(args.out)
    if args.resume:
        start, elapsed = load_state(state_path(out), emb, opt, args, base)
        print(f"resuming at step {start}", file=sys.stderr)
    out.parent.mkdir(parents=True, exist_ok=True)
    val_layout = make_layout(n, L, S, 0, device)

    def checkpoint(step: int) -> None:
        save_lookahead(out, emb, model, base_model=ckpt_dir.name)
        save_state(state_path(out), emb, opt, step, elapsed + time.perf_counter() - t_run, args, base)

    if start == 0:
        val_loss, val_acc = evaluate(model, data.val, emb.detach(), val_layout, args.loss, args.batch_size,
                                      args.position_decay)
        print(f"step 0: val loss {val_loss:.4f}  acc {fmt_acc(val_acc)}", file=sys.stderr)
    t_run, ema = time.perf_counter(), None
    for step in range(start, args.steps):
        # Anchors shift by a per-step offset, so that over the run every token serves as an anchor.
        layout = make_layout(n, L, S, random.Random(args.seed * 1_000_003 + step).randrange(S), device)
        rows = torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % data.train.shape[0]
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr)
        opt.zero_grad(set_to_none=True)
        value, hits, blocks = lookahead_loss(model, data.train[rows].to(device), emb, layout, args.loss,
                                             decay=args.position_decay)
        opt.step()
        ema = value if ema is None else 0.95 * ema + 0.05 * value
        per_step = (time.perf_counter() - t_run) / (step + 1 - start)
        print(f"\rstep {step + 1}/{args.steps}  loss {ema:.3f}  acc {fmt_acc(hits.float() / blocks)}  "
              f"{per_step:.2f} s/step  eta {per_step * (args.steps - step - 1) / 60:.0f} min ",
              end="", file=sys.stderr, flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val_loss, val_acc = evaluate(model, data.val, emb.detach(), val_layout, args.loss, args.batch_size,
                                      args.position_decay)
            print(f"\nstep {step + 1}: val loss {val_loss:.4f}  acc {fmt_acc(val_acc)}", file=sys.stderr)
            checkpoint(step + 1)
    total = elapsed + time.perf_counter() - t_run
    print(f"trained {args.steps} steps in {total / 60:.1f} min ({time.perf_counter() - t_start:.0f} s wall for this "
          f"run); wrote {out}", file=sys.stderr)
    return emb.detach()


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minipass.train_lookahead", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(parser)
    parser.add_argument("--out", required=True, help="embeddings file to write (.safetensors)")
    parser.add_argument("--lookahead", type=int, default=8,
                        help="L, look-ahead tokens to train (default 8; the first k serve any L = k)")
    parser.add_argument("--data", action="append", default=None,
                        help="sharegpt, code, distill:FILE, or a .jsonl/.txt file; repeat to mix "
                             f"(default: {' '.join(DEFAULT_DATA)})")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence (default 128)")
    parser.add_argument("--stride", type=int, default=2, help="a look-ahead block after every S-th token (default 2)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per step (default 1)")
    parser.add_argument("--lr", type=float, default=1e-2, help="peak Adam learning rate (default 1e-2)")
    parser.add_argument("--loss", default="ce", choices=["ce", "kl"],
                        help="ce: against the data's token (default); kl: against the model's own distribution")
    parser.add_argument("--position-decay", type=float, default=1.0,
                        help="weight position k's loss by DECAY^(k-1): < 1 favours the early drafts (default 1)")
    parser.add_argument("--init", default="mean",
                        help="initial embeddings: mean (the mean token embedding, default), random, or a look-ahead "
                             ".safetensors file to go on training (its first L; its per-layer additions need "
                             "--per-layer)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also learn, per look-ahead token, an addition to the residual stream before every later "
                             "layer (n_layers x L x dim parameters instead of L x dim)")
    parser.add_argument("--val-sequences", type=int, default=16, help="held-out sequences for validation")
    parser.add_argument("--eval-every", type=int, default=100, help="validate and checkpoint every N steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true", help="continue from OUT.state.safetensors")
    args = parser.parse_args(argv)
    args.data = args.data or list(DEFAULT_DATA)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: train(args),
                   interrupted=f"--resume continues from the last checkpoint in {state_path(Path(args.out))}")


if __name__ == "__main__":
    sys.exit(main())
