"""Checkpoints and final/ against crashes and power loss: written through files.atomic_folder (every file flushed,
umask modes), a failed write leaves the last good checkpoint, leftovers are cleaned, and what a resume may change."""

from __future__ import annotations

import errno
import logging
import os

import pytest
from af3 import files
from af3.processor import AF3Processor
from af3.training.checkpoint import list_checkpoints
from af3.training.trainer import TrainingError, train
from train_helpers import base_config, make_config, max_diff, read_metrics, tensors, write_manifest


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return write_manifest(tmp_path_factory.mktemp("ck"), 4)


def _files(root: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, names in os.walk(root) for f in names}


def test_every_checkpoint_file_is_flushed_with_umask_modes(tiny_ckpt, manifest, tmp_path, monkeypatch):
    flushed: list[set[str]] = []
    real = files.finish_tree

    def spy(root):
        real(root)
        flushed.append(_files(root))

    synced: set[str] = set()
    real_sync = files.fsync_file
    monkeypatch.setattr(files, "finish_tree", spy)
    monkeypatch.setattr(files, "fsync_file", lambda p: (synced.add(os.path.basename(p)), real_sync(p)))
    out = tmp_path / "run"
    train(make_config(base_config(tiny_ckpt[0], manifest, str(out), train={"max_steps": 2, "save_every": 1})))
    mask = files.umask()
    for name in ("checkpoint-000001", "checkpoint-000002", "final"):
        folder = str(out / name)
        assert _files(folder) in flushed, name  # the whole folder went through atomic_folder's finish_tree
        assert {os.path.basename(f) for f in _files(folder)} <= synced
        for d, _, names in os.walk(folder):
            assert os.stat(d).st_mode & 0o777 == 0o777 & ~mask
            for f in names:
                assert os.stat(os.path.join(d, f)).st_mode & 0o777 == 0o666 & ~mask
    assert not [n for n in os.listdir(out) if n.startswith(".")]


def test_a_failed_checkpoint_write_keeps_the_last_one_and_resume_goes_on(tiny_ckpt, manifest, tmp_path,
                                                                         monkeypatch):
    full = tmp_path / "full"
    train(make_config(base_config(tiny_ckpt[0], manifest, str(full), train={"max_steps": 3, "save_every": 1})))

    out = tmp_path / "run"
    cfg = base_config(tiny_ckpt[0], manifest, str(out), train={"max_steps": 3, "save_every": 1})
    real = AF3Processor.save_files
    calls = {"n": 0}

    def disk_full(self, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(self, path)

    monkeypatch.setattr(AF3Processor, "save_files", disk_full)
    with pytest.raises(TrainingError, match=r"cannot write .*checkpoint-000002: No space left on device.*--resume"):
        train(make_config(cfg))
    assert [s for s, _ in list_checkpoints(str(out))] == [1]
    assert not [n for n in os.listdir(out) if n.startswith(".") or n == "checkpoint-000002"]
    monkeypatch.setattr(AF3Processor, "save_files", real)

    # What a crash leaves (half-built folders, a half-deleted checkpoint) is removed when the next run starts.
    for junk in (".checkpoint-000002.tmp-abc", ".final.tmp-x", ".deleting-checkpoint-000001", ".tmp-final"):
        os.makedirs(out / junk / "sub")
    (out / "notes.txt").write_text("mine")  # not the trainer's: kept
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')  # a line cut short by the crash
    cfg["train"]["resume"] = True
    assert train(make_config(cfg))["step"] == 3
    assert sorted(n for n in os.listdir(out) if n.startswith(".")) == []
    assert (out / "notes.txt").read_text() == "mine"
    assert max_diff(tensors(str(full / "final")), tensors(str(out / "final"))) == 0.0
    assert [r["step"] for r in read_metrics(str(out))[0]] == [1, 2, 3]


def test_resume_may_extend_the_run_with_a_warning(tiny_ckpt, manifest, tmp_path, caplog):
    out = tmp_path / "run"
    cfg = base_config(tiny_ckpt[0], manifest, str(out), train={"max_steps": 2, "save_every": 1})
    train(make_config(cfg))
    cfg["train"].update(max_steps=3, resume=True, log_every=5)  # log_every changes freely
    cfg["optim"]["max_grad_norm"] = 0.5
    with caplog.at_level(logging.WARNING, logger="af3"):
        assert train(make_config(cfg))["step"] == 3
    warnings = [r.getMessage() for r in caplog.records if "other settings" in r.getMessage()]
    assert len(warnings) == 1 and "train.max_steps: 2 → 3" in warnings[0] and "log_every" not in warnings[0]


def test_resume_of_a_lora_run_needs_its_base_model(tiny_ckpt, manifest, tmp_path):
    import shutil

    out = tmp_path / "lora"
    cfg = base_config(tiny_ckpt[0], manifest, str(out), stage="stage3.5", lora={"r": 4, "alpha": 8},
                      train={"max_steps": 1, "save_every": 1})
    train(make_config(cfg))
    other_base = str(tmp_path / "other_base")
    shutil.copytree(tiny_ckpt[0], other_base)
    for key, value, says in (("lora", {"r": 8, "alpha": 8}, r"lora\.r=4, this run has lora\.r=8"),
                             ("lora", {"r": 4, "alpha": 16}, r"lora\.alpha=8"),
                             ("model", {"path": other_base}, r"model\.path=")):
        bad = base_config(tiny_ckpt[0], manifest, str(tmp_path / f"o{len(says)}"), stage="stage3.5",
                          lora={"r": 4, "alpha": 8}, train={"max_steps": 2, "resume": str(out / "checkpoint-000001")})
        bad[key] = {**bad.get(key, {}), **value}
        with pytest.raises(TrainingError, match=says):
            train(make_config(bad))
