"""af3's one-pass row-wise kernels (``kernels/csrc/rowwise.c``: RMSNorm with the residual add, SiLU * up, rotary)
against the torch expressions of ``decoder.py`` they replace, and the decoder taking them only where they apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from af3.config import TextConfig
from af3.kernels import binding as cpu_kernels
from af3.kernels import ops as kernel_ops
from af3.kernels import policy
from af3.model import decoder as D

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(),
                                  reason="af3's CPU kernels need an x86 CPU with AVX2 and a C compiler")
HALVES = [torch.bfloat16, torch.float16]


def _ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units of the last place of ``a``'s dtype (bf16/fp16 bit patterns are monotonic per sign)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


@needs_kernel
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize(("rows", "dim"), [(1, 896), (37, 896), (5, 37), (300, 128)])
def test_rms_norm_matches_the_torch_norm(build, dtype, rows, dim):
    g = torch.Generator().manual_seed(rows + dim)
    norm = D.RMSNorm(dim, eps=1e-6).to(dtype)
    norm.weight.data = torch.randn(dim, generator=g).to(dtype)
    x = (torch.randn(2, rows, dim, generator=g) * 4).to(dtype)
    r = torch.randn(2, rows, dim, generator=g).to(dtype)
    with policy.override(cpu_kernels=False):  # the torch expression
        want, want_sum = norm(x), x + r
        want_after_add = norm(want_sum)
    got = kernel_ops.rms_norm(x, norm.weight, 1e-6)
    s, got_after_add = kernel_ops.rms_norm(x, norm.weight, 1e-6, residual=r)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.equal(s, want_sum)  # the add rounds exactly as torch's
    for a, b in ((got, want), (got_after_add, want_after_add)):
        # Only the fp32 sum of squares may be added in another order: h one step apart at most, and so w * h
        # (rounded again) at most two.
        assert int(_ulps(a, b).max()) <= 2
        assert (a == b).float().mean() > 0.97


@needs_kernel
@pytest.mark.parametrize("dtype", HALVES)
@pytest.mark.parametrize("n", [1, 7, 8, 15, 16, 17, 4864 * 3 + 5])
def test_silu_mul_matches_torch_bit_for_bit(build, dtype, n):
    g = torch.Generator().manual_seed(n)
    gate = (torch.randn(n, generator=g) * 5).to(dtype)
    up = torch.randn(n, generator=g).to(dtype)
    want = F.silu(gate) * up
    got = kernel_ops.silu_mul_(gate.clone(), up)
    assert torch.equal(got, want)


@needs_kernel
@pytest.mark.parametrize("dtype", HALVES)
def test_silu_mul_keeps_nan_and_signed_zero(build, dtype):
    gate = torch.tensor([float("nan"), 0.0, -0.0, 30.0, -30.0] * 4, dtype=dtype)
    up = torch.ones_like(gate)
    got = kernel_ops.silu_mul_(gate.clone(), up)
    want = F.silu(gate) * up
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


@needs_kernel
@pytest.mark.parametrize("dtype", HALVES)
def test_rotary_matches_apply_rotary_bit_for_bit(build, dtype):
    g = torch.Generator().manual_seed(3)
    b, t, h, dh = 2, 9, 6, 64
    rope = D.RotaryEmbedding(TextConfig(hidden_size=h * dh, num_attention_heads=h, num_key_value_heads=h))
    cos, sin = rope(torch.arange(b * t).view(b, t) * 7, dtype)  # [B, T, Dh]
    wide = (torch.randn(b, t, h * dh + 32, generator=g) * 3).to(dtype)
    for x in (wide[..., : h * dh].unflatten(-1, (h, dh)),
              torch.randn(b, t, h, dh, generator=g).to(dtype)):  # rows strided (a slice), then contiguous
        want = D.apply_rotary(x.transpose(1, 2), cos, sin)  # [B, H, T, Dh]
        got = kernel_ops.rotary(x, cos, sin)  # [B, T, H, Dh]
        assert got.is_contiguous() and torch.equal(got.transpose(1, 2), want)


@needs_kernel
@pytest.mark.parametrize("dtype", [*HALVES, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 151936])
def test_argmax_rows_is_torchs_argmax(build, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(7, n + 3, generator=g).to(dtype)[:, :n]  # strided rows, as logits sliced to the vocabulary
    x[1, n // 2] = x[1, n - 1] = 100.0  # a tie: the first index
    x[2] = float("-inf")  # nothing but -inf: index 0
    x[3, min(2, n - 1)] = x[3, 0] = float("nan")  # a NaN is the maximum; the first one wins
    x[4] = 0.5
    x[5] = float("-inf")
    x[5, n - 1] = -1e4  # the only finite value, in the tail or a vector lane
    assert kernel_ops.argmax_rows(x) == x.argmax(-1).tolist()


@needs_kernel
def test_bad_operands_are_refused():
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError):
        kernel_ops.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(ValueError):
        kernel_ops.silu_mul_(x, torch.ones(3, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError):
        kernel_ops.rotary(torch.randn(1, 2, 3, 24, dtype=torch.bfloat16), *[torch.ones(1, 2, 24)] * 2)


def test_the_policy_takes_them_only_for_half_cpu_inference():
    p = policy.KernelPolicy(cpu_kernels=True)
    x = torch.zeros(2, 4, dtype=torch.bfloat16)
    with torch.no_grad():
        assert p.rowwise(x) == cpu_kernels.available()
        assert not p.rowwise(x.float())
        assert not policy.KernelPolicy(cpu_kernels=False).rowwise(x)
    with torch.enable_grad():
        assert not p.rowwise(x)  # training keeps torch's ops (autograd)


def _small_decoder(dtype):
    cfg = TextConfig(vocab_size=64, hidden_size=128, intermediate_size=704, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = D.Qwen2Model(cfg)
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    return model.to(dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", HALVES)
def test_decoder_with_the_kernels_is_as_accurate_as_the_torch_decoder(dtype, monkeypatch):
    model = _small_decoder(dtype)
    exact = _small_decoder(torch.float32)  # the same weights (same seed), unrounded: the reference of both
    exact.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x = torch.randn(2, 600, 128).to(dtype)  # more than MLP_CHUNK positions: the chunked MLP too
    pos = torch.arange(600)[None].expand(2, -1)
    calls = {"rms_norm": 0, "silu_mul_": 0, "rotary": 0}
    for name in calls:
        real = getattr(kernel_ops, name)

        def spy(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(kernel_ops, name, spy)
    with torch.inference_mode():
        reference = exact(x.float(), pos)
        with policy.override(cpu_kernels=False):
            want = model(x, pos)
        assert not any(calls.values())
        got = model(x, pos)
    assert calls == {"rms_norm": 2 * 2 + 1, "silu_mul_": 2 * 3, "rotary": 2 * 2}  # 600 rows x2: 3 MLP chunks
    # Both round at the same points; they may differ where an fp32 sum is added in another order, so the kernel
    # path is as far from the fp32 model as torch's path is, not farther.
    err_kernels = (got.float() - reference).abs().mean()
    err_torch = (want.float() - reference).abs().mean()
    assert err_kernels <= 1.1 * err_torch
    assert (got.float() - want.float()).abs().max() <= 0.05 * reference.abs().max()
