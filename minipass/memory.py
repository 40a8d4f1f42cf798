"""Memory for decoding, estimated before the KV cache is allocated and compared with the memory available.

A run that cannot fit is refused with the figures, instead of dying in the CUDA allocator or in the kernel's OOM
killer half-way through. Beyond the weights, which are already loaded, decoding holds
- the static KV cache: n_layers x 2 (K and V) x B x n_kv_heads x cache_len x head_dim elements of the cache dtype,
- the activations of one forward call of T new tokens per row, freed when it returns: the residual stream and its
  float32 norms, Q/K/V and their float32 RoPE, the attention scores of the torch path (B x n_heads x T x kv_len
  float32, a few copies: scaled, masked, softmaxed), the MLP's intermediates (B x T x intermediate_size, a few), and
  the logits with their float32 probabilities and the top-k/top-p sort.
Activations are estimated for the widest decoding call (call_width new tokens per row, logits for all of them) and
for the prompt's prefill (prefill_len tokens per row, logits for one), whichever needs more; within a call, the
residual stream plus the largest of the attention, MLP and logits phases. It is an estimate for refusing what cannot
fit, not an allocator model: fragmentation and library workspaces come on top.

Available memory: on CUDA the device's free memory plus what PyTorch's caching allocator holds unused; on the CPU
MemAvailable from /proc/meminfo, or less when the process's cgroup (v2 memory.max, v1 memory.limit_in_bytes) leaves
less room.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from minipass.errors import MinipassError

# Bytes per element, per copy alive at the peak of each phase (see the module docstring).
RESIDUAL_F32_COPIES = 6  # x, the block output, the norm's float32 input and products
ROPE_F32_COPIES = 4  # apply_rope's float32 input, rotated half and the two products
SCORE_F32_COPIES = 3  # scores, masked scores, probabilities (and a row's last scores, gathered apart)
MLP_COPIES = 4  # gate, silu(gate), up, their product
LOGIT_F32_COPIES = 8  # logits in float32, scaled, masked, probabilities, the sort's values, int64 indices, sums


def kv_cache_bytes(args, batch_size: int, cache_len: int, dtype: torch.dtype) -> int:
    """Bytes of the static KV cache: n_layers x 2 x B x n_kv_heads x cache_len x head_dim x element size."""
    element = torch.empty((), dtype=dtype).element_size()
    return args.n_layers * 2 * batch_size * args.n_kv_heads * cache_len * args.head_dim * element


def call_bytes(args, batch_size: int, width: int, kv_len: int, logits_rows: int, dtype: torch.dtype,
               torch_attention: bool = True) -> int:
    """Bytes of activations alive at the peak of one forward call of `width` new tokens per row that attends over
    `kv_len` cache slots and returns the logits of `logits_rows` of them (see the module docstring)."""
    e = torch.empty((), dtype=dtype).element_size()
    tokens = batch_size * width
    residual = tokens * args.dim * 4 * RESIDUAL_F32_COPIES
    qkv = tokens * args.head_dim * ((args.n_heads + 2 * args.n_kv_heads) * e
                                    + (args.n_heads + args.n_kv_heads) * 4 * ROPE_F32_COPIES)
    attention = qkv + tokens * kv_len * 4  # a float32 mask over the cache (model.attention_layout)
    if torch_attention:
        attention += tokens * args.n_heads * kv_len * (4 * SCORE_F32_COPIES + e)
    mlp = tokens * args.intermediate_size * e * MLP_COPIES
    logits = batch_size * logits_rows * args.vocab_size * (e + 4 * LOGIT_F32_COPIES)
    return residual + max(attention, mlp, logits)


def _read_int(path: Path) -> Optional[int]:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" (v2) means no limit


def cgroup_headroom(proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")
                    ) -> Optional[int]:
    """Bytes the process's memory cgroup still allows (limit - usage + reclaimable page cache), None if unlimited."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        rel = rel.lstrip("/")
        if controllers == "":  # cgroup v2
            candidates = [(root / rel, "memory.max", "memory.current", "inactive_file"),
                          (root, "memory.max", "memory.current", "inactive_file")]
        elif "memory" in controllers.split(","):  # cgroup v1; inside a container the group is often the root
            candidates = [(root / "memory" / rel, "memory.limit_in_bytes", "memory.usage_in_bytes",
                           "total_inactive_file"),
                          (root / "memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")]
        else:
            continue
        for d, limit_file, usage_file, inactive_key in candidates:
            limit, usage = _read_int(d / limit_file), _read_int(d / usage_file)
            if limit is None or usage is None:
                continue
            if limit >= 1 << 60:  # v1 writes "no limit" as a huge number
                return None
            inactive = 0
            try:
                for stat in (d / "memory.stat").read_text().splitlines():
                    key, _, value = stat.partition(" ")
                    if key == inactive_key:
                        inactive = int(value)
            except (OSError, ValueError):
                pass
            return max(limit - usage + inactive, 0)
    return None


def available_memory(device) -> tuple[Optional[int], str]:
    """(bytes available for new tensors on `device`, where the figure comes from); None when it cannot be known."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return free + cached, f"free memory of {device}"
    if device.type != "cpu":
        return None, f"{device}"
    try:
        meminfo = Path("/proc/meminfo").read_text().splitlines()
    except OSError:
        return None, "host memory"
    available = next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")), None)
    headroom = cgroup_headroom()
    if headroom is not None and (available is None or headroom < available):
        return headroom, "the memory cgroup's limit less its usage"
    return available, "MemAvailable in /proc/meminfo"


def check_decode_memory(model, batch_size: int, cache_len: int, call_width: int = 1,
                        prefill_len: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                        device=None, cache_held: bool = False) -> int:
    """Bytes a decoding run needs beyond the weights: the KV cache plus the activations of its widest forward call.

    call_width: new tokens per row in the widest decoding call (1 for autoregressive decoding). prefill_len: tokens
    per row of the prompt's prefill; None takes the longest prompt that fits, cache_len - call_width. Raises
    MinipassError with the figures when that is more than the memory available on the device. cache_held: the
    cache is allocated already (it is reused), so only the activations must still fit.
    """
    param = model.embed_tokens.weight
    dtype, device = dtype or param.dtype, torch.device(device or param.device)
    a = model.args
    prefill_len = max(cache_len - call_width, 0) if prefill_len is None else prefill_len
    torch_attention = not model.use_triton
    kv = kv_cache_bytes(a, batch_size, cache_len, dtype)
    activations = max(call_bytes(a, batch_size, call_width, cache_len, call_width, dtype, torch_attention),
                      call_bytes(a, batch_size, prefill_len, prefill_len, 1, dtype,
                                 torch_attention))
    available, where = available_memory(device)
    if available is not None and (0 if cache_held else kv) + activations > available:
        raise MinipassError(
            f"not enough memory to decode {batch_size} row(s) of {cache_len} cache slots on {device}: "
            f"{_size(kv + activations)} are needed, {_size(kv)} for the KV cache in {str(dtype).replace('torch.', '')}"
            f" and {_size(activations)} for the activations of the widest forward call, but {_size(available)} are "
            f"available ({where}); lower the batch size (--batch-size, or fewer prompts) or --max-new-tokens")
    return kv + activations


def _size(n: int) -> str:
    unit, scale = next((u, s) for u, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1))
                       if n >= s or s == 1)
    return f"{n:,} bytes ({n / scale:.2f} {unit})"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_MMAP_THRESHOLD_MAX = 32 << 20  # the largest M_MMAP_THRESHOLD glibc accepts on 64-bit


def keep_freed_heap() -> bool:
    """Keep freed host memory in the process for the next call instead of handing it back to the kernel (glibc:
    `mallopt` with M_TRIM_THRESHOLD unlimited and M_MMAP_THRESHOLD at its maximum, 32 MB). Returns whether it was
    applied: False where the C library is not glibc.

    A decoding step on the CPU allocates and frees the same buffers every call. With glibc's defaults, whether the
    freed top of the heap is trimmed depends on where the buffers happened to fall, and a trimmed heap faults every
    page in again on the next call: the same compiled step (tiny model, batch 64, tree) ran in runs of calls either
    ~2.5 ms or ~6 ms outside the forward, and with these settings every round at the faster figure. Buffers above
    32 MB are still mapped and unmapped per call. The settings are process-wide; the command-line tools apply them."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # the symbols already loaded into this process, the C library's among them
    except (OSError, TypeError):  # no such handle (Windows)
        return False
    if not hasattr(libc, "gnu_get_libc_version"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1)) and bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX))
