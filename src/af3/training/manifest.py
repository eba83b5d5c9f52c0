"""Training manifests: the two on-disk formats, read and checked into :class:`Example` lists.

* JSONL, one conversation per line: ``{"messages": [...]}`` or a bare list of messages, in the conversation
  format of :mod:`af3.chat` (audio parts ``{"type": "audio", "path": ...}``), with optional ``"id"`` and
  ``"duration"`` (seconds).
* NVIDIA's training JSON (a ``.json`` list): ``{"id", "sound": path | [paths], "duration", "conversations":
  [{"from": "human", "value": "<sound>\\nQ"}, {"from": "gpt", "value": "A"}]}``; ``<sound-1>``, ``<sound-2>``
  name the audios of multi-audio rows.

Relative audio paths are resolved against the manifest's folder. Audio is not decoded here (only its duration
is looked up, for the length estimate that groups batches); :mod:`af3.training.data` decodes it per item.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from typing import Any

from ..chat import ROLES, is_audio_part
from ..config import MAX_AUDIO_SECONDS
from ..errors import InputError

logger = logging.getLogger("af3")

AUDIO_TOKENS_PER_SECOND = 25  # AF3: 750 audio tokens per 30 s window
CHARS_PER_TOKEN = 4
DEFAULT_AUDIO_SECONDS = 30.0  # assumed when neither the manifest nor the file header gives a duration
AUDIO_PLACEHOLDER = "<sound>"

_PATH_KEYS = ("path", "audio", "url")
_NVIDIA_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SOUND_TAG = re.compile(r"<sound(?:-(\d+))?>\n?")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
_JSON_WS = re.compile(r"[ \t\n\r]*")


@dataclass(frozen=True)
class Example:
    """One training conversation as read from a manifest (audio not decoded yet)."""

    messages: list[dict]  # our conversation format; audio parts are {"type": "audio", "path": <absolute path>}
    source: str  # "manifest_path:line_number" (1-based), for error messages
    length: int  # cheap length estimate in tokens, for length-grouped batching


# ----------------------------------------------------------------------------------------------------------
# manifests


def load_manifest(path: str | os.PathLike, max_audio_len: float = MAX_AUDIO_SECONDS) -> list[Example]:
    """Read a JSONL manifest or an NVIDIA training JSON into examples; any malformed row is an
    :class:`InputError` naming ``file:line`` and what is wrong."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"manifest {path!r} does not exist or is not a file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"manifest {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(f"cannot read manifest {path!r}: {e.strerror or e}") from None
    folder = os.path.dirname(os.path.abspath(path))
    rows = _json_list_rows(path, text) if path.lower().endswith(".json") else None
    if rows is None:
        rows = _jsonl_rows(path, text)
    examples: list[Example] = []
    missing: list[str] = []
    for where, row in rows:
        source = f"{path}:{where}"
        try:
            messages, duration = _parse_row(row, folder)
            seconds = _audio_seconds(messages, duration, missing)
        except InputError as e:
            raise InputError(f"{source}: {e}") from None
        examples.append(Example(messages, source, _estimate_length(messages, seconds, max_audio_len)))
    if not examples:
        raise InputError(f"manifest {path!r} holds no examples")
    if missing:
        logger.warning("%s: %d audio file(s) do not exist (e.g. %r); their examples will be skipped",
                       path, len(missing), missing[0])
    return examples


def _jsonl_rows(path: str, text: str) -> list[tuple[str, Any]]:
    """(line number, parsed value) for each non-blank line. Splits on "\\n" only: JSON strings may hold U+2028."""
    rows = []
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((str(number), json.loads(line)))
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{number}: bad JSON: {e.msg} (column {e.colno})") from None
    return rows


def _json_list_rows(path: str, text: str) -> list[tuple[str, Any]] | None:
    """The items of a JSON list with the line each starts on; None when the file is not a JSON list (then it
    is read as JSONL). Items sharing a line (a minified file) are labelled ``line (item k)``."""
    decoder = json.JSONDecoder()
    pos = _JSON_WS.match(text).end()
    if not text.startswith("[", pos):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            return None  # not one JSON document: maybe JSONL with a .json name
        kind = type(value).__name__
        raise InputError(f"{path}: a .json manifest must hold a list of rows (NVIDIA's format), not a JSON {kind}")
    items: list[tuple[int, Any]] = []
    line, counted = 1, 0
    pos = _JSON_WS.match(text, pos + 1).end()
    try:
        if text.startswith("]", pos):
            pos += 1
        else:
            while True:
                line += text.count("\n", counted, pos)
                counted = pos
                value, pos = decoder.raw_decode(text, pos)
                items.append((line, value))
                pos = _JSON_WS.match(text, pos).end()
                if text.startswith(",", pos):
                    pos = _JSON_WS.match(text, pos + 1).end()
                elif text.startswith("]", pos):
                    pos += 1
                    break
                else:
                    raise json.JSONDecodeError("expected ',' or ']' after a list item", text, pos)
        if _JSON_WS.match(text, pos).end() != len(text):
            raise json.JSONDecodeError("extra data after the list", text, pos)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: bad JSON: {e.msg} (column {e.colno})") from None
    per_line = Counter(n for n, _ in items)
    shared = {n for n, count in per_line.items() if count > 1}
    return [(f"{n} (item {k})" if n in shared else str(n), v) for k, (n, v) in enumerate(items, 1)]


def _parse_row(row: Any, folder: str) -> tuple[list[dict], Any]:
    """A manifest row → (validated messages with resolved audio paths, the row's "duration" or None)."""
    duration = None
    if isinstance(row, list):
        messages = row
    elif isinstance(row, dict) and "conversations" in row:
        messages, duration = _from_nvidia(row), row.get("duration")
    elif isinstance(row, dict) and "messages" in row:
        messages, duration = row["messages"], row.get("duration")
    else:
        raise InputError("expected {\"messages\": [...]}, a list of messages, or an NVIDIA row with "
                         "\"conversations\"")
    return _normalize_messages(messages, folder), duration


def _from_nvidia(row: dict) -> list[dict]:
    """NVIDIA row → our messages. ``<sound>`` / ``<sound-k>`` in a human turn become audio parts of that message
    (ordered by number) and leave the text, with one newline after each; the remaining text is stripped, as
    LLaVA-style loaders do. A row with sound files but no placeholder gets them at the start of its first
    human turn."""
    sound = row.get("sound")
    if sound is None or sound in ("", []):
        paths: list[str] = []
    elif isinstance(sound, str):
        paths = [sound]
    elif isinstance(sound, list) and all(isinstance(s, str) and s for s in sound):
        paths = list(sound)
    else:
        raise InputError("\"sound\" must be a path or a list of paths")
    turns = row["conversations"]
    if not isinstance(turns, list) or not turns:
        raise InputError("\"conversations\" must be a non-empty list of {\"from\", \"value\"} turns")
    messages: list[dict] = []
    used: list[int] = []
    plain = 0  # unnumbered <sound> tags take the audios in order
    for i, turn in enumerate(turns, 1):
        if not isinstance(turn, dict):
            raise InputError(f"turn {i} is not an object with \"from\" and \"value\"")
        who = turn.get("from")
        role = _NVIDIA_ROLES.get(who.lower()) if isinstance(who, str) else None
        if role is None:
            raise InputError(f"turn {i} has unknown \"from\" {who!r}; expected human, gpt or system")
        value = turn.get("value")
        if not isinstance(value, str):
            raise InputError(f"turn {i} ({who}) has no text \"value\"")
        indices = []
        for match in _SOUND_TAG.finditer(value):
            if match.group(1) is None:
                index, plain = plain, plain + 1
            else:
                index = int(match.group(1)) - 1
            if not 0 <= index < len(paths):
                raise InputError(f"turn {i}: {match.group(0).strip()} but the row has {len(paths)} sound file(s)")
            indices.append(index)
        if indices and role != "user":
            raise InputError(f"turn {i}: a sound placeholder in a {who!r} turn; audio is only accepted in human turns")
        text = _SOUND_TAG.sub("", value).strip() if indices else value
        content: list[dict] = [{"type": "audio", "path": paths[k]} for k in sorted(indices)]
        if text or not indices:
            content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
        used.extend(indices)
    if paths and not used:
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if first_user is not None:
            first_user["content"] = [{"type": "audio", "path": p} for p in paths] + first_user["content"]
    elif sorted(used) != list(range(len(paths))):
        twice = sorted({k + 1 for k in used if used.count(k) > 1})
        unused = [k + 1 for k in range(len(paths)) if k not in used]
        what = f"sound {twice} referenced more than once" if twice else f"sound {unused} never referenced"
        raise InputError(f"the row has {len(paths)} sound file(s) but its placeholders do not match: {what}")
    return messages


def _normalize_messages(messages: Any, folder: str) -> list[dict]:
    """Validate a conversation for training and give every message a list of parts, with audio paths resolved."""
    if not isinstance(messages, list) or not messages:
        raise InputError("\"messages\" must be a non-empty list of messages")
    out: list[dict] = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise InputError(f"message {i} is not an object with \"role\" and \"content\"")
        role = m.get("role")
        if role not in ROLES:
            raise InputError(f"message {i} has unknown role {role!r}; expected one of {', '.join(ROLES)}")
        content = m.get("content")
        if content is None:
            raise InputError(f"message {i} ({role}) has no content")
        if isinstance(content, (str, dict)):
            content = [content]
        if not isinstance(content, list):
            raise InputError(f"message {i}: content must be a string or a list of parts")
        parts: list[dict] = []
        for j, raw in enumerate(content, 1):
            part = {"type": "text", "text": raw} if isinstance(raw, str) else raw
            if not isinstance(part, dict):
                raise InputError(f"message {i}, part {j}: expected an object like {{\"type\": \"text\", ...}}")
            if is_audio_part(part):
                if role != "user":
                    raise InputError(f"message {i}: audio in a {role} message; audio is only accepted in user messages")
                parts.append(_resolve_audio_part(part, folder, i))
            elif part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                if AUDIO_PLACEHOLDER in part["text"]:
                    raise InputError(f"message {i} contains a literal {AUDIO_PLACEHOLDER}; use an audio part "
                                     "{\"type\": \"audio\", \"path\": ...} instead")
                parts.append({"type": "text", "text": part["text"]})
            else:
                raise InputError(f"message {i}, part {j}: unknown part with keys {sorted(part)}; use text or audio "
                                 "parts")
        out.append({"role": role, "content": parts})
    if not any(m["role"] == "user" for m in out):
        raise InputError("the conversation has no user turn")
    if out[-1]["role"] != "assistant":
        raise InputError(f"the conversation ends with a {out[-1]['role']} message: the assistant reply is missing")
    return out


def _resolve_audio_part(part: dict, folder: str, message: int) -> dict:
    """An audio part with a path/URL string → ``{"type": "audio", "path": <absolute path or URL>}``; other
    spellings (base64, input_audio, audio_url) are kept as they are."""
    for key in _PATH_KEYS:
        value = part.get(key)
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"message {message}: the audio part's {key!r} must be a non-empty path string")
        return {"type": "audio", "path": resolve_audio_path(value, folder)}
    return dict(part)


def resolve_audio_path(value: str, folder: str) -> str:
    """A manifest's audio reference → an absolute path (relative ones are relative to ``folder``); http(s)
    URLs and data: URIs are kept, ``file://`` URLs become paths."""
    if value.lower().startswith("file://"):
        value = urllib.parse.unquote(urllib.parse.urlsplit(value).path)
    elif _SCHEME.match(value) or value[:5].lower() == "data:":
        return value
    value = os.path.expanduser(value)
    return os.path.normpath(value if os.path.isabs(value) else os.path.join(folder, value))


def _audio_seconds(messages: list[dict], duration: Any, missing: list[str]) -> list[float]:
    """Seconds of each audio of a conversation: the row's "duration" (a number is the total, split evenly; a
    list gives one per audio), else the file header, else :data:`DEFAULT_AUDIO_SECONDS`. Appends the local files
    that do not exist to ``missing``."""
    audios = [p for m in messages for p in m["content"] if p.get("type") != "text"]
    local = [p["path"] for p in audios if _is_local(p.get("path"))]
    missing.extend(path for path in local if not os.path.isfile(path))
    if duration is not None:
        values = duration if isinstance(duration, list) else [duration]
        ok = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
                 for v in values)
        if not ok or (isinstance(duration, list) and len(values) != len(audios)):
            raise InputError(f"\"duration\" must be a non-negative number of seconds (or a list with one per "
                             f"audio), got {duration!r}")
        if isinstance(duration, list):
            return [float(v) for v in values]
        return [float(duration) / len(audios)] * len(audios) if audios else []
    return [_probe_seconds(p.get("path")) for p in audios]


def _is_local(path: Any) -> bool:
    return isinstance(path, str) and not _SCHEME.match(path) and path[:5].lower() != "data:"


def _probe_seconds(path: Any) -> float:
    """An audio file's duration from its header (cheap), or :data:`DEFAULT_AUDIO_SECONDS`."""
    if not _is_local(path) or not os.path.isfile(path):
        return DEFAULT_AUDIO_SECONDS
    try:
        import soundfile as sf

        info = sf.info(path)
        return float(info.frames) / float(info.samplerate)
    except Exception:  # any format soundfile cannot read (m4a, ...): PyAV decodes it later; just guess here
        return DEFAULT_AUDIO_SECONDS


def _estimate_length(messages: list[dict], seconds: list[float], max_audio_len: float) -> int:
    """Tokens ≈ 25 per audio second (each audio capped at ``max_audio_len``) + characters / 4."""
    chars = sum(len(p["text"]) for m in messages for p in m["content"] if p.get("type") == "text")
    audio = sum(min(s, max_audio_len) for s in seconds) * AUDIO_TOKENS_PER_SECOND
    return max(1, math.ceil(audio + chars / CHARS_PER_TOKEN))
