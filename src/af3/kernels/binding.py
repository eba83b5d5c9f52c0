"""af3's own CPU kernels: products with bf16, fp16 or int8 weights (``kernels/small_gemm.c``), a
whole decoding step of the Qwen2 decoder (``kernels/decode_step.c``), and the library's build and loading for the
decoder's row-wise steps (``kernels/rowwise.c``) and AMX attention (``kernels/attention.c``), whose Python entry
points are in :mod:`.ops`.

On x86 CPUs without native bf16/fp16 matrix instructions (AVX2 only; oneDNN reports no bf16 support), torch's
half-precision ``F.linear`` with a handful of rows reads the weight at a fraction of memory bandwidth, and decoding
is bound by reading weights (``benchmarks/gemv_bench.py``). The C kernel loads each weight vector once, widens it to
fp32 in registers and multiplies it into up to 4 rows at a time, accumulating in fp32; from 24 rows it widens the
weight into fp32 panels a chunk at a time instead (``kernels/csrc/many_rows.h``).

The kernel is compiled at first use with the system C compiler (``$CC``, else ``cc``/``gcc``) and
``-O3 -march=native`` for the machine it runs on, then cached under ``$AF3_CACHE`` (default
``~/.cache/af3``)/``kernels``, keyed by the source, the flags and the CPU's feature flags. It is loaded with
``ctypes``; no Python headers or build tools beyond a C compiler with OpenMP are needed. Without a compiler, on
other architectures or on CPUs without AVX2/FMA/F16C, :func:`available` is False and af3 keeps torch's kernels
(``AF3_CPU_KERNELS=0`` is read by :mod:`.policy`, which then never calls this module).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from ..system import cpuinfo

log = logging.getLogger(__name__)

KERNELS = Path(__file__).with_name("csrc")
#: Compiled together into one library; the header is shared by all.
SOURCES = (KERNELS / "small_gemm.c", KERNELS / "decode_step.c", KERNELS / "rowwise.c", KERNELS / "attention.c")
HEADERS = (KERNELS / "gemm.h", KERNELS / "many_rows.h", KERNELS / "bf16_rows.h", KERNELS / "amx.h",
           KERNELS / "amx_emul.h", KERNELS / "decode_dp.h", KERNELS / "int8_rows.h")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")


def build_flags() -> tuple[str, ...]:
    """FLAGS, and ``-DAF3_AMD`` on AMD CPUs: ``-march=native`` names no vendor (GCC 12 calls a Zen 4 "znver3"), and
    the one-row pair-dot-product software prefetch is tuned per vendor (bf16_rows.h, DP_AHEAD_BYTES)."""
    return FLAGS + (("-DAF3_AMD",) if cpuinfo("vendor_id") == "AuthenticAMD" else ())


#: Element types the kernel reads and writes, as it numbers them (``enum`` in the C source).
KINDS = {torch.bfloat16: 0, torch.float16: 1, torch.int8: 2, torch.float32: 3}
#: Weight dtypes it multiplies; the inputs, scales, biases and outputs are bf16, fp16 or fp32.
WEIGHT_DTYPES = (torch.bfloat16, torch.float16, torch.int8)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def cache_dir() -> Path:
    return Path(os.environ.get("AF3_CACHE") or Path.home() / ".cache" / "af3")


def _build(compiler: str) -> Path:
    """Compile the kernel (once per source, flags, compiler and CPU) and return the shared library's path. The CPU's
    feature flags are part of the key, so a cache shared by different machines keeps one build per CPU."""
    flags = build_flags()
    key = hashlib.sha256(b"\0".join([*(f.read_bytes() for f in SOURCES + HEADERS), " ".join(flags).encode(),
                                     compiler.encode(), (cpuinfo("flags") or platform.processor()).encode()]))
    target = cache_dir() / "kernels" / f"af3_kernels-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([*shlex.split(compiler), *flags, "-o", tmp, *map(str, SOURCES)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(tmp, target)  # atomic: a concurrent process sees no half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        log.info("no C compiler found: af3's CPU kernel for bf16/fp16/int8 products is off")
        return None
    try:
        lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", "") or str(e)).strip().splitlines()
        log.warning("af3's CPU kernel did not build (%s); using torch's kernels", detail[-1] if detail else e)
        return None
    lib.af3_small_gemm_level.restype = ctypes.c_int
    if lib.af3_small_gemm_level() < 1:
        log.info("this CPU lacks AVX2/FMA/F16C: af3's CPU kernel is off")
        return None
    lib.af3_small_gemm.restype = lib.af3_bf16_rows_level.restype = lib.af3_int8_rows_level.restype = ctypes.c_int
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_ssize_t
    lib.af3_small_gemm.argtypes = [p, i, n, n, p, i, n, p, i, p, i, p, i, i]
    lib.af3_decode_step.restype = ctypes.c_int
    lib.af3_decode_step.argtypes = [ctypes.POINTER(_Step), ctypes.POINTER(_Layer), i]
    lib.af3_decode_scratch.restype = ctypes.c_int64
    lib.af3_decode_scratch.argtypes = [ctypes.POINTER(_Step)]
    lib.af3_decode_struct_size.restype = ctypes.c_int64
    lib.af3_decode_struct_size.argtypes = [i]
    lib.af3_round_values.restype = ctypes.c_int
    lib.af3_round_values.argtypes = [p, ctypes.c_int64, i]
    for name, args in (("af3_rms_norm", [p, p, p, p, p, n, n, n, i, i, ctypes.c_float, i]),
                       ("af3_silu_mul", [p, p, n, i, i]), ("af3_rotary", [p, n, p, p, p, n, n, n, i, i]),
                       ("af3_argmax", [p, n, n, n, i, p, i])):
        getattr(lib, name).restype = ctypes.c_int
        getattr(lib, name).argtypes = args
    lib.af3_attention_level.restype = ctypes.c_int
    lib.af3_attention.restype = ctypes.c_int
    i64 = ctypes.c_int64
    lib.af3_attention.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, p, i, i64, ctypes.c_float, i]
    lib.af3_decode_attention.restype = ctypes.c_int
    lib.af3_decode_attention.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, p, ctypes.c_float, i]
    lib.af3_decode_attention_any.restype = ctypes.c_int
    lib.af3_decode_attention_any.argtypes = [p, p, p, p, p, p, p, p, i64, i64, i64, i64, i64, p, i, i, ctypes.c_float,
                                             i]
    mismatch = abi_mismatch(lib)
    if mismatch:  # a bug in af3, not in the user's setup: say so, and keep working with torch's kernels
        log.error("af3's CPU kernels are off: their C structs do not match binding.py's (%s)", mismatch)
        return None
    return lib


def abi_mismatch(lib: ctypes.CDLL) -> str:
    """'' when the library lays out ``Lin``, ``Layer`` and ``Step`` as this module's ctypes structs do; else which
    differ (C size vs ctypes size)."""
    ours = {"Lin": _Lin, "Layer": _Layer, "Step": _Step}
    wrong = [f"{name}: {lib.af3_decode_struct_size(i)} vs {ctypes.sizeof(struct)} bytes"
             for i, (name, struct) in enumerate(ours.items()) if lib.af3_decode_struct_size(i) != ctypes.sizeof(struct)]
    return ", ".join(wrong)


def available() -> bool:
    """True when the kernel is built and usable on this machine."""
    return _library() is not None


def bf16_rows_level() -> int:
    """How the kernels multiply bf16 weights by bf16 rows on this machine: 0 widened to fp32 (AVX2, or no kernels),
    1 with AVX512-BF16's pair dot products, 2 those for one row and AMX tile products for 2-16 rows (``gemm.h``)."""
    lib = _library()
    return 0 if lib is None else lib.af3_bf16_rows_level()


def int8_rows_level() -> int:
    """How the kernels multiply int8 weights by bf16 rows (fewer than 24, ``PACK_ROWS``): 0 each weight widened to
    fp32 and the rows given as fp32, 1 each weight turned into bf16 by byte lookups and multiplied with AVX512-BF16's
    pair dot products, the rows staying bf16 (``int8_rows.h``; AVX512-BF16 and AVX512-VBMI)."""
    lib = _library()
    return 0 if lib is None else lib.af3_int8_rows_level()


def _operand(t: Tensor | None, n: int, what: str) -> tuple[Tensor | None, int | None, int]:
    """A per-channel vector [n] (scale or bias) as the kernel takes it: (tensor kept alive, pointer, kind)."""
    if t is None:
        return None, None, KINDS[torch.float32]
    if t.dtype not in FLOAT_DTYPES or t.numel() != n or t.device.type != "cpu":
        raise ValueError(f"small_gemm: {what} must be {n} bf16/fp16/fp32 values on the CPU, got {t.dtype} "
                         f"{list(t.shape)} on {t.device}")
    t = t.detach().contiguous()
    return t, t.data_ptr(), KINDS[t.dtype]


def round_values(x: Tensor, dtype: torch.dtype) -> Tensor:
    """A copy of fp32 ``x`` rounded as the decoding step rounds its activations to ``dtype`` (bf16 or fp16) and
    widened back: the step's own rounding, exposed so that tests hold it to torch's conversions."""
    lib = _library()
    if lib is None:
        raise RuntimeError("af3's CPU kernels are not available on this machine")
    out = x.detach().to(torch.float32, copy=True).contiguous()
    if lib.af3_round_values(out.data_ptr(), out.numel(), KINDS.get(dtype, -1)) != 0:
        raise ValueError(f"round_values: {dtype} is not bf16 or fp16")
    return out


def small_gemm(x: Tensor, weight: Tensor, scale: Tensor | None = None, bias: Tensor | None = None,
               out_dtype: torch.dtype = torch.float32) -> Tensor:
    """``(x @ weight.T) * scale + bias`` accumulated in fp32 and rounded once to ``out_dtype``: x [..., K] (bf16, fp16
    or fp32), weight [N, K] contiguous bf16, fp16 or int8, scale and bias [N] (bf16, fp16 or fp32) or None, all on
    the CPU → [..., N]. Requires :func:`available`."""
    lib = _library()
    if lib is None:
        raise RuntimeError("af3's CPU kernel is not available on this machine")
    if weight.dtype not in WEIGHT_DTYPES or weight.device.type != "cpu" or not weight.is_contiguous():
        raise ValueError(f"small_gemm needs a contiguous CPU weight of {', '.join(map(str, WEIGHT_DTYPES))}, got "
                         f"{weight.dtype} on {weight.device}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"small_gemm: x has {x.shape[-1]} features, the weight {k}")
    if x.dtype not in FLOAT_DTYPES or x.device.type != "cpu" or out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"small_gemm: x ({x.dtype} on {x.device}) and out_dtype ({out_dtype}) must be bf16, fp16 "
                         "or fp32 on the CPU")
    x2 = x.detach().reshape(-1, k).contiguous()  # [M, K]
    scale, scale_ptr, scale_kind = _operand(scale, n, "scale")
    bias, bias_ptr, bias_kind = _operand(bias, n, "bias")
    out = torch.empty(x2.shape[0], n, dtype=out_dtype)  # [M, N]
    status = lib.af3_small_gemm(x2.data_ptr(), KINDS[x2.dtype], x2.shape[0], k, weight.data_ptr(),
                                KINDS[weight.dtype], n, scale_ptr, scale_kind, bias_ptr, bias_kind, out.data_ptr(),
                                KINDS[out_dtype], torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f"af3's CPU kernel failed (status {status})")
    return out.reshape(*x.shape[:-1], n)


# ------------------------------------------------------------------------------------------------ decode step
class _Lin(ctypes.Structure):
    _fields_ = [("w", ctypes.c_void_p), ("scale", ctypes.c_void_p), ("bias", ctypes.c_void_p),
                ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("w_kind", ctypes.c_int32),
                ("scale_kind", ctypes.c_int32), ("bias_kind", ctypes.c_int32), ("unused", ctypes.c_int32)]


#: The linear layers of one decoder layer, in the order of ``struct Layer`` in decode_step.c.
LAYER_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


class _Layer(ctypes.Structure):
    _fields_ = [*((name, _Lin) for name in LAYER_LINEARS), ("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p)]


class _Step(ctypes.Structure):
    _fields_ = [*((name, ctypes.c_int64) for name in ("rows", "hidden", "heads", "kv_heads", "head_dim", "inter",
                                                      "width", "cache_row", "cache_head", "cache_slot")),
                *((name, ctypes.c_void_p) for name in ("positions", "slots", "mask", "inv_freq", "caches",
                                                       "final_norm", "x", "out", "scratch")),
                ("scratch_floats", ctypes.c_int64), ("eps", ctypes.c_float),
                *((name, ctypes.c_int32) for name in ("act_kind", "threads", "amx_attention"))]


class DecodeWeights:
    """The weights of a Qwen2 decoder as :func:`decode_step` reads them, described once for the C side.

    ``layers`` holds, per decoder layer, a mapping with ``q k v o gate up down`` → (weight [N, K], scale [N] or
    None, bias [N] or None) and ``norm1``, ``norm2`` → RMSNorm weights [hidden]. Weights are contiguous CPU tensors,
    all bf16/fp16 of the activations' dtype or all int8 (with scales); norms are in the activations' dtype. The
    tensors are kept referenced, so the pointers handed to C stay valid while this object lives. With ``borrow``
    only the copies made here are kept: the caller guarantees that the given tensors outlive every use (a model
    that checks, before each step, that its tensors are still the ones described; it then holds no stale weights).
    """

    def __init__(self, layers: list[dict], final_norm: Tensor, inv_freq: Tensor, eps: float, heads: int,
                 kv_heads: int, head_dim: int, dtype: torch.dtype, borrow: bool = False):
        if dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"decode_step runs bf16 or fp16 activations, not {dtype}")
        if head_dim % 8 or heads % kv_heads:
            raise ValueError(f"decode_step needs head_dim % 8 == 0 and heads % kv_heads == 0, got {head_dim}, "
                             f"{heads}, {kv_heads}")
        self.dtype, self.eps, self.heads, self.kv_heads, self.head_dim = dtype, eps, heads, kv_heads, head_dim
        self._keep: list[Tensor] = []

        def keep(given: Tensor | None, used: Tensor | None) -> None:
            if used is not None and not (borrow and given is not None and used.data_ptr() == given.data_ptr()):
                self._keep.append(used)

        norm, freqs = final_norm.detach().contiguous(), inv_freq.detach().to(torch.float32).contiguous()
        keep(final_norm, norm)
        keep(inv_freq, freqs)
        self.final_norm_ptr, self.inv_freq_ptr = norm.data_ptr(), freqs.data_ptr()
        self.hidden = final_norm.numel()
        self.inter = layers[0]["gate"][0].shape[0] if layers else 0
        self.layers = (_Layer * max(1, len(layers)))()
        self.num_layers = len(layers)
        want = {"q": (heads * head_dim, self.hidden), "k": (kv_heads * head_dim, self.hidden),
                "v": (kv_heads * head_dim, self.hidden), "o": (self.hidden, heads * head_dim),
                "gate": (self.inter, self.hidden), "up": (self.inter, self.hidden), "down": (self.hidden, self.inter)}
        kinds = set()
        for i, layer in enumerate(layers):
            for name in LAYER_LINEARS:
                w, scale, bias = layer[name]
                if tuple(w.shape) != want[name] or not w.is_contiguous() or w.dtype not in (dtype, torch.int8):
                    raise ValueError(f"decode_step: layer {i} {name} weight is {w.dtype} {list(w.shape)}, expected "
                                     f"a contiguous {dtype} or int8 {list(want[name])}")
                if (scale is None) != (w.dtype != torch.int8):
                    raise ValueError(f"decode_step: layer {i} {name}: int8 weights need scales, others none")
                kinds.add(w.dtype)
                scale_used, scale_ptr, scale_kind = _operand(scale, w.shape[0], "scale")
                bias_used, bias_ptr, bias_kind = _operand(bias, w.shape[0], "bias")
                for given, used in ((w, w), (scale, scale_used), (bias, bias_used)):
                    keep(given, used)
                setattr(self.layers[i], name, _Lin(w.data_ptr(), scale_ptr, bias_ptr, w.shape[0], w.shape[1],
                                                   KINDS[w.dtype], scale_kind, bias_kind, 0))
            for name in ("norm1", "norm2"):
                t = layer[name].detach().contiguous()
                if t.dtype != dtype or t.numel() != self.hidden:
                    raise ValueError(f"decode_step: layer {i} {name} must be {self.hidden} {dtype} values")
                keep(layer[name], t)
                setattr(self.layers[i], name, t.data_ptr())
        if len(kinds) > 1:
            raise ValueError("decode_step: all linear weights must share one dtype")
        #: The linear weights are int8 (their products take other kernels than half weights: ``policy``).
        self.int8 = kinds == {torch.int8}


def decode_step(weights: DecodeWeights, x: Tensor, positions: Tensor, slots: Tensor, mask: Tensor,
                keys: list[Tensor], values: list[Tensor], scratch: Scratch | None = None,
                amx_attention: bool = False) -> Tensor:
    """All decoder layers and the final norm for one new token per row, in one call (``kernels/decode_step.c``).

    x [M, hidden] (the tokens' embeddings, ``weights.dtype``), positions and slots [M] int64 (rotary position; cache
    slot written), mask [M, width] bool (cache slots each row attends to), ``keys``/``values`` per layer: [>= M,
    kv_heads, slots, head_dim] cache tensors of ``weights.dtype`` whose rows start with this step's rows, all with
    the same strides and a contiguous last axis. Writes the new keys and values into the caches and returns the
    final hidden states [M, hidden]. ``scratch`` is the work memory to use (kept by a :class:`FusedDecoder` across
    steps); without it one is made for this call. ``amx_attention``: bf16 rows whose mask is a prefix of their slots
    may attend through af3's AMX decoding kernel (``kernels/csrc/attention.c``; where it does not run here, the step's
    own attention serves). Requires :func:`available`."""
    lib = _library()
    if lib is None:
        raise RuntimeError("af3's CPU kernels are not available on this machine")
    w = weights
    m = x.shape[0]
    if x.dtype != w.dtype or tuple(x.shape) != (m, w.hidden) or x.device.type != "cpu":
        raise ValueError(f"decode_step: x must be [rows, {w.hidden}] {w.dtype} on the CPU, got {x.dtype} "
                         f"{list(x.shape)}")
    if mask.dtype != torch.bool or mask.dim() != 2 or mask.shape[0] != m:
        raise ValueError(f"decode_step: mask must be [{m}, width] bool, got {mask.dtype} {list(mask.shape)}")
    for name, t in (("positions", positions), ("slots", slots)):
        if t.dtype != torch.int64 or tuple(t.shape) != (m,):
            raise ValueError(f"decode_step: {name} must be [{m}] int64, got {t.dtype} {list(t.shape)}")
    if len(keys) != w.num_layers or len(values) != w.num_layers:
        raise ValueError(f"decode_step: {w.num_layers} key and value caches needed")
    ref = keys[0] if keys else None
    if ref is not None:
        rows, heads, length, dim = ref.shape
        strides = ref.stride()
        for t in (*keys, *values):
            if (t.dtype != w.dtype or t.stride() != strides or tuple(t.shape) != (rows, heads, length, dim)
                    or t.device.type != "cpu"):
                raise ValueError("decode_step: every cache tensor must share the first one's dtype, shape and strides "
                                 "and be on the CPU")
        if rows < m or heads != w.kv_heads or dim != w.head_dim or strides[3] != 1:
            raise ValueError(f"decode_step: caches must be [>= {m}, {w.kv_heads}, slots, {w.head_dim}] "
                             f"with a contiguous last axis, got {list(ref.shape)} strides {strides}")
        if mask.shape[1] > length or (m and int(slots.max()) >= length) or (m and int(slots.min()) < 0):
            raise ValueError(f"decode_step: slots and mask width must lie within the cache's {length} slots")
    else:
        strides = (0, 0, 0, 1)
    x = x.contiguous()
    mask = mask.contiguous()
    positions, slots = positions.contiguous(), slots.contiguous()
    pointers = (ctypes.c_void_p * max(1, 2 * w.num_layers))(
        *(t.data_ptr() for pair in zip(keys, values, strict=True) for t in pair))
    out = torch.empty_like(x)
    step = _Step(m, w.hidden, w.heads, w.kv_heads, w.head_dim, w.inter, mask.shape[1], strides[0], strides[1],
                 strides[2], positions.data_ptr(), slots.data_ptr(), mask.data_ptr(), w.inv_freq_ptr,
                 ctypes.cast(pointers, ctypes.c_void_p), w.final_norm_ptr, x.data_ptr(), out.data_ptr(), None, 0,
                 w.eps, KINDS[w.dtype], torch.get_num_threads(), int(amx_attention))
    memory = (scratch or Scratch()).at_least(lib.af3_decode_scratch(ctypes.byref(step)))
    step.scratch, step.scratch_floats = memory.data_ptr(), memory.numel()
    status = lib.af3_decode_step(ctypes.byref(step), w.layers, w.num_layers)
    if status != 0:
        raise RuntimeError(f"af3's decode step failed (status {status})")
    return out


class Scratch:
    """Work memory of the decoding step, grown when a step needs more (more rows, a longer cache) and then reused:
    the C step allocates nothing. Grows by at least half, so a sequence growing slot by slot reallocates rarely."""

    def __init__(self) -> None:
        self.memory = torch.empty(0, dtype=torch.float32)

    def at_least(self, floats: int) -> Tensor:
        if self.memory.numel() < floats:
            self.memory = torch.empty(max(floats, self.memory.numel() * 3 // 2), dtype=torch.float32)
        return self.memory


class FusedDecoder:
    """A decoding-step plan: a decoder's weights described once for ``kernels/csrc/decode_step.c`` (see
    :class:`DecodeWeights` for ``layers``), then :meth:`step` per decoding step. Whoever builds it decides when it is
    stale (the generation runner rebuilds it when the model changes); it holds no reference to any module."""

    def __init__(self, layers: list[dict], final_norm: Tensor, inv_freq: Tensor, eps: float, heads: int,
                 kv_heads: int, head_dim: int, dtype: torch.dtype, borrow: bool = False):
        self.weights = DecodeWeights(layers, final_norm, inv_freq, eps, heads, kv_heads, head_dim, dtype, borrow)
        self.scratch = Scratch()

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.dtype

    @property
    def int8(self) -> bool:
        return self.weights.int8

    def step(self, x: Tensor, positions: Tensor, slots: Tensor, mask: Tensor, keys: list[Tensor],
             values: list[Tensor], amx_attention: bool = False) -> Tensor:
        """One token per row through every layer and the final norm (arguments as :func:`decode_step`)."""
        return decode_step(self.weights, x, positions, slots, mask, keys, values, self.scratch, amx_attention)
