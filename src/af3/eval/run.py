"""Running and scoring an evaluation: items through the Engine with :func:`af3.batch.run_items` into
``predictions.jsonl`` (each line scored as it is written, so a killed run resumes where it stopped), then the
summary per subset and overall into ``results.json``.

An output folder belongs to one evaluation: ``run.json`` records the model, task, data hash and options, and a
second run with other settings into the same folder is refused instead of mixing two evaluations' predictions.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..batch import BatchItem, ResultsFile, run_items
from ..errors import InputError
from ..files import write_atomic
from . import metrics as M
from .synthetic import score_synthetic

PREDICTIONS = "predictions.jsonl"
RESULTS = "results.json"
RUN = "run.json"


def data_hash(items: Sequence[BatchItem]) -> str:
    """SHA-256 of what the task read: ids, conversations (audio paths; in-memory audio by its bytes) and answers."""
    h = hashlib.sha256()
    for it in items:
        for m in it.messages:
            parts = m["content"] if isinstance(m["content"], list) else [m["content"]]
            for part in parts:
                shown = part
                if isinstance(part, dict) and isinstance(part.get("audio"), np.ndarray):
                    h.update(np.ascontiguousarray(part["audio"]).tobytes())
                    shown = {k: v for k, v in part.items() if k != "audio"}
                h.update(json.dumps(shown, sort_keys=True, default=str).encode())
        h.update(json.dumps([it.id, it.extra.get("answer"), it.extra.get("choices")], default=str).encode())
    return h.hexdigest()


def score(item: BatchItem, record: dict) -> dict:
    """The record with its item's score fields (kind-specific) and the reference."""
    extra, text = item.extra, record.get("text") or ""
    out = {**record, "subset": extra["subset"], "kind": extra["kind"], "reference": extra["answer"]}
    if record.get("error") is not None:
        return out
    if extra["kind"] == "mcq":
        choice, rule = M.match_choice(text, extra["choices"])
        truth = M.answer_index(extra["answer"], extra["choices"])
        out.update(choice=choice, rule=rule, correct=choice is not None and choice == truth)
    elif extra["kind"] == "asr":
        out.update(M.edit_counts(extra["answer"], text))
    elif extra["kind"] == "synthetic":
        out.update(score_synthetic(extra, text))
    else:
        answer = extra["answer"]
        if extra.get("labels"):
            ok = M.names_only(text, answer, extra["labels"])
        else:
            ok = M.exact_match(text, answer) if extra.get("match") == "exact" else M.contains(text, answer)
        out.update(correct=ok)
    return out


def _group(records: list[dict]) -> dict[str, Any]:
    answered = [r for r in records if r.get("error") is None]
    out: dict[str, Any] = {"items": len(records), "failed": len(records) - len(answered)}
    asr = [r for r in answered if r.get("kind") == "asr"]
    acc = [r for r in answered if r.get("kind") != "asr"]
    if asr:
        out["wer"] = M.corpus_rate(asr, "word_errors", "ref_words")
        out["wer_ci95"] = M.bootstrap_interval(asr, "word_errors", "ref_words")
        out["cer"] = M.corpus_rate(asr, "char_errors", "ref_chars")
        out["cer_ci95"] = M.bootstrap_interval(asr, "char_errors", "ref_chars")
    if acc:
        correct = sum(bool(r.get("correct")) for r in acc)
        out["accuracy"] = correct / len(acc)
        out["accuracy_ci95"] = M.wilson_interval(correct, len(acc))
        out["correct"] = correct
        out["unmatched"] = sum(r.get("rule") == "unmatched" for r in acc)
        rules: dict[str, int] = {}
        for r in acc:
            if r.get("rule"):
                rules[r["rule"]] = rules.get(r["rule"], 0) + 1
        if rules:
            out["rules"] = rules
    return out


def summarize(records: list[dict], order: Sequence[str] = ()) -> dict[str, Any]:
    """Scores per subset (in ``order``, then any others) and over every item."""
    names = list(dict.fromkeys([*order, *(r.get("subset", "all") for r in records)]))
    subsets = {n: _group([r for r in records if r.get("subset", "all") == n]) for n in names}
    return {"subsets": {n: s for n, s in subsets.items() if s["items"]}, "overall": _group(records)}


def _check_folder(folder: str, settings: dict) -> None:
    path = os.path.join(folder, RUN)
    if not os.path.exists(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
    except (OSError, ValueError):
        raise InputError(f"{path} is damaged; use another --output-dir") from None
    changed = [k for k in ("model", "task", "data_sha256", "options") if before.get(k) != settings.get(k)]
    if changed:
        raise InputError(f"{folder} holds an evaluation with other settings ({', '.join(changed)} differ); use "
                         "another --output-dir")


def evaluate(engine: Any, task: str, items: list[BatchItem], output_dir: str, options: Any, *, model: str,
             data: str | None, progress: bool | None = None, all_items: Sequence[BatchItem] | None = None
             ) -> dict[str, Any]:
    """Run (or resume) ``items`` into ``output_dir`` and write/return the results (see the module docstring).
    ``all_items``: every item of the data when ``items`` is a part of it (``--limit``): the data hash is theirs, so
    that a larger limit resumes the same evaluation."""
    all_items = items if all_items is None else all_items
    from .. import __version__

    os.makedirs(output_dir, exist_ok=True)
    option_fields = {k: v for k, v in vars(options).items() if k in (
        "max_new_tokens", "temperature", "top_p", "top_k", "do_sample", "seed", "think", "repetition_penalty")}
    settings = {"model": model, "task": task, "data": data, "data_sha256": data_hash(all_items),
                "options": option_fields}
    _check_folder(output_dir, settings)
    write_atomic(os.path.join(output_dir, RUN), json.dumps(settings, indent=2, default=str).encode())
    by_id = {it.id: it for it in items}
    started = time.time()
    with ResultsFile(os.path.join(output_dir, PREDICTIONS), resume=True) as results:
        stats = run_items(engine, items, results, options, progress=progress, score=score,
                          strip_prefix=lambda item: item.extra["kind"] == "asr")  # transcripts without AF3's framing
        # Scored again from their text: a record written by an older scorer (or by hand) counts as today's rules say.
        records = [score(by_id[r["id"]], r) for r in results.done.values() if r["id"] in by_id]
    records.sort(key=lambda r: by_id[r["id"]].index)
    summary = summarize(records, order=[it.extra["subset"] for it in items])
    out = {"af3_version": __version__, **settings, "items": len(items), "items_in_data": len(all_items),
           "answered": len(records), "scores": summary, "predictions": PREDICTIONS,
           "seconds": round(time.time() - started, 3), "items_per_s": round(stats.items_per_s, 4),
           "interrupted": stats.interrupted, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    write_atomic(os.path.join(output_dir, RESULTS), json.dumps(out, indent=2, default=str).encode())
    return out


__all__ = ["evaluate", "score", "summarize"]
