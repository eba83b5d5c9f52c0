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

# Clips per task in the training set (each is seen about ``epochs`` times) and in the held-out eval manifest. A
# long-count clip costs about as much training time as a whole batch of short ones; 150 or 300 of them gave the
# same long-count accuracy (0.70-0.73) in 800-900 steps, so the recipe keeps 150.
TRAIN_COUNTS = {"count": 3000, "pitch": 300, "noise": 300, "long_count": 150, "multi_turn": 1000}
EVAL_COUNTS = {task: 12 for task in S.TASKS}
# Pitch bands of the training beeps (also in the encoder warm-up). A high tone (1500-4000 Hz) lights only ~5 of the
# 128 mel bins, where mel bins are wide, while a low or medium tone lights 9-17; high beeps are the hardest to learn,
# so half the training beeps are high. Held-out clips stay uniform.
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


# Encoder warm-up, before the curriculum. AF3's encoder starts pre-trained (AF-Whisper); the tiny one starts random.
# Trained only through the decoder's answers, it learned to respond to low and medium tones but never to high ones
# (1500-4000 Hz; every recipe variant left high beeps near chance on count), although their log-mel bins stand out
# clearly. Naming the sound of every 40 ms frame directly (background, a tone of each band, a noise colour) with a
# linear head, which is then dropped, teaches it all bands in ~100 steps of short clips (~1 min on 2 cores). A
# second head marks the frames where a sound starts: counting beeps of random length is counting onsets.
ENCODER_WARMUP = {"steps": 100, "batch_size": 32, "lr": 3.0e-3, "eval_clips": 128}
WARMUP_TASKS = {"count": 0.6, "pitch": 0.2, "noise": 0.2}  # short clips; long-count windows are mostly background
# Background frames are most frames and onsets are few; these weights keep the rare targets from being ignored.
BACKGROUND_WEIGHT = 0.2
ONSET_WEIGHT = 10.0


def _frame_batch(rng: np.random.Generator, n: int, feature_config) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """``n`` fresh warm-up clips → (their features, class per encoder output frame [n, frames] with -100 for
    padding, onset per frame [n, frames] with -1 for padding)."""
    from ..features import conv_output_lengths, extract_features

    tasks, p = list(WARMUP_TASKS), np.array(list(WARMUP_TASKS.values()))
    samples = [S.make_sample(str(rng.choice(tasks, p=p / p.sum())), rng, beep_bands=BEEP_BANDS) for _ in range(n)]
    feats = extract_features([s.audio for s in samples], feature_config, max_audio_len=feature_config.chunk_length)
    valid = conv_output_lengths(feats.input_features_mask.sum(-1).long())[1].tolist()
    frames = int(conv_output_lengths(feats.input_features.shape[-1])[1])  # encoder output frames of a window
    frame_seconds = feature_config.chunk_length / frames
    classes = torch.full((n, frames), -100, dtype=torch.long)
    onsets = torch.full((n, frames), -1.0)
    for i, s in enumerate(samples):
        c, o = S.frame_labels(s.label, valid[i], frame_seconds)
        classes[i, : valid[i]], onsets[i, : valid[i]] = torch.from_numpy(c), torch.from_numpy(o)
    return feats, classes, onsets


def pretrain_encoder(folder: str | os.PathLike, steps: int = ENCODER_WARMUP["steps"],
                     batch_size: int = ENCODER_WARMUP["batch_size"], lr: float = ENCODER_WARMUP["lr"],
                     eval_clips: int = ENCODER_WARMUP["eval_clips"], seed: int = 0) -> dict[str, Any]:
    """Train the audio encoder of the checkpoint in ``folder`` to classify each output frame's sound
    (``S.FRAME_CLASSES``) and to find sound onsets, on freshly generated clips, and save it back.

    Returns the settings and held-out scores: recall per frame class, onset recall and precision."""
    from ..model import AF3Model
    from ..processor import AF3Processor

    t0 = time.time()
    model = AF3Model.from_pretrained(folder)
    feature_config = AF3Processor.from_pretrained(folder).feature_config
    encoder = model.audio_tower.train()
    torch.manual_seed(seed)
    head = torch.nn.Linear(encoder.config.hidden_size, len(S.FRAME_CLASSES) + 1)  # classes, then onset
    params = [p for p in [*encoder.parameters(), *head.parameters()] if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    weight = torch.ones(len(S.FRAME_CLASSES))
    weight[0] = BACKGROUND_WEIGHT
    warm = max(1, steps // 10)
    rng = np.random.default_rng([seed, 1])

    def predict(feats: Any, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = head(encoder(feats.input_features, feats.input_features_mask)[:, :frames])
        return out[..., :-1], out[..., -1]

    for step in range(1, steps + 1):
        feats, classes, onsets = _frame_batch(rng, batch_size, feature_config)
        scale = min(1.0, step / warm) * (0.1 + 0.45 * (1 + np.cos(np.pi * step / steps)))  # warm-up, cosine to 0.1
        for group in opt.param_groups:
            group["lr"] = lr * scale
        class_logits, onset_logits = predict(feats, classes.shape[1])
        keep = onsets >= 0
        loss = torch.nn.functional.cross_entropy(class_logits.flatten(0, 1), classes.flatten(), weight=weight)
        loss = loss + torch.nn.functional.binary_cross_entropy_with_logits(
            onset_logits[keep], onsets[keep], pos_weight=torch.tensor(ONSET_WEIGHT))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 25 == 0 or step == steps:
            logger.info("encoder warm-up step %d/%d loss %.4f", step, steps, loss.item())
    encoder.eval()
    hits, total = torch.zeros(len(S.FRAME_CLASSES)), torch.zeros(len(S.FRAME_CLASSES))
    onset_hits = onset_true = onset_pred = 0
    eval_rng = np.random.default_rng([seed, 2])
    with torch.inference_mode():
        for start in range(0, eval_clips, batch_size):
            feats, classes, onsets = _frame_batch(eval_rng, min(batch_size, eval_clips - start), feature_config)
            class_logits, onset_logits = predict(feats, classes.shape[1])
            keep = onsets >= 0
            truth, pred = classes[keep], class_logits.argmax(-1)[keep]
            total += torch.bincount(truth, minlength=len(S.FRAME_CLASSES))
            hits += torch.bincount(truth[pred == truth], minlength=len(S.FRAME_CLASSES))
            is_onset, said = onsets[keep] > 0, onset_logits[keep] > 0
            onset_hits += int((is_onset & said).sum())
            onset_true, onset_pred = onset_true + int(is_onset.sum()), onset_pred + int(said.sum())
    model.save_pretrained(folder)
    recall = {c: round(float(h / max(t, 1)), 4) for c, h, t in zip(S.FRAME_CLASSES, hits, total, strict=True)}
    return {"steps": steps, "batch_size": batch_size, "lr": lr, "seconds": round(time.time() - t0, 1),
            "frame_recall": recall, "onset_recall": round(onset_hits / max(onset_true, 1), 4),
            "onset_precision": round(onset_hits / max(onset_pred, 1), 4)}


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


def _warmup_line(warmup: dict[str, Any]) -> str:
    recall = ", ".join(f"{c} {r:.1%}" for c, r in warmup["frame_recall"].items())
    return (f"{warmup['steps']} steps of {warmup['batch_size']} fresh short clips (count, pitch and noise), lr "
            f"{warmup['lr']}: the encoder alone, with a linear head that is then dropped, names the sound of every "
            f"40 ms frame ({', '.join(S.FRAME_CLASSES)}) and marks the frames where a sound starts; held-out frame "
            f"recall: {recall}; onsets: recall {warmup['onset_recall']:.1%}, precision "
            f"{warmup['onset_precision']:.1%}.")


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
- Encoder warm-up: {_warmup_line(info["encoder_warmup"])}
- Training: stage `stage3` (everything trains), {info['steps']} steps of batch {info['batch_size']}, AdamW
  lr {info['lr']} (per part: {info['part_lr'] or 'none'}), cosine schedule with warm-up, assistant-only loss.
- Wall time: data {info['data_seconds']:.0f} s, encoder warm-up {info['warmup_seconds']:.0f} s, training
  {info['train_seconds']:.0f} s, evaluation {info['eval_seconds']:.0f} s; total {info['total_seconds'] / 60:.1f} min.
"""


def run_recipe(out: str | os.PathLike = "runs/tiny", recipe: str | os.PathLike | None = None,
               overrides: Sequence[str] = (), install: bool = False, seed: int = 0,
               train_counts: dict[str, int] | None = None, accuracy_clips: int = ACCURACY_CLIPS,
               encoder_warmup: dict[str, Any] | None = None) -> dict[str, Any]:
    """Generate data, build the initial checkpoint, warm up its encoder, train, score, write the model card (and
    install).

    ``train_counts``, ``accuracy_clips`` and ``encoder_warmup`` (``pretrain_encoder`` settings) shrink the run
    for tests."""
    train_counts = train_counts or TRAIN_COUNTS
    from ..model import AF3Model
    from ..processor import AF3Processor
    from ..system import cpu_description
    from .config import load_config
    from .trainer import train

    out = Path(out).resolve()
    t0 = time.time()
    data_dir = out / "data"
    if not (data_dir / "done").is_file():
        logger.info("writing %d training and %d held-out clips to %s", sum(train_counts.values()),
                    sum(EVAL_COUNTS.values()), data_dir)
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
    warmup_file = init / "encoder_warmup.json"  # written once the warm-up is saved into init
    if not warmup_file.is_file():
        logger.info("encoder warm-up (frame classes on fresh short clips)")
        warmup_file.write_text(json.dumps(pretrain_encoder(init, seed=seed, **(encoder_warmup or {}))))
    warmup = json.loads(warmup_file.read_text())
    t_warm = time.time()
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
        "machine": cpu_description(),
        "encoder_warmup": warmup,
        "data_seconds": t_data - t0, "warmup_seconds": t_warm - t_data, "train_seconds": t_train - t_train0,
        "eval_seconds": t_eval - t_train,
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
