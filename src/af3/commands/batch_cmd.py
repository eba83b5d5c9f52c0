"""``af3 batch``: a manifest of conversations through the Engine into a resumable JSONL output, one shard per
process when sharded (``--shard i/K`` or torchrun's RANK/WORLD_SIZE), and ``af3 batch merge`` to join the shards."""

from __future__ import annotations

import json
import os

import typer

from ..errors import AF3Error
from .common import DEVICE_OPT, DTYPE_OPT, MODEL_OPT, PRIVATE_OPT, QUANT_OPT, _engine, _options, _resolve_model


def parse_shard(shard: str | None) -> tuple[int, int]:
    """``--shard i/K`` → (i, K); without it, torchrun's ``RANK``/``WORLD_SIZE`` when set, else (0, 1)."""
    if shard is None:
        world = os.environ.get("WORLD_SIZE")
        if world is None:
            return 0, 1
        try:
            rank, size = int(os.environ.get("RANK", "0")), int(world)
        except ValueError:
            raise AF3Error(f"RANK/WORLD_SIZE are not whole numbers: {os.environ.get('RANK')!r}/{world!r}") from None
    else:
        try:
            rank, size = (int(v) for v in shard.split("/"))
        except ValueError:
            raise AF3Error(f"--shard must look like i/K (e.g. 0/4), got {shard!r}") from None
    if not (size >= 1 and 0 <= rank < size):
        raise AF3Error(f"shard {rank}/{size}: need 0 <= i < K")
    return rank, size


def shard_device(device: str, size: int) -> str:
    """Under a launcher with several processes, ``auto`` gives each its own GPU (LOCAL_RANK) when there are GPUs."""
    if device != "auto" or size == 1:
        return device
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return "cpu"


def batch(
    manifest: str = typer.Argument(..., help="The manifest (JSONL), or 'merge' to join shard outputs."),
    merge_target: str = typer.Argument(None, metavar="[OUT]", help="With 'merge': the output the shards wrote."),
    output: str = typer.Option(None, "--output", "-o", help="Where results go (JSONL, one line per item)."),
    model: str = MODEL_OPT,
    batch_size: int = typer.Option(8, help="Conversations decoded together."),
    think: bool = typer.Option(False, "--think", help="Use the checkpoint's thinking adapter."),
    max_new_tokens: int = typer.Option(256, help="Upper bound on each answer's length in tokens."),
    min_new_tokens: int = typer.Option(0, help="Lower bound (end tokens are ignored until then)."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(None, help="Nucleus sampling (with --temperature > 0)."),
    top_k: int = typer.Option(None, help="Top-k sampling (with --temperature > 0)."),
    seed: int = typer.Option(None, help="Sampling seed."),
    strip_prefix: bool = typer.Option(False, "--strip-prefix", help="Remove AF3's framing around transcriptions."),
    resume: bool = typer.Option(False, "--resume", help="Continue an output: skip the ids it already has."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start the output again from empty."),
    shard: str = typer.Option(None, help="i/K: run every K-th item from the i-th into OUT.rank{i}.jsonl "
                              "(default under torchrun: RANK/WORLD_SIZE)."),
    progress: bool = typer.Option(None, "--progress/--no-progress", help="Progress bar (default: on a terminal)."),
    output_format: str = typer.Option("text", "--format", help="text or json: the summary printed at the end."),
    quantize: str = QUANT_OPT,
    dtype: str = DTYPE_OPT,
    device: str = DEVICE_OPT,
    allow_private_urls: bool = PRIVATE_OPT,
) -> None:
    """Run every conversation of a manifest and append each result to OUT as it finishes.

    A manifest line is {"id", "audio": path | [paths], "prompt"} or {"id", "messages": [...]}. Each output line
    is {"id", "index", "text", "finish_reason", "prompt_tokens", "completion_tokens", "audio_seconds", "seconds",
    "error"}; an item that fails (missing or broken audio, too long) gets its "error" and the run goes on.
    A killed run loses nothing it wrote: run it again with --resume.

    \b
    Examples:
      af3 batch clips.jsonl --output answers.jsonl --batch-size 16
      af3 batch clips.jsonl --output answers.jsonl --resume
      af3 batch clips.jsonl --output answers.jsonl --shard 0/2   (and 1/2 elsewhere), then:
      af3 batch merge answers.jsonl
      torchrun --nproc_per_node 4 -m af3.batch clips.jsonl --output answers.jsonl
    """
    from ..batch import ResultsFile, merge_shards, read_manifest, run_items, shard_path

    if output_format not in ("text", "json"):
        raise AF3Error(f"unknown --format {output_format!r}; use text or json")
    if manifest == "merge":
        target = merge_target or output
        if target is None:
            raise AF3Error("usage: af3 batch merge OUT.jsonl (the --output the shards were given)")
        report = merge_shards(target)
        _say(report, output_format, f"merged {report['shards']} shards: {report['records']} records "
                                    f"({report['errors']} with errors) into {target}")
        return
    if merge_target is not None:
        raise AF3Error(f"unexpected extra argument {merge_target!r} (only 'af3 batch merge' takes OUT)")
    if output is None:
        raise AF3Error("--output is required: where the results go (JSONL)")
    if batch_size < 1 or batch_size > 1024:
        raise AF3Error(f"--batch-size must be between 1 and 1024, got {batch_size}")
    options = _options(max_new_tokens, temperature, top_p, top_k, seed, think, None, min_new_tokens)
    rank, size = parse_shard(shard)
    items = read_manifest(manifest)
    mine = [it for it in items if it.index % size == rank]
    path = shard_path(output, rank) if size > 1 else output
    with ResultsFile(path, resume=resume, overwrite=overwrite) as results:
        engine = _engine(_resolve_model(model), dtype, shard_device(device, size), quantize, think=think,
                         max_batch_size=batch_size, allow_private_urls=allow_private_urls,
                         audio_cache_bytes=256 * 1024**2)
        try:
            stats = run_items(engine, mine, results, options, strip_prefix=strip_prefix, progress=progress)
        finally:
            engine.close()
    report = {"output": path, "items": stats.total, "done": stats.done, "errors": stats.errors,
              "skipped": stats.skipped, "seconds": round(stats.seconds, 3), "items_per_s": round(stats.items_per_s, 4),
              "audio_seconds": round(stats.audio_seconds, 3), "interrupted": stats.interrupted,
              "shard": f"{rank}/{size}"}
    _say(report, output_format, stats.summary(path))
    if stats.interrupted:
        raise typer.Exit(130)


def _say(report: dict, output_format: str, line: str) -> None:
    typer.echo(json.dumps(report) if output_format == "json" else line)
