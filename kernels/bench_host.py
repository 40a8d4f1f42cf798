"""Host time per call of the acceptance launchers: argument checks, output allocation, op dispatch.

    python -m minipass.kernels.bench_host

The kernel launch itself is replaced by a no-op, so no GPU is needed and the figures are the launchers' own Python
cost, which a decoding step pays once per call (Triton's launch adds its own on a GPU). Shapes: B=64, K=6 drafts,
V=32000 (padded and flattened forms), trees of 32 nodes. Each figure is the best of 7 repeats of 5000 calls, in
CPU time of the process.
"""

import os
import sys
import time
import timeit

os.environ.setdefault("TRITON_INTERPRET", "1")  # CPU tensors pass the launchers' device check

import torch  # noqa: E402

from . import acceptance, tree_acceptance  # noqa: E402


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn) -> float:
    fn()
    # CPU time of this process, so that a shared machine's other load does not count.
    return min(timeit.repeat(fn, timer=time.process_time, number=5000, repeat=7)) / 5000 * 1e6


def main() -> None:
    if os.environ["TRITON_INTERPRET"] != "1":
        sys.exit("minipass.kernels.bench_host stubs the launches and needs TRITON_INTERPRET=1 (CPU tensors).")
    acceptance._accept_kernel = acceptance._accept_logits_kernel = _NoLaunch()
    tree_acceptance._accept_tree_kernel = _NoLaunch()
    B, K, V, N = 64, 6, 32000, 31
    p, q = torch.empty(B, K + 1, V), torch.empty(B, K, V)
    drafts, n = torch.zeros(B, K, dtype=torch.long), torch.full((B,), K)
    u_a, u_s = torch.rand(B, K), torch.rand(B)
    cu = torch.arange(0, B * K + 1, K)
    p_flat, q_flat = torch.empty(B * K + B, V), torch.empty(B * K, V)
    tree_p, tree_tokens = torch.empty(B, N + 1, V), torch.zeros(B, N + 1, dtype=torch.long)
    parents, tree_u = torch.zeros(B, N + 1, dtype=torch.long), torch.rand(B, N + 1)
    cases = [
        ("accept, q", lambda: acceptance.accept(p, drafts, n, u_a, u_s, q)),
        ("accept, q=None", lambda: acceptance.accept(p, drafts, n, u_a, u_s)),
        ("accept_from_logits", lambda: acceptance.accept_from_logits(p, drafts, n, u_a, u_s, q, 0.8, 50, 0.9)),
        ("accept_tree", lambda: tree_acceptance.accept_tree(tree_p, tree_tokens, parents, tree_u, u_s,
                                                            check_values=False)),
    ]
    try:
        flat = acceptance.accept(p_flat, drafts.flatten(), cu, u_a.flatten(), u_s, q_flat, check_values=False)
    except (TypeError, ValueError):
        flat = None  # a version of the launchers without the flattened form
    if flat is not None:
        cases.append(("accept, flattened", lambda: acceptance.accept(p_flat, drafts.flatten(), cu, u_a.flatten(),
                                                                     u_s, q_flat, check_values=False)))
    print(f"{'launcher':24s} host us/call")
    for name, fn in cases:
        print(f"{name:24s} {per_call_us(fn):8.1f}")


if __name__ == "__main__":
    main()
