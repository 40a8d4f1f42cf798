"""Tensor parallelism on torch.distributed: one model split over the ranks of a process group, Megatron-style.

    torchrun --nproc-per-node 3 -m minipass.generate --prompt "def fib(n):" --mode tree
    torchrun --nproc-per-node 3 -m minipass.distributed          # per-rank weight bytes and resident memory

Rank r of N holds, in every layer, KV heads [r*H_kv/N, (r+1)*H_kv/N) with the query heads that share them (rows of
q/k/v_proj), the matching columns of o_proj, rows [r*I/N, (r+1)*I/N) of gate/up_proj and those columns of
down_proj, and rows [r*V/N, (r+1)*V/N) of the embedding and of the head. o_proj and down_proj then give partial
sums of the residual update, added up by one all-reduce after attention and one after the MLP; the embedding
lookup is one more (each token's row lives on one rank, the others contribute zeros). The norms, the residual stream
and the look-ahead tensors are replicated. The head's logits over this rank's slice of the vocabulary are gathered
into full rows only where the decoder asks for logits (`Transformer.head`).

Every rank runs the same decoder on the same replicated state and makes the same decisions without any broadcast:
a collective gives every rank the same bits, everything else replicated is a deterministic function of them, and
the random numbers are a pure function of (seed, position, purpose) (sampling.py).
"""

from __future__ import annotations

import atexit
import os
import sys
from contextlib import contextmanager
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from minipass.errors import MinipassError

# Row-parallel layers: every rank's output is a partial sum, so their bias is added once, by rank 0 (zeros elsewhere).
ROW_PARALLEL_BIASES = ("self_attn.o_proj.bias", "mlp.down_proj.bias")


def init_from_env() -> Optional[dist.ProcessGroup]:
    """Join the process group torchrun describes in the environment, when it has more than one process; returns it,
    or None for a single process (then nothing changes).

    Backend: NCCL for CUDA tensors, each rank on GPU LOCAL_RANK, and gloo for CPU tensors. Every rank computes the
    same tokens, so ranks other than 0 send stdout and stderr to /dev/null; uncaught exceptions still print.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
        atexit.register(dist.destroy_process_group)
    if dist.get_rank() > 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
        sys.excepthook = partial(_report_crash, sys.excepthook)
    return dist.group.WORLD


def finish(code: int) -> int:
    """End a command run under torchrun: `code` unchanged without a process group. After a successful run the ranks
    meet at a barrier, leave the group together and exit at once, without the interpreter's teardown: gloo's worker
    threads could otherwise abort a process at exit ("terminate called without an active exception", SIGABRT)
    after its work was done (in two of six full test runs, each time in one of the torchrun tests). A failed rank
    exits as usual."""
    if code != 0 or default_group() is None:
        return code
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _report_crash(hook, *exc) -> None:
    sys.stderr = sys.__stderr__
    hook(*exc)


def default_group() -> Optional[dist.ProcessGroup]:
    """The default process group when there is one with more than one rank (the model is then split over it)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.group.WORLD
    return None


@contextmanager
def rank_zero_first(group: Optional[dist.ProcessGroup]):
    """Rank 0 runs the block before the other ranks of `group` do (a download or conversion that they then reuse)."""
    if group is not None and rank(group) > 0:
        dist.barrier(group=group)
    yield
    if group is not None and rank(group) == 0:
        dist.barrier(group=group)


def rank(group: Optional[dist.ProcessGroup] = None) -> int:
    """This process's rank in `group` (the default group), 0 without torch.distributed."""
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def world_size(group: Optional[dist.ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def check_divisible(args, world: int) -> None:
    """Every split dimension must divide evenly over the ranks (nothing is padded)."""
    sizes = [("num_key_value_heads", args.n_kv_heads), ("intermediate_size", args.intermediate_size),
             ("vocab_size", args.vocab_size)]
    bad = [f"{name} ({n})" for name, n in sizes if n % world]
    if bad:
        listed = bad[0] if len(bad) == 1 else ", ".join(bad[:-1]) + " and " + bad[-1]
        raise MinipassError(f"cannot split the model over {world} ranks: {listed} "
                            f"{'is' if len(bad) == 1 else 'are'} not divisible by {world}")


def all_reduce(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """The sum of x over the ranks of `group`, in place; x itself without a group."""
    if group is not None:
        dist.all_reduce(x, group=group)
    return x


def all_gather_last(x: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """(..., n) per rank -> (..., world * n), rank r's block at [r*n, (r+1)*n); x itself without a group."""
    if group is None:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def shard_block(full_shape, local_shape, r: int) -> tuple:
    """The slices of a full tensor that rank r holds: block r along the dimension where its shard is smaller."""
    return tuple(slice(r * n, (r + 1) * n) if n != f else slice(None) for f, n in zip(full_shape, local_shape))


def embedding_moments(weight: Tensor, group: Optional[dist.ProcessGroup]) -> tuple[Tensor, float]:
    """Mean row (dim,) and standard deviation over all entries of an embedding table, fp32, whose rows may be split
    over the ranks of `group` (every rank gets the statistics of the whole table)."""
    w = weight.detach().float()
    if group is None:
        return w.mean(0), w.std().item()
    w = w.double()
    sums = torch.stack([w.sum(0), (w * w).sum(0)])  # (2, dim): row sums of x and x^2 over this rank's rows
    all_reduce(sums, group)
    rows = w.shape[0] * dist.get_world_size(group)
    n = rows * w.shape[1]
    mean = sums[0] / rows
    var = (sums[1].sum() - sums[0].sum() ** 2 / n) / (n - 1)
    return mean.float(), var.sqrt().item()


def resident_memory() -> dict:
    """This process's resident memory from /proc/self/status (Linux), in bytes: now and peak."""
    fields = {"VmRSS": "rss", "VmHWM": "peak_rss"}
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in fields:
                out[fields[key]] = int(value.split()[0]) * 1024
    return out


def main(argv=None) -> int:
    """Per-rank weight bytes and resident memory after loading a checkpoint and running one forward (run it under
    torchrun, or alone for the single-process figures)."""
    import argparse

    from minipass.cli import add_model_args
    from minipass.loading import load_checkpoint

    parser = argparse.ArgumentParser(prog="torchrun --nproc-per-node N -m minipass.distributed",
                                     description=main.__doc__)
    add_model_args(parser)
    args = parser.parse_args(argv)
    group = init_from_env()
    try:
        before = resident_memory()
        model, _, ckpt = load_checkpoint(args.ckpt, args.dtype, args.device, kernels="torch")
    except MinipassError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # One forward touches every weight: a single process's fp32 weights on the CPU are pages of the mapped file,
    # resident only once read.
    device = model.embed_tokens.weight.device
    model.setup_caches(1, 8)
    model(torch.zeros(1, 8, dtype=torch.long, device=device), input_pos=torch.arange(8, device=device)[None],
          cache_seqlens=torch.zeros(1, dtype=torch.long, device=device))
    after = resident_memory()
    row = dict(rank=rank(group), weights=sum(p.numel() * p.element_size() for p in model.parameters()),
               rss_before_load=before["rss"],
               rss_after=after["rss"], peak_rss=after["peak_rss"])
    rows = [row]
    if group is not None:
        rows = [None] * world_size(group)
        dist.all_gather_object(rows, row, group=group)
    print(f"model: {ckpt}  ranks: {len(rows)}  dtype: {model.embed_tokens.weight.dtype}  (MB = 1e6 bytes)")
    head = f"{'rank':>4} {'weights MB':>10} {'RSS before load':>15} {'RSS after load + forward':>24} {'peak RSS':>8}"
    print(head)
    print("-" * len(head))
    mb = 1e6
    for r in rows:
        print(f"{r['rank']:>4} {r['weights'] / mb:>10.2f} {r['rss_before_load'] / mb:>15.1f} "
              f"{r['rss_after'] / mb:>24.1f} {r['peak_rss'] / mb:>8.1f}")
    return finish(0)


if __name__ == "__main__":
    sys.exit(main())
