"""Evaluation tasks: readers for the published benchmark files, each turning its format into
:class:`~af3.batch.BatchItem` lists whose ``extra`` says how to score the answer.

``extra`` holds ``kind`` (``mcq``, ``asr`` or ``match``), ``subset`` (the table's row), ``answer`` and, per kind,
``choices`` (mcq), ``labels`` and ``match`` (``contains`` or ``exact``) for match items.

=================  ===========================================================================================
task               data
=================  ===========================================================================================
``mmau``           ``mmau-test-mini.json``: a list of ``{id, audio_id, question, choices, answer, task,
                   difficulty}``; subsets by ``task`` (sound / music / speech)
``mmar``           ``MMAR-meta.json``: a list of ``{id, audio_path, question, choices, answer, modality,
                   category}``; subsets by ``modality``
``librispeech``    a LibriSpeech folder (``*/*/*.flac`` with ``*.trans.txt``); WER/CER
``asr``            JSONL ``{audio, text[, id, subset]}``; WER/CER (a folder is read as LibriSpeech)
``qa``             JSONL ``{audio, question, answer[, choices | labels, match, id, subset]}``: multiple choice
                   with ``choices``, a label set with ``labels``, else ``contains`` (or ``exact``) matching
``nvidia``         NVIDIA's AF3 eval JSON ``{dataset_path, split_path, data: {"0": {name, prompt, output}}}``;
                   multiple choice when the prompt lists ``(A) ...`` options, WER when it asks to transcribe,
                   else ``contains``
``conversation``   our conversation JSONL / NVIDIA training JSON: the last assistant turn is the reference
                   (``contains``)
``synthetic``      freshly generated synthetic clips (:mod:`af3.training.synthetic`); ``--data`` is unused
=================  ===========================================================================================

Audio paths are relative to the data file's folder (NVIDIA's JSON: to its ``split_path`` or ``dataset_path``).
The multiple-choice prompt is the paper's: ``question + "\\nChoose the correct option from the following
options:\\n(A) ...\\n(B) ..."``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..batch.manifest import BatchItem, read_jsonl_objects, resolve_path, user_turn
from ..errors import InputError

MCQ_INSTRUCTION = "Choose the correct option from the following options:"
ASR_PROMPT = "Transcribe the input speech."
TASKS = ("mmau", "mmar", "librispeech", "asr", "qa", "nvidia", "conversation", "synthetic")


def mcq_prompt(question: str, choices: list[str]) -> str:
    lines = "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
    return f"{question}\n{MCQ_INSTRUCTION}\n{lines}"


def _read_json(path: str) -> Any:
    if not os.path.isfile(path):
        raise InputError(f"--data {path!r} does not exist or is not a file")
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {path}: {e}") from None


def _read_jsonl(path: str) -> list[tuple[int, dict]]:
    return read_jsonl_objects(path, "--data")


def _need(row: dict, keys: tuple[str, ...], where: str) -> None:
    missing = [k for k in keys if row.get(k) in (None, "")]
    if missing:
        raise InputError(f"{where}: missing {', '.join(repr(k) for k in missing)}")


def _mcq_items(rows: list[dict], path: str, audio_key: str, subset_key: str, meta_keys: tuple[str, ...]
               ) -> list[BatchItem]:
    folder = os.path.dirname(os.path.abspath(path))
    items = []
    for n, row in enumerate(rows):
        where = f"{path} item {n}"
        if not isinstance(row, dict):
            raise InputError(f"{where}: not an object")
        _need(row, ("question", "choices", "answer", audio_key), where)
        choices = row["choices"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise InputError(f"{where}: 'choices' must be a list of at least two strings")
        audio = resolve_path(str(row[audio_key]), folder)
        extra = {"kind": "mcq", "subset": str(row.get(subset_key) or "all"), "answer": str(row["answer"]),
                 "choices": choices, "question": row["question"], **{k: row.get(k) for k in meta_keys}}
        items.append(BatchItem(str(row.get("id", n)), n, user_turn([audio], mcq_prompt(row["question"], choices)),
                               extra))
    return items


def read_mmau(path: str) -> list[BatchItem]:
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise InputError(f"{path}: MMAU's file is a JSON list of items")
    return _mcq_items(rows, path, "audio_id", "task", ("difficulty", "category", "sub-category"))


def read_mmar(path: str) -> list[BatchItem]:
    rows = _read_json(path)
    if not isinstance(rows, list):
        raise InputError(f"{path}: MMAR's file is a JSON list of items")
    return _mcq_items(rows, path, "audio_path", "modality", ("category", "sub-category", "language"))


def _asr_item(item_id: str, index: int, audio: str, text: str, subset: str, prompt: str) -> BatchItem:
    return BatchItem(item_id, index, user_turn([audio], prompt), {"kind": "asr", "subset": subset, "answer": text})


def read_librispeech(path: str, prompt: str = ASR_PROMPT) -> list[BatchItem]:
    root = Path(path)
    if not root.is_dir():
        raise InputError(f"--data {path!r} is not a folder (LibriSpeech: */*/*.flac with *.trans.txt)")
    items: list[BatchItem] = []
    for trans in sorted(root.rglob("*.trans.txt")):
        subset = trans.relative_to(root).parts[0] if len(trans.relative_to(root).parts) > 3 else root.name
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utt, _, text = line.partition(" ")
            audio = next((trans.parent / f"{utt}{ext}" for ext in (".flac", ".wav")
                          if (trans.parent / f"{utt}{ext}").is_file()), trans.parent / f"{utt}.flac")
            items.append(_asr_item(utt, len(items), str(audio), text.strip(), subset, prompt))
    if not items:
        raise InputError(f"{path}: no *.trans.txt transcripts found (LibriSpeech layout: */*/*.flac + *.trans.txt)")
    return items


def read_asr(path: str, prompt: str = ASR_PROMPT) -> list[BatchItem]:
    if os.path.isdir(path):
        return read_librispeech(path, prompt)
    folder = os.path.dirname(os.path.abspath(path))
    items = []
    for number, row in _read_jsonl(path):
        _need(row, ("audio", "text"), f"{path}:{number}")
        items.append(_asr_item(str(row.get("id", number)), len(items), resolve_path(str(row["audio"]), folder),
                               str(row["text"]), str(row.get("subset") or "all"), prompt))
    return items


def read_qa(path: str) -> list[BatchItem]:
    folder = os.path.dirname(os.path.abspath(path))
    items = []
    for number, row in _read_jsonl(path):
        where = f"{path}:{number}"
        _need(row, ("audio", "question", "answer"), where)
        audios = row["audio"] if isinstance(row["audio"], list) else [row["audio"]]
        audios = [resolve_path(str(a), folder) for a in audios]
        extra: dict[str, Any] = {"subset": str(row.get("subset") or "all"), "answer": str(row["answer"])}
        question = str(row["question"])
        if row.get("choices"):
            if not isinstance(row["choices"], list) or len(row["choices"]) < 2:
                raise InputError(f"{where}: 'choices' must be a list of at least two options")
            extra.update(kind="mcq", choices=[str(c) for c in row["choices"]])
            question = mcq_prompt(question, extra["choices"])
        else:
            match = row.get("match", "contains")
            if match not in ("contains", "exact"):
                raise InputError(f"{where}: 'match' must be contains or exact, not {match!r}")
            labels = row.get("labels")
            if labels is not None and (not isinstance(labels, list) or not labels):
                raise InputError(f"{where}: 'labels' must be a non-empty list")
            extra.update(kind="match", match=match, labels=labels)
        items.append(BatchItem(str(row.get("id", number)), len(items), user_turn(audios, question), extra))
    return items


_OPTION = re.compile(r"^\(([A-Z])\)\s*(.+)$", re.M)


def read_nvidia(path: str) -> list[BatchItem]:
    doc = _read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), dict):
        raise InputError(f"{path}: NVIDIA's eval JSON is {{'dataset_path', 'split_path', 'data': {{'0': ...}}}}")
    base = doc.get("split_path") or doc.get("dataset_path") or "."
    folder = resolve_path(str(base), os.path.dirname(os.path.abspath(path)))
    items = []
    for key, row in doc["data"].items():
        where = f"{path} data[{key!r}]"
        if not isinstance(row, dict):
            raise InputError(f"{where}: not an object")
        _need(row, ("name", "prompt", "output"), where)
        names = row["name"] if isinstance(row["name"], list) else [row["name"]]
        prompt = re.sub(r"<sound(?:-\d+)?>\n?", "", str(row["prompt"])).strip()
        answer = str(row["output"])
        options = _OPTION.findall(prompt)
        if len(options) >= 2:
            extra = {"kind": "mcq", "choices": [t.strip() for _, t in options], "answer": answer}
        elif "transcri" in prompt.lower():
            extra = {"kind": "asr", "answer": answer}
        else:
            extra = {"kind": "match", "match": "contains", "answer": answer, "labels": None}
        extra["subset"] = str(doc.get("flamingo_task") or doc.get("split") or "all")
        audios = [resolve_path(str(n), folder) for n in names]
        items.append(BatchItem(str(key), len(items), user_turn(audios, prompt), extra))
    return items


def read_conversation(path: str) -> list[BatchItem]:
    from ..training.manifest import load_manifest

    items = []
    for n, ex in enumerate(load_manifest(path)):
        last = max((i for i, m in enumerate(ex.messages) if m["role"] == "assistant"), default=None)
        if last is None or last == 0:
            raise InputError(f"{ex.source}: an eval conversation ends with the assistant's reference answer")
        answer = ex.messages[last]["content"]
        answer = answer if isinstance(answer, str) else " ".join(p.get("text", "") for p in answer)
        items.append(BatchItem(str(n + 1), n, ex.messages[:last],
                               {"kind": "match", "match": "contains", "answer": answer, "labels": None,
                                "subset": "all"}))
    return items


READERS: dict[str, Callable[[str], list[BatchItem]]] = {
    "mmau": read_mmau, "mmar": read_mmar, "librispeech": read_librispeech, "asr": read_asr, "qa": read_qa,
    "nvidia": read_nvidia, "conversation": read_conversation,
}


def load_task(task: str, data: str | None, limit: int | None = None, n: int = 100, seed: int | None = None
              ) -> list[BatchItem]:
    """The items of ``task`` (see the module docstring); ``limit`` keeps the first ones. ``n`` and ``seed``
    (default: the model card's) are for ``synthetic``."""
    if task == "synthetic":
        from .synthetic import CARD_SEED, synthetic_items

        items = synthetic_items(n, CARD_SEED if seed is None else seed)
    elif task not in READERS:
        raise InputError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
    elif data is None:
        raise InputError(f"task {task} needs --data (its file or folder)")
    else:
        items = READERS[task](data)
    if not items:
        raise InputError(f"{data}: no items")
    seen: set[str] = set()
    for it in items:
        if it.id in seen:
            raise InputError(f"{data}: id {it.id!r} appears twice; ids must be unique")
        seen.add(it.id)
    return items[:limit] if limit else items
