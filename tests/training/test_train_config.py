"""TrainConfig: YAML + overrides, stage defaults, relative paths, errors; the LR schedule."""

from __future__ import annotations

import os

import pytest
import yaml
from af3.errors import InputError
from af3.training.config import load_config, save_config
from af3.training.stages import STAGES, get_stage
from af3.training.optim import lr_factor


def _yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_yaml_overrides_stage_defaults_and_paths(tmp_path, monkeypatch):
    run = tmp_path / "runs"
    run.mkdir()
    cfg_path = _yaml(run / "cfg.yaml", {
        "model": {"path": "../ckpt"},
        "stage": "stage3",
        "data": {"mixture": "2.0*asr+1.0*qa", "manifests": {"asr": "data/asr.jsonl", "qa": "/abs/qa.jsonl"},
                 "eval": "data/dev.jsonl"},
        "optim": {"lr": "1e-4", "betas": [0.9, 0.95]},  # YAML leaves 1e-4 a string: it must still be a float
        "train": {"resume": "out/checkpoint-000010"},
        "output": "out",
    })
    monkeypatch.chdir(tmp_path)
    cfg = load_config(cfg_path, ["optim.lr=3e-4", "stage=stage2", "train.batch_size=3", "data.eval=dev2.jsonl",
                                 "data.manifests.extra=x.jsonl", "train.bf16=true", "lora.target_modules=[q_proj]"])
    assert cfg.optim.lr == pytest.approx(3e-4) and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == [0.9, 0.95]
    assert cfg.stage == "stage2"
    # Stage 2 preset fills what the file left open; the override wins over the preset.
    assert cfg.data.max_audio_len == 30.0 and cfg.train.grad_accum == 4 and cfg.train.epochs == 1
    assert cfg.train.batch_size == 3 and cfg.data.eval_batch_size == 3
    assert cfg.train.bf16 is True and cfg.lora.target_modules == ["q_proj"]
    # YAML paths are relative to the YAML's folder, override paths to the current directory.
    assert cfg.model.path == str(tmp_path / "ckpt")
    assert cfg.data.manifests == {"asr": str(run / "data" / "asr.jsonl"), "qa": "/abs/qa.jsonl",
                                  "extra": str(tmp_path / "x.jsonl")}
    assert cfg.data.eval == str(tmp_path / "dev2.jsonl")
    assert cfg.output == str(run / "out")
    assert cfg.train.resume == str(run / "out" / "checkpoint-000010")
    assert cfg.data.mixture == "2.0*asr+1.0*qa"

    # The saved config is complete and loads back to the same tree.
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


@pytest.mark.parametrize("where", ["yaml", "override"])
def test_unknown_keys_are_named(tmp_path, where):
    data = {"model": {"path": "ckpt"}, "data": {"mixture": "a.jsonl"}}
    overrides = []
    if where == "yaml":
        data["optim"] = {"lrr": 1}
    else:
        overrides = ["train.bogus_key=1"]
    with pytest.raises(InputError, match="optim.lrr" if where == "yaml" else "train.bogus_key"):
        load_config(_yaml(tmp_path / "c.yaml", data), overrides)


def test_bad_values_and_sections(tmp_path):
    path = _yaml(tmp_path / "c.yaml", {"model": {"path": "ckpt"}, "data": {"mixture": "a.jsonl"}})
    with pytest.raises(InputError, match="optim.lr"):
        load_config(path, ["optim.lr=fast"])
    with pytest.raises(InputError, match="train.strategy"):
        load_config(path, ["train.strategy=zero3"])
    with pytest.raises(InputError, match="unknown stage"):
        load_config(path, ["stage=stage9"])
    with pytest.raises(InputError, match="KEY=VALUE"):
        load_config(path, ["optim.lr"])
    with pytest.raises(InputError, match="model.path"):
        load_config(_yaml(tmp_path / "d.yaml", {"data": {"mixture": "a.jsonl"}}))
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_default_config_values(tmp_path):
    cfg = load_config(_yaml(tmp_path / "c.yaml", {"model": {"path": "ckpt"}, "data": {"mixture": "a.jsonl"},
                                                   "stage": 3.5}))
    assert cfg.stage == "stage3.5" and cfg.optim.lr == 5e-5 and cfg.data.max_audio_len == 600.0
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (64, 16.0, 0.05)
    assert cfg.optim.warmup_ratio == 0.03 and cfg.optim.max_grad_norm == 1.0 and cfg.optim.schedule == "cosine"
    assert cfg.train.strategy == "ddp" and cfg.train.bf16 == "auto" and cfg.train.assistant_only is True
    assert cfg.output == os.path.join(str(tmp_path), "output")


def test_stage_presets_and_names():
    assert [s for s in STAGES] == ["stage1", "stage2", "stage3", "stage3.5", "stage4"]
    assert [STAGES[s].max_audio_len for s in STAGES] == [30, 30, 150, 600, 600]
    assert [STAGES[s].lr for s in STAGES] == [1e-3, 1.5e-5, 1.5e-5, 5e-5, 5e-5]
    for name in ("stage3.5", "stage35", "3.5", 3.5, "STAGE3.5"):
        assert get_stage(name).name == "stage3.5"
    assert get_stage(1).name == "stage1" and get_stage("4").name == "stage4"
    with pytest.raises(InputError):
        get_stage("stage5")


def test_lr_schedule():
    f = [lr_factor(s, total=10, warmup=2, schedule="cosine", min_ratio=0.1) for s in range(11)]
    assert f[0] == pytest.approx(1 / 3) and f[1] == pytest.approx(2 / 3)
    assert f[2] == pytest.approx(1.0)  # peak right after warm-up
    assert all(a >= b for a, b in zip(f[2:], f[3:], strict=False))  # then monotone decay
    assert f[10] == pytest.approx(0.1) and f[6] == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(5, 10, 0, "linear") == pytest.approx(0.5)
    assert lr_factor(7, 10, 0, "constant") == 1.0


def test_part_learning_rates_give_each_part_its_own_scheduled_lr(tmp_path, tiny_ckpt):
    from af3 import AF3Model
    from af3.training.optim import build_optimizer, build_scheduler

    folder, _, _ = tiny_ckpt
    path = _yaml(tmp_path / "c.yaml", {"model": {"path": folder}, "data": {"mixture": "a.jsonl"}, "stage": "stage3",
                                       "optim": {"lr": 1e-3, "warmup_steps": 0, "weight_decay": 0.1}})
    cfg = load_config(path, ["optim.part_lr={audio_tower: 4.0e-3, language_model.lm_head: 1.0e-4}"])
    model = AF3Model.from_pretrained(folder)
    opt = build_optimizer(model, cfg)
    by_param = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert id(p) not in by_param
            continue
        lr = 4e-3 if name.startswith("audio_tower.") else 1e-4 if name.startswith("language_model.lm_head") else 1e-3
        assert by_param[id(p)] == (lr, 0.1 if p.dim() >= 2 else 0.0), name
    sched = build_scheduler(opt, cfg, total_steps=10)
    for _ in range(5):
        opt.step()
        sched.step()
    factor = lr_factor(5, 10, 0, "cosine", 0.0)
    assert sorted({round(g["lr"], 12) for g in opt.param_groups}) == \
        sorted(round(x * factor, 12) for x in (1e-4, 1e-3, 4e-3))
    with pytest.raises(InputError, match="optim.part_lr"):
        load_config(path, ["optim.part_lr={audio_tower: -1}"])


def test_mixture_paths_resolve_from_the_yaml_folder_and_overrides_from_the_cwd(tmp_path, monkeypatch):
    from af3.training.config import config_from_dict

    run = tmp_path / "runs"
    (run / "data").mkdir(parents=True)
    (run / "data" / "a.jsonl").write_text("{}\n")
    (run / "plain.jsonl").write_text("{}\n")
    a, b = str(run / "data" / "a.jsonl"), str(run / "data" / "b.jsonl")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    def mixture_of(value, overrides=()):
        path = _yaml(run / "cfg.yaml", {"model": {"path": "ckpt"}, "data": {
            "mixture": value, "manifests": {"qa": "data/qa.jsonl"}}})
        return load_config(path, list(overrides)).data.mixture

    # Paths (existing or not) become absolute against the YAML's folder; names of data.manifests stay names,
    # and so do bare words (a misspelt name is reported as a name).
    assert mixture_of("2*data/a.jsonl+qa+0.5*data/b.jsonl") == f"2*{a}+qa+0.5*{b}"
    assert mixture_of("plain.jsonl") == str(run / "plain.jsonl")
    assert mixture_of("asr") == "asr"
    assert mixture_of({"data/a.jsonl": 2, "qa": 1}) == {a: 2, "qa": 1}
    assert mixture_of(["data/a.jsonl", [0.5, "qa"], {"path": "data/b.jsonl", "weight": 3}]) == \
        [a, [0.5, "qa"], {"path": b, "weight": 3}]
    # A KEY=VALUE override is typed in a shell: its paths are relative to the current directory.
    assert mixture_of("qa", ["data.mixture=1.5*x/c.jsonl+qa"]) == f"1.5*{elsewhere / 'x' / 'c.jsonl'}+qa"
    cfg = load_config(run / "cfg.yaml", ["data={mixture: d.jsonl}", "data.eval=dev.jsonl", "model.path=m", "output=o"])
    assert (cfg.data.eval, cfg.model.path, cfg.output) == tuple(str(elsewhere / n) for n in ("dev.jsonl", "m", "o"))
    assert cfg.data.mixture == str(elsewhere / "d.jsonl")

    # config_from_dict: relative to the current directory, or to `base`; the caller's dict is not changed.
    raw = {"model": {"path": "ckpt"}, "data": {"mixture": "data/a.jsonl", "eval": "d.jsonl"}}
    assert config_from_dict(raw).data.mixture == str(elsewhere / "data" / "a.jsonl")
    cfg = config_from_dict(raw, base=run)
    assert (cfg.data.mixture, cfg.model.path, cfg.output) == (a, str(run / "ckpt"), str(run / "output"))
    assert raw["data"]["mixture"] == "data/a.jsonl"
    # The saved config holds absolute paths: it loads back the same from anywhere.
    save_config(cfg, tmp_path / "saved.yaml")
    monkeypatch.chdir(tmp_path)
    assert load_config(tmp_path / "saved.yaml") == cfg


def test_a_run_with_relative_paths_trains_from_another_directory(tiny_ckpt, tmp_path, monkeypatch):
    from af3.training.trainer import run as run_training
    from train_helpers import write_manifest

    project = tmp_path / "project"
    write_manifest(project / "data", 2)
    _yaml(project / "run.yaml", {
        "model": {"path": os.path.relpath(tiny_ckpt[0], project)},
        "data": {"mixture": "1.0*data/train.jsonl", "num_workers": 0},
        "optim": {"lr": 1e-3}, "train": {"max_steps": 1, "batch_size": 2, "grad_accum": 1, "save_every": 0,
                                         "gradient_checkpointing": False}})
    monkeypatch.chdir(tmp_path)
    result = run_training(os.path.join("project", "run.yaml"))
    assert result["step"] == 1 and result["output"] == str(project / "output")
    assert os.path.isdir(project / "output" / "final")
