"""Checkpoint files: find, read (plain file reads, tensor by tensor), map keys, write.

Two on-disk layouts are understood:

* **HF** (``nvidia/audio-flamingo-3-hf``): ``config.json``, ``generation_config.json`` and ``model.safetensors`` or
  shards with ``model.safetensors.index.json``; tensor names equal our module names.
* **NVIDIA** (``nvidia/audio-flamingo-3``): ``llm/``, ``sound_tower/`` and ``sound_mm_projector/``, each with its
  own ``config.json`` and safetensors; keys get the prefix of their folder and the projector's ``layers.0``/``layers.2``
  become ``linear_1``/``linear_2``.

Weights are read tensor by tensor into a model whose storage was allocated empty, so loading needs about the
weights' size in memory, not twice that.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import torch
from safetensors.torch import save_file

from ..config import (NVIDIA_FOLDERS, AF3Config, EncoderConfig, GenerationConfig, TextConfig, is_nvidia_layout,
                      read_json, write_json)
from ..errors import CheckpointError

logger = logging.getLogger("af3")

LM_HEAD = "language_model.lm_head.weight"
EMBED = "language_model.model.embed_tokens.weight"
_PROJECTOR_RENAMES = [(re.compile(r"^multi_modal_projector\.layers\.0\."), "multi_modal_projector.linear_1."),
                      (re.compile(r"^multi_modal_projector\.layers\.2\."), "multi_modal_projector.linear_2.")]


def weight_files(folder: str | os.PathLike, allow_pickle: bool = False) -> list[str]:
    """The weight files of one folder: single safetensors, shards from an index, or (opt-in) a pickled .bin."""
    folder = os.fspath(folder)
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise CheckpointError(f"{index!r} has an empty weight_map")
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise CheckpointError(f"{index!r} names shard(s) that are missing: {', '.join(missing)}")
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    found = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors"))
    if len(found) == 1:
        return [os.path.join(folder, found[0])]
    if len(found) > 1:
        raise CheckpointError(f"{folder!r} has several .safetensors files but no model.safetensors.index.json")
    bins = sorted(f for f in os.listdir(folder) if f.endswith(".bin") and "non_lora" not in f)
    if bins and allow_pickle:
        return [os.path.join(folder, b) for b in bins]
    if bins:
        raise CheckpointError(
            f"{folder!r} only has pickled weights ({bins[0]}); they can run code when loaded. Convert them to "
            "safetensors, or pass allow_pickle=True to load them with torch.load(weights_only=True)"
        )
    raise CheckpointError(f"no weights in {folder!r}: expected model.safetensors or a sharded index")



_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


class SafetensorsFile:
    """One safetensors file read with plain file reads (no memory map).

    A memory map keeps every page it touched in the process's resident memory until the file is closed, so
    loading through it peaks at twice the weights. Reading each tensor into its destination (or a temporary
    that is freed right after) keeps the peak at the weights plus one tensor.
    """

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        try:
            size = int.from_bytes(self._file.read(8), "little")
            if not 0 < size <= 100 * 1024**2:
                raise ValueError(f"header size {size}")
            header = json.loads(self._file.read(size))
        except (ValueError, UnicodeDecodeError) as e:
            self._file.close()
            raise CheckpointError(f"cannot read {path!r}: not a safetensors file ({e})") from None
        header.pop("__metadata__", None)
        self._base = 8 + size
        self._header = header
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if os.path.getsize(path) < self._base + end:
            self._file.close()
            raise CheckpointError(f"{path!r} is truncated: its header promises {self._base + end} bytes")

    def keys(self) -> list[str]:
        return list(self._header)

    def dtype_name(self, key: str) -> str:
        return self._header[key]["dtype"]

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        name = self.dtype_name(key)
        if name not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{self.path}: tensor {key} has unsupported dtype {name}")
        return _SAFETENSORS_DTYPES[name]

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Fill ``out`` (CPU, contiguous, the tensor's dtype and shape) with the tensor's bytes."""
        begin, end = self._header[key]["data_offsets"]
        view = out.reshape(-1).view(torch.uint8).numpy()
        if view.nbytes != end - begin:
            raise CheckpointError(f"{self.path}: tensor {key} has {end - begin} bytes, expected {view.nbytes}")
        self._file.seek(self._base + begin)
        if self._file.readinto(memoryview(view)) != view.nbytes:
            raise CheckpointError(f"{self.path}: tensor {key} is cut short")

    def get_tensor(self, key: str) -> torch.Tensor:
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        self.read_into(key, out)
        return out

    def close(self) -> None:
        self._file.close()


class TensorSource:
    """Lazy name → tensor access over one or more weight files (safetensors read tensor by tensor)."""

    def __init__(self, files: list[str], rename: Callable[[str], str] | dict[str, Callable[[str], str]] = lambda k: k):
        """``rename`` maps a file's tensor names to ours: one function for all files, or one per file path."""
        self._stack = ExitStack()
        self._where: dict[str, tuple[Any, str]] = {}
        for path in files:
            file_rename = rename[path] if isinstance(rename, dict) else rename
            if path.endswith(".safetensors"):
                handle = SafetensorsFile(path)
                self._stack.callback(handle.close)
                keys = handle.keys()
            else:
                handle = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                keys = list(handle)
            for k in keys:
                self._where[file_rename(k)] = (handle, k)

    def keys(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        handle, key = self._where[name]
        return handle.get_tensor(key) if hasattr(handle, "get_tensor") else handle[key]

    def copy_into(self, name: str, target: torch.Tensor) -> None:
        """``target.copy_(tensor)``, reading straight into ``target`` when it is a CPU tensor of the same dtype."""
        handle, key = self._where[name]
        if (isinstance(handle, SafetensorsFile) and target.device.type == "cpu" and target.is_contiguous()
                and handle.dtype_name(key) in _SAFETENSORS_DTYPES
                and _SAFETENSORS_DTYPES[handle.dtype_name(key)] == target.dtype):
            handle.read_into(key, target)
        else:
            target.copy_(self.get(name))

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape_and_itemsize(self, name: str) -> tuple[tuple[int, ...], int]:
        """Shape and bytes per element without reading the tensor's data (safetensors header only)."""
        handle, key = self._where[name]
        if isinstance(handle, SafetensorsFile):
            return handle.shape(key), handle.dtype(key).itemsize
        t = handle[key]
        return tuple(t.shape), t.element_size()

    def close(self) -> None:
        self._stack.close()
        self._where.clear()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class StateSource(TensorSource):
    """The same interface over tensors already in memory (a model's ``state_dict``)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__([])
        self._state = state
        self._where = {k: (state, k) for k in state}

    def shape_and_itemsize(self, name: str) -> tuple[tuple[int, ...], int]:
        t = self._state[name]
        return tuple(t.shape), t.element_size()


def _names_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def check_match(model: torch.nn.Module, source: TensorSource, tie_embeddings: bool = False) -> list[str]:
    """Names of the tensors ``model`` wants from ``source``; missing, unexpected or mis-shaped tensors raise a
    :class:`CheckpointError` that names them. With tied embeddings a missing ``lm_head`` is allowed."""
    wanted = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    present = set(source.keys())
    missing = sorted(set(wanted) - present)
    if tie_embeddings and missing == [LM_HEAD]:
        missing = []
    unexpected = sorted(present - set(wanted))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing tensors: {_names_list(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {_names_list(unexpected)}")
        raise CheckpointError("the checkpoint does not match its config; " + "; ".join(parts))
    for name, want in wanted.items():
        key = name if name in present else EMBED
        shape = source.shape_and_itemsize(key)[0]
        if shape != want:
            raise CheckpointError(f"tensor {key} has shape {shape} in the checkpoint but the config implies "
                                  f"{want}")
    return list(wanted)


def load_state(model: torch.nn.Module, source: TensorSource, tie_embeddings: bool = False) -> None:
    """Copy every tensor of ``source`` into ``model`` (strict, see :func:`check_match`), one tensor at a time."""
    names = check_match(model, source, tie_embeddings)
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name in names:
            source.copy_into(name if name in source else EMBED, targets[name])


# ---------------------------------------------------------------------- configs of the two layouts
def read_hf_config(folder: str) -> tuple[AF3Config, GenerationConfig]:
    config = AF3Config.from_file(os.path.join(folder, "config.json"))
    gen_path = os.path.join(folder, "generation_config.json")
    gen = GenerationConfig.from_file(gen_path) if os.path.isfile(gen_path) else GenerationConfig()
    return config, _fill_generation_defaults(gen, config)


def _fill_generation_defaults(gen: GenerationConfig, config: AF3Config) -> GenerationConfig:
    text = config.text_config
    if gen.eos_token_id is None:
        gen.eos_token_id = text.eos_token_id
    if gen.pad_token_id is None:
        gen.pad_token_id = text.pad_token_id
    if gen.bos_token_id is None:
        gen.bos_token_id = text.bos_token_id
    return gen


def read_nvidia_config(folder: str) -> tuple[AF3Config, GenerationConfig]:
    """Build our config from NVIDIA's per-part configs (``llm/config.json``, ``sound_tower/config.json``)."""
    llm = read_json(os.path.join(folder, "llm", "config.json"))
    tower_path = os.path.join(folder, "sound_tower", "config.json")
    tower = read_json(tower_path) if os.path.isfile(tower_path) else {}
    tower = {k: v for k, v in tower.items() if k not in ("model_type", "architectures")}
    audio_token_id = _nvidia_audio_token_id(folder)
    text = TextConfig.from_dict({k: v for k, v in llm.items() if k not in ("architectures", "model_type")})
    config = AF3Config(audio_config=EncoderConfig.from_dict(tower), text_config=text, audio_token_id=audio_token_id)
    gen_path = os.path.join(folder, "llm", "generation_config.json")
    gen = GenerationConfig.from_file(gen_path) if os.path.isfile(gen_path) else GenerationConfig()
    return config, _fill_generation_defaults(gen, config)


def _nvidia_audio_token_id(folder: str) -> int:
    path = os.path.join(folder, "llm", "tokenizer.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            tok = json.load(f)
        for added in tok.get("added_tokens", []):
            if added.get("content") == "<sound>":
                return int(added["id"])
        vocab = tok.get("model", {}).get("vocab", {})
        if "<sound>" in vocab:
            return int(vocab["<sound>"])
    raise CheckpointError(f"cannot find the <sound> token in {path!r}; is this an AF3 checkpoint?")


def nvidia_tensor_source(folder: str, allow_pickle: bool = False) -> TensorSource:
    """All tensors of the three NVIDIA sub-folders, renamed to our (HF) names."""
    renames = {path: _prefixer(prefix) for sub, prefix in NVIDIA_FOLDERS.items()
               for path in weight_files(os.path.join(folder, sub), allow_pickle)}
    return TensorSource(list(renames), renames)


def _prefixer(prefix: str) -> Callable[[str], str]:
    def rename(key: str) -> str:
        name = f"{prefix}.{key}"
        for pattern, repl in _PROJECTOR_RENAMES:
            name = pattern.sub(repl, name)
        return name

    return rename


# ---------------------------------------------------------------------- load / save entry points
def load_pretrained(cls: type, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", allow_pickle: bool = False):
    """Build ``cls(config, generation_config)`` with empty storage on ``device`` and fill it from ``path``."""
    folder = os.fspath(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f"checkpoint folder {folder!r} does not exist")
    if is_nvidia_layout(folder) and not os.path.isfile(os.path.join(folder, "model.safetensors.index.json")) \
            and not os.path.isfile(os.path.join(folder, "model.safetensors")):
        config, gen = read_nvidia_config(folder)
        source = nvidia_tensor_source(folder, allow_pickle)
    else:
        config, gen = read_hf_config(folder)
        source = TensorSource(weight_files(folder, allow_pickle))
    with source:
        if dtype is None:
            dtype = _checkpoint_dtype(source)
        with torch.device("meta"):
            model = cls(config, gen).to(dtype)
        model = model.to_empty(device=device)
        if hasattr(model, "init_buffers"):
            model.init_buffers()  # non-persistent buffers (rotary tables) are not in the checkpoint
        load_state(model, source, tie_embeddings=config.text_config.tie_word_embeddings)
    return model.eval()


def _checkpoint_dtype(source: TensorSource) -> torch.dtype:
    for name in source.keys():  # noqa: SIM118 (TensorSource is not a dict)
        if name.endswith("embed_tokens.weight"):
            t = source.get(name)
            if t.is_floating_point():
                return t.dtype
    return torch.float32


def save_pretrained(model: torch.nn.Module, path: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write ``model`` in the HF layout (see :func:`write_checkpoint`)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    write_checkpoint(path, StateSource(state), model, max_shard_bytes=max_shard_bytes)


def write_checkpoint(path: str | os.PathLike, source: TensorSource, skeleton: torch.nn.Module,
                     dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write ``config.json``, ``generation_config.json`` and the tensors of ``source`` (checked against
    ``skeleton``, a model of the right config, possibly on the meta device) as safetensors in the HF layout,
    sharded past ``max_shard_bytes``. Tensors are read one shard at a time. Files go to a temporary folder
    first and are then moved in place, so a crash never leaves a half-written checkpoint behind."""
    folder = os.fspath(path)
    os.makedirs(folder, exist_ok=True)
    names = check_match(skeleton, source, skeleton.config.text_config.tie_word_embeddings)
    shards: list[list[str]] = [[]]
    size = total = 0
    for name in names:
        shape, itemsize = source.shape_and_itemsize(name if name in source else EMBED)
        nbytes = math.prod(shape) * (dtype.itemsize if dtype else itemsize)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
        total += nbytes
    files = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    tmp = tempfile.mkdtemp(prefix=".af3-save-", dir=folder)
    try:
        out_dtype = None
        for file, shard in zip(files, shards, strict=True):
            tensors = {}
            for name in shard:
                t = source.get(name if name in source else EMBED)
                t = t.to(device="cpu", dtype=dtype or t.dtype).contiguous()
                tensors[name] = t.clone() if name == LM_HEAD and name not in source else t
                out_dtype = out_dtype or (t.dtype if t.is_floating_point() else None)
            save_file(tensors, os.path.join(tmp, file), metadata={"format": "pt"})
            del tensors
        if len(shards) > 1:
            write_json(os.path.join(tmp, "model.safetensors.index.json"), {
                "metadata": {"total_size": total},
                "weight_map": {name: file for file, shard in zip(files, shards, strict=True) for name in shard},
            })
        config = skeleton.config.to_dict()
        config["dtype"] = str(out_dtype or torch.float32).removeprefix("torch.")
        write_json(os.path.join(tmp, "config.json"), config)
        skeleton.generation_config.save(os.path.join(tmp, "generation_config.json"))
        # Remove weights of an earlier save that this one does not replace (e.g. another shard count).
        for old in os.listdir(folder):
            if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?", old) and old not in files:
                os.remove(os.path.join(folder, old))
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(folder, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def iter_checkpoint_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a checkpoint in our names, whichever layout it has (for tools and tests)."""
    folder = os.fspath(path)
    source = nvidia_tensor_source(folder) if is_nvidia_layout(folder) else TensorSource(weight_files(folder))
    with source:
        for name in source.keys():  # noqa: SIM118 (TensorSource is not a dict)
            yield name, source.get(name)
