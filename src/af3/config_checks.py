"""Checks of every field a checkpoint's configs hold, and of what a config costs in memory.

What they guarantee: a config that passes builds a model without a ``TypeError``/``ZeroDivisionError`` (every
field has its type, ints are ints and not bools or floats, sizes are positive and within sane bounds, heads
divide the widths, rotary settings are supported), token ids lie in the vocabulary, and a model is only allocated
after :func:`check_memory` has compared its size with the memory of the device it goes to. Each failure is one
:class:`CheckpointError` line naming the field (``text_config.num_hidden_layers``) and the value; the readers in
:mod:`af3.config` put the file's path in front.
"""

from __future__ import annotations

import math
from typing import Any

from .errors import CheckpointError

#: Bounds that no real checkpoint comes near; a value past them is a typo or a hostile file.
MAX_LAYERS = 1024
MAX_HEADS = 4096
MAX_WIDTH = 2**20
MAX_VOCAB = 2**40  # a huge vocabulary is left to the memory check, which says how many GB it implies
MAX_POSITIONS = 2**24
#: Rotary types the decoder implements.
ROPE_TYPES = ("default", "linear")


def describe(value: Any) -> str:
    """``'four' (a string)``: a value and its JSON type, for messages."""
    kinds = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", type(None): "null"}
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    return f"{shown} ({kinds.get(type(value), type(value).__name__)})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(where: str, name: str, value: Any, lo: int = 1, hi: int | None = None, optional: bool = False) -> None:
    """``value`` is an int (not a bool, not a float) in ``lo..hi`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f"an integer >= {lo}" if hi is None else f"an integer from {lo} to {hi}"
        raise CheckpointError(f"{where}{name} must be {bound}, got {describe(value)}")


def check_number(where: str, name: str, value: Any, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, optional: bool = False) -> None:
    """``value`` is a finite int or float (not a bool) in ``[lo, hi]`` (``(lo, hi]`` when ``lo_open``)."""
    if value is None and optional:
        return
    ok = _is_number(value) and math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value <= hi
    if not ok:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            parts.append(f"<= {hi:g}")
        raise CheckpointError(f"{where}{name} must be a finite number{' ' if parts else ''}{' and '.join(parts)}, "
                              f"got {describe(value)}")


def check_bool(where: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise CheckpointError(f"{where}{name} must be true or false, got {describe(value)}")


def check_str(where: str, name: str, value: Any, choices: tuple[str, ...] | None = None,
              optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str) or (choices is not None and value not in choices):
        want = "a string" if choices is None else f"one of {', '.join(repr(c) for c in choices)} (the only " \
                                                   "supported value" + ("s" if len(choices) > 1 else "") + ")"
        raise CheckpointError(f"{where}{name} must be {want}, got {describe(value)}")


def check_dict(where: str, name: str, value: Any, optional: bool = True) -> None:
    if value is None and optional:
        return
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}{name} must be an object, got {describe(value)}")


def check_ids(where: str, name: str, value: Any) -> None:
    """A token id field: null, an int >= 0, or a list of them (``eos_token_id`` may be a list)."""
    if value is None or (_is_int(value) and value >= 0):
        return
    if isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value):
        return
    raise CheckpointError(f"{where}{name} must be a token id (an integer >= 0), a list of them or null, "
                          f"got {describe(value)}")


def check_encoder(cfg: Any, where: str = "audio_config.") -> None:
    """Fields of :class:`af3.config.EncoderConfig`."""
    check_str(where, "model_type", cfg.model_type)
    check_int(where, "num_mel_bins", cfg.num_mel_bins, 1, 1024)
    check_int(where, "num_hidden_layers", cfg.num_hidden_layers, 1, MAX_LAYERS)
    check_int(where, "num_attention_heads", cfg.num_attention_heads, 1, MAX_HEADS)
    check_int(where, "hidden_size", cfg.hidden_size, 1, MAX_WIDTH)
    check_int(where, "intermediate_size", cfg.intermediate_size, 1, 4 * MAX_WIDTH)
    check_int(where, "max_source_positions", cfg.max_source_positions, 1, MAX_POSITIONS)
    check_str(where, "activation_function", cfg.activation_function, ("gelu",))
    if cfg.hidden_size % cfg.num_attention_heads:
        raise CheckpointError(f"{where}num_attention_heads ({cfg.num_attention_heads}) must divide hidden_size "
                              f"({cfg.hidden_size})")


def check_text(cfg: Any, where: str = "text_config.") -> None:
    """Fields of :class:`af3.config.TextConfig` (``head_dim`` may still be None: it is derived after this)."""
    check_str(where, "model_type", cfg.model_type)
    check_int(where, "vocab_size", cfg.vocab_size, 1, MAX_VOCAB)
    check_int(where, "hidden_size", cfg.hidden_size, 1, MAX_WIDTH)
    check_int(where, "intermediate_size", cfg.intermediate_size, 1, 4 * MAX_WIDTH)
    check_int(where, "num_hidden_layers", cfg.num_hidden_layers, 1, MAX_LAYERS)
    check_int(where, "num_attention_heads", cfg.num_attention_heads, 1, MAX_HEADS)
    check_int(where, "num_key_value_heads", cfg.num_key_value_heads, 1, MAX_HEADS)
    check_int(where, "head_dim", cfg.head_dim, 2, 4096, optional=True)
    check_str(where, "hidden_act", cfg.hidden_act, ("silu",))
    check_int(where, "max_position_embeddings", cfg.max_position_embeddings, 1, MAX_POSITIONS)
    check_number(where, "rms_norm_eps", cfg.rms_norm_eps, 0, 1, lo_open=True)
    check_number(where, "rope_theta", cfg.rope_theta, 0, lo_open=True, optional=True)
    check_dict(where, "rope_parameters", cfg.rope_parameters)
    check_dict(where, "rope_scaling", cfg.rope_scaling)
    check_bool(where, "tie_word_embeddings", cfg.tie_word_embeddings)
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        check_ids(where, name, getattr(cfg, name))
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    if heads % kv:
        raise CheckpointError(f"{where}num_attention_heads ({heads}) must be a multiple of num_key_value_heads "
                              f"({kv})")
    if cfg.head_dim is None and cfg.hidden_size % heads:
        raise CheckpointError(f"{where}num_attention_heads ({heads}) must divide hidden_size ({cfg.hidden_size})")
    head_dim = cfg.head_dim if cfg.head_dim is not None else cfg.hidden_size // heads
    if heads * head_dim != cfg.hidden_size:
        raise CheckpointError(f"{where}head_dim ({head_dim}) x num_attention_heads ({heads}) = {heads * head_dim} "
                              f"must equal hidden_size ({cfg.hidden_size}), as in AF3's Qwen2 decoder")
    if head_dim % 2:
        raise CheckpointError(f"{where}head_dim ({head_dim}) must be even: rotary embeddings rotate pairs")
    for key in ("rope_scaling", "rope_parameters"):
        params = getattr(cfg, key)
        if params:
            _check_rope(f"{where}{key}.", params)
    if cfg.extra.get("use_sliding_window") is True:
        raise CheckpointError(f"{where}use_sliding_window is true, but sliding-window attention is not supported; "
                              "set it to false (AF3's decoder attends to the whole context)")


def _check_rope(where: str, params: dict) -> None:
    kind = params.get("rope_type", params.get("type", "default"))
    check_str(where, "rope_type", kind, ROPE_TYPES)
    if "rope_theta" in params:
        check_number(where, "rope_theta", params["rope_theta"], 0, lo_open=True)
    if kind == "linear":
        if "factor" not in params:
            raise CheckpointError(f"{where}rope_type 'linear' needs a 'factor' (positions are divided by it)")
        check_number(where, "factor", params["factor"], 0, lo_open=True)


def check_af3(cfg: Any) -> None:
    """Top-level fields of :class:`af3.config.AF3Config` (the sub-configs check themselves)."""
    check_str("", "model_type", cfg.model_type)
    check_int("", "audio_token_id", cfg.audio_token_id, 0)
    check_str("", "projector_hidden_act", cfg.projector_hidden_act, ("gelu",))
    check_bool("", "projector_bias", cfg.projector_bias)


#: GenerationConfig fields whose null means "the default" (transformers treats null as unset).
GENERATION_NULL_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0}


def check_generation(gen: Any, where: str = "") -> None:
    """Fields of :class:`af3.config.GenerationConfig`."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        check_ids(where, name, getattr(gen, name))
    check_int(where, "max_new_tokens", gen.max_new_tokens, 1, optional=True)
    check_int(where, "max_length", gen.max_length, 1, optional=True)
    check_bool(where, "do_sample", gen.do_sample)
    check_number(where, "temperature", gen.temperature, 0)
    check_int(where, "top_k", gen.top_k, 0, optional=True)
    check_number(where, "top_p", gen.top_p, 0, 1, lo_open=True)
    check_number(where, "repetition_penalty", gen.repetition_penalty, 0, lo_open=True)


def _as_list(ids: Any) -> list:
    return [] if ids is None else ids if isinstance(ids, list) else [ids]


def check_token_ids(config: Any, gen: Any | None = None, where: str = "config.json",
                    gen_where: str = "generation_config.json") -> None:
    """Every token id of the config (and generation config) lies in the vocabulary."""
    vocab = config.text_config.vocab_size
    checks = [(where, "audio_token_id", config.audio_token_id)]
    checks += [(where, f"text_config.{n}", getattr(config.text_config, n))
               for n in ("bos_token_id", "eos_token_id", "pad_token_id")]
    if gen is not None:
        checks += [(gen_where, n, getattr(gen, n)) for n in ("bos_token_id", "eos_token_id", "pad_token_id")]
    for file, name, ids in checks:
        for i in _as_list(ids):
            if i >= vocab:
                raise CheckpointError(f"{file}: {name} {i} is outside the vocabulary (text_config.vocab_size is "
                                      f"{vocab}, so ids go up to {vocab - 1}); fix the id or the vocab_size")


def check_features(cfg: Any, where: str = "feature_extractor.") -> None:
    """Fields of :class:`af3.features.FeatureConfig`, before anything is derived from them."""
    check_int(where, "feature_size", cfg.feature_size, 1, 1024)
    check_int(where, "sampling_rate", cfg.sampling_rate, 1000, 384_000)
    check_int(where, "hop_length", cfg.hop_length, 1, 65_536)
    check_int(where, "n_fft", cfg.n_fft, 2, 65_536)
    check_int(where, "chunk_length", cfg.chunk_length, 1, 3600)
    check_number(where, "padding_value", cfg.padding_value)
    check_number(where, "dither", cfg.dither, 0)
    check_bool(where, "return_attention_mask", cfg.return_attention_mask)
    check_str(where, "feature_extractor_type", cfg.feature_extractor_type)
    samples = cfg.chunk_length * cfg.sampling_rate
    if samples > 2**25:
        raise CheckpointError(f"{where}chunk_length x sampling_rate is {samples} samples per window; at most "
                              f"{2**25} are supported (AF3 uses 30 s at 16000 Hz)")
    if cfg.n_fft > samples or cfg.hop_length > samples:
        raise CheckpointError(f"{where}n_fft ({cfg.n_fft}) and hop_length ({cfg.hop_length}) must not exceed the "
                              f"{samples} samples of a window")


# ---------------------------------------------------------------------------------------------- memory
def parameter_count(config: Any) -> int:
    """Parameters of the model ``config`` describes, from its sizes alone (nothing is built)."""
    a, t = config.audio_config, config.text_config
    d, f = a.hidden_size, a.intermediate_size
    encoder = (a.num_mel_bins * d * 3 + d) + (d * d * 3 + d) + a.max_source_positions * d + 2 * d
    encoder += a.num_hidden_layers * (4 * d * d + 3 * d + 2 * d * f + f + d + 4 * d)
    h, v = t.hidden_size, t.vocab_size
    projector = d * h + h * h + (2 * h if config.projector_bias else 0)
    hd = t.head_dim if t.head_dim is not None else h // t.num_attention_heads
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    layer = h * q + q + 2 * (h * kv + kv) + q * h + 3 * h * t.intermediate_size + 2 * h
    text = v * h + t.num_hidden_layers * layer + h + (0 if t.tie_word_embeddings else v * h)
    return encoder + projector + text


def _read_int(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            text = f.read().strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None


def available_memory(device: Any) -> tuple[int, str] | None:
    """(bytes that ``device`` can still hold, where the number comes from), or None where it is unknown: what
    :func:`af3.system.available_memory` says, capped for the CPU by the container's memory limit (cgroup v2)."""
    from .system import available_memory as free_bytes

    avail = free_bytes(device)
    if avail is None:
        return None
    if device.type != "cpu":
        return avail, f"free on {device}"
    limit = _read_int("/sys/fs/cgroup/memory.max")  # "max" when unlimited → None
    used = _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and used is not None and limit - used < avail:
        return max(0, limit - used), "left under this container's memory limit"
    return avail, "available RAM"


def check_memory(config: Any, itemsize: int, dtype_name: str, device: Any, where: str) -> None:
    """Raise a :class:`CheckpointError` when the model ``config`` describes, at ``itemsize`` bytes per weight,
    does not fit in what ``device`` has free (checked before anything is allocated)."""
    need = parameter_count(config) * itemsize
    have = available_memory(device)
    if have is not None and need > have[0]:
        raise CheckpointError(
            f"{where} implies a model of {need / 1e9:.1f} GB in {dtype_name} but there are {have[0] / 1e9:.1f} GB "
            f"{have[1]}; check the sizes in the config (vocab_size, hidden_size, num_hidden_layers), or load it "
            "in a smaller dtype or on a machine with more memory"
        )
