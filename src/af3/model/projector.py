"""Projector: maps encoder frames into the decoder's embedding space (Linear → GELU → Linear)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AF3Config
from ..errors import CheckpointError
from .linear import Linear


class Projector(nn.Module):
    """``linear_2(gelu(linear_1(x)))``: [..., D_audio] → [..., D_text]."""

    def __init__(self, cfg: AF3Config):
        super().__init__()
        if cfg.projector_hidden_act != "gelu":
            raise CheckpointError(f"projector_hidden_act {cfg.projector_hidden_act!r} is not supported")
        d_audio, d_text = cfg.audio_config.hidden_size, cfg.text_config.hidden_size
        self.linear_1 = Linear(d_audio, d_text, bias=cfg.projector_bias)
        self.linear_2 = Linear(d_text, d_text, bias=cfg.projector_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))
