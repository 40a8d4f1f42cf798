"""The decoding step shared by every decoder, and plain autoregressive decoding.

Every decoder is a *step*: a function `step(model, state) -> state` of tensors only, with static shapes and no host
synchronisation, that makes one iteration of the algorithm for every row of the batch (one or two forward calls,
verification, commit). `run` calls it in a loop and looks at the state once every `check_every` steps, to stop when
every row is done and to stream new tokens; nothing else crosses to the host. So a step can be compiled whole
(`torch.compile(fullgraph=True)`, captured in a CUDA graph on CUDA): see `compile_step`.

The state holds, per row b: `seqlens[b]`, the number of tokens whose K/V are in the cache (the committed sequence
minus its last token), and `pending[b]`, that last committed token, which the next forward call feeds in first at
position `seqlens[b]`. A prompt of n tokens is prefilled with its first n-1 tokens and leaves its last as the pending
token, so the autoregressive loop and the speculative loops all start from the same state.

Rows are independent: prompts of different lengths (right-padded into one tensor), their own random streams and
their own stop. A finished row keeps its slot and keeps computing until the whole batch is done; what it produces
after its stop is discarded, and its cache length no longer moves, so extra steps stay inside the cache.

Non-finite logits (NaN or inf: a corrupt checkpoint, or a dtype overflow) are caught in the step at no extra host
sync: each step records, per row, the position of the first token whose logits were not finite, and the host's
periodic look raises one error naming the row and the position.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from minipass.errors import MinipassError
from minipass.loading import cpu_has_amx
from minipass.model import Transformer
from minipass.sampling import SAMPLE, argmax, check_sampling_args, logits_to_probs, sample, uniforms

State = dict  # name -> Tensor; see start()


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def __post_init__(self):
        check_sampling_args(self.temperature, self.top_k, self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def probs(self, logits: Tensor) -> Tensor:
        return logits_to_probs(logits, self.temperature, self.top_k, self.top_p)


@dataclass
class DecodeStats:
    calls: int = 0  # decoding forward calls (the prompt's prefill is not counted)
    row_calls: int = 0  # sum over rows of the calls made while the row was unfinished
    tokens: int = 0  # tokens emitted, all rows
    accepted: list = field(default_factory=list)  # per draft position: drafts accepted
    attempted: list = field(default_factory=list)  # per draft position: drafts verified
    wall_s: float = 0.0  # the whole call: prefill, decoding, compilation of the step if it happened in this call
    prefill_s: float = 0.0  # the part of wall_s before the first step: the cache's set-up and the prompts' prefill

    @property
    def tokens_per_call(self) -> float:
        return self.tokens / max(self.row_calls, 1)

    @property
    def acceptance(self) -> list:
        return [a / t if t else 0.0 for a, t in zip(self.accepted, self.attempted)]

    @property
    def mean_accepted(self) -> float:
        """E[j]: mean accepted drafts per verification (the verifications are the first-position attempts)."""
        return sum(self.accepted) / self.attempted[0] if self.attempted and self.attempted[0] else 0.0

    def __add__(self, other: "DecodeStats") -> "DecodeStats":
        """The statistics of two decodes over different prompts, as if they had been one."""
        add = lambda x, y: [(x[i] if i < len(x) else 0) + (y[i] if i < len(y) else 0)  # noqa: E731
                            for i in range(max(len(x), len(y)))]
        return DecodeStats(self.calls + other.calls, self.row_calls + other.row_calls, self.tokens + other.tokens,
                           add(self.accepted, other.accepted), add(self.attempted, other.attempted),
                           self.wall_s + other.wall_s, self.prefill_s + other.prefill_s)


@dataclass
class Output:
    tokens: list  # per row, the generated ids (a stop token that ended the row included)
    stats: DecodeStats


# --- state ------------------------------------------------------------------------------------------------------------

CACHE_ROUNDING = 64  # cache lengths are multiples of this: calls of similar lengths share one compiled step
PREFILL_ROUNDING = 64  # a compiled prefill's width is a multiple of this: prompts of similar lengths share one


def prefill_width(n: int, capacity: Optional[int] = None) -> int:
    """The width a compiled prefill of n prompt tokens runs at: n rounded up to a multiple of PREFILL_ROUNDING (at
    most `capacity`)."""
    width = n + (-n) % PREFILL_ROUNDING
    return width if capacity is None else min(capacity, width)


def prefill(model: Transformer, tokens: Tensor, positions: Tensor, zeros: Tensor) -> Tensor:
    """Write the K/V of `tokens` (B, n), at cache slots 0 .. n - 1 of every row. Only the K/V are wanted: one row
    per prompt goes through the final norm, none through the head."""
    return model(tokens, input_pos=positions, cache_seqlens=zeros, kv_len=tokens.shape[1],
                 logits_index=zeros[:, None], return_hidden=True)


def start(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
          seeds: Optional[Sequence[int]], stop_ids: Sequence[int], width: int, draft_positions: int = 0,
          cache_len: Optional[int] = None, compile=False) -> State:
    """Check the request, allocate the cache, prefill every prompt but its last token, and return the state.

    width: the most new tokens one step may write past a row's committed length (the widest forward call).
    draft_positions: length of the per-position acceptance counters. cache_len: at least this many cache slots per
    row. A compiled step is specialised to the cache length (attention spans the whole cache), so calls that should
    share one, such as a benchmark's, pass the same cache_len.
    compile: as the decoder's step (see step_for). On a CPU the prefill is then compiled too, its width rounded up to
    a multiple of PREFILL_ROUNDING (the padding writes slots past the prompts, which no call attends to before it
    writes them): with the weights frozen and prepacked, the default model's prefill of 149 tokens takes 32 ms
    against 65-74 ms eager. On CUDA it stays eager: its kernels are large, and each width would be one more graph.
    """
    if not prompts:
        raise MinipassError("no prompts given")
    if any(len(p) == 0 for p in prompts):
        raise MinipassError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise MinipassError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    context = model.args.max_seq_len
    longest = max(len(p) for p in prompts)
    # Room for every emitted token plus the widest forward call that may follow the last commit.
    capacity = longest + max_new_tokens + width
    if capacity > context:
        raise MinipassError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} (and "
                            f"{width} working slots) exceeds the model's context of {context} tokens")
    capacity = min(context, max(capacity, cache_len or 0) + (-max(capacity, cache_len or 0)) % CACHE_ROUNDING)
    vocab = model.args.vocab_size
    for p in prompts:
        if min(p) < 0 or max(p) >= vocab:
            raise MinipassError(f"prompt token id out of range [0, {vocab}): {min(p)}..{max(p)}")
    seeds = list(range(len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise MinipassError(f"got {len(seeds)} seeds for {len(prompts)} prompts")

    device = model.embed_tokens.weight.device
    B = len(prompts)
    n, fill = longest - 1, prefill
    if compile and device.type == "cpu" and n > 0:
        n, fill = prefill_width(n, capacity), step_for(prefill, ("prefill",), model, compile)
    model.setup_caches(B, capacity, call_width=width, prefill_len=n)  # refused first if it cannot fit
    lens = torch.tensor([len(p) for p in prompts], device=device)
    tokens = torch.zeros(B, capacity, dtype=torch.long)  # every committed token, prompt included, by position
    for b, p in enumerate(prompts):
        tokens[b, : len(p)] = torch.tensor(p)
    tokens = tokens.to(device)
    zeros = torch.zeros(B, dtype=torch.long, device=device)
    if n > 0:  # prefill every prompt but its last token, right-padded
        fill(model, tokens[:, :n], torch.arange(n, device=device).expand(B, -1), zeros)
    return {
        "seeds": torch.tensor(seeds, dtype=torch.long, device=device),
        "stop_ids": torch.tensor(sorted(set(stop_ids)) or [-1], dtype=torch.long, device=device),
        "budget": torch.full((B,), max_new_tokens, device=device),
        "tokens": tokens,
        "seqlens": lens - 1,
        "pending": tokens.gather(1, (lens - 1)[:, None])[:, 0],
        "prompt_lens": lens,
        "out": torch.zeros(B, capacity, dtype=torch.long, device=device),  # the same shape whatever max_new_tokens
        # Distinct tensors: a compiled step guards on which state entries alias each other, and the state it returns
        # never aliases them, so aliased entries here would compile the step a second time at its second call.
        "n_out": torch.zeros_like(zeros),
        "finished": torch.zeros(B, dtype=torch.bool, device=device),
        "calls": torch.zeros((), dtype=torch.long, device=device),
        "row_calls": torch.zeros_like(zeros),
        "attempted": torch.zeros(draft_positions, dtype=torch.long, device=device),
        "accepted": torch.zeros(draft_positions, dtype=torch.long, device=device),
        "bad": torch.full((B,), -1, dtype=torch.long, device=device),  # position of the first non-finite logits
    }


def commit(st: State, tokens: Tensor, n_emit: Tensor, advance: Tensor) -> tuple[State, Tensor]:
    """Append `n_emit[b]` tokens of `tokens[b]` (B, W) to each unfinished row; returns the new state and the count
    kept per row.

    A row's output stops at its first stop token or at its budget of new tokens; tokens past that are dropped. The
    last kept token becomes the row's pending token, and the row's cache length grows by `advance[b]` (the new
    tokens whose K/V the call left in consecutive slots). Finished rows keep nothing and stay where they are.
    """
    W = tokens.shape[1]
    dev = tokens.device
    idx = torch.arange(W, device=dev)
    tokens = tokens.clamp(min=0)  # an invalid row's -1 never reaches an embedding lookup (it is reported instead)
    is_stop = torch.isin(tokens, st["stop_ids"]) & (idx < n_emit[:, None])
    # Keep up to and including the first stop token, and no more than the row's remaining budget.
    first_stop = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, W + 1)
    keep = torch.minimum(torch.minimum(n_emit, first_stop), st["budget"] - st["n_out"])
    finished = st["finished"]
    keep = torch.where(finished, 0, keep)
    kept = idx < keep[:, None]  # (B, W)

    out, n_out = st["out"], st["n_out"]
    slots = (n_out[:, None] + idx).clamp(max=out.shape[1] - 1)
    out = out.scatter(1, slots, torch.where(kept, tokens, out.gather(1, slots)))
    seq = st["tokens"]
    pos = (st["seqlens"][:, None] + 1 + idx).clamp(max=seq.shape[1] - 1)
    seq = seq.scatter(1, pos, torch.where(kept, tokens, seq.gather(1, pos)))

    last = tokens.gather(1, (keep - 1).clamp(min=0)[:, None])[:, 0]
    n_out = n_out + keep
    now_finished = finished | (first_stop <= keep) | (n_out >= st["budget"])
    # A row that is done stays where it is, so its later (discarded) calls stay inside the cache.
    return dict(st, out=out, n_out=n_out, tokens=seq, pending=torch.where(keep > 0, last, st["pending"]),
                finished=now_finished, seqlens=st["seqlens"] + torch.where(now_finished, 0, advance),
                calls=st["calls"] + 1, row_calls=st["row_calls"] + (~finished).long()), keep


def record_acceptance(st: State, n_drafts: Tensor, n_accepted: Tensor) -> State:
    """Count, per draft position k, the drafts verified (the first k were accepted) and accepted. Call before
    commit(), so rows that were already finished are left out."""
    k = torch.arange(st["attempted"].shape[0], device=n_drafts.device)
    active = ~st["finished"][:, None]
    return dict(st, attempted=st["attempted"] + ((k < n_drafts[:, None]) & (k <= n_accepted[:, None]) & active).sum(0),
                accepted=st["accepted"] + ((k < n_accepted[:, None]) & active).sum(0))


def flag_non_finite(st: State, ok: Tensor, position: Tensor) -> State:
    """Remember, per row, the first position (B,) at which `ok` (B,) was false, for rows still decoding."""
    new = ~ok & ~st["finished"] & (st["bad"] < 0)
    return dict(st, bad=torch.where(new, position, st["bad"]))


def choose(sampling: SamplingParams, logits: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """The next token from logits (..., V) and uniforms u (...): argmax when greedy, else an exact sample from the
    transformed distribution. Also returns whether the logits were finite (their max is finite: no NaN, no +inf,
    not all -inf), which costs nothing extra when greedy."""
    if sampling.greedy:
        top, token = argmax(logits)
        return token, torch.isfinite(top)
    ok = torch.isfinite(logits.amax(-1))
    token = sample(sampling.probs(logits), u)
    return token.clamp(max=logits.shape[-1] - 1), ok


# --- the loop -----------------------------------------------------------------------------------------------------------

_COMPILED: dict = {}


def compile_options(device: torch.device) -> dict:
    """torch.compile arguments for a decoding step on this device (see `compile_fn`, which applies them).

    CUDA: CUDA graphs ("reduce-overhead"): the step is one graph replay, no per-kernel launch cost. CPU: inductor with
    the weights frozen into the graph as constants and prepacked for oneDNN (bf16) or MKL (fp32), whose packed
    products read bf16 weights 1.25-1.5x faster than ATen's `mm` on the weights as stored, at 1 to 65 rows (README,
    "One step, compiled whole"); products that share their input (q, k, v; gate, up) are concatenated into one,
    which oneDNN streams faster (the AR step of the default model: 20.6 against 24.1 ms). On a CPU with AMX tiles,
    inductor's GEMM autotuning (`max_autotune`) offers its C++ GEMM template for each product, and the template
    (AMX micro-kernels, weights packed at compile time, no per-call set-up) is the faster: the default model's
    one-token forward 10.5 against 12.9 ms, the 16-token one 12.9 against 15.3 ms (README, "One step, compiled
    whole"); compile_fn takes it untimed where it fits a bf16 or fp16 product. Without AMX the template was the
    slower choice once the weights stream from memory (it is timed on weights that sit in the cache), so there
    autotuning stays off: it would only lengthen the compile, and on such a CPU with AVX512-BF16 the decoding calls'
    products are minipass's own (kernels/cpu_bf16.py, called by model.product and attention_torch: custom operators
    that the graph calls, their weights packed once at compile time by freezing), faster there than oneDNN's.

    A token's logits must not depend on the width of the call that computes them (README, "Logits that do not depend
    on the call"), so: low-precision intermediates are rounded where eager PyTorch rounds them
    (`emulate_precision_casts`; by default inductor keeps a fused kernel's bf16 intermediates in fp32, and what it
    fuses depends on the shapes), and on a CPU `cpp.dynamic_threads` is off (on, inductor gives every kernel a
    parallel loop, and in a one-token call, whose row dimension is gone, that loop is a norm's reduction, split
    across the threads; off, a kernel runs in parallel only where it has enough work, and the threads still follow
    torch.set_num_threads, which bench.py lowers on a shared machine). With either option the other way,
    the default model's one-token and 8-token calls gave 57 or 64 of 64 tokens of a chain other bits, from layer 3
    or 13 on; with both, none.
    """
    if device.type == "cuda":
        # CUDA graphs (torch.compile's mode "reduce-overhead", which cannot be given with options)
        return {"options": {"triton.cudagraphs": True, "emulate_precision_casts": True}}
    return {"options": {"freezing": True,
                        # round to bf16 / fp16 wherever eager does (see the docstring)
                        "emulate_precision_casts": True,
                        # frozen products that share their input become one: q, k and v; gate and up
                        "cpp.enable_concat_linear": True,
                        # no parallel loop forced on every kernel (see the docstring)
                        "cpp.dynamic_threads": False,
                        # the graph's calls made from C++, not from a Python wrapper: ~2 ms less per step of the
                        # default model (a few hundred kernel calls and buffer allocations), 15-25 s more compile
                        "cpp_wrapper": True,
                        # C++ GEMM templates where they are faster (see the docstring); ATen's products elsewhere
                        **({"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN"} if cpu_has_amx() else {})}}


def _cpp_bmm_template_on_stored_operands():
    """A context in which inductor's autotuning may give a low-precision batched product to its C++ template only
    where the second operand is read as stored (rows contiguous): the attention's probabilities times V. Its scores,
    Q times the transposed K, stay on ATen's bmm, and so does the fp32 product over each row's last keys.

    The template packs a transposed second operand before the product, and that packing wrote NaN into the default
    model's first attention (torch 2.13: from 24 layers on, so likely a read of uninitialised memory); times V, the
    template gives the right values and is the faster choice (the default model's whole greedy decodes, paired against
    both products on ATen: AR 1.02x, the default tree 1.03x; README, "One step, compiled whole")."""
    from unittest import mock

    import torch._inductor.kernel.bmm

    template_fits = torch._inductor.kernel.bmm.use_cpp_bmm_template

    def stored_operands_only(layout, mat1, mat2) -> bool:
        return (mat1.get_dtype() in (torch.bfloat16, torch.float16) and mat2.get_stride()[-1] == 1
                and template_fits(layout, mat1, mat2))

    return mock.patch.object(torch._inductor.kernel.bmm, "use_cpp_bmm_template", stored_operands_only)


def _templates_untimed_against_extern_kernels() -> list:
    """Contexts (reusable, entered together) in which a bf16 or fp16 product that inductor's C++ GEMM template fits
    takes the template (its variants still timed against each other), without timing it against ATen's or oneDNN's
    kernel, which stays the choice wherever no template fits (and for every fp32 product).

    Timed against each other, the two are picked by whatever else the machine ran during the compile, and inductor
    keeps the timings on disk (its local autotune cache, one per machine) and reuses them in every later process
    without timing again. On the Intel Xeon with AMX, 2 cores, one such cache held 5-us products timed at 7-12 ms
    (the compile shared the cores): it gave the default model's 30 gate/up products and its head to oneDNN, and
    that one-token forward took 12.28 ms against 11.34 all-template, paired (same bits). In every entry timed
    undisturbed, the template was the faster, 1.1-9x, at 1 to 192 rows."""
    from unittest import mock

    import torch._inductor.kernel.bmm
    import torch._inductor.mkldnn_lowerings
    import torch._inductor.select_algorithm as select

    choose = select.autotune_select_algorithm

    def templates_first(name, choices, input_nodes, layout, *args, **kwargs):
        if layout.dtype in (torch.bfloat16, torch.float16):
            choices = [c for c in choices if not isinstance(c, select.ExternKernelCaller)] or choices
        return choose(name, choices, input_nodes, layout, *args, **kwargs)

    return [mock.patch.object(module, "autotune_select_algorithm", templates_first)
            for module in (torch._inductor.kernel.bmm, torch._inductor.mkldnn_lowerings)]


def compile_fn(fn: Callable, device: torch.device, options: Optional[dict] = None) -> Callable:
    """`torch.compile(fn, fullgraph=True, dynamic=False, **options)`, `options` defaulting to compile_options(device).
    fullgraph=True makes any graph break an error: the step must be pure tensor code.

    Inductor's "freezing" option is read twice: by Dynamo when it traces, to decide whether a module's parameters
    are constants of the graph or inputs to it, and by inductor. Passed through torch.compile's `options`, it only
    reaches inductor, which then finds no constant to freeze: the weights stay graph inputs, multiplied by ATen's
    `mm` as stored. So an `options` dict that asks for freezing is applied as inductor's config around each call of
    the compiled function (a call compiles when no compiled variant fits), and the weights are frozen for real.
    A frozen function holds the weights it was compiled with: parameters changed in place afterwards are not seen.
    Options with `max_autotune` are applied the same way, with the attention's scores kept off inductor's C++
    template for batched products (_cpp_bmm_template_on_stored_operands) and the template taken untimed where it
    fits a low-precision product (_templates_untimed_against_extern_kernels)."""
    import torch._dynamo
    import torch._inductor.config

    opts = dict(compile_options(device) if options is None else options)
    inductor = dict(opts.get("options") or {})
    freezing = inductor.pop("freezing", False)
    if "options" in opts:
        opts["options"] = inductor
    # Each mode, option set and batch shape is one more compiled variant of the same Python function.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    compiled = torch.compile(fn, fullgraph=True, dynamic=False, **opts)
    autotune = inductor.get("max_autotune", False)
    if not freezing and not autotune:
        return compiled
    # made once, entered around every call (a call compiles when no compiled variant fits)
    contexts = [torch._inductor.config.patch(freezing=freezing)]
    if autotune:
        contexts += [_cpp_bmm_template_on_stored_operands(), *_templates_untimed_against_extern_kernels()]

    def frozen(*args, **kwargs):
        with contextlib.ExitStack() as stack:
            for c in contexts:
                stack.enter_context(c)
            return compiled(*args, **kwargs)

    frozen._torchdynamo_orig_callable = fn  # as torch.compile's own wrapper: the function it compiles
    return frozen


def compile_step(step: Callable, key: tuple, device: torch.device, options: Optional[dict] = None) -> Callable:
    """`compile_fn(step, device, options)`, made once per key (a mode and its static options) and device."""
    key = (key, str(device), repr(options))
    if key not in _COMPILED:
        _COMPILED[key] = compile_fn(step, device, options)
    return _COMPILED[key]


def check_every_default(device: torch.device) -> int:
    """Steps between two looks at the state: every step on a CPU, where a look costs nothing; a few on CUDA, where
    each look is a synchronisation that stalls the queue of launched work."""
    return 4 if device.type == "cuda" else 1


def steady_guards():
    """A context in which a compiled step checks only the guards that tell its compiled variants apart.

    torch.compile checks a few hundred guards (every state tensor's dtype, shape, strides, aliasing; the constants
    baked in) before each call: ~0.1 ms of host time per step for the tiny model's tree step at batch 64. From the
    third step of a decode on, the state has the structure every later step sees (a step's output state is its
    input's, and a decode compiles its step once: tests/test_step.py decodes every mode with error_on_recompile), so
    the variant to run is known and the full check is redundant. `run` enters it around its steps only, never around
    the caller's on_tokens."""
    return torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)


def run(model: Transformer, step: Callable, st: State, on_tokens: Optional[Callable] = None,
        check_every: Optional[int] = None, t0: Optional[float] = None) -> Output:
    """Step until every row is done, looking at the state every `check_every` steps; returns the outputs.

    on_tokens(out, n_out), if given, is called at each look with the output buffer (B, W) and the counts (B,).
    """
    device = st["seqlens"].device
    check_every = check_every or check_every_default(device)
    prefill_s = clock(st["seqlens"]) - t0 if t0 is not None else 0.0
    steps = 0
    while True:
        with steady_guards() if steps >= 2 else contextlib.nullcontext():
            for _ in range(check_every):
                st = step(model, st)
        steps += check_every
        if on_tokens is not None:
            on_tokens(st["out"], st["n_out"])
        done, bad = torch.stack([st["finished"].all(), (st["bad"] >= 0).any()]).tolist()
        if bad:
            raise_non_finite(st)
        if done:
            break
    return result(st, t0, prefill_s)


def raise_non_finite(st: State) -> None:
    bad = st["bad"].tolist()
    row = next(b for b, p in enumerate(bad) if p >= 0)
    raise MinipassError(f"non-finite logits (NaN or inf) for batch row {row} at token position {bad[row]}: the "
                        "checkpoint holds NaN/inf weights (check it with --check-weights) or the activations "
                        "overflowed the dtype (try --dtype fp32)")


def result(st: State, t0: Optional[float] = None, prefill_s: float = 0.0) -> Output:
    device = st["seqlens"].device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n_out = st["n_out"].tolist()
    stats = DecodeStats(calls=int(st["calls"]), row_calls=int(st["row_calls"].sum()), tokens=sum(n_out),
                        attempted=st["attempted"].tolist(), accepted=st["accepted"].tolist(),
                        wall_s=time.perf_counter() - t0 if t0 is not None else 0.0, prefill_s=prefill_s)
    out = st["out"].tolist()
    return Output(tokens=[row[:n] for row, n in zip(out, n_out)], stats=stats)


def clock(on) -> float:
    """Now, once the device that holds `on` (a model, or a tensor) has finished the work queued before."""
    t = on.embed_tokens.weight if isinstance(on, Transformer) else on
    if t.is_cuda:
        torch.cuda.synchronize(t.device)
    return time.perf_counter()


# --- autoregressive decoding ----------------------------------------------------------------------------------------------

def ar_step(model: Transformer, st: State, sampling: SamplingParams) -> State:
    """One token per row: the reference every other decoder must reproduce."""
    logits = model(st["pending"][:, None], input_pos=st["seqlens"][:, None], cache_seqlens=st["seqlens"])[:, 0]
    # The token decided here sits at position seqlens + 1 of its row.
    position = st["seqlens"] + 1
    token, ok = choose(sampling, logits, uniforms(st["seeds"], position, SAMPLE))
    st = flag_non_finite(st, ok, position)
    ones = torch.ones_like(token)
    return commit(st, token[:, None], ones, advance=ones)[0]


def step_for(step: Callable, key: tuple, model: Transformer, compile) -> Callable:
    """The step itself (compile False), or its compiled form: compile True uses `compile_options`, a dict gives the
    torch.compile arguments. Made once per key and model: compiled steps bake the weights in."""
    if not compile:
        return step
    options = None if compile is True else dict(compile)
    return compile_step(step, key + (id(model),), model.embed_tokens.weight.device, options)


@torch.no_grad()
def ar_decode(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
              sampling: SamplingParams = SamplingParams(), seeds: Optional[Sequence[int]] = None,
              stop_ids: Sequence[int] = (), on_tokens: Optional[Callable] = None, *, compile=False,
              check_every: Optional[int] = None, cache_len: Optional[int] = None) -> Output:
    """Autoregressive decoding: one forward call per token. The reference every other decoder must reproduce.

    compile: torch.compile the step (see step_for); check_every: steps between looks at the state (see run);
    cache_len: the least cache length (see start). The speculative decoders take the same three options."""
    t0 = clock(model)
    st = start(model, prompts, max_new_tokens, seeds, stop_ids, width=1, cache_len=cache_len, compile=compile)
    step = step_for(lambda m, s: ar_step(m, s, sampling), ("ar", sampling), model, compile)
    return run(model, step, st, on_tokens, check_every, t0)
