"""The training loop: one process or many (torchrun, DDP or FSDP), exact resume, checkpoints, metrics.

A run that cannot be right stops with a :class:`TrainingError` naming the step, before anything non-finite is
saved: a loss that is not finite; the gradient norm not finite for more than :data:`MAX_NONFINITE_UPDATES` steps in
a row (single such steps skip their update, with a warning); weights that are not finite when a checkpoint or
``final/`` is due (checked before it is written); an epoch, or the whole run, without one supervised token (every
example skipped or nothing to learn). Metrics and the result printed at the end are strict JSON.

Loss normalisation: every optimizer step minimises ``sum of token cross-entropies / label tokens of the whole
global batch`` (all micro-batches of the accumulation, all ranks). The label-token count is all-reduced before
the backward passes, each micro-batch's summed loss is scaled by ``world_size / count`` (DDP and FSDP average
gradients over ranks), so 1 process with batch 2B and 2 processes with batch B make the same update.

:func:`train` first checks the files the config names and locks the output folder
(:mod:`~af3.training.preflight`); :class:`Trainer` builds everything a run needs in ``__init__`` and
:meth:`Trainer.fit` is the loop. The parts live next to it: :mod:`~af3.training.distributed` (processes, DDP/FSDP
strategies), :mod:`~af3.training.model_setup`
(the model to train), :mod:`~af3.training.optim` (optimizer, schedule), :mod:`~af3.training.loader` (batches),
:mod:`~af3.training.checkpoint` (checkpoints, exact resume) and :mod:`~af3.training.metrics` (logging, progress).

Run it with ``af3 train CONFIG`` or ``[torchrun --nproc_per_node N] python -m af3.training.trainer CONFIG
[section.key=value ...] [--resume[=CHECKPOINT]]``.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from typing import Any

import torch
from torch import Tensor

from ..errors import AF3Error, InputError
from ..model.af3 import causal_lm_loss
from ..processor import AF3Inputs, AF3Processor
from .checkpoint import (
    Checkpointer,
    TrainState,
    check_resume_config,
    read_trainer_state,
    resume_checkpoint,
    seed_everything,
)
from .config import TrainConfig, load_config, save_config
from .distributed import DistEnv, make_strategy, setup_distributed
from .errors import TrainingError
from .loader import AudioFiller, BatchStream, build_data
from .metrics import EVAL_KEYS, MetricsLog, Progress, dumps, token_accuracy_counts
from .model_setup import build_model, use_bf16
from .optim import build_optimizer, build_scheduler, current_lr
from .preflight import check_inputs, close_output, open_output
from .stages import get_stage

logger = logging.getLogger("af3")

#: Consecutive steps whose gradient norm may be NaN/inf (each skips its update) before the run stops.
MAX_NONFINITE_UPDATES = 3


class Trainer:
    """One training run of :class:`TrainConfig` (use :func:`train`): ``__init__`` loads the model and data,
    resuming if asked; :meth:`fit` trains."""

    def __init__(self, cfg: TrainConfig, env: DistEnv):
        self.cfg, self.env = cfg, env
        t = cfg.train
        self.stage = get_stage(cfg.stage)
        self.output = os.path.abspath(cfg.output)
        self.state = TrainState()
        self.last_eval: dict[str, float] = {}
        self.last_eval_step = -1
        self.last_loss: float | None = None
        self.nonfinite_updates = 0  # steps in a row whose update was skipped for a NaN/inf gradient norm

        ckpt = resume_checkpoint(self.output, t.resume, env)
        saved = None
        if ckpt is not None:
            saved = read_trainer_state(ckpt)
            check_resume_config(saved, cfg, ckpt, warn=env.is_main)
        if env.is_main:
            os.makedirs(self.output, exist_ok=True)
            save_config(cfg, os.path.join(self.output, "config.yaml"))
        env.barrier()
        self.processor = AF3Processor.from_pretrained(cfg.model.path)
        self.strategy = make_strategy(env, t.strategy)
        self.model = build_model(cfg, self.stage, self.strategy, ckpt)
        self.wrapped = self.strategy.wrap(self.model)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.model, cfg)
        self.filler = AudioFiller(self.model.config, self.processor.pad_token_id) if env.distributed else None
        self.autocast = use_bf16(t.bf16, env.device)

        (self.loader, self.batches), self.eval_data = build_data(cfg, self.processor, env)
        if t.eval_every and self.eval_data is None and env.is_main:
            logger.warning("train.eval_every=%d but data.eval is not set: nothing will be evaluated", t.eval_every)
        self.steps_per_epoch = math.ceil(self.batches.num_batches() / t.grad_accum)
        self.total = t.max_steps if t.max_steps is not None else max(1, math.ceil(t.epochs * self.steps_per_epoch))
        self.scheduler = build_scheduler(self.optimizer, cfg, self.total)
        self.checkpoints = Checkpointer(self.output, cfg, self.stage, self.strategy, self.processor)
        self.metrics = MetricsLog(self.output, env.is_main)

        if ckpt is not None:
            self.checkpoints.load(ckpt, saved, self.state, self.optimizer, self.scheduler)
            del saved
            logger.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, self.state.step,
                        self.state.epoch, self.state.batch_in_epoch)
        else:
            seed_everything(t.seed + env.rank)  # dropout differs per rank; the weights are identical
        last_eval = self.metrics.trim(self.state.step) if env.is_main else None
        last_eval = env.broadcast(last_eval)  # an eval already logged for the resumed step is not repeated
        if last_eval is not None:
            self.last_eval_step = last_eval["step"]
            self.last_eval = {k: last_eval[k] for k in EVAL_KEYS}

    # ------------------------------------------------------------------ the loop
    def fit(self) -> dict[str, Any]:
        """Train to ``self.total`` steps, evaluating and saving on schedule; returns the final metrics."""
        env, t, s = self.env, self.cfg.train, self.state
        logger.info("training %s on %d process(es) (%s, %s%s): %d steps of %d × %d × %d examples, %d steps/epoch",
                    self.stage.name, env.world_size, env.device, self.strategy.name,
                    ", bf16 autocast" if self.autocast else "", self.total, t.batch_size, t.grad_accum,
                    env.world_size, self.steps_per_epoch)
        stream = BatchStream(self.loader, self.batches, s.epoch, s.batch_in_epoch)
        progress = Progress(env.is_main, self.total, s.step, t.log_every)
        t0, elapsed0 = time.monotonic(), s.elapsed
        t_prev = t0
        try:
            while s.step < self.total:
                micro = stream.next_step(t.grad_accum)
                step_epoch = stream.epoch
                if step_epoch != s.epoch:  # BatchStream passed over epochs that drew no examples
                    s.epoch_label_tokens = 0
                row = self._train_step(micro)
                s.step += 1
                s.epoch, s.batch_in_epoch = stream.position()
                if s.epoch != step_epoch:  # this step ended its epoch
                    self._check_epoch(step_epoch)
                    s.epoch_label_tokens = 0
                now = time.monotonic()
                s.elapsed = elapsed0 + now - t0
                # Throughput over the whole step, data loading included (evaluation and saving are not).
                row.update(step=s.step, epoch=s.epoch, elapsed=round(s.elapsed, 3),
                           tokens_per_s=round(row["tokens"] / max(1e-9, now - t_prev), 1))
                self.metrics.write(row)
                progress.update(row)
                if self.eval_data is not None and t.eval_every and s.step % t.eval_every == 0:
                    self._evaluate()
                if t.save_every and (s.step % t.save_every == 0 or s.step == self.total):
                    self._check_weights()
                    self.metrics.flush()
                    self.checkpoints.save(s, self.optimizer, self.scheduler)
                t_prev = time.monotonic()
        finally:
            progress.close()
        if s.label_tokens == 0:
            raise TrainingError(f"the run trained on no supervised token in {s.step} step(s): every example was "
                                f"skipped ({s.skipped}, see the 'skipped' warnings in the log) or has nothing to "
                                "learn; fix the manifests of data.mixture (final/ was not written)")
        self._check_weights()
        if self.eval_data is not None and self.last_eval_step != s.step:
            self._evaluate()
        self.metrics.flush()
        final = self.checkpoints.save_final()
        self.metrics.plot()
        env.barrier()
        result = {"step": s.step, "loss": self.last_loss, "skipped": s.skipped, "tokens_seen": s.tokens_seen,
                  "output": self.output, "final": final}
        result.update(self.last_eval)
        return result

    def _check_epoch(self, epoch: int) -> None:
        """Stop when epoch ``epoch`` (0-based) ended without a single supervised token."""
        if self.state.epoch_label_tokens == 0:
            raise TrainingError(
                f"epoch {epoch + 1} of data.mixture had no supervised token: every example was skipped "
                f"({self.state.skipped} so far, see the 'skipped' warnings in the log) or has nothing to learn; "
                "fix the manifests of data.mixture")

    def _check_weights(self) -> None:
        """Stop before saving weights that are NaN/inf (a diverged run)."""
        bad = torch.zeros((), dtype=torch.int64, device=self.env.device)
        with torch.no_grad():
            for p in self.trainable:
                local = p.to_local() if hasattr(p, "to_local") else p  # FSDP: this rank's shard
                for chunk in local.detach().reshape(-1).split(1 << 24):  # bounded temporaries
                    bad += (~torch.isfinite(chunk)).any()
        if int(self.env.all_reduce(bad)) > 0:
            raise TrainingError(
                f"the weights hold NaN or infinite values after step {self.state.step}: the run diverged and nothing "
                f"was saved for this step; lower optim.lr (now {self.cfg.optim.lr:g}) or optim.max_grad_norm and "
                "start again, or resume from an earlier checkpoint")

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

    def _train_step(self, micro: list[dict]) -> dict:
        """One optimizer step over the micro-batches ``micro``; returns its metrics row."""
        env, cfg, s = self.env, self.cfg, self.state
        skipped = [item for mb in micro for item in mb["skipped"]]
        for source, reason in skipped:
            logger.warning("skipped %s: %s", source, reason)
        tokens = sum(int(mb["inputs"]["attention_mask"].sum()) for mb in micro if mb["inputs"] is not None)
        counts = torch.tensor([sum(mb["num_label_tokens"] for mb in micro), len(skipped), tokens],
                              dtype=torch.int64, device=env.device)
        n_labels, n_skipped, n_tokens = (int(v) for v in env.all_reduce(counts).tolist())
        s.skipped += n_skipped
        if s.skipped > cfg.data.max_skipped:
            raise TrainingError(
                f"{s.skipped} examples were skipped because their audio could not be read (more than "
                f"data.max_skipped={cfg.data.max_skipped}); see the 'skipped' warnings in the log for the manifest "
                "lines, fix or remove them, or raise data.max_skipped")
        s.tokens_seen += n_tokens
        s.label_tokens += n_labels
        s.epoch_label_tokens += n_labels

        loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
        scale = env.world_size / max(1, n_labels)
        for i, mb in enumerate(micro):
            inputs = self._prepare(mb)
            if inputs is None:
                continue
            with self.strategy.sync(i == len(micro) - 1):
                ce = causal_lm_loss(self._forward(inputs), inputs["labels"], reduction="sum")
                (ce * scale).backward()
            loss_sum += ce.detach().double()
        loss: float | None = float(env.all_reduce(loss_sum)) / n_labels if n_labels else None
        if loss is not None and not math.isfinite(loss):
            raise TrainingError(
                f"step {s.step + 1}: the loss is {loss} (not a finite number): the run diverged and nothing was "
                f"saved for this step; lower optim.lr (now {cfg.optim.lr:g}), check the data, or resume from an "
                "earlier checkpoint")

        lr = current_lr(self.optimizer, self.scheduler, cfg.optim.lr)
        max_norm = cfg.optim.max_grad_norm if cfg.optim.max_grad_norm > 0 else float("inf")
        grad_norm = self.strategy.clip_grad_norm(self.trainable, max_norm)
        updated = False
        if n_labels == 0:
            logger.warning("step %d has no supervised tokens in its global batch: no update", s.step + 1)
        elif not math.isfinite(grad_norm):
            self.nonfinite_updates += 1
            if self.nonfinite_updates > MAX_NONFINITE_UPDATES:
                raise TrainingError(
                    f"step {s.step + 1}: the gradient norm was NaN/infinite in {self.nonfinite_updates} steps in a "
                    f"row: the run diverged; lower optim.lr (now {cfg.optim.lr:g}), try train.bf16=false, or resume "
                    "from an earlier checkpoint")
            logger.warning("step %d: gradient norm is %s; the update is skipped", s.step + 1, grad_norm)
        else:
            self.nonfinite_updates = 0
            self.optimizer.step()
            updated = True
        with warnings.catch_warnings():  # a skipped update still advances the schedule: that is intended
            if not updated:
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)`")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
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
                loss = causal_lm_loss(logits, inputs["labels"], reduction="sum")
                totals[:3] += torch.stack([loss.double(), correct.double(), count.double()])
        finally:
            self.model.train()
        loss_sum, correct, count, skipped = env.all_reduce(totals).tolist()
        if count == 0:
            raise TrainingError(f"data.eval {self.cfg.data.eval}: no example could be evaluated ({int(skipped)} "
                                "skipped, see the 'skipped' warnings in the log); fix the manifest or remove data.eval")
        self.last_eval = {"eval_loss": loss_sum / count, "eval_token_accuracy": correct / count}
        self.last_eval_step = self.state.step
        row = {"step": self.state.step, **self.last_eval, "eval_tokens": int(count), "eval_skipped": int(skipped)}
        self.metrics.write(row)
        if env.is_main:
            logger.info("eval at step %d: loss %.4f, token accuracy %.4f", self.state.step,
                        self.last_eval["eval_loss"], self.last_eval["eval_token_accuracy"])
        return self.last_eval


# ---------------------------------------------------------------------- entry points

def train(config: TrainConfig) -> dict[str, Any]:
    """Run one training job (single process, or one rank of a torchrun job); returns the final metrics:
    ``step``, ``loss`` (last step; None when it had no supervised token), ``eval_loss``/``eval_token_accuracy``
    (with ``data.eval``), ``skipped``, ``tokens_seen``, ``output`` and ``final`` (the folder of the trained
    model). Problems with the config, its files or the run are :class:`~af3.errors.AF3Error` s."""
    env = setup_distributed(config.train.device)
    handler = lock = None
    try:
        check_inputs(config)
        error = None
        if env.is_main:
            try:
                lock = open_output(config.output)
            except AF3Error as e:
                error = e
        error = env.broadcast(error)
        if error is not None:
            raise error
        if env.is_main:
            handler = logging.FileHandler(os.path.join(config.output, "train.log"), encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            logger.addHandler(handler)
        return Trainer(config, env).fit()
    finally:
        if handler is not None:
            logger.removeHandler(handler)
            handler.close()
        close_output(lock)
        env.close()


def run(config_path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (),
        resume: bool | str | None = None) -> dict[str, Any]:
    """Load ``config_path`` + ``KEY=VALUE`` overrides and train; ``resume`` (if not None) replaces
    ``train.resume``: True = the latest checkpoint of the output folder, a path = that checkpoint."""
    cfg = load_config(config_path, list(overrides))
    if isinstance(resume, str) and not resume.strip():
        raise InputError("--resume= needs a checkpoint folder (or use --resume alone for the latest checkpoint)")
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
        print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        return 2
    if rank == 0:
        print(dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
