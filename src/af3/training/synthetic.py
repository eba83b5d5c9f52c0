"""Labelled synthetic audio tasks (numpy only) and their manifests: what the embedded tiny model learns from.

Tasks (answers are short sentences; question wording varies when ``vary_questions``):

* ``count``       1–5 beeps (sine, 0.08–0.3 s, gaps ≥ 0.15 s) in a 1.5–8 s clip → "There are three beeps."
* ``pitch``       one steady tone 0.5–4 s: low 100–250 Hz, medium 400–800 Hz, high 1500–4000 Hz → "The tone is high."
* ``noise``       white, pink or brown noise, 1–5 s → "This is pink noise."
* ``long_count``  1–5 beeps spread over 35–75 s (two or three 30 s windows) with faint noise → the count answer
* ``multi_turn``  a count clip, two questions in one conversation: the count, then the pitch of the beeps.

Every clip gets a random peak amplitude (0.05–0.9), a random start offset and faint background noise.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

SR = 16000
TASKS = ("count", "pitch", "noise", "long_count", "multi_turn")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
PITCH_BANDS = {"low": (100.0, 250.0), "medium": (400.0, 800.0), "high": (1500.0, 4000.0)}
NOISE_KINDS = ("white", "pink", "brown")

COUNT_QUESTIONS = (
    "How many beeps do you hear?",
    "How many beeps are there?",
    "Count the beeps.",
    "How many beeps are in this clip?",
    "How many times does it beep?",
)
PITCH_QUESTIONS = (
    "Is the tone low, medium or high?",
    "Is this tone low, medium or high?",
    "How high is the tone: low, medium or high?",
    "Is the pitch of the tone low, medium or high?",
)
BEEP_PITCH_QUESTIONS = (
    "Are the beeps low, medium or high?",
    "Is the pitch of the beeps low, medium or high?",
    "And are the beeps low, medium or high?",
)
NOISE_QUESTIONS = (
    "What kind of noise is this?",
    "What type of noise do you hear?",
    "Is this white, pink or brown noise?",
    "Which noise is this: white, pink or brown?",
)


def count_answer(n: int) -> str:
    return "There is one beep." if n == 1 else f"There are {NUMBER_WORDS[n]} beeps."


def pitch_answer(band: str, beeps: bool = False) -> str:
    return f"The beeps are {band}." if beeps else f"The tone is {band}."


def noise_answer(kind: str) -> str:
    return f"This is {kind} noise."


# ---------------------------------------------------------------------- signal pieces
def colored_noise(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit-peak white (flat), pink (1/f power) or brown (1/f² power) noise, shaped in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, d=1.0 / SR)
    freqs[0] = freqs[1] if n > 1 else 1.0
    if kind == "pink":
        spectrum /= np.sqrt(freqs)
    elif kind == "brown":
        spectrum /= freqs
    elif kind != "white":
        raise ValueError(f"unknown noise kind {kind!r}")
    x = np.fft.irfft(spectrum, n)
    x -= x.mean()
    return x / (np.abs(x).max() + 1e-12)


def tone(freq: float, seconds: float, rng: np.random.Generator) -> np.ndarray:
    """A sine with a random phase and 5 ms raised-cosine edges (no clicks)."""
    n = max(1, int(round(seconds * SR)))
    t = np.arange(n) / SR
    x = np.sin(2 * np.pi * freq * t + rng.uniform(0, 2 * np.pi))
    ramp = min(int(0.005 * SR), n // 2)
    if ramp:
        edge = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, ramp))
        x[:ramp] *= edge
        x[-ramp:] *= edge[::-1]
    return x


def _finish(signal: np.ndarray, rng: np.random.Generator,
            noise_level: tuple[float, float] = (0.002, 0.02)) -> np.ndarray:
    """Scale to a random peak (0.05–0.9) and add faint white background noise."""
    peak = rng.uniform(0.05, 0.9)
    x = signal / (np.abs(signal).max() + 1e-12) * peak
    x = x + rng.uniform(*noise_level) * peak * rng.standard_normal(x.size)
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def _place(durations: list[float], total: float, min_gap: float, lead: tuple[float, float],
           rng: np.random.Generator) -> list[float]:
    """Start times for events of ``durations`` in ``total`` seconds with gaps ≥ ``min_gap`` and random slack."""
    need = sum(durations) + min_gap * (len(durations) - 1)
    slack = max(total - need - lead[0], 0.0)
    # Random split of the slack into: before the first event, between events, after the last one.
    shares = rng.dirichlet(np.ones(len(durations) + 1)) * slack
    starts, t = [], lead[0] + shares[0]
    for i, d in enumerate(durations):
        starts.append(t)
        t += d + min_gap + shares[i + 1]
    return starts


def beeps(n: int, total: float, freq: float, rng: np.random.Generator, min_gap: float = 0.15,
          lead: tuple[float, float] = (0.05, 0.5)) -> tuple[np.ndarray, list[list[float]]]:
    """``n`` beeps of ``freq`` in ``total`` seconds → (signal, [[start, end] in seconds per beep])."""
    durations = [float(rng.uniform(0.08, 0.3)) for _ in range(n)]
    x = np.zeros(int(round(total * SR)))
    events = []
    for start, d in zip(_place(durations, total, min_gap, lead, rng), durations, strict=True):
        b = tone(freq, d, rng)
        i = int(round(start * SR))
        x[i:i + b.size] += b[: x.size - i]
        events.append(_span(i, min(x.size, i + b.size)))
    return x, events


def _span(first: int, stop: int) -> list[float]:
    """Sample range → [start, end] in seconds (ms precision): where a sound event lies in its clip."""
    return [round(first / SR, 3), round(stop / SR, 3)]


def _band_freq(rng: np.random.Generator, band: str | None = None,
               weights: dict[str, float] | None = None) -> tuple[str, float]:
    """A band (uniform, or drawn with ``weights`` per band name) and a log-uniform frequency inside it."""
    if band is None:
        names = list(PITCH_BANDS)
        if weights:
            unknown = set(weights) - set(names)
            if unknown:
                raise ValueError(f"unknown pitch band(s) {sorted(unknown)}; bands are {names}")
            p = np.array([float(weights.get(b, 0.0)) for b in names])
            band = str(rng.choice(names, p=p / p.sum()))
        else:
            band = str(rng.choice(names))
    lo, hi = PITCH_BANDS[band]
    return band, float(np.exp(rng.uniform(np.log(lo), np.log(hi))))


# ---------------------------------------------------------------------- tasks
@dataclass
class Sample:
    """One synthetic clip and its conversation (audio goes where the ``{"type": "audio"}`` part is)."""

    task: str
    audio: np.ndarray
    messages: list[dict]
    label: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return self.audio.size / SR


def _q(options: tuple[str, ...], rng: np.random.Generator, vary: bool) -> str:
    return str(rng.choice(options)) if vary else options[0]


def _conversation(question: str, answer: str | None, *follow_up: str) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": question}]}]
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    for i in range(0, len(follow_up), 2):
        msgs.append({"role": "user", "content": follow_up[i]})
        if i + 1 < len(follow_up):
            msgs.append({"role": "assistant", "content": follow_up[i + 1]})
    return msgs


def make_count(rng: np.random.Generator, vary: bool = True, beep_bands: dict[str, float] | None = None) -> Sample:
    n = int(rng.integers(1, 6))
    band, freq = _band_freq(rng, weights=beep_bands)
    need = n * 0.3 + (n - 1) * 0.15 + 0.6
    total = float(rng.uniform(max(1.5, need), 8.0))
    x, events = beeps(n, total, freq, rng)
    x = _finish(x, rng)
    return Sample("count", x, _conversation(_q(COUNT_QUESTIONS, rng, vary), count_answer(n)),
                  {"count": n, "pitch": band, "freq": freq, "events": events})


def make_pitch(rng: np.random.Generator, vary: bool = True) -> Sample:
    band, freq = _band_freq(rng)
    seconds = float(rng.uniform(0.5, 4.0))
    lead, tail = rng.uniform(0.0, 0.5, size=2)
    pad, t = np.zeros(int(lead * SR)), tone(freq, seconds, rng)
    x = _finish(np.concatenate([pad, t, np.zeros(int(tail * SR))]), rng)
    return Sample("pitch", x, _conversation(_q(PITCH_QUESTIONS, rng, vary), pitch_answer(band)),
                  {"pitch": band, "freq": freq, "events": [_span(pad.size, pad.size + t.size)]})


def make_noise(rng: np.random.Generator, vary: bool = True) -> Sample:
    kind = str(rng.choice(NOISE_KINDS))
    seconds = float(rng.uniform(1.0, 5.0))
    lead = rng.uniform(0.0, 0.3)
    pad = np.zeros(int(lead * SR))
    x = _finish(np.concatenate([pad, colored_noise(kind, int(seconds * SR), rng)]), rng, noise_level=(0.0005, 0.005))
    return Sample("noise", x, _conversation(_q(NOISE_QUESTIONS, rng, vary), noise_answer(kind)),
                  {"noise": kind, "events": [_span(pad.size, x.size)]})


def make_long_count(rng: np.random.Generator, vary: bool = True,
                    beep_bands: dict[str, float] | None = None) -> Sample:
    n = int(rng.integers(1, 6))
    band, freq = _band_freq(rng, weights=beep_bands)
    total = float(rng.uniform(35.0, 75.0))
    # Spread out: gaps of at least 2 s, so the beeps land in different windows of a long clip.
    x, events = beeps(n, total, freq, rng, min_gap=2.0, lead=(0.2, 1.0))
    x = _finish(x, rng, noise_level=(0.005, 0.02))
    return Sample("long_count", x, _conversation(_q(COUNT_QUESTIONS, rng, vary), count_answer(n)),
                  {"count": n, "pitch": band, "freq": freq, "events": events})


def make_multi_turn(rng: np.random.Generator, vary: bool = True,
                    beep_bands: dict[str, float] | None = None) -> Sample:
    base = make_count(rng, vary, beep_bands)
    n, band = base.label["count"], base.label["pitch"]
    msgs = _conversation(_q(COUNT_QUESTIONS, rng, vary), count_answer(n),
                         _q(BEEP_PITCH_QUESTIONS, rng, vary), pitch_answer(band, beeps=True))
    return Sample("multi_turn", base.audio, msgs, dict(base.label))


MAKERS: dict[str, Callable[[np.random.Generator, bool], Sample]] = {
    "count": make_count,
    "pitch": make_pitch,
    "noise": make_noise,
    "long_count": make_long_count,
    "multi_turn": make_multi_turn,
}


#: Tasks whose clips are beeps (their band can be drawn with other weights than uniform).
BEEP_TASKS = ("count", "long_count", "multi_turn")


def make_sample(task: str, rng: np.random.Generator, vary: bool = True,
                beep_bands: dict[str, float] | None = None) -> Sample:
    """One clip of ``task``; ``beep_bands`` (e.g. ``{"low": 1, "medium": 1, "high": 2}``) weights the pitch
    band of the beeps in the beep tasks (default: uniform)."""
    if task not in MAKERS:
        raise ValueError(f"unknown synthetic task {task!r}; choose from {', '.join(TASKS)}")
    if beep_bands and task in BEEP_TASKS:
        return MAKERS[task](rng, vary, beep_bands)
    return MAKERS[task](rng, vary)


#: Per-frame sound classes of the clips (``frame_labels``): nothing but background, a tone or beep of a pitch band,
#: or a noise colour.
FRAME_CLASSES = ("background", *PITCH_BANDS, *NOISE_KINDS)


def frame_labels(label: dict, frames: int, frame_seconds: float = 0.04) -> tuple[np.ndarray, np.ndarray]:
    """Per frame of a clip's first ``frames`` frames of ``frame_seconds``: (its class, an index into
    ``FRAME_CLASSES``; whether a sound event starts there).

    Frame k covers [k, k + 1) * frame_seconds; it belongs to a sound event of ``label["events"]`` when the event
    covers its midpoint, and to the background otherwise. 0.04 s is one audio token of AF3 (one encoder output
    frame after pooling)."""
    classes, onsets = np.zeros(frames, dtype=np.int64), np.zeros(frames, dtype=bool)
    kind = FRAME_CLASSES.index(label["pitch"] if "pitch" in label else label["noise"])
    for start, end in label["events"]:
        first = max(int(np.ceil(start / frame_seconds - 0.5)), 0)
        stop = min(int(np.ceil(end / frame_seconds - 0.5)), frames)
        if first < stop:
            classes[first:stop] = kind
            onsets[first] = True
    return classes, onsets


# ---------------------------------------------------------------------- manifests
def write_dataset(out_dir: str | os.PathLike, counts: dict[str, int], seed: int = 0, vary_questions: bool = True,
                  audio_format: str = "flac", beep_bands: dict[str, float] | None = None) -> dict[str, str]:
    """Write ``counts[task]`` clips per task under ``out_dir/audio/`` and one JSONL manifest per task.

    Each manifest line: ``{"id", "task", "label", "duration", "messages"}`` with the audio part's ``path``
    relative to the manifest. Returns task → manifest path. Deterministic for a given seed.
    """
    import soundfile as sf

    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "audio"), exist_ok=True)
    manifests = {}
    for t_index, (task, n) in enumerate(sorted(counts.items())):
        rng = np.random.default_rng([seed, t_index, TASKS.index(task) if task in TASKS else 99])
        path = os.path.join(out_dir, f"{task}.jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            for i in range(n):
                sample = make_sample(task, rng, vary_questions, beep_bands)
                rel = f"audio/{task}_{i:06d}.{audio_format}"
                sf.write(os.path.join(out_dir, rel), sample.audio, SR, subtype="PCM_16")
                msgs = fill_audio(sample.messages, {"type": "audio", "path": rel})
                f.write(json.dumps({"id": f"{task}-{i}", "task": task, "label": sample.label,
                                    "duration": round(sample.duration, 3), "messages": msgs}) + "\n")
        os.replace(path + ".tmp", path)
        manifests[task] = path
    return manifests


def fill_audio(messages: list[dict], part: dict) -> list[dict]:
    """The conversation with its ``{"type": "audio"}`` placeholder part replaced by ``part`` (a path or array)."""
    out = []
    for m in messages:
        if isinstance(m["content"], list):
            out.append({**m, "content": [part if p.get("type") == "audio" else p for p in m["content"]]})
        else:
            out.append(m)
    return out


# ---------------------------------------------------------------------- scoring
def parse_answer(task: str, text: str, turn: int = 0) -> str | int | None:
    """Read the label back out of a generated answer (None if it names none or several)."""
    words = text.lower().replace(".", " ").replace(",", " ").split()
    if task in ("count", "long_count") or (task == "multi_turn" and turn == 0):
        found = [NUMBER_WORDS.index(w) for w in words if w in NUMBER_WORDS[1:]]
        found += [int(w) for w in words if w.isdigit() and 1 <= int(w) <= 5]
        return found[0] if len(set(found)) == 1 else None
    if task in ("pitch", "multi_turn"):
        found = [w for w in words if w in PITCH_BANDS]
        return found[0] if len(set(found)) == 1 else None
    if task == "noise":
        found = [w for w in words if w in NOISE_KINDS]
        return found[0] if len(set(found)) == 1 else None
    raise ValueError(f"unknown synthetic task {task!r}")


def expected_label(task: str, label: dict, turn: int = 0) -> str | int:
    if task in ("count", "long_count") or (task == "multi_turn" and turn == 0):
        return int(label["count"])
    if task in ("pitch", "multi_turn"):
        return label["pitch"]
    return label["noise"]
