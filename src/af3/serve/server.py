"""``af3 serve``: load the model once, start its Engine, serve the app with uvicorn until Ctrl-C.

Ctrl-C (SIGINT) or SIGTERM stops accepting connections, lets the requests in flight finish (up to
``drain_s``), then stops the Engine. Start-up logs the URL to open.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from ..errors import InputError
from .settings import ServeSettings

logger = logging.getLogger("af3.serve")


def build_engine(model_path: str, *, dtype: Any = None, device: str = "cpu", quantize: str | None = None,
                 think: str = "auto", max_batch_size: int = 8, max_audios: int = 8, audio_policy: Any = None,
                 prefix_cache_bytes: int = 1024**3, audio_cache_bytes: int = 512 * 1024**2) -> Any:
    """The Engine a server runs (the think adapter loaded when the checkpoint has one and ``think`` is "auto")."""
    from ..generation.engine import Engine
    from ..system import check_device

    if think not in ("auto", "off"):
        raise InputError(f"--think must be auto or off, got {think!r}")
    return Engine.from_pretrained(model_path, dtype=dtype, device=check_device(device), quantize=quantize,
                                  think="auto" if think == "auto" else False, max_batch_size=max_batch_size,
                                  max_audios=max_audios, audio_policy=audio_policy,
                                  prefix_cache_bytes=prefix_cache_bytes, audio_cache_bytes=audio_cache_bytes)


def serve(engine: Any, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, drain_s: float = 30.0,
          log_level: str = "info") -> None:
    """Run the server in this process until it is stopped."""
    import uvicorn

    from .app import create_app

    app = create_app(engine, settings)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_s,
                            access_log=False, server_header=False)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    logger.warning("af3 %s serving %s at http://%s:%d (page: /, API: /v1)%s", _version(), settings.model_name, shown,
                   port, "" if settings.api_key is None else " — API key required")
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises the Ctrl-C it handled once drained: clean
        server.run()
    logger.warning("af3 serve stopped")


def model_name_for(model: str) -> str:
    """The id clients use: "af3-tiny" for the embedded model, else the checkpoint folder's name."""
    if model == "tiny":
        return "af3-tiny"
    return os.path.basename(os.path.normpath(model)) or "af3"


def _version() -> str:
    from .. import __version__

    return __version__
