"""The asyncio side of the Engine: submit, await or stream results, cancel, bound the queue.

The Engine runs its loop in its own thread (``Engine.start()``). A request handed to it here gets an
``on_update`` callback that sets an :class:`asyncio.Event` on the server's event loop, so a thousand waiting
clients cost a thousand events, not a thousand threads. Preparing a request (the chat template, audio features)
is CPU work and runs in a worker thread.

Every request submitted is counted until it ends; beyond the running batch plus ``max_queue`` more are refused
with 429 and ``Retry-After``. A request whose client disconnects, or that runs past ``request_timeout_s``, is
cancelled: the Engine frees its KV row at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool

from ..generation.output import Delta, Output
from ..generation.scheduler import Request
from .errors import APIError
from .metrics import Metrics


class Handle:
    """One submitted request, read from the event loop."""

    def __init__(self, bridge: EngineBridge, req: Request, event: asyncio.Event, started: float):
        self.bridge, self.req, self.event, self.started = bridge, req, event, started
        self.first_token_at: float | None = None
        self._closed = False

    async def deltas(self) -> AsyncIterator[Delta]:
        """The request's pieces as they are decoded; the last has ``finished`` and the output."""
        while True:
            self.event.clear()
            while True:
                try:
                    delta = self.req.stream.get_nowait()
                except queue.Empty:
                    break
                if self.first_token_at is None and (delta.token_ids or delta.finished):
                    self.first_token_at = time.perf_counter()
                    self.bridge.metrics.ttft.observe(self.first_token_at - self.started)
                yield delta
                if delta.finished:
                    self.close()
                    return
            await self.event.wait()

    async def output(self, disconnected: Callable[[], Any] | None = None) -> Output:
        """The finished output; while waiting, ``disconnected()`` is asked every second, and a client that left
        cancels the request."""
        while True:
            self.event.clear()
            if self.req.done.is_set():
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.close()
                if self.req.error is not None:
                    raise self.req.error
                return self.req.output
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.event.wait()
            if disconnected is not None and not self.req.done.is_set() and await disconnected():
                self.cancel()
                raise asyncio.CancelledError

    def cancel(self) -> None:
        if not self.req.done.is_set():
            self.bridge.engine.cancel(self.req)
            self.bridge.metrics.cancelled.inc()
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.bridge.outstanding -= 1
            self.bridge.metrics.queue_depth.set(self.bridge.outstanding)
            if self.req.output is not None and self.req.output.finish_reason in ("stop", "length"):
                self.bridge.metrics.latency.observe(time.perf_counter() - self.started)
                self.bridge.metrics.completion_tokens.inc(len(self.req.output.token_ids))
                self.bridge.metrics.prompt_tokens.inc(self.req.output.prompt_tokens)


class EngineBridge:
    """Submits to one started Engine from asyncio code (see the module docstring)."""

    def __init__(self, engine: Any, max_queue: int, timeout_s: float, metrics: Metrics):
        self.engine = engine
        self.capacity = engine.max_batch_size + max_queue
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.outstanding = 0  # submitted, not yet ended (only touched on the event loop)

    @property
    def full(self) -> bool:
        return self.outstanding >= self.capacity

    def reserve(self, count: int = 1) -> None:
        """Claim room for ``count`` requests now (before any work), or refuse with 429."""
        if self.outstanding + count > self.capacity:
            self.metrics.rejected.inc()
            raise APIError(429, f"the server is busy ({self.outstanding} requests in progress, room for "
                           f"{self.capacity}); retry shortly", code="queue_full", headers={"Retry-After": "1"})
        self.outstanding += count
        self.metrics.queue_depth.set(self.outstanding)

    def release(self, count: int = 1) -> None:
        """Give back room reserved for requests that were never submitted."""
        self.outstanding -= count
        self.metrics.queue_depth.set(self.outstanding)

    async def submit(self, conversation: list[dict], options: Any, stream: bool) -> Handle:
        """Prepare and queue one request (room must have been reserved); read it with ``Handle.deltas`` when
        ``stream``, else ``Handle.output``."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(event.set)

        started = time.perf_counter()
        req = await run_in_threadpool(self.engine.submit, conversation, options, stream=stream, on_update=wake)
        return Handle(self, req, event, started)

    @contextlib.asynccontextmanager
    async def deadline(self, handles: list[Handle]):
        """Cancel ``handles`` and answer 504 when the block runs past the request timeout."""
        try:
            async with asyncio.timeout(self.timeout_s):
                yield
        except TimeoutError:
            for h in handles:
                h.cancel()
            self.metrics.timeouts.inc()
            raise APIError(504, f"the request took longer than this server's {self.timeout_s:g} s limit and was "
                           "cancelled", code="timeout") from None
