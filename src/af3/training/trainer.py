"""The training loop: one process or many (torchrun, DDP or FSDP), exact resume, checkpoints, metrics.

Loss normalisation: every optimizer step minimises ``sum of token cross-entropies / label tokens of the whole
global batch`` (all micro-batches of the accumulation, all ranks). The label-token count is all-reduced before
the backward passes, each micro-batch's summed loss is scaled by ``world_size / count`` (DDP and FSDP average
gradients over ranks), so 1 process with batch 2B and 2 processes with batch B make the same update.

Distributed runs give every micro-batch audio (a silent one-row "filler" with no labels is appended to batches
without audio), so every rank runs the same modules and collectives in the same order; its gradient is exactly
zero. Resume restores weights, optimizer, scheduler, data position (sampler epoch + batches to skip) and every
RNG, so a resumed run continues exactly like an uninterrupted one.

Run it with ``af3 train CONFIG`` or ``[torchrun --nproc_per_node N] python -m af3.training.trainer CONFIG
[section.key=value ...] [--resume[=CHECKPOINT]]``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import AF3Error, CheckpointError, InputError
from ..processor import IGNORE_INDEX, AF3Inputs
from .config import TrainConfig, load_config, save_config
from .stages import Stage, apply_stage, get_stage

logger = logging.getLogger("af3")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.pt"
METRICS = "metrics.jsonl"
STATE_FORMAT = 1
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": None}


class TrainingError(AF3Error):
    """A run that cannot go on: too many unreadable files, an output folder in use, a checkpoint that does not fit."""


# ---------------------------------------------------------------------- distributed environment

@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistEnv:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK, pick the device and start the process group (nccl on CUDA,
    gloo on CPU) when there is more than one process."""
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    owns = False
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    elif world > 1:
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return DistEnv(rank, world, local, dev, owns)


def _all_reduce(t: Tensor, env: DistEnv) -> Tensor:
    if env.distributed:
        dist.all_reduce(t)
    return t


def _barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def _broadcast(value: Any, env: DistEnv) -> Any:
    if not env.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------- RNG

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as tensors and plain values (loadable with ``weights_only=True``)."""
    py = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [py[0], torch.tensor(py[1], dtype=torch.int64), py[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in values.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------- loss

def token_loss_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross entropy in float32 (position t predicts labels[t+1]; -100 is ignored)."""
    vocab = logits.shape[-1]
    pred = logits[:, :-1].float().reshape(-1, vocab)  # [B*(T-1), V]
    target = labels[:, 1:].to(logits.device).reshape(-1)  # [B*(T-1)]
    return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction="sum")


def token_accuracy_counts(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(correct argmax predictions, label tokens) after the causal shift."""
    target = labels[:, 1:].to(logits.device)  # [B, T-1]
    keep = target != IGNORE_INDEX
    correct = (logits[:, :-1].argmax(-1) == target) & keep
    return correct.sum(), keep.sum()


# ---------------------------------------------------------------------- optimizer and schedule

def _part_lr(name: str, o) -> float:
    """The peak lr of parameter ``name``: the longest matching ``optim.part_lr`` prefix, else ``optim.lr``."""
    best, lr = -1, o.lr
    for prefix, value in o.part_lr.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, lr = len(prefix), float(value)
    return lr


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; biases and norm weights (1-D) get no weight decay; ``optim.part_lr``
    gives parts of the model their own peak learning rate."""
    o = cfg.optim
    buckets: dict[tuple[float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            clean = name.removeprefix("module.").replace("_fsdp_wrapped_module.", "").replace("base_model.model.", "")
            buckets.setdefault((_part_lr(clean, o), p.dim() >= 2), []).append(p)
    groups = [{"params": params, "lr": lr, "weight_decay": o.weight_decay if decays else 0.0}
              for (lr, decays), params in sorted(buckets.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]
    if not groups:
        raise TrainingError(f"stage {cfg.stage} leaves no parameter trainable")
    return torch.optim.AdamW(groups, lr=o.lr, betas=(o.betas[0], o.betas[1]), eps=o.eps)


def lr_factor(step: int, total: int, warmup: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """Multiplier of the peak learning rate for optimizer step ``step`` (0-based): linear warm-up over
    ``warmup`` steps (the first step already has lr/(warmup+1)), then cosine/linear decay to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    decay = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
    return min_ratio + (1.0 - min_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    o = cfg.optim
    warmup = o.warmup_steps if o.warmup_steps is not None else math.ceil(o.warmup_ratio * total_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, warmup, o.schedule, o.min_lr_ratio))


# ---------------------------------------------------------------------- gradient checkpointing

def enable_gradient_checkpointing(model: nn.Module) -> int:
    """Recompute each encoder and decoder layer in the backward pass instead of storing its activations.

    Done from outside the model: each layer's ``forward`` is replaced (as an instance attribute, so module
    and parameter names do not change) by one that runs the original under ``torch.utils.checkpoint`` when
    gradients are on. Returns the number of layers."""
    from torch.utils.checkpoint import checkpoint

    layers = [*model.audio_tower.layers, *model.language_model.model.layers]
    for layer in layers:
        if getattr(layer, "_af3_checkpointed", False):
            continue
        inner = layer.forward

        def forward(*args: Any, _inner=inner, **kwargs: Any) -> Any:
            if torch.is_grad_enabled():
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)
            return _inner(*args, **kwargs)

        layer.forward = forward
        layer._af3_checkpointed = True
    return len(layers)


# ---------------------------------------------------------------------- data plumbing

class _EpochDataset(Dataset):
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


class _EpochBatches(Sampler):
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


class _Collate:
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


class _AudioFiller:
    """A silent audio row with no labels, appended to batches without audio in distributed runs."""

    def __init__(self, config: Any, pad_id: int, frames: int = 100):
        from ..model.encoder import pooled_lengths

        audio = config.audio_config
        self.pad_id = pad_id
        self.audio_token_id = config.audio_token_id
        self.n_tokens = int(pooled_lengths(torch.tensor([frames]))[0])
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


class _BatchStream:
    """Micro-batches for each optimizer step; a step never spans two epochs. Tracks (epoch, batches consumed)."""

    def __init__(self, loader: DataLoader, batches: _EpochBatches, epoch: int, consumed: int):
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


# ---------------------------------------------------------------------- progress display

class _Progress:
    """A rich progress bar on a terminal (rank 0), else a log line every ``log_every`` steps."""

    def __init__(self, enabled: bool, total: int, start: int, log_every: int):
        self.total, self.start, self.log_every = total, start, log_every
        self.t0 = time.monotonic()
        self.bar = None
        if enabled and sys.stdout.isatty():
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("step {task.completed}/{task.total}"), BarColumn(),
                                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
                                TimeElapsedColumn(), TimeRemainingColumn(), transient=False)
            self.task = self.bar.add_task("train", total=total, completed=start, loss="-", tps="-")
            self.bar.start()
        self.enabled = enabled

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        step = row["step"]
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{row['loss']:.4f}", tps=f"{row['tokens_per_s']:.0f}")
            return
        if step % self.log_every == 0 or step == self.total:
            done = step - self.start
            eta = (time.monotonic() - self.t0) / max(1, done) * (self.total - step)
            logger.info("step %d/%d  loss %.4f  lr %.3g  grad_norm %.3g  %.0f tok/s  eta %s", step, self.total,
                        row["loss"], row["lr"], row["grad_norm"], row["tokens_per_s"], _hms(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ---------------------------------------------------------------------- checkpoints on disk

def list_checkpoints(output: str) -> list[tuple[int, str]]:
    """(step, path) of the complete checkpoints in ``output``, oldest first."""
    if not os.path.isdir(output):
        return []
    found = []
    for name in os.listdir(output):
        m = CHECKPOINT_RE.match(name)
        path = os.path.join(output, name)
        if m and os.path.isfile(os.path.join(path, TRAINER_STATE)):
            found.append((int(m.group(1)), path))
    return sorted(found)


def _replace_dir(tmp: str, final: str) -> None:
    """Move the finished folder ``tmp`` to ``final`` (rename is atomic; an old ``final`` is removed first)."""
    if os.path.exists(final):
        trash = f"{final}.old-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.rename(tmp, final)


def _fsync_dir(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_training_model(path: str, dtype: torch.dtype | None = None):
    """The model to start from: an HF-layout checkpoint, or a LoRA checkpoint folder of an earlier run (adapter
    + recorded base), merged."""
    from ..model import AF3Model
    from .lora import ADAPTER_CONFIG, merged_state_dict, read_adapter
    from ..model.weights import StateSource, load_state

    has_weights = any(f.endswith(".safetensors") and not f.startswith("adapter_") for f in os.listdir(path)) \
        if os.path.isdir(path) else False
    if not has_weights and os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
        from .lora import load_adapter

        cfg, _ = read_adapter(path)
        base = AF3Model.from_pretrained(cfg.base_model_name_or_path, dtype=dtype)
        load_adapter(base, path)
        merged = merged_state_dict({k: v.detach() for k, v in base.state_dict().items()}, cfg)
        model = AF3Model.from_pretrained(cfg.base_model_name_or_path, dtype=dtype)
        load_state(model, StateSource(merged), model.config.text_config.tie_word_embeddings)
        return model
    return AF3Model.from_pretrained(path, dtype=dtype)


# ---------------------------------------------------------------------- the trainer

@dataclass
class TrainState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    skipped: int = 0
    elapsed: float = 0.0
    tokens_seen: int = 0


class Trainer:
    """One training run of :class:`TrainConfig` (use :func:`train`)."""

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.stage: Stage = get_stage(cfg.stage)
        self.output = os.path.abspath(cfg.output)
        self.state = TrainState()
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1
        self.last_loss: float | None = None

    # ------------------------------------------------------------------ setup
    def _resume_checkpoint(self) -> str | None:
        """The checkpoint to resume from (decided on rank 0), or None for a fresh start."""
        resume = self.cfg.train.resume
        choice: str | None = None
        error = None
        if self.env.is_main:
            existing = list_checkpoints(self.output)
            if resume is True:
                choice = existing[-1][1] if existing else None
                if choice is None:
                    logger.info("no checkpoint in %s: starting from the beginning", self.output)
            elif isinstance(resume, str) and resume:
                if not os.path.isfile(os.path.join(resume, TRAINER_STATE)):
                    error = f"cannot resume from {resume!r}: it is not a complete checkpoint (no {TRAINER_STATE})"
                choice = resume
            elif existing or os.path.isdir(os.path.join(self.output, "final")):
                error = (f"the output folder {self.output} already holds a run; resume it with --resume "
                         "(train.resume=true) or choose another output folder")
        error, choice = _broadcast((error, choice), self.env)
        if error:
            raise TrainingError(error)
        return choice

    def _load_model(self, ckpt: str | None) -> nn.Module:
        cfg = self.cfg
        seed_everything(cfg.train.seed)  # identical on every rank: LoRA initialisation
        model = load_training_model(cfg.model.path, _DTYPES[cfg.model.dtype])
        model = apply_stage(model, self.stage, cfg.lora)
        if ckpt is not None:
            self._load_weights(model, ckpt)
        model.train()
        if cfg.train.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        if self.env.distributed and cfg.train.strategy == "fsdp":
            return model  # fully_shard moves each unit to the device as it shards it: no full copy per GPU
        return model.to(self.env.device)

    def _load_weights(self, model: nn.Module, ckpt: str) -> None:
        from ..model.weights import TensorSource, load_state, weight_files
        from .lora import load_lora_state, read_adapter

        if self.stage.uses_lora:
            _, tensors = read_adapter(ckpt)
            load_lora_state(model, tensors, source=ckpt)
        else:
            with TensorSource(weight_files(ckpt)) as source:
                load_state(model, source, model.config.text_config.tie_word_embeddings)

    def _wrap(self, model: nn.Module) -> nn.Module:
        env = self.env
        if not env.distributed:
            return model
        if self.cfg.train.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(env.device.type, (env.world_size,))
            for layer in [*model.audio_tower.layers, *model.language_model.model.layers]:
                fully_shard(layer, mesh=mesh)
            fully_shard(model.audio_tower, mesh=mesh)
            fully_shard(model.multi_modal_projector, mesh=mesh)
            fully_shard(model, mesh=mesh)
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _loader(self, dataset: Any, batch_size: int, collate: Any, seed: int) -> tuple[DataLoader, _EpochBatches]:
        from .data import LengthGroupedSampler

        cfg, env = self.cfg, self.env
        sampler = LengthGroupedSampler(dataset.lengths(), batch_size, seed=seed, rank=env.rank,
                                       world_size=env.world_size, group_size=cfg.data.group_size,
                                       length_bucket=cfg.data.length_bucket)
        batches = _EpochBatches(dataset, sampler)
        workers = cfg.data.num_workers
        loader = DataLoader(_EpochDataset(dataset), batch_sampler=batches, collate_fn=_Collate(collate),
                            num_workers=workers, persistent_workers=workers > 0,
                            pin_memory=env.device.type == "cuda",
                            generator=torch.Generator().manual_seed(seed))
        return loader, batches

    # ------------------------------------------------------------------ run
    def fit(self) -> dict[str, Any]:
        from ..processor import AF3Processor
        from .data import Collator, MixtureDataset, parse_mixture

        cfg, env = self.cfg, self.env
        ckpt = self._resume_checkpoint()
        if env.is_main:
            os.makedirs(self.output, exist_ok=True)
            save_config(cfg, os.path.join(self.output, "config.yaml"))
        _barrier(env)
        processor = AF3Processor.from_pretrained(cfg.model.path)
        self.processor = processor
        model = self._load_model(ckpt)
        self.model = model
        wrapped = self._wrap(model)
        self.wrapped = wrapped
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(model, cfg)
        self.filler = _AudioFiller(model.config, processor.pad_token_id) if env.distributed else None
        self.autocast = _use_bf16(cfg.train.bf16, env.device)

        t = cfg.train
        collator = Collator(processor, assistant_only=t.assistant_only, max_audio_len=cfg.data.max_audio_len,
                            padding_side="right")
        mixture = parse_mixture(cfg.data.mixture, cfg.data.manifests)
        dataset = MixtureDataset(mixture, seed=t.seed, max_audio_len=cfg.data.max_audio_len)
        loader, batches = self._loader(dataset, t.batch_size, collator, t.seed)
        steps_per_epoch = math.ceil(batches.num_batches() / t.grad_accum)
        total = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * steps_per_epoch))
        scheduler = build_scheduler(optimizer, cfg, total)
        self.eval_data = None
        if cfg.data.eval:
            eval_set = MixtureDataset([(1.0, cfg.data.eval)], seed=0, max_audio_len=cfg.data.max_audio_len)
            self.eval_data = self._loader(eval_set, cfg.data.eval_batch_size, collator, 0)

        if ckpt is not None:
            self._load_trainer_state(ckpt, optimizer, scheduler)
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, self.state.step,
                        self.state.epoch, self.state.batch_in_epoch)
        else:
            seed_everything(t.seed + env.rank)  # dropout differs per rank; the weights are identical
        last_eval = self._trim_metrics(self.state.step) if env.is_main else None
        last_eval = _broadcast(last_eval, env)  # an eval already logged for the resumed step is not repeated
        if last_eval is not None:
            self.last_eval_step = last_eval["step"]
            self.last_eval = {k: last_eval[k] for k in ("eval_loss", "eval_token_accuracy")}
        logger.info("training %s on %d process(es) (%s, %s%s): %d steps of %d × %d × %d examples, %d steps/epoch",
                    self.stage.name, env.world_size, env.device, t.strategy if env.distributed else "single",
                    ", bf16 autocast" if self.autocast else "", total, t.batch_size, t.grad_accum, env.world_size,
                    steps_per_epoch)

        stream = _BatchStream(loader, batches, self.state.epoch, self.state.batch_in_epoch)
        progress = _Progress(env.is_main, total, self.state.step, t.log_every)
        t0, elapsed0 = time.monotonic(), self.state.elapsed
        t_prev = t0
        try:
            while self.state.step < total:
                micro = stream.next_step(t.grad_accum)
                row = self._train_step(micro, optimizer, scheduler)
                s = self.state
                s.step += 1
                s.epoch, s.batch_in_epoch = stream.position()
                now = time.monotonic()
                s.elapsed = elapsed0 + now - t0
                # Throughput over the whole step, data loading included (evaluation and saving are not).
                row.update(step=s.step, epoch=s.epoch, elapsed=round(s.elapsed, 3),
                           tokens_per_s=round(row["tokens"] / max(1e-9, now - t_prev), 1))
                self._write_metrics(row)
                progress.update(row)
                if self.eval_data is not None and t.eval_every and s.step % t.eval_every == 0:
                    self._evaluate()
                if t.save_every and (s.step % t.save_every == 0 or s.step == total):
                    self._save_checkpoint(optimizer, scheduler)
                t_prev = time.monotonic()
        finally:
            progress.close()
        if self.eval_data is not None and self.last_eval_step != self.state.step:
            self._evaluate()
        final = self._save_final()
        if env.is_main:
            from .plot import plot_metrics

            try:
                plot_metrics(os.path.join(self.output, METRICS), os.path.join(self.output, "training.png"))
            except Exception as e:  # a plot must never fail a finished run
                logger.warning("could not draw training.png: %s", e)
        _barrier(env)
        result = {"step": self.state.step, "loss": self.last_loss, "skipped": self.state.skipped,
                  "tokens_seen": self.state.tokens_seen, "output": self.output, "final": final}
        result.update(self.last_eval)
        return result

    # ------------------------------------------------------------------ one step
    def _prepare(self, batch: dict) -> AF3Inputs | None:
        inputs = batch["inputs"]
        if self.filler is not None:
            inputs = self.filler.ensure_audio(inputs)
        if inputs is None:
            return None
        return inputs.to(self.env.device)

    def _forward(self, inputs: AF3Inputs) -> Tensor:
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        with torch.autocast(self.env.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.wrapped(**model_inputs).logits

    def _sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Gradient all-reduce only on the last micro-batch of a step."""
        w = self.wrapped
        if hasattr(w, "set_requires_gradient_sync"):  # FSDP2
            w.set_requires_gradient_sync(enabled)
            return contextlib.nullcontext()
        if hasattr(w, "no_sync") and not enabled:  # DDP
            return w.no_sync()
        return contextlib.nullcontext()

    def _train_step(self, micro: list[dict], optimizer: torch.optim.Optimizer, scheduler: Any) -> dict:
        env, cfg, s = self.env, self.cfg, self.state
        skipped = [item for mb in micro for item in mb["skipped"]]
        for source, reason in skipped:
            logger.warning("skipped %s: %s", source, reason)
        tokens = sum(int(mb["inputs"]["attention_mask"].sum()) for mb in micro if mb["inputs"] is not None)
        counts = torch.tensor([sum(mb["num_label_tokens"] for mb in micro), len(skipped), tokens],
                              dtype=torch.int64, device=env.device)
        n_labels, n_skipped, n_tokens = (int(v) for v in _all_reduce(counts, env).tolist())
        s.skipped += n_skipped
        if s.skipped > cfg.data.max_skipped:
            raise TrainingError(
                f"{s.skipped} examples were skipped because their audio could not be read (more than "
                f"data.max_skipped={cfg.data.max_skipped}); see the 'skipped' warnings in the log for the manifest "
                "lines, fix or remove them, or raise data.max_skipped")
        s.tokens_seen += n_tokens

        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        scale = env.world_size / max(1, n_labels)
        for i, mb in enumerate(micro):
            inputs = self._prepare(mb)
            if inputs is None:
                continue
            with self._sync(i == len(micro) - 1):
                ce = token_loss_sum(self._forward(inputs), inputs["labels"])
                (ce * scale).backward()
            loss_sum += ce.detach().double()
        loss = float(_all_reduce(loss_sum, env)) / max(1, n_labels)

        group = optimizer.param_groups[0]  # the logged lr is optim.lr's (part_lr groups follow the same schedule)
        lr = cfg.optim.lr * scheduler.get_last_lr()[0] / group["initial_lr"]
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        grad_norm = float(grad_norm)
        if n_labels == 0:
            logger.warning("step %d has no supervised tokens in its global batch: no update", s.step + 1)
        elif not math.isfinite(grad_norm):
            logger.warning("step %d: gradient norm is %s; the update is skipped", s.step + 1, grad_norm)
        else:
            optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        self.last_loss = loss
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "label_tokens": n_labels, "tokens": n_tokens,
                "skipped": s.skipped}

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def _evaluate(self) -> dict[str, float]:
        env = self.env
        loader, batches = self.eval_data
        batches.set_epoch(0, 0)
        self.model.eval()
        # loss sum, correct predictions, label tokens, skipped examples
        totals = torch.zeros(4, dtype=torch.float64, device=env.device)
        try:
            for batch in loader:
                totals[3] += len(batch["skipped"])
                inputs = self._prepare(batch)
                if inputs is None:
                    continue
                logits = self._forward(inputs)
                correct, count = token_accuracy_counts(logits, inputs["labels"])
                totals[:3] += torch.stack([token_loss_sum(logits, inputs["labels"]).double(), correct.double(),
                                           count.double()])
        finally:
            self.model.train()
        loss_sum, correct, count, skipped = _all_reduce(totals, env).tolist()
        if count == 0:
            logger.warning("the evaluation set has no supervised tokens")
            return {}
        self.last_eval = {"eval_loss": loss_sum / count, "eval_token_accuracy": correct / count}
        self.last_eval_step = self.state.step
        row = {"step": self.state.step, **self.last_eval, "eval_tokens": int(count), "eval_skipped": int(skipped)}
        self._write_metrics(row)
        if env.is_main:
            logger.info("eval at step %d: loss %.4f, token accuracy %.4f", self.state.step,
                        self.last_eval["eval_loss"], self.last_eval["eval_token_accuracy"])
        return self.last_eval

    # ------------------------------------------------------------------ metrics
    def _write_metrics(self, row: dict) -> None:
        if not self.env.is_main:
            return
        with open(os.path.join(self.output, METRICS), "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def _trim_metrics(self, step: int) -> dict | None:
        """Drop rows after ``step`` (written by a run that died after its last checkpoint; all rows on a fresh
        start); returns the last eval row that is kept."""
        path = os.path.join(self.output, METRICS)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.strip()]
        keep = [r for r in rows if r.get("step", 0) <= step] if step > 0 else []
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in keep)
        os.replace(tmp, path)
        evals = [r for r in keep if "eval_loss" in r]
        return evals[-1] if evals else None

    # ------------------------------------------------------------------ checkpoints
    def _full_state(self) -> dict[str, Tensor]:
        """The whole model state on CPU (rank 0; empty on other ranks under FSDP)."""
        if self.env.distributed and self.cfg.train.strategy == "fsdp":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(self.wrapped, options=StateDictOptions(full_state_dict=True,
                                                                               cpu_offload=True))
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def _optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict:
        """Optimizer state keyed by parameter names (portable across strategies and world sizes)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(self.wrapped, optimizer,
                                        options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def _gather_rng(self) -> list[dict]:
        state = rng_state()
        if not self.env.distributed:
            return [state]
        out: list[Any] = [None] * self.env.world_size
        dist.all_gather_object(out, state)
        return out

    def _skeleton(self) -> nn.Module:
        from ..model import AF3Model

        with torch.device("meta"):
            return AF3Model(self.model.config, self.model.generation_config)

    def _write_model(self, folder: str, state: dict[str, Tensor], merged: bool) -> None:
        """HF-layout weights (LoRA merged when ``merged``) or, for LoRA checkpoints, the peft adapter."""
        from ..model.weights import StateSource, write_checkpoint
        from .lora import merged_state_dict, save_adapter

        if self.stage.uses_lora:
            if not merged:
                save_adapter(state, folder, self.model.af3_lora_config, base_path=self.cfg.model.path)
                return
            save_adapter(state, os.path.join(folder, "adapter"), self.model.af3_lora_config,
                         base_path=self.cfg.model.path)
            state = merged_state_dict(state, self.model.af3_lora_config)
        write_checkpoint(folder, StateSource(state), self._skeleton())

    def _save_checkpoint(self, optimizer: torch.optim.Optimizer, scheduler: Any) -> str:
        env, s = self.env, self.state
        name = f"checkpoint-{s.step:06d}"
        final = os.path.join(self.output, name)
        state = self._full_state()
        optim_state = self._optimizer_state(optimizer)
        rngs = self._gather_rng()
        if env.is_main:
            tmp = os.path.join(self.output, f".tmp-{name}")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            self._write_model(tmp, state, merged=False)
            self.processor.save_pretrained(tmp)
            t = self.cfg.train
            torch.save({
                "format": STATE_FORMAT, "step": s.step, "epoch": s.epoch, "batch_in_epoch": s.batch_in_epoch,
                "skipped": s.skipped, "elapsed": s.elapsed, "tokens_seen": s.tokens_seen,
                "world_size": env.world_size, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
                "sampler_seed": t.seed, "stage": self.stage.name,
                "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rngs,
            }, os.path.join(tmp, TRAINER_STATE))
            _fsync_dir(tmp)
            _replace_dir(tmp, final)
            _fsync_dir(self.output)
            for _, old in list_checkpoints(self.output)[: -self.cfg.train.keep_last]:
                trash = os.path.join(self.output, ".deleting-" + os.path.basename(old))
                os.rename(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
            logger.info("saved %s", final)
        _barrier(env)
        return final

    def _load_trainer_state(self, ckpt: str, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        env, t = self.env, self.cfg.train
        try:
            saved = torch.load(os.path.join(ckpt, TRAINER_STATE), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {os.path.join(ckpt, TRAINER_STATE)}: {e}") from None
        if saved.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{ckpt}: unknown trainer state format {saved.get('format')!r}")
        if saved["stage"] != self.stage.name:
            raise TrainingError(f"{ckpt} was written by stage {saved['stage']}, this run is {self.stage.name}")
        set_optimizer_state_dict(self.wrapped, optimizer, saved["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        scheduler.load_state_dict(saved["scheduler"])
        s = self.state
        s.step, s.epoch, s.batch_in_epoch = saved["step"], saved["epoch"], saved["batch_in_epoch"]
        s.skipped, s.elapsed, s.tokens_seen = saved["skipped"], saved["elapsed"], saved["tokens_seen"]
        old_global = saved["batch_size"] * saved["world_size"]
        new_global = t.batch_size * env.world_size
        if old_global != new_global or saved["grad_accum"] != t.grad_accum or saved["sampler_seed"] != t.seed:
            logger.warning("resuming with another global batch / accumulation / seed than the checkpoint "
                           "(%d×%d, seed %d → %d×%d, seed %d): the data order will differ from the original run",
                           old_global, saved["grad_accum"], saved["sampler_seed"], new_global, t.grad_accum, t.seed)
            s.batch_in_epoch = s.batch_in_epoch * old_global // new_global
        rngs = saved["rng"]
        if len(rngs) != env.world_size:
            logger.warning("the checkpoint was written by %d process(es), this run has %d: random streams (dropout) "
                           "will differ", len(rngs), env.world_size)
        set_rng_state(rngs[env.rank % len(rngs)])

    def _save_final(self) -> str:
        """``output/final``: an HF-layout checkpoint (LoRA merged, the adapter in ``final/adapter``) + processor."""
        env = self.env
        final = os.path.join(self.output, "final")
        state = self._full_state()
        if env.is_main:
            tmp = os.path.join(self.output, ".tmp-final")
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
            self._write_model(tmp, state, merged=True)
            self.processor.save_pretrained(tmp)
            _fsync_dir(tmp)
            _replace_dir(tmp, final)
            logger.info("saved the final model to %s", final)
        _barrier(env)
        return final


def _use_bf16(setting: bool | str, device: torch.device) -> bool:
    if setting == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    if setting and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise InputError("train.bf16=true but this GPU does not support bfloat16; use train.bf16=false")
    return bool(setting)


# ---------------------------------------------------------------------- entry points

def train(config: TrainConfig) -> dict[str, Any]:
    """Run one training job (single process, or one rank of a torchrun job); returns the final metrics:
    ``step``, ``loss`` (last step), ``eval_loss``/``eval_token_accuracy`` (with ``data.eval``), ``skipped``,
    ``tokens_seen``, ``output`` and ``final`` (the folder of the trained model)."""
    env = setup_distributed(config.train.device)
    handler = None
    try:
        if env.is_main:
            os.makedirs(config.output, exist_ok=True)
            handler = logging.FileHandler(os.path.join(config.output, "train.log"), encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
        return Trainer(config, env).fit()
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        if env.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def run(config_path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
        resume: bool | str | None = None) -> dict[str, Any]:
    """Load ``config_path`` + ``KEY=VALUE`` overrides and train; ``resume`` (if not None) replaces
    ``train.resume``: True = the latest checkpoint of the output folder, a path = that checkpoint."""
    cfg = load_config(config_path, list(overrides))
    if resume is not None:
        cfg.train.resume = os.path.abspath(resume) if isinstance(resume, str) else resume
    return train(cfg)


def main(argv: list[str] | None = None) -> int:
    """``python -m af3.training.trainer CONFIG [KEY=VALUE ...] [--resume[=CHECKPOINT]]``."""
    args = list(sys.argv[1:] if argv is None else argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(message)s")
    resume: bool | str | None = None
    rest = []
    for a in args:
        if a == "--resume":
            resume = True
        elif a.startswith("--resume="):
            resume = a.split("=", 1)[1]
        else:
            rest.append(a)
    if not rest or rest[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if rest else 2
    try:
        metrics = run(rest[0], rest[1:], resume)
    except AF3Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if rank == 0:
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
