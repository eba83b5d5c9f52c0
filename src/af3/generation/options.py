"""How a request is decoded: one frozen options type, one set of defaults, all validation.

Every way in (``Engine.generate`` / ``stream``, ``AF3Model.generate``, long-form transcription, the CLI) builds a
:class:`GenerationOptions` and calls :meth:`GenerationOptions.resolved`, which fills unset fields from the
checkpoint's generation config and checks every value, so that the same request means the same thing everywhere:

* ``temperature=0`` is greedy (as in the OpenAI API); ``do_sample=True`` with a temperature <= 0 is an error.
* ``max_new_tokens`` unset: the checkpoint's ``max_new_tokens``, else its ``max_length`` minus the prompt, else
  :data:`DEFAULT_MAX_NEW_TOKENS`.
* ``top_k`` / ``top_p`` / ``repetition_penalty`` unset: the checkpoint's values (``top_k=0`` and ``top_p=1`` switch
  the filters off).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from ..errors import InputError

#: New tokens per request when neither the caller nor the checkpoint's generation config sets a limit.
DEFAULT_MAX_NEW_TOKENS = 512
#: Most alternatives a request may ask to see per token (the OpenAI API's limit).
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class GenerationOptions:
    """How one request is decoded. ``None`` fields take the checkpoint's generation config."""

    max_new_tokens: int | None = None
    min_new_tokens: int = 0
    temperature: float | None = None  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    think: bool = False  # switch on the checkpoint's thinking / long-audio LoRA adapter for this request
    #: JSON output: a JSON schema (dict or JSON string), or True for any JSON object (llguidance-constrained).
    json_schema: dict | str | bool | None = None

    def resolved(self, gc: Any, prompt_tokens: int = 0) -> GenerationOptions:
        """Every field set: unset ones from ``gc`` (an :class:`af3.config.GenerationConfig`); values checked."""
        temperature = gc.temperature if self.temperature is None else self.temperature
        _check_number("temperature", temperature)
        if self.do_sample is None:
            do_sample = gc.do_sample if self.temperature is None else temperature > 0
            do_sample = bool(do_sample) and temperature > 0  # a checkpoint's temperature 0 also means greedy
        else:
            do_sample = bool(self.do_sample)
            if do_sample and not temperature > 0:
                raise InputError(f"temperature must be > 0 when sampling (got {temperature}); use temperature=0 "
                                 "or do_sample=False for greedy decoding")
        out = replace(
            self,
            do_sample=do_sample,
            temperature=float(temperature) if do_sample else 1.0,
            top_k=_int("top_k", self.top_k if self.top_k is not None else (gc.top_k or 0)),
            top_p=float(self.top_p if self.top_p is not None else gc.top_p),
            repetition_penalty=float(self.repetition_penalty if self.repetition_penalty is not None
                                     else gc.repetition_penalty),
            max_new_tokens=_int("max_new_tokens", self.max_new_tokens if self.max_new_tokens is not None
                                else default_max_new_tokens(gc, prompt_tokens)),
            min_new_tokens=_int("min_new_tokens", self.min_new_tokens),
            stop=(self.stop,) if isinstance(self.stop, str) else tuple(self.stop),
            stop_token_ids=tuple(self.stop_token_ids) if self.stop_token_ids is not None else tuple(gc.eos_ids),
            top_logprobs=_int("top_logprobs", self.top_logprobs),
        )
        for name in ("top_p", "repetition_penalty"):
            _check_number(name, getattr(out, name))
        if out.max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1 (got {out.max_new_tokens})")
        if out.min_new_tokens < 0:
            raise InputError(f"min_new_tokens must be >= 0 (got {out.min_new_tokens})")
        if out.top_k < 0:
            raise InputError(f"top_k must be >= 0 (got {out.top_k})")
        if not 0 < out.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1] (got {out.top_p})")
        if not out.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0 (got {out.repetition_penalty})")
        if not 0 <= out.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InputError(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS} (got {out.top_logprobs})")
        if not all(isinstance(s, str) and s for s in out.stop):
            raise InputError("stop strings must be non-empty strings")
        return out


def default_max_new_tokens(gc: Any, prompt_tokens: int) -> int:
    """The new-token limit of a request that sets none (see the module docstring)."""
    if gc.max_new_tokens is not None:
        return int(gc.max_new_tokens)
    if gc.max_length is not None:
        return int(gc.max_length) - prompt_tokens
    return DEFAULT_MAX_NEW_TOKENS


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InputError(f"{name} must be an integer (got {value!r})")
    return value


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number (got {value!r})")
