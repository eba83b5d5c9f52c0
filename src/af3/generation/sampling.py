"""Logits processing and token choice, in the order transformers applies them.

repetition penalty → (sampling only) temperature → top-k → top-p → softmax + multinomial; greedy = argmax.
All functions take float logits [B, V] and return new tensors (inputs are not modified).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. ``top_k`` None/0 and ``top_p`` 1.0 disable those filters."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if self.do_sample and not self.temperature > 0:
            raise InputError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise InputError(f"top_k must be >= 0 (got {self.top_k})")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (got {self.top_p})")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0 (got {self.repetition_penalty})")


def apply_repetition_penalty(logits: Tensor, tokens: Tensor, penalty: float) -> Tensor:
    """Make tokens already in ``tokens`` [B, S] less likely: positive logits / penalty, negative × penalty."""
    if penalty == 1.0:
        return logits
    seen = logits.gather(1, tokens)  # [B, S]
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, tokens, seen)


def apply_top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the ``k`` largest logits per row (ties with the k-th kept too), set the rest to -inf."""
    k = min(k, logits.shape[-1])
    kth = logits.topk(k, dim=-1).values[:, -1:]  # [B, 1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to >= ``p`` (at least one)."""
    sorted_logits, order = logits.sort(dim=-1)  # ascending, [B, V]
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    drop = cum <= 1 - p
    drop[:, -1] = False  # the most likely token always stays
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def process_logits(logits: Tensor, tokens: Tensor, params: SamplingParams) -> Tensor:
    """Penalty, then (when sampling) the warpers, on ``logits`` [B, V]; ``tokens`` [B, S] = the sequence."""
    logits = apply_repetition_penalty(logits, tokens, params.repetition_penalty)
    if not params.do_sample:
        return logits
    if params.temperature != 1.0:
        logits = logits / params.temperature
    if params.top_k:
        logits = apply_top_k(logits, params.top_k)
    if params.top_p < 1.0:
        logits = apply_top_p(logits, params.top_p)
    return logits


def choose_tokens(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> Tensor:
    """Pick one token per row from processed ``logits`` [B, V] → [B] (argmax, or a draw when sampling)."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)  # [B, V]
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
