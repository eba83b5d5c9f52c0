"""af3's C kernel for few-row products with bf16, fp16 and int8 weights: built at first use, checked against float64
products, and taken by Linear and int8_linear where oneDNN has no native kernel (AVX2 CPUs)."""

from __future__ import annotations

import logging
import platform
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from af3.kernels import binding as cpu_kernels
from af3.kernels import policy
from af3.kernels.policy import HALF_DTYPES
from af3.model import linear
from af3.model import quantize as Q
from af3.system import cpuinfo


def _can_build() -> bool:
    flags = set((cpuinfo("flags") or "").split())
    return platform.machine() == "x86_64" and shutil.which("cc") is not None and {"avx2", "fma", "f16c"} <= flags


needs_kernel = pytest.mark.skipif(not cpu_kernels.available(),
                                  reason="af3's CPU kernel needs an x86 CPU with AVX2 and a C compiler")


def test_the_kernel_builds_wherever_it_can():
    # Not a skip: on an x86 Linux machine with AVX2/FMA/F16C and a C compiler, the kernel must be there.
    assert cpu_kernels.available() == _can_build()


def _operands(rows: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """Random fp32 rows x [rows, k], scale and bias [n], and a weight [n, k] of each kind the kernel takes."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g)
    scale, bias = torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g)
    weights = {torch.bfloat16: torch.randn(n, k, generator=g).bfloat16(),
               torch.float16: torch.randn(n, k, generator=g).half(),
               torch.int8: torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)}
    return x, scale, bias, weights


@needs_kernel
@pytest.mark.parametrize("k", [2000, 3100, 8203])
def test_one_long_row_reads_four_weight_rows_at_once(k, build):
    """One fp32 row of many inputs multiplies four weight rows at once (tiles of 1 x 4) from WIDE_ROW_K inputs (3072
    for half weights, 8192 for int8; k = 2000 stays below both): every weight kind, on every build; n = 9 leaves one
    channel to the one-row loop, k = 8203 a tail of 3 inputs past the last whole 8."""
    x, scale, bias, weights = _operands(1, 9, k, k)
    for dtype, w in weights.items():
        want = (x.double() @ w.double().T) * scale.double() + bias.double()
        got = cpu_kernels.small_gemm(x, w, scale, bias)
        assert got.shape == (1, 9) and ((got.double() - want).abs() <= 1e-5 * want.abs().max()).all(), dtype


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 13, 31])
@pytest.mark.parametrize(("n", "k"), [(37, 29), (130, 264), (8, 8)])
def test_products_match_float64(rows, n, k):
    x, scale, bias, weights = _operands(rows, n, k, rows * 1000 + n)
    for dtype, w in weights.items():
        exact = x.double() @ w.double().T  # the weights are exact in float64; only fp32 summation differs
        got = cpu_kernels.small_gemm(x, w)
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        assert (got.double() - exact).abs().max() <= 1e-5 * exact.abs().max(), dtype
        got = cpu_kernels.small_gemm(x, w, scale, bias)
        want = exact * scale.double() + bias.double()
        assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), dtype


def test_the_bf16_row_products_take_the_fastest_instructions_this_cpu_has():
    flags = set((cpuinfo("flags") or "").split())
    want = 0
    if cpu_kernels.available() and "avx512_bf16" in flags:
        want = 2 if {"amx_bf16", "amx_tile"} <= flags else 1  # (AMX also needs the OS's permission, granted here)
    assert cpu_kernels.bf16_rows_level() == want


def test_the_int8_row_products_take_the_fastest_instructions_this_cpu_has():
    flags = set((cpuinfo("flags") or "").split())
    want = int(cpu_kernels.available() and {"avx512_bf16", "avx512vbmi"} <= flags)
    assert cpu_kernels.int8_rows_level() == want


@pytest.fixture(scope="module")
def no_vbmi_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernels-no-vbmi")  # one build without AVX512-VBMI for the module


@pytest.fixture(params=["native", "no-vbmi", "avx2"])
def int8_build(request, monkeypatch, avx2_cache, no_vbmi_cache):
    """The kernels as built for this CPU, without AVX512-VBMI (int8 weights widened to fp32 next to bf16 pair dot
    products, as on a Cooper Lake Xeon) and without AVX-512."""
    from conftest import _build_with

    if request.param == "no-vbmi":
        if cpu_kernels.int8_rows_level() == 0:
            pytest.skip("the native build already widens int8 weights")
        _build_with(monkeypatch, ("-mno-avx512vbmi",), no_vbmi_cache)
        assert cpu_kernels.int8_rows_level() == 0 and cpu_kernels.bf16_rows_level() >= 1
    elif request.param == "avx2":
        _build_with(monkeypatch, ("-mno-avx512f",), avx2_cache)
    yield request.param
    cpu_kernels._library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 23])
@pytest.mark.parametrize(("n", "k"), [(37, 29), (70, 200), (64, 128), (9, 8200)])
def test_int8_weights_times_bf16_rows_match_float64_on_each_build(rows, n, k, int8_build):
    """int8 weights times bf16 rows: each weight turned into bf16 by byte lookups (every value from -128 to 127),
    rows permuted per 64 inputs, tails of inputs (29, 200 = 3 x 64 + 8) and of channels; one row with k = 8200 reads
    4 weight rows at once (ROWS_TOGETHER_K), n = 9 leaving one channel to the one-row loop. Also the widening builds."""
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    x = torch.randn(rows, k, generator=g).bfloat16()
    w = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    w.view(-1)[:256] = torch.arange(-128, 128, dtype=torch.int8)[torch.randperm(256, generator=g)][: w.numel()]
    scale, bias = torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g)
    exact = x.double() @ w.double().T
    bound = k * 2**-24 * (x.double().abs() @ w.double().abs().T)  # an fp32 sum of k exact products
    got = cpu_kernels.small_gemm(x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert ((got.double() - exact).abs() <= bound).all()
    want = exact * scale.double() + bias.double()
    got = cpu_kernels.small_gemm(x, w, scale, bias, out_dtype=torch.bfloat16)
    slack = 2**-8 * want.abs() + bound * scale.double() + 2**-23 * bias.double().abs()
    assert ((got.double() - want).abs() <= slack).all()


@needs_kernel
@pytest.mark.parametrize("k", [29, 100, 2100, 8200])
@pytest.mark.parametrize("dtype", [torch.int8, torch.bfloat16])
def test_a_rows_tail_reads_nothing_past_its_inputs(k, dtype, int8_build):
    """The inputs past a row's last (the next row's, here infinite) must not reach its products, not even as 0 * inf:
    tails of 29, 100 (36 past the last whole 64), 52 and 8 inputs, for one row and several (8 bf16 rows of 2100
    inputs run in chunks of inputs, the last one ending in the tail; of 8200, as two tiles of 4 rows over the same
    weight rows)."""
    g = torch.Generator().manual_seed(k)
    x = torch.randn(8, k, generator=g).bfloat16()
    x[1:] = float("inf")
    w = (torch.randint(-128, 128, (9, k), generator=g, dtype=torch.int8) if dtype == torch.int8
         else torch.randn(9, k, generator=g).bfloat16())
    exact = x[0].double() @ w.double().T
    for rows in (x[:1], x[:3], x):
        got = cpu_kernels.small_gemm(rows, w)[0].double()
        assert ((got - exact).abs() <= k * 2**-24 * (x[0].double().abs() @ w.double().abs().T)).all()


@needs_kernel
@pytest.mark.parametrize("rows", [1, 2, 4, 5, 7, 8, 13, 16, 17])
@pytest.mark.parametrize(("n", "k"), [(37, 29), (200, 256), (64, 96), (9, 8200), (70, 2100)])
def test_bf16_rows_match_float64_on_each_build(rows, n, k, build):
    """bf16 rows times bf16 weights, on every path this CPU has: widened to fp32 (the AVX2 build), AVX512-BF16 pair
    dot products (one row; K % 32 != 0; 17 rows; one row with k = 8200 reading 4 weight rows at once, n = 9 leaving
    one channel to the one-row loop; 2 and 4 rows of 8200 inputs in tiles 4 channels wide, 5-8 as two such tiles
    over the same weight rows, 13 rows the second block of 8 so; 5-8 rows whose inputs do not fit in L1 in chunks of
    inputs for groups of channels: k = 2100, the last chunk ending in a step and a tail, n = 70 two groups and a
    second task of 6), AMX tile
    products (2-16 rows with K % 32 == 0, the channels past the last whole 16 by pair dot products: n = 200 is 3 x 64
    + 8)."""
    g = torch.Generator().manual_seed(rows * 1000 + n)
    x, w = torch.randn(rows, k, generator=g).bfloat16(), torch.randn(n, k, generator=g).bfloat16()
    scale, bias = torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g)
    exact = x.double() @ w.double().T  # bf16 products are exact; only the fp32 sums differ
    got = cpu_kernels.small_gemm(x, w)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert (got.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    want = exact * scale.double() + bias.double()
    for half, step in ((torch.bfloat16, 2**-8), (torch.float16, 2**-11)):  # rounded once to the output dtype
        got = cpu_kernels.small_gemm(x, w, scale, bias, out_dtype=half)
        assert ((got.double() - want).abs() <= step * want.abs() + 1e-5 * want.abs().max()).all(), half


@needs_kernel
@pytest.mark.parametrize("rows", range(24, 30))  # from PACK_ROWS: every height of the last row tile (6 rows each)
@pytest.mark.parametrize(("n", "k"), [(37, 29), (150, 600), (64, 256), (16, 8)])
def test_many_row_products_through_packed_panels_match_float64(rows, n, k):
    """Products of many rows widen the weight into panels of 16 channels, 256 inputs at a time (many_rows.h): tails
    of channels (37, 150), of inputs within a panel (29) and of chunks (600 = 256 + 256 + 88), and exact fits."""
    x, scale, bias, weights = _operands(rows, n, k, rows * 1000 + n + k)
    for dtype, w in weights.items():
        exact = x.double() @ w.double().T
        # an fp32 sum of k products is within k * 2^-24 of the sum of their magnitudes
        bound = k * 2**-24 * (x.double().abs() @ w.double().abs().T)
        got = cpu_kernels.small_gemm(x, w)
        assert got.shape == (rows, n) and ((got.double() - exact).abs() <= bound).all(), dtype
        want = exact * scale.double() + bias.double()
        got = cpu_kernels.small_gemm(x, w, scale, bias)
        slack = bound * scale.double() + 2**-23 * want.abs() + 2**-23 * bias.double().abs()
        assert ((got.double() - want).abs() <= slack).all(), dtype


@needs_kernel
@pytest.mark.parametrize("rows", [5, 30])  # the few-row tiles and the packed panels (each epilogue)
@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_half_inputs_operands_and_outputs_round_once(half, rows):
    g = torch.Generator().manual_seed(7)
    w = torch.randint(-127, 128, (70, 48), generator=g, dtype=torch.int8)
    x = torch.randn(rows, 48, generator=g).to(half)
    scale, bias = (torch.rand(70, generator=g) + 0.1).to(half), torch.randn(70, generator=g).to(half)
    wide = cpu_kernels.small_gemm(x.float(), w, scale.float(), bias.float())  # fp32 operands, fp32 result
    got = cpu_kernels.small_gemm(x, w, scale, bias, out_dtype=half)  # the same numbers given in half precision
    assert got.dtype == half
    full = cpu_kernels.small_gemm(x, w, scale, bias)
    assert torch.equal(got, full.to(half))  # the result is rounded once, as torch rounds
    if half == torch.bfloat16 and rows < 24 and cpu_kernels.int8_rows_level() == 1:
        # bf16 rows stay bf16 (int8_rows.h): the same exact products, summed in another order
        bound = 48 * 2**-24 * (x.double().abs() @ w.double().abs().T) * scale.double() + 2**-23 * full.double().abs()
        assert ((full.double() - wide.double()).abs() <= bound).all()
    else:  # half values widen exactly, so the fp32 sums are the same
        assert torch.equal(full, wide)
    nan = cpu_kernels.small_gemm(torch.full((rows, 48), float("nan")), w, out_dtype=half)
    assert torch.isnan(nan).all()
    with pytest.raises(ValueError, match="bias must be 70"):
        cpu_kernels.small_gemm(x, w, bias=torch.zeros(69))
    with pytest.raises(ValueError, match="out_dtype"):
        cpu_kernels.small_gemm(x, w, out_dtype=torch.int8)


@needs_kernel
def test_leading_dimensions_and_input_dtypes():
    w = torch.randn(24, 40).bfloat16()
    x = torch.randn(2, 3, 40)
    got = cpu_kernels.small_gemm(x.bfloat16(), w)
    assert got.shape == (2, 3, 24)
    assert torch.allclose(got, F.linear(x.bfloat16().float(), w.float()), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        cpu_kernels.small_gemm(torch.randn(1, 41), w)
    with pytest.raises(ValueError, match="contiguous CPU weight"):
        cpu_kernels.small_gemm(x, w.float())
    with pytest.raises(ValueError, match="contiguous CPU weight"):
        cpu_kernels.small_gemm(torch.randn(1, 24), w.T)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_takes_the_kernel_for_any_rows_without_a_native_half_gemm(dtype, monkeypatch, kernel_policy):
    kernel_policy(native_half=HALF_DTYPES - {dtype})  # as on an AVX2 CPU, whatever this one is
    calls, original = [], cpu_kernels.small_gemm
    monkeypatch.setattr(cpu_kernels, "small_gemm", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    torch.manual_seed(0)
    layer = linear.Linear(96, 40).to(dtype)
    x = torch.randn(4, 1, 96, dtype=dtype)  # [B, T=1, K]: four sequences decoding
    with torch.inference_mode():
        out = layer(x)
    assert calls and out.shape == (4, 1, 40) and out.dtype == dtype
    # fp32 products and sums rounded once: the same as converting everything to fp32 first
    whole = F.linear(x.float(), layer.weight.float(), layer.bias.float()).to(dtype)
    assert torch.allclose(out.float(), whole.float(), rtol=1e-2, atol=1e-2)
    assert torch.allclose(out.float(), F.linear(x, layer.weight, layer.bias).float(), rtol=1e-2, atol=1e-2)
    calls.clear()
    xs = torch.randn(2, 150, 96, dtype=dtype)  # a prefill: packed panels (many_rows.h), still the kernel
    with torch.inference_mode():
        many = layer(xs)
    assert calls
    whole = F.linear(xs.float(), layer.weight.float(), layer.bias.float()).to(dtype)
    assert torch.allclose(many.float(), whole.float(), rtol=1e-2, atol=1e-2)
    calls.clear()
    kernel_policy(native_half=HALF_DTYPES - {dtype}, kernel_rows=300)
    with torch.inference_mode():
        layer(xs)  # from kernel_rows on, the fp32 conversion path
    assert not calls
    kernel_policy(native_half=HALF_DTYPES, dp_rows=0)  # native half GEMMs, no pair dot products (AMX): torch's kernels
    with torch.inference_mode():
        layer(x)
    assert not calls


@needs_kernel
def test_int8_linear_takes_the_kernel_without_a_native_bf16_gemm(monkeypatch, kernel_policy):
    kernel_policy(native_half=frozenset())  # as on an AVX2 CPU
    calls, original = [], cpu_kernels.small_gemm
    monkeypatch.setattr(cpu_kernels, "small_gemm", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 45).to(torch.bfloat16)
    q = Q.Int8Linear.from_linear(lin)
    x = torch.randn(3, 64).to(torch.bfloat16)
    with torch.no_grad():
        y = Q.int8_linear(x, q.qweight, q.scales, q.bias)
    assert calls and y.dtype == torch.bfloat16 and y.shape == (3, 45)
    deq = q.qweight.double() * q.scales.double()[:, None]
    exact = x.double() @ deq.T + q.bias.double()
    assert torch.allclose(y.double(), exact, rtol=1e-2, atol=1e-2)  # one bf16 rounding of an fp32 result
    calls.clear()
    with torch.no_grad():
        Q.int8_linear(x, q.qweight, q.scales, q.bias, fused=False)  # forced fallback: not the kernel
    assert not calls
    many = torch.randn(200, 64).bfloat16()
    with torch.no_grad():
        y = Q.int8_linear(many, q.qweight, q.scales, q.bias)  # many rows: the kernel too
    assert calls and torch.allclose(y.double(), many.double() @ deq.T + q.bias.double(), rtol=1e-2, atol=1e-2)
    calls.clear()
    kernel_policy(native_half=frozenset(), kernel_rows=200)
    with torch.no_grad():
        Q.int8_linear(many, q.qweight, q.scales, q.bias)  # from kernel_rows on: dequantized
    assert not calls


def test_off_switch_missing_compiler_and_failed_build_fall_back(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("AF3_CACHE", str(tmp_path))
    off = policy.KernelPolicy.detect({"AF3_CPU_KERNELS": "0"})
    monkeypatch.setattr(cpu_kernels, "_library", lambda: pytest.fail("the off switch still reached the build"))
    assert not off.kernels_usable()
    assert not off.own_gemm(1, torch.bfloat16, torch.device("cpu"))
    assert not off.fused_decode_takes(1, torch.bfloat16, torch.device("cpu"))
    monkeypatch.undo()
    monkeypatch.setenv("AF3_CACHE", str(tmp_path))
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")  # reach the build step on any machine
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="af3.kernels.binding"):
        assert cpu_kernels._library.__wrapped__() is None
    assert "did not build" in caplog.text
    assert not list((tmp_path / "kernels").glob("*"))  # no half-written library left behind


@needs_kernel
def test_a_build_is_cached_and_reused(monkeypatch, tmp_path):
    monkeypatch.setenv("AF3_CACHE", str(tmp_path))
    compiler = shutil.which("cc")
    first = cpu_kernels._build(compiler)
    assert first.parent == tmp_path / "kernels" and first.is_file()

    def no_compiler(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(subprocess, "run", no_compiler)
    assert cpu_kernels._build(compiler) == first


@pytest.mark.parametrize(("vendor", "amd"), [("AuthenticAMD", True), ("GenuineIntel", False), (None, False)])
def test_the_build_names_an_amd_cpu(vendor, amd, monkeypatch):
    """``-march=native`` names no vendor, and the one-row pair dot products' software prefetch is tuned per vendor
    (bf16_rows.h's DP_AHEAD_BYTES): the build says AF3_AMD on AMD CPUs only, and the flags are part of the build's
    cache key."""
    monkeypatch.setattr(cpu_kernels, "cpuinfo", lambda field: vendor if field == "vendor_id" else None)
    flags = cpu_kernels.build_flags()
    assert flags[: len(cpu_kernels.FLAGS)] == cpu_kernels.FLAGS
    assert ("-DAF3_AMD" in flags) == amd and len(flags) == len(cpu_kernels.FLAGS) + amd


@pytest.mark.parametrize(("flags", "native", "dp"), [
    ("avx2 avx512f avx512_bf16", {torch.bfloat16}, True),  # AVX512-BF16 without AMX or VBMI (a Cooper Lake Xeon)
    ("avx2 avx512f avx512_bf16 avx512vbmi", {torch.bfloat16}, True),  # ... with VBMI (a Zen 4 EPYC)
    ("avx2 avx512f avx512_bf16 avx512vbmi amx_tile amx_bf16", {torch.bfloat16}, False),  # AMX: its own rules
    ("avx2 fma", set(), False),  # AVX2: no native bf16, af3's kernel for all few rows anyway
])
def test_detect_takes_the_pair_dot_product_rules_on_avx512_bf16_without_amx(flags, native, dp, monkeypatch):
    monkeypatch.setattr(policy, "cpuinfo", lambda field: flags if field == "flags" else None)
    monkeypatch.setattr(policy, "_native_half_dtypes", lambda: frozenset(native))
    got = policy.KernelPolicy.detect({})
    # int8 weights with bf16 rows: up to 23 rows where the byte lookups run (AVX512-BF16 and VBMI) without AMX
    lookups = "avx512_bf16" in flags and "avx512vbmi" in flags and "amx_bf16" not in flags
    assert got.int8_rows == (policy.INT8_DP_ROWS if lookups else policy.SMALL_ROWS)
    if dp:
        assert (got.dp_rows, got.packed_rows, got.gemv_rows) == (policy.DP_ROWS, policy.DP_ROWS, 0)
    else:
        assert got.dp_rows == 0 and got.packed_rows == policy.NATIVE_FUSED_ROWS
    cpu, bf16 = torch.device("cpu"), torch.bfloat16
    if dp:
        assert got.own_gemm(policy.DP_ROWS, bf16, cpu) == got.kernels_usable()
        assert not got.own_gemm(policy.DP_ROWS + 1, bf16, cpu)
    elif native:
        assert not got.own_gemm(1, bf16, cpu)  # native bf16 with AMX: torch's kernels (and the fused step)
