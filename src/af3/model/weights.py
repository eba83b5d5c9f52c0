"""Checkpoint files: find, read (plain file reads, tensor by tensor, every byte checked), map keys, write.

Two on-disk layouts are understood:

* **HF** (``nvidia/audio-flamingo-3-hf``): ``config.json``, ``generation_config.json`` and ``model.safetensors`` or
  shards with ``model.safetensors.index.json``; tensor names equal our module names.
* **NVIDIA** (``nvidia/audio-flamingo-3``): ``llm/``, ``sound_tower/`` and ``sound_mm_projector/``, each with its
  own ``config.json`` and safetensors; keys get the prefix of their folder and the projector's ``layers.0``/``layers.2``
  become ``linear_1``/``linear_2``.

What loading guarantees: every problem of a checkpoint folder is a :class:`CheckpointError` (bad arguments an
:class:`InputError`) naming the file, the key or the tensor — never another exception. Configs are checked field
by field (:mod:`af3.config_checks`), weight files byte by byte (:mod:`af3.model.tensor_files`); the model's size
is compared with the device's free memory and every tensor's shape and dtype with the config before anything is
allocated; every floating tensor is checked for NaN/inf as it is read (and after a cast to the load dtype). Weights are
read tensor by tensor into a model whose storage was allocated empty, so loading needs about the weights' size in
memory, not twice that.

What saving guarantees: a checkpoint is written through :func:`af3.files.atomic_folder` — built next to the old
folder, flushed, swapped in one step — so a crash leaves the old checkpoint or the new one, never a mix; files the
save does not write (a processor's, an adapter's) are kept, weight shards of an earlier save are dropped.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from safetensors.torch import save_file

from .. import config_checks as checks
from ..config import (DTYPE_NAMES, NVIDIA_FOLDERS, AF3Config, EncoderConfig, GenerationConfig, TextConfig,
                      folder_path, is_nvidia_layout, read_json, write_json)
from ..errors import CheckpointError, InputError
from ..files import atomic_folder
from ..system import advise_huge_pages, release_free_memory
from .tensor_files import (INDEX, SafetensorsFile, StateSource, TensorSource, _names_list, all_finite,  # noqa: F401
                           read_index, weight_files)

logger = logging.getLogger("af3")

LM_HEAD = "language_model.lm_head.weight"
EMBED = "language_model.model.embed_tokens.weight"
_PROJECTOR_RENAMES = [(re.compile(r"^multi_modal_projector\.layers\.0\."), "multi_modal_projector.linear_1."),
                      (re.compile(r"^multi_modal_projector\.layers\.2\."), "multi_modal_projector.linear_2.")]
#: Weight files a save writes; those of an earlier save that this one does not rewrite are dropped.
_WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?")


def check_match(model: torch.nn.Module, source: TensorSource, tie_embeddings: bool = False) -> list[str]:
    """Names of the tensors ``model`` wants from ``source``; missing, unexpected, mis-shaped or non-float tensors
    raise a :class:`CheckpointError` that names them. With tied embeddings a missing ``lm_head`` is allowed."""
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
        shape, dtype = source.shape_and_dtype(key)
        if shape != want:
            raise CheckpointError(f"tensor {key} has shape {shape} in {source.file_of(key)} but the config implies "
                                  f"{want}")
        if not dtype.is_floating_point:
            raise CheckpointError(f"tensor {key} in {source.file_of(key)} has dtype {dtype}; weights must be "
                                  "floating point (float32, bfloat16 or float16)")
    return list(wanted)


def _non_finite(source: TensorSource, key: str, target: torch.Tensor) -> CheckpointError:
    where = source.file_of(key)
    original = source.get(key)
    if original.dtype != target.dtype and all_finite(original):
        return CheckpointError(f"tensor {key} of {where} has values beyond {target.dtype}'s range: they become inf; "
                               "load the checkpoint in bfloat16 or float32")
    return CheckpointError(f"tensor {key} in {where} holds NaN or inf values; the checkpoint is corrupt (a diverged "
                           "training run or a damaged file): re-download, re-convert or re-save it")


def load_state(model: torch.nn.Module, source: TensorSource, tie_embeddings: bool = False) -> None:
    """Copy every tensor of ``source`` into ``model`` (strict, see :func:`check_match`), one tensor at a time;
    a floating tensor with NaN or inf values (in the file, or after a cast to a narrower dtype) is refused."""
    names = check_match(model, source, tie_embeddings)
    targets = dict(model.named_parameters())
    targets.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name in names:
            key = name if name in source else EMBED
            source.copy_into(key, targets[name])
            if source.check_finite and targets[name].is_floating_point() and not all_finite(targets[name]):
                raise _non_finite(source, key, targets[name])


#: ``transform(name, module)`` → the module to keep in its place (the same one, or a replacement such as an int8
#: copy), called by :func:`load_state_by_module` as soon as a module's own tensors are loaded.
ModuleTransform = Callable[[str, torch.nn.Module], torch.nn.Module]


def load_state_by_module(model: torch.nn.Module, source: TensorSource, names: list[str], device: torch.device,
                         transform: ModuleTransform) -> None:
    """:func:`load_state` for a ``model`` still on the meta device, one module at a time: each module's storage is
    allocated, filled, and handed to ``transform``, whose replacement takes its place at once (the float weights of
    a module that ``transform`` quantizes are freed before the next module is read: peak memory is the transformed
    model plus one module). Modules that the checkpoint has no tensors for are allocated first (then
    ``init_buffers`` fills their non-persistent buffers). ``names``: what :func:`check_match` returned for this
    model and source. Not for tied embeddings (one tensor, two modules)."""
    owners: dict[str, list[str]] = {}
    for name in names:
        owners.setdefault(name.rpartition(".")[0], []).append(name)
    for mod_name, module in model.named_modules():
        if mod_name not in owners:
            module.to_empty(device=device, recurse=False)
    if hasattr(model, "init_buffers"):
        model.init_buffers()
    with torch.no_grad():
        for mod_name, tensors in owners.items():
            module = model.get_submodule(mod_name)
            module.to_empty(device=device, recurse=False)
            advise_huge_pages([*module.parameters(recurse=False), *module.buffers(recurse=False)])
            for name in tensors:
                target = getattr(module, name.rpartition(".")[2])
                source.copy_into(name, target)
                if source.check_finite and target.is_floating_point() and not all_finite(target):
                    raise _non_finite(source, name, target)
            new = transform(mod_name, module)
            if new is not module:
                parent, _, child = mod_name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, new)
                del module, target
                release_free_memory()  # the float module's pages back to the system, not left in malloc's heap


# ---------------------------------------------------------------------- configs of the two layouts
def read_hf_config(folder: str) -> tuple[AF3Config, GenerationConfig]:
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise CheckpointError(f"{folder!r} has no config.json: it is not an AF3 checkpoint folder (the HF layout has "
                              "config.json and model.safetensors; NVIDIA's has llm/, sound_tower/ and "
                              "sound_mm_projector/)")
    config = AF3Config.from_file(path)
    gen_path = os.path.join(folder, "generation_config.json")
    gen = GenerationConfig.from_file(gen_path) if os.path.exists(gen_path) else GenerationConfig()
    checks.check_token_ids(config, gen, path, gen_path)
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


def _part_config(cls: type, path: str, data: dict) -> Any:
    try:
        return cls.from_dict(data)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}; fix it in that file") from None


def read_nvidia_config(folder: str) -> tuple[AF3Config, GenerationConfig]:
    """Build our config from NVIDIA's per-part configs (``llm/config.json``, ``sound_tower/config.json``)."""
    llm_path = os.path.join(folder, "llm", "config.json")
    llm = read_json(llm_path)
    tower_path = os.path.join(folder, "sound_tower", "config.json")
    tower = read_json(tower_path) if os.path.exists(tower_path) else {}
    tower = {k: v for k, v in tower.items() if k not in ("model_type", "architectures")}
    audio_token_id = _nvidia_audio_token_id(folder)
    llm = {k: v for k, v in llm.items() if k not in ("architectures", "model_type")}
    text = _part_config(TextConfig, llm_path, llm)
    config = AF3Config(audio_config=_part_config(EncoderConfig, tower_path, tower), text_config=text,
                       audio_token_id=audio_token_id)
    gen_path = os.path.join(folder, "llm", "generation_config.json")
    gen = GenerationConfig.from_file(gen_path) if os.path.exists(gen_path) else GenerationConfig()
    checks.check_token_ids(config, gen, llm_path, gen_path)
    return config, _fill_generation_defaults(gen, config)


def _nvidia_audio_token_id(folder: str) -> int:
    path = os.path.join(folder, "llm", "tokenizer.json")
    if os.path.exists(path):
        tok = read_json(path)
        added = tok.get("added_tokens")
        for token in added if isinstance(added, list) else []:
            if isinstance(token, dict) and token.get("content") == "<sound>":
                if isinstance(token.get("id"), int) and not isinstance(token["id"], bool) and token["id"] >= 0:
                    return token["id"]
                raise CheckpointError(f"{path!r}: the <sound> token has id {checks.describe(token.get('id'))}")
        model = tok.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if isinstance(vocab, dict) and isinstance(vocab.get("<sound>"), int) and vocab["<sound>"] >= 0:
            return vocab["<sound>"]
    raise CheckpointError(f"cannot find the <sound> token in {path!r}; is this an AF3 checkpoint?")


def nvidia_tensor_source(folder: str, allow_pickle: bool = False) -> TensorSource:
    """All tensors of the three NVIDIA sub-folders, renamed to our (HF) names."""
    renames = {path: _prefixer(prefix) for sub, prefix in NVIDIA_FOLDERS.items()
               for path in weight_files(os.path.join(folder, sub), allow_pickle)}
    for sub in NVIDIA_FOLDERS:  # each sub-folder's index must agree with its own shards
        index = read_index(os.path.join(folder, sub))
        if index is not None:
            TensorSource([p for p in renames if os.path.dirname(p) == os.path.join(folder, sub)], index=index).close()
    return TensorSource(list(renames), renames)


def folder_source(folder: str, allow_pickle: bool = False) -> TensorSource:
    """The tensors of an HF-layout folder, its index (if any) checked against its shards."""
    return TensorSource(weight_files(folder, allow_pickle), index=read_index(folder))


def _prefixer(prefix: str) -> Callable[[str], str]:
    def rename(key: str) -> str:
        name = f"{prefix}.{key}"
        for pattern, repl in _PROJECTOR_RENAMES:
            name = pattern.sub(repl, name)
        return name

    return rename


# ---------------------------------------------------------------------- load / save entry points
_LOAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_dtype(dtype: Any) -> torch.dtype | None:
    """``dtype`` as a torch dtype a model can hold (None = the checkpoint's); strings like "bf16" are accepted."""
    if isinstance(dtype, str) and dtype in DTYPE_NAMES:
        return None if DTYPE_NAMES[dtype] == "auto" else getattr(torch, DTYPE_NAMES[dtype])
    if dtype is None or dtype in _LOAD_DTYPES:
        return dtype
    raise InputError(f"dtype {dtype!r} is not supported; use torch.float32, torch.bfloat16, torch.float16 or None "
                     "(the checkpoint's)")


def check_device(device: Any) -> torch.device:
    """``device`` as a torch device that exists on this machine (:func:`af3.system.check_device`)."""
    from ..system import check_device as usable

    return usable(device)


def load_pretrained(cls: type, path: str | os.PathLike, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu", allow_pickle: bool = False,
                    transform: ModuleTransform | None = None, itemsize: float | None = None):
    """Build ``cls(config, generation_config)`` with empty storage on ``device`` and fill it from ``path``; with
    ``transform``, module by module (:func:`load_state_by_module`; ``itemsize``: the bytes per weight it leaves,
    for the memory check), except with tied embeddings: that model is loaded whole and returned untransformed."""
    dtype, dev = check_dtype(dtype), check_device(device)
    folder = folder_path(path)
    if not os.path.exists(folder):
        raise CheckpointError(f"checkpoint folder {folder!r} does not exist")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder!r} is a file, not a checkpoint folder; pass the folder that holds "
                              "config.json and the weights")
    nvidia = is_nvidia_layout(folder) and not os.path.isfile(os.path.join(folder, INDEX)) \
        and not os.path.isfile(os.path.join(folder, "model.safetensors"))
    config, gen = read_nvidia_config(folder) if nvidia else read_hf_config(folder)
    config_path = os.path.join(folder, "llm" if nvidia else "", "config.json")
    source = nvidia_tensor_source(folder, allow_pickle) if nvidia else folder_source(folder, allow_pickle)
    with source:
        if dtype is None:
            dtype = _checkpoint_dtype(source)
        checks.check_memory(config, itemsize or dtype.itemsize, str(dtype).removeprefix("torch."), dev,
                            f"the config {config_path}")
        with torch.device("meta"):
            model = cls(config, gen).to(dtype)
        names = check_match(model, source, tie_embeddings=config.text_config.tie_word_embeddings)  # before allocating
        if transform is not None and not config.text_config.tie_word_embeddings:
            load_state_by_module(model, source, names, dev, transform)
            return model.eval()
        try:
            model = model.to_empty(device=dev)
        except (MemoryError, torch.OutOfMemoryError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and "alloc" not in str(e) and "out of memory" not in str(e):
                raise
            raise CheckpointError(f"out of memory while allocating the model of {config_path} on {dev}: "
                                  f"{str(e).splitlines()[0][:120]}; free memory or use a smaller dtype") from None
        advise_huge_pages([*model.parameters(), *model.buffers()])  # before the weights are read in
        if hasattr(model, "init_buffers"):
            model.init_buffers()  # non-persistent buffers (rotary tables) are not in the checkpoint
        load_state(model, source, tie_embeddings=config.text_config.tie_word_embeddings)
    return model.eval()


def _checkpoint_dtype(source: TensorSource) -> torch.dtype:
    """The dtype of the token embeddings in the checkpoint (read from the header), as a dtype a model can hold."""
    for name in source.keys():  # noqa: SIM118 (TensorSource is not a dict)
        if name.endswith("embed_tokens.weight"):
            dtype = source.shape_and_dtype(name)[1]
            if dtype in (torch.float32, torch.bfloat16, torch.float16):
                return dtype
            return torch.bfloat16 if dtype.is_floating_point and dtype.itemsize == 1 else torch.float32
    return torch.float32


def save_pretrained(model: torch.nn.Module, path: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write ``model`` in the HF layout (see :func:`write_checkpoint`)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if any(t.is_meta for t in state.values()):
        raise InputError("the model's weights are on the meta device (never allocated); there is nothing to save")
    write_checkpoint(path, StateSource(state), model, max_shard_bytes=max_shard_bytes)


def check_save_args(skeleton: torch.nn.Module, dtype: Any, max_shard_bytes: Any, folder: str) -> None:
    if dtype is not None and dtype not in _LOAD_DTYPES:
        raise InputError(f"dtype {dtype!r} cannot be saved; use torch.float32, torch.bfloat16, torch.float16 or None")
    if not isinstance(max_shard_bytes, int) or isinstance(max_shard_bytes, bool) or max_shard_bytes < 1:
        raise InputError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    try:  # the config is checked as a load would check it: a save never writes what cannot be loaded
        config, gen = skeleton.config, skeleton.generation_config
        checks.check_af3(config)
        checks.check_encoder(config.audio_config)
        checks.check_text(config.text_config)
        checks.check_generation(gen)
        checks.check_token_ids(config, gen, "model.config", "model.generation_config")
    except CheckpointError as e:
        raise InputError(f"cannot save {folder!r}: {e}") from None


def write_checkpoint(path: str | os.PathLike, source: TensorSource, skeleton: torch.nn.Module,
                     dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write ``config.json``, ``generation_config.json`` and the tensors of ``source`` (checked against
    ``skeleton``, a model of the right config, possibly on the meta device) as safetensors in the HF layout,
    sharded past ``max_shard_bytes``, through :func:`af3.files.atomic_folder`: the folder is replaced in one step
    (files of the old folder that this save does not write are kept, except its weight files)."""
    folder = folder_path(path, "output folder")
    check_save_args(skeleton, dtype, max_shard_bytes, folder)
    names = check_match(skeleton, source, skeleton.config.text_config.tie_word_embeddings)
    try:
        with atomic_folder(folder, keep_existing=True, drop=lambda rel: bool(_WEIGHT_FILE.fullmatch(rel))) as tmp:
            write_checkpoint_files(tmp, source, skeleton, names, dtype, max_shard_bytes)
    except OSError as e:
        raise CheckpointError(f"cannot write the checkpoint {folder!r}: {e.strerror or e}; check that the folder is "
                              "writable and the disk has room (a previous checkpoint there is unchanged)") from None


def write_checkpoint_files(folder: str, source: TensorSource, skeleton: torch.nn.Module, names: list[str],
                           dtype: torch.dtype | None = None, max_shard_bytes: int = 5 * 1024**3) -> None:
    """The files of :func:`write_checkpoint`, written into ``folder`` (an empty folder being built). Tensors are
    read one shard at a time."""
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
    out_dtype = None
    for file, shard in zip(files, shards, strict=True):
        tensors = {}
        for name in shard:
            key = name if name in source else EMBED
            t = source.get(key).to(device="cpu", dtype=dtype).contiguous()
            if source.check_finite and t.is_floating_point() and not all_finite(t):
                raise _non_finite(source, key, t)  # NaN/inf in the file, or values a narrower dtype cannot hold
            tensors[name] = t.clone() if name == LM_HEAD and name not in source else t
            out_dtype = out_dtype or (t.dtype if t.is_floating_point() else None)
        save_file(tensors, os.path.join(folder, file), metadata={"format": "pt"})
        del tensors
    if len(shards) > 1:
        write_json(os.path.join(folder, INDEX), {
            "metadata": {"total_size": total},
            "weight_map": {name: file for file, shard in zip(files, shards, strict=True) for name in shard},
        })
    config = skeleton.config.to_dict()
    config["dtype"] = str(out_dtype or torch.float32).removeprefix("torch.")
    write_json(os.path.join(folder, "config.json"), config)
    skeleton.generation_config.save(os.path.join(folder, "generation_config.json"))


def iter_checkpoint_tensors(path: str | os.PathLike) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a checkpoint in our names, whichever layout it has (for tools and tests)."""
    folder = os.fspath(path)
    source = nvidia_tensor_source(folder) if is_nvidia_layout(folder) else folder_source(folder)
    with source:
        for name in source.keys():  # noqa: SIM118 (TensorSource is not a dict)
            yield name, source.get(name)
