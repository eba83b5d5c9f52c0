"""How a request is decoded: one frozen options type, one set of defaults, all validation.

Every way in (``Engine.generate`` / ``stream``, ``AF3Model.generate``, long-form transcription, the CLI) builds a
:class:`GenerationOptions` and calls :meth:`GenerationOptions.resolved`, which fills unset fields from the
checkpoint's generation config and checks every value, so that the same request means the same thing everywhere:

* ``temperature=0`` is greedy (as in the OpenAI API); ``do_sample=True`` with a temperature <= 0 is an error, and so
  is a negative, NaN or infinite temperature (never silently greedy).
* Every value is checked for its type (``True`` is not an integer, ``"7"`` is not a number, ``1.0`` is the integer
  1) and its range (the ``MAX_*`` constants below), with one message per field that the CLI, the Python API and a
  server all show. :func:`check_option_names` names unknown options instead of a ``TypeError``.
* ``max_new_tokens`` unset: the checkpoint's ``max_new_tokens``, else its ``max_length`` minus the prompt, else
  :data:`DEFAULT_MAX_NEW_TOKENS`.
* ``top_k`` / ``top_p`` / ``repetition_penalty`` unset: the checkpoint's values (``top_k=0`` and ``top_p=1`` switch
  the filters off).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields, replace
from typing import Any

from ..errors import InputError

#: New tokens per request when neither the caller nor the checkpoint's generation config sets a limit.
DEFAULT_MAX_NEW_TOKENS = 512
#: Most alternatives a request may ask to see per token (the OpenAI API's limit).
MAX_TOP_LOGPROBS = 20
#: Most new tokens one request may ask for (beyond any AF3 context; the Engine also caps at its sequence length).
MAX_NEW_TOKENS = 1 << 20
#: Most stop strings per request, and the longest one (characters).
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
#: Seeds are what ``torch.Generator.manual_seed`` takes: 0 .. 2**64 - 1.
MAX_SEED = (1 << 64) - 1
#: Largest temperature / repetition penalty accepted (beyond it sampling is noise or the logits vanish).
MAX_TEMPERATURE = 100.0
MAX_REPETITION_PENALTY = 100.0


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
    #: Keep this request's audio embeddings (audio cache) and, when it ends, its keys/values (prefix cache) for
    #: follow-up requests; False for one-off requests such as transcription segments, which nobody continues
    #: (it still uses what the caches already hold).
    keep_cache: bool = True
    #: JSON output: a JSON schema (dict or JSON string), or True for any JSON object (llguidance-constrained);
    #: resolved to a dict, True or None.
    json_schema: dict | str | bool | None = None

    def resolved(self, gc: Any, prompt_tokens: int = 0, vocab_size: int | None = None) -> GenerationOptions:
        """Every field set: unset ones from ``gc`` (an :class:`af3.config.GenerationConfig`); every value checked
        (stop token ids against ``vocab_size`` when given)."""
        temperature = _number("temperature", gc.temperature if self.temperature is None else self.temperature,
                              0.0, MAX_TEMPERATURE)
        if self.do_sample is None:
            do_sample = gc.do_sample if self.temperature is None else temperature > 0
            do_sample = bool(do_sample) and temperature > 0  # a checkpoint's temperature 0 also means greedy
        else:
            do_sample = _bool("do_sample", self.do_sample)
            if do_sample and not temperature > 0:
                raise InputError(f"temperature must be > 0 when sampling (got {temperature}); use temperature=0 "
                                 "or do_sample=False for greedy decoding")
        max_new = self.max_new_tokens if self.max_new_tokens is not None else default_max_new_tokens(gc,
                                                                                                   prompt_tokens)
        out = replace(
            self,
            do_sample=do_sample,
            temperature=temperature if do_sample else 1.0,
            top_k=_int("top_k", self.top_k if self.top_k is not None else (gc.top_k or 0), 0),
            top_p=_number("top_p", self.top_p if self.top_p is not None else gc.top_p, 0.0, 1.0, low_open=True),
            repetition_penalty=_number("repetition_penalty", self.repetition_penalty
                                       if self.repetition_penalty is not None else gc.repetition_penalty,
                                       0.0, MAX_REPETITION_PENALTY, low_open=True),
            max_new_tokens=_int("max_new_tokens", max_new, 1, MAX_NEW_TOKENS),
            min_new_tokens=_int("min_new_tokens", self.min_new_tokens, 0, MAX_NEW_TOKENS),
            stop=_stop_strings(self.stop),
            stop_token_ids=_token_ids(self.stop_token_ids if self.stop_token_ids is not None else gc.eos_ids,
                                      vocab_size),
            logprobs=_bool("logprobs", self.logprobs),
            top_logprobs=_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS),
            think=_bool("think", self.think),
            keep_cache=_bool("keep_cache", self.keep_cache),
            seed=None if self.seed is None else _int("seed", self.seed, 0, MAX_SEED),
            json_schema=_json_schema(self.json_schema),
        )
        if out.min_new_tokens > out.max_new_tokens:
            raise InputError(f"min_new_tokens ({out.min_new_tokens}) must not exceed max_new_tokens "
                             f"({out.max_new_tokens})")
        return out


def check_option_names(names: Any) -> None:
    """Raise :class:`InputError` naming any of ``names`` that is not a :class:`GenerationOptions` field."""
    known = {f.name for f in fields(GenerationOptions)}
    unknown = sorted(str(n) for n in names if n not in known)
    if unknown:
        raise InputError(f"unknown generation option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
                         f"known ones: {', '.join(sorted(known))}")


def default_max_new_tokens(gc: Any, prompt_tokens: int) -> int:
    """The new-token limit of a request that sets none (see the module docstring)."""
    if gc.max_new_tokens is not None:
        return int(gc.max_new_tokens)
    if gc.max_length is not None:
        return int(gc.max_length) - prompt_tokens
    return DEFAULT_MAX_NEW_TOKENS


def _int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in [low, high]: ints, and floats with an integer value; never bools or strings."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{name} must be an integer (got {value!r})")
    if (low is not None and value < low) or (high is not None and value > high):
        raise InputError(f"{name} must be {_range(low, high)} (got {value})")
    return value


def _number(name: str, value: Any, low: float, high: float, low_open: bool = False) -> float:
    """``value`` as a finite float in [low, high] (``(low, high]`` with ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number (got {value!r})")
    if value < low or (low_open and value == low) or value > high:
        bracket = "(" if low_open else "["
        raise InputError(f"{name} must be in {bracket}{low:g}, {high:g}] (got {value:g})")
    return float(value)


def _bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{name} must be true or false (got {value!r})")
    return value


def _range(low: int | None, high: int | None) -> str:
    if low is not None and high is not None:
        return f"between {low} and {high}"
    return f">= {low}" if low is not None else f"<= {high}"


def _stop_strings(stop: Any) -> tuple[str, ...]:
    items = (stop,) if isinstance(stop, str) else stop
    if items is None:
        return ()
    if not isinstance(items, (list, tuple)):
        raise InputError(f"stop must be a string or a list of strings (got {type(stop).__name__})")
    if len(items) > MAX_STOP_STRINGS:
        raise InputError(f"at most {MAX_STOP_STRINGS} stop strings (got {len(items)})")
    for s in items:
        if not isinstance(s, str) or not s:
            raise InputError(f"stop strings must be non-empty strings (got {s!r})")
        if len(s) > MAX_STOP_CHARS:
            raise InputError(f"a stop string may have at most {MAX_STOP_CHARS} characters (got {len(s)})")
    return tuple(items)


def _token_ids(ids: Any, vocab_size: int | None) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
        raise InputError(f"stop_token_ids must be a list of token ids (got {ids!r})")
    out = tuple(_int("a stop token id", i, 0) for i in ids)
    if vocab_size is not None:
        bad = [i for i in out if i >= vocab_size]
        if bad:
            raise InputError(f"stop token id {bad[0]} is outside the vocabulary (0 .. {vocab_size - 1})")
    return out


def _json_schema(schema: Any) -> dict | bool | None:
    """A schema as a dict (a JSON string is parsed), ``True`` (any JSON object), or None/False (plain text)."""
    if schema is None or isinstance(schema, bool):
        return schema or None
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise InputError(f"json_schema is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(schema, dict):
        raise InputError(f"json_schema must be a JSON schema object, true (any JSON object) or null (got "
                         f"{type(schema).__name__})")
    return schema
