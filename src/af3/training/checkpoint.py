"""Checkpoints of a run: what they hold, written atomically, and read back for an exact resume.

``output/checkpoint-NNNNNN/`` holds the model (HF layout; for LoRA stages only the peft adapter), the processor
files and ``trainer_state.pt``: the :class:`TrainState`, the batch layout it was written with, the optimizer
(keyed by parameter names), the scheduler and every rank's RNG states. A folder is written as ``.tmp-*`` and
renamed when complete, so a crash never leaves half a checkpoint; ``output/final/`` is the trained model (LoRA
merged, its adapter in ``final/adapter``). Resuming restores weights, optimizer, scheduler, data position and
RNGs, so the run continues exactly like an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import CheckpointError
from .errors import TrainingError

if TYPE_CHECKING:
    from .distributed import DistEnv, Strategy
    from .sections import TrainConfig
    from .stages import Stage

logger = logging.getLogger("af3")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.pt"
STATE_FORMAT = 1


@dataclass
class TrainState:
    """Where a run is; every field is saved in each checkpoint and restored on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next batch
    batch_in_epoch: int = 0  # batches of that epoch already trained on
    skipped: int = 0  # examples skipped for unreadable audio (all ranks)
    elapsed: float = 0.0  # seconds of the training loop, over all resumes
    tokens_seen: int = 0  # tokens of the batches trained on (all ranks)

    def load(self, saved: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, saved[f.name])


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


# ---------------------------------------------------------------------- folders

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


def resume_checkpoint(output: str, resume: bool | str, env: DistEnv) -> str | None:
    """The checkpoint to resume from (``train.resume``, decided on rank 0), or None for a fresh start; an output
    folder that already holds a run needs ``resume``."""
    choice: str | None = None
    error = None
    if env.is_main:
        existing = list_checkpoints(output)
        if resume is True:
            choice = existing[-1][1] if existing else None
            if choice is None:
                logger.info("no checkpoint in %s: starting from the beginning", output)
        elif isinstance(resume, str) and resume:
            if not os.path.isfile(os.path.join(resume, TRAINER_STATE)):
                error = f"cannot resume from {resume!r}: it is not a complete checkpoint (no {TRAINER_STATE})"
            choice = resume
        elif existing or os.path.isdir(os.path.join(output, "final")):
            error = (f"the output folder {output} already holds a run; resume it with --resume "
                     "(train.resume=true) or choose another output folder")
    error, choice = env.broadcast((error, choice))
    if error:
        raise TrainingError(error)
    return choice


def load_checkpoint_weights(model: nn.Module, ckpt: str, lora: bool) -> None:
    """The weights of checkpoint ``ckpt`` into ``model`` (set up for the same stage): its LoRA adapter when
    ``lora``, else all weights."""
    from ..model.weights import TensorSource, load_state, weight_files
    from .lora import load_lora_state, read_adapter

    if lora:
        _, tensors = read_adapter(ckpt)
        load_lora_state(model, tensors, source=ckpt)
    else:
        with TensorSource(weight_files(ckpt)) as source:
            load_state(model, source, model.config.text_config.tie_word_embeddings)


# ---------------------------------------------------------------------- writing and reading

class Checkpointer:
    """Saves the checkpoints and the final model of one run, and restores a run from a checkpoint."""

    def __init__(self, output: str, cfg: TrainConfig, stage: Stage, strategy: Strategy, processor: Any):
        self.output = output
        self.cfg = cfg
        self.stage = stage
        self.strategy = strategy
        self.env = strategy.env
        self.processor = processor

    def _skeleton(self) -> nn.Module:
        from ..model import AF3Model

        model = self.strategy.model
        with torch.device("meta"):
            return AF3Model(model.config, model.generation_config)

    def _write_model(self, folder: str, state: dict[str, Tensor], merged: bool) -> None:
        """HF-layout weights (LoRA merged when ``merged``) or, for LoRA checkpoints, the peft adapter."""
        from ..model.weights import StateSource, write_checkpoint
        from .lora import merged_state_dict, save_adapter

        if self.stage.uses_lora:
            lora_config = self.strategy.model.af3_lora_config
            if not merged:
                save_adapter(state, folder, lora_config, base_path=self.cfg.model.path)
                return
            save_adapter(state, os.path.join(folder, "adapter"), lora_config, base_path=self.cfg.model.path)
            state = merged_state_dict(state, lora_config)
        write_checkpoint(folder, StateSource(state), self._skeleton())

    def _write_folder(self, name: str, state: dict[str, Tensor], merged: bool, extra: dict | None = None) -> str:
        """Write model + processor (+ ``extra`` as the trainer state) into ``output/name`` atomically (rank 0)."""
        final = os.path.join(self.output, name)
        tmp = os.path.join(self.output, f".tmp-{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self._write_model(tmp, state, merged=merged)
        self.processor.save_pretrained(tmp)
        if extra is not None:
            torch.save(extra, os.path.join(tmp, TRAINER_STATE))
        _fsync_dir(tmp)
        _replace_dir(tmp, final)
        return final

    def save(self, state: TrainState, optimizer: torch.optim.Optimizer, scheduler: Any) -> str:
        """``output/checkpoint-<step>`` for an exact resume; keeps the last ``train.keep_last`` checkpoints."""
        env, t = self.env, self.cfg.train
        name = f"checkpoint-{state.step:06d}"
        model_state = self.strategy.model_state_dict()
        optim_state = self.strategy.optimizer_state_dict(optimizer)
        rngs = env.all_gather(rng_state())
        if env.is_main:
            final = self._write_folder(name, model_state, merged=False, extra={
                "format": STATE_FORMAT, **dataclasses.asdict(state),
                "world_size": env.world_size, "batch_size": t.batch_size, "grad_accum": t.grad_accum,
                "sampler_seed": t.seed, "stage": self.stage.name,
                "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rngs,
            })
            _fsync_dir(self.output)
            for _, old in list_checkpoints(self.output)[: -t.keep_last]:
                trash = os.path.join(self.output, ".deleting-" + os.path.basename(old))
                os.rename(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
            logger.info("saved %s", final)
        env.barrier()
        return os.path.join(self.output, name)

    def load(self, ckpt: str, state: TrainState, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
        """Restore ``state``, the optimizer, the scheduler and this rank's RNGs from ``ckpt`` (the weights are
        loaded with the model: :func:`load_checkpoint_weights`)."""
        env, t = self.env, self.cfg.train
        try:
            saved = torch.load(os.path.join(ckpt, TRAINER_STATE), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot read {os.path.join(ckpt, TRAINER_STATE)}: {e}") from None
        if saved.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{ckpt}: unknown trainer state format {saved.get('format')!r}")
        if saved["stage"] != self.stage.name:
            raise TrainingError(f"{ckpt} was written by stage {saved['stage']}, this run is {self.stage.name}")
        self.strategy.load_optimizer_state(optimizer, saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        state.load(saved)
        old_global = saved["batch_size"] * saved["world_size"]
        new_global = t.batch_size * env.world_size
        if old_global != new_global or saved["grad_accum"] != t.grad_accum or saved["sampler_seed"] != t.seed:
            logger.warning("resuming with another global batch / accumulation / seed than the checkpoint "
                           "(%d×%d, seed %d → %d×%d, seed %d): the data order will differ from the original run",
                           old_global, saved["grad_accum"], saved["sampler_seed"], new_global, t.grad_accum, t.seed)
            state.batch_in_epoch = state.batch_in_epoch * old_global // new_global
        rngs = saved["rng"]
        if len(rngs) != env.world_size:
            logger.warning("the checkpoint was written by %d process(es), this run has %d: random streams (dropout) "
                           "will differ", len(rngs), env.world_size)
        set_rng_state(rngs[env.rank % len(rngs)])

    def save_final(self) -> str:
        """``output/final``: an HF-layout checkpoint (LoRA merged, the adapter in ``final/adapter``) + processor."""
        model_state = self.strategy.model_state_dict()
        if self.env.is_main:
            final = self._write_folder("final", model_state, merged=True)
            logger.info("saved the final model to %s", final)
        self.env.barrier()
        return os.path.join(self.output, "final")
