"""LoRA adapters at inference, switchable per request (AF3's "think" / long-audio adapter).

The adapter shipped with the checkpoints (``think/`` in the HF repo, ``stage35/`` in NVIDIA's) is a peft LoRA
folder: ``adapter_config.json`` + ``adapter_model.safetensors`` (+ ``non_lora_trainables.bin``). It is read here
without peft, and applied through forward hooks, so module names and the base weights stay untouched and one
batch can mix rows with and without the adapter: ``controller.rows`` is a bool per batch row.

:func:`read_adapter_folder`, :data:`LORA_KEY` and :func:`lora_scale` are the one reader of a peft adapter folder:
training's :mod:`af3.training.lora` (which saves, merges and loads adapters into peft layers) builds on them.

Every problem of an adapter folder is a :class:`CheckpointError` naming the file and the key: a broken
``adapter_config.json`` (not JSON, ``r`` not a positive integer, ``lora_alpha`` not a number), a weight file whose
header or values are bad (checked as model weights are: :mod:`af3.model.tensor_files`, NaN/inf refused), LoRA
pairs whose shapes do not chain, or a pickled ``non_lora_trainables.bin`` that ``torch.load`` cannot read.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import read_json
from ..config_checks import describe
from ..errors import CheckpointError
from .tensor_files import TensorSource, _load_pickle, all_finite

THINK_SUFFIX = "\nPlease think and reason about the input audio before you respond."
ADAPTER_FOLDERS = ("think", "stage35")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: peft's prefix of the saved tensor names (``base_model.model.<module>.lora_A.weight``).
PEFT_PREFIX = "base_model.model."
#: A LoRA tensor name: ``<module>.<kind>[.<adapter name>].weight`` (peft saves it without the adapter name).
LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                      r"(?:\.(?P<adapter>[^.]+))?\.weight$")

# The decoder-layer part of a LoRA target, whatever prefix the training code used
# (peft's "base_model.model.", LLaVA's "llm.", transformers' "model.language_model." ...).
_LAYER = re.compile(r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)$")


@dataclass
class LoRAWeights:
    a: Tensor  # [r, in]
    b: Tensor  # [out, r]
    scale: float


def find_adapter(checkpoint: str | os.PathLike) -> str | None:
    """The think adapter folder inside a checkpoint folder, if it has one."""
    for name in ADAPTER_FOLDERS:
        folder = os.path.join(checkpoint, name)
        if os.path.isfile(os.path.join(folder, ADAPTER_CONFIG)):
            return folder
    return None


def lora_scale(r: int, alpha: float, rslora: bool = False) -> float:
    """The factor of ``B @ A``: alpha / r, or alpha / √r with rsLoRA."""
    return alpha / r**0.5 if rslora else alpha / r


def read_adapter_folder(folder: str | os.PathLike) -> tuple[dict, dict[str, Tensor]]:
    """(``adapter_config.json`` as a dict, the tensors under their saved names) of a peft LoRA folder, checked:
    both files are there and the adapter is plain LoRA (no other peft type, no DoRA)."""
    folder = os.fspath(folder)
    cfg_path, weights_path = os.path.join(folder, ADAPTER_CONFIG), os.path.join(folder, ADAPTER_WEIGHTS)
    if not os.path.isfile(cfg_path) or not os.path.isfile(weights_path):
        raise CheckpointError(f"{folder!r} is not a LoRA adapter folder: it needs {ADAPTER_CONFIG} and "
                              f"{ADAPTER_WEIGHTS}")
    cfg = read_json(cfg_path)
    kind = cfg.get("peft_type")
    if kind not in (None, "LORA"):
        raise CheckpointError(f"{cfg_path}: peft_type {kind!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{cfg_path}: only plain LoRA adapters are supported (not DoRA)")
    r, alpha = cfg.get("r"), cfg.get("lora_alpha", cfg.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise CheckpointError(f"{cfg_path}: r must be a positive integer (the LoRA rank), got {describe(r)}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise CheckpointError(f"{cfg_path}: lora_alpha must be a finite number, got {describe(alpha)}")
    tensors = {}
    with TensorSource([weights_path]) as source:
        for key in source.keys():  # noqa: SIM118 (TensorSource is not a dict)
            t = source.get(key)
            if t.is_floating_point() and not all_finite(t):
                raise CheckpointError(f"tensor {key} in {weights_path} holds NaN or inf values; the adapter is "
                                      "corrupt: re-download or re-train it")
            tensors[key] = t
    return cfg, tensors


def _our_module_name(peft_module: str) -> str:
    m = _LAYER.search(peft_module)
    if m is None:
        raise CheckpointError(f"LoRA target {peft_module!r} is not a decoder projection; only the language model's "
                              "attention and MLP layers can carry an adapter")
    return f"language_model.model.layers.{m.group(1)}.{m.group(2)}"


def read_lora(folder: str | os.PathLike) -> dict[str, LoRAWeights]:
    """Our module name → LoRA weights of a peft LoRA folder (``scale`` = alpha / r, or alpha / √r with rsLoRA)."""
    cfg, tensors = read_adapter_folder(folder)
    weights_path = os.path.join(os.fspath(folder), ADAPTER_WEIGHTS)
    r = cfg["r"]
    scale = lora_scale(r, float(cfg.get("lora_alpha", r)), bool(cfg.get("use_rslora")))
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in tensors.items():
        m = LORA_KEY.match(key)
        if m is None or m["kind"] not in ("lora_A", "lora_B"):
            raise CheckpointError(f"{weights_path}: unexpected tensor {key!r} (only lora_A/lora_B weights)")
        pairs.setdefault(_our_module_name(m["module"]), {})[m["kind"][-1]] = tensor
    out = {}
    for name, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{weights_path}: {name} has lora_{next(iter(ab))} but not its pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1] or not a.is_floating_point():
            raise CheckpointError(f"{weights_path}: {name} has lora_A {list(a.shape)} and lora_B {list(b.shape)}; "
                                  "they must be float matrices [r, in] and [out, r]")
        out[name] = LoRAWeights(a, b, scale)
    if not out:
        raise CheckpointError(f"{weights_path} holds no LoRA weights")
    return out


class SwitchableLoRA:
    """Adds ``scale * x Aᵀ Bᵀ`` to the outputs of the targeted linears for the rows where ``rows`` is True.

    ``rows`` is None (adapter off for everyone: no extra work) or a bool tensor [batch] set by the caller before
    each forward. The hooks are on the model only while some row has the adapter on, so that a model with the
    adapter off is the plain model again (which the decoder's fused decoding step requires)."""

    def __init__(self, model: nn.Module, weights: dict[str, LoRAWeights]):
        modules = dict(model.named_modules())
        missing = sorted(set(weights) - set(modules))
        if missing:
            raise CheckpointError(f"the adapter targets modules this model does not have: {missing[:4]}")
        self._rows: Tensor | None = None
        self._targets = []  # (linear, hook)
        self._handles = []
        for name, w in weights.items():
            linear = modules[name]
            if w.a.shape[1] != linear.in_features or w.b.shape[0] != linear.out_features:
                raise CheckpointError(f"adapter shapes for {name} do not fit the model")
            a = w.a.to(device=linear.weight.device, dtype=linear.weight.dtype)
            b = w.b.to(device=linear.weight.device, dtype=linear.weight.dtype)
            self._targets.append((linear, self._hook(a, b, w.scale)))

    @property
    def rows(self) -> Tensor | None:
        return self._rows

    @rows.setter
    def rows(self, rows: Tensor | None) -> None:
        if rows is not None and not bool(rows.any()):
            rows = None
        self._rows = rows
        if rows is not None and not self._handles:
            self._handles = [linear.register_forward_hook(hook) for linear, hook in self._targets]
        elif rows is None:
            self._detach()

    def _hook(self, a: Tensor, b: Tensor, scale: float):
        def hook(_module: nn.Module, args: tuple, out: Tensor) -> Tensor:
            rows = self._rows
            if rows is None:
                return out
            x = args[0]  # [B, T, in]
            delta = (x @ a.T) @ b.T * scale  # [B, T, out]
            return out + delta * rows.to(out.dtype).view(-1, *([1] * (out.dim() - 1)))

        return hook

    def _detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def remove(self) -> None:
        """Take the adapter off the model for good."""
        self._rows = None
        self._detach()
        self._targets.clear()


def check_non_lora(folder: str | os.PathLike, model: nn.Module, allow_pickle: bool = False) -> None:
    """An adapter folder may carry ``non_lora_trainables.bin`` (pickled). Tensors there that differ from the base
    model cannot be switched per request; refuse them rather than answer with the wrong weights."""
    path = os.path.join(folder, "non_lora_trainables.bin")
    if not os.path.isfile(path):
        return
    if not allow_pickle:
        raise CheckpointError(f"{path} is pickled; pass allow_pickle=True to read it (torch.load, weights_only)")
    state = _load_pickle(path)
    own = model.state_dict()
    differing = []
    for key, value in state.items():
        name = key.removeprefix(PEFT_PREFIX)
        if name not in own or own[name].shape != value.shape or not torch.allclose(
                own[name].float().cpu(), value.float(), atol=1e-3):
            differing.append(key)
    if differing:
        raise CheckpointError(f"{path} changes {len(differing)} base tensors (e.g. {differing[0]}); per-request "
                              "switching cannot apply them — merge the adapter into a separate checkpoint instead")
