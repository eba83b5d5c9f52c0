"""The FastAPI application: routes, authentication, body limits, error shapes, the page.

``create_app(engine, settings)`` wires one started Engine to the routes:

* ``POST /v1/chat/completions`` (:mod:`.chat`), ``POST /v1/audio/transcriptions`` (:mod:`.transcribe`),
  ``GET /v1/models`` — behind the API key when one is set (``Authorization: Bearer``, compared in constant time);
* ``GET /health`` (the process answers), ``GET /ready`` (the Engine runs and has room), ``GET /metrics``
  (Prometheus; behind the key too), ``GET /`` and ``/web/*`` (the page; it asks for the key itself).

Bodies are capped while they are read (413 before the cap is passed, whatever Content-Length claims), JSON routes
want JSON (415 otherwise), and every error is OpenAI's ``{"error": {...}}`` with its status (:mod:`.errors`).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import mimetypes
import time
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import __version__
from ..errors import AF3Error
from .bridge import EngineBridge
from .chat import ChatService
from .errors import APIError, api_error_handler, http_error_handler, validation_handler
from .media import MediaResolver
from .metrics import Metrics
from .settings import ServeSettings
from .transcribe import TranscriptionService

logger = logging.getLogger("af3.serve")
WEB = resources.files("af3") / "serve" / "web"
mimetypes.add_type("text/javascript", ".js")  # (some systems map .js to text/plain; browsers refuse modules then)


class BodyTooLarge(APIError):
    def __init__(self, limit: int):
        super().__init__(413, f"the request body is larger than this server's {limit}-byte limit",
                         code="body_too_large")


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``limit`` bytes, by Content-Length up front and by counting
    while the body is read (a client may lie or stream)."""

    def __init__(self, app: ASGIApp, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await _send_413(send, self.limit)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except BodyTooLarge:
            if not started:
                await _send_413(send, self.limit)


async def _send_413(send: Send, limit: int) -> None:
    payload = json.dumps({"error": {"message": f"the request body is larger than this server's {limit}-byte limit",
                                    "type": "invalid_request_error", "param": None, "code": "body_too_large"}})
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload.encode()})


def create_app(engine: Any, settings: ServeSettings) -> FastAPI:
    """The server for one Engine (started and closed with the app's lifespan)."""
    metrics = Metrics(engine)
    bridge = EngineBridge(engine, settings.max_queue, settings.request_timeout_s, metrics)
    model_ids = {settings.model_name: False}
    if engine.lora is not None:
        model_ids[f"{settings.model_name}:think"] = True
    chat = ChatService(engine, bridge, MediaResolver(settings), model_ids, settings.max_n)
    transcriptions = TranscriptionService(engine, bridge, settings, model_ids)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        engine.start()
        yield
        engine.close()

    app = FastAPI(title="af3", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.bridge, app.state.metrics, app.state.settings = engine, bridge, metrics, settings
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(AF3Error, api_error_handler)
    app.add_exception_handler(Exception, api_error_handler)  # (the last resort: a 500 without internals)
    app.add_exception_handler(RequestValidationError, validation_handler)
    app.add_exception_handler(StarletteHTTPException, http_error_handler)

    def authorized(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    guarded = [Depends(authorized)]

    @app.post("/v1/chat/completions", dependencies=guarded)
    async def chat_completions(request: Request):
        return await chat.handle(request, await _json(request))

    @app.post("/v1/audio/transcriptions", dependencies=guarded)
    async def audio_transcriptions(request: Request):
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError(415, "send the audio as multipart/form-data with a 'file' part",
                           code="unsupported_media_type")
        async with request.form(max_files=1, max_fields=32) as form:
            return await transcriptions.handle(request, form)

    @app.get("/v1/models", dependencies=guarded)
    async def models():
        return {"object": "list", "data": [{"id": m, "object": "model", "created": created, "owned_by": "af3"}
                                           for m in model_ids]}

    @app.get("/v1/models/{model_id}", dependencies=guarded)
    async def model(model_id: str):
        if model_id not in model_ids:
            raise APIError(404, f"the model {model_id!r} does not exist", "model", code="model_not_found")
        return {"id": model_id, "object": "model", "created": created, "owned_by": "af3"}

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        running = engine._thread is not None and engine._thread.is_alive()
        if not running or bridge.full:
            return JSONResponse({"status": "busy" if running else "starting"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", dependencies=guarded)
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(str(WEB / "index.html"), headers={"Cache-Control": "no-cache"})

    app.mount("/web", _Uncached(directory=str(WEB)), name="web")
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(CountRequests, metrics=metrics)
    return app


class _Uncached(StaticFiles):
    """The page's files, revalidated on every load (a new release never pairs new HTML with an old script)."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


class CountRequests:
    """ASGI middleware: count responses by route template and status (pure ASGI, so streaming and disconnect
    detection pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or ("/web" if scope["path"].startswith("/web/") else "other")
            self.metrics.requests.labels(path, str(status[0])).inc()


async def _json(request: Request) -> Any:
    kind = request.headers.get("content-type", "")
    if kind and not kind.split(";")[0].strip().lower().endswith("json"):
        raise APIError(415, f"send the request as JSON (Content-Type: application/json), not {kind.split(';')[0]!r}",
                       code="unsupported_media_type")
    raw = await request.body()
    try:
        return json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({e})", code="invalid_json") from None
