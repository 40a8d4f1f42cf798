"""Time the Triton kernels against their torch references (and attention against SDPA and FlexAttention).

    python -m minipass.kernels.bench_kernels                  # needs a CUDA GPU
    python -m minipass.kernels.bench_kernels --only attention --dtype bf16
    python -m minipass.kernels.bench_kernels --host-overhead  # runs anywhere: the launcher's host time, launches stubbed

Attention: T new tokens (T <= 64) over prefixes of 2k to 32k cached tokens, a PaSS look-ahead mask among the new
tokens, grouped-query heads (Hq=32, Hkv=8, D=128 by default), at B = 1 and B = 64. The Triton kernel reads the
contiguous (B, Hkv, S, D) cache and a paged one (vLLM layout: (num_pages, 16, Hkv, D) and a block table with the
pages in random order); compared with `attention_ref` and with `scaled_dot_product_attention` given the same
explicit (B, T, S) mask (B = 1 only: they materialise (B, Hq, T, S) scores), and with FlexAttention (a block mask
built from the same rule, over the contiguous cache) when torch provides it. B = 64 at a 32k prefix holds ~17 GB of
K/V (both caches). Acceptance: B=64 rows, K=6 drafts, V=32000, probabilities and logits entry points. Tree
acceptance: B=32 rows, 31 nodes, V=32000. Times are medians of CUDA-event-timed repeats.

--host-overhead: microseconds of host CPU time per `attention` call with the Triton launch itself replaced by a
no-op, on CPU tensors: the checks, the configuration, the output (and split-K scratch) allocation and the operator
dispatch, i.e. what the launcher adds on top of Triton's own launch cost (not included). CPU allocations of the
split-K scratch cost more than the CUDA caching allocator's.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from .acceptance import accept, accept_from_logits, accept_from_logits_ref, accept_ref
from .attention import attention, attention_ref, visibility_mask
from .tree_acceptance import accept_tree, accept_tree_ref


def cuda_time(fn, reps: int = 50) -> float:
    """Median milliseconds of fn() over reps, after warm-up."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def lookahead_mask(L: int, device) -> torch.Tensor:
    """The pass1 layout: c_0..c_L causal, then a block of L look-ahead tokens after each c_i."""
    T = (L + 1) ** 2
    m = torch.zeros(T, T, dtype=torch.bool)
    m[: L + 1, : L + 1] = torch.tril(torch.ones(L + 1, L + 1, dtype=torch.bool))
    for i in range(L + 1):
        start = L + 1 + i * L
        for k in range(L):
            m[start + k, : i + 1] = True
            m[start + k, start: start + k + 1] = True
    return m.to(device)


ATTENTION_CASES = [(1, 2048), (3, 2048), (6, 2048), (3, 8192), (6, 8192), (3, 32768), (6, 32768)]  # (L, prefix)


def bench_attention(dtype, device, batches=(1, 64), page_size=16, heads=(32, 8, 128), cases=ATTENTION_CASES,
                    use_flex=True, timer=None) -> None:
    """cases: (look-ahead L, prefix): T = (L + 1)^2 new tokens with the pass1 mask. timer(fn, reps=...) -> ms."""
    Hq, Hkv, D = heads
    cuda_time_ = cuda_time if timer is None else timer
    flex = None
    if use_flex:
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            flex = torch.compile(flex_attention)
        except ImportError:
            pass
    print(f"attention  Hq={Hq} Hkv={Hkv} D={D} {dtype}, paged: {page_size}-token pages (NHD); ms (lower is better)")
    print(f"{'B':>3} {'T':>4} {'prefix':>7} {'triton':>8} {'paged':>8} {'ratio':>6} {'torch ref':>9} {'sdpa':>8} "
          f"{'flex':>8}")
    for B in batches:
        for L, prefix in cases:
            mask = lookahead_mask(L, device)
            T = mask.shape[0]
            S = (prefix + T + page_size - 1) // page_size * page_size
            q = torch.randn(B, T, Hq, D, device=device, dtype=dtype).transpose(1, 2)
            k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
            v = torch.randn_like(k)
            lens = torch.full((B,), prefix, device=device, dtype=torch.int32)
            t_tri = cuda_time_(lambda: attention(q, k, v, lens, mask, check_values=False))
            # The same tokens in a page pool, pages in random order: page j of row b is pool page table[b, j].
            pages_per_row = S // page_size
            table = torch.randperm(B * pages_per_row, device=device).view(B, pages_per_row).int()
            k_pages = torch.empty(B * pages_per_row, page_size, Hkv, D, device=device, dtype=dtype)
            v_pages = torch.empty_like(k_pages)
            k_pages[table.flatten().long()] = k.transpose(1, 2).reshape(-1, page_size, Hkv, D)
            v_pages[table.flatten().long()] = v.transpose(1, 2).reshape(-1, page_size, Hkv, D)
            t_paged = cuda_time_(lambda: attention(q, k_pages, v_pages, lens, mask, check_values=False,
                                                  block_table=table, layout="NHD"))
            del k_pages, v_pages
            t_ref = t_sdpa = float("nan")
            if B == 1:
                t_ref = cuda_time_(lambda: attention_ref(q, k, v, lens, mask), reps=10)
                full = visibility_mask(lens, mask, T, S)[:, None]  # (B, 1, T, S)
                t_sdpa = cuda_time_(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=full, enable_gqa=True))
            t_flex = float("nan")
            if flex is not None:
                def visible(b, h, qi, kv):
                    rel = kv - prefix
                    return (rel < 0) | ((rel < T) & mask[qi, rel.clamp(0, T - 1)])
                block_mask = create_block_mask(visible, B, None, T, S, device=device)
                t_flex = cuda_time_(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True))
            print(f"{B:>3} {T:>4} {prefix:>7} {t_tri:>8.3f} {t_paged:>8.3f} {t_paged / t_tri:>6.2f} {t_ref:>9.3f} "
                  f"{t_sdpa:>8.3f} {t_flex:>8.3f}", flush=True)
            del k, v


def host_overhead(reps: int = 2000) -> None:
    """Host time per `attention` call on CPU tensors with the Triton launches replaced by no-ops."""
    import time

    from . import attention as A

    class _Stub:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    saved = A._attn_fwd_kernel, A._attn_combine_kernel
    A._attn_fwd_kernel = A._attn_combine_kernel = _Stub()
    try:
        B, Hq, Hkv, D, S = 1, 32, 8, 128, 4096
        print(f"attention launcher host time, launches stubbed (B={B} Hq={Hq} Hkv={Hkv} D={D} S={S}, CPU); us/call")
        for name, T, masked, splits, paged in [("decode T=1", 1, False, None, False),
                                               ("tree T=25 mask", 25, True, None, False),
                                               ("tree T=25 mask, split-K 4", 25, True, 4, False),
                                               ("tree T=25 mask, paged", 25, True, None, True)]:
            q = torch.randn(B, T, Hq, D).transpose(1, 2)
            cache = torch.randn(2, B, Hkv, S, D)
            k, v = cache[0], cache[1]  # views of a bigger cache, as in the model
            lens = torch.full((B,), 100, dtype=torch.int32)
            mask = torch.ones(T, T, dtype=torch.bool).tril() if masked else None
            kwargs = {}
            if paged:
                k = torch.randn(B * S // 16, 16, Hkv, D)
                v = torch.randn_like(k)
                kwargs = dict(block_table=torch.arange(B * S // 16, dtype=torch.int32).view(B, -1), layout="NHD")
            call = lambda: attention(q, k, v, lens, mask, None, False, splits, **kwargs)  # noqa: E731
            for _ in range(50):
                call()
            best = float("inf")
            for _ in range(10):  # thread CPU time, best of 10 rounds: robust to other processes on the machine
                start = time.thread_time()
                for _ in range(reps // 10):
                    call()
                best = min(best, (time.thread_time() - start) / (reps // 10))
            print(f"  {name:<28} {best * 1e6:7.1f}")
    finally:
        A._attn_fwd_kernel, A._attn_combine_kernel = saved


def bench_acceptance(dtype, device) -> None:
    B, K, V = 64, 6, 32000
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(B, K + 1, V, device=device, generator=g) * 3
    dlogits = torch.randn(B, K, V, device=device, generator=g) * 3
    p, q = torch.softmax(logits, -1).to(dtype), torch.softmax(dlogits, -1).to(dtype)
    drafts = torch.multinomial(q.float().flatten(0, 1), 1).view(B, K)
    n = torch.full((B,), K, device=device)
    ua, us = torch.rand(B, K, device=device), torch.rand(B, device=device)
    print(f"acceptance B={B} K={K} V={V} {dtype}; ms")
    t_k, t_r = cuda_time(lambda: accept(p, drafts, n, ua, us, q=q)), cuda_time(lambda: accept_ref(p, drafts, n, ua, us, q=q))
    print(f"  probabilities: triton {t_k:.3f}  torch ref {t_r:.3f}  ({t_r / t_k:.1f}x)")
    lg, dl = logits.to(dtype), dlogits.to(dtype)
    kw = dict(temperature=0.8, top_k=10)
    t_k = cuda_time(lambda: accept_from_logits(lg, drafts, n, ua, us, dl, **kw))
    t_r = cuda_time(lambda: accept_from_logits_ref(lg, drafts, n, ua, us, dl, **kw))
    print(f"  logits (T=0.8, top-k 10): triton {t_k:.3f}  torch ref {t_r:.3f}  ({t_r / t_k:.1f}x)")


def bench_tree(dtype, device) -> None:
    B, N, V = 32, 31, 32000
    g = torch.Generator(device=device).manual_seed(0)
    p = torch.softmax(torch.randn(B, N + 1, V, device=device, generator=g) * 3, -1).to(dtype)
    parents = torch.tensor([-1] + [(i - 1) // 2 for i in range(1, N + 1)], device=device).expand(B, -1)
    tokens = torch.randint(0, V, (B, N + 1), device=device, generator=g)
    ua, us = torch.rand(B, N + 1, device=device), torch.rand(B, device=device)
    t_k = cuda_time(lambda: accept_tree(p, tokens, parents, ua, us, check_values=False))
    t_r = cuda_time(lambda: accept_tree_ref(p, tokens, parents, ua, us), reps=10)
    print(f"tree acceptance B={B} N={N} V={V} {dtype}: triton {t_k:.3f} ms  torch ref {t_r:.3f} ms "
          f"({t_r / t_k:.1f}x)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["attention", "acceptance", "tree"], default=None)
    parser.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    parser.add_argument("--host-overhead", action="store_true", help="time the attention launcher's host work")
    args = parser.parse_args(argv)
    if args.host_overhead:
        host_overhead()
        return 0
    if not torch.cuda.is_available():
        print("error: the kernel benchmark needs a CUDA GPU (the CPU interpreter is for correctness only)",
              file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(device))
    for name, fn in (("attention", bench_attention), ("acceptance", bench_acceptance), ("tree", bench_tree)):
        if args.only in (None, name):
            fn(dtype, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
