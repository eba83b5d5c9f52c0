"""The embedded tiny model (trained by `af3 train tiny --install`): it ships, its card is honest, it answers, and the
training pipeline trains on from it."""

from __future__ import annotations

import json
import math
import os

import pytest
import soundfile as sf

from af3 import AF3Model, AF3Processor
from af3.cli import bundled_clip, embedded_model_path
from af3.cli import main as cli_main
from af3.training import synthetic as S
from af3.training.tiny_recipe import GOALS, model_card, task_accuracy

ASSET = embedded_model_path()
#: Chance levels: five counts, three pitch bands, three noise colours.
CHANCE = {"count": 0.2, "long_count": 0.2, "pitch": 1 / 3, "noise": 1 / 3, "multi_turn": 1 / 3}


@pytest.fixture(scope="module")
def tiny():
    assert ASSET is not None, "af3/assets/tiny is missing: run `af3 train tiny --install`"
    return AF3Model.from_pretrained(ASSET), AF3Processor.from_pretrained(ASSET)


@pytest.fixture(scope="module")
def card():
    return json.loads((ASSET / "eval_results.json").read_text())


def test_the_embedded_model_is_small_and_documented(card):
    assert ASSET is not None
    size = sum(os.path.getsize(os.path.join(ASSET, f)) for f in os.listdir(ASSET))
    assert size <= 15 * 1024**2
    text = (ASSET / "README.md").read_text()
    for task in S.TASKS:
        assert task in text and f"{card['accuracy'][task]:.1%}" in text
    assert card["total_seconds"] <= 20 * 60  # the recipe's wall time on this machine class


def binomial_tail(hits: int, n: int, p: float) -> float:
    """P(X >= hits) for X ~ Binomial(n, p)."""
    return sum(math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(hits, n + 1))


def test_fresh_clips_reproduce_the_card(tiny, card):
    """40 new clips per task (a seed the card did not use): within sampling error of the card, far above chance."""
    model, proc = tiny
    n = 40
    by_band = {}
    scores = task_accuracy(model, proc, n=n, seed=4242, by_band=by_band)
    assert set(by_band) == set(S.BEEP_TASKS)
    for task, bands in by_band.items():  # the overall score is a mix of the per-band scores
        assert set(bands) <= set(S.PITCH_BANDS) and min(bands.values()) <= scores[task] <= max(bands.values())
    for task in S.TASKS:
        # Both accuracies are binomial estimates (card: accuracy_clips clips; here: n): 3 standard errors of their
        # difference, at least 0.05 (for accuracies near 100%).
        p = card["accuracy"][task]
        se = math.sqrt(p * (1 - p) * (1 / n + 1 / card["accuracy_clips"]))
        assert scores[task] >= p - max(3 * se, 0.05), (task, scores, card["accuracy"])
        # Far above chance: guessing would reach this many hits with probability < 1e-3.
        assert binomial_tail(round(scores[task] * n), n, CHANCE[task]) < 1e-3, (task, scores)


def test_it_counts_the_beeps_of_the_bundled_clip(capsys):
    assert cli_main(["ask", str(bundled_clip()), "How many beeps do you hear?", "--model", str(ASSET)]) == 0
    answer = capsys.readouterr().out.strip()
    assert S.parse_answer("count", answer) == 3, answer


def test_demo_answers_with_the_embedded_model(capsys):
    assert cli_main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "three_beeps.wav" in out
    assert S.parse_answer("count", out.split("answer:")[-1]) == 3


def test_the_pipeline_trains_on_from_the_embedded_model(tmp_path, tiny):
    from af3.training.config import config_from_dict
    from af3.training.trainer import train

    manifests = S.write_dataset(tmp_path / "data", {"count": 6, "noise": 4}, seed=9)
    cfg = config_from_dict({
        "model": {"path": str(ASSET)}, "stage": "stage3",
        "data": {"mixture": "+".join(manifests.values()), "num_workers": 0, "max_audio_len": 90},
        "optim": {"lr": 1e-5, "warmup_steps": 0},
        "train": {"max_steps": 3, "batch_size": 4, "save_every": 0, "gradient_checkpointing": False},
        "output": str(tmp_path / "out"),
    })
    metrics = train(cfg)
    assert metrics["step"] == 3 and metrics["loss"] < 0.5  # it already knows these tasks: a low loss from the start
    final = tmp_path / "out" / "final"
    model, proc = AF3Model.from_pretrained(final), AF3Processor.from_pretrained(final)
    assert task_accuracy(model, proc, tasks=("noise",), n=12, seed=5)["noise"] >= 0.8
    wav = tmp_path / "beeps.wav"
    sf.write(wav, sf.read(str(bundled_clip()))[0], 16000)
    assert cli_main(["ask", str(wav), "How many beeps do you hear?", "--model", str(final)]) == 0


def test_the_card_states_unmet_goals_and_the_per_band_accuracy(card):
    scores = {t: GOALS[t] for t in S.TASKS} | {"count": 0.5}
    info = dict(card) | {"by_band": {"count": {"low": 0.9, "medium": 0.6, "high": 0.0}}}
    text = model_card(scores, info)
    assert "Goals not met: count." in text and "| count | 90% | 60% | 0% |" in text
    assert "Every goal is met." in model_card({t: GOALS[t] for t in S.TASKS}, info)
