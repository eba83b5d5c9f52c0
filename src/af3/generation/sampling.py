"""Logits processing and token choice: a chain of processors per request, then one pick.

The chain, in the order transformers applies the same steps: JSON constraint (only tokens the grammar allows) or
min-new-tokens (end tokens suppressed until then) → repetition penalty → (sampling only) temperature → top-k →
top-p; the pick is an argmax (greedy) or one multinomial draw. Every processor takes float logits [B, V] and the
row's tokens so far, and returns a new tensor (inputs are not modified).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .options import GenerationOptions

#: A logits processor: (logits [B, V], tokens so far [B, S], new tokens so far) → logits [B, V].
Processor = Callable[[Tensor, Tensor, int], Tensor]


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


def suppress(logits: Tensor, token_ids: Sequence[int]) -> Tensor:
    """``logits`` with ``token_ids`` made impossible."""
    return logits.index_fill(1, torch.tensor(list(token_ids), device=logits.device), float("-inf"))


class Chain(list):
    """The processors of one request, in order, and what a batched caller may do instead of running them.

    ``argmax_ban`` is None when the next token needs the chain (sampling, a penalty, a JSON constraint); otherwise the
    token is the argmax of the logits after these end tokens are suppressed while fewer than ``min_new_tokens`` tokens
    exist (``()``: a plain argmax), so that rows of many requests can share one argmax."""

    argmax_ban: tuple[int, ...] | None = None


def build_chain(options: GenerationOptions, constraint: Any = None) -> Chain:
    """The processors of one request with resolved ``options`` (see the module docstring for the order)."""
    o = options
    chain = Chain()
    stops: list[int] = []
    if constraint is not None:  # JSON output: an end token only once the JSON is complete
        chain.append(lambda lg, _t, _n: lg.masked_fill(~constraint.allowed(lg.shape[-1], lg.device), float("-inf")))
    elif o.min_new_tokens and o.stop_token_ids:
        stops = list(o.stop_token_ids)
        chain.append(lambda lg, _t, n: suppress(lg, stops) if n < o.min_new_tokens else lg)
    if o.repetition_penalty != 1.0:
        chain.append(lambda lg, t, _n: apply_repetition_penalty(lg, t.to(lg.device), o.repetition_penalty))
    if o.do_sample:
        if o.temperature != 1.0:
            chain.append(lambda lg, _t, _n: lg / o.temperature)
        if o.top_k:
            chain.append(lambda lg, _t, _n: apply_top_k(lg, o.top_k))
        if o.top_p < 1.0:
            chain.append(lambda lg, _t, _n: apply_top_p(lg, o.top_p))
    if not o.do_sample and constraint is None and o.repetition_penalty == 1.0:
        chain.argmax_ban = tuple(stops)
    return chain


def process(chain: list[Processor], logits: Tensor, tokens: Tensor, new_tokens: int) -> Tensor:
    """Run ``chain`` over ``logits`` [B, V] (``tokens`` [B, S]: the rows' sequences so far)."""
    for processor in chain:
        logits = processor(logits, tokens, new_tokens)
    return logits


def pick(logits: Tensor, do_sample: bool, generator: torch.Generator | None = None) -> Tensor:
    """One token per row from processed ``logits`` [B, V] → [B] (argmax, or a draw when sampling)."""
    if not do_sample:
        return logits.argmax(dim=-1)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)
