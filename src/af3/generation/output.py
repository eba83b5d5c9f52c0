"""What a request gives back: chosen tokens checked against stop conditions, incremental text, logprobs.

``OutputProcessor.accept`` takes each new token of a request (with the model's raw logits, for logprobs) and decides
whether the request is finished: an end token, a complete JSON value, ``max_new_tokens``, the KV row's length, or a
stop string in the text. Text is decoded only when someone reads it before the end (streaming, stop strings); a
stream never emits an incomplete UTF-8 character or the start of a possible stop string.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import Tensor

from .scheduler import Request


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Output:
    """A finished request."""

    request_id: int
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end token, JSON complete or stop string), "length", "cancelled" or "error"
    prompt_tokens: int
    cached_prompt_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    audio_windows_cached: int = 0
    logprobs: list[TokenLogprob] | None = None
    audio_tokens: int = 0  # of prompt_tokens, the audio's


@dataclass
class Delta:
    """One streamed piece of a request: new text (possibly empty) and, on the last one, the whole output."""

    request_id: int
    text: str
    token_ids: list[int]
    finished: bool = False
    output: Output | None = None


class OutputProcessor:
    """Stop conditions, text and logprobs of requests; ``decode`` turns token ids into text (None: no text, as
    for ``AF3Model.generate``, which returns ids only)."""

    def __init__(self, decode: Callable[[list[int]], str] | None, max_seq_len: int):
        self.decode = decode
        self.max_seq_len = max_seq_len

    def accept(self, req: Request, token: int, raw_logits: Tensor | None) -> None:
        """Record ``token`` as the request's next one (``raw_logits`` [1, V]: the model's, before processing)."""
        o = req.options
        if o.logprobs and raw_logits is not None:
            lp = raw_logits.log_softmax(-1)[0]
            top = []
            if o.top_logprobs:
                values, idx = lp.topk(o.top_logprobs)
                top = list(zip(idx.tolist(), values.tolist(), strict=True))
            req.logprobs.append(TokenLogprob(token, float(lp[token]), top))
        req.tokens.append(token)
        c = req.constraint
        if c is not None and token not in o.stop_token_ids:
            c.advance(token)
        if token in o.stop_token_ids or (c is not None and c.is_complete()):
            req.finish_reason = "stop"
        elif len(req.tokens) >= o.max_new_tokens or req.length + 1 >= self.max_seq_len:
            req.finish_reason = "length"
        if self.decode is not None and (req.stream is not None or o.stop or req.finish_reason is not None):
            self._update_text(req)

    def _update_text(self, req: Request) -> None:
        ids = req.tokens
        if req.finish_reason == "stop" and ids and ids[-1] in req.options.stop_token_ids:
            ids = ids[:-1]
        text = self.decode(ids)
        cut = None
        for s in req.options.stop:
            k = text.find(s)
            if k >= 0 and (cut is None or k < cut):
                cut = k
        if cut is not None:
            text = text[:cut]
            req.finish_reason = "stop"
        req.text = text
        if req.stream is None:
            return
        # Hold back an incomplete UTF-8 character and anything that may be the start of a stop string.
        safe = len(text)
        if req.finish_reason is None:
            if text.endswith("\ufffd"):
                safe = len(text.rstrip("\ufffd"))
            for s in req.options.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        if safe > req.emitted_chars:
            req.stream.put(Delta(req.id, text[req.emitted_chars:safe], [req.tokens[-1]]))
            req.emitted_chars = safe
            _notify(req)

    def finish(self, req: Request) -> None:
        """Build the request's :class:`Output`, end its stream and wake whoever waits on it."""
        req.output = Output(req.id, req.text, list(req.tokens), req.finish_reason or "stop", req.prompt_tokens,
                            req.cached_prompt_tokens, req.audio_windows_cached,
                            req.logprobs if req.options.logprobs else None, req.audio_tokens)
        if req.stream is not None:
            req.stream.put(Delta(req.id, req.text[req.emitted_chars:], [], True, req.output))
        req.done.set()
        _notify(req)

    def fail(self, req: Request, error: BaseException) -> None:
        """End a request that cannot go on (``error`` is re-raised to whoever waits on it)."""
        req.error = error
        req.finish_reason = "error"
        req.output = Output(req.id, req.text, list(req.tokens), "error", req.prompt_tokens)
        if req.stream is not None:
            req.stream.put(Delta(req.id, "", [], True, req.output))
        req.done.set()
        _notify(req)


def _notify(req: Request) -> None:
    """Tell the request's waiter (an asyncio loop, say) that there is something to read; its errors stay its own."""
    if req.on_update is not None:
        try:
            req.on_update()
        except Exception:  # noqa: BLE001 (a waiter's callback must not stop the loop that serves everyone)
            logging.getLogger("af3").exception("a request's on_update callback failed")
