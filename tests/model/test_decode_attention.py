"""af3's decoding attention for the torch modules (``ops.decode_attention``): the fused step's attention on every CPU
the kernels build for (and the AMX kernel where it runs), against float64 and SDPA, and the decoder taking it where
the policy says."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from af3.kernels import binding
from af3.kernels import ops as kernel_ops
from af3.kernels import policy

needs_kernels = pytest.mark.skipif(not binding.available(), reason="af3's CPU kernels do not build here")
AMX_CHOICES = [False, True] if kernel_ops.amx_attention_available() else [False]


def _case(b, h, g, s, dh, dtype, seed):
    """q [B, H, 1, Dh] (strided), k and v views of a longer cache [B, G, S + 7, Dh], and each row's valid prefix."""
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, 1, h, dh, generator=gen) * 2).to(dtype).transpose(1, 2)
    k = (torch.randn(b, g, s + 7, dh, generator=gen) * 2).to(dtype)[:, :, :s]
    v = torch.randn(b, g, s + 7, dh, generator=gen).to(dtype)[:, :, :s]
    kv_len = torch.randint(1, s + 1, (b,), generator=gen)
    kv_len[0] = s  # a full row, and (where b > 1) a row of one key
    if b > 1:
        kv_len[1] = 1
    return q, k, v, kv_len


@needs_kernels
@pytest.mark.parametrize("amx", AMX_CHOICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# (query heads per kv head: 7, 1, 7, 2, 16 and 9, which the value sums take in groups of at most 6)
@pytest.mark.parametrize(("b", "h", "g", "s", "dh"), [(3, 14, 2, 200, 64), (2, 4, 4, 37, 128), (4, 28, 4, 90, 40),
                                                      (1, 2, 1, 9, 8), (2, 16, 1, 50, 24), (2, 18, 2, 33, 16)])
def test_decode_attention_matches_float64_as_sdpa_does(b, h, g, s, dh, dtype, amx):
    q, k, v, kv_len = _case(b, h, g, s, dh, dtype, seed=s + dh)
    # (with amx, what the AMX kernel does not take, fp16 or Dh % 32, falls back to the fused step's attention)
    got = kernel_ops.decode_attention(q, k, v, kv_len, amx=amx)
    rep = h // g
    mask = (torch.arange(s)[None] < kv_len[:, None])[:, None, None, :]  # [B, 1, 1, S]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    exact = F.scaled_dot_product_attention(q.double(), kr.double(), vr.double(), attn_mask=mask)
    sdpa = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask)
    assert got.shape == (b, h, 1, dh) and got.dtype == dtype
    err, err_sdpa = (got.double() - exact).abs(), (sdpa.double() - exact).abs()
    assert err.max() <= 2 * err_sdpa.max() + 1e-6
    assert err.mean() <= 1.1 * err_sdpa.mean() + 1e-6
    # the row of one key returns that key's value exactly
    if b > 1:
        assert torch.equal(got[1, :, 0], v[1].repeat_interleave(rep, 0)[:, 0])
    got_scaled = kernel_ops.decode_attention(q, k, v, kv_len, amx=amx, scale=0.05)
    exact_scaled = F.scaled_dot_product_attention(q.double(), kr.double(), vr.double(), attn_mask=mask, scale=0.05)
    assert (got_scaled.double() - exact_scaled).abs().max() <= 2 * err_sdpa.max() + 1e-6


@needs_kernels
def test_decode_attention_refuses_what_it_cannot_take():
    q, k, v, kv_len = _case(2, 4, 2, 16, 64, torch.bfloat16, seed=1)
    for bad in ((q.half(), k, v, kv_len), (q[..., :60], k[..., :60], v[..., :60], kv_len),  # mixed dtypes; Dh % 8
                (q, k, v.contiguous()[:, :, :8], kv_len), (q.float(), k.float(), v.float(), kv_len),
                (q, k, v, kv_len[:1])):
        with pytest.raises(ValueError, match="do not fit"):
            kernel_ops.decode_attention(*bad)


@needs_kernels
def test_decoding_steps_take_it_where_the_policy_says_and_answer_as_with_sdpa(monkeypatch):
    """An Engine decoding 6 bf16 rows through the torch modules (the fused step off) reads its cache through af3's
    decoding attention where ``own_decode_attention`` says so (forced here with dp_rows > 0, the rule of CPUs with
    AVX512-BF16 and no AMX; on AMX machines the AMX kernel answers), riders of a mixed prefill too, and chooses the
    tokens SDPA's path chooses."""
    from af3 import AF3Model, AF3Processor
    from af3.cli import embedded_model_path
    from af3.generation.engine import Engine

    folder = str(embedded_model_path())  # the embedded model: head size 32, 4 query heads over 2 kv heads
    model, proc = AF3Model.from_pretrained(folder, dtype=torch.bfloat16), AF3Processor.from_pretrained(folder)
    convs = [[{"role": "user", "content": f"Tell me about the number {i}."}] for i in range(6)]
    calls = []
    real = kernel_ops.decode_attention
    monkeypatch.setattr(kernel_ops, "decode_attention", lambda *a, **k: calls.append(a[3].tolist()) or real(*a, **k))
    with policy.override(dp_rows=3, fused_decode="off"):
        got = [o.token_ids for o in Engine(model, proc, max_batch_size=6).generate(convs, max_new_tokens=12)]
        assert calls
    calls.clear()
    with policy.override(dp_rows=0, fused_decode="off"), monkeypatch.context() as m:
        m.setattr(policy.KernelPolicy, "amx_decode_attention", lambda *a, **k: False)
        want = [o.token_ids for o in Engine(model, proc, max_batch_size=6).generate(convs, max_new_tokens=12)]
        assert not calls
    assert got == want


def test_own_decode_attention_follows_the_cpu_class():
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    dp = policy.KernelPolicy(native_half=frozenset({bf16}), dp_rows=3)
    with torch.inference_mode():
        assert dp.own_decode_attention(bf16, cpu, 14, 2, 64) == binding.available()
        assert dp.own_decode_attention(torch.float16, cpu, 14, 2, 64) == binding.available()
        assert not dp.own_decode_attention(bf16, cpu, 14, 2, 60)  # Dh % 8
        assert not dp.own_decode_attention(torch.float32, cpu, 14, 2, 64)
        assert not dp.own_decode_attention(bf16, torch.device("meta"), 14, 2, 64)
        other = policy.KernelPolicy(native_half=frozenset({bf16}), dp_rows=0)  # AVX2 or AMX: SDPA or the AMX kernel
        assert other.own_decode_attention(bf16, cpu, 14, 2, 64) == other.amx_decode_attention(bf16, cpu, 14, 2, 64)
    with torch.enable_grad():
        assert not dp.own_decode_attention(bf16, cpu, 14, 2, 64)
