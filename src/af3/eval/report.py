"""The table ``af3 eval`` prints: one row per subset and one over all items, with 95% intervals."""

from __future__ import annotations

import math
from typing import Any


def _pct(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def _ci(interval: Any) -> str:
    if not interval or any(v is None or math.isnan(v) for v in interval):
        return "–"
    return f"{100 * interval[0]:.2f} – {100 * interval[1]:.2f}"


def rows(results: dict[str, Any]) -> list[list[str]]:
    """[subset, items, metric, score, 95% CI, unmatched, failed] per subset, then the overall row."""
    scores = results["scores"]
    out = []
    for name, s in [*scores["subsets"].items(), ("overall", scores["overall"])]:
        if len(scores["subsets"]) == 1 and name != "overall":
            continue
        if "wer" in s:
            out.append([name, str(s["items"]), "WER %", _pct(s["wer"]), _ci(s["wer_ci95"]), "", str(s["failed"])])
            out.append(["", "", "CER %", _pct(s["cer"]), _ci(s["cer_ci95"]), "", ""])
        if "accuracy" in s:
            out.append([name, str(s["items"]), "accuracy %", _pct(s["accuracy"]), _ci(s["accuracy_ci95"]),
                        str(s["unmatched"]), str(s["failed"])])
    return out


def print_table(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"af3 eval {results['task']} · {results['model']}", title_justify="left")
    for col, justify in (("subset", "left"), ("items", "right"), ("metric", "left"), ("score", "right"),
                         ("95% CI", "right"), ("unmatched", "right"), ("failed", "right")):
        table.add_column(col, justify=justify)
    for row in rows(results):
        table.add_row(*row)
    console = Console(width=max(100, Console().width))
    console.print(table)
    console.print(f"{results['answered']} of {results['items']} items answered in {results['seconds']:.1f} s; "
                  f"predictions in {results['predictions']}; data sha256 {results['data_sha256'][:12]}")
