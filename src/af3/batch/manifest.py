"""Batch manifests: one conversation per JSONL line, read into :class:`BatchItem` lists.

A line is either the short form or a whole conversation:

* ``{"id": "clip-7", "audio": "a.wav" | ["a.wav", "b.flac"], "prompt": "What is happening?"}`` (``question`` is
  accepted for ``prompt``; the audios come before the text in one user turn),
* ``{"id": "clip-7", "messages": [...]}`` in af3's conversation format (``conversation`` is accepted for
  ``messages``), e.g. with a system message or earlier turns.

``id`` is optional (default: the line number, 1-based, as a string) and must be unique: it is how a resumed run
knows what is done. Relative audio paths are relative to the manifest's folder. Other keys are ignored (a manifest
often carries references or metadata). A line that is not a JSON object, or that has neither audio/prompt nor
messages, is an error naming ``file:line``; a missing or broken audio file is not (the item fails alone, with its
error in the output, when it is run).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

from ..chat import is_audio_part
from ..errors import InputError
from ..training.manifest import resolve_audio_path as resolve_path  # one rule for relative paths, file:// and URLs

#: Lines of a manifest kept in memory at most (a 10-million-line manifest is refused, not read into memory).
MAX_ITEMS = 5_000_000


@dataclass
class BatchItem:
    """One conversation to run: its id, its 0-based position in the manifest, and the messages."""

    id: str
    index: int
    messages: list[dict]
    extra: dict[str, Any] = field(default_factory=dict)  # what a task reader keeps for scoring (answer, choices)


def user_turn(audios: list[str], text: str) -> list[dict]:
    """A one-turn conversation: the audios, then the text."""
    return [{"role": "user", "content": [*({"type": "audio", "path": a} for a in audios),
                                         {"type": "text", "text": text}]}]


def _messages(row: dict, folder: str, where: str) -> list[dict]:
    messages = row.get("messages", row.get("conversation"))
    if messages is not None:
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            raise InputError(f"{where}: 'messages' must be a non-empty list of message objects")
        out = []
        for m in messages:
            content = m.get("content")
            if isinstance(content, list):
                content = [_resolved_part(p, folder, where) for p in content]
            out.append({**m, "content": content})
        return out
    audio, prompt = row.get("audio"), row.get("prompt", row.get("question"))
    if audio is None and prompt is None:
        raise InputError(f"{where}: a line needs 'audio' and 'prompt' (or 'question'), or 'messages'")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"{where}: 'prompt' must be a non-empty string")
    audios = [audio] if isinstance(audio, str) else audio if audio is not None else []
    if not isinstance(audios, list) or not all(isinstance(a, str) and a for a in audios):
        raise InputError(f"{where}: 'audio' must be a path or a list of paths")
    return user_turn([resolve_path(a, folder) for a in audios], prompt)


def _resolved_part(part: Any, folder: str, where: str) -> Any:
    if not isinstance(part, dict) or not is_audio_part(part):
        return part
    for key in ("path", "url", "audio"):
        if isinstance(part.get(key), str):
            return {**part, key: resolve_path(part[key], folder)}
    return part


def read_jsonl_objects(path: str | os.PathLike, what: str = "manifest") -> list[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file; errors name ``file:line``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise InputError(f"{what} {path!r} does not exist or is not a file")
    rows = []
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{number}: not JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise InputError(f"{path}:{number}: a line must be a JSON object, not {type(row).__name__}")
                rows.append((number, row))
                if len(rows) > MAX_ITEMS:
                    raise InputError(f"{path}: more than {MAX_ITEMS} lines; split it")
    except UnicodeDecodeError as e:
        raise InputError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(f"cannot read {what} {path!r}: {e.strerror or e}") from None
    return rows


def read_manifest(path: str | os.PathLike) -> list[BatchItem]:
    """Every line of a JSONL manifest as a :class:`BatchItem` (blank lines skipped); errors name ``file:line``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    items: list[BatchItem] = []
    seen: dict[str, int] = {}
    for number, row in read_jsonl_objects(path):
        where = f"{path}:{number}"
        item_id = row.get("id", str(number))
        if isinstance(item_id, bool) or not isinstance(item_id, (str, int)) or str(item_id) == "":
            raise InputError(f"{where}: 'id' must be a non-empty string or a number")
        item_id = str(item_id)
        if item_id in seen:
            raise InputError(f"{where}: id {item_id!r} is also on line {seen[item_id]}; ids must be unique "
                             "(they are how a resumed run knows what is done)")
        seen[item_id] = number
        items.append(BatchItem(item_id, len(items), _messages(row, folder, where)))
    if not items:
        raise InputError(f"manifest {path!r} holds no items")
    return items
