"""What an operator configures: ``af3 serve``'s flags, as one frozen object the app reads."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from ..errors import InputError


@dataclass(frozen=True)
class ServeSettings:
    """Limits and switches of one server (defaults are ``af3 serve``'s)."""

    model_name: str = "af3-tiny"  # the id clients send as "model" (and "<id>:think" with the think adapter)
    api_key: str | None = None  # when set: "Authorization: Bearer <key>" on every route but /, /web, /health, /ready
    max_queue: int = 64  # requests waiting beyond the running batch; more are answered 429
    max_audios: int = 8  # audio parts per chat request
    max_upload_mb: float = 25.0  # encoded audio per request (a chat request's parts together, or one upload)
    max_chat_audio_s: float = 600.0  # one chat audio (the model's 10 minutes); longer is a 400 naming the length
    max_transcription_s: float = 3 * 3600.0  # one transcription upload
    allow_url_fetch: bool = False  # http(s) audio URLs (never private addresses unless allow_private_urls)
    allow_private_urls: bool = False  # trusted networks only
    allowed_url_origins: tuple[str, ...] = ()  # "host:port" origins fetched although private (tests; one host)
    allowed_local_media_path: str | None = None  # file:// URLs only below this folder (symlinks and .. resolved)
    request_timeout_s: float = 600.0  # a request still running after this is cancelled and answered 504
    uuid_cache_mb: float = 512.0  # decoded audio kept by uuid for later requests (vLLM's convention)
    max_n: int = 8  # choices per chat request

    def __post_init__(self) -> None:
        for name in ("max_queue", "max_audios", "max_n"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "max_n" else 0):
                raise InputError(f"{name} must be a whole number >= {1 if name == 'max_n' else 0}, got {value!r}")
        for name in ("max_upload_mb", "max_chat_audio_s", "max_transcription_s", "request_timeout_s", "uuid_cache_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise InputError(f"{name} must be a positive number, got {value!r}")
        if self.allowed_local_media_path is not None:
            real = os.path.realpath(self.allowed_local_media_path)
            if not os.path.isdir(real):
                raise InputError(f"--allowed-local-media-path {self.allowed_local_media_path!r} is not a folder")
            object.__setattr__(self, "allowed_local_media_path", real)
        if not self.model_name or any(c.isspace() for c in self.model_name):
            raise InputError(f"the model name must be a non-empty word, got {self.model_name!r}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_body_bytes(self) -> int:
        """The largest request body, all its audio together: one upload's worth in base64 (4/3) plus 1 MiB for the
        rest of a JSON request. Checked while the body is read, so memory per request stays bounded."""
        return int(self.max_upload_bytes * 4 / 3) + 1024 * 1024

    def replace(self, **changes) -> ServeSettings:
        return dataclasses.replace(self, **changes)
