"""The OpenAI request and response shapes the server speaks (pydantic v2 for requests, plain builders for responses).

Requests are validated strictly: a number sent as a string, a boolean where a number belongs or a list where a
string belongs is a 400 naming the field (OpenAI's behaviour), while fields the server does not know are ignored
(also OpenAI's). ``extra_body`` (sent literally by some clients; the official client merges it into the top level)
is merged into the top level before validation. Messages are checked part by part in :mod:`.chat`, where the
message can name the message and part.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import from_validation


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Strict):
    include_usage: bool = False


class JsonSchemaFormat(_Strict):
    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Strict):
    """``POST /v1/chat/completions``."""

    model: str
    messages: list[dict[str, Any]] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    # extras (top level, or in extra_body)
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    think: bool | None = None

    @classmethod
    def parse(cls, data: Any) -> ChatRequest:
        """The request, or a 400 naming the first field that is wrong."""
        if isinstance(data, dict) and isinstance(data.get("extra_body"), dict):
            data = {**data, **data["extra_body"]}
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise from_validation(e.errors()) from None


# ------------------------------------------------------------------------------------------------ responses
def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt: int, completion: int, cached: int = 0, audio: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": audio}}


def completion(cid: str, model: str, choices: list[dict], use: dict) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": now(), "model": model, "choices": choices,
            "usage": use, "system_fingerprint": None}


def choice(index: int, text: str, finish_reason: str, logprobs: list[dict] | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text, "refusal": None},
            "finish_reason": finish_reason, "logprobs": None if logprobs is None else {"content": logprobs}}


def chunk(cid: str, model: str, created: int, choices: list[dict], use: dict | None = None) -> dict[str, Any]:
    out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": choices,
           "system_fingerprint": None}
    if use is not None:
        out["usage"] = use
    return out


def delta_choice(index: int, content: str | None = None, role: str | None = None, finish_reason: str | None = None,
                 logprobs: list[dict] | None = None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"index": index, "delta": delta, "finish_reason": finish_reason,
            "logprobs": None if logprobs is None else {"content": logprobs}}


def model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "af3"}
