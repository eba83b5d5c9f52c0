"""Training run configuration: one YAML file plus ``section.key=value`` overrides → a :class:`TrainConfig` tree.

Every value a stage preset provides (learning rate, audio length, batch size, accumulation, epochs) may be left
out (``null``); :func:`load_config` fills it from the preset named by ``stage``, so the ``config.yaml`` written into
the output folder is the complete, resolved run description. Relative paths in the YAML file are relative to the
file's folder; relative paths given as overrides are relative to the current directory. The sections themselves
(keys, defaults, meanings) are the dataclasses of :mod:`af3.training.sections`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Union

import yaml

from ..config import DTYPE_NAMES
from ..errors import InputError
from .sections import (
    SCHEDULES,
    STRATEGIES,
    DataSection,
    LoraSection,
    ModelSection,
    OptimSection,
    TrainConfig,
    TrainSection,
)
from .stages import get_stage

#: The sections (defined in :mod:`af3.training.sections`) are importable from here too.
__all__ = [
    "DataSection",
    "LoraSection",
    "ModelSection",
    "OptimSection",
    "TrainConfig",
    "TrainSection",
    "apply_overrides",
    "config_from_dict",
    "load_config",
    "parse_override",
    "resolve",
    "save_config",
]

# ---------------------------------------------------------------------- building from plain data

def _is_section(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return "a number" if tp is float else getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert what YAML leaves as strings (``3e-4``)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        # Exact type matches first, so that `bool | str` keeps "path" a string and true a bool.
        for option in options:
            if option in (bool, int, float, str) and type(value) is option:
                return value
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except InputError:
                continue
        raise InputError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise InputError(f"config key {key!r}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        _, value_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise InputError(f"config key {key!r}: expected a mapping of names to values, got {value!r}")
        return {str(k): _coerce(v, value_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off"):
            return value.lower() in ("true", "yes", "on")
        raise InputError(f"config key {key!r}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise InputError(f"config key {key!r}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if number.is_integer():
            return int(number)
        raise InputError(f"config key {key!r}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise InputError(f"config key {key!r}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise InputError(f"config key {key!r}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise InputError(f"config key {key!r}: expected a string, got {value!r}")
    raise InputError(f"config key {key!r}: unsupported type {tp!r}")  # a bug in the dataclasses, not the input


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    """``cls(**data)`` with nested sections, type checks and an error naming any unknown key."""
    where = prefix.rstrip(".") or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise InputError(f"{where} must be a mapping of keys to values, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in data if k not in names]
    if unknown:
        raise InputError(f"unknown config key {prefix + str(unknown[0])!r}; known keys in {where}: "
                         f"{', '.join(names)}")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        kwargs[name] = _build(tp, value, f"{prefix}{name}.") if _is_section(tp) else \
            _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _section_type(cls: type, parts: list[str], key: str) -> Any:
    """The annotation at a dotted path (for override checks)."""
    tp: Any = cls
    for i, part in enumerate(parts):
        if _is_section(tp):
            hints = typing.get_type_hints(tp)
            if part not in hints:
                where = ".".join(parts[:i]) or "the config"
                raise InputError(f"unknown config key {key!r}; known keys in {where}: {', '.join(hints)}")
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            raise InputError(f"unknown config key {key!r}: {'.'.join(parts[:i])} is not a section")
    return tp


# ---------------------------------------------------------------------- paths

#: Dotted keys that hold file system paths (``*`` = every value of a mapping).
PATH_KEYS = ("model.path", "data.manifests.*", "data.eval", "output", "train.resume")


def _resolve_path(value: Any, base: str) -> Any:
    if not isinstance(value, str) or not value or "://" in value:
        return value
    value = os.path.expanduser(value)
    return os.path.normpath(value if os.path.isabs(value) else os.path.join(base, value))


def _resolve_paths(raw: dict, base: str) -> None:
    """Make the path values of a raw (YAML) config absolute, relative to ``base``, in place."""
    for key in PATH_KEYS:
        *parents, last = key.split(".")
        node: Any = raw
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if last == "*":
            for k, v in node.items():
                node[k] = _resolve_path(v, base)
        elif last in node and not isinstance(node[last], bool):
            node[last] = _resolve_path(node[last], base)


def _is_path_key(parts: list[str]) -> bool:
    dotted = ".".join(parts)
    return any(dotted == k or (k.endswith(".*") and dotted.startswith(k[:-1]) and len(parts) == k.count(".") + 1)
               for k in PATH_KEYS)


# ---------------------------------------------------------------------- public API

def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=3e-4"`` → (["optim", "lr"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key or any(not p for p in key.split(".")):
        raise InputError(f"bad override {text!r}: expected KEY=VALUE, like optim.lr=3e-4 or stage=stage2")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # e.g. "a: b" inside a value: keep the text
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], base: str | None = None) -> dict:
    """Set ``KEY=VALUE`` overrides into a raw config dict (unknown keys are an :class:`InputError`)."""
    for text in overrides:
        parts, value = parse_override(text)
        _section_type(TrainConfig, parts, ".".join(parts))  # raises for unknown keys
        if _is_path_key(parts) and base is not None and not isinstance(value, bool):
            value = _resolve_path(value, base)
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict) -> TrainConfig:
    """Build, check and resolve (stage defaults) a config from plain data with absolute paths."""
    return resolve(_build(TrainConfig, raw))


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML run config, apply ``KEY=VALUE`` overrides and fill stage defaults."""
    raw: dict = {}
    if path is not None:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f"training config {path!r} does not exist")
        try:
            with open(path, encoding="utf-8") as f:
                loaded = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise InputError(f"{path}: not valid YAML: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise InputError(f"{path}: a training config is a mapping of sections (model, data, optim, ...)")
        raw = loaded or {}
        base = os.path.dirname(os.path.abspath(path))
        _resolve_paths(raw, base)
        raw.setdefault("output", os.path.join(base, TrainConfig.output))  # default output next to the YAML
    apply_overrides(raw, list(overrides), base=os.getcwd())
    return config_from_dict(raw)


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the values left to the stage preset and check the rest; returns ``cfg`` (changed in place)."""
    stage = get_stage(cfg.stage)
    cfg.stage = stage.name
    if cfg.optim.lr is None:
        cfg.optim.lr = stage.lr
    if cfg.data.max_audio_len is None:
        cfg.data.max_audio_len = stage.max_audio_len
    if cfg.train.batch_size is None:
        cfg.train.batch_size = stage.batch_size
    if cfg.train.grad_accum is None:
        cfg.train.grad_accum = stage.grad_accum
    if cfg.train.max_steps is None and cfg.train.epochs is None:
        cfg.train.epochs = stage.epochs
    if cfg.data.eval_batch_size is None:
        cfg.data.eval_batch_size = cfg.train.batch_size
    cfg.model.dtype = DTYPE_NAMES.get(cfg.model.dtype, cfg.model.dtype)  # "bf16" → "bfloat16"
    if isinstance(cfg.train.bf16, str) and cfg.train.bf16.lower() != "auto":
        cfg.train.bf16 = _coerce(cfg.train.bf16, bool, "train.bf16")
    _check(cfg)
    return cfg


def _check(cfg: TrainConfig) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise InputError(f"config key {key!r}: {what}")

    need(bool(cfg.model.path), "model.path", "set the checkpoint folder to start from")
    need(cfg.model.dtype in DTYPE_NAMES, "model.dtype", f"one of {', '.join(DTYPE_NAMES)}")
    need(bool(cfg.data.mixture), "data.mixture", "set the data mixture, like 2.0*asr+1.0*qa or a manifest path")
    need(cfg.data.num_workers >= 0, "data.num_workers", "must be 0 or more")
    need(cfg.data.max_skipped >= 0, "data.max_skipped", "must be 0 or more")
    need(cfg.data.max_audio_len is not None and cfg.data.max_audio_len > 0, "data.max_audio_len", "must be > 0")
    need(cfg.data.group_size >= 1, "data.group_size", "must be at least 1")
    need(cfg.data.length_bucket >= 0, "data.length_bucket", "must be 0 or positive")
    need(cfg.data.eval_batch_size is not None and cfg.data.eval_batch_size >= 1, "data.eval_batch_size",
         "must be at least 1")
    need(cfg.optim.lr is not None and cfg.optim.lr > 0, "optim.lr", "must be > 0")
    need(len(cfg.optim.betas) == 2 and all(0 <= b < 1 for b in cfg.optim.betas), "optim.betas",
         "two numbers in [0, 1)")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be 0 or more")
    need(cfg.optim.schedule in SCHEDULES, "optim.schedule", f"one of {', '.join(SCHEDULES)}")
    need(0 <= cfg.optim.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    need(cfg.optim.warmup_steps is None or cfg.optim.warmup_steps >= 0, "optim.warmup_steps", "must be 0 or more")
    need(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    need(isinstance(cfg.optim.part_lr, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0
                                                     for k, v in cfg.optim.part_lr.items()),
         "optim.part_lr", "must map parameter-name prefixes to learning rates > 0")
    need(cfg.optim.max_grad_norm >= 0, "optim.max_grad_norm", "must be 0 (off) or more")
    t = cfg.train
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be at least 1")
    need(t.epochs is None or t.epochs > 0, "train.epochs", "must be > 0")
    need(t.batch_size is not None and t.batch_size >= 1, "train.batch_size", "must be at least 1")
    need(t.grad_accum is not None and t.grad_accum >= 1, "train.grad_accum", "must be at least 1")
    need(t.seed >= 0, "train.seed", "must be 0 or more")
    need(t.bf16 in (True, False, "auto"), "train.bf16", "true, false or auto")
    need(t.log_every >= 1, "train.log_every", "must be at least 1")
    need(t.eval_every >= 0, "train.eval_every", "must be 0 (only at the end) or more")
    need(t.save_every >= 0, "train.save_every", "must be 0 (only final/) or more")
    need(t.keep_last >= 1, "train.keep_last", "must be at least 1")
    need(t.strategy in STRATEGIES, "train.strategy", f"one of {', '.join(STRATEGIES)}")
    need(cfg.lora.r >= 1, "lora.r", "must be at least 1")
    need(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    need(0 <= cfg.lora.dropout < 1, "lora.dropout", "must be in [0, 1)")
    need(bool(cfg.output), "output", "set the output folder")


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: a crash never leaves half a file)."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(cfg.to_dict(), f, sort_keys=False, default_flow_style=None)
    os.replace(tmp, path)
