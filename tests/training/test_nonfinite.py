"""Training that cannot be right stops: a NaN loss, weights that became NaN/inf before a save, a gradient norm that
stays NaN/inf; steps without supervised tokens log no loss; metrics and the printed result are strict JSON."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from af3.training import trainer as trainer_module
from af3.training.checkpoint import list_checkpoints
from af3.training.distributed import Strategy
from af3.training.trainer import TrainingError, main, train
from train_helpers import base_config, make_config, tensors, write_config, write_manifest


def _strict(text: str):
    def refuse(token: str):
        raise AssertionError(f"{token} is not JSON")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("nf"), 4)


def _cfg(tiny_ckpt, manifest, out, **train_section):
    return make_config(base_config(tiny_ckpt[0], manifest, str(out),
                                   train={"max_steps": 3, "save_every": 1, **train_section}))


def _at_step(n: int, patch_fn):
    """A wrapper that calls ``patch_fn`` from the ``n``-th call on (1-based)."""
    calls = {"n": 0}

    def wrap(original):
        def inner(*args, **kwargs):
            calls["n"] += 1
            out = original(*args, **kwargs)
            return patch_fn(out, *args) if calls["n"] >= n else out
        return inner
    return wrap


def test_a_nan_loss_stops_the_run_before_anything_is_saved(tiny_ckpt, manifest, tmp_path, monkeypatch):
    real = trainer_module.causal_lm_loss
    monkeypatch.setattr(trainer_module, "causal_lm_loss",
                        _at_step(2, lambda ce, *a: ce * float("nan"))(real))  # batch 2 → one call per step
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"^step 2: the loss is nan .*lower optim\.lr"):
        train(_cfg(tiny_ckpt, manifest, out))
    assert [s for s, _ in list_checkpoints(str(out))] == [1]
    assert not (out / "final").exists()
    assert all(torch.isfinite(t).all() for t in tensors(str(out / "checkpoint-000001")).values())


def test_weights_that_became_nonfinite_are_never_saved(tiny_ckpt, manifest, tmp_path, monkeypatch):
    real = torch.optim.AdamW.step

    def poison(result, optimizer, *args):
        optimizer.param_groups[0]["params"][0].data.fill_(float("inf"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", _at_step(2, poison)(real))
    out = tmp_path / "run"
    with pytest.raises(TrainingError, match=r"weights hold NaN or infinite values after step 2"):
        train(_cfg(tiny_ckpt, manifest, out))
    assert [s for s, _ in list_checkpoints(str(out))] == [1] and not (out / "final").exists()
    # With save_every=0, final/ is the only save: it is checked too.
    monkeypatch.setattr(torch.optim.AdamW, "step", _at_step(1, poison)(real))
    with pytest.raises(TrainingError, match=r"after step 1"):
        train(_cfg(tiny_ckpt, manifest, tmp_path / "run2", max_steps=1, save_every=0))
    assert not (tmp_path / "run2" / "final").exists()


def test_a_few_nonfinite_gradient_norms_skip_their_update_then_the_run_stops(tiny_ckpt, manifest, tmp_path,
                                                                             monkeypatch, caplog):
    real = Strategy.clip_grad_norm
    calls = {"n": 0}

    def once(self, params, max_norm):
        calls["n"] += 1
        norm = real(self, params, max_norm)
        return float("inf") if calls["n"] == 1 else norm

    monkeypatch.setattr(Strategy, "clip_grad_norm", once)
    out = tmp_path / "once"
    cfg_path = write_config(str(tmp_path / "once.yaml"), base_config(tiny_ckpt[0], manifest, str(out),
                                                                      train={"max_steps": 2}))
    with caplog.at_level(logging.WARNING, logger="af3"):
        assert main([cfg_path]) == 0
    assert any("gradient norm is inf; the update is skipped" in r.getMessage() for r in caplog.records)
    rows = [_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["grad_norm"] is None and rows[1]["grad_norm"] > 0  # strict JSON: null, not Infinity

    monkeypatch.setattr(Strategy, "clip_grad_norm", lambda self, params, max_norm: float("nan"))
    with pytest.raises(TrainingError, match=r"step 4: the gradient norm was NaN/infinite in 4 steps in a row"):
        train(_cfg(tiny_ckpt, manifest, tmp_path / "always", max_steps=10, save_every=0))


def test_steps_without_supervised_tokens_log_no_loss_and_the_result_is_strict_json(tiny_ckpt, tmp_path, capsys):
    manifest = write_manifest(tmp_path / "data", 4, broken=(0, 1))
    out = tmp_path / "run"
    cfg = write_config(str(tmp_path / "c.yaml"), base_config(tiny_ckpt[0], manifest, str(out),
                                                             train={"max_steps": 4, "batch_size": 1}))
    assert main([cfg]) == 0
    result = _strict(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["step"] == 4 and result["skipped"] == 2
    rows = [_strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sorted(r["label_tokens"] == 0 for r in rows) == [False, False, True, True]
    for r in rows:
        assert (r["loss"] is None) == (r["label_tokens"] == 0), r
    assert result["loss"] == rows[-1]["loss"]
    assert os.path.isdir(out / "final")
