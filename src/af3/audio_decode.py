"""Decoders behind :mod:`af3.audio`: encoded audio → consecutive float32 mono blocks at the source rate.

Every decoder reads block by block and mixes channels to mono per block, so memory follows the block size,
never the file. What a decoder finds wrong is judged here (see the table in :mod:`af3.audio`'s docstring):

* header checks before decoding: RIFF/RF64 WAV, AIFF/AIFC and AU headers are parsed to learn what they
  promise (channels, rate, data size); MP3 files say whether they carry a Xing/Info/VBRI length header;
* libmpg123's notes (libsndfile's MP3 decoder prints them to the process's stderr, fd 2) are captured
  around each soundfile call and never reach the terminal; they are evidence of damage;
* PyAV/FFmpeg packet errors and demuxer errors are counted, and the decoded length is compared with the
  container's duration where that duration is exact (mp4, matroska/webm, ogg, flac, wav, aiff, caf).
"""

from __future__ import annotations

import io
import logging
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from .audio_probe import (
    _HEAD_BYTES,
    MAX_FILE_CHANNELS,
    Probe,
    check_file_channels,
    check_file_rate,
    describe_non_audio,
    probe,
    unsupported_error,
)
from .errors import AudioError

logger = logging.getLogger("af3")


_BLOCK_FRAMES = 1 << 16  # source frames per block (fewer with many channels: see _block_frames)
_BLOCK_VALUES = 1 << 20  # at most this many float32 values (4 MB) per decoded [frames, channels] block
_SHORT_FRAMES = 2304  # two MP3 frames: codec framing and padding, never a truncation worth reporting
_SHORT_SECONDS = 0.1
_DAMAGED_FRACTION = 0.05  # more of the input than this skipped / undecodable → an error, less → a warning
# FFmpeg demuxers whose duration is read from the file's index or header, not estimated from the bit rate.
_EXACT_DURATION_FORMATS = ("mov", "mp4", "matroska", "webm", "ogg", "flac", "wav", "aiff", "caf", "w64")


def _block_frames(channels: int) -> int:
    return max(1024, min(_BLOCK_FRAMES, _BLOCK_VALUES // max(1, channels)))


def mix_to_mono(block: np.ndarray) -> np.ndarray:
    """[frames, channels] float32 → [frames] (the mean over channels, as the whole-file path did)."""
    if block.shape[1] == 1:
        return np.ascontiguousarray(block[:, 0])
    return block.mean(axis=1, dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------
# stderr (fd 2) capture around libsndfile calls


_FD2_LOCK = threading.Lock()
_NOTE_RE = re.compile(r"^(Note|Warning|Error|\[[^\]]*mpg123[^\]]*\])\b|^\[src/", re.IGNORECASE)
_SKIPPED_RE = re.compile(r"Skipped (\d+) bytes", re.IGNORECASE)
_MAX_CAPTURE = 1 << 20


@contextmanager
def captured_stderr() -> Iterator[list[str]]:
    """Redirect the process's fd 2 into a temporary file during the block, then restore it.

    Yields a list that receives the decoder lines written meanwhile (libmpg123's "Note: ..." and the like);
    anything else that was written to fd 2 meanwhile (another thread's logging) is written back to the real
    stderr. A lock makes concurrent captures (and so concurrent soundfile calls that use it) take turns. If
    fd 2 cannot be duplicated (closed), nothing is captured.
    """
    lines: list[str] = []
    with _FD2_LOCK:
        with suppress(Exception):  # a replaced or closed sys.stderr
            sys.stderr.flush()
        try:
            saved = os.dup(2)
        except OSError:
            yield lines
            return
        try:
            with tempfile.TemporaryFile() as tmp:
                os.dup2(tmp.fileno(), 2)
                try:
                    yield lines
                finally:
                    with suppress(Exception):
                        sys.stderr.flush()
                    os.dup2(saved, 2)
                tmp.seek(0)
                text = tmp.read(_MAX_CAPTURE).decode("utf-8", "replace")
        finally:
            os.close(saved)
    others = []
    for line in text.splitlines():
        (lines if _NOTE_RE.search(line.strip()) else others).append(line.strip())
    if others:
        with suppress(OSError):
            os.write(2, ("\n".join(others) + "\n").encode())


def _skipped_bytes(notes: list[str]) -> int:
    return sum(int(m.group(1)) for line in notes for m in _SKIPPED_RE.finditer(line))


# ----------------------------------------------------------------------------------------------------------
# judging the end of a decode


@dataclass
class Judge:
    """Collects evidence while a file decodes and decides, at the end, between fine, warning and error."""

    what: str  # "audio file 'x.wav'"
    rate: float
    promised: int | None  # frames the header promises, if it is trustworthy
    exact: bool  # the promise is exact (PCM header sizes, FLAC): any real shortfall is reported
    input_size: int
    skipped_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    bad_packets: int = 0
    packets: int = 0
    truncated_word: str = "truncated"
    extra_warnings: list[str] = field(default_factory=list)

    def seconds(self, frames: float) -> str:
        return f"{frames / self.rate:.2f} s"

    def damage_detail(self) -> str:
        if self.skipped_bytes:
            return f"the decoder skipped {self.skipped_bytes} bytes of invalid data"
        if self.bad_packets:
            return f"{self.bad_packets} of {self.packets} packets could not be decoded"
        if self.notes:
            return f"the decoder reported: {self.notes[0][:100]}"
        return ""

    def add_notes(self, notes: list[str], decoded: int | None) -> None:
        """MP3 decoder notes; an error as soon as the skipped data passes the damage threshold (unless
        ``decoded`` is None: notes from opening the file are judged with the first block)."""
        # "Xing stream size off by more than 1%": the file is shorter or longer than its length header says,
        # which the length check judges better than the note.
        notes = [n for n in notes if "xing stream size" not in n.lower()]
        if not notes:
            return
        self.notes.extend(notes)
        self.skipped_bytes += _skipped_bytes(notes)
        if decoded is not None and self.skipped_bytes > _DAMAGED_FRACTION * self.input_size and decoded:
            raise self.damaged(decoded)

    def add_bad_packet(self, decoded: int) -> None:
        self.bad_packets += 1
        if self.bad_packets >= 8 and self.bad_packets > _DAMAGED_FRACTION * max(1, self.packets):
            raise self.damaged(decoded)

    def damaged(self, decoded: int, cause: str | None = None) -> AudioError:
        detail = cause or self.damage_detail()
        where = f"after {self.seconds(decoded)}"
        if self.promised:
            where += f" of the {self.seconds(self.promised)} its header promises"
        return AudioError(f"{self.what} is damaged: {detail} ({where}); repair or re-encode it, e.g. with ffmpeg")

    def failed(self, decoded: int) -> AudioError:
        """Decoding stopped with an error part-way through."""
        where = f"after {self.seconds(decoded)}" if decoded else "before any audio"
        promise = f"its header promises {self.seconds(self.promised)}, " if self.promised else ""
        return AudioError(f"{self.what} is truncated or damaged: {promise}decoding failed {where}; send the "
                          "complete file or re-encode it")

    def stopped_early(self, decoded: int) -> None:
        """The reader stopped before the end (``max_seconds``): report the damage seen so far, if any."""
        damage = self.damage_detail()
        if damage:
            logger.warning("%s is damaged: %s in its first %s; that part is used and may contain glitches",
                           self.what, damage, self.seconds(decoded))

    def finish(self, decoded: int) -> None:
        """Called once the decoder reports the end, with the frames decoded."""
        for message in self.extra_warnings:
            logger.warning(message)
        shortfall = 0 if self.promised is None else self.promised - decoded
        tolerance = max(_SHORT_FRAMES, _SHORT_SECONDS * self.rate)
        damage = self.damage_detail()
        if shortfall > tolerance:
            how = "damaged" if damage else self.truncated_word
            got = "nothing" if decoded == 0 else self.seconds(decoded)
            because = f" ({damage})" if damage else ""
            raise AudioError(f"{self.what} is {how}: its header promises {self.seconds(self.promised)}, {got} "
                             f"could be decoded{because}; send the complete file or re-encode it")
        if damage and (self.skipped_bytes > _DAMAGED_FRACTION * self.input_size
                       or self.bad_packets > _DAMAGED_FRACTION * max(1, self.packets)):
            raise self.damaged(decoded)
        if damage:
            logger.warning("%s is damaged: %s; the %s that could be decoded are used and may contain glitches",
                           self.what, damage, self.seconds(decoded))
        elif shortfall > 1 and self.exact:
            logger.warning("%s is truncated: its header promises %s, the last %s are missing; the %s that "
                           "could be decoded are used", self.what, self.seconds(self.promised),
                           self.seconds(shortfall), self.seconds(decoded))


# ----------------------------------------------------------------------------------------------------------
# decoders


class Decoder:
    """Consecutive float32 mono blocks at ``rate`` from one source; ``frames`` is known before decoding."""

    rate: float
    channels: int
    frames: int | None  # frames known without decoding (header), or None
    exact_frames: bool = False  # ``frames`` is what decoding yields (so an output buffer can be sized)
    frames_from_data: bool = False  # ``frames`` was counted from the data present, not read from a header
    in_memory: bool = False  # samples that are already in memory (arrays): no decoding bomb possible

    def blocks(self) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    @property
    def duration(self) -> float | None:
        return None if self.frames is None else self.frames / self.rate


class ArrayDecoder(Decoder):
    """A mono array in memory, served in slices."""

    def __init__(self, samples: np.ndarray, rate: float):
        self.samples, self.rate, self.channels = samples, rate, 1
        self.frames, self.exact_frames = len(samples), True
        self.frames_from_data = self.in_memory = True

    def blocks(self) -> Iterator[np.ndarray]:
        step = _BLOCK_VALUES
        for start in range(0, len(self.samples), step):
            yield self.samples[start : start + step]


class SoundfileDecoder(Decoder):
    def __init__(self, sf_file: Any, info: Probe, what: str, size: int, notes: list[str]):
        self.file = sf_file
        self.rate = float(sf_file.samplerate)
        self.channels = sf_file.channels
        self.frames = sf_file.frames
        self.exact_frames = True
        # libsndfile counts PCM frames from the bytes that are there; other formats' counts are header claims.
        self.frames_from_data = info.kind in ("wav", "au") or sf_file.format in ("WAV", "WAVEX", "AU", "W64", "RF64")
        self.is_mpeg = sf_file.format == "MP3"
        promised: int | None = sf_file.frames
        exact = info.kind in ("wav", "aiff", "au") or sf_file.format in ("FLAC", "WAV", "WAVEX", "AIFF", "AU")
        if info.kind in ("wav", "au") and info.data_declared and info.data_available is not None \
                and info.data_declared > info.data_available:
            # libsndfile counts the frames that are there; the header promised more.
            if info.block_align:
                promised = info.data_declared // info.block_align
            elif info.data_available:
                promised = math.floor(sf_file.frames * info.data_declared / info.data_available)
        elif info.kind == "aiff" and info.promised_frames:
            promised = info.promised_frames
        elif self.is_mpeg and not info.has_length_header:
            promised, exact = None, False  # estimated from the bit rate, not a promise
        self.judge = Judge(what, self.rate, promised, exact, size)
        if info.kind in ("wav", "au"):
            self.judge.truncated_word = "truncated (or its data size field is wrong)"
        self.judge.extra_warnings.extend(info.warnings)
        if self.is_mpeg and notes:
            self.judge.add_notes(notes, None)
        if info.kind == "ogg" and info.ogg_eos is False:
            self.judge.extra_warnings.append(
                f"{what} does not end with an end-of-stream page: it may be truncated (all it holds was used)")

    def blocks(self) -> Iterator[np.ndarray]:
        n = _block_frames(self.channels)
        decoded = 0
        while True:
            try:
                if self.is_mpeg:
                    with captured_stderr() as notes:
                        data = self.file.read(n, dtype="float32", always_2d=True)
                    self.judge.add_notes(notes, decoded)
                else:
                    data = self.file.read(n, dtype="float32", always_2d=True)
            except AudioError:
                raise
            except Exception:
                raise self.judge.failed(decoded) from None
            if len(data) == 0:
                break
            decoded += len(data)
            yield mix_to_mono(data)
        self.judge.finish(decoded)

    def close(self) -> None:
        self.file.close()


class _NoAudioStream(Exception):
    pass


class PyAVDecoder(Decoder):
    """FFmpeg through PyAV, from a Python file object; it may open nothing else (``protocol_whitelist``), so
    playlists (HLS, DASH, concat, SDP) cannot make it fetch URLs or read other local files."""

    def __init__(self, f: BinaryIO, what: str, size: int, info: Probe):
        import av

        self.container = av.open(f, mode="r", options={"protocol_whitelist": "none"})
        try:
            stream = next((s for s in self.container.streams if s.type == "audio"), None)
            if stream is None:
                raise _NoAudioStream
            self.stream = stream
            ctx = stream.codec_context
            self.rate = float(ctx.sample_rate or stream.rate or 0)
            self.channels = int(ctx.channels or 0)
            if self.rate <= 0:
                raise AudioError(f"{what} declares no sampling rate; its header is damaged, re-encode the audio")
            check_file_rate(self.rate, what)
            if self.channels:
                check_file_channels(self.channels, what)
            self.frames, promised = None, None
            fmt = self.container.format.name or ""
            exact = any(name in fmt.split(",") for name in _EXACT_DURATION_FORMATS)
            if stream.duration and stream.time_base:
                seconds = float(stream.duration * stream.time_base)
            elif self.container.duration:
                seconds = self.container.duration / 1e6
            else:
                seconds = None
            if seconds is not None and seconds > max(size, 1):
                seconds = None  # under 8 bits per second: no codec is that thin, the header is wrong
            if seconds is not None and seconds > 0:
                self.frames = round(seconds * self.rate)
                promised = self.frames if exact else None
            self.judge = Judge(what, self.rate, promised, False, size)
            self.judge.extra_warnings.extend(info.warnings)
            if "ogg" in fmt.split(",") and info.ogg_eos is False:
                self.judge.extra_warnings.append(
                    f"{what} does not end with an end-of-stream page: it may be truncated (all it holds was used)")
            self.what = what
        except BaseException:
            self.container.close()
            raise

    def blocks(self) -> Iterator[np.ndarray]:
        import av

        resampler = av.AudioResampler(format="fltp")  # keep the layout and rate, convert to float planar
        decoded = 0
        judge = self.judge
        try:
            for packet in self.container.demux(self.stream):
                judge.packets += packet.size > 0
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    judge.add_bad_packet(decoded)
                    continue
                for frame in frames:
                    for out in resampler.resample(frame):
                        block = self._mono(out)
                        decoded += len(block)
                        yield block
            for out in resampler.resample(None):
                block = self._mono(out)
                decoded += len(block)
                yield block
        except AudioError:
            raise
        except (av.error.FFmpegError, ValueError, OSError):
            if decoded == 0 and judge.promised is None:
                raise judge.failed(0) from None
            raise judge.failed(decoded) from None
        judge.finish(decoded)

    def _mono(self, frame: Any) -> np.ndarray:
        planar = frame.to_ndarray()  # [C, n] float32
        if planar.shape[0] > MAX_FILE_CHANNELS:
            check_file_channels(planar.shape[0], self.what)
        planar = planar.astype(np.float32, copy=False)
        return planar[0].copy() if planar.shape[0] == 1 else planar.mean(axis=0)

    def close(self) -> None:
        self.container.close()


# ----------------------------------------------------------------------------------------------------------
# opening


def open_encoded(f: BinaryIO, size: int, label: str, what: str) -> Decoder:
    """A decoder for the encoded audio in the seekable file ``f`` (``size`` bytes): soundfile first (wav, flac,
    ogg, mp3, aiff, ...), PyAV/FFmpeg second (m4a/aac, webm/opus, ...). ``label`` names the input in "could not
    decode" messages, ``what`` elsewhere ("audio file 'x.wav'"). On success the decoder owns ``f``."""
    f.seek(0)
    head = f.read(_HEAD_BYTES)
    f.seek(0)
    non_audio = describe_non_audio(head)
    if non_audio and not non_audio[0].startswith("nothing"):
        raise unsupported_error(label, head)
    info = probe(f, size, head, what)
    if info.errors:
        raise AudioError(info.errors[0])
    if info.channels is not None:
        check_file_channels(info.channels, what)
    if info.rate is not None:
        check_file_rate(info.rate, what)

    decoder = _try_soundfile(f, size, what, info)
    if decoder is not None:
        return decoder
    f.seek(0)
    try:
        return PyAVDecoder(f, what, size, info)
    except AudioError:
        raise
    except _NoAudioStream:
        raise unsupported_error(label, head, "FFmpeg found no audio stream") from None
    except Exception:
        raise unsupported_error(label, head) from None


def _try_soundfile(f: BinaryIO, size: int, what: str, info: Probe) -> Decoder | None:
    import soundfile as sf

    f.seek(0)
    try:
        with captured_stderr() as notes:
            sf_file = sf.SoundFile(f)
    except Exception:  # any soundfile failure means "try the next decoder"
        return None
    try:
        check_file_rate(float(sf_file.samplerate), what)
        check_file_channels(sf_file.channels, what)
        cut_short = bool(info.data_declared and info.data_available is not None
                         and info.data_declared > info.data_available)  # judged by SoundfileDecoder
        if (sf_file.frames == 0 and not cut_short) or sf_file.frames >= 1 << 62:
            # A header that counts no frames in a file that may hold data (a stream-written WAV with a 0 size)
            # or an unknown count (SF_COUNT_MAX: a FLAC without its total): FFmpeg reads such files to the end.
            sf_file.close()
            return None
        return SoundfileDecoder(sf_file, info, what, size, notes)
    except BaseException:
        sf_file.close()
        raise


def read_head(data: bytes | BinaryIO) -> bytes:
    if isinstance(data, bytes):
        return data[:_HEAD_BYTES]
    pos = data.tell()
    head = data.read(_HEAD_BYTES)
    data.seek(pos)
    return head


def bytes_file(data: bytes) -> BinaryIO:
    return io.BytesIO(data)
