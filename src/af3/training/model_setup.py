"""The model a run trains: the starting checkpoint (an earlier LoRA run's checkpoint is loaded merged), the stage's
trainable parts, resumed weights, gradient checkpointing, placement on the device, and the bf16 autocast choice."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import nn

from ..config import torch_dtype
from ..errors import InputError
from ..model import AF3Model
from ..model.adapters import ADAPTER_CONFIG
from ..model.weights import StateSource, load_state
from .checkpoint import load_checkpoint_weights, seed_everything
from .distributed import Strategy
from .lora import load_adapter, merged_state_dict, read_adapter
from .sections import TrainConfig
from .stages import Stage, apply_stage

logger = logging.getLogger("af3")


def load_training_model(path: str, dtype: torch.dtype | None = None) -> AF3Model:
    """The model to start from: an HF-layout checkpoint, or a LoRA checkpoint folder of an earlier run (adapter
    + recorded base), merged."""
    has_weights = any(f.endswith(".safetensors") and not f.startswith("adapter_") for f in os.listdir(path)) \
        if os.path.isdir(path) else False
    if not has_weights and os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        cfg, _ = read_adapter(path)
        base = AF3Model.from_pretrained(cfg.base_model_name_or_path, dtype=dtype)
        load_adapter(base, path)
        merged = merged_state_dict({k: v.detach() for k, v in base.state_dict().items()}, cfg)
        model = AF3Model.from_pretrained(cfg.base_model_name_or_path, dtype=dtype)
        load_state(model, StateSource(merged), model.config.text_config.tie_word_embeddings)
        return model
    return AF3Model.from_pretrained(path, dtype=dtype)


def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each encoder and decoder layer in the backward pass instead of storing its activations.

    Done from outside the model: each layer's ``forward`` is replaced (as an instance attribute, so module
    and parameter names do not change) by one that runs the original under ``torch.utils.checkpoint`` when
    gradients are on. Returns the number of layers."""
    from torch.utils.checkpoint import checkpoint

    layers = [*model.audio_tower.layers, *model.language_model.model.layers]
    for layer in layers:
        if getattr(layer, "_af3_checkpointed", False):
            continue
        inner = layer.forward

        def forward(*args: Any, _inner=inner, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = forward
        layer._af3_checkpointed = True
    return len(layers)


def build_model(cfg: TrainConfig, stage: Stage, strategy: Strategy, ckpt: str | None) -> AF3Model:
    """``model.path`` loaded in ``model.dtype``, set up for ``stage`` (LoRA initialised from ``train.seed``, the
    same on every rank), with the weights of ``ckpt`` when resuming, in train mode and placed by ``strategy``
    (not yet wrapped)."""
    seed_everything(cfg.train.seed)  # identical on every rank: LoRA initialisation
    model = load_training_model(cfg.model.path, torch_dtype(cfg.model.dtype))
    model = apply_stage(model, stage, cfg.lora)
    if ckpt is not None:
        load_checkpoint_weights(model, ckpt, lora=stage.uses_lora)
    model.train()
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    return strategy.place(model)


def use_bf16(setting: bool | str, device: torch.device) -> bool:
    """Whether to run forward passes under bf16 autocast (``train.bf16``: true, false or "auto")."""
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    if setting and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("train.bf16=true but this GPU does not support bfloat16; use train.bf16=false")
    return bool(setting)
