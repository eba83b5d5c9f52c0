"""The audio encoder's convolution stem as GEMMs over unfolded windows (``AudioEncoder.stem``, taken in half
precision where oneDNN has native half GEMMs) against the convolutions it replaces and a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from af3.config import EncoderConfig
from af3.kernels import policy
from af3.model.encoder import AudioEncoder


def _encoder() -> AudioEncoder:
    torch.manual_seed(0)
    enc = AudioEncoder(EncoderConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                                     num_mel_bins=16, max_source_positions=40)).eval()
    with torch.no_grad():
        for p in enc.parameters():
            p.normal_(0, 0.2)
    return enc


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_stem_as_gemms_matches_the_convolutions(dtype):
    enc = _encoder()
    x = torch.randn(2, 16, 81)  # an odd length, as a cut window has (2 * cut + 1 frames)
    exact = F.gelu(enc.conv2.double()(F.gelu(enc.conv1.double()(x.double())))).transpose(1, 2)
    enc = enc.double().to(dtype)
    with torch.inference_mode():
        with policy.override(native_half=frozenset({dtype})):
            assert policy.current().conv_as_gemm(x.to(dtype))
            gemm = enc.stem(x.to(dtype))
        with policy.override(native_half=frozenset()):
            assert not policy.current().conv_as_gemm(x.to(dtype))
            conv = enc.stem(x.to(dtype))
    assert gemm.shape == conv.shape == exact.shape == (2, 41, 64)
    assert gemm.dtype == dtype and gemm.is_contiguous()
    err, err_conv = (gemm.double() - exact).abs(), (conv.double() - exact).abs()
    assert err.max() <= 2 * err_conv.max() + 1e-6
    assert err.mean() <= 1.2 * err_conv.mean() + 1e-6


def test_the_stem_stays_convolutions_in_fp32_and_with_autograd():
    enc = _encoder()
    x = torch.randn(1, 16, 81)
    with policy.override(native_half=frozenset({torch.bfloat16, torch.float16})):
        assert not policy.current().conv_as_gemm(x)  # fp32
        with torch.inference_mode():
            torch.testing.assert_close(enc.stem(x), F.gelu(enc.conv2(F.gelu(enc.conv1(x)))).transpose(1, 2),
                                       rtol=0, atol=0)
        assert not policy.current().conv_as_gemm(x.bfloat16())  # autograd on (a training step)
