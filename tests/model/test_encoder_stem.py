"""The audio encoder's convolution stem as GEMMs over unfolded windows (``AudioEncoder.stem``, taken in half
precision where oneDNN has native half GEMMs) against the convolutions it replaces and a float64 reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from af3.config import EncoderConfig
from af3.kernels import binding as cpu_kernels
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


@pytest.mark.parametrize("native", [True, False], ids=["native-half-gemms", "widened-to-fp32"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_stem_as_gemms_matches_the_convolutions(dtype, native):
    """Half-precision inference takes the GEMMs on every CPU: with oneDNN's native half GEMM (AVX-512-BF16/AMX),
    or where it has none (AVX2, where torch's half convolution is its slow generic path) in af3's kernel or in fp32
    over widened weights. Each is as close to float64 as torch's own half convolutions."""
    enc = _encoder()
    x = torch.randn(2, 16, 81)  # an odd length, as a cut window has (2 * cut + 1 frames)
    exact = F.gelu(enc.conv2.double()(F.gelu(enc.conv1.double()(x.double())))).transpose(1, 2)
    enc = enc.double().to(dtype)
    with torch.inference_mode():
        conv = F.gelu(enc.conv2(F.gelu(enc.conv1(x.to(dtype))))).transpose(1, 2)  # torch's half convolutions
        with policy.override(native_half=frozenset({dtype}) if native else frozenset()):
            assert policy.current().conv_as_gemm(x.to(dtype))
            assert policy.current().widens_half(dtype, x.device) is not native
            gemm = enc.stem(x.to(dtype))
    assert gemm.shape == conv.shape == exact.shape == (2, 41, 64)
    assert gemm.dtype == dtype and gemm.is_contiguous()
    err, err_conv = (gemm.double() - exact).abs(), (conv.double() - exact).abs()
    assert err.max() <= 2 * err_conv.max() + 1e-6
    assert err.mean() <= 1.2 * err_conv.mean() + 1e-6


@pytest.mark.parametrize("frames", [5, 81])
@pytest.mark.parametrize("kernels", [False, True], ids=["fp32-path", "af3-kernel"])
def test_a_stem_without_native_half_gemms_is_the_fp32_stem_rounded(kernels, frames, monkeypatch):
    """Where the CPU has no native half GEMMs (AVX2), the stem's products are fp32 products of the same half values,
    in af3's kernel (few-row tiles for 5 frames, packed panels for 81) or, without it, in torch's fp32 GEMM over a
    widened weight. Through the fp32 path they equal the fp32 convolutions rounded once; af3's kernel sums in
    another order, so it may round a value to a neighbour."""
    if kernels and not cpu_kernels.available():
        pytest.skip("af3's CPU kernel needs an x86 CPU with AVX2 and a C compiler")
    calls, original = [], cpu_kernels.small_gemm
    monkeypatch.setattr(cpu_kernels, "small_gemm", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    enc = _encoder().bfloat16()
    x = torch.randn(1, 16, frames).bfloat16()
    with torch.inference_mode(), policy.override(native_half=frozenset(), cpu_kernels=kernels):
        assert policy.current().conv_as_gemm(x)
        got = enc.stem(x)
        f32 = enc.float()
        h1 = F.gelu(f32.conv1(x.float()).bfloat16())
        want = F.gelu(f32.conv2(h1.float()).bfloat16()).transpose(1, 2)
    assert got.shape == (1, (frames + 1) // 2, 64) and len(calls) == (2 if kernels else 0)
    if kernels:  # within one bf16 step of the fp32 stem's value (and exact for nearly all)
        assert ((got.double() - want.double()).abs() <= 2**-7 * want.double().abs() + 1e-6).all()
        assert (got == want).double().mean() > 0.9
    else:
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_the_stem_stays_convolutions_in_fp32_and_with_autograd():
    enc = _encoder()
    x = torch.randn(1, 16, 81)
    with policy.override(native_half=frozenset({torch.bfloat16, torch.float16})):
        assert not policy.current().conv_as_gemm(x)  # fp32
        with torch.inference_mode():
            torch.testing.assert_close(enc.stem(x), F.gelu(enc.conv2(F.gelu(enc.conv1(x)))).transpose(1, 2),
                                       rtol=0, atol=0)
        assert not policy.current().conv_as_gemm(x.bfloat16())  # autograd on (a training step)
