"""The tiny-model recipe's own steps: the encoder warm-up and the whole run, shrunk."""

from __future__ import annotations

import json

import torch

from af3 import AF3Model
from af3.training import synthetic as S
from af3.training import tiny_recipe as R


def test_the_encoder_warm_up_teaches_the_encoder_alone_every_frame_class(tmp_path):
    init = R.build_init(tmp_path / "init", seed=1)
    before = AF3Model.from_pretrained(init).state_dict()
    result = R.pretrain_encoder(init, steps=60, batch_size=16, eval_clips=48, seed=1)
    after = AF3Model.from_pretrained(init).state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("audio_tower.") for k in changed)
    assert "audio_tower.conv1.weight" in changed and "audio_tower.embed_positions.weight" not in changed
    recall = result["frame_recall"]
    assert set(recall) == set(S.FRAME_CLASSES)
    # Chance is 1/7 per class; the classes the decoder alone never learned (high tones) are learned here.
    assert min(recall.values()) >= 0.6, recall
    assert result["onset_recall"] >= 0.5 and result["onset_precision"] > 0.05, result  # onsets: ~2% of frames


def test_the_recipe_runs_end_to_end_and_writes_its_card(tmp_path):
    counts = {"count": 6, "pitch": 3, "noise": 3, "long_count": 2, "multi_turn": 3}
    out = R.run_recipe(tmp_path / "run", overrides=["train.max_steps=2", "train.batch_size=4", "data.num_workers=0"],
                       train_counts=counts, accuracy_clips=2,
                       encoder_warmup={"steps": 2, "batch_size": 4, "eval_clips": 4})
    final = tmp_path / "run" / "train" / "final"
    card = (final / "README.md").read_text()
    assert out["steps"] == 2 and out["train_counts"] == counts and set(out["accuracy"]) == set(S.TASKS)
    assert "Encoder warm-up: 2 steps of 4 fresh short clips" in card
    assert json.loads((final / "eval_results.json").read_text())["encoder_warmup"]["steps"] == 2
    assert json.loads((tmp_path / "run" / "init" / "encoder_warmup.json").read_text()) == out["encoder_warmup"]
