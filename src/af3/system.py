"""What machine this runs on, for benchmark tables and model cards (speed ratios depend on the CPU class)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import torch


def cpuinfo(field: str) -> str | None:
    """The first value of ``field`` in ``/proc/cpuinfo`` ("model name", "flags", ...), or None (not Linux, absent)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == field:
                    return value.strip()
    except OSError:
        pass
    return None


def cpu_description() -> str:
    """CPU model, core count and torch's kernel level (AVX2 vs AVX512/AMX changes every CPU speed figure)."""
    name = cpuinfo("model name") or "unknown CPU"
    return f"{name} ({os.cpu_count()} cores), torch {torch.__version__} CPU capability " \
           f"{torch.backends.cpu.get_cpu_capability()}"


def available_memory(device: torch.device | str = "cpu") -> int | None:
    """Bytes that can still be allocated on ``device`` without swapping: ``MemAvailable`` of ``/proc/meminfo`` for the
    CPU, the free memory CUDA reports for a GPU; None where it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return int(torch.cuda.mem_get_info(device)[0])
        except (RuntimeError, AssertionError, ValueError):
            return None
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def physical_memory() -> int | None:
    """Bytes of RAM this machine has (None where it cannot be told)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_device(device: torch.device | str) -> torch.device:
    """``device`` as a ``torch.device`` this process can use, or an :class:`~af3.errors.InputError` that says why not
    (an unknown name, CUDA absent from this torch build or machine, a GPU index that does not exist)."""
    from .errors import InputError

    if device == "auto":  # the best this machine has
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise InputError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {device!r}: CUDA is not available (this torch build has no CUDA, or no GPU is "
                             "visible); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {device!r}: there are {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
        return dev
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise InputError(f"device {device!r} is not supported here; use cpu or cuda")


_LIBC: dict = {}


def _libc_function(name: str, argtypes: list | None = None):
    """The C library's function ``name`` (with ``argtypes`` and an int result when given), or None where there is
    none (not glibc, not Linux); looked up once."""
    if name not in _LIBC:
        try:
            import ctypes
            import ctypes.util

            fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
            if argtypes is not None:
                fn.argtypes, fn.restype = argtypes, ctypes.c_int
            _LIBC[name] = fn
        except (OSError, AttributeError):
            _LIBC[name] = None
    return _LIBC[name]


def release_free_memory() -> None:
    """Give memory that has been freed back to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    Long jobs free and allocate many tensors and arrays of changing sizes; glibc keeps the freed pages in its heaps,
    so resident memory creeps up with the job's length although nothing is held. Long-form transcription calls this
    between batches, so its memory stays flat with the recording's length."""
    malloc_trim = _libc_function("malloc_trim")
    if malloc_trim:
        malloc_trim(0)


#: Tensors from this size up are worth huge pages (one 2 MB page of x86-64; smaller ones could not fill one).
HUGE_PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux


def advise_huge_pages(tensors: Iterable[torch.Tensor]) -> int:
    """Ask Linux for transparent huge pages under the memory of each CPU tensor of :data:`HUGE_PAGE_BYTES` or more
    (``madvise(MADV_HUGEPAGE)``, a hint) and return how many bytes were advised. Call it between allocating a
    tensor and filling it: pages are made huge when first touched (memory touched already stays in 4 KB pages
    until the kernel's background collapse gets to it).

    Why: a decoding step streams every weight once. Where the kernel gives huge pages only on request (Debian's
    default, ``transparent_hugepage/enabled`` = madvise), weights sat in 4 KB pages: the hardware prefetchers stop at
    each page's end and every 4 KB costs a TLB miss. On a 2-vCPU Zen 4 EPYC one-row products over 1 GB read 28-29
    GB/s in 4 KB pages and 33-36 in huge pages in the same minutes, and batch-1 decoding of the benchmark model ran
    1.22x as fast (benchmarks/README.md). ``AF3_HUGE_PAGES=0`` turns it off. The advice covers whole 4 KB pages, so it
    may reach a neighbour's memory at the ends: harmless, it is only a hint."""
    if sys.platform != "linux" or os.environ.get("AF3_HUGE_PAGES", "1") == "0":
        return 0
    import ctypes

    madvise = _libc_function("madvise", [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int])
    if not madvise:
        return 0
    page, advised = os.sysconf("SC_PAGE_SIZE"), 0
    for t in tensors:
        if t.device.type != "cpu" or t.is_meta:
            continue
        storage = t.untyped_storage()
        start, size = storage.data_ptr(), storage.nbytes()
        if size < HUGE_PAGE_BYTES:
            continue
        first, end = start // page * page, -(-(start + size) // page) * page
        if madvise(first, end - first, _MADV_HUGEPAGE) == 0:  # (EINVAL where the kernel has no THP: no matter)
            advised += size
    return advised
