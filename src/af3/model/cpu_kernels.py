"""af3's own CPU kernel for products with few rows and bf16, fp16 or int8 weights (``kernels/small_gemm.c``).

On x86 CPUs without native bf16/fp16 matrix instructions (AVX2 only; oneDNN reports no bf16 support), torch's
half-precision ``F.linear`` with a handful of rows reads the weight at a fraction of memory bandwidth, and decoding
is bound by reading weights (``benchmarks/gemv_bench.py``). The C kernel loads each weight vector once, widens it to
fp32 in registers and multiplies it into up to 4 rows at a time, accumulating in fp32.

The kernel is compiled at first use with the system C compiler (``$CC``, else ``cc``/``gcc``) and
``-O3 -march=native`` for the machine it runs on, then cached under ``$AF3_CACHE`` (default
``~/.cache/af3``)/``kernels``, keyed by the source, the flags and the CPU's feature flags. It is loaded with
``ctypes``; no Python headers or build tools beyond a C compiler with OpenMP are needed. Without a compiler, on
other architectures, on CPUs without AVX2/FMA/F16C, or with ``AF3_CPU_KERNELS=0``, :func:`available` is False and
af3 keeps torch's kernels.
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

SOURCE = Path(__file__).with_name("kernels") / "small_gemm.c"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
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
    key = hashlib.sha256(b"\0".join([SOURCE.read_bytes(), " ".join(FLAGS).encode(), compiler.encode(),
                                     (cpuinfo("flags") or platform.processor()).encode()])).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"small_gemm-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([*shlex.split(compiler), *FLAGS, "-o", tmp, str(SOURCE)], check=True, capture_output=True,
                       text=True, timeout=120)
        os.replace(tmp, target)  # atomic: a concurrent process sees no half-written library
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    if os.environ.get("AF3_CPU_KERNELS", "1") == "0":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        log.info("no C compiler found: af3's CPU kernel for few-row bf16/fp16/int8 products is off")
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
    lib.af3_small_gemm.restype = ctypes.c_int
    p, i, n = ctypes.c_void_p, ctypes.c_int, ctypes.c_ssize_t
    lib.af3_small_gemm.argtypes = [p, i, n, n, p, i, n, p, i, p, i, p, i, i]
    return lib


def available() -> bool:
    """True when the kernel is built and usable on this machine."""
    return _library() is not None


def _operand(t: Tensor | None, n: int, what: str) -> tuple[Tensor | None, int | None, int]:
    """A per-channel vector [n] (scale or bias) as the kernel takes it: (tensor kept alive, pointer, kind)."""
    if t is None:
        return None, None, KINDS[torch.float32]
    if t.dtype not in FLOAT_DTYPES or t.numel() != n or t.device.type != "cpu":
        raise ValueError(f"small_gemm: {what} must be {n} bf16/fp16/fp32 values on the CPU, got {t.dtype} "
                         f"{list(t.shape)} on {t.device}")
    t = t.detach().contiguous()
    return t, t.data_ptr(), KINDS[t.dtype]


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
