"""Training data: manifests, weighted mixtures, a length-grouped distributed batch sampler, and the collator.

Two manifest formats are read into the same :class:`Example` list:

* JSONL, one conversation per line: ``{"messages": [...]}`` or a bare list of messages, in the conversation
  format of :mod:`af3.chat` (audio parts ``{"type": "audio", "path": ...}``), with optional ``"id"`` and
  ``"duration"`` (seconds).
* NVIDIA's training JSON (a ``.json`` list): ``{"id", "sound": path | [paths], "duration", "conversations":
  [{"from": "human", "value": "<sound>\\nQ"}, {"from": "gpt", "value": "A"}]}``; ``<sound-1>``, ``<sound-2>``
  name the audios of multi-audio rows.

Relative audio paths are resolved against the manifest's folder. Audio is decoded only in
:meth:`MixtureDataset.__getitem__` (so DataLoader workers do it); an unreadable audio file turns the item into
``{"skipped": source, "reason": ...}`` instead of an exception, and :class:`Collator` drops and reports it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import urllib.parse
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from ..audio import SAMPLING_RATE
from ..chat import ROLES, is_audio_part
from ..errors import AF3Error, InputError
from ..processor import IGNORE_INDEX, load_audio_part

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


def load_manifest(path: str | os.PathLike, max_audio_len: float = 600.0) -> list[Example]:
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


# ----------------------------------------------------------------------------------------------------------
# mixtures


def parse_mixture(spec: str | Mapping | Sequence, named: Mapping[str, str] | None = None) -> list[tuple[float, str]]:
    """A data mixture → [(weight, manifest path)].

    ``spec`` is NVIDIA's ``"2.0*asr+1.0*qa"`` syntax (a term without ``*`` has weight 1), a dict
    ``{name_or_path: weight}``, or a list of terms (strings like ``"2*asr"``, ``(weight, name)`` pairs or
    ``{"path"|"name": ..., "weight": ...}``). Names are keys of ``named`` (name → manifest path); anything else
    must be an existing manifest file.
    """
    named = dict(named or {})
    out: list[tuple[float, str]] = []
    if isinstance(spec, str):
        text = spec.strip()
        if not text:
            raise InputError("the data mixture is empty")
        terms = [text] if _is_known(text, named) else text.split("+")  # a path may itself contain "+"
        out = [_parse_term(t, named) for t in terms]
    elif isinstance(spec, Mapping):
        out = [(_check_weight(w, f"{name}: {w}"), _resolve_name(name, named)) for name, w in spec.items()]
    elif isinstance(spec, Sequence):
        for item in spec:
            if isinstance(item, (str, os.PathLike)):
                out.append(_parse_term(os.fspath(item), named))
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                out.append((_check_weight(item[0], repr(item)), _resolve_name(item[1], named)))
            elif isinstance(item, Mapping) and ("path" in item or "name" in item):
                name = item.get("path", item.get("name"))
                out.append((_check_weight(item.get("weight", 1.0), repr(dict(item))), _resolve_name(name, named)))
            else:
                raise InputError(f"bad data mixture entry {item!r}: use \"WEIGHT*NAME\", (weight, name) or "
                                 "{\"path\": ..., \"weight\": ...}")
    else:
        raise InputError(f"a data mixture is a string, a dict or a list, not a {type(spec).__name__}")
    if not out:
        raise InputError("the data mixture is empty")
    return out


def _is_known(name: str, named: dict[str, str]) -> bool:
    return name in named or os.path.isfile(name)


def _parse_term(term: str, named: dict[str, str]) -> tuple[float, str]:
    text = term.strip()
    if not text:
        raise InputError("the data mixture has an empty term (a stray '+')")
    if _is_known(text, named) or "*" not in text:
        return 1.0, _resolve_name(text, named)
    weight, _, name = text.partition("*")
    try:
        value = float(weight)
    except ValueError:
        raise InputError(f"bad data mixture term {term!r}: expected WEIGHT*NAME, like 2.0*asr") from None
    return _check_weight(value, term), _resolve_name(name.strip(), named)


def _check_weight(weight: Any, term: str) -> float:
    ok = isinstance(weight, (int, float)) and not isinstance(weight, bool) and math.isfinite(weight) and weight > 0
    if not ok:
        raise InputError(f"bad data mixture term {term!r}: the weight must be a positive number")
    return float(weight)


def _resolve_name(name: Any, named: dict[str, str]) -> str:
    if isinstance(name, os.PathLike):
        name = os.fspath(name)
    if not isinstance(name, str) or not name:
        raise InputError(f"bad data mixture name {name!r}")
    if name in named:
        return os.fspath(named[name])
    if os.path.isfile(name):
        return name
    known = ", ".join(sorted(named)) or "none"
    raise InputError(f"unknown dataset {name!r} in the data mixture: not a named dataset (known: {known}) and not "
                     "a manifest file")


class MixtureDataset(Dataset):
    """The examples of a weighted mixture of manifests, re-drawn each epoch.

    A manifest with weight ``w`` contributes each example ``floor(w)`` times per epoch plus once more with
    probability ``frac(w)``, drawn from a generator seeded by ``(seed, epoch)`` (one independent stream per
    mixture term). The list is in manifest order; the sampler shuffles.
    """

    def __init__(self, mixture: list[tuple[float, str]], seed: int = 0, max_audio_len: float = 600.0,
                 epoch: int = 0):
        if not mixture:
            raise InputError("the data mixture is empty")
        if not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        self.mixture = [(_check_weight(w, f"{w}*{p}"), os.fspath(p)) for w, p in mixture]
        self.seed = seed
        self.max_audio_len = max_audio_len
        loaded: dict[str, list[Example]] = {}
        self.manifests: list[list[Example]] = []
        for _, path in self.mixture:
            key = os.path.abspath(path)
            if key not in loaded:
                loaded[key] = load_manifest(path, max_audio_len)
            self.manifests.append(loaded[key])
        self._term = np.zeros(0, dtype=np.int64)
        self._index = np.zeros(0, dtype=np.int64)
        self.epoch = epoch
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw the examples of ``epoch`` (deterministic given the seed)."""
        self.epoch = int(epoch)
        streams = np.random.SeedSequence([self.seed, self.epoch]).spawn(len(self.mixture))
        terms, indices = [], []
        for k, ((weight, _), examples, stream) in enumerate(zip(self.mixture, self.manifests, streams, strict=True)):
            n = len(examples)
            whole, frac = math.floor(weight), weight - math.floor(weight)
            counts = np.full(n, whole, dtype=np.int64)
            if frac > 0:
                counts += np.random.default_rng(stream).random(n) < frac
            picked = np.repeat(np.arange(n, dtype=np.int64), counts)
            indices.append(picked)
            terms.append(np.full(len(picked), k, dtype=np.int64))
        self._term = np.concatenate(terms)
        self._index = np.concatenate(indices)
        if len(self._index) == 0:
            logger.warning("the data mixture drew no examples for epoch %d (all weights are fractional and small)",
                           self.epoch)

    def __len__(self) -> int:
        return len(self._index)

    def example(self, i: int) -> Example:
        """The :class:`Example` behind index ``i`` of this epoch."""
        if not 0 <= i < len(self._index):
            raise IndexError(f"index {i} out of range for {len(self._index)} examples")
        return self.manifests[self._term[i]][self._index[i]]

    def lengths(self) -> list[int]:
        """Estimated token length of each index of this epoch (for :class:`LengthGroupedSampler`)."""
        return [self.manifests[t][e].length for t, e in zip(self._term.tolist(), self._index.tolist(), strict=True)]

    def term_of(self, i: int) -> int:
        """Which mixture term index ``i`` of this epoch comes from."""
        return int(self._term[i])

    def __getitem__(self, i: int) -> dict:
        """``{"messages", "source"}`` with audio decoded to 16 kHz float32 arrays, or ``{"skipped", "reason"}``
        when an audio cannot be read (never raises for bad audio)."""
        example = self.example(int(i))
        messages = []
        try:
            for m in example.messages:
                content = []
                for part in m["content"]:
                    if part.get("type") == "text":
                        content.append(dict(part))
                    else:
                        wave = load_audio_part(part)
                        content.append({"type": "audio", "audio": wave, "sampling_rate": SAMPLING_RATE})
                messages.append({"role": m["role"], "content": content})
        except Exception as e:  # any decoding failure skips the example; the trainer reports it
            return {"skipped": example.source, "reason": _one_line(e)}
        return {"messages": messages, "source": example.source}


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, AF3Error):
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
# batching


class LengthGroupedSampler(Sampler[list[int]]):
    """Batch sampler that groups examples of similar length, identical across any number of processes.

    Per epoch (deterministic given ``(seed, epoch)``): shuffle all indices, cut them into mega-groups of
    ``group_size * world_size * batch_size``, sort each mega-group by length (longest first), cut it into global
    batches of ``world_size * batch_size`` and shuffle the order of the global batches. Rank ``r`` gets the
    ``r``-th contiguous slice of each global batch, so the global batches depend only on
    ``world_size * batch_size``: N processes see exactly the batches one process with an N times larger batch
    would see. The last, incomplete global batch is dropped (``drop_last``) or split as evenly as possible;
    when it has fewer items than ranks, ranks without an item of their own repeat one so that none is idle.

    ``length_bucket`` > 0 sorts by ``length // length_bucket`` instead: examples in one bucket keep their random
    order, so a batch mixes the sources whose lengths fall in the same bucket (e.g. ``750``, one 30 s window of
    audio tokens: short clips of every task share batches, multi-window clips batch together) instead of
    clustering by source when lengths correlate with it.

    ``lengths`` may be reassigned (e.g. after ``MixtureDataset.set_epoch``); ``skip_batches`` (set on resume)
    skips that many batches at the start of the epoch and is not reset by :meth:`set_epoch`.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 group_size: int = 50, drop_last: bool = False, length_bucket: int = 0):
        if batch_size < 1 or world_size < 1 or group_size < 1:
            raise InputError("batch_size, world_size and group_size must be at least 1")
        if length_bucket < 0:
            raise InputError(f"length_bucket must be 0 or positive, got {length_bucket}")
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is outside 0..{world_size - 1}")
        if not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.group_size = group_size
        self.drop_last = drop_last
        self.length_bucket = length_bucket
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def num_global_batches(self) -> int:
        """Global batches in an epoch (before ``skip_batches``)."""
        full, rest = divmod(len(self.lengths), self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def global_batches(self) -> list[list[int]]:
        """Every rank's batches of this epoch, in order; each is ``world_size * batch_size`` indices."""
        size = self.global_batch_size
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        lengths = np.asarray(self.lengths, dtype=np.int64)
        if self.length_bucket:
            lengths = lengths // self.length_bucket
        mega = self.group_size * size
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            group = order[start:start + mega]
            group = group[np.argsort(-lengths[group], kind="stable")]
            batches.extend(group[k:k + size].tolist() for k in range(0, len(group), size))
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        return [batches[k] for k in rng.permutation(len(batches))]

    def rank_slice(self, batch: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch."""
        n, w = len(batch), self.world_size
        if n < w:  # fewer items than ranks (last batch): every rank needs something to run its step
            return [batch[self.rank % n]]
        base, extra = divmod(n, w)
        start = self.rank * base + min(self.rank, extra)
        return batch[start:start + base + (1 if self.rank < extra else 0)]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.skip_batches:]:
            yield self.rank_slice(batch)

    def __len__(self) -> int:
        return max(0, self.num_global_batches() - self.skip_batches)


class Collator:
    """Items of :class:`MixtureDataset` → a labelled batch; skipped items (and conversations the processor
    rejects) are left out and reported.

    Returns ``{"inputs": AF3Inputs with labels, or None if nothing is left, "skipped": [(source, reason)],
    "num_label_tokens": supervised tokens after the causal shift, "sources": sources of the kept items}``.
    """

    def __init__(self, processor: Any, assistant_only: bool = True, max_audio_len: float | None = None,
                 padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        self.processor = processor
        self.assistant_only = assistant_only
        self.max_audio_len = max_audio_len
        self.padding_side = padding_side

    def encode(self, items: list[dict]) -> Any:
        """Tokenize and featurize the conversations of ``items`` (no skipping)."""
        return self.processor.apply_chat_template(
            [item["messages"] for item in items],
            tokenize=True,
            return_dict=True,
            output_labels=True,
            assistant_only=self.assistant_only,
            padding_side=self.padding_side,
            max_audio_len=self.max_audio_len,
        )

    def __call__(self, items: list[dict]) -> dict:
        kept = [item for item in items if "skipped" not in item]
        skipped = [(item["skipped"], item.get("reason", "")) for item in items if "skipped" in item]
        inputs = None
        if kept:
            try:
                inputs = self.encode(kept)
            except AF3Error:  # find the conversations the processor rejects, report them, keep the rest
                good = []
                for item in kept:
                    try:
                        self.encode([item])
                        good.append(item)
                    except AF3Error as e:
                        skipped.append((item["source"], _one_line(e)))
                kept = good
                inputs = self.encode(kept) if kept else None
        num_label_tokens = 0 if inputs is None else int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        return {"inputs": inputs, "skipped": skipped, "num_label_tokens": num_label_tokens,
                "sources": [item["source"] for item in kept]}


__all__ = [
    "Collator",
    "Example",
    "LengthGroupedSampler",
    "MixtureDataset",
    "load_manifest",
    "parse_mixture",
    "resolve_audio_path",
]
