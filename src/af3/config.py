"""Model configuration: dataclasses whose field names follow the HF ``config.json`` of AudioFlamingo3.

Unknown fields are kept in ``extra`` and written back, so a config survives a load/save round trip unchanged.
Every config checks its fields when it is built (:mod:`af3.config_checks`): a wrong type, a size out of range or
an unsupported setting is a :class:`CheckpointError` that names the field, and — when read from a file — the file.
:func:`read_json` reads at most :data:`MAX_JSON_BYTES` and only accepts a JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from . import config_checks as checks
from .errors import CheckpointError, InputError

#: Label value that no loss or accuracy counts (prompt tokens, audio placeholders, padding).
IGNORE_INDEX = -100

#: One audio window of the encoder, in seconds (Whisper's 30 s; ``FeatureConfig.chunk_length``).
WINDOW_SECONDS = 30
#: Windows per clip AF3 was trained on (stages 3.5 and 4): 20 windows of 30 s = 10 minutes.
MAX_AUDIO_WINDOWS = 20
#: The default cap on one clip's length, in seconds; longer clips are cut (``af3.longform`` goes beyond it).
MAX_AUDIO_SECONDS = float(WINDOW_SECONDS * MAX_AUDIO_WINDOWS)

#: Names a user may give for a compute dtype (CLI flags, training YAML) → torch's name; ``auto`` keeps the
#: checkpoint's dtype.
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
               "float16": "float16", "fp16": "float16", "auto": "auto"}


def torch_dtype(name: str | None):
    """The torch dtype of a name in :data:`DTYPE_NAMES` (``None`` for ``auto`` or ``None``); an unknown name is a
    ``ValueError`` that lists the choices."""
    if name is None or DTYPE_NAMES.get(name) == "auto":
        return None
    if name not in DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {', '.join(sorted(set(DTYPE_NAMES.values())))}")
    import torch

    return getattr(torch, DTYPE_NAMES[name])


def _split_known(cls: type, data: dict[str, Any], aliases: dict[str, str]) -> tuple[dict, dict]:
    """Split ``data`` into the dataclass's own fields (after alias renames) and everything else."""
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known, extra = {}, {}
    for key, value in data.items():
        key2 = aliases.get(key, key)
        if key2 in names:
            known[key2] = value
        else:
            extra[key] = value
    return known, extra


class _JsonConfig:
    """Shared (de)serialisation for the config dataclasses."""

    ALIASES: ClassVar[dict[str, str]] = {}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise CheckpointError(f"a {cls.__name__} must be a JSON object, got {checks.describe(data)}")
        known, extra = _split_known(cls, dict(data), cls.ALIASES)
        return cls(**known, extra=extra)  # type: ignore[call-arg]

    @classmethod
    def from_file(cls, path: str | os.PathLike):
        """Read and check a JSON config file; a bad field is a :class:`CheckpointError` that names the file."""
        data = read_json(path)
        try:
            return cls.from_dict(data)
        except CheckpointError as e:
            raise CheckpointError(f"{os.fspath(path)}: {e}; fix it in that file") from None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in dataclasses.asdict(self).items() if k != "extra"}
        out.update(self.extra)  # type: ignore[attr-defined]
        return out


@dataclass
class EncoderConfig(_JsonConfig):
    """Whisper-large-v3-style audio encoder (``audio_config``). Defaults are the real checkpoint's values."""

    ALIASES: ClassVar[dict[str, str]] = {
        "d_model": "hidden_size",
        "encoder_layers": "num_hidden_layers",
        "encoder_attention_heads": "num_attention_heads",
        "encoder_ffn_dim": "intermediate_size",
    }

    model_type: str = "audioflamingo3_encoder"
    num_mel_bins: int = 128
    num_hidden_layers: int = 32
    num_attention_heads: int = 20
    intermediate_size: int = 5120
    hidden_size: int = 1280
    activation_function: str = "gelu"
    max_source_positions: int = 1500
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks.check_encoder(self)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclass
class TextConfig(_JsonConfig):
    """Qwen2 decoder (``text_config``). Defaults are Qwen2.5-7B's, as in the real AF3 checkpoint."""

    model_type: str = "qwen2"
    vocab_size: int = 151672
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float | None = None
    rope_parameters: dict[str, Any] | None = None
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 151670
    eos_token_id: int | list[int] | None = 151645
    pad_token_id: int | None = 151671
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks.check_text(self)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads

    def rope(self) -> dict[str, Any]:
        """The rotary settings, whichever way the config spells them (v4 ``rope_theta``/``rope_scaling`` or
        v5 ``rope_parameters``). Always has ``rope_type`` and ``rope_theta``."""
        params: dict[str, Any] = dict(self.rope_scaling or {})
        params.update(self.rope_parameters or {})
        if "type" in params and "rope_type" not in params:
            params["rope_type"] = params.pop("type")
        params.setdefault("rope_type", "default")
        if "rope_theta" not in params:
            params["rope_theta"] = self.rope_theta if self.rope_theta is not None else 10000.0
        return params

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        for key in ("rope_theta", "rope_parameters", "rope_scaling"):
            if out.get(key) is None:
                out.pop(key)
        return out


@dataclass
class AF3Config(_JsonConfig):
    """The whole model (``config.json`` with ``model_type: audioflamingo3``)."""

    model_type: str = "audioflamingo3"
    audio_config: EncoderConfig = field(default_factory=EncoderConfig)
    text_config: TextConfig = field(default_factory=TextConfig)
    audio_token_id: int = 151669
    projector_hidden_act: str = "gelu"
    projector_bias: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        checks.check_af3(self)
        if not isinstance(self.audio_config, EncoderConfig) or not isinstance(self.text_config, TextConfig):
            raise CheckpointError("audio_config and text_config must be an EncoderConfig and a TextConfig")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AF3Config:
        if not isinstance(data, dict):
            raise CheckpointError(f"the model config must be a JSON object, got {checks.describe(data)}")
        data = dict(data)
        kind = data.get("model_type", "audioflamingo3")
        if kind != "audioflamingo3":
            raise CheckpointError(f"model_type is {checks.describe(kind)}, not 'audioflamingo3': this is not an AF3 "
                                  "checkpoint (a folder in NVIDIA's layout has llm/, sound_tower/ and "
                                  "sound_mm_projector/)")
        parts = {}
        for key, part_cls in (("audio_config", EncoderConfig), ("text_config", TextConfig)):
            value = data.pop(key, None)
            if value is None:
                value = {}
            if not isinstance(value, (dict, part_cls)):
                raise CheckpointError(f"{key} must be an object, got {checks.describe(value)}")
            parts[key] = part_cls.from_dict(value) if isinstance(value, dict) else value
        cfg = super().from_dict(data)
        cfg.audio_config, cfg.text_config = parts["audio_config"], parts["text_config"]
        return cfg

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model_type": self.model_type,
            "architectures": ["AudioFlamingo3ForConditionalGeneration"],
            "audio_config": self.audio_config.to_dict(),
            "text_config": self.text_config.to_dict(),
            "audio_token_id": self.audio_token_id,
            "projector_hidden_act": self.projector_hidden_act,
            "projector_bias": self.projector_bias,
        }
        for key, value in self.extra.items():
            out.setdefault(key, value)
        return out

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())


@dataclass
class GenerationConfig(_JsonConfig):
    """Decoding defaults of a checkpoint (``generation_config.json``). Unset fields mean "greedy, no limits"."""

    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, default in checks.GENERATION_NULL_DEFAULTS.items():  # null = unset, as in transformers
            if getattr(self, name) is None:
                setattr(self, name, default)
        checks.check_generation(self)

    @property
    def eos_ids(self) -> list[int]:
        """End-of-sequence ids as a list (the config may hold one int or a list)."""
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return [int(t) for t in self.eos_token_id]

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())


#: NVIDIA's original checkpoint layout: one folder per part → our module prefix.
NVIDIA_FOLDERS = {"llm": "language_model", "sound_tower": "audio_tower", "sound_mm_projector": "multi_modal_projector"}


def is_nvidia_layout(folder: str | os.PathLike) -> bool:
    """True for a checkpoint in NVIDIA's layout (``llm/``, ``sound_tower/``, ``sound_mm_projector/``)."""
    return all(os.path.isdir(os.path.join(folder, sub)) for sub in NVIDIA_FOLDERS)


#: Largest JSON file :func:`read_json` reads (a Qwen2 ``tokenizer.json`` is about 11 MB, configs a few kB).
MAX_JSON_BYTES = 64 * 1024**2


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def read_json(path: str | os.PathLike, max_bytes: int = MAX_JSON_BYTES) -> dict[str, Any]:
    """Read a JSON object from a file; a missing, unreadable, oversized or broken file, a key that appears twice
    or a top level that is not an object is a :class:`CheckpointError` naming the file."""
    path = os.fspath(path)
    try:
        if os.path.exists(path) and not os.path.isdir(path) and not os.path.isfile(path):
            raise CheckpointError(f"{path!r} is not a regular file (a pipe or a device?); it cannot be a config file")
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path!r}") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path!r} is a folder, not a JSON file") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {path!r}: {e.strerror or e}") from None
    if len(raw) > max_bytes:
        raise CheckpointError(f"{path!r} is larger than {max_bytes // 1024**2} MB; it is not a config file")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise CheckpointError(f"{path!r} is not valid JSON: it is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path!r} is not valid JSON: {e}") from None
    except ValueError as e:
        raise CheckpointError(f"{path!r} is not valid JSON: {e}") from None
    except RecursionError:
        raise CheckpointError(f"{path!r} is not valid JSON: it is nested too deeply") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path!r} must hold a JSON object {{...}}, not {checks.describe(data)}")
    return data


def folder_path(path: Any, what: str = "checkpoint folder") -> str:
    """``path`` (str or os.PathLike) as a str; anything else is an :class:`InputError`."""
    try:
        folder = os.fspath(path)
    except TypeError:
        folder = None
    if not isinstance(folder, str) or not folder:
        raise InputError(f"the {what} must be a path (str or os.PathLike), got {path!r}")
    return folder


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
