"""``af3 info``, ``af3 download``, ``af3 caption`` and ``af3 bench`` on the embedded tiny model; the numbers that
``info`` prints are checked against the safetensors file read here independently."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import soundfile as sf
from nvidia_layout import make_nvidia_layout
from safetensors import safe_open

from af3.cli import bundled_clip, embedded_model_path
from af3.cli import main as cli_main
from af3.commands.tools import CAPTION_PROMPT
from af3.generation.engine import Engine, GenerationOptions
from af3.training import synthetic as S

TINY = str(embedded_model_path())


def independent_counts(folder: str) -> tuple[dict[str, int], dict[str, int]]:
    """(parameters per part, bytes per dtype) straight from the safetensors header, with safetensors' own reader."""
    parts, nbytes = {"audio_encoder": 0, "projector": 0, "language_model": 0}, {}
    prefix = {"audio_tower.": "audio_encoder", "multi_modal_projector.": "projector",
              "language_model.": "language_model"}
    with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (a safetensors handle is not a dict)
            t = f.get_slice(key)
            numel = int(np.prod(t.get_shape())) if t.get_shape() else 1
            parts[next(v for k, v in prefix.items() if key.startswith(k))] += numel
            size = {"F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
            name = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}[t.get_dtype()]
            nbytes[name] = nbytes.get(name, 0) + numel * size
    return parts, nbytes


def info_json(capsys, *args) -> dict:
    assert cli_main(["info", *args, "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_info_counts_what_the_weights_file_holds(capsys):
    d = info_json(capsys, "tiny")
    parts, nbytes = independent_counts(TINY)
    config = json.loads((embedded_model_path() / "config.json").read_text())
    text = config["text_config"]
    assert d["model"] == os.path.abspath(TINY) and d["layout"] == "hf"
    assert {k: d["parameters"][k] for k in parts} == parts and d["parameters"]["other"] == 0
    assert d["parameters"]["total"] == sum(parts.values())
    assert {k: v["bytes"] for k, v in d["dtypes"].items()} == nbytes
    assert d["checkpoint_bytes"] == sum(nbytes.values())
    assert d["run_dtype"] == "float32" and d["weights_bytes"] == 4 * sum(parts.values())
    kv = 2 * text["num_hidden_layers"] * text["num_key_value_heads"] * text["head_dim"] * 4
    assert d["kv_cache_bytes_per_token"] == kv
    seq = d["memory"]["seq_len"]
    assert seq == 20 * 750 + 512  # ten minutes of audio (20 windows of 750 tokens) and room for text
    assert d["memory"]["sequences_1_bytes"] == d["weights_bytes"] + seq * kv
    assert d["memory"]["sequences_8_bytes"] == d["weights_bytes"] + 8 * seq * kv
    assert d["think_adapter"] is None and d["context_tokens"] == text["max_position_embeddings"]
    assert d["max_audio_seconds"] == 600.0

    half = info_json(capsys, TINY, "--dtype", "bfloat16", "--seq-len", "1000")
    assert half["run_dtype"] == "bfloat16" and half["weights_bytes"] == 2 * sum(parts.values())
    assert half["memory"] == {"seq_len": 1000, "sequences_1_bytes": half["weights_bytes"] + 1000 * kv // 2,
                              "sequences_8_bytes": half["weights_bytes"] + 8000 * kv // 2}


def test_info_text_and_the_nvidia_layout(capsys, tmp_path):
    assert cli_main(["info", "tiny"]) == 0
    out = capsys.readouterr().out
    for label in ("model", "parameters", "dtype", "weights", "KV cache", "memory", "context", "audio", "think"):
        assert re.search(rf"^{label}\s", out, re.M), (label, out)
    assert "HF layout" in out and "no think adapter" in out and "600 s" in out

    nvidia = make_nvidia_layout(TINY, str(tmp_path / "nv"))
    d, hf = info_json(capsys, nvidia), info_json(capsys, TINY)
    assert d["layout"] == "nvidia" and d["parameters"] == hf["parameters"] and d["dtypes"] == hf["dtypes"]


def test_download_offline_is_one_line_and_exit_2(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "af3.cli", "download", "af3-tests/no-such-model"],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "HF_HUB_OFFLINE" in lines[0], proc.stderr
    assert proc.stdout == ""


def test_caption_batches_and_answers_as_the_engine_does(tmp_path, capsys):
    two = tmp_path / "two.wav"
    x, _ = S.beeps(2, 2.5, 600.0, np.random.default_rng(0))
    sf.write(two, (0.5 * x / np.abs(x).max()).astype(np.float32), S.SR)
    clips = [str(bundled_clip()), str(two)]
    assert cli_main(["caption", *clips, "--format", "json", "--max-new-tokens", "24"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [sorted(r) for r in rows] == [["audio", "caption"]] * 2 and [r["audio"] for r in rows] == clips

    engine = Engine.from_pretrained(TINY, max_batch_size=1)
    for row in rows:  # one at a time, directly: the same answers
        conv = [{"role": "user", "content": [{"type": "audio", "path": row["audio"]},
                                             {"type": "text", "text": CAPTION_PROMPT}]}]
        assert row["caption"] == engine.generate(conv, GenerationOptions(max_new_tokens=24, temperature=0.0)).text

    assert cli_main(["caption", *clips, "--max-new-tokens", "24", "--prompt", "How many beeps do you hear?"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{clips[0]}: There are three beeps." and lines[1].startswith(f"{clips[1]}: ")


def test_bench_prints_its_table(capsys):
    assert cli_main(["bench", "--tokens", "4", "--audio-s", "2"]) == 0
    out = capsys.readouterr().out
    assert "CPU: " in out and "torch " in out and "dtype float32" in out
    assert re.search(r"^time to first token \(2 s of audio, batch 1\)\s+[\d.]+ s$", out, re.M), out
    for batch in (1, 4):
        assert re.search(rf"^decode, batch {batch} \(4 tokens per request\)\s+([\d.]+ tok/s|n/a .*)$", out, re.M), out
    assert "benchmarks/README.md" in out
