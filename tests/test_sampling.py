import pytest
import torch

from minipass.sampling import argmax


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compiled", [False, True])
def test_argmax_is_max_with_first_index(dtype, compiled):
    g = torch.Generator().manual_seed(0)
    # Few distinct values: many ties, where the first index must win as in Tensor.max.
    logits = torch.randint(-3, 4, (5, 7, 300), generator=g).to(dtype)
    logits[0, 0] = float("-inf")
    logits[1, 2, 299] = 10.0  # the max at the last index
    fn = torch.compile(argmax, fullgraph=True, dynamic=False) if compiled else argmax
    top, index = fn(logits)
    ref_top, ref_index = logits.max(-1)
    assert index.dtype == torch.long
    assert torch.equal(top, ref_top)
    assert torch.equal(index, ref_index)


def test_argmax_of_a_row_with_nan_is_in_range_and_its_max_is_nan():
    logits = torch.randn(3, 50)
    logits[1, 7] = float("nan")
    top, index = argmax(logits)
    assert torch.isnan(top[1]) and not torch.isnan(top[[0, 2]]).any()
    assert 0 <= int(index[1]) < 50
    assert torch.equal(index[[0, 2]], logits[[0, 2]].argmax(-1))
