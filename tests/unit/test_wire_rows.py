"""The all_to_all dispatcher's wire format: activation + fp32 metadata per row, any dtype, any count."""

import pytest
import torch

from moe_pd.parallel.dispatch.all_to_all import pack_rows, unpack_rows


@pytest.mark.parametrize("dtype, fp8", [(torch.float32, False), (torch.bfloat16, False), (torch.float32, True),
                                        (torch.bfloat16, True)])
@pytest.mark.parametrize("rows", [0, 5])
def test_round_trip(dtype, fp8, rows):
    x = torch.randn(rows, 256).to(dtype)
    meta = torch.cat([torch.randint(-1, 8, (rows, 4)).float(), torch.rand(rows, 4)], dim=1)
    x_back, meta_back = unpack_rows(pack_rows(x, meta, fp8), 256, 8, dtype, fp8)
    assert x_back.dtype == dtype and x_back.shape == x.shape
    assert torch.equal(meta_back, meta)
    if fp8:
        torch.testing.assert_close(x_back.float(), x.float(), rtol=0.07, atol=0.02)
    else:
        assert torch.equal(x_back, x)
