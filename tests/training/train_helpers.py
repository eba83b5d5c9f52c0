"""Small training fixtures: wav clips, JSONL manifests, YAML run configs, subprocess runs, weight comparison."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import yaml

ANSWERS = ["There are three beeps.", "The tone is high.", "This is pink noise.", "There is one beep.",
           "The tone is low.", "There are two beeps.", "This is white noise.", "The tone is medium."]


def write_clip(path: str, seconds: float, freq: float, seed: int = 0) -> str:
    import soundfile as sf

    rng = np.random.default_rng(seed)
    n = int(16000 * seconds)
    t = np.arange(n) / 16000
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.02 * rng.standard_normal(n)
    sf.write(path, x.astype(np.float32), 16000)
    return path


def write_manifest(folder, n: int, name: str = "train.jsonl", text_only: tuple[int, ...] = (),
                   broken: tuple[int, ...] = (), missing: tuple[int, ...] = (), seconds=(1.0, 1.5, 2.0)) -> str:
    """``n`` conversations (user: audio + question, assistant: a short answer) with clips next to the manifest;
    rows in ``text_only`` have no audio, ``broken`` ones point at a corrupt file, ``missing`` at no file."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for i in range(n):
        clip = f"{os.path.splitext(name)[0]}_{i}.wav"
        if i in broken:
            with open(os.path.join(folder, clip), "wb") as f:
                f.write(b"RIFF\x00\x00\x00\x00WAVEgarbage" * 3)
        elif i not in missing and i not in text_only:
            write_clip(os.path.join(folder, clip), seconds[i % len(seconds)], 300 + 150 * i, seed=i)
        question = {"type": "text", "text": "How many beeps do you hear?" if i % 2 else "What is this sound?"}
        content = [question] if i in text_only else [{"type": "audio", "path": clip}, question]
        rows.append({"messages": [{"role": "user", "content": content},
                                  {"role": "assistant", "content": ANSWERS[i % len(ANSWERS)]}]})
    path = os.path.join(folder, name)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return path


def base_config(ckpt: str, manifest: str, output: str, **sections) -> dict:
    """A small run: stage3, no gradient checkpointing, no workers, no warm-up; ``sections`` update it."""
    cfg = {
        "model": {"path": ckpt},
        "stage": "stage3",
        "data": {"mixture": manifest, "num_workers": 0},
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {"max_steps": 2, "batch_size": 2, "grad_accum": 1, "save_every": 0, "log_every": 1,
                  "gradient_checkpointing": False},
        "output": output,
    }
    for key, value in sections.items():
        if isinstance(value, dict):
            cfg.setdefault(key, {}).update(value)
        else:
            cfg[key] = value
    return cfg


def write_config(path: str, cfg: dict) -> str:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg, f)
    return path


def make_config(cfg: dict):
    from af3.training.config import config_from_dict

    return config_from_dict(json.loads(json.dumps(cfg)))


def read_metrics(output: str) -> tuple[list[dict], list[dict]]:
    with open(os.path.join(output, "metrics.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def tensors(folder: str) -> dict:
    from af3.model.weights import iter_checkpoint_tensors

    return {k: v.clone() for k, v in iter_checkpoint_tensors(folder)}


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def subprocess_env() -> dict:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def trainer_cmd(config: str, *args: str, nproc: int = 1) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "af3.training.trainer", config, *args]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "af3.training.trainer", config, *args]


def run_trainer(config: str, *args: str, nproc: int = 1, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(trainer_cmd(config, *args, nproc=nproc), check=False, capture_output=True,
                          text=True, timeout=timeout, env=subprocess_env())
    assert proc.returncode == 0, f"trainer failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc
