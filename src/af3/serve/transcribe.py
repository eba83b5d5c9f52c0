"""``POST /v1/audio/transcriptions``: an upload of any length → :func:`af3.longform.transcribe_long` on the shared
Engine → OpenAI's ``json``, ``text``, ``srt``, ``vtt`` or ``verbose_json`` (segments with times, and the duration),
or, with ``stream=true``, one ``transcript.text.delta`` event per finished segment and ``transcript.text.done``.

The file streams through the transcriber segment by segment (memory stays flat), AF3's framing of its ASR answers
is stripped, and the SRT/VTT/JSON texts are the ones ``af3 transcribe`` writes. ``prompt`` replaces the instruction
AF3 is given ("Transcribe the input speech." by default). A client that leaves, or a job past the request timeout,
stops the transcription at its next batch of segments.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from .. import longform
from .bridge import EngineBridge
from .errors import APIError, body, from_exception
from .media import policy_for_transcription
from .settings import ServeSettings

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


class _Stopped(Exception):
    """The client left or the job timed out: the transcription ends at its next segment."""


class TranscriptionService:
    def __init__(self, engine: Any, bridge: EngineBridge, settings: ServeSettings, model_ids: dict[str, bool]):
        self.engine, self.bridge, self.settings, self.model_ids = engine, bridge, settings, model_ids
        self.policy = policy_for_transcription(settings)

    async def handle(self, http: Request, form: Any) -> Any:
        args = self._arguments(form)
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "file is required (multipart/form-data with the audio in 'file')", "file")
        data = await upload.read(self.settings.max_upload_bytes + 1)
        if len(data) > self.settings.max_upload_bytes:
            raise APIError(413, f"the file is larger than this server's {self.settings.max_upload_mb:g} MB limit",
                           "file", code="file_too_large")
        if not data:
            raise APIError(400, "the file is empty", "file", code="invalid_audio")
        self.bridge.reserve(1)
        stop = threading.Event()
        loop = asyncio.get_running_loop()
        segments: asyncio.Queue = asyncio.Queue()

        def on_segment(segment: longform.TranscriptSegment) -> None:
            if stop.is_set():
                raise _Stopped
            loop.call_soon_threadsafe(segments.put_nowait, segment)

        def run() -> longform.Transcript:
            generate = longform.engine_generate_fn(self.engine, temperature=args["temperature"])
            return longform.transcribe_long(None, self.engine.processor, data, prompt=args["prompt"],
                                            batch_size=self.engine.max_batch_size, generate_fn=generate,
                                            policy=self.policy, max_duration_s=self.settings.max_transcription_s,
                                            on_segment=on_segment)

        job = asyncio.ensure_future(run_in_threadpool(run))
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(segments.put_nowait, None))
        job.add_done_callback(lambda _: self.bridge.release(1))
        if args["stream"]:
            return StreamingResponse(self._events(job, segments, stop), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            async with asyncio.timeout(self.bridge.timeout_s):
                while not (await asyncio.wait([job], timeout=1.0))[0]:  # (waiting never cancels the job)
                    if await http.is_disconnected():
                        stop.set()
                        raise asyncio.CancelledError
                transcript = job.result()
        except TimeoutError:
            stop.set()
            self.bridge.metrics.timeouts.inc()
            raise APIError(504, f"the transcription took longer than this server's {self.bridge.timeout_s:g} s "
                           "limit and was stopped", code="timeout") from None
        except BaseException:
            stop.set()
            raise
        return self._response(transcript, args)

    # ------------------------------------------------------------------ pieces
    def _arguments(self, form: Any) -> dict[str, Any]:
        model = form.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "model is required", "model")
        if model not in self.model_ids:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                           f"{', '.join(self.model_ids)}", "model", code="model_not_found")
        fmt = form.get("response_format") or "json"
        if fmt not in FORMATS:
            raise APIError(400, f"response_format must be one of {', '.join(FORMATS)}, got {fmt!r}",
                           "response_format")
        granularities = form.getlist("timestamp_granularities[]") + form.getlist("timestamp_granularities")
        for g in granularities:
            if g not in ("segment", "word"):
                raise APIError(400, f"timestamp_granularities: unknown value {g!r}; use segment",
                               "timestamp_granularities")
            if g == "word":
                raise APIError(400, "word timestamps are not supported (AF3 gives none); use segment",
                               "timestamp_granularities")
        temperature = _number(form.get("temperature"), "temperature", 0.0)
        if not 0.0 <= temperature <= 2.0:
            raise APIError(400, f"temperature must be between 0 and 2, got {temperature:g}", "temperature")
        prompt = form.get("prompt")
        if prompt is not None and (not isinstance(prompt, str) or len(prompt) > 2000):
            raise APIError(400, "prompt must be text of at most 2000 characters", "prompt")
        language = form.get("language")
        if language is not None and (not isinstance(language, str) or len(language) > 32):
            raise APIError(400, "language must be a short language name or code", "language")
        stream = (form.get("stream") or "false").lower()
        if stream not in ("true", "false", "1", "0"):
            raise APIError(400, f"stream must be true or false, got {stream!r}", "stream")
        return {"model": model, "format": fmt, "temperature": temperature, "prompt": prompt or None,
                "language": language, "stream": stream in ("true", "1")}

    def _response(self, transcript: longform.Transcript, args: dict) -> Any:
        fmt = args["format"]
        if fmt == "text":
            return PlainTextResponse(transcript.text + "\n")
        if fmt == "srt":
            return PlainTextResponse(longform.to_srt(transcript))
        if fmt == "vtt":
            return PlainTextResponse(longform.to_vtt(transcript), media_type="text/vtt")
        if fmt == "json":
            return JSONResponse({"text": transcript.text})
        segments = [{"id": i, "seek": 0, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text,
                     "tokens": [], "temperature": args["temperature"], "avg_logprob": None,
                     "compression_ratio": None, "no_speech_prob": None}
                    for i, s in enumerate(transcript.segments)]
        return JSONResponse({"task": "transcribe", "language": args["language"],
                             "duration": round(transcript.duration, 3), "text": transcript.text,
                             "segments": segments})

    async def _events(self, job: asyncio.Future, segments: asyncio.Queue, stop: threading.Event
                      ) -> AsyncIterator[str]:
        texts = []
        try:
            async with asyncio.timeout(self.bridge.timeout_s):
                while True:
                    segment = await segments.get()
                    if segment is None:
                        break
                    if segment.text:
                        delta = segment.text if not texts else " " + segment.text
                        texts.append(segment.text)
                        yield _sse({"type": "transcript.text.delta", "delta": delta})
                job.result()  # raises what the transcription raised
            yield _sse({"type": "transcript.text.done", "text": " ".join(texts)})
        except asyncio.CancelledError:
            stop.set()
            raise
        except BaseException as e:  # noqa: BLE001 (headers are sent: the error goes in the stream)
            stop.set()
            err = APIError(504, "the transcription took too long and was stopped", code="timeout") \
                if isinstance(e, TimeoutError) else from_exception(e)
            yield _sse(body(err.status, err.message, err.param, err.code))
        yield "data: [DONE]\n\n"


def _number(value: Any, name: str, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise APIError(400, f"{name} must be a number, got {value!r}", name) from None
    if not math.isfinite(number):
        raise APIError(400, f"{name} must be a finite number, got {value!r}", name)
    return number


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
