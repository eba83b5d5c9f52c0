"""Which CPU kernel runs which product: decided once per process from the CPU and the environment.

Like ggml-cpu's feature detection, the facts are read once (the first time :func:`current` is called) into one
frozen :class:`KernelPolicy`; every dispatch (``model.linear.Linear``, ``model.quantize``, the generation runner's
choice of the fused decoding step) asks it, and nothing else reads ``$AF3_CPU_KERNELS`` or ``$AF3_FUSED_DECODE``.
Tests and benchmarks steer dispatch with :func:`override` (``with override(native_half=frozenset()): ...`` acts as
an AVX2 CPU would, whatever this one is) instead of patching module globals.

Why the rules are what they are (measurements in ``benchmarks/README.md``, ``benchmarks/gemv_bench.py``):

* CPUs without native bf16/fp16 matrix instructions (AVX2; oneDNN reports no support) run torch's half-precision
  GEMMs far below the fp32 ones. There af3's kernel multiplies half and int8 weights at every row count: below
  24 rows it widens the weight in registers (at memory bandwidth for a few rows), from 24 rows it widens a chunk at
  a time into fp32 panels multiplied in 6 x 16 register tiles (``kernels/csrc/many_rows.h``). On a 2-vCPU Zen 3
  EPYC (2026-12-07, products alone, interleaved, ms, af3's kernel / torch's fp32 GEMM over the weight widened in
  pieces, the fp32 path): the mid-size benchmark's 4864 x 896 at 32, 128, 780 and 3000 rows 3.2 / 4.9, 8.3 / 10.3,
  42.2 / 47.0, 163.5 / 202.2; its 896 x 4864 at 32 and 1500 rows 2.9 / 5.1, 81.0 / 84.2; AF3-8B's gate
  (18944 x 3584) at 32, 256 and 780 rows 38.0 / 60.2, 231.2 / 319.6, 750.9 / 768.1, its down projection at 32 and
  780 rows 40.9 / 88.0, 697.3 / 731.4, its 3584 x 3584 at 780 and 3000 rows 118.5 / 136.3, 520.4 / 564.3 (at 1500
  rows, the one point the fp32 path won, 261.1 / 254.7, and 231.0 / 252.6 in another run). So
  :data:`KERNEL_ROWS` sets no bound, and the fp32 path serves (from :data:`CONVERT_ROWS` rows, where it beats
  torch's half GEMM) only where af3's kernel is not usable. Before the panels the kernel re-read each weight block
  for every 4 rows (~90-100 GFLOP/s), and the fp32 path took over at 128 rows (2026-12-07, ``rows_bench``), at 32
  before that.
* The fused decoding step runs the same products; on that EPYC (``benchmarks/rows_bench.py``, decoding steps of the
  mid-size model alternating step by step on one batch, tok/s summed over the rows, fp32 path / af3's kernel in the
  modules / the fused step) 32 rows 60.8 / 87.3 / 106.2, 128 rows 89.7 / 134.3 / 143.7, 192 rows 100.0 / 128.1 /
  134.8, 256 rows 91.1 / 122.3 / 131.3; so it takes up to :data:`FUSED_ROWS` rows, the most measured.
* On AVX-512 CPUs ``W @ x.T`` reads a weight faster than ``F.linear`` for a few rows; on AVX2 it is slower.
* int8 weights: af3's few-row kernel reads them near memory bandwidth on every x86 CPU where it builds, native half
  GEMMs or not. On a 2-vCPU Xeon with AMX (``benchmarks/gemv_bench.py --only int8``, weights streamed from memory,
  2026-12-06) the 151936 x 896 lm_head at 1, 4 and 8 rows took 5.7, 8.9 and 15.6 ms in it against 10.5, 13.2 and
  25.1 in torch's fused ``_weight_int8pack_mm`` and 23-25 dequantized; at 16 rows the dequantized GEMM wins on every
  shape. So up to :data:`SMALL_ROWS` rows int8 products take af3's kernel; torch's fused kernel (vectorised for bf16
  activations only, its cost growing linearly with the rows) serves few rows where af3's kernels do not build;
  elsewhere the weight is dequantized in chunks and multiplied. Where the kernels turn int8 weights into bf16 by
  byte lookups and multiply bf16 rows with pair dot products (AVX512-BF16 + VBMI, ``binding.int8_rows_level``;
  fewer than 24 rows), they won at every count up to 23 on a 2-vCPU Zen 4 EPYC (2026-12-07, medians, ms, af3 /
  torch's fused kernel / dequantized): the 151936 x 896 lm_head at 1, 8, 16 and 23 rows 4.9 / 10.8 / 25.8, 11.7 /
  25.6 / 34.6, 20.1 / 50.8 / 45.7, 28.3 / 74.4 / 45.0; AF3-8B's 18944 x 3584 at 16 and 23 rows 8.8 / 19.1 / 15.4,
  12.1 / 26.1 / 18.2; the benchmark's 4864 x 896 at 23 rows 1.28 / 1.55 / 1.39. Whole decoding steps of the
  mid-size model (``rows_bench --int8``, tok/s, torch's products / af3's kernel in the modules / the fused step) 8
  rows 61.2 / 126.2 / 154.3, 16 rows 78.9 / 115.5 / 135.8, 23 rows 99.2 / 139.1 / 152.2. So there bf16 rows take
  it up to :data:`INT8_DP_ROWS` (:attr:`KernelPolicy.int8_rows`), and the fused step with int8 weights too; on AMX
  CPUs the crossover has not been measured with the lookups, and :data:`SMALL_ROWS` stays.
* The fused decoding step (every decoder layer in one C call) pays off where af3's few-row kernel is used anyway.
  Where oneDNN has native half GEMMs, it depends on how af3's kernels multiply bf16 rows there
  (``binding.bf16_rows_level``). Widening each weight to fp32, as on AVX2, it won only for few rows: on a 2-vCPU
  Xeon with AMX (``engine_bench --only crossover``, 2026-12-06) 1.33x, 1.65x and 1.27x torch's kernels' rate at 1, 2
  and 4 rows, 0.69x and 0.61x at 8 and 16, so ``auto`` takes it up to :data:`NATIVE_FUSED_ROWS` rows there. With
  AMX tile products for 2-16 bf16 rows (level 2) it won at every count, later the same day: 1.60x, 1.49x, 1.48x,
  1.37x and 1.27x at 1, 2, 4, 8 and 16 rows, so up to :data:`AMX_FUSED_ROWS` bf16 rows (the kernels take 16 rows
  per tile). Where they use AVX512-BF16 pair dot products without AMX (level 1, a 2-vCPU Zen 4 EPYC, 2026-12-06)
  it won at every count too: 1.45x, 1.31x, 1.61x, 1.22x and 1.09x at 1, 2, 4, 8 and 16 rows, so up to
  :data:`DP_FUSED_ROWS`. int8 weights go through af3's int8 kernel in the step, so up to :data:`SMALL_ROWS` rows, as
  :meth:`KernelPolicy.own_int8` (in-process: 55.0 against 47.8 tok/s at 8 rows, 86.1 against 92.7 at 16), or
  :data:`INT8_DP_ROWS` with the byte lookups (above).
  ``fused_decode="always"`` runs it on any x86 CPU where the kernels build (to measure or test it there).
* Where oneDNN has native half GEMMs (AVX-512-BF16/AMX), ``F.linear`` reorders the weight into oneDNN's blocked
  layout at every call, which costs more than the product itself for a batch of rows: a copy packed once
  (``torch.ops.mkldnn._reorder_linear_weight``) is 1.5-1.8x faster at 16-64 rows and no slower at 770. It serves
  from :attr:`KernelPolicy.packed_rows` + 1 rows: a whole decoding step of 6 or 8 rows ran 5-9% faster through it
  than through ``W @ x.T`` (2026-12-06, interleaved), and up to 4 rows the fused step runs anyway (below them, when
  it does not, ``W @ x.T``). ``$AF3_PACKED_WEIGHTS=0`` turns it off. The copy costs the weight's bytes again, so it
  is made only while the machine has room for it.
* CPUs with AVX512-BF16 and no AMX (a 2-vCPU Zen 4 EPYC, 2026-12-06, weights streamed from memory, ms per product):
  ``W @ x.T`` was the slowest path at every row count (151936 x 896 lm_head: 31-40 ms at 1-8 rows, ``F.linear``
  19-24, the packed copy 8.6-12.9, af3's pair dot products 6.8 / 7.9-9.6 / 9.7-10.3 / 11.1-11.6 at 1 / 2 / 3 / 4
  rows; 4864 x 896: 0.26-0.30 / 0.28-0.29 / 0.28-0.31 / 0.34 against packed 0.39 / 0.37 / 0.29 / 0.28). So there
  up to :data:`DP_ROWS` bf16 rows take af3's kernel, more the packed copy, and ``W @ x.T`` never
  (:attr:`KernelPolicy.dp_rows`): the batch-1 lm_head, outside the fused step, went from ``torch.mv`` to the kernel,
  and batch-1 decoding from 19.5 to 35.6 tok/s (``engine_bench``, benchmarks/README.md). (After the pair-dot-product
  tiles kept their accumulators in registers, the kernel and the packed copy were even from 3 to 8 rows.) Once the
  tiles were 2 wide where the rows stay in L1 and ran in chunks of inputs where they do not (2026-12-07), the kernel
  won again from 4 to 8 rows: the 151936 x 896 lm_head 1.03-1.33x the packed copy's speed (three runs), AF3-8B's
  152064 x 3584 one 0.94-1.29x (1.06-1.29x in two runs of three), from 10 rows 0.83-1.22x, at 16 0.88-0.94x. With
  the fused step taking the decoder's layers, that leaves the lm_head: batch 4, 6 and 8 of the benchmark model
  decoded 1.056x, 1.053x and 1.075x as fast with 8 as with 3 (medians of 6 alternating runs in one process, 48
  tokens). So :data:`DP_ROWS` is 8.
* Once the GEMMs are fast, torch's elementwise ops are a large share of a prefill: RMSNorm alone is six ops, each
  writing and reading back a tensor. af3's row-wise kernels (RMSNorm with the residual add, SiLU * up, rotary) do
  each in one pass, rounding where torch rounds, for any half-precision CPU inference (:meth:`KernelPolicy.rowwise`).
* torch's CPU flash attention multiplies bf16 blocks through generic GEMM calls; on CPUs with AMX-BF16 af3's
  attention kernel (tile products, keys packed once per head) takes prefills and the audio encoder
  (:meth:`KernelPolicy.amx_attention`), and decoding steps of the torch modules (five rows and more) read the cache
  straight into tiles (:meth:`KernelPolicy.amx_decode_attention`). On CPUs with AVX512-BF16 and no AMX the same
  prefill kernel runs over tiles emulated with pair dot products (``kernels/csrc/amx_emul.h``; on a 2-vCPU Zen 4
  EPYC 1.7-2.6x SDPA, where SDPA was 57% of a 5-minute prefill), and the decoding kernel is written in pair dot
  products directly (``kernels/csrc/decode_dp.h``; 8 rows over ~850 cached keys 0.165 ms against 0.25-0.27 in the
  fused step's generic attention and 0.30 over emulated tiles).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..system import cpuinfo

log = logging.getLogger(__name__)

#: The half-precision dtypes af3's CPU kernels take as activations.
HALF_DTYPES = frozenset({torch.bfloat16, torch.float16})
FUSED_MODES = ("auto", "always", "off")
#: Rows up to which CPU half-precision linears compute ``W @ x.T`` where that is faster (AVX-512).
SMALL_ROWS = 8
#: Where the CPU has no native half GEMMs (AVX2) and af3's kernel does not serve a product: from this many rows it
#: widens its half or int8 weight to fp32 in pieces and multiplies it with torch's fp32 GEMM, which is faster there
#: than torch's half GEMM (module docstring).
CONVERT_ROWS = 32
#: Where the CPU has no native half GEMMs: products of fewer rows than this take af3's kernel. No bound: it was
#: faster than the fp32 path at every count measured, 1 to 3000 rows (module docstring).
KERNEL_ROWS = sys.maxsize
#: The most rows a decoding step runs as one fused C call, in any mode (faster than the modules up to there, the
#: most measured; module docstring).
FUSED_ROWS = 256
#: Rows up to which ``fused_decode="auto"`` takes the fused step for a dtype with native CPU GEMMs (the measured
#: crossover, module docstring).
NATIVE_FUSED_ROWS = 4
#: On CPUs with AVX512-BF16 but no AMX: rows up to which a bf16 product takes af3's kernel (pair dot products)
#: rather than oneDNN's native GEMM (the measured crossover, module docstring).
DP_ROWS = 8
#: Rows up to which ``fused_decode="auto"`` takes the fused step for bf16 where the kernels multiply bf16 rows with
#: AMX tiles (``binding.bf16_rows_level() == 2``; the measured crossover, module docstring).
AMX_FUSED_ROWS = 16
#: The same where they multiply bf16 rows with AVX512-BF16's pair dot products and no AMX (``bf16_rows_level() == 1``).
DP_FUSED_ROWS = 16
#: Where the kernels multiply int8 weights by bf16 rows with byte lookups and pair dot products
#: (``binding.int8_rows_level() == 1``; they take fewer than 24 rows that way) and there is no AMX: rows up to which
#: an int8 product with bf16 activations takes af3's kernel, and the fused step with int8 weights runs (the measured
#: crossover, module docstring; on AMX CPUs, where oneDNN's dequantized GEMMs are faster and vdpbf16ps slower, the
#: crossover was 8 rows before the lookups and has not been measured since: SMALL_ROWS stays).
INT8_DP_ROWS = 23
#: Fewest queries for af3's AMX attention (it packs every key and value first; decoding keeps SDPA).
AMX_ATTENTION_QUERIES = 32
#: torch's fused int8 weight-only product: its name, and the only activation dtype it vectorises on CPU.
INT8PACK_OP = "aten::_weight_int8pack_mm"
INT8PACK_DTYPES = frozenset({torch.bfloat16})
#: Its bf16 CPU kernel returns garbage unless the reduction dimension is a multiple of this.
INT8PACK_K_MULTIPLE = 16


def _has_int8pack_cpu_kernel() -> bool:
    """This torch build registers a CPU kernel for ``_weight_int8pack_mm``."""
    try:
        return bool(torch._C._dispatch_has_kernel_for_dispatch_key(INT8PACK_OP, "CPU"))
    except RuntimeError:  # the op does not exist in this torch
        return False


def _has_packed_linear() -> bool:
    """torch has oneDNN and its packed linear ops (the ones Inductor's CPU weight freezing uses)."""
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _dp_without_amx() -> bool:
    """The CPU has AVX512-BF16 but no AMX-BF16 (af3's kernels then multiply bf16 rows with pair dot products)."""
    flags = set((cpuinfo("flags") or "").split())
    return "avx512_bf16" in flags and "amx_bf16" not in flags


def _int8_dp() -> bool:
    """The CPU has AVX512-BF16 and AVX512-VBMI (af3's kernels then multiply int8 weights by bf16 rows with byte
    lookups and pair dot products, ``int8_rows.h``)."""
    return {"avx512_bf16", "avx512vbmi"} <= set((cpuinfo("flags") or "").split())


def _native_half_dtypes() -> frozenset[torch.dtype]:
    """Half dtypes whose CPU matrix products oneDNN runs natively here (bf16/fp16 on AVX-512-BF16/AMX CPUs)."""
    native = set()
    for dtype, probe in ((torch.bfloat16, "_is_mkldnn_bf16_supported"), (torch.float16, "_is_mkldnn_fp16_supported")):
        try:
            if getattr(torch.ops.mkldnn, probe)():
                native.add(dtype)
        except (AttributeError, RuntimeError):  # this torch cannot tell: treat it as native and keep F.linear
            native.add(dtype)
    return frozenset(native)


@dataclass(frozen=True)
class KernelPolicy:
    """The dispatch rules of one process (see the module docstring)."""

    #: af3's C kernels may be used (``$AF3_CPU_KERNELS=0`` turns them off); they must also build (:func:`available`).
    cpu_kernels: bool = True
    #: ``"auto"``: the fused decoding step where af3's kernel runs; ``"always"``: on every x86 CPU where the
    #: kernels build; ``"off"``: never (``$AF3_FUSED_DECODE``).
    fused_decode: str = "auto"
    #: Half dtypes with native CPU GEMMs (torch's kernels are fast for them at every row count).
    native_half: frozenset = frozenset()
    #: Up to this many rows, CPU half-precision linears compute ``W @ x.T`` (AVX-512 only; 0 = never).
    gemv_rows: int = 0
    #: Where there is no native half GEMM: products of fewer rows take af3's kernel (when it is usable).
    kernel_rows: int = KERNEL_ROWS
    #: From this many rows, half weights without a native GEMM that af3's kernel does not take are widened to fp32
    #: and multiplied by torch.
    convert_rows: int = CONVERT_ROWS
    #: The fused decoding step takes at most this many rows (in every mode).
    fused_rows: int = FUSED_ROWS
    #: Up to this many rows, int8 weights with bf16 activations use torch's fused ``_weight_int8pack_mm`` on the
    #: CPU (its cost grows with the rows; beyond ~8 dequantize + GEMM wins); 0 = never (no such kernel here).
    int8pack_rows: int = 0
    #: Half weights with native GEMMs are multiplied through a oneDNN-packed copy (``$AF3_PACKED_WEIGHTS=0``: no).
    packed_weights: bool = False
    #: ``fused_decode="auto"`` with a native-GEMM dtype: the fused step up to this many rows (0 = never).
    native_fused_rows: int = NATIVE_FUSED_ROWS
    #: ``fused_decode="auto"`` for bf16 where the kernels multiply bf16 rows with AMX: the fused step up to these rows.
    amx_fused_rows: int = AMX_FUSED_ROWS
    #: The same where they multiply bf16 rows with AVX512-BF16's pair dot products and no AMX.
    dp_fused_rows: int = DP_FUSED_ROWS
    #: Products of more rows than this use the packed copy (where ``packed_weights`` and the dtype is native).
    packed_rows: int = NATIVE_FUSED_ROWS
    #: Up to this many rows, bf16 products take af3's kernel even though bf16 is native (CPUs with AVX512-BF16 and
    #: no AMX, where the kernel multiplies bf16 rows with pair dot products; 0 = never).
    dp_rows: int = 0
    #: Up to this many rows, products of int8 weights and bf16 activations take af3's kernel where half GEMMs are
    #: native (fp16 activations: up to :data:`SMALL_ROWS`), and so does the fused step with int8 weights.
    int8_rows: int = SMALL_ROWS

    def __post_init__(self) -> None:
        if self.fused_decode not in FUSED_MODES:
            raise ValueError(f"fused_decode must be one of {', '.join(FUSED_MODES)}, got {self.fused_decode!r}")

    @classmethod
    def detect(cls, environ: dict[str, str] | None = None) -> KernelPolicy:
        """The policy for this CPU and environment (``os.environ`` unless ``environ`` is given)."""
        env = os.environ if environ is None else environ
        fused = env.get("AF3_FUSED_DECODE", "auto")
        if fused not in FUSED_MODES:
            log.warning("AF3_FUSED_DECODE=%r is not one of %s: using auto", fused, ", ".join(FUSED_MODES))
            fused = "auto"
        gemv = SMALL_ROWS if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 0
        native = _native_half_dtypes()
        dp = DP_ROWS if torch.bfloat16 in native and _dp_without_amx() else 0
        # where bf16 rows meet pair dot products without AMX, W @ x.T is the slowest path at every row count
        return cls(cpu_kernels=env.get("AF3_CPU_KERNELS", "1") != "0", fused_decode=fused,
                   native_half=native, gemv_rows=0 if dp else gemv,
                   int8pack_rows=SMALL_ROWS if _has_int8pack_cpu_kernel() else 0,
                   packed_weights=env.get("AF3_PACKED_WEIGHTS", "1") != "0" and _has_packed_linear(),
                   dp_rows=dp, packed_rows=dp or NATIVE_FUSED_ROWS,
                   int8_rows=INT8_DP_ROWS if _int8_dp() and _dp_without_amx() else SMALL_ROWS)

    # ------------------------------------------------------------------ the rules
    def kernels_usable(self) -> bool:
        """af3's C kernels are allowed and built for this machine."""
        if not self.cpu_kernels:
            return False
        from .binding import available

        return available()

    def widens_half(self, dtype: torch.dtype, device: torch.device) -> bool:
        """``dtype`` is a half precision that this CPU has no native GEMMs for (AVX2): its products of many rows are
        faster in fp32 over a widened copy of the weight."""
        return device.type == "cpu" and dtype in HALF_DTYPES and dtype not in self.native_half

    def converts_to_fp32(self, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """A product of ``rows`` rows with ``dtype`` weights that af3's kernel does not take (:meth:`own_gemm`, asked
        first) runs in fp32 with the weight widened in chunks."""
        return rows >= self.convert_rows and self.widens_half(dtype, device)

    def own_gemm(self, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """A product of ``rows`` rows with ``dtype`` activations goes through af3's C kernel: where the dtype has
        no native GEMM (below :attr:`kernel_rows`, no bound by default), and for up to :attr:`dp_rows` bf16 rows where
        it has."""
        if device.type != "cpu" or dtype not in HALF_DTYPES:
            return False
        if dtype in self.native_half:
            return rows <= self.dp_rows and dtype == torch.bfloat16 and self.kernels_usable()
        return rows < self.kernel_rows and self.kernels_usable()

    def own_int8(self, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """A product of ``rows`` rows with ``dtype`` activations and an int8 weight goes through af3's C kernel:
        wherever half weights would, and on CPUs with native half GEMMs too up to :meth:`int8_kernel_rows` (neither
        oneDNN nor torch has a faster int8-weight product for few rows there; module docstring)."""
        return self.own_gemm(rows, dtype, device) or (
            device.type == "cpu" and dtype in HALF_DTYPES and rows <= self.int8_kernel_rows(dtype)
            and self.kernels_usable())

    def int8_kernel_rows(self, dtype: torch.dtype) -> int:
        """Where half GEMMs are native: the most rows of ``dtype`` activations that an int8 product (and the fused
        step with int8 weights) runs in af3's kernel."""
        return self.int8_rows if dtype == torch.bfloat16 else SMALL_ROWS

    def gemv(self, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """A half-precision product of ``rows`` rows runs as ``W @ x.T`` (after the two rules above declined)."""
        return device.type == "cpu" and rows <= self.gemv_rows and dtype in HALF_DTYPES

    def packed(self, rows: int, dtype: torch.dtype, device: torch.device) -> bool:
        """A product of ``rows`` rows with ``dtype`` weights runs through their oneDNN-packed copy (when there is
        room for it); up to ``packed_rows`` rows ``W @ x.T`` stays (as fast there in the model, without a copy)."""
        return (self.packed_weights and device.type == "cpu" and rows > self.packed_rows and dtype in HALF_DTYPES
                and dtype in self.native_half)

    def conv_as_gemm(self, x: torch.Tensor) -> bool:
        """The audio encoder's two convolutions on x run as GEMMs over unfolded windows: half-precision CPU inference.
        Where oneDNN has native half GEMMs: on a 2-vCPU AMX Xeon a 30 s window's bf16 conv1 took 6.8-7.2 ms as a
        convolution and 0.96-1.0 ms as a GEMM, conv2 3.5 against 2.3-2.5 ms (the same results). Where it has none
        (:meth:`widens_half`), torch runs a half convolution through its slow generic path: on a 2-vCPU Zen 3 EPYC
        (AVX2) AF3-8B's stem (1280 channels) took 23-25 s per 30 s window as convolutions and 0.13 s as GEMMs in
        fp32, the mid-size benchmark's (512) 1.5-2.2 s against 0.027 s. In fp32 the convolutions were faster (AMX
        Xeon: 4.1 against 4.4 ms, 7.9 against 9.3), so fp32 keeps them, as training does."""
        return x.device.type == "cpu" and x.dtype in HALF_DTYPES and not torch.is_grad_enabled()

    def rowwise(self, x: torch.Tensor) -> bool:
        """The decoder's row-wise steps on ``x`` (RMSNorm, SiLU * up, rotary) run as af3's one-pass C kernels
        (``kernels/csrc/rowwise.c``): half-precision CPU inference, where torch's several ops per step each write and
        read back a tensor (a 30 s prefill's norms, activations and rotations: ~100 ms of ~550 on a 2-vCPU Xeon)."""
        return (x.device.type == "cpu" and x.dtype in HALF_DTYPES and not torch.is_grad_enabled()
                and self.kernels_usable())

    def amx_attention(self, q: torch.Tensor) -> bool:
        """Attention of the queries q [B, H, T, Dh] runs in af3's AMX kernel (``kernels/csrc/attention.c``): bf16 CPU
        inference with at least :data:`AMX_ATTENTION_QUERIES` queries and Dh a multiple of 64, on a CPU with AMX-BF16
        (a 30 s encoder window's attention 6.9 against SDPA's 8.3 ms, an 800-token causal prefill's 1.8 against 3.1
        ms per layer on a 2-vCPU Xeon; ``benchmarks/README.md``) or with AVX512-BF16 alone, over emulated tiles (the
        encoder window 18.5 against 30.7 ms, the 800-token prefill 4.7 against 12.0 on a 2-vCPU Zen 4 EPYC)."""
        if (q.device.type != "cpu" or q.dtype != torch.bfloat16 or torch.is_grad_enabled() or q.dim() != 4
                or q.shape[2] < AMX_ATTENTION_QUERIES or q.shape[3] % 64 or q.shape[3] > 256
                or not self.kernels_usable()):
            return False
        from .ops import amx_attention_available

        return amx_attention_available()

    def amx_decode_attention(self, dtype: torch.dtype, device: torch.device, heads: int, kv_heads: int,
                             head_dim: int) -> bool:
        """A decoding step's attention (one query per row and head) runs in af3's AMX kernel: bf16 CPU inference, Dh
        a multiple of 32 up to 256, at most 16 query heads per kv head, a CPU with AMX-BF16 (16 rows over ~820 cached
        keys: 0.26 against SDPA's 0.76 ms per layer on a 2-vCPU Xeon) or with AVX512-BF16 alone, in pair dot products
        (``kernels/csrc/decode_dp.h``)."""
        if (device.type != "cpu" or dtype != torch.bfloat16 or torch.is_grad_enabled() or head_dim % 32
                or head_dim > 256 or heads % kv_heads or heads // kv_heads > 16 or not self.kernels_usable()):
            return False
        from .ops import amx_attention_available

        return amx_attention_available()

    def own_decode_attention(self, dtype: torch.dtype, device: torch.device, heads: int, kv_heads: int,
                             head_dim: int) -> bool:
        """A decoding step of the torch modules attends through af3's kernel (``ops.decode_attention``): the AMX
        kernel where :meth:`amx_decode_attention`, else (fp16, head sizes it does not take) the fused step's attention
        on CPUs with AVX512-BF16 and no AMX (half precision, Dh a multiple of 8). There, 8 rows over ~850 cached keys
        took 0.46 against SDPA's 0.52 ms, 16 rows 0.86 against 1.01, 8 rows over 3000 keys 1.56 against 2.01 (a
        2-vCPU Zen 4 EPYC; not measured on AVX2 CPUs, which keep SDPA)."""
        if self.amx_decode_attention(dtype, device, heads, kv_heads, head_dim):
            return True
        return (self.dp_rows > 0 and device.type == "cpu" and dtype in HALF_DTYPES and not torch.is_grad_enabled()
                and head_dim % 8 == 0 and heads % kv_heads == 0 and self.kernels_usable())

    def int8pack(self, rows: int, dtype: torch.dtype, k: int, device: torch.device) -> bool:
        """An int8 weight-only product (``k`` inputs, ``dtype`` activations) runs in torch's fused kernel."""
        return (device.type == "cpu" and rows <= self.int8pack_rows and dtype in INT8PACK_DTYPES
                and k % INT8PACK_K_MULTIPLE == 0)

    def fused_decode_takes(self, rows: int, dtype: torch.dtype, device: torch.device, int8: bool = False) -> bool:
        """A decoding step of ``rows`` rows in ``dtype`` may run as one fused C call (when the decoder is plain;
        ``int8``: its linear weights are int8)."""
        if self.fused_decode == "off" or device.type != "cpu" or dtype not in HALF_DTYPES or rows > self.fused_rows:
            return False
        if self.fused_decode == "always":
            return self.kernels_usable()
        if dtype in self.native_half:
            if not self.kernels_usable():
                return False
            from .binding import bf16_rows_level

            if int8:  # the step's int8 products run af3's int8 kernel: where the modules would too (own_int8)
                return rows <= self.int8_kernel_rows(dtype)
            level = bf16_rows_level() if dtype == torch.bfloat16 else 0
            return rows <= (self.amx_fused_rows if level >= 2 else self.dp_fused_rows if level == 1
                            else self.native_fused_rows)
        return self.own_gemm(rows, dtype, device)


_lock = threading.Lock()
_current: KernelPolicy | None = None


def current() -> KernelPolicy:
    """This process's policy (detected on first use)."""
    global _current
    if _current is None:
        with _lock:
            if _current is None:
                _current = KernelPolicy.detect()
    return _current


def set_policy(policy: KernelPolicy | None) -> None:
    """Replace the process's policy (``None``: detect it again on next use)."""
    global _current
    with _lock:
        _current = policy


@contextlib.contextmanager
def override(**changes) -> Iterator[KernelPolicy]:
    """Run a block under the current policy with some fields changed (tests, benchmarks); restored afterwards."""
    before = current()
    changed = dataclasses.replace(before, **changes)
    set_policy(changed)
    try:
        yield changed
    finally:
        set_policy(before)
