"""kernels/conformance.py, acceptance section: the project's own kernels pass every case of the quick grid, the grid
contains the cases it names (invalid rows, out-of-range drafts, ragged rows), and ports with a bug fail."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels import conformance  # noqa: E402
from kernels.acceptance import accept, accept_from_logits, accept_ref  # noqa: E402
from kernels.tree_acceptance import accept_tree, accept_tree_ref  # noqa: E402


def _failed(rows):
    return [f"{r['kernel']} {r['case']}: {r['detail']}" for r in rows if not r["ok"]]


def test_project_kernels_conform():
    rows = conformance.acceptance_rows(quick=True)
    assert not _failed(rows)
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"accept", "accept_from_logits", "accept_tree"}
    assert sum("flattened" in r["case"] for r in rows) >= 10
    table = conformance.format_table(rows)
    assert table.count("PASS") == len(rows) and "FAIL" not in table


def test_the_grid_holds_the_cases_it_names():
    """The named hazards are really in the inputs: invalid rows come out invalid, rows are ragged and accept runs of
    drafts, drafts outside the vocabulary occur."""
    grid = {name: inputs for name, inputs, _ in conformance._chain_grid(True, torch.device("cpu"), logits=False)}
    p, q, drafts, n, u_a, u_s = grid["B=7 K=3 V=45 fp32, invalid rows (NaN, +inf, -inf)"]
    _, j = accept_ref(p, drafts, n, u_a, u_s, q)
    assert (j == -1).any() and (j > 0).any()
    p, q, drafts, n, u_a, u_s = grid["B=6 K=5 V=63 fp32, drafts out of range"]
    assert ((drafts < 0) | (drafts >= 63)).any() and len(set(n.tolist())) > 2
    _, _, j = accept_tree_ref(*conformance._tree(6, 9, 50, torch.float32, seed=2, invalid=True))
    assert (j == -1).any() and (j > 0).any()


def test_ports_with_a_bug_fail():
    def no_invalid_rows(*args):
        tokens, j = accept(*args)
        return tokens, j.clamp_min(0)                               # reports invalid rows as 0 accepted

    rows = conformance.check_accept(no_invalid_rows, quick=True, flattened=False)
    failed = {r["case"] for r in rows if not r["ok"]}
    assert failed == {r["case"] for r in rows if "invalid" in r["case"]} and len(failed) >= 2
    assert all(r["detail"].startswith("output 1 differs first in row") for r in rows if not r["ok"])

    def greedy_only(target_logits, drafts, n, u_a, u_s, draft_logits, temperature, top_k, top_p):
        return accept_from_logits(target_logits, drafts, n, u_a, u_s, draft_logits, 0.0, 0, 1.0)

    rows = conformance.check_accept_from_logits(greedy_only, quick=True)
    assert any(not r["ok"] for r in rows) and all(r["ok"] for r in rows if "T=0.0" in r["case"])

    def raises(*args):
        raise RuntimeError("not ported yet")

    rows = conformance.check_accept_tree(raises, quick=True)
    assert all(not r["ok"] and r["detail"] == "raised RuntimeError: not ported yet" for r in rows)

    def wrong_path(*args):
        out, path, j = accept_tree(*args, check_values=False)
        return out, path.flip(-1), j

    rows = conformance.check_accept_tree(wrong_path, quick=True)
    assert any("output 1 differs" in r["detail"] for r in rows)
