"""kernels/conformance.py on the project's own kernels (the quick grid), that its grid holds the hazards it names, and
that it catches broken ports."""

import io
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the broken ports

from minipass.kernels import conformance as C
from minipass.kernels.acceptance import accept, accept_from_logits, accept_ref
from minipass.kernels.attention import attention
from minipass.kernels.kv_cache import reshape_and_cache, reshape_and_cache_ref
from minipass.kernels.tree_acceptance import accept_tree, accept_tree_ref


def _assert_all_pass(results):
    out = io.StringIO()
    C.print_table(results, file=out)
    assert results and all(r.ok for r in results), out.getvalue()
    assert any(r.status == "pass" for r in results)
    return out.getvalue()


def test_sections_are_the_kernels():
    assert list(C.SECTIONS) == ["attention", "reshape_and_cache", "accept", "accept_from_logits", "accept_tree"]


def test_own_attention_conforms():
    table = _assert_all_pass(C.SECTIONS["attention"]("quick", None))
    assert "attention: " in table and "attention split-K: " in table


def test_own_writer_conforms():
    _assert_all_pass(C.check_reshape_and_cache(reshape_and_cache, "quick"))


@pytest.mark.parametrize("section", ["accept", "accept_from_logits", "accept_tree"])
def test_own_acceptance_kernels_conform(section):
    results = C.SECTIONS[section]("quick", None)
    table = _assert_all_pass(results)
    assert {r.section for r in results} == {section}
    assert f"{section}: {sum(r.status == 'pass' for r in results)} passed, 0 failed" in table
    if section != "accept_tree":  # both forms of the chain kernels run
        assert sum(r.status == "pass" and r.case.startswith("flattened") for r in results) >= 5
        assert sum(r.status == "pass" and r.case.startswith("padded") for r in results) >= 6


def test_table_lists_every_case_and_a_count_per_section():
    results = [C.Result("attention", "case a", "pass", "max err 1e-07"), C.Result("attention", "case b", "FAIL", "x"),
               C.Result("attention", "case c", "skip", "no bf16 on CPU"), C.Result("accept", "k=3", "pass")]
    out = io.StringIO()
    C.print_table(results, file=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["section", "case", "result", "detail"]
    assert "attention: 1 passed, 1 failed, 1 skipped" in lines and "accept: 1 passed, 0 failed, 0 skipped" in lines
    assert not results[1].ok and results[2].ok


def test_the_acceptance_grid_holds_the_cases_it_names():
    """The named hazards are really in the inputs: invalid rows come out invalid, rows are ragged and accept runs of
    drafts, drafts outside the vocabulary occur, the strided case is strided, logits tie at the top-k cut, trees
    have padding nodes and out-of-range candidates."""
    cases = {name: args for name, _, args in C.accept_cases("quick")}
    _, j = accept_ref(*cases["padded B=7 K=3 V=45 fp32, invalid rows (NaN, +inf, -inf)"])
    assert (j == -1).any() and (j > 0).any()
    _, drafts, n, *_ = cases["padded B=6 K=5 V=63 fp32, drafts out of range"]
    assert ((drafts < 0) | (drafts >= 63)).any() and len(set(n.tolist())) > 2
    assert sum(name.startswith("flattened") for name in cases) == 7  # all but "rows without mass", bf16 included

    strided = "padded B=4 K=3 V=300 fp32, strided inputs, int32 counts"
    p, drafts, n, u_a, u_s, q = cases[strided]
    assert not p.is_contiguous() and not q.is_contiguous() and not drafts.is_contiguous()
    assert n.dtype == torch.int32
    moved = C._on(torch.device("meta"), cases[strided])  # how the inputs reach the port's device
    assert [(t.stride(), t.storage_offset()) for t in moved] == [(t.stride(), t.storage_offset()) for t in
                                                                 cases[strided]]

    def ignores_strides(p, *args):  # reads p as if it were contiguous
        return accept_ref(p.as_strided(p.shape, torch.empty(p.shape).stride()), *args)

    failed = [r.case for r in C.check_accept(ignores_strides, "quick", "cpu") if not r.ok]
    assert failed == [strided]

    ties = 0
    for name, _, (t, *_, top_k, top_p) in C.accept_from_logits_cases("quick"):
        if top_k and name.startswith("padded"):
            s = t.float().reshape(-1, t.shape[-1]).sort(-1, descending=True).values
            ties += int((s[:, top_k - 1] == s[:, top_k]).sum())
    assert ties > 0

    trees = {name: args for name, _, args in C.accept_tree_cases("quick")}
    p, tokens, parents, u_a, u_s = trees["B=5 N=7 V=37 fp32"]
    assert (parents[:, 1:] == -1).any() and (parents[:, 1:] >= 0).any() and (tokens[:, 1:] >= 37).any()
    _, _, j = accept_tree_ref(*trees["B=6 N=9 V=50 fp32, invalid rows (NaN, +inf, -inf)"])
    assert (j == -1).any() and (j > 0).any()


def _ignores_the_mask(q, k, v, lens, mask, sm_scale=None, **kwargs):
    return attention(q, k, v, lens, None, sm_scale, **kwargs)


def _reads_past_the_length(q, k, v, lens, mask, sm_scale=None, **kwargs):
    return attention(q, k, v, lens + 1, mask, sm_scale, check_values=False, **kwargs)


def _wrong_page_order(q, k, v, lens, mask, sm_scale=None, block_table=None, **kwargs):
    if block_table is not None:
        block_table = block_table.flip(1).contiguous()
    return attention(q, k, v, lens, mask, sm_scale, check_values=False, block_table=block_table, **kwargs)


def _only_contiguous(q, k, v, lens, mask, sm_scale=None):
    return attention(q, k, v, lens, mask, sm_scale)


@pytest.mark.parametrize("port, failing_forms", [
    (_ignores_the_mask, None),
    (_reads_past_the_length, None),
    (_wrong_page_order, {"NHD paged", "HND paged"}),
    (_only_contiguous, {"NHD", "NHD paged", "HND paged"}),  # the keyword it lacks is a failure, with the error
])
def test_broken_ports_fail(port, failing_forms):
    results = C.check_attention(port, "quick")
    failed = [r for r in results if not r.ok]
    assert failed
    if failing_forms is not None:
        forms = {f for r in failed for f in C.ATTENTION_FORMS if f"[{f}]" in r.case}
        assert forms == failing_forms
        assert all(r.ok for r in results if not any(f"[{f}]" in r.case for f in failing_forms))


def test_forms_selects_what_a_port_supports():
    results = C.check_attention(_only_contiguous, "quick", forms=["HND"])
    _assert_all_pass(results)
    assert all(r.status == "skip" for r in results if "[HND]" not in r.case)


def test_broken_writer_fails():
    def off_by_one(key, value, k_cache, v_cache, slot_mapping, layout):
        reshape_and_cache_ref(key, value, k_cache, v_cache, torch.where(slot_mapping >= 0, slot_mapping + 1, -1)
                              % (k_cache.shape[0] * (k_cache.shape[1] if layout == "NHD" else k_cache.shape[2])),
                              layout)

    assert not all(r.ok for r in C.check_reshape_and_cache(off_by_one, "quick"))


def test_broken_accept_fails_in_the_invalid_rows():
    def no_invalid_rows(*args):
        tokens, j = accept(*args)
        return tokens, j.clamp_min(0)  # reports invalid rows as 0 accepted

    results = C.check_accept(no_invalid_rows, "quick", flattened=False)
    assert all(not r.case.startswith("flattened") for r in results)
    failed = {r.case for r in results if not r.ok}
    assert failed == {r.case for r in results if "invalid" in r.case and r.status != "skip"} and len(failed) >= 2
    assert all(r.detail.startswith("output 1 differs first in row") for r in results if not r.ok)


def test_greedy_only_accept_from_logits_fails_when_sampling():
    def greedy_only(target_logits, drafts, n, u_a, u_s, draft_logits, temperature, top_k, top_p):
        return accept_from_logits(target_logits, drafts, n, u_a, u_s, draft_logits, 0.0, 0, 1.0)

    results = C.check_accept_from_logits(greedy_only, "quick")
    assert any(not r.ok for r in results) and all(r.ok for r in results if "T=0.0" in r.case)


def test_broken_accept_tree_fails():
    def raises(*args):
        raise RuntimeError("not ported yet")

    ran = [r for r in C.check_accept_tree(raises, "quick") if r.status != "skip"]
    assert ran and all(r.status == "FAIL" and r.detail == "RuntimeError: not ported yet" for r in ran)

    def wrong_path(*args):
        out, path, j = accept_tree(*args, check_values=False)
        return out, path.flip(-1), j

    assert any("output 1 differs" in r.detail for r in C.check_accept_tree(wrong_path, "quick"))
