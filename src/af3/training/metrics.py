"""What a run reports: ``metrics.jsonl`` (one row per step and per evaluation, trimmed back to the checkpoint on
resume), the progress display, token accuracy for evaluation, and ``training.png`` at the end.

Every row is strict JSON: a value that is not a finite number (a step without supervised tokens has no loss) is
written as ``null``, never as ``NaN``/``Infinity`` (:func:`json_safe`)."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Any

from torch import Tensor

from ..config import IGNORE_INDEX
from ..files import write_atomic

logger = logging.getLogger("af3")

METRICS = "metrics.jsonl"
EVAL_KEYS = ("eval_loss", "eval_token_accuracy")


def json_safe(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None, through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def dumps(row: Any) -> str:
    """One line of strict JSON (no NaN/Infinity tokens)."""
    return json.dumps(json_safe(row), allow_nan=False)


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
            f.write(dumps(row) + "\n")

    def flush(self) -> None:
        """Put the rows written so far on disk (before a checkpoint, so a power loss never keeps a checkpoint
        whose metrics rows are gone)."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        with open(self.path, "rb+") as f:
            os.fsync(f.fileno())

    def trim(self, step: int) -> dict | None:
        """Drop rows after ``step`` (written by a run that died after its last checkpoint; all rows on a fresh
        start) and lines a crash cut short; returns the last eval row that is kept."""
        if not os.path.isfile(self.path):
            return None
        rows, bad = [], 0
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for line in f:
                try:
                    row = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    row, bad = None, bad + 1
                if isinstance(row, dict):
                    rows.append(row)
        if bad:
            logger.warning("%s: dropped %d unreadable line(s) (a crash cut them short)", self.path, bad)
        keep = [r for r in rows if isinstance(r.get("step", 0), int) and r.get("step", 0) <= step] if step > 0 else []
        write_atomic(self.path, "".join(dumps(r) + "\n" for r in keep).encode("utf-8"))
        evals = [r for r in keep if isinstance(r.get("eval_loss"), (int, float))]
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
            self.bar.update(self.task, completed=step, loss=_number(row["loss"], ".4f"),
                            tps=f"{row['tokens_per_s']:.0f}")
            return
        if step % self.log_every == 0 or step == self.total:
            done = step - self.start
            eta = (time.monotonic() - self.t0) / max(1, done) * (self.total - step)
            logger.info("step %d/%d  loss %s  lr %.3g  grad_norm %.3g  %.0f tok/s  eta %s", step, self.total,
                        _number(row["loss"], ".4f"), row["lr"], row["grad_norm"], row["tokens_per_s"], _hms(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"
