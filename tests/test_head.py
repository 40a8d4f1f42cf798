"""The head runs on the needed rows only, as one 2-D product on contiguous rows: the logits it gives are those of
the plain product over every row, in fp32 and bf16, for 3-D and strided inputs and for any choice of rows."""

import pytest
import torch
import torch.nn.functional as F

from tests.util import tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_on_selected_rows_gives_the_logits_of_all_rows(dtype):
    model = tiny_model("tiny-untied-mha", dtype=dtype)
    h = torch.randn(3, 7, model.args.dim, dtype=dtype)
    full = F.linear(h, model.lm_head.weight)  # the plain 3-D product
    torch.testing.assert_close(model.head(h), full)
    strided = h[:, ::2]  # a non-contiguous input goes through the same 2-D product
    torch.testing.assert_close(model.head(strided), full[:, ::2])
    x = torch.randint(0, model.args.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    model.setup_caches(2, 64)
    args = dict(input_pos=torch.arange(12).expand(2, -1), cache_seqlens=torch.zeros(2, dtype=torch.long))
    every = model(x, **args)
    idx = torch.tensor([[11, 0, 4], [3, 3, 10]])
    picked = model(x, logits_index=idx, **args)
    assert picked.shape == (2, 3, model.args.vocab_size)
    torch.testing.assert_close(picked, every.gather(1, idx[:, :, None].expand(-1, -1, every.shape[-1])))
