"""Synthetic tasks: the signals really contain what their labels say (measured independently of the generator)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from af3.training import synthetic as S


def count_bursts(x: np.ndarray, sr: int = 16000) -> int:
    """Count tone bursts from a 10 ms energy envelope with hysteresis (independent of the generator's bookkeeping)."""
    hop = sr // 100
    env = np.sqrt(np.mean(x[: len(x) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    hi, lo = 0.35 * env.max(), 0.15 * env.max()
    on, n = False, 0
    for e in env:
        if not on and e > hi:
            on, n = True, n + 1
        elif on and e < lo:
            on = False
    return n


def dominant_freq(x: np.ndarray, sr: int = 16000) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spec.argmax()])


def spectral_slope(x: np.ndarray, sr: int = 16000) -> float:
    """Slope of log power vs log frequency between 100 Hz and 4 kHz: ~0 white, ~-1 pink, ~-2 brown."""
    spec = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / sr)
    band = (f > 100) & (f < 4000)
    return float(np.polyfit(np.log(f[band]), np.log(spec[band] + 1e-20), 1)[0])


@pytest.mark.parametrize("seed", range(12))
def test_count_clips_hold_the_labelled_number_of_beeps(seed):
    s = S.make_sample("count", np.random.default_rng(seed))
    assert 1.5 <= s.duration <= 8.0
    assert 0.05 <= np.abs(s.audio).max() <= 1.0
    assert count_bursts(s.audio) == s.label["count"]
    assert s.messages[-1]["content"] == S.count_answer(s.label["count"])


@pytest.mark.parametrize("seed", range(6))
def test_long_count_clips_span_two_or_three_windows(seed):
    s = S.make_sample("long_count", np.random.default_rng(100 + seed))
    assert 35.0 <= s.duration <= 75.0
    assert count_bursts(s.audio) == s.label["count"]


@pytest.mark.parametrize("seed", range(9))
def test_pitch_clips_have_a_tone_in_the_labelled_band(seed):
    s = S.make_sample("pitch", np.random.default_rng(seed))
    lo, hi = S.PITCH_BANDS[s.label["pitch"]]
    assert lo - 5 <= dominant_freq(s.audio) <= hi + 5
    assert s.messages[-1]["content"] == f"The tone is {s.label['pitch']}."


def test_noise_colours_have_their_spectral_slopes():
    rng = np.random.default_rng(0)
    slopes = {}
    for _ in range(30):
        s = S.make_sample("noise", rng)
        slopes.setdefault(s.label["noise"], []).append(spectral_slope(s.audio))
    assert set(slopes) == set(S.NOISE_KINDS)
    assert abs(np.median(slopes["white"])) < 0.3
    assert -1.3 < np.median(slopes["pink"]) < -0.7
    assert np.median(slopes["brown"]) < -1.6


def test_multi_turn_asks_the_count_then_the_pitch_of_the_same_beeps():
    s = S.make_sample("multi_turn", np.random.default_rng(3))
    roles = [m["role"] for m in s.messages]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert s.messages[1]["content"] == S.count_answer(s.label["count"])
    assert s.messages[3]["content"] == f"The beeps are {s.label['pitch']}."
    assert count_bursts(s.audio) == s.label["count"]
    lo, hi = S.PITCH_BANDS[s.label["pitch"]]
    assert lo - 5 <= dominant_freq(s.audio) <= hi + 5


def test_answers_parse_back_to_labels():
    for n in range(1, 6):
        assert S.parse_answer("count", S.count_answer(n)) == n
    assert S.parse_answer("pitch", "The tone is low.") == "low"
    assert S.parse_answer("multi_turn", "The beeps are high.", turn=1) == "high"
    assert S.parse_answer("noise", "This is brown noise.") == "brown"
    assert S.parse_answer("count", "two or three") is None
    assert S.count_answer(1) == "There is one beep." and S.count_answer(3) == "There are three beeps."


def test_write_dataset_is_deterministic_and_loads_as_a_manifest(tmp_path):
    from af3.training.data import load_manifest

    counts = {"count": 3, "noise": 2}
    a = S.write_dataset(tmp_path / "a", counts, seed=7)
    S.write_dataset(tmp_path / "b", counts, seed=7)
    for task, n in counts.items():
        assert (tmp_path / "a" / f"{task}.jsonl").read_text() == (tmp_path / "b" / f"{task}.jsonl").read_text()
        rows = [json.loads(line) for line in (tmp_path / "a" / f"{task}.jsonl").read_text().splitlines()]
        assert len(rows) == n
        audio, sr = sf.read(tmp_path / "a" / rows[0]["messages"][0]["content"][0]["path"])
        assert sr == 16000 and abs(len(audio) / sr - rows[0]["duration"]) < 1e-3
        examples = load_manifest(a[task])
        assert len(examples) == n
        assert examples[0].messages[0]["content"][0]["path"].startswith(str(tmp_path / "a"))


def test_beep_band_weights_shift_the_beeps_pitch_only_in_beep_tasks():
    rng = np.random.default_rng(0)
    bands = [S.make_sample("count", rng, beep_bands={"high": 3, "low": 1}).label["pitch"] for _ in range(400)]
    assert "medium" not in bands and 0.68 <= bands.count("high") / 400 <= 0.82
    s = S.make_sample("multi_turn", np.random.default_rng(1), beep_bands={"high": 1})
    lo, hi = S.PITCH_BANDS["high"]
    assert s.label["pitch"] == "high" and lo * 0.97 <= dominant_freq(s.audio) <= hi * 1.03
    assert count_bursts(s.audio) == s.label["count"]
    # Tasks without beeps ignore the weights (same clip as without them); unknown bands are named.
    a = S.make_sample("pitch", np.random.default_rng(2), beep_bands={"high": 1})
    b = S.make_sample("pitch", np.random.default_rng(2))
    assert np.array_equal(a.audio, b.audio)
    with pytest.raises(ValueError, match="ultra"):
        S.make_sample("count", rng, beep_bands={"ultra": 1})


def test_frame_labels_mark_the_frames_whose_midpoint_an_event_covers():
    # 40 ms frames have midpoints 0.02, 0.06, 0.10, 0.14, ...: [0.11, 0.29) covers those of frames 3 to 6.
    classes, onsets = S.frame_labels({"pitch": "high", "events": [[0.11, 0.29], [0.37, 2.0]]}, frames=11)
    high = S.FRAME_CLASSES.index("high")
    assert classes.tolist() == [0, 0, 0, high, high, high, high, 0, 0, high, high]
    assert np.flatnonzero(onsets).tolist() == [3, 9]
    pink = S.FRAME_CLASSES.index("pink")
    classes, onsets = S.frame_labels({"noise": "pink", "events": [[0.0, 0.1]]}, 3)
    assert classes.tolist() == [pink, pink, 0] and onsets.tolist() == [True, False, False]
    # An event past the end of the frames leaves no trace.
    classes, onsets = S.frame_labels({"pitch": "low", "events": [[0.5, 0.7]]}, 5)
    assert not classes.any() and not onsets.any()


@pytest.mark.parametrize("task", ["count", "long_count", "pitch", "noise"])
def test_event_spans_are_where_the_sound_is(task):
    """Inside the labelled spans the signal is loud, outside it holds only the faint background."""
    rng = np.random.default_rng(3)
    for _ in range(5):
        s = S.make_sample(task, rng)
        inside = np.zeros(s.audio.size, dtype=bool)
        for start, end in s.label["events"]:
            assert 0 <= start < end <= s.duration + 1e-3
            inside[int(start * S.SR):int(end * S.SR)] = True
        if task in ("count", "long_count"):
            assert len(s.label["events"]) == s.label["count"]
        rms_in = np.sqrt(np.mean(s.audio[inside] ** 2))
        outside = s.audio[~inside]
        rms_out = np.sqrt(np.mean(outside ** 2)) if outside.size else 0.0
        assert rms_in > 8 * rms_out, (task, rms_in, rms_out)
