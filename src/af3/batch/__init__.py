"""Offline inference over a manifest (``af3 batch``): :mod:`.manifest` reads it, :mod:`.runner` runs it through one
Engine, :mod:`.results` writes the resumable JSONL output and merges shards. ``af3 eval`` uses the same machinery."""

from .manifest import BatchItem, read_manifest
from .results import ResultsFile, merge_shards, shard_path
from .runner import RunStats, run_items

__all__ = ["BatchItem", "ResultsFile", "RunStats", "merge_shards", "read_manifest", "run_items", "shard_path"]
