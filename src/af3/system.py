"""What machine this runs on, for benchmark tables and model cards (speed ratios depend on the CPU class)."""

from __future__ import annotations

import os

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


def release_free_memory() -> None:
    """Give memory that has been freed back to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).

    Long jobs free and allocate many tensors and arrays of changing sizes; glibc keeps the freed pages in its heaps,
    so resident memory creeps up with the job's length although nothing is held. Long-form transcription calls this
    between batches, so its memory stays flat with the recording's length."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes
            import ctypes.util

            _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)


_malloc_trim = None
