"""af3's AMX attention (``kernels/csrc/attention.c``; on CPUs with AVX512-BF16 and no AMX the same kernel over
emulated tiles, ``amx_emul.h``) against torch's SDPA and an fp32 reference, and the encoder and decoder taking it
only where it applies."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from af3.kernels import ops as kernel_ops
from af3.kernels import policy

needs_amx = pytest.mark.skipif(not kernel_ops.amx_attention_available(),
                               reason="af3's tile attention needs a CPU with AMX-BF16 and AVX-512 or with AVX512-BF16 "
                                      "(and a C compiler)")
needs_amx_tiles = pytest.mark.skipif(not kernel_ops.amx_tiles_native(),
                                     reason="needs real AMX tiles (a CPU with AMX-BF16 and a C compiler)")


def _case(b, h, g, t, s, dh, seed):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, t, h, dh, generator=gen) * 2).bfloat16().transpose(1, 2)  # strided, as the models pass it
    k = (torch.randn(b, g, s + 5, dh, generator=gen) * 2).bfloat16()[:, :, :s]  # a view of a longer cache
    v = torch.randn(b, g, s, dh, generator=gen).bfloat16()
    return q, k, v


def _check(got, q, k, v, mask, scale=None):
    """As close to the fp32 attention of the same bf16 inputs as torch's bf16 SDPA is, and close to SDPA."""
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    exact = F.scaled_dot_product_attention(q.float(), kr.float(), vr.float(), attn_mask=mask, scale=scale)
    sdpa = F.scaled_dot_product_attention(q, kr, vr, attn_mask=mask, scale=scale)
    assert got.shape == sdpa.shape and got.dtype == torch.bfloat16
    err, err_sdpa = (got.float() - exact).abs(), (sdpa.float() - exact).abs()
    assert err.mean() <= 1.1 * err_sdpa.mean() + 1e-6
    assert err.max() <= 2 * err_sdpa.max() + 1e-6
    assert (got == sdpa).float().mean() > 0.6  # most values round to the same bf16


@needs_amx
@pytest.mark.parametrize(("b", "h", "g", "t", "s", "dh"), [(1, 8, 8, 1500, 1500, 64), (2, 4, 4, 37, 37, 128),
                                                           (1, 14, 2, 799, 799, 64), (3, 2, 1, 70, 70, 256)])
def test_full_attention_matches_sdpa(b, h, g, t, s, dh, tile_build):
    q, k, v = _case(b, h, g, t, s, dh, seed=t)
    _check(kernel_ops.attention(q, k, v), q, k, v, None)
    _check(kernel_ops.attention(q, k, v, scale=0.3), q, k, v, None, scale=0.3)


@needs_amx
@pytest.mark.parametrize(("t", "s", "start"), [(799, 799, 0), (100, 100, 0), (17, 17, 0), (300, 813, 513),
                                               (64, 1000, 936), (33, 40, 7)])
def test_causal_attention_with_an_offset_matches_sdpa(t, s, start, tile_build):
    q, k, v = _case(1, 14, 2, t, s, 64, seed=s + start)
    mask = torch.arange(s)[None, :] <= torch.arange(start, start + t)[:, None]  # [T, S]: query i at slot start + i
    _check(kernel_ops.attention(q, k, v, causal=True, q_start=start), q, k, v, mask)


@needs_amx
def test_key_padding_per_batch_row_matches_sdpa(tile_build):
    q, k, v = _case(3, 8, 8, 300, 300, 64, seed=5)
    lengths = torch.tensor([300, 71, 1])
    mask = (torch.arange(300)[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
    _check(kernel_ops.attention(q, k, v, kv_len=lengths), q, k, v, mask)


@needs_amx
# (where the tiles are emulated, decode_dp.h takes it: blocks of 16 keys for the scores; for p v up to 8 queries and
# 32 dimensions per pass, so rep 10 and Dh 96 leave partial passes, over blocks of 64 keys once a head's values pass
# 512 KB (1101 keys of 256), and odd lengths leave a half key pair)
@pytest.mark.parametrize(("b", "g", "rep", "s", "dh"), [(8, 2, 7, 834, 64), (15, 2, 7, 100, 64), (3, 4, 7, 50, 128),
                                                         (2, 1, 16, 33, 64), (4, 4, 1, 17, 256), (1, 2, 7, 1, 64),
                                                         (3, 1, 10, 45, 96), (2, 1, 10, 1101, 256),
                                                         (2, 4, 7, 300, 128)])
def test_decoding_attention_over_cache_prefixes_matches_sdpa(b, g, rep, s, dh, tile_build):
    gen = torch.Generator().manual_seed(s)
    cache_k = torch.randn(b + 1, g, s + 40, dh, generator=gen).bfloat16()  # a cache longer than the slots read
    cache_v = torch.randn(b + 1, g, s + 40, dh, generator=gen).bfloat16()
    cache_k[:, :, s:] = float("nan")  # slots past the view are never read
    cache_v[:, :, s:] = float("nan")
    k, v = cache_k[:b, :, :s], cache_v[:b, :, :s]
    q = torch.randn(b, g * rep, 1, dh, generator=gen).bfloat16()
    lengths = torch.randint(1, s + 1, (b,), generator=gen)
    lengths[0] = s
    for row in range(b):  # stale slots past a row's length are never read either
        cache_v[row, :, int(lengths[row]):s] = float("nan")
    mask = (torch.arange(s)[None, :] < lengths[:, None])[:, None, None, :]  # [B, 1, 1, S]
    got = kernel_ops.decode_attention(q, k, v, lengths)
    assert not got.isnan().any()
    v_clean = torch.where(mask.transpose(-1, -2).expand(-1, g, -1, dh), v, torch.zeros((), dtype=v.dtype))
    _check(got, q, k, v_clean, mask)


@needs_amx
def test_bad_operands_are_refused():
    q, k, v = _case(1, 4, 4, 40, 40, 64, seed=1)
    with pytest.raises(ValueError):
        kernel_ops.attention(q.float(), k, v)
    with pytest.raises(ValueError):
        kernel_ops.attention(q[..., :32], k[..., :32], v[..., :32])  # Dh 32: not a multiple of 64
    with pytest.raises(ValueError):
        kernel_ops.attention(q, k[:, :3], v[:, :3])  # 4 heads over 3 kv heads
    with pytest.raises(ValueError):
        kernel_ops.attention(q, k, v, kv_len=torch.tensor([3, 4]))


def test_the_policy_takes_it_only_for_many_bf16_queries_without_autograd():
    p = policy.KernelPolicy(cpu_kernels=True)
    q = torch.zeros(1, 4, policy.AMX_ATTENTION_QUERIES, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        assert p.amx_attention(q) == kernel_ops.amx_attention_available()  # False where there is no AMX
        assert not p.amx_attention(q[:, :, :-1])  # too few queries: SDPA
        assert not p.amx_attention(q.half())
        assert not p.amx_attention(q[..., :32])
        assert not policy.KernelPolicy(cpu_kernels=False).amx_attention(q)
    with torch.enable_grad():
        assert not p.amx_attention(q)


@needs_amx
def test_the_models_take_it_and_stay_as_accurate(monkeypatch):
    """The encoder (bidirectional, padded windows) and the decoder's prefill (causal GQA) run through the kernel and
    end as close to their fp32 selves as with torch's SDPA."""
    from af3.config import EncoderConfig, TextConfig
    from af3.model.decoder import Qwen2Model
    from af3.model.encoder import AudioEncoder

    calls = []
    real = kernel_ops.attention
    monkeypatch.setattr(kernel_ops, "attention", lambda *a, **k: calls.append(k) or real(*a, **k))
    torch.manual_seed(0)
    enc = AudioEncoder(EncoderConfig(num_mel_bins=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                     hidden_size=128, max_source_positions=200))
    dec = Qwen2Model(TextConfig(vocab_size=32, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2))
    for m in (enc, dec):
        for prm in m.parameters():
            prm.data.normal_(0, 0.1)
    feats = torch.randn(2, 16, 400)
    fmask = torch.zeros(2, 400, dtype=torch.long)
    fmask[0, :400], fmask[1, :230] = 1, 1
    x, pos = torch.randn(1, 300, 256), torch.arange(300)[None]
    with torch.inference_mode():
        ref = enc(feats, fmask), dec(x, pos)
        enc.bfloat16()
        dec.bfloat16()
        with policy.override(cpu_kernels=False):
            torch_out = enc(feats.bfloat16(), fmask), dec(x.bfloat16(), pos)
        assert not calls
        ours = enc(feats.bfloat16(), fmask), dec(x.bfloat16(), pos)
    assert len(calls) == 2 + 2  # every encoder and decoder layer
    assert calls[0]["kv_len"].tolist() == [200, 115] and calls[-1]["causal"]
    for got, want, exact in zip(ours, torch_out, ref, strict=True):
        assert (got.float() - exact).abs().mean() <= 1.1 * (want.float() - exact).abs().mean()


@needs_amx_tiles
def test_the_tile_layout_survives_a_small_caller(tmp_path):
    """amx.h's tiles_on() in a caller small enough for GCC to drop the layout's stores as dead (ldtilecfg reads them,
    which GCC 12 did not see without the barrier): compiled with the kernels' compiler and flags, a loop of tile
    products must run, and a product of tiles must give 32 * 2.0 * 3.0 in every lane."""
    import shlex
    import shutil
    import subprocess

    from af3.kernels import binding

    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    source = tmp_path / "tiles.c"
    source.write_text(f"""#include "{binding.KERNELS / 'amx.h'}"
#include <stdio.h>
#include <stdlib.h>
int main(int argc, char **argv) {{
    if (!amx_permitted()) return 3;
    const long n = argc > 1 ? atol(argv[1]) : 1000;
    uint16_t two[512], three[512];
    float acc[256];
    for (int i = 0; i < 512; i++) {{ two[i] = 0x4000; three[i] = 0x4040; }}  /* bf16 2.0 and 3.0 */
#pragma omp parallel num_threads(2)
    {{  /* only tile instructions after the layout: where GCC 12 dropped its stores */
        tiles_on();
        _tile_zero(0);
        _tile_zero(4);
        _tile_zero(6);
        for (long i = 0; i < n; i++) _tile_dpbf16ps(0, 4, 6);
        _tile_release();
    }}
    tiles_on();
    _tile_zero(0);
    _tile_loadd(4, two, 64);
    _tile_loadd(6, three, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_stored(0, acc, 64);
    _tile_release();
    for (int i = 0; i < 256; i++) if (acc[i] != 192.0f) return 4;
    puts("ok");
    return 0;
}}
""")
    exe = tmp_path / "tiles"
    flags = [f for f in binding.FLAGS if f not in ("-shared", "-fPIC")]
    subprocess.run([*shlex.split(compiler), *flags, "-o", str(exe), str(source)], check=True, timeout=120)
    run = subprocess.run([str(exe)], check=False, capture_output=True, text=True, timeout=60)
    assert (run.returncode, run.stdout.strip()) == (0, "ok")
