"""The decoder's Linear: nn.Linear's parameters and results, with a GEMV-shaped path for few bf16 rows on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from af3.model.decoder import SMALL_ROWS, Linear


@pytest.mark.parametrize("rows", [1, 3, SMALL_ROWS, SMALL_ROWS + 1])
@pytest.mark.parametrize("bias", [True, False])
def test_few_bf16_rows_match_f_linear(rows, bias):
    torch.manual_seed(rows)
    layer = Linear(96, 40, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 1, 96, dtype=torch.bfloat16)  # [B, T=1, K]: decoding
    with torch.inference_mode():
        out = layer(x)
    exact = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    assert out.shape == (rows, 1, 40) and out.dtype == torch.bfloat16 and out.is_contiguous()
    # Within bf16 rounding of the result (both paths accumulate in fp32 and round once).
    assert torch.allclose(out.double(), exact, rtol=1e-2, atol=1e-2)
    ref = F.linear(x, layer.weight, layer.bias)
    assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_fp32_and_training_take_plain_f_linear():
    torch.manual_seed(0)
    layer = Linear(32, 16)
    x = torch.randn(2, 32)
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    half = Linear(32, 16).to(torch.bfloat16)
    xb = torch.randn(1, 32, dtype=torch.bfloat16, requires_grad=True)
    out = half(xb)
    assert torch.equal(out, F.linear(xb, half.weight, half.bias))
    out.sum().backward()
    assert half.weight.grad is not None and xb.grad is not None
    assert set(half.state_dict()) == {"weight", "bias"}
