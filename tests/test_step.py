"""The decoding step: compiled whole with fullgraph=True, no host synchronisation inside, non-finite logits caught."""

import contextlib
import re

import pytest
import torch
import torch._dynamo
from torch.overrides import TorchFunctionMode

import minipass.decoding as dec
from minipass.decoding import SamplingParams, ar_decode
from minipass.errors import MinipassError
from minipass.lookahead import init_lookahead
from minipass.pass_decoding import pass1_decode, pass_decode
from minipass.tree_decoding import TreeConfig, ngram_decode, tree_decode
from tests.util import per_layer_lookahead, tiny_model

PROMPTS = [[5, 6, 7, 1, 6, 7, 2, 9, 6, 7, 2, 9], [3, 1, 4, 1, 5, 9, 2, 6], [8, 8, 8]]
TREE = TreeConfig(nodes=6, topk=2, blocks=2, ngram_len=3, ngram_chains=2)


def decoders(model):
    la = per_layer_lookahead(model, 3)
    return {
        "ar": ar_decode,
        "pass": lambda *a, **k: pass_decode(*a, lookahead=la, **k),
        "pass1": lambda *a, **k: pass1_decode(*a, lookahead=la, **k),
        "ngram": ngram_decode,
        "tree": lambda *a, **k: tree_decode(*a, lookahead=la, tree=TREE, **k),
    }


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("tiny", seed=3)


# Plain inductor: freezing (the CPU default of compile_options, tested below) costs compile time and changes
# nothing about whether the step is one graph.
COMPILE = {"options": {}}


@pytest.mark.parametrize("mode", ["ar", "pass", "pass1", "ngram", "tree"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_step_compiles_whole_and_decodes_like_eager(tiny, mode, temperature, monkeypatch):
    """torch.compile(fullgraph=True) accepts every mode's step (a graph break would raise) and compiles it once for
    the whole decode (a recompile would raise: the state a step returns must pass the guards of the state `start`
    made, which is what lets `run` check only the differentiating guards from the third step on), and the compiled
    step decodes what the eager one does, with either guard checking; greedy, that is autoregressive greedy output."""
    torch._dynamo.reset()
    dec._COMPILED.clear()
    decode = decoders(tiny)[mode]
    sp = SamplingParams(temperature, 5 if temperature else 0)
    eager = decode(tiny, PROMPTS, 12, sp, seeds=[1, 2, 3])
    with monkeypatch.context() as m, torch._dynamo.config.patch(error_on_recompile=True):
        m.setattr(dec, "steady_guards", contextlib.nullcontext)  # every step's guards checked in full
        checked = decode(tiny, PROMPTS, 12, sp, seeds=[1, 2, 3], compile=COMPILE)
    compiled = decode(tiny, PROMPTS, 12, sp, seeds=[1, 2, 3], compile=COMPILE)  # run's default: steady guards
    assert checked.tokens == compiled.tokens == eager.tokens
    assert compiled.stats.calls == eager.stats.calls
    if temperature == 0:
        assert compiled.tokens == ar_decode(tiny, PROMPTS, 12).tokens


def test_compiled_prefill_is_padded_to_its_bucket_and_writes_the_prompts_cache(tiny):
    """With compile, a CPU prefill runs compiled at a width rounded up to PREFILL_ROUNDING: prompts of other
    lengths in the same bucket reuse it (a recompile would raise), and the prompts' cache slots get the K/V the eager
    prefill writes (the padding writes only slots past them)."""
    torch._dynamo.reset()
    dec._COMPILED.clear()
    long_prompts = [[(7 * i + 3) % 60 + 1 for i in range(23)], [4, 5, 6, 7, 8]]
    with torch.no_grad():  # as the decoders call it
        dec.start(tiny, long_prompts, 4, None, (), width=1, cache_len=128)
        eager = tiny.kv.clone()
        dec.start(tiny, long_prompts, 4, None, (), width=1, cache_len=128, compile=COMPILE)
    compiled = tiny.kv.clone()
    # The cache is cleared before a prefill: the eager one writes slots 0 .. 21, the compiled one 0 .. 63.
    R = dec.PREFILL_ROUNDING
    written = lambda kv: (kv != 0).any(-1).any(2).any(1).any(0)  # noqa: E731  (B, slots): any layer, K/V, head
    assert written(eager)[0, :22].all() and not written(eager)[:, 22:].any()
    assert written(compiled)[:, :R].all() and not written(compiled)[:, R:].any()
    for b, p in enumerate(long_prompts):  # each row's prompt slots: 0 .. len - 2
        torch.testing.assert_close(compiled[:, :, b, :, : len(p) - 1], eager[:, :, b, :, : len(p) - 1],
                                   rtol=1e-5, atol=1e-5)
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = ar_decode(tiny, [p[:-3] for p in long_prompts], 6, cache_len=128, compile=COMPILE)
    assert out.tokens == ar_decode(tiny, [p[:-3] for p in long_prompts], 6, cache_len=128).tokens


class HostSyncs(TorchFunctionMode):
    """Counts the tensor operations that make the host wait for the device: reading values back (item, tolist,
    numpy, bool/int/float conversion: a Python branch on a tensor) and data-dependent shapes (nonzero, a boolean
    mask index, unique). On CUDA each one stalls the launch queue; inside a step none may happen."""

    NAMES = {"item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero", "unique",
             "masked_select", "argwhere", "cpu"}

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.NAMES:
            self.calls.append(name)
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            idx = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in idx):
                self.calls.append("boolean mask index")
        return func(*args, **(kwargs or {}))


def test_compiled_with_freezing_the_weights_are_constants():
    """compile_fn applies inductor's freezing for real: the weights become constants of the graph (packed for
    oneDNN/MKL), which a change made to them in place afterwards does not reach. Passed as a torch.compile option
    alone, freezing leaves the weights graph inputs, and the change would show."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 48).eval().requires_grad_(False)
    x = torch.randn(3, 32)
    with torch.no_grad():
        f = dec.compile_fn(lambda m, x: m(x), torch.device("cpu"), {"options": {"freezing": True}})
        before = f(lin, x)
        torch.testing.assert_close(before, lin(x))
        lin.weight.add_(1.0)
        assert torch.equal(f(lin, x), before)
        assert not torch.allclose(lin(x), before)


def test_the_cpu_compile_concatenates_products_that_share_their_input():
    """With the default CPU options, a frozen forward multiplies q, k, v as one product and gate, up as one: the
    generated code of the tiny model (2 layers, untied head) calls 2 x 4 + 1 products instead of 2 x 7 + 1, and
    gives the eager forward's logits."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_model("tiny-untied-mha")
    model.setup_caches(1, 16)
    tokens, pos, seq = torch.tensor([[3, 1, 4]]), torch.arange(3)[None], torch.zeros(1, dtype=torch.long)

    def fwd(m, tokens, pos, seq):
        return m(tokens, input_pos=pos, cache_seqlens=seq)

    counts = {}
    with torch.no_grad():
        eager = fwd(model, tokens, pos, seq)
        for concat in (False, True):
            torch._dynamo.reset()
            opts = dec.compile_options(torch.device("cpu"))
            opts["options"]["cpp.enable_concat_linear"] = concat
            # on a CPU with AMX the defaults also autotune, and C++ GEMM templates take the place of the packed
            # products counted below: the concatenation is counted on the packed products
            opts["options"].pop("max_autotune", None)
            opts["options"].pop("max_autotune_gemm_backends", None)
            out, code = run_and_get_code(dec.compile_fn(fwd, torch.device("cpu"), opts), model, tokens, pos, seq)
            torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
            # the packed products' calls: MKL's for fp32 (the tiny model), oneDNN's for bf16; from the C++ wrapper
            # (aoti_torch_cpu__mkl_linear(...)) or from a Python one (torch.ops.mkl._mkl_linear.default(...))
            counts[concat] = len(re.findall(r"_(?:mkl_linear|linear_pointwise)(?:\.default)?\(", "".join(code)))
    assert dec.compile_options(torch.device("cpu"))["options"]["cpp.enable_concat_linear"]
    assert (counts[False], counts[True]) == (2 * 7 + 1, 2 * 4 + 1)


def test_autotuned_compile_leaves_the_attention_products_to_aten():
    """With GEMM autotuning (the CPU options on a CPU with AMX; forced here, on any CPU), compile_fn keeps an fp32
    model's batched products off inductor's C++ template (decoding._cpp_bmm_template_on_stored_operands takes it for
    low-precision products only): the generated code makes ATen's three batched products per layer, and the compiled
    forward gives the eager logits."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_model("tiny")
    model.setup_caches(1, 16)
    tokens, pos, seq = torch.tensor([[3, 1, 4]]), torch.arange(3)[None], torch.zeros(1, dtype=torch.long)

    def fwd(m, tokens, pos, seq):
        return m(tokens, input_pos=pos, cache_seqlens=seq)

    opts = dec.compile_options(torch.device("cpu"))
    opts["options"].update(max_autotune=True, max_autotune_gemm_backends="CPP,ATEN")
    torch._dynamo.reset()
    with torch.no_grad():
        eager = fwd(model, tokens, pos, seq)
        out, code = run_and_get_code(dec.compile_fn(fwd, torch.device("cpu"), opts), model, tokens, pos, seq)
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    # ATen's batched product, called from the C++ wrapper (aoti_torch_cpu_bmm_out) or a Python one (extern_kernels.bmm)
    bmm = len(re.findall(r"aoti_torch_cpu_bmm_out\(|extern_kernels\.bmm\(", "".join(code)))
    assert bmm == 3 * model.args.n_layers


def test_the_bmm_template_gets_only_low_precision_operands_read_as_stored():
    """decoding._cpp_bmm_template_on_stored_operands: inductor's C++ template for batched products is offered the
    attention's probabilities times V (bf16 or fp16, V's rows contiguous), never its scores (K transposed, which the
    template packs first: NaN in the default model) nor an fp32 product, and never what inductor itself refuses."""
    from unittest import mock

    import torch._inductor.kernel.bmm as kbmm

    class Node:  # the two methods the choice reads of inductor's IR nodes
        def __init__(self, dtype, stride):
            self.dtype, self.stride = dtype, stride

        def get_dtype(self):
            return self.dtype

        def get_stride(self):
            return self.stride

    S, D = 384, 64
    v, k_t = (S * D, D, 1), (S * D, 1, D)  # V as stored; K transposed
    for inductor_says in (True, False):
        with mock.patch.object(kbmm, "use_cpp_bmm_template", lambda *args: inductor_says):
            with dec._cpp_bmm_template_on_stored_operands():
                fits = kbmm.use_cpp_bmm_template
                for dtype in (torch.bfloat16, torch.float16):
                    assert fits(None, Node(dtype, (3 * S, S, 1)), Node(dtype, v)) is inductor_says
                    assert not fits(None, Node(dtype, (3 * D, D, 1)), Node(dtype, k_t))
                assert not fits(None, Node(torch.float32, (3 * S, S, 1)), Node(torch.float32, v))
            assert kbmm.use_cpp_bmm_template(None, None, None) is inductor_says  # restored on leaving


def test_low_precision_products_take_the_gemm_template_untimed():
    """decoding._templates_untimed_against_extern_kernels: where inductor offers its C++ GEMM template for a bf16
    or fp16 product (a linear layer or a batched product), ATen's or oneDNN's kernel is not timed against it (the
    pick would follow the machine's load during the compile, and inductor keeps its timings on disk); an fp32
    product, or one that no template fits, keeps every choice; the lowerings get their own function back after."""
    import contextlib
    from unittest import mock

    import torch._inductor.kernel.bmm as kbmm
    import torch._inductor.mkldnn_lowerings as lowerings
    import torch._inductor.select_algorithm as select

    class Layout:
        def __init__(self, dtype):
            self.dtype = dtype

    offered = []

    def autotune(name, choices, input_nodes, layout, *args, **kwargs):
        offered.append(list(choices))
        return "picked"

    extern = object.__new__(select.ExternKernelCaller)  # ATen's bmm, oneDNN's linear
    template = object()  # a C++ template's choice
    with mock.patch.object(select, "autotune_select_algorithm", autotune):
        contexts = dec._templates_untimed_against_extern_kernels()
    originals = kbmm.autotune_select_algorithm, lowerings.autotune_select_algorithm
    for _ in range(2):  # made once, entered around every call of a compiled step
        with contextlib.ExitStack() as stack:
            for c in contexts:
                stack.enter_context(c)
            for module in (kbmm, lowerings):
                for dtype, choices, kept in [(torch.bfloat16, [extern, template], [template]),
                                             (torch.float16, [template, extern, template], [template, template]),
                                             (torch.float32, [extern, template], [extern, template]),
                                             (torch.bfloat16, [extern], [extern])]:
                    assert module.autotune_select_algorithm("mm", choices, [], Layout(dtype)) == "picked"
                    assert offered[-1] == kept
        assert (kbmm.autotune_select_algorithm, lowerings.autotune_select_algorithm) == originals


def test_a_frozen_step_serves_the_next_decode_without_compiling_again(tiny):
    """The default CPU compile freezes the model into the step, the KV cache store included, which the compiled
    step then checks by identity: a second decode of the same shape reuses the store (setup_caches clears it in
    place), so it runs the same compiled step, and both decode what the eager step does."""
    torch._dynamo.reset()
    dec._COMPILED.clear()
    eager = ar_decode(tiny, PROMPTS, 8)
    frozen = {"options": {"freezing": True}}
    first = ar_decode(tiny, PROMPTS, 8, compile=frozen)
    store = tiny.kv_store
    with torch._dynamo.config.patch(error_on_recompile=True):
        second = ar_decode(tiny, PROMPTS, 8, compile=frozen)
    assert tiny.kv_store is store
    assert first.tokens == second.tokens == eager.tokens


def test_a_training_forward_between_decodes_changes_nothing(tiny):
    """Look-ahead training forwards (and the tree sizing's calibration) give the layers caches of their own and
    their own row offsets (fresh_caches), so the model's shared store is dropped with them: the next decode's
    setup_caches, which keeps an unchanged store and its offsets, must not keep the training ones, through which
    the tree decode's cache moves would read every layer's rows."""
    from minipass.train_lookahead import fresh_caches

    first = decoders(tiny)["tree"](tiny, PROMPTS, 10)
    fresh_caches(tiny, 2, 8)
    assert decoders(tiny)["tree"](tiny, PROMPTS, 10).tokens == first.tokens == ar_decode(tiny, PROMPTS, 10).tokens


@pytest.mark.parametrize("mode", ["ar", "pass", "pass1", "ngram", "tree"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_no_host_sync_inside_a_step(tiny, mode, temperature, monkeypatch):
    """Every host synchronisation of a decode call happens in run()'s look at the state (one per check), none
    inside the step: the counter wraps the steps only."""
    counts, real_run = [], dec.run

    def counting_run(model, step, st, *args, **kwargs):
        def counted(m, s):
            with HostSyncs() as h:
                out = step(m, s)
            counts.append(list(h.calls))
            return out
        return real_run(model, counted, st, *args, **kwargs)

    for module in ("minipass.decoding", "minipass.pass_decoding", "minipass.tree_decoding"):
        monkeypatch.setattr(f"{module}.run", counting_run)
    decoders(tiny)[mode](tiny, PROMPTS, 10, SamplingParams(temperature, 5 if temperature else 0), seeds=[1, 2, 3])
    assert counts and all(c == [] for c in counts), f"host syncs inside the step: {counts[:3]}"


def test_host_sync_counter_sees_syncs():
    with HostSyncs() as h:
        x = torch.arange(4)
        x.tolist(), bool(x[0]), x[x > 1], x.nonzero()
    assert h.calls == ["tolist", "__bool__", "boolean mask index", "nonzero"]


# --- non-finite logits --------------------------------------------------------------------------------------------

def poisoned(model, where: str):
    """A copy of the model with one NaN weight: a corrupt checkpoint."""
    bad = tiny_model("tiny", seed=3)
    bad.load_state_dict(model.state_dict())
    w = dict(bad.named_parameters())[where]
    w.data.view(-1)[7] = float("nan")
    return bad


@pytest.mark.parametrize("mode", ["ar", "pass", "pass1", "ngram", "tree"])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_non_finite_logits_end_decoding_with_one_clear_error(tiny, mode, temperature):
    bad = poisoned(tiny, "layers.1.mlp.down_proj.weight")
    with pytest.raises(MinipassError, match=r"non-finite logits \(NaN or inf\) for batch row 0 at token position "
                                            r"12: .*--check-weights.*--dtype fp32"):
        decoders(bad)[mode](bad, PROMPTS, 10, SamplingParams(temperature), seeds=[1, 2, 3])


def overflow_after(model, row: int, calls: int):
    """Make the head give +inf logits for one batch row after its first `calls` decoding calls (the prefill
    does not use the head)."""
    real = model.head

    def head(h):
        out = real(h)
        head.calls += 1
        if head.calls > calls:
            out[row] = float("inf")
        return out

    head.calls = 0
    model.head = head


def test_a_row_that_overflows_later_is_named(tiny):
    """Only row 1's logits go non-finite, from its 4th new token on (prompt of 8 tokens: position 11): the error
    names that row and position, and the step never fed an out-of-vocabulary index to the embedding on the way."""
    model = tiny_model("tiny", seed=3)
    model.load_state_dict(tiny.state_dict())
    overflow_after(model, row=1, calls=3)
    with pytest.raises(MinipassError, match="batch row 1 at token position 11"):
        ar_decode(model, PROMPTS, 10, SamplingParams(0.8), seeds=[1, 2, 3])


def test_finished_rows_are_not_checked(tiny):
    """A row that stopped is not checked any more: what it computes is discarded."""
    first = ar_decode(tiny, PROMPTS, 1).tokens[2][0]
    want = ar_decode(tiny, PROMPTS, 6, stop_ids=[first]).tokens
    assert want[2] == [first] and len(want[0]) > 1  # row 2 stops at once, row 0 goes on
    model = tiny_model("tiny", seed=3)
    model.load_state_dict(tiny.state_dict())
    overflow_after(model, row=2, calls=1)  # row 2's one token
    assert ar_decode(model, PROMPTS, 6, stop_ids=[first]).tokens == want


@pytest.mark.parametrize("mode", ["ar", "pass1", "tree"])
def test_prefill_time_is_what_comes_before_the_first_step(tiny, mode, monkeypatch):
    """stats.prefill_s is the part of wall_s before the first step: 0.3 s more in the cache's set-up shows there,
    and not in the decoding part (wall_s - prefill_s)."""
    decode = decoders(tiny)[mode]
    decode(tiny, PROMPTS, 8)  # warm
    plain = decode(tiny, PROMPTS, 8).stats
    setup = tiny.setup_caches

    def slow_setup(*a, **k):
        import time

        time.sleep(0.3)
        return setup(*a, **k)

    monkeypatch.setattr(tiny, "setup_caches", slow_setup)
    slow = decode(tiny, PROMPTS, 8).stats
    assert 0 < plain.prefill_s < plain.wall_s and 0 < slow.prefill_s < slow.wall_s
    assert slow.prefill_s - plain.prefill_s >= 0.3
    assert abs((slow.wall_s - slow.prefill_s) - (plain.wall_s - plain.prefill_s)) < 0.15


def test_decode_stats_add_as_one_decode():
    a = dec.DecodeStats(calls=3, row_calls=5, tokens=9, accepted=[2, 1], attempted=[3, 2], wall_s=1.0, prefill_s=0.25)
    b = dec.DecodeStats(calls=1, row_calls=1, tokens=2, accepted=[1], attempted=[1], wall_s=0.5, prefill_s=0.125)
    s = a + b
    assert (s.calls, s.row_calls, s.tokens, s.wall_s, s.prefill_s) == (4, 6, 11, 1.5, 0.375)
    assert s.accepted == [3, 1] and s.attempted == [4, 2]  # per position, the shorter list read as zeros past its end
    assert (dec.DecodeStats() + a) == a
