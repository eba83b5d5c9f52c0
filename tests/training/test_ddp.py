"""torchrun with 2 CPU processes (gloo) and batch B = 1 process with batch 2B: same losses, same weights."""

from __future__ import annotations

import os

import pytest
from af3.training.trainer import train
from train_helpers import base_config, make_config, max_diff, read_metrics, run_trainer, tensors, write_config, \
    write_manifest

TOL = 1e-5


def _cfg(ckpt: str, manifest: str, out: str, batch: int, strategy: str = "ddp") -> dict:
    # 7 examples (one text-only) → global batches 2, 2, 2, 1: the last one leaves rank 1 without an example of
    # its own, and a text-only batch needs the audio filler. Two epochs, checkpoints under DDP/FSDP, final eval.
    # lr 1e-4: Adam moves weights by ~lr * g / (|g| + eps), so elements whose gradient is at float-noise level
    # (a different summation order) can differ by a fraction of lr; losses and grad norms are compared tightly.
    return base_config(ckpt, manifest, out, data={"eval": manifest}, optim={"lr": 1e-4},
                       train={"max_steps": 4, "batch_size": batch, "grad_accum": 2, "save_every": 2,
                              "gradient_checkpointing": True, "strategy": strategy})


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    manifest = write_manifest(root / "data", 7, text_only=(2,))
    single = str(root / "single")
    train(make_config(_cfg(tiny_ckpt[0], manifest, single, batch=2)))
    return root, manifest, single


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one(setup, tiny_ckpt, strategy):
    root, manifest, single = setup
    out = str(root / strategy)
    cfg = write_config(str(root / f"{strategy}.yaml"), _cfg(tiny_ckpt[0], manifest, out, batch=1, strategy=strategy))
    run_trainer(cfg, nproc=2)

    rows_1, evals_1 = read_metrics(single)
    rows_2, evals_2 = read_metrics(out)
    assert [r["step"] for r in rows_2] == [1, 2, 3, 4]
    assert [r["label_tokens"] for r in rows_2] == [r["label_tokens"] for r in rows_1]
    for a, b in zip(rows_1, rows_2, strict=True):
        assert abs(a["loss"] - b["loss"]) <= TOL, (a, b)
        assert abs(a["grad_norm"] - b["grad_norm"]) <= TOL * max(1.0, a["grad_norm"]), (a, b)
    assert len(evals_2) == 1 and abs(evals_1[0]["eval_loss"] - evals_2[0]["eval_loss"]) <= TOL
    assert evals_1[0]["eval_tokens"] == evals_2[0]["eval_tokens"]
    diff = max_diff(tensors(os.path.join(single, "final")), tensors(os.path.join(out, "final")))
    assert diff <= TOL, diff
    # Rank 0 wrote the checkpoints (same layout as a single process).
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint-")) == ["checkpoint-000002",
                                                                                 "checkpoint-000004"]
    assert max_diff(tensors(os.path.join(out, "checkpoint-000004")), tensors(os.path.join(out, "final"))) == 0.0
