"""The training loop in one process: learning, loss normalisation, accumulation, outputs, skipped audio."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from af3.errors import AF3Error
from af3.model import AF3Model
from af3.model.af3 import causal_lm_loss
from af3.training.trainer import TrainingError, train
from train_helpers import base_config, make_config, max_diff, read_metrics, tensors, write_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("data"), 4, text_only=(3,))


@pytest.fixture(scope="module")
def memorised(tiny_ckpt, manifest, tmp_path_factory):
    """10 steps on 4 conversations, evaluated on the same set every 5 steps, checkpoints every 3 (keep 2)."""
    out = str(tmp_path_factory.mktemp("memorise") / "run")
    cfg = make_config(base_config(tiny_ckpt[0], manifest, out, data={"eval": manifest},
                                  optim={"lr": 5e-3},
                                  train={"max_steps": 10, "eval_every": 5, "save_every": 3, "keep_last": 2}))
    return out, train(cfg)


def _one_step(ckpt: str, manifest: str, out: str, batch: int, accum: int, checkpointing: bool) -> dict:
    # A small lr: Adam's first step is about lr * sign(g), so gradients at float-noise level (|g| ~ eps) move by up
    # to ~lr between two equal-in-exact-arithmetic runs; at 1e-4 that stays far below the 1e-6 tolerance.
    cfg = make_config(base_config(ckpt, manifest, out, optim={"lr": 1e-4}, train={"max_steps": 1, "batch_size": batch,
                                                               "grad_accum": accum,
                                                               "gradient_checkpointing": checkpointing}))
    return train(cfg)


@pytest.fixture(scope="module")
def big_batch_step(tiny_ckpt, manifest, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("big") / "run")
    return out, _one_step(tiny_ckpt[0], manifest, out, batch=4, accum=1, checkpointing=False)


def test_loss_goes_down_and_eval_improves(memorised):
    out, result = memorised
    rows, evals = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    losses = [r["loss"] for r in rows]
    assert losses[-1] < 0.65 * losses[0], losses
    assert sum(losses[-3:]) < sum(losses[:3])
    assert [e["step"] for e in evals] == [5, 10]
    assert evals[1]["eval_loss"] < evals[0]["eval_loss"]
    assert evals[1]["eval_token_accuracy"] >= evals[0]["eval_token_accuracy"]
    assert result["step"] == 10 and result["eval_loss"] == pytest.approx(evals[1]["eval_loss"])
    assert result["loss"] == pytest.approx(losses[-1])
    for r in rows:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed", "label_tokens"} <= r.keys()
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["label_tokens"] > 0
    assert 0 <= evals[1]["eval_token_accuracy"] <= 1


def test_outputs_checkpoints_and_final(memorised, tiny_ckpt, manifest):
    out, _ = memorised
    names = sorted(os.listdir(out))
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-000009", "checkpoint-000010"]
    assert not [n for n in names if n.startswith(".")], names  # no temporary or half-deleted folders left
    assert {"config.yaml", "metrics.jsonl", "training.png", "train.log", "final"} <= set(names)
    with open(os.path.join(out, "training.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    ckpt = os.path.join(out, "checkpoint-000010")
    for f in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json", "trainer_state.pt"):
        assert os.path.isfile(os.path.join(ckpt, f)), f
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), weights_only=True)
    assert state["step"] == 10 and state["epoch"] == 5 and state["batch_in_epoch"] == 0
    assert {"optimizer", "scheduler", "rng", "sampler_seed"} <= state.keys()

    final = os.path.join(out, "final")
    assert max_diff(tensors(final), tensors(ckpt)) == 0.0
    assert max_diff(tensors(final), tensors(tiny_ckpt[0])) > 1e-3  # it did train

    # final/ loads with our model and with transformers, and both give the same logits.
    from af3 import AF3Processor
    from transformers import AudioFlamingo3ForConditionalGeneration

    proc = AF3Processor.from_pretrained(final)
    clip = os.path.join(os.path.dirname(manifest), "train_0.wav")
    conv = [{"role": "user", "content": [{"type": "audio", "path": clip}, {"type": "text", "text": "What?"}]}]
    inputs = proc.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True)
    ours = AF3Model.from_pretrained(final)
    ref = AudioFlamingo3ForConditionalGeneration.from_pretrained(final).eval()
    with torch.no_grad():
        a = ours(**inputs).logits
        b = ref(**inputs).logits
    assert float((a - b).abs().max()) <= 1e-4


def test_loss_equals_model_mean_loss(big_batch_step, tiny_ckpt, manifest):
    """Step 1's logged loss (sum of token CE / label tokens) = AF3Model's own mean loss on the same batch."""
    from af3 import AF3Processor
    from af3.training.data import Collator, MixtureDataset

    out, _ = big_batch_step
    rows, _ = read_metrics(out)
    ds = MixtureDataset([(1.0, manifest)])
    batch = Collator(AF3Processor.from_pretrained(tiny_ckpt[0]))([ds[i] for i in range(len(ds))])
    model = AF3Model.from_pretrained(tiny_ckpt[0])
    with torch.no_grad():
        res = model(**batch["inputs"])
    assert rows[0]["label_tokens"] == batch["num_label_tokens"]
    assert rows[0]["loss"] == pytest.approx(float(res.loss), abs=1e-5)
    own = causal_lm_loss(res.logits, batch["inputs"]["labels"], reduction="sum") / batch["num_label_tokens"]
    assert float(own) == pytest.approx(float(res.loss), abs=1e-6)


def test_grad_accumulation_matches_big_batch(big_batch_step, tiny_ckpt, manifest, tmp_path):
    """batch 2 × accum 2 (with gradient checkpointing) = batch 4 × accum 1 after one optimizer step."""
    big, _ = big_batch_step
    out = str(tmp_path / "accum")
    _one_step(tiny_ckpt[0], manifest, out, batch=2, accum=2, checkpointing=True)
    (row_big,), _ = read_metrics(big)
    (row_acc,), _ = read_metrics(out)
    assert row_acc["label_tokens"] == row_big["label_tokens"]
    assert row_acc["loss"] == pytest.approx(row_big["loss"], abs=1e-6)
    assert row_acc["grad_norm"] == pytest.approx(row_big["grad_norm"], rel=1e-5)
    diff = max_diff(tensors(os.path.join(out, "final")), tensors(os.path.join(big, "final")))
    assert diff <= 1e-6, diff
    assert max_diff(tensors(os.path.join(out, "final")), tensors(tiny_ckpt[0])) > 5e-5  # a real update happened


def test_skipped_audio_is_counted_and_limited(tiny_ckpt, tmp_path, caplog):
    manifest = write_manifest(tmp_path / "data", 5, broken=(1,), missing=(3,))
    base = dict(train={"max_steps": 2, "batch_size": 3}, data={"max_skipped": 2})
    with caplog.at_level(logging.WARNING, logger="af3"):
        result = train(make_config(base_config(tiny_ckpt[0], manifest, str(tmp_path / "ok"), **base)))
    assert result["skipped"] == 2
    skipped = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipped ")]
    assert any(f"{manifest}:2" in m for m in skipped) and any(f"{manifest}:4" in m for m in skipped)
    rows, _ = read_metrics(str(tmp_path / "ok"))
    assert rows[-1]["skipped"] == 2

    base["data"] = {"max_skipped": 1}
    with pytest.raises(TrainingError, match="max_skipped=1"):
        train(make_config(base_config(tiny_ckpt[0], manifest, str(tmp_path / "too_many"), **base)))


def test_output_folder_in_use_needs_resume(memorised, tiny_ckpt, manifest):
    out, _ = memorised
    with pytest.raises(AF3Error, match="resume"):
        train(make_config(base_config(tiny_ckpt[0], manifest, out)))


def test_bf16_autocast_on_cpu_when_forced(tiny_ckpt, manifest, tmp_path):
    result = train(make_config(base_config(tiny_ckpt[0], manifest, str(tmp_path / "bf16"),
                                           train={"max_steps": 1, "bf16": True})))
    assert result["loss"] is not None and 0 < result["loss"] < 100
    rows, _ = read_metrics(str(tmp_path / "bf16"))
    assert rows[0]["grad_norm"] > 0


def test_audio_filler_adds_a_silent_unlabelled_row(tiny_ckpt, manifest):
    """Distributed runs give every micro-batch audio (same modules and collectives on every rank)."""
    from af3 import AF3Processor
    from af3.training.data import Collator, MixtureDataset
    from af3.training.loader import AudioFiller

    proc = AF3Processor.from_pretrained(tiny_ckpt[0])
    model = AF3Model.from_pretrained(tiny_ckpt[0])
    filler = AudioFiller(model.config, proc.pad_token_id)
    text_only = Collator(proc)([MixtureDataset([(1.0, manifest)])[3]])["inputs"]
    assert "input_features" not in text_only
    for inputs in (text_only, None):
        filled = filler.ensure_audio(inputs)
        rows = 1 if inputs is None else text_only["input_ids"].shape[0] + 1
        assert filled["input_ids"].shape[0] == rows and filled["input_features"].shape[0] == 1
        assert (filled["labels"][-1] == -100).all()
        with torch.no_grad():
            logits = model(**{k: v for k, v in filled.items() if k != "labels"}).logits
        if inputs is not None:  # the real rows keep their logits
            t = text_only["input_ids"].shape[1]
            with torch.no_grad():
                ref = model(**{k: v for k, v in text_only.items() if k != "labels"}).logits
            assert float((logits[:-1, :t] - ref).abs().max()) <= 1e-5
            assert float(causal_lm_loss(logits, filled["labels"], reduction="sum")) == pytest.approx(
                float(causal_lm_loss(ref, text_only["labels"], reduction="sum")), rel=1e-5)
    assert filler.ensure_audio(filled) is filled  # batches with audio are left alone
