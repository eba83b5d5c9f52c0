"""The embedded tiny model, end to end: synthetic data → fresh tiny AF3 → ``af3 train`` → task accuracy → model card.

``af3 train tiny [--out runs/tiny] [--install]`` runs it (``recipes/tiny.yaml`` holds the training settings);
``--install`` copies the result into ``af3/assets/tiny/`` where ``make demo`` and the tests find it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import synthetic as S

logger = logging.getLogger("af3")

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "tiny.yaml"
ASSET_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny"

# Clips per task in the training set (each is seen about ``epochs`` times) and in the held-out eval manifest.
TRAIN_COUNTS = {"count": 4000, "pitch": 400, "noise": 400, "long_count": 400, "multi_turn": 1500}
EVAL_COUNTS = {task: 12 for task in S.TASKS}
# Pitch bands of the training beeps. A high tone (1500-4000 Hz) lights only ~4 of the 128 mel bins, where mel bins
# are wide, while any low or medium tone lights most of its band's 12-19 bins; so each high example trains only the
# encoder weights near its own frequency, and with uniform bands the model learned to count low and medium beeps
# (>= 90%) but stayed near chance on high ones. Half the training beeps are high (two thirds was worse: count 0.66
# against 0.74); held-out clips stay uniform.
BEEP_BANDS = {"low": 1.0, "medium": 1.0, "high": 2.0}
ACCURACY_CLIPS = 100  # freshly generated clips per task for the model card
GOALS = {"count": 0.95, "pitch": 0.95, "noise": 0.95, "long_count": 0.85, "multi_turn": 0.90}


def task_corpus() -> list[str]:
    """Every question and answer the tasks use, plus the default prompts: the tiny tokenizer's training text."""
    corpus = list(S.COUNT_QUESTIONS + S.PITCH_QUESTIONS + S.BEEP_PITCH_QUESTIONS + S.NOISE_QUESTIONS)
    corpus += [S.count_answer(n) for n in range(1, 6)]
    corpus += [S.pitch_answer(b, beeps) for b in S.PITCH_BANDS for beeps in (False, True)]
    corpus += [S.noise_answer(k) for k in S.NOISE_KINDS]
    corpus += ["You are a helpful assistant.", "Transcribe the input speech."]
    return corpus


def build_init(folder: str | os.PathLike, seed: int = 0, audio_width: int = 64, audio_heads: int = 2,
               text_width: int = 128, layers: int = 2, text_layers: int = 4, vocab_size: int = 320) -> str:
    """A randomly initialised tiny AF3 (HF layout, with tokenizer and processor files) to train from."""
    from ..config import GenerationConfig
    from ..model import AF3Model
    from ..tiny import tiny_config, train_tokenizer, write_tokenizer_files

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tok = train_tokenizer(task_corpus(), vocab_size=vocab_size)
    config = tiny_config(tok.get_vocab_size(), audio_width, layers)
    config.audio_config.num_attention_heads = audio_heads
    text = config.text_config
    text.hidden_size, text.intermediate_size, text.head_dim = text_width, 2 * text_width, text_width // 4
    text.num_hidden_layers = text_layers  # counting needs depth: 2 decoder layers stayed at chance, 4 learn it
    torch.manual_seed(seed)
    gen = GenerationConfig(bos_token_id=0, eos_token_id=2, pad_token_id=0, max_new_tokens=32)
    AF3Model(config, gen).save_pretrained(folder)
    write_tokenizer_files(folder, tok)
    return folder


@torch.inference_mode()
def task_accuracy(model, processor, tasks: Sequence[str] = S.TASKS, n: int = ACCURACY_CLIPS, seed: int = 12345,
                  batch_size: int = 16, by_band: dict[str, dict[str, float]] | None = None) -> dict[str, float]:
    """Greedy answers to ``n`` freshly generated clips per task, scored by the label they name.

    For ``multi_turn`` the score is the second turn's (the pitch of the beeps, asked after the count turn with
    the reference count answer in the history). ``by_band``, if given, is filled with the accuracy per pitch band
    of the beeps (``{"count": {"low": 0.9, ...}, ...}``) for the beep tasks."""
    rng = np.random.default_rng(seed)
    scores: dict[str, float] = {}
    for task in tasks:
        turn = 1 if task == "multi_turn" else 0
        samples = [S.make_sample(task, rng) for _ in range(n)]
        hits: list[bool] = []
        for i in range(0, n, batch_size):
            chunk = samples[i:i + batch_size]
            prompts = [S.fill_audio(s.messages, {"type": "audio", "audio": s.audio})[: 1 + 2 * turn] for s in chunk]
            inputs = processor.apply_chat_template(prompts, tokenize=True, add_generation_prompt=True,
                                                   return_dict=True).to(model.device, dtype=model.dtype)
            ids = model.generate(**inputs, max_new_tokens=12, do_sample=False)
            texts = processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            hits += [S.parse_answer(task, t, turn) == S.expected_label(task, s.label, turn)
                     for t, s in zip(texts, chunk, strict=True)]
        scores[task] = sum(hits) / n
        if by_band is not None and task in S.BEEP_TASKS:
            bands = [s.label["pitch"] for s in samples]
            by_band[task] = {b: float(np.mean([h for h, x in zip(hits, bands, strict=True) if x == b]))
                             for b in S.PITCH_BANDS if b in bands}
    return scores


def model_card(scores: dict[str, float], info: dict[str, Any]) -> str:
    rows = "\n".join(f"| {t} | {scores[t]:.1%} | ≥ {GOALS[t]:.0%} |" for t in S.TASKS)
    unmet = [t for t in S.TASKS if scores[t] < GOALS[t]]
    summary = f"Goals not met: {', '.join(unmet)}." if unmet else "Every goal is met."
    by_band = info.get("by_band") or {}
    if by_band:
        cells = {t: " | ".join(f"{by_band[t].get(b, float('nan')):.0%}" for b in S.PITCH_BANDS) for t in by_band}
        summary += f""" The same clips, split by the pitch band of the beeps (low 100–250 Hz, medium 400–800 Hz, high
1500–4000 Hz; the band is drawn uniformly, so each cell holds about a third of the clips):

| task | {' | '.join(S.PITCH_BANDS)} |
|---|{'---|' * len(S.PITCH_BANDS)}
""" + "\n".join(f"| {t} | {cells[t]} |" for t in by_band)
    counts = ", ".join(f"{k} {v}" for k, v in info["train_counts"].items())
    return f"""# af3 tiny (embedded model)

A {info['params'] / 1e6:.2f} M-parameter model with the **Audio Flamingo 3 architecture** (Whisper-style encoder
with 128 mel bins and 30 s windows, 2-layer projector, Qwen2 decoder; same module names, chat template, `<sound>`
token and HF layout as `nvidia/audio-flamingo-3-hf`) trained from scratch by af3's own pipeline on synthetic audio.
It exists so that everything in af3 runs offline: `make demo`, the test suite, tutorials. It knows five tasks and
nothing else.

| task | held-out accuracy ({info['accuracy_clips']} fresh clips each) | goal |
|---|---|---|
{rows}

{summary}

Tasks: counting 1–5 beeps (1.5–8 s clips), tone pitch (low/medium/high), noise colour (white/pink/brown),
counting beeps spread over 35–75 s (2–3 windows: proves windows are stitched in order), and a two-turn
conversation (count, then the pitch of the beeps; the second turn is scored).

## Recipe
- Command: `af3 train tiny --out runs/tiny` (settings in `recipes/tiny.yaml`), on {info['machine']}.
- Data: {counts} synthetic clips (`af3.training.synthetic`, seed {info['seed']}), questions with varied wording;
  training beeps are drawn from the pitch bands with weights {info['beep_bands']} (high tones light few mel bins,
  so they need more examples); held-out clips use uniform bands.
- Model: encoder width {info['audio_width']} ({info['audio_layers']} layers, {info['audio_heads']} heads), decoder
  width {info['text_width']} ({info['layers']} layers), byte-level BPE vocabulary of {info['vocab']} with AF3's
  special tokens.
- Training: stage `stage3` (everything trains), {info['steps']} steps of batch {info['batch_size']}, AdamW
  lr {info['lr']} (per part: {info['part_lr'] or 'none'}), cosine schedule with warm-up, assistant-only loss.
- Wall time: data {info['data_seconds']:.0f} s, training {info['train_seconds']:.0f} s, evaluation
  {info['eval_seconds']:.0f} s; total {info['total_seconds'] / 60:.1f} min.
"""


def run_recipe(out: str | os.PathLike = "runs/tiny", recipe: str | os.PathLike | None = None,
               overrides: Sequence[str] = (), install: bool = False, seed: int = 0,
               train_counts: dict[str, int] | None = None, accuracy_clips: int = ACCURACY_CLIPS) -> dict[str, Any]:
    """Generate data, build the initial checkpoint, train, score, write the model card (and install).

    ``train_counts`` and ``accuracy_clips`` shrink the run for tests."""
    train_counts = train_counts or TRAIN_COUNTS
    from ..model import AF3Model
    from ..processor import AF3Processor
    from .config import load_config
    from .trainer import train

    out = Path(out).resolve()
    t0 = time.time()
    data_dir = out / "data"
    if not (data_dir / "done").is_file():
        train_manifests = S.write_dataset(data_dir / "train", train_counts, seed=seed, beep_bands=BEEP_BANDS)
        eval_manifests = S.write_dataset(data_dir / "eval", EVAL_COUNTS, seed=seed + 1)
        with open(data_dir / "eval.jsonl", "w", encoding="utf-8") as f:
            for path in eval_manifests.values():
                f.write(Path(path).read_text(encoding="utf-8").replace('"path": "audio/', '"path": "eval/audio/'))
        (data_dir / "done").write_text(json.dumps(train_manifests))
    t_data = time.time()
    init = out / "init"
    if not (init / "config.json").is_file():
        build_init(init, seed=seed)
    mixture = "+".join(str(data_dir / "train" / f"{task}.jsonl") for task in train_counts)
    fixed = [f"model.path={init}", f"data.mixture={mixture}", f"data.eval={data_dir / 'eval.jsonl'}",
             f"output={out / 'train'}"]
    cfg = load_config(recipe or RECIPE, [*fixed, *overrides])
    t_train0 = time.time()
    metrics = train(cfg)
    t_train = time.time()
    final = out / "train" / "final"
    model, processor = AF3Model.from_pretrained(final), AF3Processor.from_pretrained(final)
    by_band: dict[str, dict[str, float]] = {}
    scores = task_accuracy(model, processor, n=accuracy_clips, by_band=by_band)
    t_eval = time.time()
    text = model.config.text_config
    info = {
        "params": sum(p.numel() for p in model.parameters()), "accuracy_clips": accuracy_clips, "seed": seed,
        "audio_width": model.config.audio_config.hidden_size,
        "audio_layers": model.config.audio_config.num_hidden_layers,
        "audio_heads": model.config.audio_config.num_attention_heads,
        "train_counts": train_counts, "beep_bands": BEEP_BANDS, "by_band": by_band,
        "text_width": text.hidden_size, "layers": text.num_hidden_layers, "vocab": text.vocab_size,
        "steps": metrics.get("step"), "batch_size": cfg.train.batch_size, "lr": cfg.optim.lr,
        "part_lr": dict(cfg.optim.part_lr),
        "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
        "data_seconds": t_data - t0, "train_seconds": t_train - t_train0, "eval_seconds": t_eval - t_train,
        "total_seconds": t_eval - t0,
    }
    (final / "README.md").write_text(model_card(scores, info), encoding="utf-8")
    (final / "eval_results.json").write_text(json.dumps({"accuracy": scores, **info}, indent=2), encoding="utf-8")
    logger.info("tiny model accuracy: %s", scores)
    if install:
        install_asset(final)
    return {"accuracy": scores, **info}


def install_asset(final: str | os.PathLike, dest: str | os.PathLike = ASSET_DIR) -> None:
    """Copy a trained tiny checkpoint (weights in fp32 safetensors, tokenizer, template, card) into the package."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final, tmp, ignore=shutil.ignore_patterns("adapter", "*.pt"))
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
