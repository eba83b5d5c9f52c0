"""Checkpoints of a run: what they hold, written atomically, and read back for an exact resume.

``output/checkpoint-NNNNNN/`` holds the model (HF layout; for LoRA stages only the peft adapter), the processor
files and ``trainer_state.pt``: the :class:`TrainState`, the batch layout it was written with, the resolved run
config, the optimizer (keyed by parameter names), the scheduler and every rank's RNG states. Every checkpoint and
``output/final/`` (the trained model, LoRA merged, its adapter in ``final/adapter``) is written through
:func:`af3.files.atomic_folder`: built next to its final name, every file and folder flushed to disk, then swapped
in one step, so a crash or a power loss never leaves half a checkpoint. Resuming restores weights, optimizer,
scheduler, data position and RNGs, so the run continues exactly like an uninterrupted one.

What a resumed run may change (:func:`check_resume_config`): the settings in :data:`MUST_MATCH` (the stage, the
weights' dtype, the LoRA shape and scale, and the optimizer settings that the restored optimizer state would
silently override) must be the checkpoint's, else it is a :class:`TrainingError`; for LoRA stages so must the base
model (``model.path``). Those in :data:`MAY_CHANGE` (the data, the schedule's length and shape, the batch layout)
may change with a warning: the run goes on, but no longer like the original one. Everything else (logging,
evaluation, saving, workers, device, ``max_grad_norm``, LoRA dropout) may change freely.
"""

from __future__ import annotations

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

from ..errors import AF3Error, CheckpointError
from ..files import atomic_folder
from .errors import TrainingError

if TYPE_CHECKING:
    from .distributed import DistEnv, Strategy
    from .sections import TrainConfig
    from .stages import Stage

logger = logging.getLogger("af3")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: What a crash can leave in an output folder: atomic_folder's building/replaced folders, checkpoints being deleted
#: and the temporary names of earlier versions.
LEFTOVER_RE = re.compile(r"^(\.(checkpoint-\d+|final)\.(tmp|old)-.+|\.deleting-checkpoint-\d+"
                         r"|\.tmp-(checkpoint-\d+|final)|(checkpoint-\d+|final)\.old-\d+)$")
TRAINER_STATE = "trainer_state.pt"
STATE_FORMAT = 1
#: Keys every trainer state holds (later versions add "config", "label_tokens", "epoch_label_tokens").
STATE_KEYS = ("step", "epoch", "batch_in_epoch", "skipped", "elapsed", "tokens_seen", "world_size", "batch_size",
              "grad_accum", "sampler_seed", "stage", "optimizer", "scheduler", "rng")
#: Settings a resumed run must share with its checkpoint (see the module docstring).
MUST_MATCH = ("stage", "model.dtype", "lora.r", "lora.alpha", "lora.target_modules", "optim.lr", "optim.betas",
              "optim.eps", "optim.weight_decay", "optim.part_lr")
#: Settings a resumed run may change, with a warning.
MAY_CHANGE = ("data.mixture", "data.manifests", "data.max_audio_len", "train.assistant_only", "train.max_steps",
              "train.epochs", "optim.schedule", "optim.warmup_steps", "optim.warmup_ratio", "optim.min_lr_ratio")


@dataclass
class TrainState:
    """Where a run is; every field is saved in each checkpoint and restored on resume."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # epoch of the next batch
    batch_in_epoch: int = 0  # batches of that epoch already trained on
    skipped: int = 0  # examples skipped for unreadable audio (all ranks)
    elapsed: float = 0.0  # seconds of the training loop, over all resumes
    tokens_seen: int = 0  # tokens of the batches trained on (all ranks)
    label_tokens: int = 0  # supervised (label) tokens trained on (all ranks)
    epoch_label_tokens: int = 0  # of them, in the epoch of the next batch

    def load(self, saved: dict[str, Any]) -> None:
        for f in dataclasses.fields(self):
            # States written before label tokens were counted: any token seen counts as "some were supervised".
            setattr(self, f.name, saved[f.name] if f.name in saved else saved["tokens_seen"])


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


def clean_leftovers(output: str) -> None:
    """Remove what an interrupted run left in ``output`` (half-built or half-deleted folders); only the run that
    holds the output folder's lock may call this."""
    if not os.path.isdir(output):
        return
    for name in os.listdir(output):
        if LEFTOVER_RE.match(name):
            shutil.rmtree(os.path.join(output, name), ignore_errors=True)


def resume_checkpoint(output: str, resume: bool | str, env: DistEnv) -> str | None:
    """The checkpoint to resume from (``train.resume``, decided on rank 0), or None for a fresh start; an output
    folder that already holds a run needs ``resume``."""
    choice: str | None = None
    error = None
    if env.is_main:
        existing = list_checkpoints(output)
        finished = os.path.isdir(os.path.join(output, "final"))
        if resume is True:
            choice = existing[-1][1] if existing else None
            if choice is None and finished:
                error = (f"the output folder {output} holds a finished run (final/) but no checkpoint to resume from "
                         "(train.save_every=0?); starting again would replace final/: choose another output folder")
            elif choice is None:
                logger.info("no checkpoint in %s: starting from the beginning", output)
        elif isinstance(resume, str) and resume:
            if not os.path.isfile(os.path.join(resume, TRAINER_STATE)):
                what = "it does not exist" if not os.path.exists(resume) else f"no {TRAINER_STATE} in it"
                error = f"cannot resume from {resume!r}: it is not a complete checkpoint ({what})"
            choice = resume
        elif existing or finished:
            error = (f"the output folder {output} already holds a run; resume it with --resume "
                     "(train.resume=true) or choose another output folder")
    error, choice = env.broadcast((error, choice))
    if error:
        raise TrainingError(error)
    return choice


def _first_line(error: BaseException, limit: int = 200) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_trainer_state(ckpt: str) -> dict[str, Any]:
    """The ``trainer_state.pt`` of checkpoint ``ckpt``, checked to hold everything a resume needs (memory-mapped:
    the optimizer state is read when it is loaded)."""
    path = os.path.join(ckpt, TRAINER_STATE)
    hint = "the checkpoint is damaged; resume from an earlier one with --resume=CHECKPOINT"
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated, not a torch file, unsafe pickles: all mean a damaged checkpoint
        raise CheckpointError(f"cannot read {path} ({_first_line(e)}); {hint}") from None
    if not isinstance(saved, dict) or saved.get("format") != STATE_FORMAT:
        found = saved.get("format") if isinstance(saved, dict) else type(saved).__name__
        raise CheckpointError(f"{path}: unknown trainer state format {found!r}; {hint}")
    missing = [k for k in STATE_KEYS if k not in saved]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; {hint}")
    return saved


def _get(tree: dict, key: str) -> Any:
    for part in key.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


def check_resume_config(saved: dict[str, Any], cfg: TrainConfig, ckpt: str, warn: bool = True) -> None:
    """Stop (a :class:`TrainingError`) when ``cfg`` changes a :data:`MUST_MATCH` setting of the run that wrote
    ``saved``; warn about changed :data:`MAY_CHANGE` settings (module docstring)."""
    hint = (f"resume with the checkpoint's settings, or start a new run in another output folder with "
            f"model.path={ckpt}")
    if saved["stage"] != cfg.stage:
        raise TrainingError(f"cannot resume {ckpt}: it was written by stage {saved['stage']}, this run is "
                            f"{cfg.stage}; {hint}")
    old = saved.get("config")
    if not isinstance(old, dict):
        return  # written before checkpoints recorded their config
    new = cfg.to_dict()
    must = list(MUST_MATCH)
    if cfg.stage == "stage3.5":  # the adapter only makes sense on its base model
        must.append("model.path")
        if os.path.realpath(str(_get(old, "model.path"))) == os.path.realpath(cfg.model.path):
            must.remove("model.path")
    for key in must:
        if _get(old, key) != _get(new, key):
            raise TrainingError(f"cannot resume {ckpt}: it was trained with {key}={_get(old, key)!r}, this run has "
                                f"{key}={_get(new, key)!r}; {hint}")
    changed = [key for key in MAY_CHANGE if _get(old, key) != _get(new, key)]
    if changed and warn:
        logger.warning("resuming %s with other settings than it was trained with (%s): the run goes on, but not "
                       "like the original one", ckpt, ", ".join(f"{k}: {_get(old, k)!r} → {_get(new, k)!r}"
                                                                 for k in changed))


def load_checkpoint_weights(model: nn.Module, ckpt: str, lora: bool) -> None:
    """The weights of checkpoint ``ckpt`` into ``model`` (set up for the same stage): its LoRA adapter when
    ``lora``, else all weights."""
    from ..model.weights import folder_source, load_state
    from .lora import load_lora_state, read_adapter

    if lora:
        _, tensors = read_adapter(ckpt)
        load_lora_state(model, tensors, source=ckpt)
    else:
        with folder_source(ckpt) as source:  # (its shard index checked against the shards)
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
        from ..model.weights import StateSource, check_match, check_save_args, write_checkpoint_files
        from .lora import merged_state_dict, save_adapter

        if self.stage.uses_lora:
            lora_config = self.strategy.model.af3_lora_config
            if not merged:
                save_adapter(state, folder, lora_config, base_path=self.cfg.model.path)
                return
            save_adapter(state, os.path.join(folder, "adapter"), lora_config, base_path=self.cfg.model.path)
            state = merged_state_dict(state, lora_config)
        # ``folder`` is the temporary folder of _write_folder's atomic_folder: write the files into it directly
        # (write_checkpoint would build and swap a folder of its own inside it).
        skeleton, source = self._skeleton(), StateSource(state)
        check_save_args(skeleton, None, 5 * 1024**3, folder)
        names = check_match(skeleton, source, skeleton.config.text_config.tie_word_embeddings)
        write_checkpoint_files(folder, source, skeleton, names)

    def _write_folder(self, name: str, state: dict[str, Tensor], merged: bool, extra: dict | None = None) -> str:
        """Write model + processor (+ ``extra`` as the trainer state) into ``output/name`` through
        :func:`~af3.files.atomic_folder` (rank 0); a failed write leaves the folder that was there."""
        final = os.path.join(self.output, name)
        try:
            with atomic_folder(final) as tmp:
                self._write_model(tmp, state, merged=merged)
                self.processor.save_files(tmp)
                if extra is not None:
                    torch.save(extra, os.path.join(tmp, TRAINER_STATE))
        except OSError as e:
            raise TrainingError(f"cannot write {final}: {e.strerror or e}; free disk space or fix the output "
                                "folder, then resume with --resume") from None
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
                "sampler_seed": t.seed, "stage": self.stage.name, "config": self.cfg.to_dict(),
                "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rngs,
            })
            for _, old in list_checkpoints(self.output)[: -t.keep_last]:
                trash = os.path.join(self.output, ".deleting-" + os.path.basename(old))
                os.rename(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
            logger.info("saved %s", final)
        env.barrier()
        return os.path.join(self.output, name)

    def load(self, ckpt: str, saved: dict[str, Any], state: TrainState, optimizer: torch.optim.Optimizer,
             scheduler: Any) -> None:
        """Restore ``state``, the optimizer, the scheduler and this rank's RNGs from ``saved``, the trainer state
        of ``ckpt`` (:func:`read_trainer_state`; the weights come with the model: :func:`load_checkpoint_weights`)."""
        env, t = self.env, self.cfg.train
        try:
            self.strategy.load_optimizer_state(optimizer, saved["optimizer"])
            scheduler.load_state_dict(saved["scheduler"])
        except AF3Error:
            raise
        except Exception as e:  # a state of another model or optimizer layout
            raise CheckpointError(f"the optimizer state of {ckpt} does not fit this run ({_first_line(e)}); resume "
                                  "with the checkpoint's settings") from None
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
        try:
            set_rng_state(rngs[env.rank % len(rngs)])
        except Exception as e:
            raise CheckpointError(f"{ckpt}: damaged random-generator states ({_first_line(e)})") from None

    def save_final(self) -> str:
        """``output/final``: an HF-layout checkpoint (LoRA merged, the adapter in ``final/adapter``) + processor."""
        model_state = self.strategy.model_state_dict()
        if self.env.is_main:
            final = self._write_folder("final", model_state, merged=True)
            logger.info("saved the final model to %s", final)
        self.env.barrier()
        return os.path.join(self.output, "final")
