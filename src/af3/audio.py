"""Audio input: load, decode, mix to mono and resample to 16 kHz. Nothing here is model-specific.

:func:`load_audio` accepts a local path, an http(s) URL, a ``data:`` URI, encoded bytes, or a numpy
array / torch tensor, and always returns a 1-D float32 mono array at the target rate. Encoded data is
decoded with ``soundfile`` (wav, flac, ogg/vorbis/opus, mp3, aiff, ...) and, failing that, with PyAV/FFmpeg
(m4a/aac, webm/opus, ...). Channels are averaged and resampling uses ``soxr`` at "HQ" quality with the output
length ``ceil(n * target / source)``: the same steps as transformers' ``load_audio`` (soundfile backend) and
``librosa.load``. :func:`open_audio` streams the same samples block by block for long recordings. Every
user-caused problem is an :class:`AudioError` with a one-line message.

Untrusted input is expected. The rule: no traceback, no silent wrong answer, bounded memory.

* **Limits** (:class:`af3.fetch.FetchPolicy`, overridable per call): encoded input from a client or a network
  — downloads, ``data:`` URIs, bytes — is capped at ``max_bytes`` (100 MiB), local files at ``max_file_bytes``
  (no cap by default: decoding reads only what is used); downloads have a total ``deadline_s`` (60 s), refuse
  private/loopback/link-local addresses unless ``allow_private_network=True`` and follow at most
  ``max_redirects`` (5) http(s) redirects (see :mod:`af3.fetch`); a whole-file load stops with an error past
  ``max_duration_s`` (4 h) of audio (arrays, already in memory, are exempt; ``max_seconds`` loads and streams
  read only what they use). Sampling rates outside 1 kHz – 768 kHz are refused (arrays, target
  rates and file headers alike), and so are files with more than 64 channels (arrays: 8).
* **Memory follows what is used**: files are decoded in blocks and mixed to mono block by block (a
  [channels, samples] array of a whole file never exists), resampled with soxr's streaming resampler (whose
  output equals the one-shot ``soxr.resample`` exactly), and ``max_seconds`` stops decoding once that much
  audio is in. :func:`open_audio` keeps a few blocks in memory whatever the length.
* **Damaged audio** — what the decoders report, and what we decided for each case:

  - *Shorter than its header promises* — a WAV/AU whose data chunk is cut short (a truncated file, or a data
    size that lies high), an AIFF with fewer frames than COMM says, a FLAC, an MP3 with a Xing/Info/VBRI
    header, an mp4/webm/ogg shorter than its container's duration: **error** ("audio file 'x.wav' is
    truncated: its header promises 2.00 s, 1.00 s could be decoded"), because the answer would silently cover
    less audio than was sent. Shortfalls up to 0.1 s (or two MP3 frames) are codec framing: a **warning** for
    exact formats (PCM, FLAC), nothing for lossy ones. MP3s without a length header and streams without a
    duration promise nothing and cannot be judged this way.
  - *Decoding fails part-way* (FLAC frame errors, a demuxer error): **error** "is truncated or damaged:
    decoding failed after 0.99 s"; a stream raises at that block.
  - *Skipped or undecodable data* — MP3 frames libmpg123 resyncs over (its "Note: Illegal Audio-MPEG-Header
    ... Skipped N bytes" lines, captured from fd 2 so they never reach the terminal), FFmpeg packets that fail
    to decode: **error** when it is over 5% of the input (or the length falls short as above), else a
    **warning** on the ``af3`` logger — a glitch in audio that is otherwise usable.
  - *WAV data size that lies low* (a long run of data after the declared data that is not chunks): **error**,
    which size is right cannot be known.
  - *WAV RIFF size larger than the file, data chunk complete*: **warning** (metadata after the audio is
    missing, the audio is not).
  - *WAV/AU data size 0 or 0xFFFFFFFF* (written to a pipe): **accepted**, read to the end of the file
    (through FFmpeg where libsndfile counts no frames); so is a FLAC without its total sample count.
  - *Ogg whose last page lacks the end-of-stream flag*: **warning**, it may be truncated but nothing says by
    how much.
  - *Unknown or misleading content* (an HTML error page, text, JSON, an image, an archive, a playlist; a
    cut-off MP4 without its index): **error** naming what it is — "it is an HTML page, not audio, despite its
    .wav name", "it starts like an MP4/M4A file, but ... it is truncated or damaged".
  - *NaN/inf samples, 0 samples, absurd rates or channel counts in a header*: **error**.

  A path that is not a regular file (a device such as ``/dev/urandom``, a FIFO, a socket, a directory) is
  refused before it is opened for reading (FIFOs are never waited on).
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np

from .audio_decode import ArrayDecoder, Decoder, open_encoded
from .audio_probe import MAX_FILE_CHANNELS, MAX_RATE, MIN_RATE, check_rate_value
from .audio_sources import (  # noqa: F401 (_to_float32 is used by af3.segments)
    MAX_CHANNELS,
    _array_to_mono,
    _check_size,
    _is_array,
    _open_local_file,
    _read_data_uri,
    _short,
    _to_float32,
)
from .errors import AudioError
from .fetch import DEFAULT_POLICY, FetchPolicy, fetch

__all__ = [
    "MAX_CHANNELS", "MAX_FILE_CHANNELS", "MAX_RATE", "MIN_RATE", "SAMPLING_RATE", "AudioStream", "FetchPolicy",
    "decode_audio", "load_audio", "open_audio", "resample", "soxr_resample",
]

logger = logging.getLogger("af3")

SAMPLING_RATE = 16000

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_PREALLOCATE = 1 << 24  # samples (64 MB) an output buffer may be sized to from a header's claim alone
_HOLD = 16  # output samples held back until the end, so the length can be fixed to ceil(n * target / source)


def load_audio(
    source: Any,
    sampling_rate: float | None = None,
    *,
    target_rate: int = SAMPLING_RATE,
    allow_urls: bool = True,
    allow_local_files: bool = True,
    max_seconds: float | None = None,
    policy: FetchPolicy | None = None,
    max_bytes: int | None = None,
    deadline_s: float | None = None,
    allow_private_network: bool | None = None,
    max_redirects: int | None = None,
    max_duration_s: float | None = None,
    timeout: float | None = None,
) -> np.ndarray:
    """Load ``source`` as a 1-D float32 mono waveform at ``target_rate`` Hz.

    ``source`` is one of: a local path (``str`` / ``os.PathLike``), an ``http(s)://`` URL, a ``data:``
    URI (base64 or percent-encoded), encoded file contents (``bytes`` / ``bytearray`` / ``memoryview``), or
    samples as a numpy array / torch tensor ([T], [C, T] or [T, C] with C <= 8; integer PCM is scaled).
    ``sampling_rate`` is the rate of array input (default 16000); encoded input carries its own rate, so it
    is ignored there.

    ``max_seconds``: decode only the start of the audio and return at most ``ceil(max_seconds *
    target_rate)`` samples — exactly the first samples of the whole load (a warning says when audio was
    left out). Limits come from ``policy`` (default :data:`af3.fetch.DEFAULT_POLICY`), and each of
    ``max_bytes``, ``deadline_s``, ``allow_private_network``, ``max_redirects``, ``max_duration_s`` overrides
    that field when not None (``timeout`` is the old name of ``deadline_s``; a ``max_bytes`` given here also caps a
    local file, which the default policy does not). Raises :class:`AudioError` for
    anything unusable.
    """
    target = _check_target_rate(target_rate)
    seconds = _check_max_seconds(max_seconds)
    keep = None if seconds is None else math.ceil(seconds * target)
    pol = _policy(policy, max_bytes, deadline_s, allow_private_network, max_redirects, max_duration_s, timeout)
    decoder, what = _open_decoder(source, sampling_rate, allow_urls, allow_local_files, pol)
    try:
        if keep is None:
            _check_duration(decoder, what, pol.max_duration_s)
        return _collect(decoder, target, what, pol.max_duration_s, keep)
    finally:
        decoder.close()


def open_audio(
    source: Any,
    sampling_rate: float | None = None,
    *,
    target_rate: int = SAMPLING_RATE,
    allow_urls: bool = True,
    allow_local_files: bool = True,
    policy: FetchPolicy | None = None,
    max_bytes: int | None = None,
    deadline_s: float | None = None,
    allow_private_network: bool | None = None,
    max_redirects: int | None = None,
    max_duration_s: float | None = None,
) -> AudioStream:
    """Open ``source`` (anything :func:`load_audio` takes) for reading block by block at ``target_rate``.

    ``with open_audio("talk.mp3") as audio: for block in audio.blocks(30): ...`` decodes and resamples
    incrementally, so memory stays flat however long the recording is; the blocks put together equal
    ``load_audio(source)``. A URL is downloaded whole first (bounded by ``max_bytes``). The same checks as
    :func:`load_audio` apply; damage found part-way raises :class:`AudioError` at the block where it is found.
    Memory does not grow with the length, so the policy's whole-load ``max_duration_s`` does not apply; the
    ``max_duration_s`` keyword (None: no limit) caps the length of what is read, for callers that want one.
    """
    target = _check_target_rate(target_rate)
    pol = _policy(policy, max_bytes, deadline_s, allow_private_network, max_redirects, None, None)
    limit = None if max_duration_s is None else FetchPolicy(max_duration_s=max_duration_s).max_duration_s
    decoder, what = _open_decoder(source, sampling_rate, allow_urls, allow_local_files, pol)
    try:
        _check_duration(decoder, what, limit)
    except BaseException:
        decoder.close()
        raise
    return AudioStream(decoder, what, target, limit)


class AudioStream:
    """An opened audio source, read as consecutive float32 mono blocks at ``target_rate`` (see
    :func:`open_audio`). ``duration`` is the length in seconds when the header tells it without decoding
    (soundfile's frame count, FFmpeg's stream duration), else None. ``source_rate`` and ``channels`` describe
    the source. Read it once; close it (or use ``with``) when done early."""

    def __init__(self, decoder: Decoder, name: str, target_rate: float, max_duration_s: float | None):
        self._decoder = decoder
        self._max_duration_s = max_duration_s
        self._used = False
        self._closed = False
        self.name = name
        self.target_rate = target_rate
        self.source_rate = decoder.rate
        self.channels = decoder.channels
        self.duration: float | None = decoder.duration

    def blocks(self, seconds: float = 30.0) -> Iterator[np.ndarray]:
        """Consecutive blocks of ``round(seconds * target_rate)`` samples (the last one shorter)."""
        ok = isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
        if not ok or not math.isfinite(seconds) or seconds <= 0:
            raise AudioError(f"block length must be a positive number of seconds, got {seconds!r}")
        size = round(seconds * self.target_rate)
        if size < 1:
            raise AudioError(f"block length {seconds!r} s is shorter than one sample at {self.target_rate:g} Hz")
        if self._used:
            raise AudioError(f"{self.name} has already been read once; open it again to read it again")
        if self._closed:
            raise AudioError(f"{self.name} is closed; open it again to read it")
        self._used = True
        return self._blocks(size)

    def _blocks(self, size: int) -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        count = 0
        try:
            for out in _Resampled(self._decoder, self.target_rate, self.name, self._max_duration_s, None):
                pending.append(out)
                count += len(out)
                while count >= size:
                    joined = pending[0] if len(pending) == 1 else np.concatenate(pending)
                    block, rest = joined[:size], joined[size:]
                    yield block.copy() if len(rest) else block
                    pending, count = ([rest] if len(rest) else []), len(rest)
            if count:
                yield pending[0] if len(pending) == 1 else np.concatenate(pending)
        finally:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._decoder.close()

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        length = "unknown length" if self.duration is None else f"{self.duration:.2f} s"
        return f"AudioStream({self.name}, {length}, {self.source_rate:g} Hz → {self.target_rate:g} Hz)"


def decode_audio(data: bytes | str, name: str = "<bytes>") -> tuple[np.ndarray, int]:
    """Decode encoded audio (bytes, or a local path) → (float32 mono samples [T], sampling rate).

    Tries ``soundfile`` first and PyAV/FFmpeg second; ``name`` is only used in error messages. The default
    :class:`FetchPolicy` limits apply.
    """
    if isinstance(data, str):
        name = _short(data) if name == "<bytes>" else name
        f, size = _open_local_file(data, DEFAULT_POLICY.max_file_bytes)
        what = f"audio file {name!r}"
    else:
        data = bytes(data)
        if not data:
            raise AudioError(f"{name!r} is empty (0 bytes)")
        _check_size(len(data), DEFAULT_POLICY.max_bytes, f"{name!r}")
        f, size, what = io.BytesIO(data), len(data), f"the audio {name!r}"
    try:
        decoder = open_encoded(f, size, name, what)
    except BaseException:
        f.close()
        raise
    try:
        _check_duration(decoder, what, DEFAULT_POLICY.max_duration_s)
        return _collect(decoder, decoder.rate, what, DEFAULT_POLICY.max_duration_s, None), int(decoder.rate)
    finally:
        decoder.close()


def resample(samples: np.ndarray, orig_rate: float, target_rate: float) -> np.ndarray:
    """Resample a 1-D float32 signal with soxr "HQ" → exactly ``ceil(n * target / orig)`` samples."""
    if orig_rate == target_rate:
        return samples
    n_out = math.ceil(len(samples) * target_rate / orig_rate)
    out = soxr_resample(samples, orig_rate, target_rate)
    if len(out) < n_out:  # [T'] → pad / trim to the length librosa.load and transformers use
        out = np.pad(out, (0, n_out - len(out)))
    return np.ascontiguousarray(out[:n_out], dtype=np.float32)


def soxr_resample(samples: np.ndarray, orig_rate: float, target_rate: float) -> np.ndarray:
    """Plain ``soxr.resample`` at HQ quality (kept separate so the import stays lazy)."""
    import soxr

    return soxr.resample(samples, orig_rate, target_rate, quality="HQ")


# ----------------------------------------------------------------------------------------------------------
# the streaming pipeline: decoder blocks → checked → resampled


class _Resampled:
    """Iterate over a decoder's output at ``target_rate``: finite samples only, the total length fixed to
    ``ceil(n * target / source)`` as :func:`resample` does, at most ``keep`` samples when given."""

    def __init__(self, decoder: Decoder, target_rate: float, what: str, max_duration_s: float | None,
                 keep: int | None):
        self.decoder, self.target_rate, self.what = decoder, target_rate, what
        self.max_duration_s, self.keep = max_duration_s, keep
        self.truncated = False  # stopped at ``keep`` with more audio left

    def __iter__(self) -> Iterator[np.ndarray]:
        rate, target, keep = self.decoder.rate, self.target_rate, self.keep
        same = rate == target
        stream = None
        if not same:
            import soxr

            stream = soxr.ResampleStream(rate, target, 1, dtype="float32", quality="HQ")
        limit_in = math.inf if self.max_duration_s is None or self.decoder.in_memory else self.max_duration_s * rate
        need_in = math.inf if keep is None else keep * rate / target  # source samples behind ``keep``
        n_in = n_out = 0
        hold = np.zeros(0, np.float32)
        blocks = self.decoder.blocks()
        try:
            for block in blocks:
                if len(block) == 0:
                    continue
                if not np.isfinite(block).all():
                    raise AudioError(f"{self.what} contains NaN or infinite samples")
                n_in += len(block)
                if n_in > limit_in:
                    raise AudioError(
                        f"{self.what} is longer than the {_hours(self.max_duration_s)} limit (max_duration_s); "
                        "use only its start (max_seconds), stream it with open_audio, or raise the limit"
                    )
                if same:
                    out = block
                else:
                    out = stream.resample_chunk(block)
                    if len(hold):
                        out = np.concatenate([hold, out])
                    hold, out = out[len(out) - min(_HOLD, len(out)):], out[: len(out) - min(_HOLD, len(out))]
                if keep is not None and n_out + len(out) >= keep:
                    yield out[: keep - n_out]
                    self.truncated = n_in > need_in + 1 or next(iter(blocks), None) is not None
                    judge = getattr(self.decoder, "judge", None)
                    if self.truncated and judge is not None:
                        judge.stopped_early(round(n_in))
                    return
                if len(out):
                    n_out += len(out)
                    yield out
            if n_in == 0:
                raise AudioError(f"{self.what} is empty (0 samples)")
            if not same:
                tail = stream.resample_chunk(np.zeros(0, np.float32), last=True)
                tail = np.concatenate([hold, tail]) if len(hold) else tail
                want = max(0, math.ceil(n_in * target / rate) - n_out)
                if len(tail) < want:
                    tail = np.pad(tail, (0, want - len(tail)))
                tail = tail[:want]
                if keep is not None:
                    tail = tail[: max(0, keep - n_out)]
                if len(tail):
                    yield np.ascontiguousarray(tail, dtype=np.float32)
        finally:
            close = getattr(blocks, "close", None)
            if close is not None:
                close()


def _collect(decoder: Decoder, target_rate: float, what: str, max_duration_s: float | None,
             keep: int | None) -> np.ndarray:
    """Run the pipeline into one array, sized up front when the length is known."""
    expected = None
    if decoder.exact_frames and decoder.frames:
        expected = math.ceil(decoder.frames * target_rate / decoder.rate)
        if not decoder.frames_from_data:  # a header's claim: grow past it only as samples arrive
            expected = min(expected, _PREALLOCATE)
    if keep is not None:
        expected = keep if expected is None else min(expected, keep)
    buf = np.empty(expected if expected else 1 << 16, np.float32)
    n = 0
    pipeline = _Resampled(decoder, target_rate, what, max_duration_s, keep)
    for out in pipeline:
        if n + len(out) > len(buf):
            grown = np.empty(max(n + len(out), 2 * len(buf)), np.float32)
            grown[:n] = buf[:n]
            buf = grown
        buf[n : n + len(out)] = out
        n += len(out)
    if pipeline.truncated:
        length = "" if decoder.duration is None else f" is {decoder.duration:.1f} s long;"
        logger.warning("%s%s only its first %g s are used (max_seconds)", what, length or " is longer;",
                       keep / target_rate)
    if n == len(buf):
        return buf
    return buf[:n].copy() if n < 0.9 * len(buf) else buf[:n]


def _hours(seconds: float | None) -> str:
    if seconds is None:
        return "unlimited"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:g} s"


def _length(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds:.2f} s"


def _check_duration(decoder: Decoder, what: str, max_duration_s: float | None) -> None:
    if decoder.in_memory:
        return  # samples the caller already holds: resampling at most multiplies them by target / 1 kHz
    duration = decoder.duration
    if max_duration_s is not None and duration is not None and duration > max_duration_s:
        raise AudioError(
            f"{what} is {_length(duration)} long, longer than the {_hours(max_duration_s)} limit (max_duration_s); "
            "use only its start (max_seconds), stream it with open_audio, or raise the limit"
        )


# ----------------------------------------------------------------------------------------------------------
# arguments


def _check_target_rate(rate: Any) -> float:
    return check_rate_value(rate, "target_rate")


def _check_max_seconds(value: Any) -> float | None:
    """``max_seconds`` → None or the value (checked); the caller turns it into samples."""
    if value is None:
        return None
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if not ok or not math.isfinite(value) or value <= 0:
        raise AudioError(f"max_seconds must be a positive, finite number of seconds (or None), got {value!r}")
    return value


def _policy(policy: Any, max_bytes: Any, deadline_s: Any, allow_private_network: Any, max_redirects: Any,
            max_duration_s: Any, timeout: Any) -> FetchPolicy:
    if policy is None:
        policy = DEFAULT_POLICY
    elif not isinstance(policy, FetchPolicy):
        raise AudioError(f"policy must be an af3.fetch.FetchPolicy, got {type(policy).__name__}")
    if deadline_s is None:
        deadline_s = timeout
    # A per-call byte cap is the caller's explicit choice: it holds for local files too.
    return policy.with_overrides(max_bytes=max_bytes, max_file_bytes=max_bytes, deadline_s=deadline_s,
                                 allow_private_network=allow_private_network, max_redirects=max_redirects,
                                 max_duration_s=max_duration_s)


# ----------------------------------------------------------------------------------------------------------
# sources


def _open_decoder(source: Any, sampling_rate: Any, allow_urls: bool, allow_local_files: bool,
                  policy: FetchPolicy) -> tuple[Decoder, str]:
    """Any source → (a decoder at the source rate, how messages name the source)."""
    if _is_array(source):
        rate = SAMPLING_RATE if sampling_rate is None else sampling_rate
        rate = check_rate_value(rate, "sampling_rate")
        mono = _array_to_mono(source)
        return ArrayDecoder(mono, rate), "the audio array"

    if isinstance(source, (bytes, bytearray, memoryview)):
        view = memoryview(source)
        if view.nbytes == 0:
            raise AudioError("the audio bytes are empty (0 bytes)")
        _check_size(view.nbytes, policy.max_bytes, "the audio data")
        data = source if isinstance(source, bytes) else view.tobytes()
        return _decoder_for_bytes(data, "<bytes>", "the audio data"), "the audio data"

    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, bytes):  # os.fspath of a bytes path
        source = os.fsdecode(source)
    if not isinstance(source, str):
        raise AudioError(
            f"cannot load audio from a {type(source).__name__}; pass a file path, an http(s) URL, a data: "
            "URI, encoded bytes, or a numpy array / torch tensor of samples"
        )
    if not source.strip():
        raise AudioError("the audio source is an empty string; pass a file path, an http(s) URL or a data: URI")

    if source[:5].lower() == "data:":
        data = _read_data_uri(source, policy.max_bytes)
        return _decoder_for_bytes(data, "data: URI", "the data: URI audio"), "the data: URI audio"

    match = _SCHEME_RE.match(source)
    if match:
        scheme = match.group(1).lower()
        if scheme not in ("http", "https"):
            raise AudioError(
                f"unsupported URL scheme '{scheme}://' in {_short(source)!r}; use an http(s) URL, a data: "
                "URI or a plain local path"
            )
        if not allow_urls:
            raise AudioError(f"audio URLs are not allowed here (allow_urls=False): {_short(source)!r}")
        data = fetch(source, policy)
        what = f"the audio at {_short(source)!r}"
        return _decoder_for_bytes(data, _short(source), what), what

    if not allow_local_files:
        raise AudioError(
            f"local audio files are not allowed here (allow_local_files=False): {_short(source)!r}; send the "
            "audio as bytes, a data: URI or an http(s) URL instead"
        )
    f, size = _open_local_file(source, policy.max_file_bytes)
    what = f"audio file {_short(source)!r}"
    try:
        return open_encoded(f, size, _short(source), what), what
    except BaseException:
        f.close()
        raise


def _decoder_for_bytes(data: bytes, label: str, what: str) -> Decoder:
    return open_encoded(io.BytesIO(data), len(data), label, what)
