"""The output of a batch run: a JSONL file that only ever grows by whole lines, so that a run killed at any moment
(even ``kill -9`` in the middle of a write) loses nothing it had written and can be resumed.

Each record is written with one ``write`` of the whole line (``O_APPEND``); the file is flushed to disk every few
seconds and at the end. On opening an existing file for a resume, a last line cut short by a kill is dropped (the
file is truncated to its last complete line: that item runs again); any other damaged line is an error, because
the file is then not one this code wrote.
"""

from __future__ import annotations

import glob
import json
import os
import time
from typing import Any

from ..errors import InputError
from ..files import write_atomic

#: Seconds between flushes of the output to disk (a kill loses nothing either way; a power loss at most this).
FSYNC_EVERY_S = 2.0


def read_records(path: str) -> tuple[list[dict], int]:
    """The complete records of a results file and the byte length they take (a torn last line is not counted)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"cannot read {path!r}: {e.strerror or e}") from None
    records, good = [], 0
    lines = data.split(b"\n")
    for number, line in enumerate(lines, 1):
        last = number == len(lines)
        if not line.strip():
            if not last:
                good += len(line) + 1
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "id" not in record:
                raise ValueError("not a record")
        except ValueError:
            if last:  # the line being written when the run died (no newline yet)
                break
            raise InputError(f"{path}:{number} is not a record af3 wrote (damaged file?); move it away or start "
                             "a new output") from None
        if last:  # complete JSON but no newline: the kill came between the text and its newline
            break
        records.append(record)
        good += len(line) + 1
    return records, good


class ResultsFile:
    """Append-only JSONL output. ``resume``: keep (and report) the records already there; otherwise the file must
    not exist or ``overwrite`` must be given."""

    def __init__(self, path: str | os.PathLike, resume: bool = False, overwrite: bool = False):
        self.path = os.fspath(path)
        self.done: dict[str, dict] = {}
        exists = os.path.exists(self.path) and os.path.getsize(self.path) > 0
        if exists and not (resume or overwrite):
            raise InputError(f"{self.path} already exists; pass --resume to continue that run or --overwrite to "
                             "start again")
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise InputError(f"cannot write {self.path}: folder {folder!r} does not exist")
        if exists and resume:
            records, good = read_records(self.path)
            if good < os.path.getsize(self.path):
                with open(self.path, "r+b") as f:  # drop the torn last line: its item runs again
                    f.truncate(good)
            self.done = {str(r["id"]): r for r in records}
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | (os.O_TRUNC if overwrite and not resume else 0)
        try:
            self.fd = os.open(self.path, flags, 0o666)
        except OSError as e:
            raise InputError(f"cannot write {self.path}: {e.strerror or e}") from None
        self._synced = time.monotonic()

    def write(self, record: dict[str, Any]) -> None:
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        view = memoryview(line)
        while view:  # one write for a line in practice; the loop only covers a partial write
            n = os.write(self.fd, view)
            view = view[n:]
        self.done[str(record["id"])] = record
        if time.monotonic() - self._synced > FSYNC_EVERY_S:
            os.fsync(self.fd)
            self._synced = time.monotonic()

    def close(self) -> None:
        if self.fd >= 0:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> ResultsFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ------------------------------------------------------------------------------------------------ shards
def shard_path(output: str, rank: int) -> str:
    """``out.jsonl`` → ``out.rank{rank}.jsonl`` (the file one shard writes)."""
    stem, ext = os.path.splitext(output)
    return f"{stem}.rank{rank}{ext or '.jsonl'}"


def merge_shards(output: str, manifest_ids: list[str] | None = None) -> dict[str, int]:
    """Join ``out.rank*.jsonl`` into ``output`` in manifest order (each record's ``index``), written atomically.
    An id found in two shards is an error; ``manifest_ids`` (when given) reports the ids no shard has."""
    stem, ext = os.path.splitext(output)
    paths = sorted(glob.glob(glob.escape(stem) + ".rank*" + (ext or ".jsonl")))
    if not paths:
        raise InputError(f"no shard files {stem}.rank*{ext or '.jsonl'} to merge")
    by_id: dict[str, tuple[str, dict]] = {}
    for path in paths:
        for record in read_records(path)[0]:
            key = str(record["id"])
            if key in by_id and by_id[key][0] != path:
                raise InputError(f"id {key!r} is in both {by_id[key][0]} and {path}; were the shards run with "
                                 "different manifests?")
            by_id[key] = (path, record)
    records = sorted((r for _, r in by_id.values()), key=lambda r: (r.get("index", 1 << 62), str(r["id"])))
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    write_atomic(output, data)
    missing = 0 if manifest_ids is None else sum(1 for i in manifest_ids if i not in by_id)
    return {"shards": len(paths), "records": len(records), "errors": sum(1 for r in records if r.get("error")),
            "missing": missing}
