"""``af3 serve``: an OpenAI-compatible HTTP API over one Engine, and a web page.

A request travels: :mod:`.app` (routes, auth, body limits, errors) → :mod:`.chat` or :mod:`.transcribe`
(validate the OpenAI-shaped request with :mod:`.schemas`, turn its audio parts into waveforms with :mod:`.media`,
its settings into :class:`af3.generation.options.GenerationOptions`) → :mod:`.bridge` (submits to the Engine,
which runs in its background thread; awaits its results or streams them without a thread per request; cancels on
disconnect or timeout; bounds the queue) → back into OpenAI's response shapes. The HTTP layer never tokenizes,
batches or decodes tokens itself. :mod:`.server` builds the Engine and runs uvicorn; :mod:`.metrics` exports
Prometheus metrics; ``web/`` is the page.
"""

from __future__ import annotations

from .settings import ServeSettings

__all__ = ["ServeSettings"]
