"""``training.png`` from ``metrics.jsonl``: training loss (and eval loss) and eval token accuracy vs step.

Uses matplotlib's object API with the Agg canvas directly, so no global backend is switched and no display is needed.
"""

from __future__ import annotations

import json
import logging
import os

logger = logging.getLogger("af3")


def read_metrics(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(training rows, eval rows) of a metrics JSONL file; unreadable lines are ignored."""
    train, evals = [], []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "eval_loss" in row:
                evals.append(row)
            elif "loss" in row and row.get("loss") is not None:
                train.append(row)
    return train, evals


def plot_metrics(metrics_path: str | os.PathLike, out_path: str | os.PathLike | None = None) -> str:
    """Draw the loss curves (left) and eval token accuracy, or the learning rate without eval rows (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics_path = os.fspath(metrics_path)
    out = os.fspath(out_path) if out_path is not None else os.path.join(os.path.dirname(metrics_path),
                                                                         "training.png")
    train, evals = read_metrics(metrics_path)
    fig = Figure(figsize=(11, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_right = fig.subplots(1, 2)
    if train:
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], lw=1, label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("cross entropy / token")
    ax_loss.grid(alpha=0.3)
    if train or evals:
        ax_loss.legend()
    if evals:
        ax_right.plot([r["step"] for r in evals], [r["eval_token_accuracy"] for r in evals], "o-", color="C2")
        ax_right.set_ylabel("eval token accuracy")
        ax_right.set_ylim(0, 1)
    elif train and "lr" in train[0]:
        ax_right.plot([r["step"] for r in train], [r["lr"] for r in train], color="C1")
        ax_right.set_ylabel("learning rate")
    ax_right.set_xlabel("step")
    ax_right.grid(alpha=0.3)
    fig.tight_layout()
    tmp = f"{out}.tmp-{os.getpid()}.png"
    fig.savefig(tmp)
    os.replace(tmp, out)
    return out
