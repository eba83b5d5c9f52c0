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
