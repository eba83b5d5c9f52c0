"""Decoding: KV cache and logits processing / token choice."""

from __future__ import annotations

from .cache import KVCache
from .sampling import SamplingParams, choose_tokens, process_logits

__all__ = ["KVCache", "SamplingParams", "choose_tokens", "process_logits"]
