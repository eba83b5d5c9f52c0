"""``AF3Model.generate``: transformers' ``generate`` contract, run by the Engine's decoding loop.

A batch of token rows (left padding allowed) becomes one request per row with its padding removed; the rows are
decoded together by an :class:`~.core.EngineCore` of their own (a KV cache sized for this call, no prefix or audio
cache, no text), and the answers are put back in transformers' shape: [B, T_prompt + new], each row's prompt as
given, then its new tokens, then ``pad_token_id`` after its end token; decoding stops once every row has ended.
Unpadded rows compute what the padded batch computes (pads are masked out of attention and positions skip them),
and the repetition penalty sees each row as given, pads and ``<sound>`` ids included, as transformers' does.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .core import EngineCore
from .options import GenerationOptions, default_max_new_tokens
from .output import OutputProcessor
from .runner import ModelRunner
from .sampling import build_chain
from .scheduler import Request, Scheduler


def generate(model: Any, input_ids: Tensor, attention_mask: Tensor | None = None,
             input_features: Tensor | None = None, input_features_mask: Tensor | None = None, *,
             max_new_tokens: int | None = None, min_new_tokens: int = 0, do_sample: bool | None = None,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             repetition_penalty: float | None = None, eos_token_id: int | list[int] | None = None,
             pad_token_id: int | None = None, generator: torch.Generator | None = None,
             seed: int | None = None) -> Tensor:
    """See ``AF3Model.generate``."""
    model.check_input_ids(input_ids)
    b, t = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask must be shaped like input_ids {list(input_ids.shape)}, "
                         f"got {list(attention_mask.shape)}")
    gc = model.generation_config
    eos = gc.eos_ids if eos_token_id is None else (
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    pad = _pad_id(model, pad_token_id, eos)
    if max_new_tokens is None:
        max_new_tokens = default_max_new_tokens(gc, t)
    if isinstance(max_new_tokens, int) and not isinstance(max_new_tokens, bool) and max_new_tokens <= 0:
        return input_ids.clone()  # (as transformers does: nothing to add)
    options = GenerationOptions(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
                                temperature=temperature, top_k=top_k, top_p=top_p,
                                repetition_penalty=repetition_penalty, stop_token_ids=tuple(eos),
                                seed=seed).resolved(gc, t, model.config.text_config.vocab_size)
    if options.seed is not None and generator is None:
        generator = torch.Generator(device=input_ids.device).manual_seed(options.seed)

    rows = _requests(model, input_ids, attention_mask.bool(), input_features, input_features_mask, options,
                     generator)
    longest = max(r.prompt_tokens for r in rows)
    runner = ModelRunner(model, b, longest + options.max_new_tokens)
    core = EngineCore(runner, Scheduler(b, sys.maxsize), OutputProcessor(None, runner.max_len))
    for r in rows:
        core.add(r)
    while core.has_work:
        core.step()
    if any(r.error is not None for r in rows):
        raise next(r.error for r in rows if r.error is not None)
    new = max(len(r.tokens) for r in rows)
    out = torch.full((b, t + new), pad, dtype=input_ids.dtype, device=input_ids.device)  # [B, T + new]
    out[:, :t] = input_ids
    for i, r in enumerate(rows):
        out[i, t:t + len(r.tokens)] = torch.tensor(r.tokens, dtype=input_ids.dtype)
    return out


def _requests(model: Any, input_ids: Tensor, keep: Tensor, features: Tensor | None, features_mask: Tensor | None,
              options: GenerationOptions, generator: torch.Generator | None) -> list[Request]:
    """One request per row: its real tokens, and its share of the batch's audio embeddings (``<sound>`` slots are
    filled in row-major order, as ``AF3Model.forward`` fills them)."""
    sound = input_ids == model.config.audio_token_id  # [B, T]
    audio = None
    if features is not None:
        with torch.inference_mode():
            audio = model.get_audio_features(features, features_mask)  # [sum of audio tokens, D]
        if audio.shape[0] != int(sound.sum()):
            raise InputError(f"audio features and <sound> tokens do not match: {int(sound.sum())} tokens, "
                             f"{audio.shape[0]} audio frames")
        if bool((sound & ~keep).any()):
            raise InputError("a <sound> token lies under padding (attention_mask 0)")
    ids_cpu, keep_cpu = input_ids.cpu(), keep.cpu()
    counts = sound.sum(-1).tolist()
    reqs, offset = [], 0
    for i in range(input_ids.shape[0]):
        ids = ids_cpu[i][keep_cpu[i]]
        if not ids.numel():
            raise InputError(f"row {i} of attention_mask has no real token")
        share = None
        if audio is not None and counts[i]:
            share = audio[offset:offset + counts[i]]
            offset += counts[i]
        reqs.append(Request(i, ids, options, audio_embeds=share, penalty_ids=ids_cpu[i], generator=generator,
                            chain=build_chain(options)))
    return reqs


def _pad_id(model: Any, pad_token_id: int | None, eos_ids: list[int]) -> int:
    gc, text = model.generation_config, model.config.text_config
    for candidate in (pad_token_id, gc.pad_token_id, text.pad_token_id):
        if candidate is not None:
            return int(candidate)
    return eos_ids[0] if eos_ids else 0
