"""The training run configuration's schema: one dataclass per YAML section, with defaults and what each key means.

Only data lives here (no loading, checking or stage logic; that is :mod:`af3.training.config`), and the module
imports nothing else from training, so :mod:`~af3.training.stages` and :mod:`~af3.training.lora` can use
:class:`LoraSection` without an import cycle.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

STRATEGIES = ("ddp", "fsdp")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class ModelSection:
    """The checkpoint training starts from (an HF-layout folder, e.g. a previous stage's ``final/``)."""

    path: str = ""
    #: dtype of the weights being trained (a name of ``af3.config.DTYPE_NAMES``); "float32" keeps fp32 master
    #: weights (compute may still be bf16 through ``train.bf16``); "auto" keeps the checkpoint's dtype.
    dtype: str = "float32"


@dataclass
class DataSection:
    #: "2.0*asr+1.0*qa" (names from ``manifests`` or manifest paths), or a dict/list (see
    #: :func:`af3.training.mixture.parse_mixture`); weights are finite numbers > 0. Relative manifest paths are
    #: relative to the YAML file's folder (to the current directory in command-line overrides).
    mixture: Any = ""
    manifests: dict[str, str] = field(default_factory=dict)
    #: Evaluation manifest (JSONL / NVIDIA JSON); evaluated every ``train.eval_every`` steps and at the end.
    eval: str | None = None
    num_workers: int = 2
    #: Stop with an error once more than this many examples were skipped for unreadable audio.
    max_skipped: int = 100
    #: Seconds of audio per example (longer audio is cut); null = the stage's window limit.
    max_audio_len: float | None = None
    #: Batches of the length-grouped sampler sorted together (in global batches).
    group_size: int = 50
    #: > 0: sort by length // length_bucket (tokens), so batches mix sources of similar length; 0: exact length.
    length_bucket: int = 0
    eval_batch_size: int | None = None


@dataclass
class OptimSection:
    lr: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    #: Linear warm-up steps; null = ``warmup_ratio`` of all steps.
    warmup_steps: int | None = None
    warmup_ratio: float = 0.03
    schedule: str = "cosine"
    #: The cosine/linear schedule decays to ``lr * min_lr_ratio``.
    min_lr_ratio: float = 0.0
    #: Clip the global gradient norm to this (0 = no clipping, the norm is still logged).
    max_grad_norm: float = 1.0
    #: Peak learning rates for parts of the model, by parameter-name prefix (``audio_tower``,
    #: ``multi_modal_projector``, ``language_model``, or deeper such as ``language_model.lm_head``); the longest
    #: matching prefix wins, everything else uses ``lr``. The schedule scales them all alike.
    part_lr: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainSection:
    #: Optimizer steps; null = ``epochs`` passes over the mixture.
    max_steps: int | None = None
    epochs: float | None = None
    #: Examples per device per micro-batch; the global batch is batch_size * grad_accum * world_size.
    batch_size: int | None = None
    grad_accum: int | None = None
    seed: int = 0
    #: bf16 autocast: "auto" = on CUDA devices that support it, off on CPU; true forces it, false disables it.
    bf16: bool | str = "auto"
    gradient_checkpointing: bool = True
    #: Supervise only assistant replies (and their end tokens); false = every non-audio, non-pad token.
    assistant_only: bool = True
    log_every: int = 10
    #: Evaluate every N steps (0 = only at the end; needs ``data.eval``).
    eval_every: int = 0
    #: Checkpoint every N steps (0 = only ``final/``).
    save_every: int = 500
    keep_last: int = 3
    strategy: str = "ddp"
    #: false, true (= latest checkpoint in the output folder, or a fresh start if there is none) or a checkpoint path.
    resume: bool | str = False
    #: "auto" = cuda (LOCAL_RANK's GPU) when available, else cpu.
    device: str = "auto"


@dataclass
class LoraSection:
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    #: Module name suffixes inside the language model (e.g. [q_proj, v_proj]) or one regex over full module names;
    #: null = every linear layer of the decoder blocks.
    target_modules: list[str] | str | None = None


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    stage: str = "stage3"
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    lora: LoraSection = field(default_factory=LoraSection)
    output: str = "output"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
