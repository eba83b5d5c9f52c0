"""``af3 eval TASK --data PATH``: a benchmark through the Engine, scored, printed and written to an output folder
(resumable). See :mod:`af3.eval` for the tasks and how they are scored."""

from __future__ import annotations

import json
import os

import typer

from ..errors import AF3Error
from .batch_cmd import parse_shard, shard_device
from .common import DEVICE_OPT, DTYPE_OPT, MODEL_OPT, QUANT_OPT, _engine, _options, _resolve_model


def evaluate(
    task: str = typer.Argument(..., help="mmau, mmar, librispeech, asr, qa, nvidia, conversation or synthetic."),
    data: str = typer.Option(None, "--data", "-d", help="The task's file or folder (not for synthetic)."),
    model: str = MODEL_OPT,
    limit: int = typer.Option(None, help="Only the first N items."),
    n: int = typer.Option(100, "--n", help="synthetic: clips per task."),
    output_dir: str = typer.Option(None, help="Where predictions.jsonl and results.json go (re-running resumes). "
                                   "Default: eval-runs/TASK-MODEL."),
    think: bool = typer.Option(False, "--think", help="Use the checkpoint's thinking adapter."),
    batch_size: int = typer.Option(8, help="Items decoded together."),
    max_new_tokens: int = typer.Option(None, help="Default: 128 (NVIDIA's eval), 1024 with --think, 12 for "
                                       "synthetic."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: on a terminal)."),
    output_format: str = typer.Option("table", "--format", help="table or json (results.json on stdout)."),
    quantize: str = QUANT_OPT,
    dtype: str = DTYPE_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Score a model on a benchmark: greedy answers, a deterministic scorer, a table per subset with 95%
    intervals, and results.json + predictions.jsonl (every answer, which matching rule scored it) in the
    output folder. Running again with the same --output-dir resumes.

    \b
    Examples:
      af3 eval synthetic --n 100
      af3 eval mmau --data mmau-test-mini.json --model nvidia/audio-flamingo-3-hf
      af3 eval librispeech --data LibriSpeech/test-clean --batch-size 16 --output-dir runs/ls-clean
      af3 eval qa --data my-labels.jsonl --limit 50 --format json
    """
    from ..eval import evaluate as run_eval
    from ..eval import load_task
    from ..eval.report import print_table

    try:
        import jiwer  # noqa: F401
        import whisper_normalizer  # noqa: F401
    except ImportError:
        raise AF3Error("af3 eval needs the eval extra: pip install 'af3[eval]'") from None
    if output_format not in ("table", "json"):
        raise AF3Error(f"unknown --format {output_format!r}; use table or json")
    if limit is not None and limit < 1:
        raise AF3Error(f"--limit must be at least 1, got {limit}")
    if not 1 <= n <= 100_000:
        raise AF3Error(f"--n must be between 1 and 100000, got {n}")
    if not 1 <= batch_size <= 1024:
        raise AF3Error(f"--batch-size must be between 1 and 1024, got {batch_size}")
    if max_new_tokens is None:
        max_new_tokens = 12 if task == "synthetic" else 1024 if think else 128
    options = _options(max_new_tokens, 0.0, None, None, None, think, None)
    all_items = load_task(task, data, None, n=n)
    items = all_items[:limit] if limit else all_items
    path = _resolve_model(model)
    name = os.path.basename(os.path.normpath(model or "tiny")) if model not in (None, "tiny") else "tiny"
    output_dir = output_dir or os.path.join("eval-runs", f"{task}-{name.replace('/', '_')}")
    rank, size = parse_shard(None)
    engine = _engine(path, dtype, shard_device(device, size), quantize, think=think, max_batch_size=batch_size,
                     audio_cache_bytes=256 * 1024**2)
    try:
        results = run_eval(engine, task, items, output_dir, options, model=model or "tiny", data=data,
                           progress=progress, all_items=all_items)
    finally:
        engine.close()
    if output_format == "json":
        typer.echo(json.dumps(results, indent=2, default=str))
    else:
        print_table(results)
    if results["interrupted"]:
        raise typer.Exit(130)
