"""Cutting a recording of any length into segments at pauses, as it streams in.

:func:`stream_segments` reads mono blocks one after another (from :func:`af3.audio.open_audio`, or one array) and
yields each segment with its samples as soon as it is decided, holding at most one segment plus its look-ahead
in memory: a 2-hour file costs what a 30 s segment costs. :func:`plan_segments` is the same cut over a whole
array. Cuts fall in the quietest stretch (25 ms frames, short-time energy) of the last ``search_s`` seconds
before each limit, preferring pauses of at least 0.3 s (the latest such pause wins, so segments stay long).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from .audio import SAMPLING_RATE, _to_float32
from .errors import InputError

logger = logging.getLogger("af3")

FRAME_S = 0.025  # short-time energy frames
FLOOR_DB = -70.0  # frame energies below this (dBFS) count as equally silent
QUIET_MARGIN_DB = 6.0  # a frame is "quiet" within this margin of the quietest frame of the search window
LONG_PAUSE_S = 0.3  # pauses at least this long are all good cut points; the latest one wins
SILENCE_DB = -50.0  # a segment whose loudest frame is below this is silent
_BLOCK_SAMPLES = 1 << 22  # energy is computed over blocks of ~4 M samples (16 MB of float32)


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

    Works block by block, so a long array needs only a few MB beyond the audio itself.
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


def _check(sr: float, max_segment_s: float, search_s: float, min_segment_s: float) -> None:
    for name, value in (("sr", sr), ("max_segment_s", max_segment_s), ("search_s", search_s),
                        ("min_segment_s", min_segment_s)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise InputError(f"{name} must be a finite number, got {value!r}")
    if sr <= 0:
        raise InputError(f"sr must be a positive number of Hz, got {sr!r}")
    if not 0 < min_segment_s * 2 <= max_segment_s:
        raise InputError(f"need 0 < 2 * min_segment_s <= max_segment_s, got min_segment_s={min_segment_s}, "
                         f"max_segment_s={max_segment_s}")
    if int(min_segment_s * sr) < 1:
        raise InputError(f"segments of {min_segment_s:g} s are shorter than one sample at {sr:g} Hz")
    if search_s < 0:
        raise InputError(f"search_s must be >= 0, got {search_s}")


def stream_segments(
    blocks: Iterable[np.ndarray],
    sr: int = SAMPLING_RATE,
    max_segment_s: float = 30.0,
    search_s: float = 5.0,
    min_segment_s: float = 1.0,
    *,
    silence_db: float = SILENCE_DB,
) -> Iterator[tuple[Segment, np.ndarray]]:
    """Cut consecutive 1-D ``blocks`` (one recording) into segments of at most ``max_segment_s``; yield each
    (segment, its float32 samples) once its end is known. No segment is shorter than ``min_segment_s`` unless the
    whole recording is; segments cover the recording without gaps or overlap; those whose loudest frame is below
    ``silence_db`` dBFS are marked ``is_silent``. An empty recording gives nothing.

    Frames are aligned to the recording's first sample, so the cuts are those :func:`plan_segments` makes on the
    whole array, whatever the block sizes.
    """
    _check(sr, max_segment_s, search_s, min_segment_s)
    frame_len = max(1, round(FRAME_S * sr))
    max_n, min_n = int(max_segment_s * sr), max(1, int(min_segment_s * sr))
    search_n = min(int(search_s * sr), max_n - min_n)
    long_frames = max(1, round(LONG_PAUSE_S * sr / frame_len))
    # The buffer holds samples [base, base + len(buf)) of the recording; base is a multiple of frame_len.
    pieces: list[np.ndarray] = []
    buf = np.zeros(0, np.float32)
    base = start = 0
    ended = False
    it = iter(blocks)
    while True:
        # Enough to decide the next cut without knowing the end: max_n + min_n samples past `start`.
        have = base + len(buf) + sum(len(p) for p in pieces)
        while not ended and have - start < max_n + min_n:
            block = next(it, None)
            if block is None:
                ended = True
                break
            block = _to_float32(np.asarray(block))
            if block.ndim != 1:
                raise InputError(f"segments need 1-D mono samples, got shape {tuple(block.shape)}")
            pieces.append(block)
            have += len(block)
        if pieces:
            buf = np.concatenate([buf, *pieces])
            pieces = []
        n_known = base + len(buf)  # = the recording's length once `ended`
        if n_known == start:
            return
        if ended and n_known - start <= max_n:
            cut = n_known
        else:
            limit = start + max_n
            lo = max(start + min_n, limit - search_n)
            hi = max(lo, min(limit, n_known - min_n)) if ended else max(lo, limit)
            f_lo, f_hi = -(-lo // frame_len), hi // frame_len  # frames wholly inside [lo, hi]
            if f_hi > f_lo:
                db = frame_energy_db(buf[(f_lo * frame_len) - base : (f_hi * frame_len) - base], frame_len)
                a, b = _best_cut(db, 0, len(db), long_frames)
                cut = (2 * f_lo + a + b) * frame_len // 2
            else:
                cut = hi
        # Loudest frame of the segment: frames from start's frame up to (not including) the cut's frame, or to
        # the end for the last segment (the same frames plan_segments' reduceat takes).
        f_a = start // frame_len
        f_b = max(f_a + 1, cut // frame_len) if cut < n_known or not ended else -(-n_known // frame_len)
        peak = frame_energy_db(buf[f_a * frame_len - base : min(f_b * frame_len, n_known) - base], frame_len).max()
        samples = buf[start - base : cut - base].copy()
        yield Segment(start / sr, cut / sr, start, cut, bool(peak < silence_db)), samples
        start = cut
        drop = (start // frame_len) * frame_len - base  # keep the frame the next segment starts in
        buf, base = buf[drop:], base + drop


def plan_segments(
    audio: np.ndarray,
    sr: int = SAMPLING_RATE,
    max_segment_s: float = 30.0,
    search_s: float = 5.0,
    min_segment_s: float = 1.0,
    *,
    silence_db: float = SILENCE_DB,
) -> list[Segment]:
    """The segments of a whole 1-D recording (see :func:`stream_segments`)."""
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise InputError(f"plan_segments expects 1-D mono samples, got shape {tuple(audio.shape)}")
    segments = [s for s, _ in stream_segments([audio], sr, max_segment_s, search_s, min_segment_s,
                                              silence_db=silence_db)]
    logger.debug("planned %d segments (%d silent) over %.1f s", len(segments),
                 sum(s.is_silent for s in segments), len(audio) / sr)
    return segments
