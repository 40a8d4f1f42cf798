"""Time the Triton kernels against their torch references (and attention against SDPA and FlexAttention).

    python -m kernels.bench_kernels                  # needs a CUDA GPU
    python -m kernels.bench_kernels --only attention --dtype bf16

Attention: T new tokens (T <= 64) over prefixes of 2k to 32k cached tokens, a PaSS look-ahead mask among the new
tokens, grouped-query heads (Hq=32, Hkv=8, D=128 by default). Compared with `attention_ref`, with
`scaled_dot_product_attention` given the same explicit (B, T, S) mask, and with FlexAttention (a block mask built
from the same rule) when torch provides it. Acceptance: B=64 rows, K=6 drafts, V=32000, probabilities and logits
entry points. Tree acceptance: B=32 rows, 31 nodes, V=32000. Times are medians of CUDA-event-timed repeats.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from kernels.acceptance import accept, accept_from_logits, accept_from_logits_ref, accept_ref
from kernels.attention import attention, attention_ref, visibility_mask
from kernels.tree_acceptance import accept_tree, accept_tree_ref


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


def bench_attention(dtype, device) -> None:
    B, Hq, Hkv, D = 1, 32, 8, 128
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        flex = torch.compile(flex_attention)
    except ImportError:
        flex = None
    print(f"attention  B={B} Hq={Hq} Hkv={Hkv} D={D} {dtype}; ms (lower is better)")
    print(f"{'T':>4} {'prefix':>7} {'triton':>8} {'torch ref':>9} {'sdpa':>8} {'flex':>8}")
    for L, prefix in [(1, 2048), (3, 2048), (6, 2048), (3, 8192), (6, 8192), (3, 32768), (6, 32768)]:
        mask = lookahead_mask(L, device)
        T = mask.shape[0]
        S = prefix + T
        q = torch.randn(B, T, Hq, D, device=device, dtype=dtype).transpose(1, 2)
        k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype)
        v = torch.randn_like(k)
        lens = torch.full((B,), prefix, device=device, dtype=torch.int32)
        t_tri = cuda_time(lambda: attention(q, k, v, lens, mask, check_values=False))
        t_ref = cuda_time(lambda: attention_ref(q, k, v, lens, mask), reps=10)
        full = visibility_mask(lens, mask, T, S)[:, None]  # (B, 1, T, S)
        t_sdpa = cuda_time(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=full, enable_gqa=True))
        t_flex = float("nan")
        if flex is not None:
            def visible(b, h, qi, kv):
                rel = kv - prefix
                return (rel < 0) | ((rel < T) & mask[qi, rel.clamp(0, T - 1)])
            block_mask = create_block_mask(visible, B, None, T, S, device=device)
            t_flex = cuda_time(lambda: flex(q, k, v, block_mask=block_mask, enable_gqa=True))
        print(f"{T:>4} {prefix:>7} {t_tri:>8.3f} {t_ref:>9.3f} {t_sdpa:>8.3f} {t_flex:>8.3f}")


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
    args = parser.parse_args(argv)
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
