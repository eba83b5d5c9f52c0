"""Batches for the training loop: the datasets of ``data.*`` behind DataLoaders that follow the epoch and can
start mid-epoch (exact resume), and the stream of micro-batches that make each optimizer step.

Items are addressed as ``(epoch, index, duplicate)`` so that workers (persistent ones keep their own dataset copy)
follow the epoch, and so that items which only fill an idle rank in the last global batch are not counted twice.
Distributed runs give every micro-batch audio (:class:`AudioFiller`), so every rank runs the same modules and
collectives in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..config import IGNORE_INDEX
from ..features import conv_output_lengths
from ..processor import AF3Inputs
from .data import Collator, LengthGroupedSampler, MixtureDataset, parse_mixture
from .errors import TrainingError

if TYPE_CHECKING:
    from .distributed import DistEnv
    from .sections import TrainConfig

#: A DataLoader and its batch sampler (which sets the epoch and the batches to skip).
Loader = tuple[DataLoader, "EpochBatches"]


class EpochDataset(Dataset):
    """Items addressed as ``(epoch, index, duplicate)``: workers follow the epoch (persistent workers keep their
    own dataset copy) and items that only fill an idle rank are marked."""

    def __init__(self, dataset: Any):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, bool]) -> dict:
        epoch, index, duplicate = key
        if self.dataset.epoch != epoch:
            self.dataset.set_epoch(epoch)
        item = dict(self.dataset[index])
        if duplicate:
            item["_duplicate"] = True
        return item


class EpochBatches(Sampler):
    """Batch sampler over :class:`LengthGroupedSampler` for one epoch at a time (``set_epoch(epoch, skip)``)."""

    def __init__(self, dataset: Any, sampler: Any):
        self.dataset = dataset
        self.sampler = sampler
        self.epoch = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        if self.dataset.epoch != epoch:
            self.dataset.set_epoch(epoch)
        self.epoch = epoch
        self.sampler.lengths = self.dataset.lengths()
        self.sampler.set_epoch(epoch)
        self.sampler.skip_batches = skip

    def num_batches(self) -> int:
        """Batches of the whole epoch (ignoring skip)."""
        return self.sampler.num_global_batches()

    def __iter__(self) -> Iterator[list[tuple[int, int, bool]]]:
        s = self.sampler
        for batch in s.global_batches()[s.skip_batches:]:
            # The last global batch may have fewer items than ranks: idle ranks repeat an item, which must not
            # count twice.
            duplicate = len(batch) < s.world_size and s.rank >= len(batch)
            yield [(self.epoch, i, duplicate) for i in s.rank_slice(batch)]

    def __len__(self) -> int:
        return len(self.sampler)


class DuplicateAwareCollate:
    """The :class:`Collator` plus: a batch made only of duplicates keeps its forward pass but has no labels."""

    def __init__(self, collator: Any):
        self.collator = collator

    def __call__(self, items: list[dict]) -> dict:
        duplicate = bool(items) and all(item.get("_duplicate") for item in items)
        out = self.collator([{k: v for k, v in item.items() if k != "_duplicate"} for item in items])
        if duplicate:
            if out["inputs"] is not None:
                out["inputs"]["labels"].fill_(IGNORE_INDEX)
            out["num_label_tokens"] = 0
            out["skipped"] = []
        return out


def build_loader(dataset: Any, batch_size: int, collate: Any, seed: int, cfg: TrainConfig, env: DistEnv) -> Loader:
    """A DataLoader over ``dataset`` in length-grouped global batches, this rank's share of each."""
    sampler = LengthGroupedSampler(dataset.lengths(), batch_size, seed=seed, rank=env.rank,
                                   world_size=env.world_size, group_size=cfg.data.group_size,
                                   length_bucket=cfg.data.length_bucket)
    batches = EpochBatches(dataset, sampler)
    workers = cfg.data.num_workers
    loader = DataLoader(EpochDataset(dataset), batch_sampler=batches, collate_fn=DuplicateAwareCollate(collate),
                        num_workers=workers, persistent_workers=workers > 0,
                        pin_memory=env.device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    return loader, batches


def build_data(cfg: TrainConfig, processor: Any, env: DistEnv) -> tuple[Loader, Loader | None]:
    """The training batches of ``data.mixture`` and the evaluation batches of ``data.eval`` (None without it)."""
    t, d = cfg.train, cfg.data
    collator = Collator(processor, assistant_only=t.assistant_only, max_audio_len=d.max_audio_len,
                        padding_side="right")
    dataset = MixtureDataset(parse_mixture(d.mixture, d.manifests), seed=t.seed, max_audio_len=d.max_audio_len)
    train = build_loader(dataset, t.batch_size, collator, t.seed, cfg, env)
    if not d.eval:
        return train, None
    eval_set = MixtureDataset([(1.0, d.eval)], seed=0, max_audio_len=d.max_audio_len)
    return train, build_loader(eval_set, d.eval_batch_size, collator, 0, cfg, env)


class AudioFiller:
    """A silent audio row with no labels, appended to batches without audio in distributed runs (its gradient
    is exactly zero)."""

    def __init__(self, config: Any, pad_id: int, frames: int = 100):
        audio = config.audio_config
        self.pad_id = pad_id
        self.audio_token_id = config.audio_token_id
        self.n_tokens = int(conv_output_lengths(frames)[1])
        width = 2 * audio.max_source_positions
        self.features = torch.zeros(1, audio.num_mel_bins, width)
        self.mask = torch.zeros(1, width, dtype=torch.long)
        self.mask[0, :frames] = 1

    def ensure_audio(self, inputs: AF3Inputs | None) -> AF3Inputs:
        if inputs is not None and inputs.get("input_features") is not None:
            return inputs
        n = self.n_tokens
        if inputs is None:
            ids = torch.full((1, n), self.audio_token_id, dtype=torch.long)
            return AF3Inputs(input_ids=ids, attention_mask=torch.ones_like(ids),
                             labels=torch.full_like(ids, IGNORE_INDEX), input_features=self.features.clone(),
                             input_features_mask=self.mask.clone())
        b, t = inputs["input_ids"].shape
        width = max(t, n)
        ids = torch.full((b + 1, width), self.pad_id, dtype=inputs["input_ids"].dtype)
        mask = torch.zeros((b + 1, width), dtype=inputs["attention_mask"].dtype)
        labels = torch.full((b + 1, width), IGNORE_INDEX, dtype=inputs["labels"].dtype)
        ids[:b, :t], mask[:b, :t], labels[:b, :t] = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
        ids[b, :n], mask[b, :n] = self.audio_token_id, 1
        out = AF3Inputs(inputs)
        out.update(input_ids=ids, attention_mask=mask, labels=labels, input_features=self.features.clone(),
                   input_features_mask=self.mask.clone())
        return out


class BatchStream:
    """Micro-batches for each optimizer step; a step never spans two epochs. Tracks (epoch, batches consumed)."""

    def __init__(self, loader: DataLoader, batches: EpochBatches, epoch: int, consumed: int):
        self.loader = loader
        self.batches = batches
        self.epoch = epoch
        self.consumed = consumed
        self.remaining = 0
        self._it: Iterator | None = None

    def _start_epoch(self) -> None:
        for _ in range(3):
            self.batches.set_epoch(self.epoch, self.consumed)
            self.remaining = len(self.batches)
            if self.remaining > 0:
                self._it = iter(self.loader)
                return
            self.epoch, self.consumed = self.epoch + 1, 0
        raise TrainingError("the data mixture yields no batches; check data.mixture and its manifests")

    def next_step(self, accum: int) -> list[dict]:
        if self._it is None or self.remaining == 0:
            if self._it is not None:
                self.epoch, self.consumed = self.epoch + 1, 0
            self._start_epoch()
        out = []
        while len(out) < accum and self.remaining > 0:
            out.append(next(self._it))
            self.remaining -= 1
            self.consumed += 1
        return out

    def position(self) -> tuple[int, int]:
        """(epoch, batches consumed in it) to resume from: the next batch to train on."""
        if self._it is not None and self.remaining == 0:
            return self.epoch + 1, 0
        return self.epoch, self.consumed
