"""OpenAI-style messages → an af3 conversation with decoded audio, under the server's rules.

Audio parts come as ``{"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}}``,
``{"type": "audio_url", "audio_url": {"url": ...}}`` or the simple ``{"audio_url": "..."}``; each may carry a
``uuid``. A part sent with its data is decoded (16 kHz mono, by :func:`af3.audio.load_audio` under the server's
:class:`af3.fetch.FetchPolicy`) and kept under its uuid in a byte-bounded LRU, so a later request may send
``{"type": "input_audio", "input_audio": null, "uuid": id}`` instead of the bytes (vLLM's convention; the Engine's
audio and prefix caches then also skip the encoder and the earlier turns' prefill).

URLs: ``data:`` always (an audio MIME type, or none); ``http(s)`` only with ``allow_url_fetch`` (public addresses
only unless the operator allows private ones, at most 3 redirects, the upload cap while streaming); ``file://``
only for real paths below ``allowed_local_media_path`` after resolving symlinks and ``..``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import threading
import urllib.parse
from collections import OrderedDict
from typing import Any

import numpy as np

from ..audio import SAMPLING_RATE, load_audio
from ..errors import AudioError
from ..fetch import DEFAULT_POLICY, FetchPolicy
from .errors import APIError
from .settings import ServeSettings

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
#: ``input_audio.format`` values (and MIME subtypes) taken as audio; the decoder reads the bytes, not the name.
AUDIO_FORMATS = frozenset({"wav", "wave", "x-wav", "mp3", "mpeg", "mpga", "flac", "x-flac", "ogg", "opus", "webm",
                           "m4a", "mp4", "x-m4a", "aac", "aiff", "x-aiff", "pcm"})


class UuidCache:
    """Decoded waveforms by client-chosen uuid, least recently used first out, at most ``max_bytes``."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.items: OrderedDict[str, np.ndarray] = OrderedDict()
        self.bytes = 0
        self.lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self.lock:
            wave = self.items.get(key)
            if wave is not None:
                self.items.move_to_end(key)
            return wave

    def put(self, key: str, wave: np.ndarray) -> None:
        with self.lock:
            old = self.items.pop(key, None)
            if old is not None:
                self.bytes -= old.nbytes
            if wave.nbytes > self.max_bytes:
                return
            self.items[key] = wave
            self.bytes += wave.nbytes
            while self.bytes > self.max_bytes:
                _, gone = self.items.popitem(last=False)
                self.bytes -= gone.nbytes


class MediaResolver:
    """Turns one request's messages into a conversation for the Engine (see the module docstring)."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self.uuids = UuidCache(int(settings.uuid_cache_mb * 1024 * 1024))
        self.policy = dataclasses.replace(
            DEFAULT_POLICY, max_bytes=settings.max_upload_bytes, max_file_bytes=settings.max_upload_bytes,
            deadline_s=30.0, allow_private_network=settings.allow_private_urls, max_redirects=3,
            allowed_origins=settings.allowed_url_origins)

    # ------------------------------------------------------------------ messages
    def check(self, messages: list[Any]) -> int:
        """Check the messages' shape before any audio is decoded; returns how many audio parts they hold."""
        audios = 0
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise APIError(400, f"messages[{i}] must be an object with 'role' and 'content'", f"messages.{i}")
            role = m.get("role")
            if role not in ROLES:
                raise APIError(400, f"messages[{i}].role {role!r} is not supported; use system, user or assistant",
                               f"messages.{i}.role")
            content = m.get("content")
            if isinstance(content, str):
                continue
            if not isinstance(content, list):
                raise APIError(400, f"messages[{i}].content must be a string or a list of parts",
                               f"messages.{i}.content")
            for j, part in enumerate(content):
                where = f"messages.{i}.content.{j}"
                if not isinstance(part, dict):
                    raise APIError(400, f"messages[{i}].content[{j}] must be an object", where)
                if _is_audio(part):
                    if ROLES[role] != "user":
                        raise APIError(400, f"messages[{i}] ({role}) has an audio part; audio goes in user messages",
                                       where)
                    audios += 1
                elif part.get("type", "text") != "text" or not isinstance(part.get("text"), str):
                    kind = part.get("type")
                    raise APIError(400, f"messages[{i}].content[{j}]: unsupported part"
                                   f"{f' type {kind!r}' if kind else ''}; use text, input_audio or audio_url", where)
        if audios > self.settings.max_audios:
            raise APIError(400, f"the request has {audios} audio parts; this server takes at most "
                           f"{self.settings.max_audios} per request", "messages")
        return audios

    def conversation(self, messages: list[dict]) -> tuple[list[dict], float]:
        """The af3 conversation (audio decoded, 16 kHz) and the seconds of audio it holds. Blocking: run it in a
        worker thread."""
        out, seconds = [], 0.0
        for i, m in enumerate(messages):
            role, content = ROLES[m["role"]], m["content"]
            if isinstance(content, str):
                out.append({"role": role, "content": content})
                continue
            parts = []
            for j, part in enumerate(content):
                if _is_audio(part):
                    wave = self.audio(part, f"messages.{i}.content.{j}")
                    seconds += len(wave) / SAMPLING_RATE
                    parts.append({"type": "audio", "audio": wave, "sampling_rate": SAMPLING_RATE})
                else:
                    parts.append({"type": "text", "text": part["text"]})
            out.append({"role": role, "content": parts})
        return out, seconds

    # ------------------------------------------------------------------ one audio part
    def audio(self, part: dict, where: str) -> np.ndarray:
        key = part.get("uuid")
        if key is not None and (not isinstance(key, str) or not 0 < len(key) <= 256):
            raise APIError(400, f"{where}.uuid must be a non-empty string of at most 256 characters", f"{where}.uuid")
        source = _source(part, where)
        if source is None:
            if key is None:
                raise APIError(400, f"{where}: the audio part has no data; send input_audio.data, audio_url.url, or "
                               "the uuid of audio sent earlier", where)
            wave = self.uuids.get(key)
            if wave is None:
                raise APIError(400, f"{where}: unknown audio uuid {key!r} (this server does not have it, or no "
                               "longer); send the audio's data again", f"{where}.uuid", code="unknown_uuid")
            return wave
        wave = self._load(source, where)
        if key is not None:
            self.uuids.put(key, wave)
        return wave

    def _load(self, source: tuple[str, Any], where: str) -> np.ndarray:
        kind, value = source
        cap = self.settings.max_chat_audio_s
        if kind == "base64":
            data = _b64(value, self.settings.max_upload_bytes, where)
        elif kind == "url":
            data = self._url(value, where)
        else:
            raise AssertionError(kind)
        try:
            wave = load_audio(data, max_seconds=cap + 0.5, policy=self.policy)
        except AudioError as e:
            status = 413 if "too large" in str(e) else 400
            raise APIError(status, f"{where}: {e}", where, code="invalid_audio") from None
        if len(wave) > cap * SAMPLING_RATE:
            raise APIError(400, f"{where}: the audio is longer than {cap:g} s, the most one chat audio may hold (the "
                           "model's window); send a shorter clip, or use /v1/audio/transcriptions for long recordings",
                           where, code="audio_too_long")
        return wave

    def _url(self, url: Any, where: str) -> Any:
        if not isinstance(url, str) or not url:
            raise APIError(400, f"{where}: audio_url.url must be a non-empty string", f"{where}.audio_url.url")
        if url[:5].lower() == "data:":
            header, sep, payload = url.partition(",")
            if not sep:
                raise APIError(400, f"{where}: malformed data: URL (no ',')", where)
            params = [p.strip().lower() for p in header[5:].split(";")]
            mime = params[0]
            if mime and not (mime.startswith("audio/") or mime.split("/", 1)[-1] in AUDIO_FORMATS
                             or mime == "application/octet-stream"):
                raise APIError(415, f"{where}: the data: URL says {mime!r}; send audio (audio/wav, audio/mpeg, ...)",
                               where, code="unsupported_media_type")
            if "base64" in params[1:]:
                return _b64(urllib.parse.unquote(payload), self.settings.max_upload_bytes, where)
            return urllib.parse.unquote_to_bytes(payload)
        scheme = urllib.parse.urlsplit(url).scheme.lower()
        if scheme in ("http", "https"):
            if not self.settings.allow_url_fetch:
                raise APIError(400, f"{where}: this server does not fetch audio URLs (started without "
                               "--allow-url-fetch); send the audio as input_audio data", where,
                               code="url_fetch_disabled")
            return url
        if scheme == "file":
            return self._local(url, where)
        raise APIError(400, f"{where}: unsupported URL scheme {scheme + '://' if scheme else url[:20]!r}; use a data: "
                       "URL or http(s)", where)

    def _local(self, url: str, where: str) -> str:
        root = self.settings.allowed_local_media_path
        if root is None:
            raise APIError(400, f"{where}: file:// URLs are not allowed on this server (no "
                           "--allowed-local-media-path)", where, code="local_media_disabled")
        parts = urllib.parse.urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise APIError(400, f"{where}: file:// URLs must name a local path", where)
        path = os.path.realpath(urllib.parse.unquote(parts.path))
        if os.path.commonpath([path, root]) != root:
            raise APIError(400, f"{where}: {url!r} is outside the allowed local media folder", where,
                           code="local_media_denied")
        return path


def _is_audio(part: dict) -> bool:
    kind = part.get("type")
    return kind in ("input_audio", "audio_url") or (kind is None and "audio_url" in part)


def _source(part: dict, where: str) -> tuple[str, Any] | None:
    """("base64", data) or ("url", url) of an audio part, or None when it carries only a uuid."""
    if part.get("type") == "input_audio":
        inner = part.get("input_audio")
        if inner is None:
            return None
        if not isinstance(inner, dict):
            raise APIError(400, f"{where}.input_audio must be an object with data and format", f"{where}.input_audio")
        fmt = inner.get("format")
        if fmt is not None and (not isinstance(fmt, str) or fmt.lower() not in AUDIO_FORMATS):
            raise APIError(415, f"{where}: input_audio.format {fmt!r} is not an audio format (wav, mp3, flac, ogg, "
                           "webm, m4a, ...)", f"{where}.input_audio.format", code="unsupported_media_type")
        data = inner.get("data")
        if data is None:
            return None
        if not isinstance(data, str):
            raise APIError(400, f"{where}: input_audio.data must be a base64 string", f"{where}.input_audio.data")
        return "base64", data
    inner = part.get("audio_url")
    if inner is None:
        return None
    url = inner.get("url") if isinstance(inner, dict) else inner
    return None if url is None else ("url", url)


def _b64(data: str, max_bytes: int, where: str) -> bytes:
    if len(data) // 4 * 3 > max_bytes:
        raise APIError(413, f"{where}: the audio is about {len(data) // 4 * 3} bytes, more than this server's "
                       f"{max_bytes}-byte limit", where, code="audio_too_large")
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{where}: the audio data is not valid base64", where, code="invalid_base64") from None
    if not raw:
        raise APIError(400, f"{where}: the audio data is empty", where, code="invalid_audio")
    return raw


def policy_for_transcription(settings: ServeSettings) -> FetchPolicy:
    """Uploads for /v1/audio/transcriptions: local temporary files of at most the upload cap."""
    return dataclasses.replace(DEFAULT_POLICY, max_bytes=settings.max_upload_bytes,
                               max_file_bytes=settings.max_upload_bytes)
