"""LoRA on the language model through peft, saved in peft's own adapter format.

Adapters are injected in place with ``peft.inject_adapter_in_model`` (our ``AF3Model`` stays an ``AF3Model``;
targets are matched by a regex over full module names, so only ``language_model.`` layers get adapters).
:func:`save_adapter` writes ``adapter_config.json`` + ``adapter_model.safetensors`` with peft's tensor names
(``base_model.model.<module>.lora_A.weight``), so ``peft.PeftModel.from_pretrained(AF3Model..., folder)`` loads
them, and :func:`merge_lora` folds an adapter into a plain HF-layout checkpoint. Reading a folder (file names,
config checks, tensor names, the alpha/r scale) is :mod:`af3.model.adapters`'s, shared with inference.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import CheckpointError, InputError
from ..model.adapters import (
    ADAPTER_WEIGHTS,
    LORA_KEY,
    PEFT_PREFIX,
    lora_scale,
    read_adapter_folder,
)

if TYPE_CHECKING:
    from .sections import LoraSection

logger = logging.getLogger("af3")

ADAPTER_NAME = "default"
#: Every linear layer of the decoder blocks (attention and MLP); not lm_head, not the embeddings.
LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def target_regex(target_modules: list[str] | str | None = None) -> str:
    """A regex (peft matches it with ``re.fullmatch`` against full module names) for LoRA targets inside
    ``language_model.model.layers``. A string is used as given; a list names module suffixes."""
    if isinstance(target_modules, str):
        return target_modules
    names = list(target_modules or LLM_LINEAR)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise InputError("lora.target_modules must be a list of module names (like [q_proj, v_proj]) or a regex")
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"language_model\.model\.layers\.\d+\.(?:.*\.)?(?:{alternatives})"


def peft_config(lora_cfg: LoraSection, base_path: str | None = None):
    """The ``peft.LoraConfig`` for our LoRA settings."""
    import peft

    cfg = peft.LoraConfig(r=int(lora_cfg.r), lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                          target_modules=target_regex(lora_cfg.target_modules), bias="none")
    cfg.base_model_name_or_path = base_path
    return cfg


def has_lora(model: nn.Module) -> bool:
    return any("lora_" in name for name, _ in model.named_parameters())


def add_lora(model: nn.Module, lora_cfg: LoraSection | Any) -> nn.Module:
    """Inject LoRA adapters (peft, adapter "default") into the LLM's linear layers, in place.

    ``lora_cfg`` is our :class:`~af3.training.sections.LoraSection` or a ``peft.LoraConfig``. The new ``lora_A``
    weights come from torch's global RNG (seed it for reproducible runs); ``lora_B`` starts at zero, so the
    model's outputs do not change."""
    import peft

    if has_lora(model):
        raise InputError("the model already has LoRA adapters")
    cfg = lora_cfg if isinstance(lora_cfg, peft.LoraConfig) else peft_config(lora_cfg)
    outside = [n for n, _ in model.named_modules()
               if re.fullmatch(cfg.target_modules, n) and not n.startswith("language_model.")] \
        if isinstance(cfg.target_modules, str) else []
    if outside:
        raise InputError(f"lora.target_modules must only match language model layers; it matches {outside[0]!r}")
    if isinstance(cfg.target_modules, str):  # a rank above a layer's size adds nothing but memory
        sizes = [min(m.in_features, m.out_features) for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and re.fullmatch(cfg.target_modules, n)]
        if sizes and cfg.r > min(sizes):
            raise InputError(f"lora.r={cfg.r} is larger than the smallest layer it adapts ({min(sizes)} features); "
                             f"choose lora.r of at most {min(sizes)}")
    peft.inject_adapter_in_model(cfg, model, adapter_name=ADAPTER_NAME)
    n = sum(1 for name, _ in model.named_modules() if name.endswith(".lora_A"))
    if n == 0:
        raise InputError(f"lora.target_modules {cfg.target_modules!r} matches no layer of the language model")
    model.af3_lora_config = cfg  # remembered for saving
    logger.info("LoRA r=%d alpha=%s dropout=%s on %d layers", cfg.r, cfg.lora_alpha, cfg.lora_dropout, n)
    return model


# ---------------------------------------------------------------------- names

def to_peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The LoRA tensors of a model state dict, under peft's saved names (adapter name removed, prefixed)."""
    out = {}
    for key, value in state.items():
        m = LORA_KEY.match(key)
        if m:
            out[f"{PEFT_PREFIX}{m['module']}.{m['kind']}.weight"] = value
    return out


def from_peft_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """peft's saved names → our in-model names (``... .lora_A.default.weight``)."""
    out = {}
    for key, value in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        m = LORA_KEY.match(name)
        if not m:
            raise CheckpointError(f"unexpected tensor {key!r} in a LoRA adapter (only lora_A/lora_B are supported)")
        out[f"{m['module']}.{m['kind']}.{ADAPTER_NAME}.weight"] = value
    return out


# ---------------------------------------------------------------------- save / load

def save_adapter(state: dict[str, torch.Tensor], folder: str | os.PathLike, config: Any,
                 base_path: str | None = None) -> None:
    """Write the LoRA tensors of ``state`` (a model state dict) in peft's format into ``folder``.

    ``config`` is the ``peft.LoraConfig`` the adapters were made with; ``base_path`` (the base checkpoint) is
    recorded as ``base_model_name_or_path``."""
    from safetensors.torch import save_file

    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in to_peft_names(state).items()}
    if not tensors:
        raise CheckpointError("the model has no LoRA tensors to save")
    if base_path is not None:
        config.base_model_name_or_path = os.fspath(base_path)
    save_file(tensors, os.path.join(folder, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config.save_pretrained(folder)


def read_adapter(folder: str | os.PathLike):
    """(peft.LoraConfig, tensors under our in-model names) of an adapter folder."""
    import peft

    _, tensors = read_adapter_folder(folder)  # checks the folder and the config
    return peft.LoraConfig.from_pretrained(os.fspath(folder)), from_peft_names(tensors)


def load_adapter(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Add the adapter of ``folder`` to ``model`` (injecting LoRA layers first if it has none) and load its
    weights; every LoRA tensor of the model must be in the file and vice versa."""
    cfg, tensors = read_adapter(folder)
    if not has_lora(model):
        add_lora(model, cfg)
    load_lora_state(model, tensors, source=os.fspath(folder))
    return model


def load_lora_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "the adapter") -> None:
    """Copy LoRA tensors (our in-model names) into ``model``, strictly."""
    params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise CheckpointError(f"{source} does not fit the model's LoRA layers ({what}; "
                              f"{len(missing)} missing, {len(unexpected)} unexpected); was it made with other "
                              "lora.r / lora.target_modules settings?")
    with torch.no_grad():
        for name, p in params.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(p.shape):
                raise CheckpointError(f"{source}: {name} has shape {tuple(t.shape)}, the model wants "
                                      f"{tuple(p.shape)}")
            p.copy_(t)


# ---------------------------------------------------------------------- merging

def merged_state_dict(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """A plain AF3 state dict from one with injected LoRA layers: ``W + scaling * B @ A`` (in float32, cast back
    to W's dtype), ``base_layer`` names restored, LoRA tensors dropped. Works on CPU copies (e.g. gathered
    from FSDP), the model is not touched."""
    scaling = lora_scale(int(config.r), float(config.lora_alpha), getattr(config, "use_rslora", False))
    if getattr(config, "use_dora", False) or getattr(config, "fan_in_fan_out", False):
        raise CheckpointError("merging DoRA / fan_in_fan_out adapters is not supported")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if "lora_" in key:
            continue
        if ".base_layer." not in key:
            out[key] = value
            continue
        module, _, leaf = key.rpartition(".base_layer.")
        merged = value
        if leaf == "weight":
            a = state[f"{module}.lora_A.{ADAPTER_NAME}.weight"]
            b = state[f"{module}.lora_B.{ADAPTER_NAME}.weight"]
            delta = (b.float() @ a.float()) * scaling  # [out, r] @ [r, in] → [out, in]
            merged = (value.float() + delta.to(value.device)).to(value.dtype)
        out[f"{module}.{leaf}"] = merged
    return out


def merge_lora(base_folder: str | os.PathLike | None, adapter_folder: str | os.PathLike,
               out_folder: str | os.PathLike, dtype: torch.dtype | None = None) -> str:
    """Load the base checkpoint, apply the adapter, merge it and write an HF-layout checkpoint (plus the
    processor files) that ``AF3Model.from_pretrained`` and transformers load. ``base_folder=None`` uses the
    adapter's recorded ``base_model_name_or_path``. Returns ``out_folder``."""
    from ..files import atomic_folder
    from ..model import AF3Model
    from ..model.weights import StateSource, check_match, check_save_args, write_checkpoint_files
    from ..processor import AF3Processor

    adapter_folder = os.fspath(adapter_folder)
    cfg, _ = read_adapter(adapter_folder)
    base = os.fspath(base_folder) if base_folder is not None else cfg.base_model_name_or_path
    if not base:
        raise InputError(f"{adapter_folder}: the adapter does not record its base checkpoint; give the base folder")
    if not os.path.isdir(base):
        raise CheckpointError(f"base checkpoint {base!r} (of adapter {adapter_folder!r}) does not exist")
    model = AF3Model.from_pretrained(base, dtype=dtype)
    load_adapter(model, adapter_folder)
    merged = merged_state_dict({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    with torch.device("meta"):
        skeleton = AF3Model(model.config, model.generation_config)
    out = os.fspath(out_folder)
    proc_source = adapter_folder if os.path.isfile(os.path.join(adapter_folder, "tokenizer.json")) else base
    processor = AF3Processor.from_pretrained(proc_source)
    source = StateSource(merged)
    check_save_args(skeleton, None, 5 * 1024**3, out)
    names = check_match(skeleton, source, skeleton.config.text_config.tie_word_embeddings)
    try:  # weights and processor files swapped in together: never a merged model with another model's tokenizer
        with atomic_folder(out) as tmp:
            write_checkpoint_files(tmp, source, skeleton, names)
            processor.save_files(tmp)
    except OSError as e:
        raise CheckpointError(f"cannot write {out}: {e.strerror or e}") from None
    logger.info("merged LoRA adapter %s into %s → %s", adapter_folder, base, out)
    return out

