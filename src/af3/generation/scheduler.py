"""Which requests run: the waiting queue, the running rows, and the prefix cache. Pure Python and tensors; the
model is never called here.

* :class:`Request` is one conversation's state from submission to its :class:`~.output.Output`.
* :class:`Scheduler` admits waiting requests while rows are free (each running request owns one row of the KV
  cache; ``running[i]`` is row ``i``) within a prefill-token budget, and retires finished ones: the last running
  row moves into the hole, so rows ``0 .. n-1`` are always the batch (continuous batching).
* :class:`PrefixCache` keeps the keys/values of finished conversations in a byte-bounded LRU, indexed by hashes of
  token blocks (as vLLM's prefix cache is), so that a follow-up question about the same recording finds its earlier
  turns in a few dictionary look-ups instead of comparing against every entry.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .options import GenerationOptions
from .sampling import Chain


@dataclass(eq=False)
class Request:
    """One request: what goes in (tokens, audio, options) and what has come out so far."""

    id: int
    input_ids: Tensor  # [T] int64: the prompt the model reads
    options: GenerationOptions  # resolved
    key: Tensor | None = None  # [T] int64 prefix-cache key (audio tokens carry their window's hash); None = no reuse
    features: Tensor | None = None  # [W, mel, frames] audio windows, encoded by the runner (through its cache)
    features_mask: Tensor | None = None  # [W, frames]
    window_hashes: list[int] = field(default_factory=list)  # content hash per window (audio-cache keys)
    audio_embeds: Tensor | None = None  # [audio tokens, D]: given, or filled by the runner from ``features``
    penalty_ids: Tensor | None = None  # [S] what the repetition penalty sees before the new tokens (default: prompt)
    generator: torch.Generator | None = None
    constraint: Any = None  # a JsonSchemaConstraint for JSON output
    chain: Chain = field(default_factory=Chain)  # logits processors (sampling.build_chain)
    submitted: float = field(default_factory=time.time)
    tokens: list[int] = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    length: int = 0  # tokens whose keys/values are in the request's row
    cached_prompt_tokens: int = 0
    audio_windows_cached: int = 0
    emitted_chars: int = 0
    text: str = ""
    finish_reason: str | None = None
    output: Any = None  # the Output, once finished
    error: BaseException | None = None
    stream: queue.Queue | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # set by Engine.cancel: the loop ends the request at its next step
    on_update: Callable[[], None] | None = None  # called (from the loop's thread) after each delta and at the end
    audio_tokens: int = 0  # <sound> tokens in the prompt (usage reports them)

    @property
    def prompt_tokens(self) -> int:
        return self.input_ids.numel()


class Scheduler:
    """Waiting and running requests (see the module docstring). Thread-safe: ``add`` may be called from any
    thread while the loop owner calls ``admit`` and ``retire``."""

    def __init__(self, max_batch_size: int, max_prefill_tokens: int):
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # index = KV-cache row
        self.lock = threading.Lock()

    def add(self, req: Request) -> None:
        with self.lock:
            self.waiting.append(req)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def admit(self) -> list[tuple[int, Request]]:
        """Move waiting requests into free rows (first come, first served) while their prompts fit the prefill
        budget (the first always fits); returns (row, request) pairs."""
        admitted = []
        with self.lock:
            budget = self.max_prefill_tokens
            while self.waiting and len(self.running) < self.max_batch_size:
                nxt = self.waiting[0]
                if admitted and nxt.prompt_tokens > budget:
                    break
                self.waiting.popleft()
                budget -= nxt.prompt_tokens
                admitted.append((len(self.running), nxt))
                self.running.append(nxt)
        return admitted

    def take_cancelled(self) -> list[Request]:
        """Waiting requests that were cancelled, taken out of the queue; running ones are marked finished
        (``"cancelled"``) for :meth:`retire` to free their rows. Returns the waiting ones."""
        with self.lock:
            gone = [r for r in self.waiting if r.cancelled]
            if gone:
                self.waiting = deque(r for r in self.waiting if not r.cancelled)
        for r in self.running:
            if r.cancelled and r.finish_reason is None:
                r.finish_reason = "cancelled"
        return gone

    def retire(self, on_finished: Callable[[int, Request], None], move_row: Callable[[int, int, int], None]
               ) -> list[Request]:
        """Take finished requests out of the running rows: ``on_finished(row, request)`` is called while the row
        still holds the request's cache, then ``move_row(src, dst, length)`` moves the last running row into the
        hole. Returns the finished requests."""
        done = []
        i = 0
        while i < len(self.running):
            r = self.running[i]
            if r.finish_reason is None:
                i += 1
                continue
            on_finished(i, r)
            done.append(r)
            with self.lock:
                last = len(self.running) - 1
                moved = self.running[last]
                self.running[i] = moved
                self.running.pop()
            if i != last:
                move_row(last, i, moved.length)
        return done

    def drain(self) -> list[Request]:
        """Every request, waiting or running, taken out (when the loop fails)."""
        with self.lock:
            reqs = [*self.running, *self.waiting]
            self.running, self.waiting = [], deque()
        return reqs


# ---------------------------------------------------------------------------------------------- caches
class LRUBytes:
    """A byte-bounded least-recently-used map; ``on_evict(key, value)`` is told of each entry pushed out."""

    def __init__(self, max_bytes: int, on_evict: Callable[[Any, Any], None] | None = None):
        self.max_bytes = max_bytes
        self.items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.on_evict = on_evict

    def get(self, key: Any) -> Any | None:
        item = self.items.get(key)
        if item is None:
            self.misses += 1
            return None
        self.items.move_to_end(key)
        self.hits += 1
        return item[0]

    def put(self, key: Any, value: Any, nbytes: int) -> bool:
        """Store ``value`` (False when it alone exceeds the budget and is not kept)."""
        if nbytes > self.max_bytes:
            return False
        if key in self.items:
            self.bytes -= self.items.pop(key)[1]
        self.items[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            old, (value_out, size) = self.items.popitem(last=False)
            self.bytes -= size
            if self.on_evict is not None:
                self.on_evict(old, value_out)
        return True


@dataclass(eq=False)
class PrefixEntry:
    key: Tensor  # [L] int64 token keys (audio tokens carry their audio's hash)
    kv: list[tuple[Tensor, Tensor]]  # per layer [Hkv, L, Dh]
    think: bool = False  # keys/values computed with the think adapter on
    blocks: list[int] = field(default_factory=list)  # chained hashes of the key's full blocks

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k, _ in self.kv)


def block_hashes(key: Tensor, think: bool, block: int) -> list[int]:
    """Chained hashes of the full ``block``-token blocks of ``key``: hash i covers tokens ``0 .. (i+1)*block-1``."""
    data = key.numpy() if key.device.type == "cpu" else key.cpu().numpy()
    out, h = [], hash(("af3-prefix", think))
    for a in range(0, len(data) - block + 1, block):
        h = hash((h, data[a:a + block].tobytes()))
        out.append(h)
    return out


class PrefixCache:
    """Finished sequences' keys/values, found by their longest common prefix with a new prompt."""

    #: Tokens per hashed block: short enough that a prompt's shared part is found to within 16 tokens (the rest is
    #: compared token by token), long enough that a 10-minute prompt takes a few hundred look-ups.
    BLOCK = 16

    def __init__(self, max_bytes: int):
        self.lru = LRUBytes(max_bytes, on_evict=lambda _k, entry: self._unindex(entry))
        self.index: dict[int, list[PrefixEntry]] = {}

    @property
    def max_bytes(self) -> int:
        return self.lru.max_bytes

    def __len__(self) -> int:
        return len(self.lru.items)

    def put(self, key: Tensor, kv: list[tuple[Tensor, Tensor]], think: bool) -> None:
        entry = PrefixEntry(key, kv, think, block_hashes(key, think, self.BLOCK))
        if self.lru.put(id(entry), entry, entry.nbytes):
            for h in entry.blocks:
                self.index.setdefault(h, []).append(entry)

    def _unindex(self, entry: PrefixEntry) -> None:
        for h in entry.blocks:
            holders = self.index.get(h)
            if holders is not None:
                holders.remove(entry)
                if not holders:
                    del self.index[h]

    def match(self, key: Tensor, think: bool) -> tuple[PrefixEntry | None, int]:
        """The entry sharing the longest prefix with ``key`` (computed with the same ``think`` setting), and that
        length, at most ``len(key) - 1`` (the last prompt token is always recomputed: its logits start decoding).
        Prefixes shorter than one block are not reused."""
        limit = key.numel() - 1
        if limit <= 0 or not self.lru.items:
            return None, 0
        candidates: list[PrefixEntry] = []
        for h in block_hashes(key[:limit], think, self.BLOCK):
            holders = self.index.get(h)
            if not holders:
                break
            candidates = holders
        if not candidates:  # not one full block in common: too little to be worth a copy
            return None, 0
        best, best_len = None, 0
        for entry in candidates:
            m = min(limit, entry.key.numel())
            same = (entry.key[:m] == key[:m]).to(torch.int8)
            common = int(same.cumprod(0).sum())  # exact: also guards against a hash collision
            if common > best_len:
                best, best_len = entry, common
        if best is not None:
            self.lru.get(id(best))  # LRU touch
        return best, best_len
