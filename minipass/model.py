"""A LLaMA-style transformer with a static KV cache and a boolean mask among the new tokens.

One forward call takes T new tokens per row (ids or input embeddings), their RoPE positions, and each row's cache
length L_b. Their K/V are written at cache slots L_b .. L_b+T-1; new token i then attends to every cached slot below
L_b and to new token j where mask[i, j] (causal when no mask is given). The caller owns the cache lengths: it
advances them over the tokens it keeps, and whatever lies beyond is simply overwritten by the next call. That single
call covers prefill (ragged prompts, right-padded), autoregressive steps, PaSS drafting with look-ahead embeddings,
verification, and token trees.

Parameter names follow Hugging Face checkpoints (without the leading "model."), so loading is one key map.
Built with a torch.distributed process group, the model is this rank's tensor-parallel shard (distributed.py): the
modules hold their slice of the heads, of the MLP and of the vocabulary, and add up partial results with one
all-reduce after attention and one after the MLP.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from minipass.config import ModelArgs
from minipass.distributed import all_gather_last, all_reduce, check_divisible, rank, world_size
from minipass.kernels import cpu_bf16
from minipass.memory import check_decode_memory

try:  # the Triton kernel is optional: CPU-only machines, and platforms without Triton, use the torch path
    from minipass.kernels.attention import attention as triton_attention
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton_attention = None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in fp32 and scale in the model's dtype, like the reference LLaMA code.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(args: ModelArgs) -> Tensor:
    """Inverse frequencies (head_dim // 2,) in fp32, with the 'linear' or 'llama3' scaling of config.json."""
    d = args.head_dim
    # fp32 throughout, as in the Hugging Face implementation, so logits match it closely.
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind == "llama3":
        # Llama 3.1: long wavelengths are slowed down by `factor`, short ones kept, the band between interpolated.
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - low) / (high - low)
        interpolated = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / low, inv_freq / factor,
                               torch.where(wavelen < old_len / high, inv_freq, interpolated))
    return inv_freq


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate-half RoPE (the Hugging Face layout). x: (B, T, H, D); cos, sin: (B, T, 1, D) in fp32."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class KVCache:
    """One layer's K and V cache, (B, H_kv, S_max, D) each, held as rows of a 2-D `store` of D-wide rows: K at rows
    [k_row, k_row + n), V at [v_row, v_row + n), n = B * H_kv * S_max, row = (b * H_kv + h) * S_max + slot. Slot =
    token index in the row's sequence.

    The model keeps every layer's K and V in one store, so that one index copy moves tokens in all layers
    (move_cache_slots). Writes go into the store itself and the (B, H_kv, S_max, D) views are taken afresh at each
    read: torch.compile turns an in-place write into a *view* of a graph input into a copy of the whole buffer and
    a copy back (two full cache copies per layer per call), and a view kept across calls aliases its base."""

    def __init__(self, store: Tensor, shape: tuple, k_row: int, v_row: int):
        self.store, self.shape, self.k_row, self.v_row = store, tuple(shape), k_row, v_row
        self.n = shape[0] * shape[1] * shape[2]

    @classmethod
    def zeros(cls, B: int, n_kv_heads: int, S: int, D: int, dtype=None, device=None) -> "KVCache":
        """A cache with a store of its own."""
        n = B * n_kv_heads * S
        return cls(torch.zeros(2 * n, D, dtype=dtype, device=device), (B, n_kv_heads, S, D), 0, n)

    @property
    def k(self) -> Tensor:
        return self.store[self.k_row: self.k_row + self.n].view(self.shape)

    @property
    def v(self) -> Tensor:
        return self.store[self.v_row: self.v_row + self.n].view(self.shape)

    def rows(self, index: Tensor) -> Tensor:
        """(2, n): the store rows of K and of V for cache rows `index` (n,) (see cache_index)."""
        return index + torch.tensor([[self.k_row], [self.v_row]], device=index.device)

    def write(self, k: Tensor, v: Tensor, rows: Tensor) -> None:
        # k, v: (B, T, H_kv, D); rows: (2, B * H_kv * T) store rows of K and V, ordered (b, h, t) (see rows()).
        D = k.shape[-1]
        self.store.index_copy_(0, rows[0], k.transpose(1, 2).reshape(-1, D).to(self.store.dtype))
        self.store.index_copy_(0, rows[1], v.transpose(1, 2).reshape(-1, D).to(self.store.dtype))


def cache_index(cache_seqlens: Tensor, T: int, n_kv_heads: int, S: int) -> Tensor:
    """Rows of a (B * H_kv * S, D) cache view that new token t of row b, head h goes to: slot cache_seqlens[b] + t.

    One index_copy_ per tensor writes every row's new tokens, whatever their lengths: no advanced-indexing scatter."""
    B = cache_seqlens.shape[0]
    dev = cache_seqlens.device
    base = (torch.arange(B, device=dev)[:, None] * n_kv_heads + torch.arange(n_kv_heads, device=dev)) * S  # (B, H)
    slots = cache_seqlens[:, None] + torch.arange(T, device=dev)  # (B, T)
    return (base[:, :, None] + slots[:, None, :]).reshape(-1)  # (B * H_kv * T,), ordered (b, h, t)


RECENT = 16  # the position-aligned split of a row's sums over the cache: see Layout


class Layout(NamedTuple):
    """How the torch path attends over the cache: built once per forward by `attention_layout`, read by every layer.

    Calls of at most 2 * RECENT new tokens (every decoding call) attend so that a token's attention has the bits of
    the one-token call an autoregressive decode makes at its position, whatever the width of its call and wherever
    its ancestors sit among the new tokens (a tree node's have their siblings in between). A reduction's grouping
    follows the slot index (the softmax's vectorised sum; the product with V adds neighbouring slots in pairs), so
    the same terms at other slots can round to other bits. So each row at position p splits its sums over the slots
    at cut = RECENT * (p // RECENT) - RECENT (at least 0), a function of p alone, below which every slot is committed
    in any call at p whose row is less than RECENT tokens deep (p - L_b < RECENT): the slots below the cut are summed
    where they are, in one product for all rows; the 2 * RECENT slots from the cut on, which hold the row's last keys
    up to itself, are gathered per row in the order an autoregressive decode holds them (the committed slots, then
    the new tokens the row attends to, in call order) and summed apart (tests/test_model.py). A row deeper than that
    (a chain of RECENT or more new tokens) cuts at L_b instead: still exact attention, without the guarantee.
    recent: (early, keys, late): early (B, 1, 1, T, S), the additive float32 mask of the slots below the cut (0,
      else -inf); keys (B, 1, T * 2 * RECENT, 1), the cache slots of the gathered keys, row by row; late (B, 1, 1, T,
      2 * RECENT), the additive mask of the gathered keys (0 up to the row itself).
    bias: for wider calls (a prefill), which sum over the slots in one product, the (B, T, S) additive float32 mask,
      0 where a new token attends, -inf elsewhere.
    The masks are additive and float: adding 0 leaves a score exactly as it is, and a compiled CPU kernel adds floats
    at full vector width where it selects on booleans element by element.
    rows: for the CPU kernel that attends in one operator (kernels/cpu_bf16.attend), the same split: (cut, keys), cut
      (B, T) int64 each row's cut, keys (B, T, 2 * RECENT) int64 the slots of its gathered keys, -1 past the row itself.
      The kernel reads the slots a row attends to and no others, so a step's attention costs what the row holds, not
      the cache's capacity."""
    recent: Optional[tuple]
    bias: Optional[Tensor]
    rows: Optional[tuple] = None


def attention_layout(cache_seqlens: Tensor, mask: Optional[Tensor], T: int, kv_len: int) -> Layout:
    """The Layout of a call of T new tokens per row, cache lengths `cache_seqlens` (B,), mask (T, T) or (B, T, T) or
    None (causal) among the new tokens, attending over `kv_len` cache slots.

    Its tensors end in a scatter or a sort, which a compiled step computes once per forward and every layer reads: a
    pointwise expression would be inlined into every layer's kernels and recomputed there (measured: the default
    model's attention kernels 2x slower in its 25-wide tree step)."""
    B, device = cache_seqlens.shape[0], cache_seqlens.device
    pos = torch.arange(T, device=device)
    base = cache_seqlens[:, None]  # (B, 1)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    mask = mask.expand(B, T, T)
    ninf = torch.tensor(float("-inf"), device=device)
    prefix = torch.where(torch.arange(kv_len, device=device) < base, 0.0, ninf)[:, None, :].expand(B, T, kv_len)
    if T > 2 * RECENT:  # the committed prefix, and the new tokens of each row's mask row
        return Layout(None, prefix.scatter(2, (base + pos)[:, None, :].expand(B, T, T), torch.where(mask, 0.0, ninf)))
    p = base + mask.sum(-1) - 1  # (B, T): each row's position
    cut = torch.minimum((p // RECENT * RECENT - RECENT).clamp(min=0), base)
    win = cut[:, :, None] + torch.arange(2 * RECENT, device=device)  # (B, T, 2R): slots cut .. cut + 2R - 1
    # A row's keys from the cut on, in decoding order, are the slots it attends to there in increasing order: the
    # committed ones, then the new tokens of its mask row (a tree node's ancestors come before it in the call).
    big = kv_len + T  # past every slot: sorts last
    slots = torch.cat([torch.where(win < base[:, :, None], win, big),
                       torch.where(mask, (base + pos)[:, None, :], big)], dim=2)  # (B, T, 2R + T)
    keys = torch.sort(slots, dim=-1).values[:, :, : 2 * RECENT]
    late = torch.where(keys < big, 0.0, ninf)  # (B, T, 2R): up to the row itself
    early = prefix.scatter(2, win.clamp(max=kv_len - 1), ninf.expand(B, T, 2 * RECENT))  # (B, T, S): below the cut
    return Layout((early[:, None, None], keys.clamp(max=kv_len - 1).view(B, 1, -1, 1), late[:, None, None]), None,
                  (cut, torch.where(keys < big, keys, -1)))


def attention_torch(q: Tensor, k: Tensor, v: Tensor, layout: Layout) -> Tensor:
    """Softmax attention over a cache laid out as `layout` says (see Layout), grouped-query aware, for any device.

    q: (B, Hq, T, D); k, v: (B, H_kv, S, D). The G = Hq / H_kv query heads that share a KV head are stacked into one
    (G*T, D) matrix, so each KV head is read once and no K/V copy is made. Decoding shapes (a few new tokens) are
    where this matters; every query row sees at least itself, so no row is empty.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    # Decoding calls on a CPU with AVX512-BF16: the whole attention in one operator of minipass's (kernels/cpu_bf16.py)
    # that sums each row over the same split of its slots in a fixed order, in place of the ~10 operations below,
    # whose per-call set-up outweighs their arithmetic at decoding sizes.
    if layout.rows is not None and cpu_bf16.attention_fits(q, k):
        cut, keys = layout.rows
        return cpu_bf16.attend(q.transpose(1, 2), k, v, cut, keys, 1.0 / math.sqrt(D)).transpose(1, 2)
    qg = q.reshape(B, Hkv, G * T, D)  # head h = kv_head * G + g
    scores = (qg @ k.transpose(-1, -2)).float().view(B, Hkv, G, T, S) * (1.0 / math.sqrt(D))
    if layout.recent is None:  # one softmax and one product over the slots, where the keys are
        probs = torch.softmax(scores + layout.bias[:, None, None], dim=-1)
        return (probs.to(v.dtype).view(B, Hkv, G * T, S) @ v).view(B, Hq, T, D)
    early_bias, keys, late_bias = layout.recent
    R = late_bias.shape[-1]
    # Below the cut, the slots where they are; from it, each row's last keys gathered in decoding order.
    early = scores + early_bias  # (B, H_kv, G, T, S)
    late = scores.gather(-1, keys.view(B, 1, 1, T, R).expand(B, Hkv, G, T, R)) + late_bias  # (B, H_kv, G, T, 2R)
    top = torch.maximum(early.amax(-1, keepdim=True), late.amax(-1, keepdim=True))
    early, late = torch.exp(early - top), torch.exp(late - top)
    total = early.sum(-1, keepdim=True) + late.sum(-1, keepdim=True)
    y = (early / total).to(v.dtype).view(B, Hkv, G * T, S) @ v  # (B, H_kv, G*T, D)
    # Per row, its own keys: a product over its 2R gathered rows of V, in fp32 (on a CPU, MKL's small fp32 products
    # cost a fifth of oneDNN's bf16 ones, whose per-call set-up dominates at these sizes).
    v_late = v.gather(2, keys.expand(B, Hkv, T * R, D)).view(B, Hkv, T, R, D).float()
    y_late = (late / total).transpose(2, 3) @ v_late  # (B, H_kv, T, G, D)
    return (y.view(B, Hkv, G, T, D).float() + y_late.transpose(2, 3)).to(v.dtype).view(B, Hq, T, D)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, group=None):
        super().__init__()
        # Tensor parallel over `group` (distributed.py): this rank's KV heads and the query heads that share them.
        n = world_size(group)
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads // n, args.n_kv_heads // n, args.head_dim
        self.group = group
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.dim, self.n_heads * args.head_dim, bias=bias)
        self.k_proj = nn.Linear(args.dim, self.n_kv_heads * args.head_dim, bias=bias)
        self.v_proj = nn.Linear(args.dim, self.n_kv_heads * args.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * args.head_dim, args.dim, bias=bias)
        self.kv_cache: Optional[KVCache] = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, write_rows: Tensor, cache_seqlens: Tensor,
                mask: Optional[Tensor], layout: Optional[Layout], kv_len: int) -> Tensor:
        B, T, _ = x.shape
        q, k, v = products(x, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        self.kv_cache.write(k, v, write_rows)

        q = q.transpose(1, 2)  # (B, Hq, T, D)
        if layout is None:  # Triton path: the kernel reads the cache and the new-token mask directly
            y = triton_attention(q, self.kv_cache.k, self.kv_cache.v, cache_seqlens, mask, check_values=False)
        else:
            y = attention_torch(q, self.kv_cache.k[:, :, :kv_len], self.kv_cache.v[:, :, :kv_len], layout)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return all_reduce(product(self.o_proj, y), self.group)  # the heads of every rank


WIDE_INPUT = 1024  # products that read more inputs than this get a lone row as one of two: see `product`


def product(linear: nn.Linear, x: Tensor) -> Tensor:
    """linear(x), on a CPU with AVX512-BF16 through minipass's own bf16 kernel for calls of up to 64 rows
    (kernels/cpu_bf16.py), whose sums give a row the same bits whatever the other rows of the call, and at the
    memory's read rate where oneDNN, torch's bf16 product there, streams the weights 1.5x slower.

    Elsewhere torch's product, where an eager call of one row through a product of more than WIDE_INPUT inputs runs
    it as the first of two equal rows: a CPU's one-row bf16 product (a matrix-vector kernel) can round a row
    otherwise than the same row among more rows, and a decode's one-token calls must give the bits of its wider
    calls (README, *Logits that do not depend on the call*): oneDNN on the AMD EPYC (AVX512-BF16, no AMX) does so
    from 1280 inputs on, where every number of rows from 2 to 64 gives a row the same bits. Not in a compiled step:
    there the second row made the default model's one-token forward 2.03x slower on that CPU."""
    if cpu_bf16.fits(x, linear.weight):
        return cpu_bf16.linear(x, linear.weight, linear.bias)
    if x.shape[:-1].numel() == 1 and linear.in_features > WIDE_INPUT and not torch.compiler.is_compiling():
        return linear(x.expand(*x.shape[:-2], 2, x.shape[-1]))[..., :1, :]
    return linear(x)


def products(x: Tensor, *linears: nn.Linear) -> list:
    """[product(linear, x) for each of linears], which share their input (q, k and v; gate and up): with minipass's
    CPU kernel, one call on their weights stacked (the same bits as one call each, in fewer and larger calls)."""
    if cpu_bf16.fits(x, linears[0].weight) and all(m.weight.dtype == torch.bfloat16 for m in linears):
        return cpu_bf16.linears(x, [m.weight for m in linears], [m.bias for m in linears])
    return [product(m, x) for m in linears]


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs, group=None):
        super().__init__()
        hidden = args.intermediate_size // world_size(group)  # tensor parallel: this rank's slice
        self.group = group
        self.gate_proj = nn.Linear(args.dim, hidden, bias=args.mlp_bias)
        self.up_proj = nn.Linear(args.dim, hidden, bias=args.mlp_bias)
        self.down_proj = nn.Linear(hidden, args.dim, bias=args.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        if cpu_bf16.mlp_fits(x, self.gate_proj, self.up_proj, self.down_proj):  # the three products in one call
            y = cpu_bf16.mlp(x, self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight)
            return all_reduce(y, self.group)
        gate, up = products(x, self.gate_proj, self.up_proj)
        return all_reduce(product(self.down_proj, F.silu(gate) * up), self.group)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, group=None):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args, group)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = FeedForward(args, group)

    def forward(self, x: Tensor, *attn_args) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), *attn_args)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, group=None):
        """group: the torch.distributed process group to split the model over (tensor parallel, see
        distributed.py; loading.load_model_shard fills such a model), or None for the whole model."""
        super().__init__()
        self.args = args
        if group is not None:
            check_divisible(args, world_size(group))
        # Tensor parallel: the embedding and the head hold vocabulary rows vocab_start .. vocab_start + V/N - 1.
        self.group, local_vocab = group, args.vocab_size // world_size(group)
        self.vocab_start = rank(group) * local_vocab if group is not None else 0
        self.embed_tokens = nn.Embedding(local_vocab, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args, group) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = None if args.tie_embeddings else nn.Linear(args.dim, local_vocab, bias=False)
        self.kernels = "torch"  # "torch" or "triton"; see set_kernels()
        self.cache_batch_size = 0
        self.cache_len = 0
        self.kv_store: Optional[Tensor] = None  # every layer's K and V (setup_caches)

    def rope_tables(self, device) -> tuple[Tensor, Tensor]:
        """cos/sin tables (max_seq_len, head_dim), fp32. Kept out of the state dict: they are derived from config."""
        if getattr(self, "_rope", None) is None or self._rope[0].device != torch.device(device):
            inv_freq = rope_frequencies(self.args).to(device)
            angles = torch.outer(torch.arange(self.args.max_seq_len, device=device, dtype=torch.float32), inv_freq)
            angles = torch.cat((angles, angles), dim=-1)
            self._rope = (angles.cos(), angles.sin())
        return self._rope

    def setup_caches(self, batch_size: int, max_seq_len: int, dtype=None, device=None, call_width: int = 1,
                     prefill_len: Optional[int] = None) -> None:
        """Allocate a static KV cache of `max_seq_len` slots per row: one tensor for all layers, so that moving
        accepted tree tokens to consecutive slots is a single index copy (see move_cache_slots).

        First checks that the cache and the activations of the widest forward call (call_width new tokens per row;
        prefill_len prompt tokens, default the most that fit) fit in memory: see memory.check_decode_memory."""
        param = self.embed_tokens.weight
        dtype, device = dtype or param.dtype, device or param.device
        a = self.args
        n_kv_heads = self.layers[0].self_attn.n_kv_heads  # this rank's, under tensor parallelism
        shape = (batch_size, n_kv_heads, max_seq_len, a.head_dim)
        n = batch_size * n_kv_heads * max_seq_len
        old = self.kv_store
        if old is not None and (old.shape[0], old.dtype, old.device) == (a.n_layers * 2 * n, dtype,
                                                                         torch.device(device)):
            # The same cache again: cleared in place. A compiled step with frozen weights (decoding.compile_fn)
            # holds the store it was compiled with as a constant, checked by identity: a new store would compile
            # every step once more.
            check_decode_memory(self, batch_size, max_seq_len, call_width, prefill_len, dtype, device, cache_held=True)
            old.zero_()
        else:
            # Drop the previous cache first: its memory is reusable for the new one.
            self.kv_store = None
            for layer in self.layers:
                layer.self_attn.kv_cache = None
            check_decode_memory(self, batch_size, max_seq_len, call_width, prefill_len, dtype, device)
            self.kv_store = torch.zeros(a.n_layers * 2 * n, a.head_dim, dtype=dtype, device=device)
            # Store row of cache row 0 of each layer's K and V, to turn one call's cache rows into every layer's
            # (a function of the store's size: kept with the store).
            self.kv_row_offsets = torch.arange(2 * a.n_layers, device=device).view(a.n_layers, 2, 1) * n
        self.kv_shape = (a.n_layers, 2) + shape
        for i, layer in enumerate(self.layers):
            layer.self_attn.kv_cache = KVCache(self.kv_store, shape, 2 * i * n, (2 * i + 1) * n)
        self.cache_batch_size, self.cache_len = batch_size, max_seq_len

    @property
    def kv(self) -> Optional[Tensor]:
        """The cache as (n_layers, 2, B, H_kv, S_max, D), for looking at: a view made at each access (see KVCache)."""
        return None if self.kv_store is None else self.kv_store.view(self.kv_shape)

    def move_cache_slots(self, src: Tensor, dst: Tensor) -> None:
        """For every layer, copy the K/V of cache slots src[b, i] to dst[b, i] (both (B, n)). The gather happens
        before the scatter, so overlapping ranges are fine."""
        B, n = src.shape
        H, S = self.kv_shape[3], self.kv_shape[4]
        # Store rows (layer, K or V, b, h, slot) of every layer's K and V for the slots of each row.
        base = self.kv_row_offsets[:, :, :, None, None] + (torch.arange(B, device=src.device)[:, None] * H
                                                           + torch.arange(H, device=src.device))[:, :, None] * S
        rows = lambda slots: (base + slots[:, None, :]).reshape(-1)  # noqa: E731
        self.kv_store.index_copy_(0, rows(dst), self.kv_store.index_select(0, rows(src)))

    def set_kernels(self, impl: str) -> None:
        """Attention and acceptance through the 'triton' kernels (CUDA tensors, or CPU tensors under
        TRITON_INTERPRET=1 for testing) or plain 'torch' (any device)."""
        if impl not in ("torch", "triton"):
            raise ValueError(f"kernels must be 'torch' or 'triton', got {impl!r}")
        if impl == "triton" and triton_attention is None:
            raise RuntimeError("the triton kernels need the triton package, which is not installed")
        if impl == "triton" and not (self.embed_tokens.weight.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
            raise RuntimeError("the triton kernels run on CUDA tensors (or on the CPU under TRITON_INTERPRET=1)")
        self.kernels = impl

    @property
    def use_triton(self) -> bool:
        return self.kernels == "triton"

    def embed(self, tokens: Tensor) -> Tensor:
        if self.group is None:
            return self.embed_tokens(tokens)
        # Vocabulary-parallel: a token's row lives on one rank; the others add zeros, so the sum is that row exactly.
        local = tokens - self.vocab_start
        mine = (local >= 0) & (local < self.embed_tokens.num_embeddings)
        x = self.embed_tokens(torch.where(mine, local, 0)).masked_fill(~mine[..., None], 0.0)
        return all_reduce(x, self.group)

    def forward(self, tokens: Optional[Tensor] = None, *, input_pos: Tensor, cache_seqlens: Tensor,
                mask: Optional[Tensor] = None, embeds: Optional[Tensor] = None, kv_len: Optional[int] = None,
                logits_index: Optional[Tensor] = None, return_hidden: bool = False,
                layer_adds: Optional[Tensor] = None) -> Tensor:
        """Run T new tokens per row through the model and return their logits.

        tokens: (B, T) ids, or embeds: (B, T, dim) input embeddings (look-ahead tokens enter this way).
        input_pos: (B, T) RoPE positions. cache_seqlens: (B,) committed cache length L_b of each row; new token i
        is written at slot L_b + i. mask: (T, T) or (B, T, T) bool among the new tokens (diagonal true), None =
        causal. kv_len: cache slots the torch path attends over (>= max(L_b) + T). The default, the whole cache,
        is what decoding steps use: every call then reduces over the same slots whatever its width or the rows'
        lengths, so a token's logits do not depend on the call it was computed in, and the shapes are static.
        logits_index: (B, K) indices of the new tokens whose logits are wanted (default all T); only those rows go
        through the final norm and the head.
        Returns logits (B, K or T, vocab), or with return_hidden the final normalised hidden states (B, K or T, dim),
        which `head` turns into logits.
        layer_adds: (n_layers - 1, B or 1, T, dim), added to the residual stream before layers 1..n_layers-1 (per-layer
        look-ahead parameters, see lookahead.py; zero at real tokens).
        """
        x = self.embed(tokens) if embeds is None else embeds
        B, T, _ = x.shape  # (B, T, dim)
        cos, sin = self.rope_tables(x.device)
        cos, sin = cos[input_pos][:, :, None, :], sin[input_pos][:, :, None, :]  # (B, T, 1, D)
        # Every layer's K/V store rows of the new tokens, in one op: (n_layers, 2, B * H_kv * T).
        write_rows = cache_index(cache_seqlens, T, self.layers[0].self_attn.n_kv_heads, self.cache_len) \
            + self.kv_row_offsets
        kv_len = self.cache_len if kv_len is None else kv_len
        layout = None
        if not self.use_triton:
            layout = attention_layout(cache_seqlens, mask, T, kv_len)  # built once, shared by every layer
        for i, layer in enumerate(self.layers):
            if layer_adds is not None and i > 0:
                x = x + layer_adds[i - 1]
            x = layer(x, cos, sin, write_rows[i], cache_seqlens, mask, layout, kv_len)
        if logits_index is not None:
            x = x.gather(1, logits_index[:, :, None].expand(-1, -1, x.shape[-1]))
        x = self.norm(x)
        return x if return_hidden else self.head(x)

    def head(self, h: Tensor) -> Tensor:
        """Logits (..., vocab) of final hidden states (..., dim).

        The product is one 2-D matrix multiply on contiguous rows: given a 3-D or strided input, F.linear takes a
        batched-matmul path that copies the (vocab, dim) weight transposed on every call."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        rows = h.reshape(-1, h.shape[-1])
        logits = cpu_bf16.linear(rows, weight) if cpu_bf16.fits(rows, weight) else F.linear(rows, weight)
        logits = logits.view(*h.shape[:-1], weight.shape[0])
        return all_gather_last(logits, self.group)  # tensor parallel: every rank's vocabulary slice
