"""Training data: weighted mixtures of manifests, the dataset that decodes their audio, a length-grouped
distributed batch sampler, and the collator.

Manifests (JSONL and NVIDIA's JSON) are read by :mod:`af3.training.manifest` and mixture specs by
:mod:`af3.training.mixture`; their public names are importable from here too. Audio is decoded only in
:meth:`MixtureDataset.__getitem__` (so DataLoader workers do it); an unreadable audio file turns the item into
``{"skipped": source, "reason": ...}`` instead of an exception, and :class:`Collator` drops and reports it.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from torch.utils.data import Dataset, Sampler

from ..audio import SAMPLING_RATE
from ..config import MAX_AUDIO_SECONDS
from ..errors import AF3Error, InputError
from ..processor import IGNORE_INDEX, load_audio_part
from .manifest import Example, load_manifest, resolve_audio_path
from .mixture import check_weight, parse_mixture

logger = logging.getLogger("af3")


# ----------------------------------------------------------------------------------------------------------
# the dataset


class MixtureDataset(Dataset):
    """The examples of a weighted mixture of manifests, re-drawn each epoch.

    A manifest with weight ``w`` contributes each example ``floor(w)`` times per epoch plus once more with
    probability ``frac(w)``, drawn from a generator seeded by ``(seed, epoch)`` (one independent stream per
    mixture term). The list is in manifest order; the sampler shuffles.
    """

    def __init__(self, mixture: list[tuple[float, str]], seed: int = 0, max_audio_len: float = MAX_AUDIO_SECONDS,
                 epoch: int = 0):
        if not mixture:
            raise InputError("the data mixture is empty")
        if not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        self.mixture = [(check_weight(w, f"{w}*{p}"), os.fspath(p)) for w, p in mixture]
        self.seed = seed
        self.max_audio_len = max_audio_len
        loaded: dict[str, list[Example]] = {}
        self.manifests: list[list[Example]] = []
        for _, path in self.mixture:
            key = os.path.abspath(path)
            if key not in loaded:
                loaded[key] = load_manifest(path, max_audio_len)
            self.manifests.append(loaded[key])
        self._term = np.zeros(0, dtype=np.int64)
        self._index = np.zeros(0, dtype=np.int64)
        self.epoch = epoch
        self.set_epoch(epoch)

    def set_epoch(self, epoch: int) -> None:
        """Draw the examples of ``epoch`` (deterministic given the seed)."""
        self.epoch = int(epoch)
        streams = np.random.SeedSequence([self.seed, self.epoch]).spawn(len(self.mixture))
        terms, indices = [], []
        for k, ((weight, _), examples, stream) in enumerate(zip(self.mixture, self.manifests, streams, strict=True)):
            n = len(examples)
            whole, frac = math.floor(weight), weight - math.floor(weight)
            counts = np.full(n, whole, dtype=np.int64)
            if frac > 0:
                counts += np.random.default_rng(stream).random(n) < frac
            picked = np.repeat(np.arange(n, dtype=np.int64), counts)
            indices.append(picked)
            terms.append(np.full(len(picked), k, dtype=np.int64))
        self._term = np.concatenate(terms)
        self._index = np.concatenate(indices)
        if len(self._index) == 0:
            logger.warning("the data mixture drew no examples for epoch %d (all weights are fractional and small)",
                           self.epoch)

    def __len__(self) -> int:
        return len(self._index)

    def example(self, i: int) -> Example:
        """The :class:`Example` behind index ``i`` of this epoch."""
        if not 0 <= i < len(self._index):
            raise IndexError(f"index {i} out of range for {len(self._index)} examples")
        return self.manifests[self._term[i]][self._index[i]]

    def lengths(self) -> list[int]:
        """Estimated token length of each index of this epoch (for :class:`LengthGroupedSampler`)."""
        return [self.manifests[t][e].length for t, e in zip(self._term.tolist(), self._index.tolist(), strict=True)]

    def term_of(self, i: int) -> int:
        """Which mixture term index ``i`` of this epoch comes from."""
        return int(self._term[i])

    def __getitem__(self, i: int) -> dict:
        """``{"messages", "source"}`` with audio decoded to 16 kHz float32 arrays, or ``{"skipped", "reason"}``
        when an audio cannot be read (never raises for bad audio)."""
        example = self.example(int(i))
        messages = []
        try:
            for m in example.messages:
                content = []
                for part in m["content"]:
                    if part.get("type") == "text":
                        content.append(dict(part))
                    else:
                        wave = load_audio_part(part)
                        content.append({"type": "audio", "audio": wave, "sampling_rate": SAMPLING_RATE})
                messages.append({"role": m["role"], "content": content})
        except Exception as e:  # any decoding failure skips the example; the trainer reports it
            return {"skipped": example.source, "reason": _one_line(e)}
        return {"messages": messages, "source": example.source}


def _one_line(error: BaseException, limit: int = 300) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if not isinstance(error, AF3Error):
        text = f"{type(error).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------------
# batching


class LengthGroupedSampler(Sampler[list[int]]):
    """Batch sampler that groups examples of similar length, identical across any number of processes.

    Per epoch (deterministic given ``(seed, epoch)``): shuffle all indices, cut them into mega-groups of
    ``group_size * world_size * batch_size``, sort each mega-group by length (longest first), cut it into global
    batches of ``world_size * batch_size`` and shuffle the order of the global batches. Rank ``r`` gets the
    ``r``-th contiguous slice of each global batch, so the global batches depend only on
    ``world_size * batch_size``: N processes see exactly the batches one process with an N times larger batch
    would see. The last, incomplete global batch is dropped (``drop_last``) or split as evenly as possible;
    when it has fewer items than ranks, ranks without an item of their own repeat one so that none is idle.

    ``length_bucket`` > 0 sorts by ``length // length_bucket`` instead: examples in one bucket keep their random
    order, so a batch mixes the sources whose lengths fall in the same bucket (e.g. ``750``, one 30 s window of
    audio tokens: short clips of every task share batches, multi-window clips batch together) instead of
    clustering by source when lengths correlate with it.

    ``lengths`` may be reassigned (e.g. after ``MixtureDataset.set_epoch``); ``skip_batches`` (set on resume)
    skips that many batches at the start of the epoch and is not reset by :meth:`set_epoch`.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 group_size: int = 50, drop_last: bool = False, length_bucket: int = 0):
        if batch_size < 1 or world_size < 1 or group_size < 1:
            raise InputError("batch_size, world_size and group_size must be at least 1")
        if length_bucket < 0:
            raise InputError(f"length_bucket must be 0 or positive, got {length_bucket}")
        if not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is outside 0..{world_size - 1}")
        if not isinstance(seed, int) or seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {seed!r}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.group_size = group_size
        self.drop_last = drop_last
        self.length_bucket = length_bucket
        self.epoch = 0
        self.skip_batches = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def num_global_batches(self) -> int:
        """Global batches in an epoch (before ``skip_batches``)."""
        full, rest = divmod(len(self.lengths), self.global_batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def global_batches(self) -> list[list[int]]:
        """Every rank's batches of this epoch, in order; each is ``world_size * batch_size`` indices."""
        size = self.global_batch_size
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(len(self.lengths))
        lengths = np.asarray(self.lengths, dtype=np.int64)
        if self.length_bucket:
            lengths = lengths // self.length_bucket
        mega = self.group_size * size
        batches: list[list[int]] = []
        for start in range(0, len(order), mega):
            group = order[start:start + mega]
            group = group[np.argsort(-lengths[group], kind="stable")]
            batches.extend(group[k:k + size].tolist() for k in range(0, len(group), size))
        if self.drop_last and batches and len(batches[-1]) < size:
            batches.pop()
        return [batches[k] for k in rng.permutation(len(batches))]

    def rank_slice(self, batch: list[int]) -> list[int]:
        """This rank's contiguous share of a global batch."""
        n, w = len(batch), self.world_size
        if n < w:  # fewer items than ranks (last batch): every rank needs something to run its step
            return [batch[self.rank % n]]
        base, extra = divmod(n, w)
        start = self.rank * base + min(self.rank, extra)
        return batch[start:start + base + (1 if self.rank < extra else 0)]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches()[self.skip_batches:]:
            yield self.rank_slice(batch)

    def __len__(self) -> int:
        return max(0, self.num_global_batches() - self.skip_batches)


class Collator:
    """Items of :class:`MixtureDataset` → a labelled batch; skipped items (and conversations the processor
    rejects) are left out and reported.

    Returns ``{"inputs": AF3Inputs with labels, or None if nothing is left, "skipped": [(source, reason)],
    "num_label_tokens": supervised tokens after the causal shift, "sources": sources of the kept items}``.
    """

    def __init__(self, processor: Any, assistant_only: bool = True, max_audio_len: float | None = None,
                 padding_side: str = "right"):
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        self.processor = processor
        self.assistant_only = assistant_only
        self.max_audio_len = max_audio_len
        self.padding_side = padding_side

    def encode(self, items: list[dict]) -> Any:
        """Tokenize and featurize the conversations of ``items`` (no skipping)."""
        return self.processor.apply_chat_template(
            [item["messages"] for item in items],
            tokenize=True,
            return_dict=True,
            output_labels=True,
            assistant_only=self.assistant_only,
            padding_side=self.padding_side,
            max_audio_len=self.max_audio_len,
        )

    def __call__(self, items: list[dict]) -> dict:
        kept = [item for item in items if "skipped" not in item]
        skipped = [(item["skipped"], item.get("reason", "")) for item in items if "skipped" in item]
        inputs = None
        if kept:
            try:
                inputs = self.encode(kept)
            except AF3Error:  # find the conversations the processor rejects, report them, keep the rest
                good = []
                for item in kept:
                    try:
                        self.encode([item])
                        good.append(item)
                    except AF3Error as e:
                        skipped.append((item["source"], _one_line(e)))
                kept = good
                inputs = self.encode(kept) if kept else None
        num_label_tokens = 0 if inputs is None else int((inputs["labels"][:, 1:] != IGNORE_INDEX).sum())
        return {"inputs": inputs, "skipped": skipped, "num_label_tokens": num_label_tokens,
                "sources": [item["source"] for item in kept]}


__all__ = [
    "Collator",
    "Example",
    "LengthGroupedSampler",
    "MixtureDataset",
    "load_manifest",
    "parse_mixture",
    "resolve_audio_path",
]
