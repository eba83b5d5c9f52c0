"""Model configuration: dataclasses whose field names follow the HF ``config.json`` of AudioFlamingo3.

Unknown fields are kept in ``extra`` and written back, so a config survives a load/save round trip unchanged.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import CheckpointError

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
        known, extra = _split_known(cls, dict(data), cls.ALIASES)
        return cls(**known, extra=extra)  # type: ignore[call-arg]

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
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"text_config: num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AF3Config:
        data = dict(data)
        audio = data.pop("audio_config", None) or {}
        text = data.pop("text_config", None) or {}
        cfg = super().from_dict(data)
        cfg.audio_config = audio if isinstance(audio, EncoderConfig) else EncoderConfig.from_dict(audio)
        cfg.text_config = text if isinstance(text, TextConfig) else TextConfig.from_dict(text)
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

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> AF3Config:
        return cls.from_dict(read_json(path))

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

    @property
    def eos_ids(self) -> list[int]:
        """End-of-sequence ids as a list (the config may hold one int or a list)."""
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return [int(t) for t in self.eos_token_id]

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> GenerationConfig:
        return cls.from_dict(read_json(path))

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())


#: NVIDIA's original checkpoint layout: one folder per part → our module prefix.
NVIDIA_FOLDERS = {"llm": "language_model", "sound_tower": "audio_tower", "sound_mm_projector": "multi_modal_projector"}


def is_nvidia_layout(folder: str | os.PathLike) -> bool:
    """True for a checkpoint in NVIDIA's layout (``llm/``, ``sound_tower/``, ``sound_mm_projector/``)."""
    return all(os.path.isdir(os.path.join(folder, sub)) for sub in NVIDIA_FOLDERS)


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """Read a JSON file, turning a missing or broken file into a :class:`CheckpointError`."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"missing file {os.fspath(path)!r}") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{os.fspath(path)!r} is not valid JSON: {e}") from None


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")
