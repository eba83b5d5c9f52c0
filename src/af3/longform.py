"""Audio longer than AF3's 10-minute window: segmentation at pauses, long-form transcription with timestamps
(SRT / WebVTT / JSON), map-reduce questions over hours of audio, and an explicit opt-in to more than 20 windows.

AF3 produces no timestamps of its own; the times here are those of the segments each piece of text came from.

    model, processor = af3.load(folder)
    transcript = transcribe_long(model, processor, "meeting.wav")
    open("meeting.srt", "w").write(to_srt(transcript))
    answer = ask_long(model, processor, "lecture.mp3", "What are the three main points?")
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .audio import SAMPLING_RATE, _to_float32, load_audio
from .config import MAX_AUDIO_SECONDS, MAX_AUDIO_WINDOWS, WINDOW_SECONDS
from .errors import InputError
from .processor import DEFAULT_TRANSCRIPTION_PROMPT, strip_transcription

logger = logging.getLogger("af3")

#: ``generate_fn(conversations, max_new_tokens) -> texts``: one raw reply per conversation, in order.
GenerateFn = Callable[[list[list[dict]], int], list[str]]
#: ``progress(done, total)``: called after each batch.
ProgressFn = Callable[[int, int], None]

FRAME_S = 0.025  # short-time energy frames
FLOOR_DB = -70.0  # frame energies below this (dBFS) count as equally silent
QUIET_MARGIN_DB = 6.0  # a frame is "quiet" within this margin of the quietest frame of the search window
LONG_PAUSE_S = 0.3  # pauses at least this long are all good cut points; the latest one wins
SILENCE_DB = -50.0  # a segment whose loudest frame is below this is silent
_BLOCK_SAMPLES = 1 << 22  # energy is computed over blocks of ~4 M samples (16 MB of float32)


# ----------------------------------------------------------------------------------------------------------
# segmentation


@dataclass(frozen=True)
class Segment:
    """A stretch ``[start, end)`` of a recording, in seconds and in samples."""

    start: float
    end: float
    start_sample: int
    end_sample: int
    is_silent: bool = False

    @property
    def duration(self) -> float:
        return self.end - self.start


def frame_energy_db(audio: np.ndarray, frame_len: int) -> np.ndarray:
    """Mean power of consecutive ``frame_len``-sample frames in dBFS, floored at ``FLOOR_DB``: [ceil(n / L)].

    Works block by block, so a multi-hour recording needs only a few MB beyond the audio itself.
    """
    n = len(audio)
    n_frames = -(-n // frame_len)
    full = n // frame_len
    power = np.empty(n_frames, dtype=np.float64)
    step = max(1, _BLOCK_SAMPLES // frame_len)
    for i in range(0, full, step):
        j = min(full, i + step)
        x = _to_float32(np.asarray(audio[i * frame_len : j * frame_len])).reshape(j - i, frame_len)
        power[i:j] = np.einsum("ij,ij->i", x, x, dtype=np.float64) / frame_len
    if n_frames > full:
        tail = _to_float32(np.asarray(audio[full * frame_len :])).astype(np.float64)
        power[full] = float(np.dot(tail, tail)) / len(tail)
    np.maximum(power, 10.0 ** (FLOOR_DB / 10.0), out=power)
    return (10.0 * np.log10(power)).astype(np.float32)


def _best_cut(db: np.ndarray, f_lo: int, f_hi: int, long_frames: int) -> tuple[int, int]:
    """Quiet run ``[a, b)`` of frames in ``[f_lo, f_hi)`` to cut in: the latest run of at least
    ``long_frames`` quiet frames, else the longest run (the latest on ties)."""
    window = db[f_lo:f_hi]
    quiet = window <= window.min() + QUIET_MARGIN_DB
    edges = np.diff(np.concatenate(([0], quiet.view(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    lengths = ends - starts
    long_runs = np.flatnonzero(lengths >= long_frames)
    # The latest long run, else the longest (the latest of equals).
    k = long_runs[-1] if len(long_runs) else len(lengths) - 1 - int(np.argmax(lengths[::-1]))
    return f_lo + int(starts[k]), f_lo + int(ends[k])


def plan_segments(
    audio: np.ndarray,
    sr: int = SAMPLING_RATE,
    max_segment_s: float = 30.0,
    search_s: float = 5.0,
    min_segment_s: float = 1.0,
    *,
    silence_db: float = SILENCE_DB,
) -> list[Segment]:
    """Cut a 1-D recording of any length into consecutive segments of at most ``max_segment_s``.

    Each cut is placed in the quietest stretch (25 ms frames, short-time energy) of the last ``search_s``
    seconds before the limit, preferring pauses of at least 0.3 s (the latest such pause wins, so segments
    stay long); no segment is shorter than ``min_segment_s`` unless the whole recording is. Segments cover the
    recording without gaps or overlap; those whose loudest frame is below ``silence_db`` dBFS are marked
    ``is_silent``. An empty recording gives no segments.
    """
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise InputError(f"plan_segments expects 1-D mono samples, got shape {tuple(audio.shape)}")
    if not sr or sr <= 0:
        raise InputError(f"sr must be a positive number of Hz, got {sr!r}")
    if not 0 < min_segment_s * 2 <= max_segment_s:
        raise InputError(
            f"need 0 < 2 * min_segment_s <= max_segment_s, got min_segment_s={min_segment_s}, "
            f"max_segment_s={max_segment_s}"
        )
    if search_s < 0:
        raise InputError(f"search_s must be >= 0, got {search_s}")
    n = len(audio)
    if n == 0:
        return []
    frame_len = max(1, round(FRAME_S * sr))
    max_n, min_n = int(max_segment_s * sr), max(1, int(min_segment_s * sr))
    search_n = min(int(search_s * sr), max_n - min_n)
    long_frames = max(1, round(LONG_PAUSE_S * sr / frame_len))
    db = frame_energy_db(audio, frame_len)

    bounds = [0]
    start = 0
    while n - start > max_n:
        limit = start + max_n
        lo = max(start + min_n, limit - search_n)
        hi = max(lo, min(limit, n - min_n))  # leave at least min_n samples after the cut
        f_lo, f_hi = -(-lo // frame_len), hi // frame_len  # frames wholly inside [lo, hi]
        if f_hi > f_lo:
            a, b = _best_cut(db, f_lo, f_hi, long_frames)
            cut = (a + b) * frame_len // 2
        else:
            cut = hi
        bounds.append(cut)
        start = cut
    bounds.append(n)

    starts = np.asarray(bounds[:-1], dtype=np.int64)
    loudest = np.maximum.reduceat(db, starts // frame_len)  # [segments]
    segments = [
        Segment(a / sr, b / sr, a, b, bool(peak < silence_db))
        for a, b, peak in zip(bounds[:-1], bounds[1:], loudest.tolist(), strict=True)
    ]
    logger.debug("planned %d segments (%d silent) over %.1f s", len(segments),
                 sum(s.is_silent for s in segments), n / sr)
    return segments


# ----------------------------------------------------------------------------------------------------------
# generation


def engine_generate_fn(engine: Any, **options: Any) -> GenerateFn:
    """A :data:`GenerateFn` over an :class:`af3.generation.engine.Engine` (the default way in: the Engine's
    decoding loop, batched); greedy unless ``options`` say otherwise (any
    :class:`af3.generation.options.GenerationOptions` field)."""
    from .generation.options import GenerationOptions

    options.setdefault("temperature", 0.0)

    def generate(conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
        outs = engine.generate(conversations, GenerationOptions(max_new_tokens=max_new_tokens, **options))
        return [o.text for o in outs]

    return generate


def _run(generate_fn: GenerateFn, conversations: list[list[dict]], max_new_tokens: int) -> list[str]:
    texts = generate_fn(conversations, max_new_tokens)
    if not isinstance(texts, (list, tuple)) or len(texts) != len(conversations) \
            or not all(isinstance(t, str) for t in texts):
        raise InputError(f"generate_fn must return one string per conversation ({len(conversations)}), "
                         f"got {type(texts).__name__}")
    return list(texts)


def _engine(model: Any, processor: Any, generate_fn: GenerateFn | None, batch_size: int) -> GenerateFn:
    """``generate_fn``, or an Engine over ``model`` and ``processor`` for ``batch_size`` segments at a time. Its
    prefix cache is off: segments are different audio and never share a prefix worth keeping."""
    if generate_fn is not None:
        return generate_fn
    if model is None or processor is None:
        raise InputError("pass a model and a processor, or a generate_fn")
    from .generation.engine import Engine

    return engine_generate_fn(Engine(model, processor, max_batch_size=batch_size, prefix_cache_bytes=0))


def _check_cap(processor: Any, seconds: float, what: str) -> None:
    """Refuse clips the processor would truncate (``seconds`` of audio per call, set by ``what``)."""
    cap = getattr(processor, "max_audio_len", None)
    if cap is not None and seconds > cap:
        raise InputError(
            f"{what} asks for clips of {seconds:g} s, longer than the processor's max_audio_len={cap:g} s, so "
            f"they would be truncated; use a smaller {what} or opt in with "
            f"`with allow_long_context(processor, {math.ceil(seconds):d}):`"
        )


def _load(audio: Any, sampling_rate: int | None) -> np.ndarray:
    return load_audio(audio, sampling_rate=sampling_rate)


# ----------------------------------------------------------------------------------------------------------
# transcription


@dataclass(frozen=True)
class TranscriptSegment:
    """The text said in ``[start, end)`` seconds."""

    start: float
    end: float
    text: str


@dataclass(frozen=True)
class Transcript:
    """Transcribed segments in time order, and their texts joined with spaces."""

    segments: tuple[TranscriptSegment, ...]
    text: str


def transcribe_long(
    model: Any,
    processor: Any,
    audio: Any,
    *,
    batch_size: int = 8,
    prompt: str | None = None,
    max_new_tokens: int = 256,
    generate_fn: GenerateFn | None = None,
    progress: ProgressFn | None = None,
    sampling_rate: int | None = None,
    max_segment_s: float = 30.0,
    search_s: float = 5.0,
    skip_silent: bool = True,
) -> Transcript:
    """Transcribe a recording of any length, segment by segment (cut at pauses), in batches.

    ``audio`` is anything :func:`af3.audio.load_audio` takes (``sampling_rate`` is the rate of an array).
    Silent segments are skipped. Replies are cleaned as ``decode(strip_prefix=True)`` does; ``generate_fn``
    (see :data:`GenerateFn`) replaces the model, which may then be None. ``progress(done, total)`` counts
    segments.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    engine = _engine(model, processor, generate_fn, batch_size)
    if prompt is None:
        prompt = getattr(processor, "default_transcription_prompt", None) or DEFAULT_TRANSCRIPTION_PROMPT
    wave = _load(audio, sampling_rate)
    if generate_fn is None:
        _check_cap(processor, min(max_segment_s, len(wave) / SAMPLING_RATE), "max_segment_s")
    plan = plan_segments(wave, SAMPLING_RATE, max_segment_s, search_s, min(1.0, max_segment_s / 2))
    todo = [s for s in plan if not (skip_silent and s.is_silent)]
    logger.info("transcribing %.1f s in %d segments (%d silent skipped)", len(wave) / SAMPLING_RATE,
                len(todo), len(plan) - len(todo))

    out: list[TranscriptSegment] = []
    for i in range(0, len(todo), batch_size):
        batch = todo[i : i + batch_size]
        convs = [[{"role": "user", "content": [
            {"type": "text", "text": prompt},
            {"type": "audio", "audio": wave[s.start_sample : s.end_sample]},
        ]}] for s in batch]
        texts = _run(engine, convs, max_new_tokens)
        out.extend(TranscriptSegment(s.start, s.end, strip_transcription(t)) for s, t in zip(batch, texts,
                                                                                            strict=True))
        if progress is not None:
            progress(len(out), len(todo))
    return Transcript(tuple(out), " ".join(s.text for s in out if s.text))


# ----------------------------------------------------------------------------------------------------------
# subtitle formats


def _timestamp(seconds: float, sep: str) -> str:
    ms = max(0, math.floor(seconds * 1000 + 0.5))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _cue_lines(text: str, line_width: int | None) -> list[str]:
    """One line of collapsed whitespace, or lines of at most ``line_width`` characters (words kept whole)."""
    text = " ".join(text.split())
    if not line_width:
        return [text] if text else []
    return textwrap.wrap(text, line_width, break_long_words=False, break_on_hyphens=False)


def to_srt(transcript: Transcript, line_width: int | None = 42) -> str:
    """SubRip: numbered cues ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, each followed by a blank line; segments
    without text are left out."""
    cues = []
    for seg in transcript.segments:
        lines = [line.replace("-->", "->") for line in _cue_lines(seg.text, line_width)]
        if lines:
            stamp = f"{_timestamp(seg.start, ',')} --> {_timestamp(seg.end, ',')}"
            cues.append(f"{len(cues) + 1}\n{stamp}\n" + "\n".join(lines) + "\n\n")
    return "".join(cues)


def to_vtt(transcript: Transcript, line_width: int | None = 42) -> str:
    """WebVTT: a ``WEBVTT`` header and cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm``, each followed by a blank line
    (``&``, ``<`` and ``>`` escaped); segments without text are left out."""
    out = ["WEBVTT\n\n"]
    for seg in transcript.segments:
        lines = [line.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
                 for line in _cue_lines(seg.text, line_width)]
        if lines:
            stamp = f"{_timestamp(seg.start, '.')} --> {_timestamp(seg.end, '.')}"
            out.append(f"{stamp}\n" + "\n".join(lines) + "\n\n")
    return "".join(out)


def to_json(transcript: Transcript, indent: int | None = 2) -> str:
    """``{"text": ..., "segments": [{"id", "start", "end", "text"}]}`` with times in seconds (3 decimals)."""
    return json.dumps({
        "text": transcript.text,
        "segments": [{"id": i, "start": round(s.start, 3), "end": round(s.end, 3), "text": s.text}
                     for i, s in enumerate(transcript.segments)],
    }, ensure_ascii=False, indent=indent)


# ----------------------------------------------------------------------------------------------------------
# questions over long audio


@dataclass(frozen=True)
class LongAnswer:
    """The final answer and the per-chunk answers it was built from, as ``(start_s, end_s, text)``."""

    answer: str
    partials: tuple[tuple[float, float, str], ...]


def clock(seconds: float) -> str:
    """``M:SS`` below an hour, ``H:MM:SS`` above (rounded to the second): 600 → "10:00", 3725 → "1:02:05"."""
    total = max(0, math.floor(seconds + 0.5))
    h, rest = divmod(total, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def map_prompt(question: str, part: int, parts: int, start: float, end: float) -> str:
    """The question about one chunk, saying which part of the recording it is."""
    return (f"This is part {part} of {parts} of a recording, from {clock(start)} to {clock(end)}. "
            f"If this part holds nothing relevant to the question, say so.\n{question}")


def reduce_prompt(question: str, partials: Sequence[tuple[float, float, str]], duration: float) -> str:
    """The text-only final turn: the partial answers, labelled by part and time range, to be combined."""
    n = len(partials)
    labelled = "\n".join(f"Part {i} ({clock(a)} to {clock(b)}): {' '.join(t.split()) or '(no answer)'}"
                         for i, (a, b, t) in enumerate(partials, 1))
    return (f"A recording of {clock(duration)} was split into {n} parts, and the question below was answered "
            f"for each part on its own.\n\nQuestion: {question}\n\nAnswers for each part:\n{labelled}\n\n"
            "Combine them into one answer to the question about the whole recording. Say which parts (with "
            "their time ranges) your answer draws on.")


def ask_long(
    model: Any,
    processor: Any,
    audio: Any,
    question: str,
    *,
    chunk_s: float = MAX_AUDIO_SECONDS,
    generate_fn: GenerateFn | None = None,
    max_new_tokens: int = 256,
    sampling_rate: int | None = None,
    batch_size: int = 1,
    progress: ProgressFn | None = None,
) -> LongAnswer:
    """Answer ``question`` about a recording of any length.

    Up to ``chunk_s`` seconds: one direct question. Longer: map — the question is asked about each chunk of
    at most ``chunk_s`` (cut at pauses) with a prompt saying which part and time range it is; reduce — a
    text-only turn gives the model every partial answer, labelled by part and time range, and asks for one
    answer that names the parts it drew on. ``progress(done, total)`` counts the parts, then the reduce turn.
    """
    if not isinstance(question, str) or not question.strip():
        raise InputError("question must be a non-empty string")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    engine = _engine(model, processor, generate_fn, batch_size)
    wave = _load(audio, sampling_rate)
    duration = len(wave) / SAMPLING_RATE
    if generate_fn is None:
        _check_cap(processor, min(chunk_s, duration), "chunk_s")
    if duration <= chunk_s:
        conv = [{"role": "user", "content": [{"type": "audio", "audio": wave}, {"type": "text", "text": question}]}]
        answer = _run(engine, [conv], max_new_tokens)[0].strip()
        if progress is not None:
            progress(1, 1)
        return LongAnswer(answer, ((0.0, duration, answer),))

    chunks = plan_segments(wave, SAMPLING_RATE, chunk_s, search_s=min(30.0, chunk_s / 10),
                           min_segment_s=min(1.0, chunk_s / 2))
    total = len(chunks) + 1
    logger.info("asking about %.1f s in %d chunks of at most %g s", duration, len(chunks), chunk_s)
    partials: list[tuple[float, float, str]] = []
    for i in range(0, len(chunks), batch_size):
        batch = chunks[i : i + batch_size]
        convs = [[{"role": "user", "content": [
            {"type": "audio", "audio": wave[c.start_sample : c.end_sample]},
            {"type": "text", "text": map_prompt(question, i + k + 1, len(chunks), c.start, c.end)},
        ]}] for k, c in enumerate(batch)]
        texts = _run(engine, convs, max_new_tokens)
        partials.extend((c.start, c.end, t.strip()) for c, t in zip(batch, texts, strict=True))
        if progress is not None:
            progress(len(partials), total)

    final = [{"role": "user", "content": [{"type": "text", "text": reduce_prompt(question, partials, duration)}]}]
    answer = _run(engine, [final], max_new_tokens)[0].strip()
    if progress is not None:
        progress(total, total)
    return LongAnswer(answer, tuple(partials))


# ----------------------------------------------------------------------------------------------------------
# more than MAX_AUDIO_WINDOWS windows


@contextlib.contextmanager
def allow_long_context(processor: Any, max_seconds: float) -> Iterator[Any]:
    """``with allow_long_context(processor, 1200): ...`` — let the processor take up to ``max_seconds`` of
    audio per clip (``max_seconds // 30`` windows) inside the block; the previous cap comes back afterwards.

    Beyond :data:`af3.config.MAX_AUDIO_SECONDS` (20 windows) this is outside what AF3 was trained on, which is
    logged as a warning. It changes
    the processor object itself, so do not share it with other threads meanwhile; for one call,
    ``processor.apply_chat_template(..., max_audio_len=...)`` does the same without state.
    """
    window = getattr(getattr(processor, "feature_config", None), "chunk_length", WINDOW_SECONDS)
    if not isinstance(max_seconds, (int, float)) or not max_seconds >= window:
        raise InputError(f"max_seconds must be at least one {window} s window, got {max_seconds!r}")
    if max_seconds > MAX_AUDIO_SECONDS:
        logger.warning(
            "max_audio_len raised to %g s (%d windows): AF3 was trained on up to %g s (%d windows); answers "
            "about longer audio are untested and may degrade", max_seconds, int(max_seconds // window),
            MAX_AUDIO_SECONDS, MAX_AUDIO_WINDOWS,
        )
    previous = processor.max_audio_len
    processor.max_audio_len = max_seconds
    try:
        yield processor
    finally:
        processor.max_audio_len = previous
