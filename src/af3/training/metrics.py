"""What a run reports: ``metrics.jsonl`` (one row per step and per evaluation, trimmed back to the checkpoint on
resume), the progress display, token accuracy for evaluation, and ``training.png`` at the end."""

from __future__ import annotations

import json
import logging
import os
import sys
import time

from torch import Tensor

from ..config import IGNORE_INDEX

logger = logging.getLogger("af3")

METRICS = "metrics.jsonl"
EVAL_KEYS = ("eval_loss", "eval_token_accuracy")


def token_accuracy_counts(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(correct argmax predictions, label tokens) after the causal shift."""
    target = labels[:, 1:].to(logits.device)  # [B, T-1]
    keep = target != IGNORE_INDEX
    correct = (logits[:, :-1].argmax(-1) == target) & keep
    return correct.sum(), keep.sum()


class MetricsLog:
    """``output/metrics.jsonl``, written by rank 0 only."""

    def __init__(self, output: str, enabled: bool):
        self.output = output
        self.path = os.path.join(output, METRICS)
        self.enabled = enabled

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def trim(self, step: int) -> dict | None:
        """Drop rows after ``step`` (written by a run that died after its last checkpoint; all rows on a fresh
        start); returns the last eval row that is kept."""
        if not os.path.isfile(self.path):
            return None
        with open(self.path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        keep = [r for r in rows if r.get("step", 0) <= step] if step > 0 else []
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, self.path)
        evals = [r for r in keep if "eval_loss" in r]
        return evals[-1] if evals else None

    def plot(self) -> None:
        """``output/training.png`` (rank 0); a plot that fails only logs a warning."""
        if not self.enabled:
            return
        from .plot import plot_metrics

        try:
            plot_metrics(self.path, os.path.join(self.output, "training.png"))
        except Exception as e:  # a plot must never fail a finished run
            logger.warning("could not draw training.png: %s", e)


class Progress:
    """A rich progress bar on a terminal (rank 0), else a log line every ``log_every`` steps."""

    def __init__(self, enabled: bool, total: int, start: int, log_every: int):
        self.total, self.start, self.log_every = total, start, log_every
        self.t0 = time.monotonic()
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", tps="-")
            self.bar.start()
        self.enabled = enabled

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        step = row["step"]
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{row['loss']:.4f}", tps=f"{row['tokens_per_s']:.0f}")
            return
        if step % self.log_every == 0 or step == self.total:
            done = step - self.start
            eta = (time.monotonic() - self.t0) / max(1, done) * (self.total - step)
            logger.info("step %d/%d  loss %.4f  lr %.3g  grad_norm %.3g  %.0f tok/s  eta %s", step, self.total,
                        row["loss"], row["lr"], row["grad_norm"], row["tokens_per_s"], _hms(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
