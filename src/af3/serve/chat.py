"""``POST /v1/chat/completions``: an OpenAI chat request → Engine requests → a ``chat.completion`` (or its chunks).

Translation only: the request's fields become :class:`~af3.generation.options.GenerationOptions` (the Engine checks
every value; a bad one is a 400 with the Engine's message), its messages an af3 conversation (:mod:`.media`),
``n`` choices become ``n`` Engine requests (seeds ``seed + i``), and the Engine's outputs become OpenAI's shapes:
``usage`` (prompt tokens with their audio and prefix-cached parts), ``finish_reason`` ``stop``/``length``,
``logprobs.content``. Streaming sends ``chat.completion.chunk`` events and ``data: [DONE]``; an error after the
stream started is one ``data: {"error": ...}`` event before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..errors import InputError
from ..generation.options import GenerationOptions
from . import schemas
from .bridge import EngineBridge, Handle
from .errors import APIError, body, from_exception
from .media import MediaResolver
from .schemas import ChatRequest


class ChatService:
    def __init__(self, engine: Any, bridge: EngineBridge, media: MediaResolver, model_ids: dict[str, bool],
                 max_n: int):
        self.engine, self.bridge, self.media = engine, bridge, media
        self.model_ids = model_ids  # served id -> think mode
        self.max_n = max_n

    # ------------------------------------------------------------------ request → options
    def options(self, req: ChatRequest) -> tuple[GenerationOptions, bool]:
        if req.model not in self.model_ids:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                           f"{', '.join(self.model_ids)}", "model", code="model_not_found")
        if not 1 <= req.n <= self.max_n:
            raise APIError(400, f"n must be between 1 and {self.max_n}, got {req.n}", "n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(req, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported (use repetition_penalty)", name)
        if req.top_logprobs is not None and not req.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        schema: Any = None
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_object":
            schema = True
        elif fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise APIError(400, "response_format json_schema needs a json_schema object", "response_format")
            schema = fmt.json_schema.schema_
        think = self.model_ids[req.model] or bool(req.think)
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        return GenerationOptions(
            max_new_tokens=max_tokens, min_new_tokens=req.min_tokens or 0, temperature=req.temperature,
            top_p=req.top_p, top_k=req.top_k, repetition_penalty=req.repetition_penalty, seed=req.seed,
            stop=req.stop or (), logprobs=req.logprobs, top_logprobs=req.top_logprobs or 0, think=think,
            json_schema=schema,
        ), req.stream

    # ------------------------------------------------------------------ the route
    async def handle(self, http: Request, data: Any) -> Any:
        req = ChatRequest.parse(data)
        options, stream = self.options(req)
        self.media.check(req.messages)
        # Every value is checked before any audio is decoded (the Engine checks them again with the prompt).
        try:
            options.resolved(self.engine.model.generation_config, 0, self.engine.model.config.text_config.vocab_size)
        except InputError as e:
            raise _in_openai_terms(e) from None
        self.bridge.reserve(req.n)
        handles: list[Handle] = []
        try:
            conversation, seconds = await run_in_threadpool(self.media.conversation, req.messages)
            self.bridge.metrics.audio_seconds.inc(seconds)
            for i in range(req.n):
                seeded = options if options.seed is None or i == 0 else _with_seed(options, options.seed + i)
                handles.append(await self.bridge.submit(conversation, seeded, stream))
        except BaseException:
            self.bridge.release(req.n - len(handles))
            for h in handles:
                h.cancel()
            raise
        if stream:
            include_usage = req.stream_options is not None and req.stream_options.include_usage
            return StreamingResponse(self._stream(handles, req.model, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            async with self.bridge.deadline(handles):
                outputs = await asyncio.gather(*(h.output(http.is_disconnected) for h in handles))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        choices = [schemas.choice(i, o.text, _finish(o.finish_reason), self._logprobs(o) if req.logprobs else None)
                   for i, o in enumerate(outputs)]
        return JSONResponse(schemas.completion(schemas.completion_id(), req.model, choices, self._usage(outputs)))

    async def _stream(self, handles: list[Handle], model: str, include_usage: bool) -> AsyncIterator[str]:
        cid, created = schemas.completion_id(), schemas.now()
        outputs: list[Any] = [None] * len(handles)
        events: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, h: Handle) -> None:
            try:
                async for delta in h.deltas():
                    await events.put((i, delta, None))
            except BaseException as e:  # noqa: BLE001 (sent to the client as an error event)
                await events.put((i, None, e))

        tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
        try:
            for i in range(len(handles)):
                yield _sse(schemas.chunk(cid, model, created, [schemas.delta_choice(i, "", role="assistant")]))
            async with self.bridge.deadline(handles):
                left = len(handles)
                while left:
                    i, delta, error = await events.get()
                    if error is not None:
                        raise error
                    req = handles[i].req
                    lps = self._delta_logprobs(req, delta) if req.options.logprobs else None
                    if delta.finished:
                        left -= 1
                        if req.error is not None:
                            raise req.error
                        outputs[i] = delta.output
                        yield _sse(schemas.chunk(cid, model, created, [schemas.delta_choice(
                            i, delta.text or None, finish_reason=_finish(delta.output.finish_reason), logprobs=lps)]))
                    elif delta.text:
                        yield _sse(schemas.chunk(cid, model, created, [schemas.delta_choice(i, delta.text,
                                                                                            logprobs=lps)]))
            if include_usage:
                yield _sse(schemas.chunk(cid, model, created, [], self._usage(outputs)))
        except asyncio.CancelledError:  # the client went away: free the rows now
            for h in handles:
                h.cancel()
            raise
        except BaseException as e:  # noqa: BLE001 (headers are sent: the error goes in the stream)
            for h in handles:
                h.cancel()
            err = from_exception(e)
            yield _sse(body(err.status, err.message, err.param, err.code))
        finally:
            for t in tasks:
                t.cancel()
        yield "data: [DONE]\n\n"

    # ------------------------------------------------------------------ output pieces
    @staticmethod
    def _usage(outputs: list[Any]) -> dict:
        first = outputs[0]
        completion = sum(len(o.token_ids) for o in outputs)
        return schemas.usage(first.prompt_tokens, completion, first.cached_prompt_tokens, first.audio_tokens)

    def _token(self, token_id: int, logprob: float) -> dict:
        text = self.engine.token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _logprobs(self, output: Any) -> list[dict]:
        return [{**self._token(lp.token_id, lp.logprob), "top_logprobs": [self._token(t, v) for t, v in lp.top]}
                for lp in output.logprobs or []]

    def _delta_logprobs(self, req: Any, delta: Any) -> list[dict] | None:
        """The logprobs of the tokens this delta carries (the ones produced since the last delta)."""
        done = getattr(req, "_lp_sent", 0)
        new = req.logprobs[done:]
        req._lp_sent = done + len(new)
        if not new:
            return None
        return [{**self._token(lp.token_id, lp.logprob), "top_logprobs": [self._token(t, v) for t, v in lp.top]}
                for lp in new]


#: The Engine's option names → the request fields they come from.
_FIELDS = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "json_schema": "response_format",
           "stop_token_ids": "stop", "do_sample": "temperature"}


def _in_openai_terms(e: InputError) -> APIError:
    """An options error, naming the request's field rather than the Engine's option."""
    message = " ".join(str(e).split())
    name = message.split(" ", 1)[0]
    param = _FIELDS.get(name, name)
    if name in _FIELDS:
        message = param + message[len(name):]
    return APIError(400, message, param, code="invalid_value")


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _with_seed(options: GenerationOptions, seed: int) -> GenerationOptions:
    import dataclasses

    return dataclasses.replace(options, seed=seed % (1 << 64))


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
