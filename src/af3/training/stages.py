"""The AF3 training curriculum as presets: which parts train, how much audio, learning rate, batch shape.

=========  ===========  =========  =====  ==========  ========  ===========  ======
stage      audio_tower  projector  LLM    max audio   lr        batch×accum  epochs
=========  ===========  =========  =====  ==========  ========  ===========  ======
stage1     frozen       train      frozen 30 s (1)    1e-3      4 × 1        1
stage2     train        train      frozen 30 s (1)    1.5e-5    4 × 4        1
stage3     train        train      train  150 s (5)   1.5e-5    2 × 8        1
stage3.5   frozen       frozen     LoRA   600 s (20)  5e-5      2 × 8        2
stage4     train        train      train  600 s (20)  5e-5      2 × 8        2
=========  ===========  =========  =====  ==========  ========  ===========  ======

(NVIDIA's ``scripts/stage*_af3.sh``; per-device batch sizes are for 8 GPUs.) A window is
``af3.config.WINDOW_SECONDS``; the last stages train on ``af3.config.MAX_AUDIO_WINDOWS``, AF3's cap. The encoder's
learned position embeddings stay frozen in every stage, as in Whisper and the reference.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import MAX_AUDIO_WINDOWS, WINDOW_SECONDS
from ..errors import InputError
from .sections import LoraSection

if TYPE_CHECKING:
    from torch import nn

logger = logging.getLogger("af3")

PARTS = ("audio_tower", "multi_modal_projector", "language_model")
#: Parameters that never train (Whisper's sinusoid-initialised, frozen position table).
ALWAYS_FROZEN = ("audio_tower.embed_positions.weight",)


@dataclass(frozen=True)
class Stage:
    """One curriculum stage. ``audio_tower``/``projector``/``language_model`` are "train", "frozen" or "lora"."""

    name: str
    audio_tower: str
    projector: str
    language_model: str
    windows: int
    lr: float
    batch_size: int
    grad_accum: int
    epochs: float
    description: str

    @property
    def max_audio_len(self) -> float:
        return float(self.windows * WINDOW_SECONDS)

    @property
    def uses_lora(self) -> bool:
        return self.language_model == "lora"

    @property
    def trains_audio(self) -> bool:
        return "train" in (self.audio_tower, self.projector)


STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage("stage1", "frozen", "train", "frozen", 1, 1e-3, 4, 1, 1, "alignment: projector only"),
        Stage("stage2", "train", "train", "frozen", 1, 1.5e-5, 4, 4, 1, "encoder tuning: encoder + projector"),
        Stage("stage3", "train", "train", "train", 5, 1.5e-5, 2, 8, 1, "full fine-tuning, 2.5 min audio"),
        Stage("stage3.5", "frozen", "frozen", "lora", MAX_AUDIO_WINDOWS, 5e-5, 2, 8, 2,
              "context extension: LoRA on the LLM"),
        Stage("stage4", "train", "train", "train", MAX_AUDIO_WINDOWS, 5e-5, 2, 8, 2,
              "chat: full fine-tuning on multi-turn data"),
    )
}
_ALIASES = {"stage35": "stage3.5", "stage3_5": "stage3.5", "3.5": "stage3.5", "35": "stage3.5"}


def get_stage(name: str | float | Stage) -> Stage:
    """A preset by name; "stage3.5", "stage35", "3.5" and 3.5 all name the LoRA stage."""
    if isinstance(name, Stage):
        return name
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if not key.startswith("stage"):
        key = "stage" + key.removesuffix(".0")
    key = _ALIASES.get(key, key)
    if key not in STAGES:
        raise InputError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")
    return STAGES[key]


def apply_stage(model: nn.Module, stage: str | Stage, lora_cfg: LoraSection | None = None) -> nn.Module:
    """Set ``requires_grad`` per part for ``stage`` (adding LoRA adapters to the LLM for stage 3.5) and log a
    table of trainable/frozen parameters. Returns the model to train (the same object)."""
    stage = get_stage(stage)
    if stage.uses_lora:
        from .lora import add_lora  # imports peft

        add_lora(model, lora_cfg or LoraSection())
    model.requires_grad_(False)
    modes = {"audio_tower": stage.audio_tower, "multi_modal_projector": stage.projector,
             "language_model": stage.language_model}
    for part, mode in modes.items():
        module = getattr(model, part)
        if mode == "train":
            module.requires_grad_(True)
        elif mode == "lora":
            for name, p in module.named_parameters():
                p.requires_grad_("lora_" in name)
    params = dict(model.named_parameters())
    for name in ALWAYS_FROZEN:
        if name in params:
            params[name].requires_grad_(False)
    logger.info("stage %s (%s):\n%s", stage.name, stage.description, format_parameter_table(parameter_counts(model)))
    return model


def parameter_counts(model: nn.Module) -> dict[str, tuple[int, int]]:
    """{part: (trainable, frozen)} parameter counts; parameters outside the three parts go to "other"."""
    counts: dict[str, list[int]] = {p: [0, 0] for p in PARTS}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied weights count once
            continue
        seen.add(id(p))
        part = next((x for x in PARTS if name == x or name.startswith(x + ".")), "other")
        counts.setdefault(part, [0, 0])[0 if p.requires_grad else 1] += p.numel()
    return {k: (v[0], v[1]) for k, v in counts.items()}


def format_parameter_table(counts: dict[str, Any]) -> str:
    """A fixed-width text table of :func:`parameter_counts`, with a total row."""
    rows = [("part", "trainable", "frozen")]
    total_t = total_f = 0
    for part, (t, f) in counts.items():
        rows.append((part, f"{t:,}", f"{f:,}"))
        total_t, total_f = total_t + t, total_f + f
    rows.append(("total", f"{total_t:,}", f"{total_f:,}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)
