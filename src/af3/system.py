"""What machine this runs on, for benchmark tables and model cards (speed ratios depend on the CPU class)."""

from __future__ import annotations

import os

import torch


def cpu_description() -> str:
    """CPU model, core count and torch's kernel level (AVX2 vs AVX512/AMX changes every CPU speed figure)."""
    name = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores), torch {torch.__version__} CPU capability " \
           f"{torch.backends.cpu.get_cpu_capability()}"
