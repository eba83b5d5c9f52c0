"""The AF3 network: audio encoder, projector, Qwen2 decoder and the fused model."""

from __future__ import annotations

from .af3 import AF3Model, AF3Output
from .decoder import Qwen2ForCausalLM
from .encoder import AudioEncoder
from .projector import Projector

__all__ = ["AF3Model", "AF3Output", "AudioEncoder", "Projector", "Qwen2ForCausalLM"]
