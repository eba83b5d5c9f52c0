"""Streaming segmentation: the cuts (and silence marks) do not depend on how the recording arrives, they are the
ones of a plain whole-array planner written independently here, and memory holds one segment plus look-ahead."""

from __future__ import annotations

import numpy as np
import pytest
from test_longform import silence, speechy

from af3.errors import InputError
from af3.segments import FLOOR_DB, FRAME_S, LONG_PAUSE_S, QUIET_MARGIN_DB, plan_segments, stream_segments


def reference_plan(x: np.ndarray, sr: int, max_s: float, search_s: float, min_s: float, silence_db: float = -50.0):
    """The cut rule over the whole array at once: frame energies of the whole recording, then each limit's search
    window. Returns [(start, end, is_silent)] in samples."""
    frame = max(1, round(FRAME_S * sr))
    n = len(x)
    n_frames = -(-n // frame)
    padded = np.zeros(n_frames * frame, np.float64)
    padded[:n] = x
    power = (padded.reshape(n_frames, frame) ** 2).sum(1)
    power /= np.minimum(frame, n - np.arange(n_frames) * frame)  # the last frame averages only its own samples
    db = 10 * np.log10(np.maximum(power, 10 ** (FLOOR_DB / 10)))
    max_n, min_n = int(max_s * sr), max(1, int(min_s * sr))
    search_n = min(int(search_s * sr), max_n - min_n)
    long_frames = max(1, round(LONG_PAUSE_S * sr / frame))
    bounds, start = [0], 0
    while n - start > max_n:
        limit = start + max_n
        lo = max(start + min_n, limit - search_n)
        hi = max(lo, min(limit, n - min_n))
        f_lo, f_hi = -(-lo // frame), hi // frame
        if f_hi > f_lo:
            window = db[f_lo:f_hi]
            quiet = np.concatenate(([False], window <= window.min() + QUIET_MARGIN_DB, [False]))
            runs = []  # (start frame, end frame) of quiet runs
            for i in range(1, len(quiet) - 1):
                if quiet[i] and not quiet[i - 1]:
                    runs.append([i - 1, i])
                if quiet[i]:
                    runs[-1][1] = i
            long = [r for r in runs if r[1] - r[0] >= long_frames]
            a, b = long[-1] if long else max(reversed(runs), key=lambda r: r[1] - r[0])
            cut = (2 * f_lo + a + b) * frame // 2
        else:
            cut = hi
        bounds.append(cut)
        start = cut
    bounds.append(n)
    out = []
    for i, (a, b) in enumerate(zip(bounds, bounds[1:], strict=False)):
        f_b = n_frames if i == len(bounds) - 2 else max(a // frame + 1, b // frame)
        out.append((a, b, bool(db[a // frame : f_b].max() < silence_db)))
    return out


def recording(seconds: float, sr: int = 16000, seed: int = 0) -> np.ndarray:
    x = speechy(seconds, sr, seed)
    rng = np.random.default_rng(seed + 7)
    for start in rng.uniform(0, seconds - 2, size=int(seconds // 9)):  # pauses of 0.1-0.6 s here and there
        silence(x, start, start + rng.uniform(0.1, 0.6), sr)
    silence(x, 40.0, 105.0, sr)  # a silent stretch longer than two segments
    return x


@pytest.mark.parametrize(("sr", "max_s", "search_s", "min_s"), [(16000, 30.0, 5.0, 1.0), (8000, 30.0, 5.0, 1.0),
                                                                 (16000, 10.0, 3.0, 0.5), (16000, 7.3, 0.0, 2.1),
                                                                 (11025, 12.0, 6.0, 6.0)])
def test_the_cuts_do_not_depend_on_how_the_audio_arrives_and_match_the_whole_array_rule(sr, max_s, search_s, min_s):
    x = recording(130.0, sr)
    want = reference_plan(x, sr, max_s, search_s, min_s)
    rng = np.random.default_rng(3)
    random_sizes = np.cumsum(rng.integers(1, 3 * sr, size=400))
    ways = {"one block": [x], "1 s blocks": [x[i:i + sr] for i in range(0, len(x), sr)],
            "odd 997-sample blocks": [x[i:i + 997] for i in range(0, len(x), 997)],
            "random blocks": np.split(x, random_sizes[random_sizes < len(x)])}
    for way, blocks in ways.items():
        got = list(stream_segments(blocks, sr, max_s, search_s, min_s))
        assert [(s.start_sample, s.end_sample, s.is_silent) for s, _ in got] == want, way
        for seg, samples in got:
            assert np.array_equal(samples, x[seg.start_sample:seg.end_sample]), way
    assert [(s.start_sample, s.end_sample, s.is_silent) for s in plan_segments(x, sr, max_s, search_s, min_s)] == want
    assert any(s for *_, s in want) and not all(s for *_, s in want)  # the silent stretch is marked, speech is not


def test_a_recording_that_ends_just_past_a_limit_and_short_ones():
    for seconds in (0.01, 0.5, 29.99, 30.0, 30.2, 31.0, 60.0, 61.5):
        x = speechy(seconds)
        want = reference_plan(x, 16000, 30.0, 5.0, 1.0)
        got = [(s.start_sample, s.end_sample, s.is_silent) for s, _ in stream_segments(iter([x]))]
        assert got == want, seconds
    assert list(stream_segments([])) == [] and list(stream_segments([np.zeros(0, np.float32)])) == []


def test_memory_holds_one_segment_and_its_look_ahead():
    """Blocks are pulled only as far as the next cut needs: max + min segment past the current start."""
    sr, pulled = 16000, []

    def blocks():
        for i in range(3600):  # an hour, one second at a time
            pulled.append(i)
            yield np.full(sr, 0.1 if i % 7 else 0.0, np.float32)

    for k, (seg, _) in enumerate(stream_segments(blocks(), sr)):
        assert len(pulled) * sr - seg.start_sample <= (30 + 1) * sr + sr, k  # one block beyond the look-ahead
        if k == 20:
            break


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"max_segment_s": 1.0, "min_segment_s": 1.0}, r"2 \* min_segment_s <= max_segment_s"),
    ({"max_segment_s": float("nan")}, r"max_segment_s must be a finite number"),
    ({"search_s": -1.0}, r"search_s must be >= 0"),
    ({"sr": 0}, r"sr must be a positive number"),
    ({"min_segment_s": 1e-9, "max_segment_s": 1e-6}, r"shorter than one sample"),
    ({"max_segment_s": "30"}, r"max_segment_s must be a finite number"),
])
def test_bad_arguments_are_input_errors(kwargs, message):
    with pytest.raises(InputError, match=message):
        list(stream_segments([speechy(5.0)], **kwargs))
    with pytest.raises(InputError, match="1-D mono"):
        list(stream_segments([np.zeros((2, 100), np.float32)]))
