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
import itertools
import json
import logging
import math
import textwrap
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any


from .audio import SAMPLING_RATE, AudioStream, open_audio
from .config import MAX_AUDIO_SECONDS, MAX_AUDIO_WINDOWS, WINDOW_SECONDS
from .errors import InputError
from .fetch import FetchPolicy
from .processor import DEFAULT_TRANSCRIPTION_PROMPT, strip_transcription
from .system import release_free_memory
from .segments import Segment, frame_energy_db, plan_segments, stream_segments  # noqa: F401 (re-exported)

logger = logging.getLogger("af3")

#: ``generate_fn(conversations, max_new_tokens) -> texts``: one raw reply per conversation, in order.
GenerateFn = Callable[[list[list[dict]], int], list[str]]
#: ``progress(done, total)``: called after each batch.
ProgressFn = Callable[[int, int], None]


# ----------------------------------------------------------------------------------------------------------
# generation


def engine_generate_fn(engine: Any, **options: Any) -> GenerateFn:
    """A :data:`GenerateFn` over an :class:`af3.generation.engine.Engine` (the default way in: the Engine's
    decoding loop, batched); greedy unless ``options`` say otherwise (any
    :class:`af3.generation.options.GenerationOptions` field). Segments are not kept in the prefix cache: nobody
    asks a follow-up about one segment's prompt."""
    from .generation.options import GenerationOptions, check_option_names

    check_option_names(options)
    options.setdefault("temperature", 0.0)
    options.setdefault("keep_cache", False)

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


def _open(audio: Any, sampling_rate: int | None, policy: FetchPolicy | None,
          max_duration_s: float | None = None) -> AudioStream:
    """The recording, opened for reading block by block (memory stays flat however long it is)."""
    return open_audio(audio, sampling_rate, policy=policy, max_duration_s=max_duration_s)


def _batches(items: Iterator[Any], size: int) -> Iterator[tuple[list[Any], bool]]:
    """Consecutive lists of ``size`` items (the last one shorter), each with whether it is the last; reads one item
    ahead, not a whole batch (items are segments of audio: memory holds one batch and one segment)."""
    items = iter(items)
    ahead = next(items, None)
    while ahead is not None:
        batch = [ahead]
        ahead = next(items, None)
        while ahead is not None and len(batch) < size:
            batch.append(ahead)
            ahead = next(items, None)
        yield batch, ahead is None


def _check_seconds(name: str, value: Any, low: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        raise InputError(f"{name} must be a number of seconds >= {low:g}, got {value!r}")
    return float(value)


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be a whole number >= 1, got {value!r}")
    return value


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
    duration: float = 0.0  # seconds of audio read (silent segments included)


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
    policy: FetchPolicy | None = None,
    max_duration_s: float | None = None,
    on_segment: Callable[[TranscriptSegment], None] | None = None,
) -> Transcript:
    """Transcribe a recording of any length, segment by segment (cut at pauses), in batches.

    ``audio`` is anything :func:`af3.audio.open_audio` takes (``sampling_rate`` is the rate of an array;
    ``policy`` the :class:`af3.fetch.FetchPolicy` for URLs, bytes and files). It is read as it is transcribed,
    segment by segment, so memory stays flat whatever the length. Silent segments are skipped. Replies are cleaned
    as ``decode(strip_prefix=True)`` does; ``generate_fn`` (see :data:`GenerateFn`) replaces the model, which may
    then be None. ``progress(done, total)`` counts segments (``total`` is an estimate from the file's header);
    ``on_segment(segment)`` gets each transcribed segment as soon as it is done (streaming), and
    ``max_duration_s`` refuses recordings longer than that (None: any length).
    """
    _check_count("batch_size", batch_size)
    _check_count("max_new_tokens", max_new_tokens)
    max_segment_s = _check_seconds("max_segment_s", max_segment_s, 2.0)
    search_s = _check_seconds("search_s", search_s, 0.0)
    if prompt is None:
        prompt = getattr(processor, "default_transcription_prompt", None) or DEFAULT_TRANSCRIPTION_PROMPT
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("prompt must be a non-empty string")
    engine = _engine(model, processor, generate_fn, batch_size)
    out: list[TranscriptSegment] = []
    with _open(audio, sampling_rate, policy, max_duration_s) as stream:
        if generate_fn is None:
            _check_cap(processor, min(max_segment_s, stream.duration or max_segment_s), "max_segment_s")
        # An estimate of the segments for progress(): the length when the header tells it.
        expected = None if stream.duration is None else max(1, math.ceil(stream.duration / max_segment_s))
        segments = stream_segments(stream.blocks(30.0), SAMPLING_RATE, max_segment_s, search_s,
                                   min(1.0, max_segment_s / 2))
        extent = [0.0]  # the end of the last segment read, silent or not: the recording's length at the end

        def spoken():
            for s, x in segments:
                extent[0] = s.end
                if not (skip_silent and s.is_silent):
                    yield s, x

        todo = spoken()
        for batch, last in _batches(todo, batch_size):
            convs = [[{"role": "user", "content": [
                {"type": "text", "text": prompt},
                {"type": "audio", "audio": samples},
            ]}] for _, samples in batch]
            texts = _run(engine, convs, max_new_tokens)
            done = [TranscriptSegment(s.start, s.end, strip_transcription(t))
                    for (s, _), t in zip(batch, texts, strict=True)]
            out.extend(done)
            for segment in done if on_segment is not None else ():
                on_segment(segment)
            release_free_memory()  # memory stays flat with the recording's length (see af3.system)
            if progress is not None:  # the total is exact once the last batch is known
                progress(len(out), len(out) if last else max(len(out) + 1, expected or 0))
    logger.info("transcribed %d segments", len(out))
    return Transcript(tuple(out), " ".join(s.text for s in out if s.text), extent[0])


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
    """``{"text": ..., "duration": ..., "segments": [{"id", "start", "end", "text"}]}``, times in seconds (3
    decimals)."""
    return json.dumps({
        "text": transcript.text,
        "duration": round(transcript.duration, 3),
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


def map_prompt(question: str, part: int, start: float, end: float, total: float | None = None) -> str:
    """The question about one chunk, saying which part of the recording it is (and how long the whole recording is,
    when its header tells: chunks are read as the file streams, so their count is not known in advance)."""
    whole = "a recording" if total is None else f"a recording {clock(total)} long"
    return (f"This is part {part} of {whole}, from {clock(start)} to {clock(end)}. "
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
    policy: FetchPolicy | None = None,
) -> LongAnswer:
    """Answer ``question`` about a recording of any length.

    Up to ``chunk_s`` seconds: one direct question. Longer: map — the question is asked about each chunk of
    at most ``chunk_s`` (cut at pauses) with a prompt saying which part and time range it is; reduce — a
    text-only turn gives the model every partial answer, labelled by part and time range, and asks for one
    answer that names the parts it drew on. ``progress(done, total)`` counts the parts, then the reduce turn.
    """
    if not isinstance(question, str) or not question.strip():
        raise InputError("question must be a non-empty string")
    _check_count("batch_size", batch_size)
    _check_count("max_new_tokens", max_new_tokens)
    chunk_s = _check_seconds("chunk_s", chunk_s, 2.0)
    engine = _engine(model, processor, generate_fn, batch_size)
    with _open(audio, sampling_rate, policy) as stream:
        if generate_fn is None:
            _check_cap(processor, min(chunk_s, stream.duration or chunk_s), "chunk_s")
        chunks = stream_segments(stream.blocks(30.0), SAMPLING_RATE, chunk_s, search_s=min(30.0, chunk_s / 10),
                                 min_segment_s=min(1.0, chunk_s / 2))
        first, second = next(chunks, None), next(chunks, None)
        if first is None:
            raise InputError("the recording is empty (0 samples)")
        if second is None:  # up to chunk_s: one direct question
            seg, samples = first
            conv = [{"role": "user", "content": [{"type": "audio", "audio": samples},
                                                 {"type": "text", "text": question}]}]
            answer = _run(engine, [conv], max_new_tokens)[0].strip()
            if progress is not None:
                progress(1, 1)
            return LongAnswer(answer, ((0.0, seg.end, answer),))
        expected = None if stream.duration is None else max(2, math.ceil(stream.duration / chunk_s))
        logger.info("asking about a long recording in chunks of at most %g s", chunk_s)
        partials: list[tuple[float, float, str]] = []
        pending = [first, second]
        for batch, last in _batches(itertools.chain(pending, chunks), batch_size):
            convs = [[{"role": "user", "content": [
                {"type": "audio", "audio": samples},
                {"type": "text", "text": map_prompt(question, len(partials) + k + 1, c.start, c.end, stream.duration)},
            ]}] for k, (c, samples) in enumerate(batch)]
            texts = _run(engine, convs, max_new_tokens)
            partials.extend((c.start, c.end, t.strip()) for (c, _), t in zip(batch, texts, strict=True))
            release_free_memory()
            if progress is not None:  # parts, then the reduce turn; exact once the last batch is known
                progress(len(partials), (len(partials) if last else max(len(partials) + 1, expected or 0)) + 1)
        duration = partials[-1][1]

    final = [{"role": "user", "content": [{"type": "text", "text": reduce_prompt(question, partials, duration)}]}]
    answer = _run(engine, [final], max_new_tokens)[0].strip()
    if progress is not None:
        progress(len(partials) + 1, len(partials) + 1)
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
