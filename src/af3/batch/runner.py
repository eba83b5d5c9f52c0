"""Running a manifest through one Engine: items go in as rows free up (continuous batching), each result is
appended to the output the moment it finishes, and a bad item is written with its error while the run goes on.

:func:`run_items` is shared by ``af3 batch`` and ``af3 eval`` (which passes a ``score`` function that adds its
per-item score to each record). This module only validates and translates: the Engine tokenizes, batches, caches
and decodes.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import AF3Error
from .manifest import BatchItem
from .results import ResultsFile

AUDIO_TOKENS_PER_SECOND = 25.0  # AF3: 750 audio tokens per 30 s window


@dataclass
class RunStats:
    """What one run did (items skipped because the output already had them are not counted as done)."""

    total: int = 0
    skipped: int = 0
    done: int = 0
    errors: int = 0
    audio_seconds: float = 0.0
    seconds: float = 0.0
    interrupted: bool = False

    @property
    def items_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def summary(self, path: str) -> str:
        s = (f"{self.done} done ({self.errors} with errors), {self.skipped} already in {path}, "
             f"{self.items_per_s:.2f} items/s, {self.audio_seconds / 3600:.3f} audio hours in {self.seconds:.1f} s")
        return s + (" — interrupted; run again with --resume to finish" if self.interrupted else "")


def _record(item: BatchItem, req: Any, started: float, text: str) -> dict:
    out = req.output
    return {"id": item.id, "index": item.index, "text": text, "finish_reason": out.finish_reason,
            "prompt_tokens": out.prompt_tokens, "completion_tokens": len(out.token_ids),
            "audio_seconds": round(out.audio_tokens / AUDIO_TOKENS_PER_SECOND, 3),
            "seconds": round(time.perf_counter() - started, 3), "error": None}


def _error_record(item: BatchItem, error: BaseException) -> dict:
    message = " ".join(str(error).split()) or type(error).__name__
    return {"id": item.id, "index": item.index, "text": None, "error": message}


class _Progress:
    """A rich progress bar on stderr (items/s, audio hours/s, ETA); silent when ``show`` is false."""

    def __init__(self, total: int, show: bool):
        self.bar = None
        if not show:
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[rate]}"), TimeRemainingColumn(),
                            console=Console(stderr=True), transient=False)
        self.task = self.bar.add_task("af3", total=total, rate="")
        self.bar.start()

    def update(self, stats: RunStats, elapsed: float) -> None:
        if self.bar is None:
            return
        rate = (f"{stats.done / elapsed:.2f} items/s · {stats.audio_seconds / 3600 / elapsed:.4f} audio h/s · "
                f"{stats.errors} errors" if elapsed > 0 else "")
        self.bar.update(self.task, completed=stats.done, rate=rate)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def run_items(engine: Any, items: Sequence[BatchItem], results: ResultsFile, options: Any = None, *,
              window: int | None = None, strip_prefix: bool | Callable[[BatchItem], bool] = False,
              progress: bool | None = None,
              score: Callable[[BatchItem, dict], dict] | None = None) -> RunStats:
    """Run every item whose id is not in ``results`` yet through ``engine`` (started here if it is not), appending
    one record per item as it finishes. ``window``: requests submitted ahead (default: twice the batch size, so
    the next audios are decoded while the current ones run). ``strip_prefix`` (or a function of the item) removes
    AF3's framing around transcripts from the text. ``score(item, record)`` may add fields to a record
    before it is written. Ctrl-C stops cleanly: what was written stays, the rest is cancelled."""
    todo = [it for it in items if it.id not in results.done]
    stats = RunStats(total=len(items), skipped=len(items) - len(todo))
    window = window or max(2, 2 * engine.max_batch_size)
    show = sys.stderr.isatty() if progress is None else progress
    bar = _Progress(len(todo), show)
    engine.start()
    changed = threading.Event()
    pending: list[tuple[BatchItem, Any, float]] = []
    queue = iter(todo)
    started = time.perf_counter()

    def write(item: BatchItem, record: dict) -> None:
        if score is not None:
            record = score(item, record)
        results.write(record)
        stats.done += 1
        stats.errors += record.get("error") is not None
        stats.audio_seconds += record.get("audio_seconds") or 0.0
        bar.update(stats, time.perf_counter() - started)

    try:
        while True:
            while len(pending) < window and (item := next(queue, None)) is not None:
                t0 = time.perf_counter()
                try:
                    req = engine.submit(item.messages, options, on_update=changed.set)
                except AF3Error as e:  # unreadable or too long audio, a bad conversation: this item only
                    write(item, _error_record(item, e))
                    continue
                pending.append((item, req, t0))
            if not pending:
                break
            changed.wait(0.5)
            changed.clear()
            still = []
            for item, req, t0 in pending:
                if not req.done.is_set():
                    still.append((item, req, t0))
                elif req.error is not None:
                    write(item, _error_record(item, req.error))
                else:
                    strip = strip_prefix(item) if callable(strip_prefix) else strip_prefix
                    text = (engine.processor.decode(req.output.token_ids, skip_special_tokens=True, strip_prefix=True)
                            if strip else req.output.text)
                    write(item, _record(item, req, t0, text))
            pending = still
    except KeyboardInterrupt:
        stats.interrupted = True
        for _, req, _ in pending:
            engine.cancel(req)
    finally:
        stats.seconds = time.perf_counter() - started
        bar.close()
    return stats
