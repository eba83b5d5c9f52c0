"""Resume: a run killed with SIGKILL and resumed ends exactly like an uninterrupted one."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time

import pytest
from af3.training.checkpoint import list_checkpoints
from af3.training.trainer import run, train
from train_helpers import (
    base_config,
    make_config,
    max_diff,
    read_metrics,
    run_trainer,
    subprocess_env,
    tensors,
    trainer_cmd,
    write_config,
    write_manifest,
)


def _lora_config(ckpt: str, manifest: str, output: str) -> dict:
    # LoRA with dropout + gradient checkpointing: the resumed run must also restore the RNG streams.
    return base_config(
        ckpt, manifest, output, stage="stage3.5",
        lora={"r": 4, "alpha": 8, "dropout": 0.1},
        data={"eval": manifest, "num_workers": 1},
        optim={"lr": 1e-2, "warmup_steps": 2},
        train={"max_steps": 10, "batch_size": 2, "save_every": 2, "keep_last": 2, "eval_every": 5,
               "gradient_checkpointing": True},
    )


def test_sigkill_then_resume_matches_uninterrupted(tiny_ckpt, tmp_path):
    manifest = write_manifest(tmp_path / "data", 7, text_only=(5,))  # 4 batches per epoch: 2.5 epochs
    full_out, killed_out = str(tmp_path / "full"), str(tmp_path / "killed")
    full_cfg = write_config(str(tmp_path / "full.yaml"), _lora_config(tiny_ckpt[0], manifest, full_out))
    killed_cfg = write_config(str(tmp_path / "killed.yaml"), _lora_config(tiny_ckpt[0], manifest, killed_out))

    # The run that gets killed: SIGKILL as soon as its first checkpoint is complete.
    proc = subprocess.Popen(trainer_cmd(killed_cfg), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=subprocess_env())
    try:
        deadline = time.monotonic() + 240
        while not list_checkpoints(killed_out):
            assert proc.poll() is None, proc.stderr.read().decode()[-4000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    steps = [s for s, _ in list_checkpoints(killed_out)]
    assert steps and steps[-1] < 10 and not os.path.exists(os.path.join(killed_out, "final"))

    run_trainer(full_cfg)
    run_trainer(killed_cfg, "--resume")

    # Same weights: the merged model and the adapter.
    for sub in ("final", "final/adapter"):
        a = os.path.join(full_out, sub)
        b = os.path.join(killed_out, sub)
        if sub.endswith("adapter"):
            from safetensors.torch import load_file

            ta, tb = load_file(os.path.join(a, "adapter_model.safetensors")), \
                load_file(os.path.join(b, "adapter_model.safetensors"))
        else:
            ta, tb = tensors(a), tensors(b)
        assert max_diff(ta, tb) == 0.0, sub
    # Same logged losses, each step once.
    rows_a, evals_a = read_metrics(full_out)
    rows_b, evals_b = read_metrics(killed_out)
    assert [r["step"] for r in rows_b] == list(range(1, 11))
    assert [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows_a] == \
        [(r["step"], r["loss"], r["grad_norm"], r["lr"]) for r in rows_b]
    assert [(e["step"], e["eval_loss"]) for e in evals_a] == [(e["step"], e["eval_loss"]) for e in evals_b]
    assert len({r["loss"] for r in rows_a}) > 5  # the curve is not trivially flat


def test_resume_from_copied_checkpoint_full_weights(tiny_ckpt, tmp_path):
    """Full fine-tuning (HF-layout weights + optimizer) resumed in-process from an explicit checkpoint path."""
    manifest = write_manifest(tmp_path / "data", 4)
    out = str(tmp_path / "a")
    sections = dict(data={"eval": manifest}, train={"max_steps": 4, "save_every": 2, "eval_every": 2})
    train(make_config(base_config(tiny_ckpt[0], manifest, out, **sections)))
    other = str(tmp_path / "b")
    os.makedirs(other)
    shutil.copytree(os.path.join(out, "checkpoint-000002"), os.path.join(other, "checkpoint-000002"))
    cfg = write_config(str(tmp_path / "b.yaml"), base_config(tiny_ckpt[0], manifest, other, **sections))
    result = run(cfg, resume=os.path.join(other, "checkpoint-000002"))
    assert result["step"] == 4
    assert max_diff(tensors(os.path.join(out, "final")), tensors(os.path.join(other, "final"))) == 0.0
    rows_a, evals_a = read_metrics(out)
    rows_b, evals_b = read_metrics(other)
    assert [(r["step"], r["loss"]) for r in rows_a[2:]] == [(r["step"], r["loss"]) for r in rows_b]
    assert [(e["step"], e["eval_loss"]) for e in evals_a[1:]] == [(e["step"], e["eval_loss"]) for e in evals_b]

    # Resuming a finished run trains nothing and logs nothing twice.
    again = run(cfg, resume=True)
    assert again["step"] == 4 and again["eval_loss"] == pytest.approx(evals_b[-1]["eval_loss"])
    assert read_metrics(other) == (rows_b, evals_b)


def test_resume_without_checkpoint_starts_fresh_and_bad_path_fails(tiny_ckpt, tmp_path):
    from af3.training.trainer import TrainingError

    manifest = write_manifest(tmp_path / "data", 2)
    cfg = base_config(tiny_ckpt[0], manifest, str(tmp_path / "out"), train={"max_steps": 1, "resume": True})
    assert train(make_config(cfg))["step"] == 1
    cfg["train"]["resume"] = str(tmp_path / "nowhere")
    cfg["output"] = str(tmp_path / "out2")
    with pytest.raises(TrainingError, match="not a complete checkpoint"):
        train(make_config(cfg))
