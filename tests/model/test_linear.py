"""af3's Linear: nn.Linear's parameters and results, with a GEMV-shaped path for few bf16 rows and an fp32 path for
many half-precision rows on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from af3.kernels import policy
from af3.kernels.policy import HALF_DTYPES, SMALL_ROWS
from af3.model import linear
from af3.model.linear import Linear

CONVERT_ROWS = policy.current().convert_rows


@pytest.mark.parametrize("rows", [1, 3, SMALL_ROWS, SMALL_ROWS + 1])
@pytest.mark.parametrize("bias", [True, False])
def test_few_bf16_rows_match_f_linear(rows, bias, monkeypatch, kernel_policy):
    torch.manual_seed(rows)
    layer = Linear(96, 40, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 1, 96, dtype=torch.bfloat16)  # [B, T=1, K]: decoding
    calls, mv, mm = [], torch.mv, torch.mm
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append("mv") or mv(*a))
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append("mm") or mm(*a))
    # The path runs on every CPU here, not only AVX-512 (on AVX2 few rows would take af3's kernel instead).
    kernel_policy(gemv_rows=SMALL_ROWS, native_half=HALF_DTYPES, packed_weights=False, dp_rows=0)
    with torch.inference_mode():
        out = layer(x)
    assert calls == ([] if rows > SMALL_ROWS else ["mv"] if rows == 1 else ["mm"])
    exact = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
    assert out.shape == (rows, 1, 40) and out.dtype == torch.bfloat16 and out.is_contiguous()
    # Within bf16 rounding of the result (both paths accumulate in fp32 and round once).
    assert torch.allclose(out.double(), exact, rtol=1e-2, atol=1e-2)
    ref = F.linear(x, layer.weight, layer.bias)
    assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [CONVERT_ROWS, 300])
def test_many_half_rows_in_fp32_match_f_linear(rows, dtype, monkeypatch, kernel_policy):
    for name, value in (("CONVERT_CHUNK", 1000), ("PIECE_COLS", 1), ("OUTPUT_BLOCK", 1000)):
        monkeypatch.setattr(linear, name, value)  # several weight pieces and output row blocks
    calls, original = [], linear.linear_via_fp32
    monkeypatch.setattr(linear, "linear_via_fp32", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(rows)
    layer = Linear(96, 40).to(dtype)
    x = torch.randn(3, rows // 3 + 1, 96, dtype=dtype)
    # the path runs on every CPU here; af3's kernel takes every row count where it is usable, so: where it is not
    kernel_policy(native_half=HALF_DTYPES - {dtype}, cpu_kernels=False)
    with torch.inference_mode():
        out = layer(x)
    assert calls and out.shape == (3, rows // 3 + 1, 40) and out.dtype == dtype
    # The same fp32 products and sums as converting everything at once, rounded once to the half dtype.
    whole = F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(dtype)
    assert torch.allclose(out.float(), whole.float(), rtol=1e-2, atol=1e-2)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    assert torch.allclose(out.double(), exact, rtol=1e-2, atol=1e-2)
    assert torch.allclose(out.float(), F.linear(x, layer.weight, layer.bias).float(), rtol=1e-2, atol=1e-2)
    with torch.inference_mode():
        small = layer(x[:1, :2])  # fewer rows than convert_rows: not this path
    assert len(calls) == 1 and torch.allclose(small.float(), out[:1, :2].float(), rtol=1e-2, atol=1e-2)


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


def test_long_inputs_take_the_chunked_mlp_with_the_same_result(monkeypatch):
    from af3.config import TextConfig
    from af3.model import decoder

    cfg = TextConfig(vocab_size=100, hidden_size=32, intermediate_size=80, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    mlp = decoder.MLP(cfg)
    x = torch.randn(3, 50, 32)  # 150 positions
    whole = mlp(x)  # autograd on: the plain path
    calls = []
    mlp.down_proj.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[:2]))
    monkeypatch.setattr(decoder, "MLP_CHUNK", 40)
    with torch.inference_mode():
        chunked = mlp(x)
    assert calls == [(3, 13)] * 3 + [(3, 11)]  # 40 // 3 = 13 time steps per chunk, all rows together
    assert torch.allclose(chunked, whole, atol=1e-6, rtol=1e-5)
    calls.clear()
    y = torch.randn(1, 61, 32)
    with torch.inference_mode():
        got = mlp(y)
    assert calls == [(1, 31), (1, 30)]  # two chunks of equal size, not 40 + 21
    assert torch.allclose(got, mlp.down_proj(F.silu(mlp.gate_proj(y)) * mlp.up_proj(y)), atol=1e-6, rtol=1e-5)


def _packs_bf16() -> bool:
    """oneDNN on this CPU packs bf16 weights (it does where it has native bf16 kernels; on AVX2-only CPUs the
    reorder raises, and ``packed_weight`` falls back to the plain product)."""
    if not policy._has_packed_linear():
        return False
    try:
        torch.ops.mkldnn._reorder_linear_weight(torch.zeros(8, 8, dtype=torch.bfloat16), 16)
    except RuntimeError:
        return False
    return True


needs_bf16_packing = pytest.mark.skipif(not _packs_bf16(), reason="oneDNN packs bf16 weights only on CPUs with "
                                                                  "native bf16 (the fallback is tested on the others)")


@pytest.mark.skipif(not policy._has_packed_linear(), reason="this torch has no oneDNN packed linear")
@pytest.mark.parametrize("rows", [16, 300])
def test_packed_weights_match_f_linear_and_follow_weight_changes(rows, monkeypatch, kernel_policy):
    from af3.model import linear as L

    torch.manual_seed(rows)
    layer = Linear(96, 40, bias=True).to(torch.bfloat16)
    x = torch.randn(rows, 96, dtype=torch.bfloat16)
    kernel_policy(native_half=HALF_DTYPES, packed_weights=True, gemv_rows=SMALL_ROWS)
    exact = F.linear(x.double(), layer.weight.double(), layer.bias.double())
    with torch.inference_mode():
        out = layer(x)
    # the packed copy served the product; where oneDNN cannot pack bf16 (AVX2), none was made and the plain one did
    assert (L._PACKED[layer][1] is not None) == _packs_bf16()
    assert torch.allclose(out.double(), exact, rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        layer.weight.mul_(-1)  # an in-place change (a loaded checkpoint, a merged adapter): packed again
    with torch.inference_mode():
        flipped = layer(x)
    assert torch.allclose(flipped.double(), F.linear(x.double(), layer.weight.double(), layer.bias.double()),
                          rtol=1e-2, atol=1e-2)
    monkeypatch.setattr(L, "available_memory", lambda device: 1 << 20)  # no room for a copy: the plain product
    other = Linear(96, 40, bias=False).to(torch.bfloat16)
    with torch.inference_mode():
        plain = other(x)
    assert L._PACKED[other][1] is None
    assert torch.allclose(plain.double(), F.linear(x.double(), other.weight.double()), rtol=1e-2, atol=1e-2)


@needs_bf16_packing
def test_packed_copies_leave_an_eighth_of_the_ram_free(monkeypatch, kernel_policy):
    from af3.model import linear as L

    kernel_policy(native_half=HALF_DTYPES, packed_weights=True, gemv_rows=SMALL_ROWS)
    monkeypatch.setattr(L, "physical_memory", lambda: 64 << 30)  # 64 GiB of RAM: 8 GiB stay free
    assert L.pack_reserve() == 8 << 30
    monkeypatch.setattr(L, "physical_memory", lambda: 4 << 30)  # a small machine: at least 2 GiB
    assert L.pack_reserve() == 2 << 30
    x = torch.randn(32, 96, dtype=torch.bfloat16)
    size = 40 * 96 * 2
    for free, made in ((L.pack_reserve() + size - 1, False), (L.pack_reserve() + size + 1, True)):
        monkeypatch.setattr(L, "available_memory", lambda device, free=free: free)
        layer = Linear(96, 40, bias=False).to(torch.bfloat16)
        with torch.inference_mode():
            layer(x)
        assert (L._PACKED[layer][1] is not None) == made, free


@needs_bf16_packing
def test_native_half_rows_above_packed_rows_take_the_packed_copy_and_fewer_w_at_x(monkeypatch, kernel_policy):
    from af3.kernels.policy import NATIVE_FUSED_ROWS
    from af3.model import linear as L

    chosen = kernel_policy(native_half=HALF_DTYPES, packed_weights=True, gemv_rows=SMALL_ROWS, dp_rows=0,
                           packed_rows=NATIVE_FUSED_ROWS)
    assert chosen.packed_rows == NATIVE_FUSED_ROWS < SMALL_ROWS
    calls, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append("mm") or mm(*a))
    layer = Linear(96, 40, bias=False).to(torch.bfloat16)
    for rows, via_mm in ((NATIVE_FUSED_ROWS, True), (NATIVE_FUSED_ROWS + 1, False), (SMALL_ROWS, False)):
        calls.clear()
        L._PACKED.pop(layer, None)
        x = torch.randn(rows, 96, dtype=torch.bfloat16)
        with torch.inference_mode():
            out = layer(x)
        assert (calls == ["mm"]) == via_mm and (layer in L._PACKED) == (not via_mm), rows
        assert torch.allclose(out.double(), F.linear(x.double(), layer.weight.double()), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(not policy._has_packed_linear(), reason="this torch has no oneDNN packed linear")
@pytest.mark.parametrize("bias", [True, False])
def test_few_native_bf16_rows_take_afs_kernel_where_dp_rows_says(bias, monkeypatch, kernel_policy):
    """CPUs with AVX512-BF16 and no AMX: up to dp_rows bf16 rows go through af3's kernel, more through the packed
    copy, never W @ x.T; fp16 (no pair dot products) never takes the kernel there."""
    from af3.kernels import binding
    from af3.model import linear as L

    if not binding.available():
        pytest.skip("af3's CPU kernels do not build here")
    kernel_policy(native_half=HALF_DTYPES, packed_weights=True, gemv_rows=0, dp_rows=3, packed_rows=3)
    calls, own, mm, mv = [], binding.small_gemm, torch.mm, torch.mv
    monkeypatch.setattr(L.cpu_kernels, "small_gemm", lambda *a, **k: calls.append("own") or own(*a, **k))
    monkeypatch.setattr(torch, "mm", lambda *a: calls.append("mm") or mm(*a))
    monkeypatch.setattr(torch, "mv", lambda *a: calls.append("mv") or mv(*a))
    torch.manual_seed(int(bias))
    for dtype in (torch.bfloat16, torch.float16):
        layer = Linear(96, 40, bias=bias).to(dtype)
        for rows in (1, 2, 3, 4, 8):
            calls.clear()
            L._PACKED.pop(layer, None)
            x = torch.randn(rows, 1, 96, dtype=dtype)
            with torch.inference_mode():
                out = layer(x)
            own_path = dtype == torch.bfloat16 and rows <= 3
            assert calls == (["own"] if own_path else []), (dtype, rows)
            assert (layer in L._PACKED) == (rows > 3), (dtype, rows)
            exact = F.linear(x.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())
            assert out.shape == (rows, 1, 40) and out.dtype == dtype
            assert torch.allclose(out.double(), exact, rtol=1e-2, atol=1e-2), (dtype, rows)


def test_the_fp32_product_cuts_a_weight_into_equal_pieces():
    """linear_via_fp32 cuts columns (and rows) into the fewest pieces of at most the cap, all of one size but the
    last (which is short by less than the piece count), never a full run of pieces and a sliver."""
    assert linear.even_pieces(4864, (1 << 22) // 896) == 2432  # a gate projection: 2 x 2432, not 4681 + 183
    assert linear.even_pieces(896, (1 << 22) // 4864) == 448  # a down projection: 2 x 448, not 862 + 34
    assert linear.even_pieces(3584, max((1 << 20) // 18944, 256)) == 256  # AF3-8B's down: 14 x 256 channels
    assert linear.even_pieces(7, 0) == 1 and linear.even_pieces(10, 20) == 10
    for total in range(1, 120):
        for most in range(1, 40):
            size = linear.even_pieces(total, most)
            pieces = -(-total // size)
            assert size <= most and pieces == -(-total // most)  # within the cap, and no more pieces than needed
            assert total - (pieces - 1) * size >= size - pieces + 1  # the last piece is nearly full
