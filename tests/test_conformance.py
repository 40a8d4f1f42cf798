"""kernels/conformance.py on the project's own kernels (the quick grid), and that it catches broken ports."""

import io
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest

pytestmark = pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")  # the broken ports

from kernels import conformance as C
from kernels.attention import attention
from kernels.kv_cache import reshape_and_cache, reshape_and_cache_ref


def _assert_all_pass(results):
    out = io.StringIO()
    C.print_table(results, file=out)
    assert results and all(r.ok for r in results), out.getvalue()
    assert any(r.status == "pass" for r in results)
    return out.getvalue()


def test_own_attention_conforms():
    table = _assert_all_pass(C.SECTIONS["attention"]("quick", None))
    assert "attention: " in table and "attention split-K: " in table


def test_own_writer_conforms():
    _assert_all_pass(C.check_reshape_and_cache(reshape_and_cache, "quick"))


def test_table_lists_every_case_and_a_count_per_section():
    results = [C.Result("attention", "case a", "pass", "max err 1e-07"), C.Result("attention", "case b", "FAIL", "x"),
               C.Result("attention", "case c", "skip", "no bf16 on CPU"), C.Result("accept", "k=3", "pass")]
    out = io.StringIO()
    C.print_table(results, file=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split() == ["section", "case", "result", "detail"]
    assert "attention: 1 passed, 1 failed, 1 skipped" in lines and "accept: 1 passed, 0 failed, 0 skipped" in lines
    assert not results[1].ok and results[2].ok


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
