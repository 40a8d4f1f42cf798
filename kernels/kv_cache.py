"""Write the new tokens' K/V into a paged (or contiguous) KV cache: what engines call ``reshape_and_cache``.

This is the step before ``minipass.kernels.attention.attention``: the T new tokens of each row must be in the cache at slots
``L_b .. L_b+T-1`` when the attention reads it.

Math
----
Token n (of N, e.g. all rows' new tokens flattened) goes to flat slot ``slot_mapping[n] = page * page_size + offset``:

    k_cache[page, offset, h] = key[n, h]      (layout "NHD": (num_pages, page_size, Hkv, D))
    k_cache[page, h, offset] = key[n, h]      (layout "HND": (num_pages, Hkv, page_size, D))

and the same for ``value``/``v_cache``, converted to the cache's dtype (round to nearest even). A negative slot
(vLLM's padding convention, -1) writes nothing. A contiguous cache is the case ``num_pages = B, page_size = S``: the
model's head-major (B, Hkv, S, D) cache is layout "HND" with ``slot = b * S + s``, a token-major (B, S, Hkv, D) cache
is "NHD". ``slot_mapping_for`` builds the slots of a (B, T) batch of new tokens from a block table.

Shapes
------
    key, value     (N, Hkv, D)      fp32/fp16/bf16, stride(-1) == 1 (e.g. (B, T, Hkv, D).flatten(0, 1), a view)
    k_cache        see above        fp32/fp16/bf16, stride(-1) == 1, any other strides
    v_cache        k_cache's shape  stride(-1) == 1
    slot_mapping   (N,)             int32/int64; the non-negative slots distinct and < num_pages * page_size

Grid: one program per token, moving its (Hkv, D) tile of K and of V (BLOCK_H x BLOCK_D, padded to powers of two).
Memory traffic: read N * Hkv * D elements of each of key and value, write as many; no other access.

Limits: Hkv * D <= 16384 per token. ``check_values=False`` skips the host sync that validates the slots; a slot past
the cache is then skipped on the device (never an out-of-bounds write), and duplicate slots leave one of the tokens'
values, unspecified which.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

_LAYOUTS = ("HND", "NHD")


@triton.jit(do_not_specialize=["N", "CAPACITY"])
def _write_kv_kernel(
    KEY, VALUE, K_CACHE, V_CACHE, SLOTS,
    stride_kn, stride_kh, stride_vn, stride_vh,  # key/value (N, Hkv, D)
    stride_cp, stride_co, stride_ch,  # k_cache (page, offset in page, head), whatever the layout
    stride_dp, stride_do, stride_dh,  # v_cache
    N, CAPACITY,
    HKV: tl.constexpr,
    D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(SLOTS + n).to(tl.int64)
    if (slot >= 0) & (slot < CAPACITY):
        page = slot // PAGE_SIZE
        offset = slot % PAGE_SIZE
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        ok = (offs_h < HKV)[:, None] & (offs_d < D)[None, :]
        k = tl.load(KEY + n * stride_kn + offs_h[:, None] * stride_kh + offs_d[None, :], mask=ok)
        v = tl.load(VALUE + n * stride_vn + offs_h[:, None] * stride_vh + offs_d[None, :], mask=ok)
        k_dst = K_CACHE + page * stride_cp + offset * stride_co + offs_h[:, None] * stride_ch + offs_d[None, :]
        v_dst = V_CACHE + page * stride_dp + offset * stride_do + offs_h[:, None] * stride_dh + offs_d[None, :]
        tl.store(k_dst, k.to(K_CACHE.dtype.element_ty), mask=ok)
        tl.store(v_dst, v.to(V_CACHE.dtype.element_ty), mask=ok)


def _cache_dims(cache, layout):
    """(num_pages, page_size, Hkv, D) of a cache and its (page, offset, head) strides."""
    if layout == "NHD":
        P, S, H, D = cache.shape
        return (P, S, H, D), (cache.stride(0), cache.stride(1), cache.stride(2))
    P, H, S, D = cache.shape
    return (P, S, H, D), (cache.stride(0), cache.stride(2), cache.stride(1))


def _check_inputs(key, value, k_cache, v_cache, slot_mapping, layout):
    for name, x in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache),
                    ("slot_mapping", slot_mapping)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}.")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be 'HND' or 'NHD', got {layout!r}.")
    if key.dim() != 3:
        raise ValueError(f"key must have shape (N, Hkv, D), got {tuple(key.shape)}.")
    if value.shape != key.shape:
        raise ValueError(f"value must have the shape of key {tuple(key.shape)}, got {tuple(value.shape)}.")
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must have 4 dimensions, got shape {tuple(k_cache.shape)}.")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}.")
    (num_pages, page_size, H, D), _ = _cache_dims(k_cache, layout)
    N = key.shape[0]
    if (H, D) != tuple(key.shape[1:]):
        form = "(num_pages, page_size, Hkv, D)" if layout == "NHD" else "(num_pages, Hkv, page_size, D)"
        raise ValueError(f"k_cache must have shape {form} with Hkv={key.shape[1]}, D={key.shape[2]} ({layout}), "
                         f"got {tuple(k_cache.shape)}.")
    if H * triton.next_power_of_2(D) > 16384:
        raise ValueError(f"Hkv * D = {H} * {D} is too large; expected at most 16384 per token.")
    if slot_mapping.shape != (N,):
        raise ValueError(f"slot_mapping must have shape ({N},), got {tuple(slot_mapping.shape)}.")
    floats = (torch.float16, torch.bfloat16, torch.float32)
    for name, x in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype not in floats:
            raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}.")
    if slot_mapping.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"slot_mapping must be int32 or int64, got {slot_mapping.dtype}.")
    for name, x in (("value", value), ("k_cache", k_cache), ("v_cache", v_cache), ("slot_mapping", slot_mapping)):
        if x.device != key.device:
            raise ValueError(f"{name} must be on key's device {key.device}, got {x.device}.")
    for name, x in (("key", key), ("value", value), ("k_cache", k_cache), ("v_cache", v_cache)):
        if x.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim (stride 1), got strides {x.stride()}.")
    return N, num_pages, page_size, H, D


def _check_values(slot_mapping, capacity):
    slots = [s for s in slot_mapping.tolist() if s >= 0]  # host sync: the hot path passes check_values=False
    bad = [s for s in slots if s >= capacity]
    if bad:
        raise ValueError(f"slot_mapping holds slot {bad[0]}; slots must be < num_pages * page_size = {capacity} "
                         "(or negative: skipped).")
    if len(set(slots)) != len(slots):
        raise ValueError("slot_mapping holds a slot twice; each new token needs its own slot.")


def _launch(key, value, k_cache, v_cache, slot_mapping, layout):
    N, num_pages, page_size, H, D = _check_inputs(key, value, k_cache, v_cache, slot_mapping, layout)
    if N == 0:
        return
    _, kc = _cache_dims(k_cache, layout)
    _, vc = _cache_dims(v_cache, layout)
    block_d = triton.next_power_of_2(D)
    block_h = triton.next_power_of_2(H)
    with torch.cuda.device(key.device) if key.is_cuda else contextlib.nullcontext():
        _write_kv_kernel[(N,)](
            key, value, k_cache, v_cache, slot_mapping,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1), *kc, *vc,
            N, num_pages * page_size,
            HKV=H, D=D, PAGE_SIZE=page_size, BLOCK_H=block_h, BLOCK_D=block_d,
            num_warps=4 if block_h * block_d >= 2048 else 1,
        )


_LIB = torch.library.Library("minipass", "FRAGMENT")
_LIB.define("reshape_and_cache(Tensor key, Tensor value, Tensor(a!) k_cache, Tensor(b!) v_cache, "
            "Tensor slot_mapping, str layout) -> ()")
_LIB.impl("reshape_and_cache", _launch, "CompositeExplicitAutograd")


@torch.library.register_fake("minipass::reshape_and_cache", lib=_LIB)
def _reshape_and_cache_fake(key, value, k_cache, v_cache, slot_mapping, layout):
    _check_inputs(key, value, k_cache, v_cache, slot_mapping, layout)


def reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, layout="NHD", check_values=True):
    """Write key/value (N, Hkv, D) into k_cache/v_cache at the flat slots ``slot_mapping`` (N,) (negative: skipped).

    k_cache, v_cache: (num_pages, page_size, Hkv, D) for layout "NHD", (num_pages, Hkv, page_size, D) for "HND";
    written in place, in their own dtype. check_values: validate the slots (one host sync; pass False in a decoding
    loop and in compiled graphs). Runs as the operator ``torch.ops.minipass.reshape_and_cache``.
    """
    if check_values:
        N, num_pages, page_size, _, _ = _check_inputs(key, value, k_cache, v_cache, slot_mapping, layout)
        _check_values(slot_mapping, num_pages * page_size)
    torch.ops.minipass.reshape_and_cache(key, value, k_cache, v_cache, slot_mapping, layout)


def reshape_and_cache_ref(key, value, k_cache, v_cache, slot_mapping, layout="NHD"):
    """Plain torch reference of `reshape_and_cache` (in place, same arguments, no checks beyond torch's)."""
    (num_pages, page_size, _, _), _ = _cache_dims(k_cache, layout)
    slots = slot_mapping.long()
    keep = (slots >= 0) & (slots < num_pages * page_size)
    slots, key, value = slots[keep], key[keep], value[keep]
    page, offset = slots // page_size, slots % page_size
    if layout == "NHD":
        k_cache[page, offset] = key.to(k_cache.dtype)
        v_cache[page, offset] = value.to(v_cache.dtype)
    else:
        k_cache[page, :, offset] = key.to(k_cache.dtype)
        v_cache[page, :, offset] = value.to(v_cache.dtype)


def slot_mapping_for(block_table, cache_seqlens, T, page_size):
    """Flat slots (B * T,) int64 of new tokens t = 0..T-1 of row b at positions ``L_b + t``, through ``block_table``
    (B, P_max): ``block_table[b, (L_b + t) // page_size] * page_size + (L_b + t) % page_size``. Plain torch, no host
    sync. Positions past the table's ``P_max * page_size`` get slot -1 (not written). For a contiguous (B, Hkv, S, D)
    cache, pass ``block_table = arange(B)[:, None]`` and ``page_size = S``."""
    pos = cache_seqlens.long()[:, None] + torch.arange(T, device=cache_seqlens.device)[None, :]  # (B, T)
    inside = pos < block_table.shape[1] * page_size
    pages = torch.gather(block_table.long(), 1, torch.where(inside, pos // page_size, 0))
    return torch.where(inside, pages * page_size + pos % page_size, -1).flatten()
