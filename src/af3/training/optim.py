"""The optimizer and its learning-rate schedule: AdamW over parameter groups (peak lr per model part, no weight
decay on biases and norm weights), linear warm-up, then cosine / linear decay or a constant rate."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

from .errors import TrainingError

if TYPE_CHECKING:
    from .sections import OptimSection, TrainConfig


def part_lr(name: str, o: OptimSection) -> float:
    """The peak lr of parameter ``name``: the longest matching ``optim.part_lr`` prefix, else ``optim.lr``."""
    best, lr = -1, o.lr
    for prefix, value in o.part_lr.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, lr = len(prefix), float(value)
    return lr


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases and norm weights (1-D) get no weight decay; ``optim.part_lr``
    gives parts of the model their own peak learning rate."""
    o = cfg.optim
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            clean = name.removeprefix("module.").replace("_fsdp_wrapped_module.", "").replace("base_model.model.", "")
            buckets.setdefault((part_lr(clean, o), p.dim() >= 2), []).append(p)
    groups = [{"params": params, "lr": lr, "weight_decay": o.weight_decay if decays else 0.0}
              for (lr, decays), params in sorted(buckets.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]
    if not groups:
        raise TrainingError(f"stage {cfg.stage} leaves no parameter trainable")
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps)


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based): linear warm-up over
    ``warmup`` steps (the first step already has lr/(warmup+1)), then cosine/linear decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """A ``LambdaLR`` of :func:`lr_factor` over ``total_steps``; warm-up is ``optim.warmup_steps`` or
    ``optim.warmup_ratio`` of the steps."""
    o = cfg.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else math.ceil(o.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, o.schedule, o.min_lr_ratio))


def current_lr(optimizer: torch.optim.Optimizer, scheduler, peak: float) -> float:
    """The learning rate of this step as ``optim.lr`` scaled by the schedule (``part_lr`` groups follow the same
    schedule, so this is the one value logged)."""
    group = optimizer.param_groups[0]
    return peak * scheduler.get_last_lr()[0] / group["initial_lr"]
