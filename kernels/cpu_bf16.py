"""bf16 kernels for x86 CPUs with AVX512-BF16, for the few rows of a decoding step: a linear layer's y = x W^T
(`linear`), a SwiGLU MLP's three products in one call (`mlp`), and the softmax attention of the new tokens over a KV
cache (`attend`); and the top-k and the argmax of a few rows of logits (`topk`, `argmax`), which need AVX512 only.

Why: decoding reads every weight once per step, so its products are matrix-vector (one row) or thin (a tree's 4 to
64 rows). oneDNN, which runs torch's bf16 products on a CPU without AMX tiles, streams such products at well under
the memory's read rate, and rounds a row's sums otherwise at one row than among several (README, "Logits that do not
depend on the call"). This kernel (cpu_bf16.cpp, C++ with AVX512-BF16 intrinsics, built here on first use with
the machine's C++ compiler) reads the weights packed tile by tile, and sums each output in one fixed order:

    y[m, n] = bf16( sum over p = 0, 1, ..., K/2 - 1, in order, of  x[m, 2p] W[n, 2p] + x[m, 2p+1] W[n, 2p+1] )

in fp32 (one vdpbf16ps lane per output). A row's outputs therefore have the same bits whatever the number of rows
in the call and however the work is split. Packed layout (see pack): (ceil(N / 32), K / 2, 32, 2).

    from kernels.cpu_bf16 import available, linear
    y = linear(x, weight)          # x (..., K) bf16 CPU, weight (N, K) bf16: packed once and cached (eager)

Attention (`attend`) is one operator per layer: each new token's scores over its slots (below the cut: one fp32 lane
per slot over the pairs of d in order, on key rows turned 16 at a time once for all the query rows of a KV head;
its last keys: 16 lanes over the pairs of d, then a fixed tree over the lanes), their softmax (an fp32 exp of the
kernel's own, sums in a fixed order) and the mix with V (the slots in order, one fused multiply-add each), in place
of some ten small operations whose per-call set-up outweighs their arithmetic at decoding sizes. The slots a token attends to come in two parts, both in an order that
is a function of its position (model.Layout): the committed slots below a cut, and its last keys in decoding order.

`linear_reference` and `attend_reference` are the same computations in torch, for any machine (the first bit for
bit, the second in float64). Depends on torch and a C++ compiler only.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

TILE = 32  # outputs per packed tile
MAX_ROWS = 64  # wider calls (a prefill) stay on torch's products, which are the faster there
SOURCE = Path(__file__).with_name("cpu_bf16.cpp")
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-w",
         "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512bf16", "-mfma"]

_state: dict = {}  # "ok": bool, "why": str (see available)


def pack(weight: Tensor) -> Tensor:
    """(N, K) -> (ceil(N / 32), K / 2, 32, 2): tile t holds outputs 32t .. 32t + 31 (zero rows past N), and for each
    input pair its 32 weights side by side. K must be even."""
    N, K = weight.shape
    padded = F.pad(weight, (0, 0, 0, -N % TILE))
    return padded.view(-1, TILE, K // 2, 2).permute(0, 2, 1, 3).contiguous()


def unpack(packed: Tensor, n: int) -> Tensor:
    """The (n, K) weight of a packed one."""
    tiles, pairs = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(tiles * TILE, 2 * pairs)[:n]


def linear_reference(x: Tensor, packed: Tensor, n: int) -> Tensor:
    """The kernel's sum in torch: per output, the input pairs added in order into fp32 (each pair's two products,
    exact in fp32, added to the running sum high element first, as vdpbf16ps specifies), rounded to bf16 once.
    Slow (a loop over K / 2); for tests."""
    w = unpack(packed, n).float()
    xf = x.float()
    acc = torch.zeros(x.shape[0], n)
    for p in range(w.shape[1] // 2):
        acc = acc + xf[:, 2 * p + 1, None] * w[None, :, 2 * p + 1]
        acc = acc + xf[:, 2 * p, None] * w[None, :, 2 * p]
    return acc.to(torch.bfloat16)


def cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            return next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return set()


def cache_dir() -> Path:
    root = os.environ.get("MINIPASS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "minipass")
    return Path(root)


def build() -> Path:
    """Compile cpu_bf16.cpp against this torch into the cache folder (once per source, torch and flags) and return
    the shared library. Written to a temporary name and renamed, so a half-built file is never loaded."""
    from torch.utils import cpp_extension

    compiler = os.environ.get("CXX", "c++")
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join([torch.__version__, compiler, abi, *FLAGS]).encode())
    out = cache_dir() / f"cpu_bf16_{key.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = [arg for p in cpp_extension.library_paths() for arg in (f"-L{p}", f"-Wl,-rpath,{p}")]
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, *FLAGS, abi, *includes, str(SOURCE), "-o", tmp, *libs, "-ltorch", "-ltorch_cpu", "-lc10"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{compiler} failed on {SOURCE}: {done.stderr.strip()[-2000:]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@torch.compiler.assume_constant_result  # a compiled graph calls it while tracing, not from the graph
def available() -> bool:
    """Whether the kernel runs here: an x86 CPU with AVX512-BF16, and the library built and loaded (the first call
    builds it: ~10 s). MINIPASS_CPU_KERNELS=0 turns it off. `why_not()` says why it does not run."""
    if "ok" not in _state:
        _state["ok"], _state["why"] = False, ""
        if os.environ.get("MINIPASS_CPU_KERNELS", "1") == "0":
            _state["why"] = "turned off by MINIPASS_CPU_KERNELS=0"
        elif sys.platform != "linux" or "avx512_bf16" not in cpu_flags():
            _state["why"] = "this CPU has no AVX512-BF16"
        else:
            try:
                torch.ops.load_library(str(build()))
                torch.library.register_fake("minipass_cpu::linear_bf16")(
                    lambda x, w, n: x.new_empty(x.shape[0], n))
                torch.library.register_fake("minipass_cpu::mlp_bf16")(
                    lambda x, gu, down, hidden, n: x.new_empty(x.shape[0], n))
                torch.library.register_fake("minipass_cpu::attend_bf16")(
                    lambda q, k, v, cut, keys, scale: torch.empty_like(q, memory_format=torch.contiguous_format))
                torch.library.register_fake("minipass_cpu::topk_rows")(
                    lambda x, k: (x.new_empty(x.shape[0], k), x.new_empty(x.shape[0], k, dtype=torch.long)))
                torch.library.register_fake("minipass_cpu::argmax_rows")(
                    lambda x: (x.new_empty(x.shape[0]), x.new_empty(x.shape[0], dtype=torch.long)))
                _state["ok"] = True
            except (OSError, RuntimeError) as e:
                _state["why"] = f"the kernel could not be built or loaded: {e}"
    return _state["ok"]


def why_not() -> str:
    available()
    return _state["why"]


def ops():
    """torch.ops.minipass_cpu, the kernels' operators, loaded (raises where they do not run: see available)."""
    if not available():
        raise RuntimeError(f"minipass's CPU kernels do not run here: {why_not()}")
    return torch.ops.minipass_cpu


@torch.compiler.assume_constant_result
def preferred() -> bool:
    """Whether decoding should take these kernels (fits, attention_fits): where they run, except on a CPU with AMX
    tiles, whose products (inductor's C++ GEMM template in a compiled step, decoding.compile_options) multiply a
    tree's many rows faster than AVX512-BF16 dot products can. MINIPASS_CPU_KERNELS=1 takes them there too."""
    forced = os.environ.get("MINIPASS_CPU_KERNELS") == "1"
    return available() and (forced or "amx_bf16" not in cpu_flags())


def no_gradient(*tensors: Tensor) -> bool:
    """Whether no gradient is wanted through these inputs. The operators have no backward: where autograd records
    (training the look-ahead through the frozen model), the computation stays on torch's differentiable operations."""
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def fits(x: Tensor, weight: Tensor) -> bool:
    """Whether linear() takes this product: bf16 on the CPU, at most MAX_ROWS rows, an even number of inputs, no
    gradient wanted."""
    return (x.dtype == torch.bfloat16 and weight.dtype == torch.bfloat16 and x.device.type == "cpu"
            and x.shape[:-1].numel() <= MAX_ROWS and x.shape[-1] % 2 == 0 and no_gradient(x, weight)
            and preferred())


def packed_weight(*weights: Tensor) -> Tensor:
    """pack() of the weights stacked along their outputs (one, or several that share an input: q, k and v): in a
    compiled graph, where freezing folds it into a constant, computed in the graph; eager, packed once and kept on
    the first weight until one of them changes (its version counter or storage)."""
    if torch.compiler.is_compiling():
        return pack(weights[0] if len(weights) == 1 else torch.cat(weights))
    stamp = tuple((w._version, w.data_ptr(), tuple(w.shape)) for w in weights)
    cached = getattr(weights[0], "_cpu_bf16_packed", None)
    if cached is None or cached[0] != stamp:
        w = weights[0] if len(weights) == 1 else torch.cat(weights)
        cached = (stamp, pack(w.detach()))
        weights[0]._cpu_bf16_packed = cached
    return cached[1]


def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, weight, bias) through the kernel (see fits). The bias, if any, is added to the rounded product."""
    return linears(x, [weight], [bias])[0]


def linears(x: Tensor, weights: list, biases: list) -> list:
    """[F.linear(x, w, b) for each weight and bias] in one call of the kernel, on the weights stacked along their
    outputs (one read of x, one parallel region): each output has the bits linear() gives it (its sum does not
    depend on the other outputs). Biases (None or tensors) are added to the rounded products."""
    sizes = [w.shape[0] for w in weights]
    y = ops().linear_bf16(x.reshape(-1, x.shape[-1]), packed_weight(*weights), sum(sizes))
    parts = y.view(*x.shape[:-1], sum(sizes)).split(sizes, dim=-1)
    return [p if b is None else p + b for p, b in zip(parts, biases)]


def mlp_fits(x: Tensor, gate: nn.Linear, up: nn.Linear, down: nn.Linear) -> bool:
    """Whether mlp() takes this SwiGLU MLP: fits() for x and every weight, no biases, a hidden size that is a multiple
    of 32."""
    return (fits(x, gate.weight) and all(m.weight.dtype == torch.bfloat16 and m.bias is None for m in (gate, up, down))
            and no_gradient(up.weight, down.weight)
            and gate.weight.shape[0] % 32 == 0)


def mlp(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """A SwiGLU MLP, down(silu(gate(x)) * up(x)), in one call of the kernel (see mlp_fits): the gate and up products
    (one product on their weights stacked, as linears() does), then h = bf16(bf16(silu(g)) * u) where eager PyTorch
    rounds, silu in fp32 with the kernel's own exp, then the down product. x (..., K) bf16; gate, up (H, K) and down
    (N, H) bf16 weights, packed once (packed_weight). A row's output depends on that row alone."""
    y = ops().mlp_bf16(x.reshape(-1, x.shape[-1]), packed_weight(gate, up), packed_weight(down), gate.shape[0],
                       down.shape[0])
    return y.view(*x.shape[:-1], down.shape[0])


def attention_fits(q: Tensor, k: Tensor) -> bool:
    """Whether attend() takes attention over this cache: bf16 on the CPU, D a multiple of 32 up to 256, no gradient
    wanted."""
    return (q.dtype == torch.bfloat16 and k.dtype == torch.bfloat16 and q.device.type == "cpu"
            and q.shape[-1] % 32 == 0 and q.shape[-1] <= 256 and no_gradient(q, k) and preferred())


def attend(q: Tensor, k: Tensor, v: Tensor, cut: Tensor, keys: Tensor, scale: float) -> Tensor:
    """Softmax attention of a decoding call in one operator (see attention_fits): q (B, T, Hq, D) bf16, k and v (B,
    H_kv, S, D) bf16 (Hq a multiple of H_kv, grouped-query), cut (B, T) int64, keys (B, T, L) int64. New token t of row
    b attends over the cache slots s < cut[b, t], then over the slots keys[b, t, j] >= 0 in order of j (negative: no
    key); its scores are q . k * scale. Returns (B, T, Hq, D) bf16. Each output row is summed in a fixed order of its
    own slots (attend_bf16 in cpu_bf16.cpp): the same bits in a call of any width, with any other tokens."""
    return ops().attend_bf16(q, k, v, cut, keys, float(scale))


def topk_fits(x: Tensor, k: int) -> bool:
    """Whether topk() takes this tensor: fp32 or bf16 on a CPU where the kernels run (AVX512; with AMX too), no
    gradient wanted."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() >= 1
            and 1 <= k <= x.shape[-1] and no_gradient(x) and available())


def topk(x: Tensor, k: int) -> tuple:
    """(values, indices) of the k largest entries along the last dim, descending (see topk_fits): what
    torch.sort(x, descending=True, stable=True) gives in its first k places, equal values in order of index. NaN is
    never taken (torch.topk takes it first): a row with NaN has non-finite logits, which the decoders flag."""
    values, indices = ops().topk_rows(x.reshape(-1, x.shape[-1]), k)
    return values.view(*x.shape[:-1], k), indices.view(*x.shape[:-1], k)


def argmax(x: Tensor) -> tuple:
    """(max, index of its first occurrence) over the last dim, in one pass (see topk_fits, with k = 1): what
    sampling.argmax's two reductions give, a row with NaN included (NaN, and the last index). 8 rows of 49152 bf16
    logits: ~20 us, against ~85 for the two reductions compiled."""
    values, indices = ops().argmax_rows(x.reshape(-1, x.shape[-1]))
    return values.view(x.shape[:-1]), indices.view(x.shape[:-1])


def attend_reference(q: Tensor, k: Tensor, v: Tensor, cut: Tensor, keys: Tensor, scale: float) -> Tensor:
    """attend() in torch, in float64 (the kernel's exp and sums round otherwise: compare with a tolerance). For tests."""
    B, T, Hq, D = q.shape
    H = k.shape[1]
    out = torch.empty(B, T, Hq, D, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            slots = torch.cat([torch.arange(int(cut[b, t])), keys[b, t][keys[b, t] >= 0]])
            for hq in range(Hq):
                h = hq // (Hq // H)
                s = (k[b, h, slots].double() @ q[b, t, hq].double()) * scale
                out[b, t, hq] = torch.softmax(s, dim=0) @ v[b, h, slots].double()
    return out
