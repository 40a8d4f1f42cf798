"""The acceptance launchers as torch ops: torch.library's own op checks (schema, fake implementation, AOT
dispatch), torch.compile(fullgraph=True) graphs that hold each op as one node and give the eager result, and input
checks that run once per input signature. Under the Triton interpreter on CPU tensors."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from minipass.kernels import acceptance, tree_acceptance  # noqa: E402
from minipass.kernels.acceptance import accept, accept_from_logits  # noqa: E402
from minipass.kernels.tree_acceptance import accept_tree  # noqa: E402
from tests.util import compiled_graph_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, K, V, N = 3, 2, 20, 3


def _inputs(seed=0, B=B):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, K + 1, V, generator=g)
    q = torch.softmax(torch.randn(B, K, V, generator=g), -1)
    drafts = logits[:, :K].argmax(-1)
    n = torch.randint(0, K + 1, (B,), generator=g)
    u_a, u_s = torch.rand(B, K, generator=g), torch.rand(B, generator=g)
    parents = torch.tensor([[-1, 0, 0, 1]] * B)
    tree_tokens = torch.randint(0, V, (B, N + 1), generator=g)
    tree_p = torch.softmax(torch.randn(B, N + 1, V, generator=g), -1)
    tree_u = torch.rand(B, N + 1, generator=g)
    x = dict(logits=logits, q=q, drafts=drafts, n=n, u_a=u_a, u_s=u_s, parents=parents, tree_tokens=tree_tokens,
             tree_p=tree_p, tree_u=tree_u)
    return {k: v.to(DEVICE) for k, v in x.items()}


def _flat(x):
    n = x["n"].cpu()
    cu = torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)]).to(DEVICE)
    take = lambda t, extra: torch.cat([t[b, : int(n[b]) + extra] for b in range(len(n))])  # noqa: E731
    return take(x["logits"], 1), take(x["drafts"], 0), cu, take(x["u_a"], 0)


def test_opcheck():
    """torch.library.opcheck: the schema, the autograd registration, the fake implementation against the real one
    (shapes, dtypes, strides) and AOT dispatch with dynamic shapes, for each op and both chain forms."""
    x = _inputs()
    p = torch.softmax(x["logits"], -1)
    logits_f, drafts_f, cu, u_a_f = _flat(x)
    calls = [
        (torch.ops.minipass.accept.default, (p, x["drafts"], x["n"], x["u_a"], x["u_s"], x["q"], True, None)),
        (torch.ops.minipass.accept.default,
         (torch.softmax(logits_f, -1), drafts_f, cu, u_a_f, x["u_s"], None, False, None)),
        (torch.ops.minipass.accept_from_logits.default,
         (x["logits"], x["drafts"], x["n"], x["u_a"], x["u_s"], None, 0.7, 3, 0.9, True, None)),
        (torch.ops.minipass.accept_from_logits.default,
         (logits_f, drafts_f, cu, u_a_f, x["u_s"], None, 0.0, 0, 1.0, True, None)),
        (torch.ops.minipass.accept_tree.default,
         (x["tree_p"], x["tree_tokens"], x["parents"], x["tree_u"], x["u_s"], True, None)),
    ]
    for op, args in calls:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


def _step_accept(logits, drafts, n, u_a, u_s, q):
    p = torch.softmax(logits / 0.8, -1)
    tokens, num_accepted = accept(p, drafts, n, u_a, u_s, q)
    return tokens, num_accepted + 1


def _step_logits(logits, drafts, n, u_a, u_s, q):
    tokens, num_accepted = accept_from_logits(logits, drafts, n, u_a, u_s, None, 0.7, 5, 0.9)
    return tokens.clamp_min(0), num_accepted


def _step_tree(p, tokens, parents, u_a, u_s):
    out, path, num_accepted = accept_tree(p * 2, tokens, parents, u_a, u_s, check_values=False)
    return out, path, num_accepted.clamp_min(0)


@pytest.mark.parametrize("name", ["accept", "accept_from_logits", "accept_tree"])
def test_each_op_is_one_node_of_a_full_graph(name):
    x = _inputs()
    if name == "accept_tree":
        fn, args = _step_tree, (x["tree_p"], x["tree_tokens"], x["parents"], x["tree_u"], x["u_s"])
    else:
        fn = _step_accept if name == "accept" else _step_logits
        args = (x["logits"], x["drafts"], x["n"], x["u_a"], x["u_s"], x["q"])
    out, targets = compiled_graph_ops(fn, *args)
    op = getattr(torch.ops.minipass, name)
    assert targets.count(op) + targets.count(op.default) == 1
    assert not [t for t in targets if "triton" in str(t).lower()]
    expected = fn(*args)
    assert all(torch.equal(a, b) for a, b in zip(out, expected))


def test_flattened_form_compiles_too():
    x = _inputs()
    logits_f, drafts_f, cu, u_a_f = _flat(x)

    def step(logits, drafts, cu, u_a, u_s):
        return accept(torch.softmax(logits, -1), drafts, cu, u_a, u_s, check_values=False)

    out, targets = compiled_graph_ops(step, logits_f, drafts_f, cu, u_a_f, x["u_s"])
    assert targets.count(torch.ops.minipass.accept) + targets.count(torch.ops.minipass.accept.default) == 1
    assert all(torch.equal(a, b) for a, b in zip(out, step(logits_f, drafts_f, cu, u_a_f, x["u_s"])))


def test_inductor_compiles_a_step_calling_all_three_ops():
    """The default backend, fullgraph, dynamic batch size: the graph is compiled for B = 3 and reused for B = 5."""

    def step(logits, drafts, n, u_a, u_s, q, tree_p, tree_tokens, parents, tree_u):
        return _step_accept(logits, drafts, n, u_a, u_s, q) + _step_logits(logits, drafts, n, u_a, u_s, q) \
            + _step_tree(tree_p, tree_tokens, parents, tree_u, u_s)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    names = ["logits", "drafts", "n", "u_a", "u_s", "q", "tree_p", "tree_tokens", "parents", "tree_u"]
    for seed, rows in [(1, 3), (2, 5)]:
        x = _inputs(seed, rows)
        args = [x[k] for k in names]
        assert all(torch.equal(a, b) for a, b in zip(compiled(*args), step(*args)))


def test_input_checks_run_once_per_signature(monkeypatch):
    """The checks and launch parameters are cached by shapes, strides, dtypes and devices; a new signature is
    checked again, so a bad input is still refused."""
    calls = []
    for module in (acceptance, tree_acceptance):
        check = module._check_inputs
        monkeypatch.setattr(module, "_check_inputs", lambda *a, _check=check, **k: calls.append(1) or _check(*a, **k))
    acceptance._PLANS.clear()
    tree_acceptance._PLANS.clear()
    x = _inputs()
    p = torch.softmax(x["logits"], -1)
    for _ in range(3):
        accept(p, x["drafts"], x["n"], x["u_a"], x["u_s"], x["q"])
        accept_tree(x["tree_p"], x["tree_tokens"], x["parents"], x["tree_u"], x["u_s"])
    assert len(calls) == 2
    accept(p, x["drafts"].int(), x["n"], x["u_a"], x["u_s"], x["q"])          # a new dtype: checked again
    accept(p[:, :, ::2].contiguous(), x["drafts"], x["n"], x["u_a"], x["u_s"])  # a new shape
    assert len(calls) == 4
    with pytest.raises(ValueError, match=r"u_accept must have shape \(3, 2\), got \(3, 1\)"):
        accept(p, x["drafts"], x["n"], x["u_a"][:, :1], x["u_s"], x["q"])
    with pytest.raises(TypeError, match="u_sample must be float32, got torch.float64"):
        accept_tree(x["tree_p"], x["tree_tokens"], x["parents"], x["tree_u"], x["u_s"].double())
