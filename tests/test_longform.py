"""Long-form audio: segmentation at pauses, long transcription, subtitle formats, map-reduce questions."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from conftest import synth_audio

from af3 import AF3Model, AF3Processor, InputError
from af3.longform import (
    LongAnswer,
    Transcript,
    TranscriptSegment,
    allow_long_context,
    ask_long,
    plan_segments,
    to_json,
    to_srt,
    to_vtt,
    transcribe_long,
)

SR = 16000


def speechy(seconds: float, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Noise with a 4 Hz syllable-like envelope that never falls silent (troughs at 1/5 of the peaks)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * sr))
    t = np.arange(n) / sr
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * 4.0 * t)
    return (0.3 * envelope * rng.standard_normal(n)).astype(np.float32)


def silence(x: np.ndarray, start: float, end: float, sr: int = SR, level: float = 0.0) -> None:
    """Replace [start, end) seconds by silence (zeros, or faint noise of amplitude ``level``)."""
    a, b = int(round(start * sr)), int(round(end * sr))
    x[a:b] = level * np.random.default_rng(1).standard_normal(b - a)


def check_cover(segments, n: int, sr: int = SR, max_s: float = 30.0) -> None:
    assert segments[0].start_sample == 0 and segments[-1].end_sample == n
    for prev, seg in zip(segments, segments[1:], strict=False):
        assert seg.start_sample == prev.end_sample  # no gap, no overlap
    for seg in segments:
        assert 0 < seg.end_sample - seg.start_sample <= max_s * sr
        assert seg.start == pytest.approx(seg.start_sample / sr) and seg.end == pytest.approx(seg.end_sample / sr)


# ----------------------------------------------------------------------------------------------------------
# plan_segments


@pytest.mark.parametrize("sr", [16000, 8000])
def test_cuts_land_in_the_pause_nearest_the_limit(sr):
    x = speechy(95.0, sr)
    silence(x, 10.0, 10.5, sr)  # before the search window: ignored
    silence(x, 26.0, 26.6, sr)  # a long pause in the window ...
    silence(x, 28.0, 28.4, sr, level=1e-4)  # ... and a later one (faint noise, not zeros): the cut goes here
    silence(x, 29.50, 29.56, sr)  # a 60 ms gap inside a word: too short to beat a real pause
    silence(x, 54.0, 55.0, sr)  # window [53.2, 58.2]: a long pause ...
    silence(x, 57.0, 57.2, sr)  # ... beats a later 0.2 s one
    silence(x, 81.0, 81.1, sr, level=0.003)  # window [79.05, 84.05] has no pause, only this quiet dip
    segs = plan_segments(x, sr=sr)
    check_cover(segs, len(x), sr)
    cuts = [s.start for s in segs[1:]]
    assert len(cuts) == 3
    assert 28.0 <= cuts[0] <= 28.4
    assert 54.0 <= cuts[1] <= 55.0
    assert 81.0 <= cuts[2] <= 81.1
    assert not any(s.is_silent for s in segs)


@pytest.mark.parametrize("dip", [25.3, 27.0, 29.6])
def test_without_a_pause_the_cut_goes_to_the_quietest_point(dip):
    x = speechy(40.0, seed=2)
    silence(x, dip, dip + 0.1, level=0.003)  # 0.1 s much quieter than the speech troughs, not silent
    segs = plan_segments(x)
    check_cover(segs, len(x))
    assert len(segs) == 2 and dip <= segs[1].start <= dip + 0.1


def test_two_hours_are_planned_into_the_expected_segments():
    # A 7 s pattern (6 s of speech, 1 s pause) tiled over 2 hours: 115.2 M float32 samples.
    pattern = speechy(7.0)
    pattern[6 * SR :] = 0.0
    x = np.tile(pattern, 7200 // 7 + 1)[: 7200 * SR]
    assert x.dtype == np.float32 and len(x) == 115_200_000
    segs = plan_segments(x)
    check_cover(segs, len(x))
    # Window [25, 30] holds the pause [27, 28) → cut at 27.5; then every 28 s (pauses 4 periods later) up to the
    # cut at 7195.5 and a last 4.5 s segment: 1 + 257 segments.
    assert len(segs) == 258
    for seg in segs[1:]:
        assert seg.start % 7.0 == pytest.approx(6.5)
    assert segs[-1].duration == pytest.approx(4.5)


def test_all_silent_recording_is_marked_silent():
    x = np.zeros(75 * SR, dtype=np.float32)
    segs = plan_segments(x)
    check_cover(segs, len(x))
    assert len(segs) == 3 and all(s.is_silent for s in segs)


def test_silent_stretch_in_the_middle_is_marked():
    x = speechy(130.0)
    silence(x, 30.0, 100.0)
    segs = plan_segments(x)
    check_cover(segs, len(x))
    flags = [s.is_silent for s in segs]
    assert flags[0] is False and flags[-1] is False
    assert sum(flags) >= 1
    for seg in segs:
        if seg.is_silent:
            assert seg.start >= 30.0 and seg.end <= 100.0


def test_short_recordings():
    x = speechy(12.0)
    segs = plan_segments(x)
    assert len(segs) == 1 and segs[0].start == 0.0 and segs[0].end == 12.0 and not segs[0].is_silent
    assert len(plan_segments(speechy(30.0))) == 1  # exactly the limit: one segment
    assert plan_segments(np.zeros(0, dtype=np.float32)) == []
    # Just over the limit: the cut leaves at least min_segment_s after it.
    segs = plan_segments(speechy(30.2))
    check_cover(segs, int(30.2 * SR))
    assert len(segs) == 2 and segs[1].duration >= 1.0


def test_plan_segments_rejects_bad_arguments():
    with pytest.raises(InputError, match="1-D"):
        plan_segments(np.zeros((2, 100), dtype=np.float32))
    with pytest.raises(InputError, match="min_segment_s"):
        plan_segments(speechy(5.0), max_segment_s=1.0, min_segment_s=1.0)


# ----------------------------------------------------------------------------------------------------------
# transcribe_long


class FakeEngine:
    """Answers every conversation with the framed number of audio samples it holds (or 'final' without audio)."""

    def __init__(self):
        self.calls: list[list[list[dict]]] = []

    def __call__(self, conversations, max_new_tokens):
        self.calls.append(conversations)
        out = []
        for conv in conversations:
            audios = [p["audio"] for p in conv[0]["content"] if p["type"] == "audio"]
            out.append(f"The spoken content of the audio is '{len(audios[0])}'." if audios else "final")
        return out


def test_transcribe_long_aligns_texts_with_segments_and_skips_silence():
    x = speechy(130.0)
    silence(x, 30.0, 100.0)
    plan = plan_segments(x)
    spoken = [s for s in plan if not s.is_silent]
    assert len(spoken) < len(plan)
    engine, seen = FakeEngine(), []
    tr = transcribe_long(None, None, x, batch_size=2, generate_fn=engine,
                         progress=lambda done, total: seen.append((done, total)))
    assert [(s.start, s.end) for s in tr.segments] == [(s.start, s.end) for s in spoken]
    assert [s.text for s in tr.segments] == [str(s.end_sample - s.start_sample) for s in spoken]  # prefix stripped
    assert tr.text == " ".join(s.text for s in tr.segments)
    assert [len(c) for c in engine.calls] == [2] * (len(spoken) // 2) + [1] * (len(spoken) % 2)
    assert seen[-1] == (len(spoken), len(spoken)) and len(seen) == len(engine.calls)
    first = engine.calls[0][0][0]["content"]
    assert first[0] == {"type": "text", "text": "Transcribe the input speech."}


def test_transcribe_long_custom_prompt_and_silent_audio():
    engine = FakeEngine()
    tr = transcribe_long(None, None, speechy(5.0), prompt="Write down the words.", generate_fn=engine)
    assert engine.calls[0][0][0]["content"][0]["text"] == "Write down the words."
    assert len(tr.segments) == 1 and tr.segments[0].text == str(5 * SR)
    empty = transcribe_long(None, None, np.zeros(40 * SR, dtype=np.float32), generate_fn=FakeEngine())
    assert empty == Transcript((), "", 40.0)  # the length read, although nothing was said


def test_bad_generate_fn_output_is_reported():
    with pytest.raises(InputError, match="one string per conversation"):
        transcribe_long(None, None, speechy(5.0), generate_fn=lambda convs, n: [])


@pytest.fixture(scope="module")
def tiny(tiny_ckpt):
    folder = tiny_ckpt[0]
    return AF3Model.from_pretrained(folder), AF3Processor.from_pretrained(folder)


def test_transcribe_long_with_the_tiny_model(tiny):
    model, processor = tiny
    x = synth_audio(70.0, seed=3)
    tr = transcribe_long(model, processor, x, batch_size=2, max_new_tokens=4)
    assert len(tr.segments) == 3
    assert tr.segments[0].start == 0.0 and tr.segments[-1].end == pytest.approx(70.0)
    for a, b in zip(tr.segments, tr.segments[1:], strict=False):
        assert a.end == b.start and b.end - b.start <= 30.0
    assert all(isinstance(s.text, str) for s in tr.segments)
    assert to_srt(tr).count(" --> ") == sum(1 for s in tr.segments if s.text.strip())


# ----------------------------------------------------------------------------------------------------------
# SRT / WebVTT / JSON


LONG = "A much longer sentence that certainly needs to be wrapped onto two lines."
HAND = Transcript((
    TranscriptSegment(0.0, 2.5, "Hello there."),
    TranscriptSegment(3661.2346, 3725.0004, LONG),
    TranscriptSegment(3725.5, 3726.0, "  "),
    TranscriptSegment(7322.9996, 7325.0, "x < y & z"),
), f"Hello there. {LONG} x < y & z")


def test_srt_exact():
    assert to_srt(HAND) == (
        "1\n"
        "00:00:00,000 --> 00:00:02,500\n"
        "Hello there.\n"
        "\n"
        "2\n"
        "01:01:01,235 --> 01:02:05,000\n"
        "A much longer sentence that certainly\n"
        "needs to be wrapped onto two lines.\n"
        "\n"
        "3\n"
        "02:02:03,000 --> 02:02:05,000\n"
        "x < y & z\n"
        "\n"
    )


def test_vtt_exact():
    assert to_vtt(HAND) == (
        "WEBVTT\n"
        "\n"
        "00:00:00.000 --> 00:00:02.500\n"
        "Hello there.\n"
        "\n"
        "01:01:01.235 --> 01:02:05.000\n"
        "A much longer sentence that certainly\n"
        "needs to be wrapped onto two lines.\n"
        "\n"
        "02:02:03.000 --> 02:02:05.000\n"
        "x &lt; y &amp; z\n"
        "\n"
    )
    assert to_vtt(Transcript((), "")) == "WEBVTT\n\n"


def test_srt_without_wrapping_and_json_exact():
    one = Transcript((TranscriptSegment(59.9994, 61.0, "Ünïcode\n\nline --> break"),), "Ünïcode", 61.25)
    assert to_srt(one, line_width=None) == "1\n00:00:59,999 --> 00:01:01,000\nÜnïcode line -> break\n\n"
    assert to_json(one) == (
        '{\n'
        '  "text": "Ünïcode",\n'
        '  "duration": 61.25,\n'
        '  "segments": [\n'
        '    {\n'
        '      "id": 0,\n'
        '      "start": 59.999,\n'
        '      "end": 61.0,\n'
        '      "text": "Ünïcode\\n\\nline --> break"\n'
        '    }\n'
        '  ]\n'
        '}'
    )
    data = json.loads(to_json(HAND))
    assert [s["start"] for s in data["segments"]] == [0.0, 3661.235, 3725.5, 7323.0]


# ----------------------------------------------------------------------------------------------------------
# ask_long


def test_ask_long_maps_over_parts_and_reduces():
    pattern = speechy(7.0)
    pattern[6 * SR :] = 0.0
    x = np.tile(pattern, 36)[: 250 * SR]
    engine = FakeEngine()
    result = ask_long(None, None, x, "Who speaks?", chunk_s=60.0, generate_fn=engine)
    # Cuts in the pauses nearest each 60 s limit: 55.5, 111.5, 167.5, 223.5 → five parts.
    bounds = [0.0, 55.5, 111.5, 167.5, 223.5, 250.0]
    clocks = ["0:00", "0:56", "1:52", "2:48", "3:44", "4:10"]
    assert [len(call) for call in engine.calls] == [1] * 6  # five parts one by one, then the reduce turn
    maps = [call[0] for call in engine.calls[:-1]]
    for i, conv in enumerate(maps):
        audio_part, text_part = conv[0]["content"]
        assert len(audio_part["audio"]) == round((bounds[i + 1] - bounds[i]) * SR)
        assert text_part["text"].startswith(
            f"This is part {i + 1} of a recording 4:10 long, from {clocks[i]} to {clocks[i + 1]}.")
        assert text_part["text"].endswith("Who speaks?")
    reduce_turn = engine.calls[-1][0]
    assert [p["type"] for p in reduce_turn[0]["content"]] == ["text"]  # text only
    text = reduce_turn[0]["content"][0]["text"]
    assert "Question: Who speaks?" in text and "which parts" in text
    for i in range(5):
        n = round((bounds[i + 1] - bounds[i]) * SR)
        assert f"Part {i + 1} ({clocks[i]} to {clocks[i + 1]}): The spoken content of the audio is '{n}'." in text
    assert result.answer == "final"
    assert [(a, b) for a, b, _ in result.partials] == list(zip(bounds, bounds[1:], strict=False))
    assert result.partials[1][2] == f"The spoken content of the audio is '{round(56.0 * SR)}'."


def test_ask_long_short_audio_is_one_direct_question():
    engine = FakeEngine()
    x = speechy(40.0)
    result = ask_long(None, None, x, "What is it?", chunk_s=60.0, generate_fn=engine)
    assert len(engine.calls) == 1 and len(engine.calls[0]) == 1
    (audio_part, text_part), = [engine.calls[0][0][0]["content"]]
    assert len(audio_part["audio"]) == len(x) and text_part == {"type": "text", "text": "What is it?"}
    assert result == LongAnswer(f"The spoken content of the audio is '{len(x)}'.",
                                ((0.0, 40.0, f"The spoken content of the audio is '{len(x)}'."),))


def test_ask_long_with_the_tiny_model(tiny):
    model, processor = tiny
    x = synth_audio(660.0, seed=5)
    result = ask_long(model, processor, x, "What happens?", chunk_s=300.0, max_new_tokens=4)
    assert len(result.partials) == 3
    assert result.partials[0][0] == 0.0 and result.partials[-1][1] == pytest.approx(660.0)
    for (_, b, _), (a, _, _) in zip(result.partials, result.partials[1:], strict=False):
        assert a == b
    assert all(e - s <= 300.0 for s, e, _ in result.partials)
    assert isinstance(result.answer, str)


# ----------------------------------------------------------------------------------------------------------
# more than 20 windows


def test_allow_long_context(tiny, caplog):
    model, processor = tiny
    conv = [{"role": "user", "content": [{"type": "audio", "audio": synth_audio(660.0, seed=2)},
                                         {"type": "text", "text": "Hm?"}]}]
    kw = dict(tokenize=True, add_generation_prompt=True, return_dict=True)

    def sound_tokens() -> int:
        return int((processor.apply_chat_template(conv, **kw)["input_ids"] == processor.audio_token_id).sum())

    assert sound_tokens() == 20 * 750  # capped at 10 minutes
    with pytest.raises(InputError, match="allow_long_context"):
        ask_long(model, processor, conv[0]["content"][0]["audio"], "Hm?", chunk_s=900.0)
    with caplog.at_level(logging.WARNING, logger="af3"), allow_long_context(processor, 900):
        assert processor.max_audio_len == 900
        assert sound_tokens() == 22 * 750
    assert any("trained on up to 600" in r.getMessage() for r in caplog.records)
    assert processor.max_audio_len == 600
    with pytest.raises(RuntimeError), allow_long_context(processor, 1200):
        raise RuntimeError
    assert processor.max_audio_len == 600
    with pytest.raises(InputError):
        allow_long_context(processor, 10).__enter__()
