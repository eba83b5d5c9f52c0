"""Training run configuration: one YAML file plus ``section.key=value`` overrides → a :class:`TrainConfig` tree.

Every value a stage preset provides (learning rate, audio length, batch size, accumulation, epochs) may be left
out (``null``); :func:`load_config` fills it from the preset named by ``stage``, so the ``config.yaml`` written into
the output folder is the complete, resolved run description (every path in it absolute).

Paths (``model.path``, ``data.manifests``, the manifest paths inside ``data.mixture``, ``data.eval``, ``output``,
``train.resume``): relative ones in the YAML file are relative to the file's folder; relative ones given as
``KEY=VALUE`` overrides (the command line) are relative to the current directory, like any path typed in a
shell; :func:`config_from_dict` resolves them against its ``base`` argument (default: the current directory).
A mixture term that is a name of ``data.manifests`` stays a name.

Every value is checked when the config is built (types, finite numbers, ranges, the mixture's syntax and
weights), so a bad value is an :class:`~af3.errors.InputError` naming its key before anything is loaded. The
sections themselves (keys, defaults, meanings) are the dataclasses of :mod:`af3.training.sections`.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import re
import types
import typing
from typing import Any, Union

import yaml

from ..config import DTYPE_NAMES, MAX_AUDIO_SECONDS, WINDOW_SECONDS
from ..errors import InputError
from ..files import write_atomic
from .mixture import parse_mixture, resolve_mixture_paths
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
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


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

#: Dotted keys that hold file system paths (``*`` = every value of a mapping); ``data.mixture`` is resolved too
#: (its manifest paths, not its names).
PATH_KEYS = ("model.path", "data.manifests.*", "data.eval", "output", "train.resume")


def _resolve_path(value: Any, base: str) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)  # `model.path: 2024` names a folder "2024"
    if not isinstance(value, str) or not value.strip() or "://" in value:
        return value
    value = os.path.expanduser(value)
    return os.path.normpath(value if os.path.isabs(value) else os.path.join(base, value))


def _manifests(raw: Any) -> dict:
    data = raw.get("data") if isinstance(raw, dict) else None
    named = data.get("manifests") if isinstance(data, dict) else None
    return named if isinstance(named, dict) else {}


def _resolve_paths(raw: dict, base: str, named: dict | None = None) -> None:
    """Make the path values of a raw (YAML) config absolute, relative to ``base``, in place (``named``: the
    dataset names known besides ``raw``'s own ``data.manifests``)."""
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
    data = raw.get("data")
    if isinstance(data, dict) and "mixture" in data:
        data["mixture"] = resolve_mixture_paths(data["mixture"], {**(named or {}), **_manifests(raw)}, base)


def _absolute_paths(cfg: TrainConfig, base: str) -> None:
    """The same resolution on a built config (a no-op for absolute paths)."""
    cfg.model.path = _resolve_path(cfg.model.path, base)
    cfg.data.manifests = {k: _resolve_path(v, base) for k, v in cfg.data.manifests.items()}
    cfg.data.mixture = resolve_mixture_paths(cfg.data.mixture, cfg.data.manifests, base)
    cfg.data.eval = _resolve_path(cfg.data.eval, base)
    cfg.output = _resolve_path(cfg.output, base)
    if isinstance(cfg.train.resume, str):
        cfg.train.resume = _resolve_path(cfg.train.resume, base)


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
    """Set ``KEY=VALUE`` overrides into a raw config dict (unknown keys are an :class:`InputError`); relative paths
    in them are resolved against ``base`` when it is given."""
    for text in overrides:
        parts, value = parse_override(text)
        _section_type(TrainConfig, parts, ".".join(parts))  # raises for unknown keys
        if base is not None:  # resolve the paths of the value as if it were the only thing in the config
            wrapper: Any = value
            for p in reversed(parts):
                wrapper = {p: wrapper}
            _resolve_paths(wrapper, base, named=_manifests(raw))
            for p in parts:
                wrapper = wrapper[p]
            value = wrapper
        node = raw
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {}
            node = node[p]
        node[parts[-1]] = value
    return raw


def config_from_dict(raw: dict, base: str | os.PathLike | None = None) -> TrainConfig:
    """Build, check and resolve (stage defaults) a config from plain data; relative paths in it are relative to
    ``base`` (default: the current directory), and so is the default ``output``. ``raw`` is not changed."""
    base = os.path.abspath(os.fspath(base) if base is not None else os.getcwd())
    if isinstance(raw, dict):
        raw = copy.deepcopy(raw)
        _resolve_paths(raw, base)
        raw.setdefault("output", os.path.join(base, TrainConfig.output))
    return resolve(_build(TrainConfig, raw), base)


def _read_yaml(path: str) -> dict:
    if os.path.isdir(path):
        raise InputError(f"training config {path!r} is a folder; give the path of its YAML file")
    if not os.path.isfile(path):
        raise InputError(f"training config {path!r} does not exist")
    try:
        with open(path, encoding="utf-8-sig") as f:
            loaded = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        what = " ".join(str(getattr(e, "problem", None) or e).split())
        raise InputError(f"{where}: not valid YAML ({what})") from None
    except UnicodeDecodeError as e:
        raise InputError(f"training config {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise InputError(f"cannot read training config {path!r}: {e.strerror or e}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise InputError(f"{path}: a training config is a mapping of sections (model, data, optim, ...), "
                         f"not a {type(loaded).__name__}")
    return loaded or {}


def load_config(path: str | os.PathLike | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML run config, apply ``KEY=VALUE`` overrides and fill stage defaults."""
    raw: dict = {}
    cwd = os.getcwd()
    if path is not None:
        path = os.fspath(path)
        raw = _read_yaml(path)
        base = os.path.dirname(os.path.abspath(path))
        _resolve_paths(raw, base)
        raw.setdefault("output", os.path.join(base, TrainConfig.output))  # default output next to the YAML
    apply_overrides(raw, list(overrides), base=cwd)
    return resolve(_build(TrainConfig, raw), cwd)


def resolve(cfg: TrainConfig, base: str | os.PathLike | None = None) -> TrainConfig:
    """Fill the values left to the stage preset, make relative paths absolute (against ``base``, default the
    current directory) and check the rest; returns ``cfg`` (changed in place)."""
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
    _absolute_paths(cfg, os.path.abspath(os.fspath(base) if base is not None else os.getcwd()))
    _check(cfg)
    return cfg


#: Upper bounds that keep a run meaningful and its memory bounded (AdamW moves every weight by about ``lr`` per
#: step, so a peak rate above 1 cannot train; more workers than this only exhaust processes and memory).
MAX_LR = 1.0
MAX_WORKERS = 256
MAX_EPOCHS = 1e6
MAX_SEED = 2**62
DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check(cfg: TrainConfig) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise InputError(f"config key {key!r}: {what}")

    def between(x: Any, low: float, high: float) -> bool:
        return _finite(x) and low <= x <= high

    d, o, t, lo = cfg.data, cfg.optim, cfg.train, cfg.lora
    need(bool(cfg.model.path), "model.path", "set the checkpoint folder to start from")
    need(cfg.model.dtype in DTYPE_NAMES, "model.dtype", f"one of {', '.join(DTYPE_NAMES)}")
    need(all(isinstance(v, str) and v.strip() for v in d.manifests.values()), "data.manifests",
         "must map dataset names to manifest paths")
    need(d.mixture is not None and (not isinstance(d.mixture, str) or bool(d.mixture.strip())), "data.mixture",
         "set the data mixture, like 2.0*asr+1.0*qa or a manifest path")
    try:
        parse_mixture(d.mixture, d.manifests, must_exist=False)
    except InputError as e:
        raise InputError(f"config key 'data.mixture': {e}") from None
    need(0 <= d.num_workers <= MAX_WORKERS, "data.num_workers", f"must be from 0 to {MAX_WORKERS}")
    need(d.max_skipped >= 0, "data.max_skipped", "must be 0 or more")
    need(between(d.max_audio_len, WINDOW_SECONDS, MAX_AUDIO_SECONDS), "data.max_audio_len",
         f"seconds of audio per example, from {WINDOW_SECONDS} (one window) to {MAX_AUDIO_SECONDS:g} (AF3's cap)")
    need(d.group_size >= 1, "data.group_size", "must be at least 1")
    need(d.length_bucket >= 0, "data.length_bucket", "must be 0 or positive")
    need(o.lr is not None and _finite(o.lr) and 0 < o.lr <= MAX_LR, "optim.lr",
         f"must be a number > 0 and at most {MAX_LR:g}")
    need(len(o.betas) == 2 and all(between(b, 0, 1) and b < 1 for b in o.betas), "optim.betas",
         "two numbers in [0, 1)")
    need(between(o.eps, 1e-30, 1), "optim.eps", "must be a number from 1e-30 to 1 (usually 1e-8)")
    need(between(o.weight_decay, 0, 1), "optim.weight_decay", "must be a number from 0 to 1")
    need(o.schedule in SCHEDULES, "optim.schedule", f"one of {', '.join(SCHEDULES)}")
    need(between(o.warmup_ratio, 0, 1) and o.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    need(o.warmup_steps is None or o.warmup_steps >= 0, "optim.warmup_steps", "must be 0 or more")
    need(between(o.min_lr_ratio, 0, 1), "optim.min_lr_ratio", "must be in [0, 1]")
    need(isinstance(o.part_lr, dict) and all(isinstance(k, str) and k and _finite(v) and 0 < v <= MAX_LR
                                             for k, v in o.part_lr.items()),
         "optim.part_lr", f"must map parameter-name prefixes to learning rates > 0 and at most {MAX_LR:g}")
    need(_finite(o.max_grad_norm) and o.max_grad_norm >= 0, "optim.max_grad_norm", "must be 0 (off) or more")
    need(t.max_steps is None or t.max_steps >= 1, "train.max_steps", "must be at least 1")
    need(t.epochs is None or (_finite(t.epochs) and 0 < t.epochs <= MAX_EPOCHS), "train.epochs",
         f"must be a number > 0 and at most {MAX_EPOCHS:g}")
    need(t.batch_size is not None and t.batch_size >= 1, "train.batch_size", "must be at least 1")
    need(t.grad_accum is not None and t.grad_accum >= 1, "train.grad_accum", "must be at least 1")
    need(d.eval_batch_size is not None and d.eval_batch_size >= 1, "data.eval_batch_size", "must be at least 1")
    need(0 <= t.seed < MAX_SEED, "train.seed", "must be an integer from 0 to 2**62")
    need(t.bf16 in (True, False, "auto"), "train.bf16", "true, false or auto")
    need(t.log_every >= 1, "train.log_every", "must be at least 1")
    need(t.eval_every >= 0, "train.eval_every", "must be 0 (only at the end) or more")
    need(t.save_every >= 0, "train.save_every", "must be 0 (only final/) or more")
    need(t.keep_last >= 1, "train.keep_last", "must be at least 1")
    need(t.strategy in STRATEGIES, "train.strategy", f"one of {', '.join(STRATEGIES)}")
    need(bool(DEVICE_RE.match(t.device)), "train.device", "auto, cpu, cuda or cuda:N")
    need(lo.r >= 1, "lora.r", "must be at least 1")
    need(_finite(lo.alpha) and lo.alpha > 0, "lora.alpha", "must be a number > 0")
    need(between(lo.dropout, 0, 1) and lo.dropout < 1, "lora.dropout", "must be in [0, 1)")
    if isinstance(lo.target_modules, str):
        try:
            re.compile(lo.target_modules)
        except re.error as e:
            raise InputError(f"config key 'lora.target_modules': not a valid regex ({e})") from None
    elif lo.target_modules is not None:
        need(bool(lo.target_modules) and all(m.strip() for m in lo.target_modules), "lora.target_modules",
             "a list of module names like [q_proj, v_proj], or a regex")
    need(bool(cfg.output.strip()), "output", "set the output folder")


def save_config(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically and flushed: a crash never leaves half a file)."""
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)
    write_atomic(path, text.encode("utf-8"))
