"""Structured output: constrain decoding to JSON that follows a JSON schema.

The grammar work is done by `llguidance <https://github.com/guidance-ai/llguidance>`_ (an optional dependency,
``pip install 'af3[structured]'``): it compiles the schema to a grammar, and for every decoding step computes which
tokens of the checkpoint's vocabulary may come next. A :class:`JsonSchemaConstraint` is one request's parser state::

    c = JsonSchemaConstraint(processor.tokenizer, schema, eos_token_ids)
    logits = logits.masked_fill(~c.allowed(logits.shape[-1], logits.device), float("-inf"))
    token = ...  # sample as usual
    c.advance(token)
    if c.is_complete(): ...  # the JSON value is finished; only an end token may follow

Special tokens (``<sound>``, ``<|im_start|>``, ...) are never allowed; the end tokens are allowed exactly when the
JSON value is complete. Whitespace between JSON tokens is allowed but bounded (at most ``MAX_WHITESPACE``
characters in a row), so a model cannot get stuck emitting blank lines; a schema may override this with
llguidance's top-level ``"x-guidance"`` options (e.g. ``{"whitespace_flexible": false}`` for compact JSON).
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..chat import TextTokenizer
from ..errors import AF3Error, InputError

#: The schema used when a request asks for JSON without giving one: any JSON object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}
#: Longest run of whitespace characters allowed between two JSON tokens (enough for pretty-printed nesting).
MAX_WHITESPACE = 20
_COMPILE_DEFAULTS = {"whitespace_pattern": rf"[\x20\x0A\x0D\x09]{{1,{MAX_WHITESPACE}}}"}


class StructuredOutputUnavailable(AF3Error):
    """Structured output was requested but cannot be provided here (llguidance missing, unusable tokenizer)."""

    status_code = 501


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise StructuredOutputUnavailable(
            "structured (JSON schema) output needs the llguidance package: pip install 'af3[structured]'"
        ) from None
    return llguidance


#: llguidance's stop reasons, as a user can read them.
_STOP_REASONS = {
    "NoExtensionBias": "no token of this model's vocabulary can continue the JSON here (the schema asks for text "
                       "the tokenizer cannot spell, or the whitespace limit was reached)",
    "NoExtension": "the JSON value cannot be continued",
    "MaxTokensTotal": "the JSON needs more tokens than the grammar engine allows",
    "MaxTokensParser": "the JSON needs more tokens than the grammar engine allows",
    "ParserTooComplex": "the JSON schema is too complex for the grammar engine; simplify it",
    "LexerTooComplex": "the JSON schema is too complex for the grammar engine; simplify it",
    "InternalError": "the grammar engine failed (an internal error)",
}


def _first_line(message: str) -> str:
    """llguidance's message in one readable line: its stop reasons explained, multi-line errors joined."""
    text = " ".join(message.split())
    if not text:
        return "unknown error"
    for reason, readable in _STOP_REASONS.items():
        if text == reason or text.startswith((f"{reason}:", f"{reason} ", f"stop reason: {reason}")):
            return readable
    return text if len(text) <= 300 else text[:297] + "..."


def _compile(schema: dict) -> str:
    """The llguidance grammar for a parsed schema (bounded whitespace unless the schema's x-guidance says else)."""
    llg = _llguidance()
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults=_COMPILE_DEFAULTS)
    except (ValueError, TypeError) as e:
        raise InputError(f"invalid JSON schema: {e}") from None


def validate_schema(schema: dict | str | None) -> dict:
    """Parse and check a JSON schema (a dict, its JSON text, or ``None`` for any JSON object).

    Raises :class:`InputError` for a schema that is not a JSON object, is malformed, unsatisfiable, or uses
    keywords the grammar compiler does not support (e.g. ``uniqueItems``).
    """
    if schema is None:
        return dict(ANY_OBJECT)
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise InputError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InputError(f"a JSON schema must be a JSON object like {{'type': 'object', ...}}, "
                         f"not {type(schema).__name__}")
    try:
        json.dumps(schema)
    except (TypeError, ValueError) as e:
        raise InputError(f"the JSON schema is not JSON-serialisable: {e}") from None
    grammar = _compile(schema)
    is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InputError(f"unsupported or invalid JSON schema: {_first_line(messages[0] if messages else '')}")
    return schema


def _eos_tuple(tokenizer: TextTokenizer, eos_token_ids: Sequence[int] | None) -> tuple[int, ...]:
    eos = tuple(dict.fromkeys(int(i) for i in (eos_token_ids or ())))
    if not eos and tokenizer.eos_token_id is not None:
        eos = (tokenizer.eos_token_id,)
    if not eos:
        raise InputError("structured output needs at least one end token id to finish the JSON value")
    return eos


_TOKENIZER_CACHE: weakref.WeakKeyDictionary[TextTokenizer, dict[tuple[int, ...], Any]] = weakref.WeakKeyDictionary()
_TOKENIZER_LOCK = threading.Lock()


def build_tokenizer_info(tokenizer: TextTokenizer, eos_token_ids: Sequence[int] | None):
    """The ``llguidance.LLTokenizer`` for ``tokenizer`` with these end tokens, cached per tokenizer object.

    It is built from the serialised ``tokenizers.Tokenizer`` (the checkpoint's ``tokenizer.json``), so
    transformers is not needed; llguidance reads the byte form of every token and which ones are special.
    """
    eos = _eos_tuple(tokenizer, eos_token_ids)
    with _TOKENIZER_LOCK:
        per_eos = _TOKENIZER_CACHE.setdefault(tokenizer, {})
        if eos not in per_eos:
            llg = _llguidance()
            try:
                per_eos[eos] = llg.LLTokenizer(tokenizer.tokenizer.to_str(), eos_token=list(eos))
            except Exception as e:  # the Rust side raises plain exceptions for tokenizers it cannot read
                raise StructuredOutputUnavailable(
                    f"llguidance cannot use this checkpoint's tokenizer for structured output: {e}") from None
        return per_eos[eos]


class JsonSchemaConstraint:
    """One request's JSON-schema constraint: which tokens may come next, and the parser state so far."""

    def __init__(self, tokenizer: TextTokenizer, schema: dict | str | None, eos_token_ids: Sequence[int]):
        llg = _llguidance()
        self.schema = validate_schema(schema)
        self.eos_token_ids = _eos_tuple(tokenizer, eos_token_ids)
        self._tokenizer = tokenizer
        self._info = build_tokenizer_info(tokenizer, self.eos_token_ids)
        self._matcher = llg.LLMatcher(self._info, _compile(self.schema), log_level=0)
        if self._matcher.is_error():
            raise InputError(f"unsupported or invalid JSON schema: {_first_line(self._matcher.get_error())}")
        self._mask: np.ndarray | None = None  # bool [tokenizer vocab] for the current state, computed on demand
        self._ended = False  # an end token was consumed

    @property
    def tokenizer_vocab_size(self) -> int:
        return int(self._info.vocab_size)

    def _current_mask(self) -> np.ndarray:
        if self._mask is None:
            n = self.tokenizer_vocab_size
            bits = np.frombuffer(self._matcher.compute_bitmask(), dtype=np.uint8)
            mask = np.unpackbits(bits, bitorder="little")[:n].astype(bool)
            if self._matcher.is_error():
                raise InputError(f"structured output failed: {_first_line(self._matcher.get_error())}")
            accepting = self._matcher.is_accepting()
            for i in self.eos_token_ids:
                if i < n:
                    mask[i] = accepting
            self._mask = mask
        return self._mask

    def allowed(self, vocab_size: int, device: torch.device | str | None = None) -> Tensor:
        """bool ``[vocab_size]``: True where the token may come next. Ids past the tokenizer's vocabulary (the
        model's padded rows) are never allowed; end tokens only once the JSON value is complete."""
        mask = self._current_mask()
        # numpy, not torch, for the copy: small torch CPU ops wake the intra-op thread pool (milliseconds when
        # the cores are busy), numpy's stay in this thread (~10 us for a 150k vocabulary).
        out = np.zeros(vocab_size, dtype=bool)
        n = min(vocab_size, mask.size)
        out[:n] = mask[:n]
        t = torch.from_numpy(out)
        return t.to(device) if device is not None else t

    def _describe(self, token_id: int) -> str:
        try:
            return f"token {token_id} ({self._tokenizer.decode([token_id])!r})"
        except Exception:  # an id the tokenizer cannot decode
            return f"token {token_id}"

    def advance(self, token_id: int) -> None:
        """Feed the chosen token. Raises :class:`InputError` (leaving the state unchanged) if it was not allowed."""
        token_id = int(token_id)
        if token_id in self.eos_token_ids:
            if self._ended:
                return
            if not self._matcher.is_accepting():
                raise InputError(f"{self._describe(token_id)} ends the output before the JSON value is complete")
            self._matcher.consume_token(token_id)
            self._ended = True
            self._mask = None
            return
        if self._ended or self.is_complete():
            raise InputError(f"{self._describe(token_id)} comes after the complete JSON value; only an end token "
                             "may follow")
        if not 0 <= token_id < self.tokenizer_vocab_size:
            raise InputError(f"token {token_id} is outside the tokenizer's vocabulary")
        ok = bool(self._mask[token_id]) if self._mask is not None else self._matcher.validate_tokens([token_id]) == 1
        if not ok:
            raise InputError(f"{self._describe(token_id)} does not fit the JSON schema here")
        if not self._matcher.consume_token(token_id):
            raise InputError(f"{self._describe(token_id)} was rejected: {_first_line(self._matcher.get_error())}")
        self._mask = None

    def is_accepting(self) -> bool:
        """The text so far is a complete JSON value (an end token may come now, though more might still fit,
        e.g. further digits of a top-level number)."""
        return self._ended or self._matcher.is_accepting()

    def is_complete(self) -> bool:
        """The JSON value is complete and nothing but an end token can follow."""
        return self._ended or (self._matcher.is_stopped() and not self._matcher.is_error())
