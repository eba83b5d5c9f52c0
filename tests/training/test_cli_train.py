"""`af3 train` and `af3 train merge-lora` on the command line."""

from __future__ import annotations

import json

import torch
from train_helpers import base_config, write_config, write_manifest

from af3 import AF3Model, AF3Processor
from af3.cli import main as cli_main


def test_train_command_runs_a_config_with_overrides(tiny_ckpt, tmp_path, capsys):
    folder, _, _ = tiny_ckpt
    manifest = write_manifest(tmp_path / "data", 4)
    cfg = write_config(str(tmp_path / "run.yaml"), base_config(folder, manifest, str(tmp_path / "out")))
    assert cli_main(["train", cfg, "train.max_steps=3", "optim.lr=5e-4"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["step"] == 3
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "max_steps: 3" in saved and "0.0005" in saved
    AF3Model.from_pretrained(tmp_path / "out" / "final")


def test_train_command_reports_config_errors_in_one_line(tiny_ckpt, tmp_path, capsys):
    folder, _, _ = tiny_ckpt
    manifest = write_manifest(tmp_path / "data", 2)
    cfg = write_config(str(tmp_path / "run.yaml"), base_config(folder, manifest, str(tmp_path / "out")))
    assert cli_main(["train", cfg, "optim.nonsense=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "nonsense" in err and "\n" not in err


def test_merge_lora_command_writes_a_model_equal_to_the_adapter_run(tiny_ckpt, tmp_path, capsys):
    folder, _, _ = tiny_ckpt
    manifest = write_manifest(tmp_path / "data", 4)
    out = tmp_path / "lora"
    cfg = base_config(folder, manifest, str(out), stage="stage3.5", lora={"r": 4, "alpha": 8, "dropout": 0.0},
                      train={"max_steps": 2, "save_every": 2})
    assert cli_main(["train", write_config(str(tmp_path / "lora.yaml"), cfg)]) == 0
    checkpoint = sorted(out.glob("checkpoint-*"))[-1]
    merged = tmp_path / "merged"
    assert cli_main(["train", "merge-lora", str(checkpoint), "--out", str(merged), "--base", folder]) == 0
    # Independent expectation: the trainer's own final/ is the merged model of the same run.
    a, b = AF3Model.from_pretrained(merged), AF3Model.from_pretrained(out / "final")
    proc = AF3Processor.from_pretrained(merged)
    inputs = proc(text=["hello there"])
    with torch.no_grad():
        assert (a(**inputs).logits - b(**inputs).logits).abs().max().item() <= 1e-5
    assert cli_main(["train", "merge-lora", str(checkpoint)]) == 2
