"""Weight files: find them, read them tensor by tensor with plain file reads, and check every byte on the way.

What it guarantees: a problem of a weight file is a :class:`CheckpointError` that names the file and the tensor,
never another exception. A safetensors header is checked entry by entry before any tensor is read (known dtype,
shape a list of integers >= 0, ``data_offsets`` inside the file and as long as dtype x shape, no two tensors
overlapping, no name twice, header size sane); an index must name ``*.safetensors`` files of its own folder that
exist and hold exactly the tensors it lists; a tensor may be stored in one file only; pickled weights are read only
on request, with ``torch.load(weights_only=True)``, and whatever that raises becomes a CheckpointError.
"""

from __future__ import annotations

import json
import math
import os
import warnings
import zipfile
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from .. import config_checks as checks
from ..config import read_json
from ..errors import CheckpointError

INDEX = "model.safetensors.index.json"


def _names_list(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", … ({len(names)} in all)" if len(names) > limit else "")


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError as e:
        raise CheckpointError(f"cannot list {folder!r}: {e.strerror or e}") from None


def read_index(folder: str | os.PathLike) -> dict[str, str] | None:
    """``weight_map`` of ``model.safetensors.index.json`` (tensor → shard file name), checked; None without one."""
    path = os.path.join(folder, INDEX)
    if not os.path.exists(path):
        return None
    weight_map = read_json(path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{path!r} needs a non-empty \"weight_map\" object (tensor name → shard file)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or os.path.basename(shard) != shard or not shard.endswith(".safetensors") \
                or shard.startswith("."):
            raise CheckpointError(f"{path!r}: tensor {name!r} maps to {checks.describe(shard)}; a shard must be a "
                                  "*.safetensors file name in the same folder")
    return weight_map


def weight_files(folder: str | os.PathLike, allow_pickle: bool = False) -> list[str]:
    """The weight files of one folder: single safetensors, shards from an index, or (opt-in) a pickled .bin."""
    folder = os.fspath(folder)
    weight_map = read_index(folder)
    if weight_map is not None:
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
        if missing:
            raise CheckpointError(f"{os.path.join(folder, INDEX)!r} names shard(s) that are missing: "
                                  f"{_names_list(missing)}; download or copy them into {folder!r}")
        return [os.path.join(folder, s) for s in shards]
    single = os.path.join(folder, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    entries = _listdir(folder)
    found = sorted(f for f in entries if f.endswith(".safetensors") and os.path.isfile(os.path.join(folder, f)))
    if len(found) == 1:
        return [os.path.join(folder, found[0])]
    if len(found) > 1:
        raise CheckpointError(f"{folder!r} has several .safetensors files but no {INDEX}")
    bins = sorted(f for f in entries if f.endswith(".bin") and "non_lora" not in f)
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
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        _SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
_MAX_HEADER = 100 * 1024**2


def _header_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"tensor {key!r} appears twice in the header")
        out[key] = value
    return out


class SafetensorsFile:
    """One safetensors file read with plain file reads (no memory map), its header checked when opened.

    A memory map keeps every page it touched in the process's resident memory until the file is closed, so
    loading through it peaks at twice the weights. Reading each tensor into its destination (or a temporary
    that is freed right after) keeps the peak at the weights plus one tensor.
    """

    def __init__(self, path: str):
        self.path = path
        try:
            self._file = open(path, "rb")  # noqa: SIM115 (closed by close())
        except OSError as e:
            raise CheckpointError(f"cannot open {path!r}: {e.strerror or e}") from None
        try:
            self._header, self._base = self._read_header()
        except BaseException:
            self._file.close()
            raise

    def _read_header(self) -> tuple[dict[str, dict], int]:
        path, file_size = self.path, os.fstat(self._file.fileno()).st_size
        bad = f"{path!r} is not a valid safetensors file"
        if file_size < 8:
            raise CheckpointError(f"{bad}: it has {file_size} bytes (truncated or empty); re-download it")
        size = int.from_bytes(self._file.read(8), "little")
        if not 2 <= size <= min(_MAX_HEADER, file_size - 8):
            raise CheckpointError(f"{bad}: its header claims {size} bytes in a file of {file_size} (truncated or "
                                  "not safetensors); re-download or re-convert it")
        try:
            header = json.loads(self._file.read(size).decode("utf-8"), object_pairs_hook=_header_pairs)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise CheckpointError(f"{bad}: its header is not valid JSON ({str(e)[:100]})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{bad}: its header is {checks.describe(header)}, not an object")
        meta = header.pop("__metadata__", None)
        if meta is not None and not isinstance(meta, dict):
            raise CheckpointError(f"{bad}: __metadata__ must be an object")
        base, spans = 8 + size, []
        for key, entry in header.items():
            begin, end = self._check_entry(key, entry, bad)
            if base + end > file_size:
                raise CheckpointError(f"{path!r} is truncated: tensor {key} needs bytes up to {base + end} but the "
                                      f"file has {file_size}; re-download it")
            spans.append((begin, end, key))
        reach, last = 0, ""  # the furthest end of the non-empty tensors so far, and whose it is
        for begin, end, key in sorted(spans):
            if end > begin:
                if begin < reach:
                    raise CheckpointError(f"{bad}: tensors {last} and {key} overlap in the file")
                reach, last = end, key
        return header, base

    @staticmethod
    def _check_entry(key: str, entry: Any, bad: str) -> tuple[int, int]:
        if not isinstance(entry, dict):
            raise CheckpointError(f"{bad}: the header entry of {key} is {checks.describe(entry)}, not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{bad}: tensor {key} has unknown dtype {checks.describe(dtype)}")
        if not isinstance(shape, list) or len(shape) > 16 or not all(
                isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CheckpointError(f"{bad}: tensor {key} has shape {checks.describe(shape)}; a shape is a list of "
                                  "integers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(
                isinstance(o, int) and not isinstance(o, bool) for o in offsets) or not 0 <= offsets[0] <= offsets[1]:
            raise CheckpointError(f"{bad}: tensor {key} has data_offsets {checks.describe(offsets)}; they must be "
                                  "[begin, end] with 0 <= begin <= end")
        nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise CheckpointError(f"{bad}: tensor {key} ({dtype} {shape}) needs {nbytes} bytes but its data_offsets "
                                  f"span {offsets[1] - offsets[0]}")
        return offsets[0], offsets[1]

    def keys(self) -> list[str]:
        return list(self._header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[key]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self._header[key]["dtype"]]

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Fill ``out`` (CPU, contiguous, the tensor's dtype and shape) with the tensor's bytes."""
        begin, end = self._header[key]["data_offsets"]
        view = out.reshape(-1).view(torch.uint8).numpy()
        if view.nbytes != end - begin:
            raise CheckpointError(f"{self.path}: tensor {key} has {end - begin} bytes, expected {view.nbytes}")
        try:
            self._file.seek(self._base + begin)
            got = self._file.readinto(memoryview(view))
        except OSError as e:
            raise CheckpointError(f"cannot read tensor {key} from {self.path!r}: {e.strerror or e}") from None
        if got != view.nbytes:
            raise CheckpointError(f"{self.path}: tensor {key} is cut short (the file changed while it was read)")

    def get_tensor(self, key: str) -> torch.Tensor:
        out = torch.empty(self.shape(key), dtype=self.dtype(key))
        self.read_into(key, out)
        return out

    def close(self) -> None:
        self._file.close()


def _load_pickle(path: str) -> dict[str, torch.Tensor]:
    """A pickled state dict, read with ``torch.load(weights_only=True)``; whatever fails is a CheckpointError."""
    try:
        zipped = zipfile.is_zipfile(path)
        with warnings.catch_warnings():  # (torch warns about pickle protocols before failing on them)
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipped)
    except Exception as e:  # torch.load raises many kinds (UnpicklingError, RuntimeError, EOFError, ...)
        raise CheckpointError(f"cannot read pickled weights {path!r} with torch.load(weights_only=True) "
                              f"({type(e).__name__}): it must be a state dict saved by torch.save; re-save it or "
                              "convert it to safetensors") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise CheckpointError(f"{path!r} does not hold a state dict (tensor names → tensors)")
    return state


class TensorSource:
    """Lazy name → tensor access over one or more weight files (safetensors read tensor by tensor)."""

    check_finite = True

    def __init__(self, files: list[str], rename: Callable[[str], str] | dict[str, Callable[[str], str]] = lambda k: k,
                 index: dict[str, str] | None = None):
        """``rename`` maps a file's tensor names to ours: one function for all files, or one per file path.
        ``index`` (tensor → shard file name) must agree with what the files hold."""
        self._stack = ExitStack()
        self._where: dict[str, tuple[Any, str]] = {}
        self._file: dict[str, str] = {}
        try:
            for path in files:
                file_rename = rename[path] if isinstance(rename, dict) else rename
                if path.endswith(".safetensors"):
                    handle: Any = SafetensorsFile(path)
                    self._stack.callback(handle.close)
                else:
                    handle = _load_pickle(path)
                for k in handle.keys():  # noqa: SIM118 (a SafetensorsFile is not a dict)
                    name = file_rename(k)
                    if name in self._where:
                        raise CheckpointError(f"tensor {name} is in both {self._file[name]!r} and {path!r}; a "
                                              "tensor must be stored once")
                    self._where[name], self._file[name] = (handle, k), path
            if index is not None:
                self._check_index(index)
        except BaseException:
            self.close()
            raise

    def _check_index(self, index: dict[str, str]) -> None:
        for name, shard in index.items():
            if name not in self._file:
                raise CheckpointError(f"{INDEX} lists tensor {name} in {shard}, but no shard holds it; the index "
                                      "and the shards are from different checkpoints")
            if os.path.basename(self._file[name]) != shard:
                raise CheckpointError(f"{INDEX} lists tensor {name} in {shard}, but it is in "
                                      f"{os.path.basename(self._file[name])}")
        extra = sorted(set(self._file) - set(index))
        if extra:
            raise CheckpointError(f"the shards hold tensors that {INDEX} does not list: {_names_list(extra)}")

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, name: str) -> str:
        return self._file.get(name, "memory")

    def get(self, name: str) -> torch.Tensor:
        handle, key = self._where[name]
        return handle.get_tensor(key) if isinstance(handle, SafetensorsFile) else handle[key]

    def copy_into(self, name: str, target: torch.Tensor) -> None:
        """``target.copy_(tensor)``, reading straight into ``target`` when it is a CPU tensor of the same dtype."""
        handle, key = self._where[name]
        if (isinstance(handle, SafetensorsFile) and target.device.type == "cpu" and target.is_contiguous()
                and handle.dtype(key) == target.dtype):
            handle.read_into(key, target)
        else:
            target.copy_(self.get(name))

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape and dtype without reading the tensor's data (safetensors header only)."""
        handle, key = self._where[name]
        if isinstance(handle, SafetensorsFile):
            return handle.shape(key), handle.dtype(key)
        return tuple(handle[key].shape), handle[key].dtype

    def shape_and_itemsize(self, name: str) -> tuple[tuple[int, ...], int]:
        shape, dtype = self.shape_and_dtype(name)
        return shape, dtype.itemsize

    def close(self) -> None:
        self._stack.close()
        self._where.clear()

    def __enter__(self) -> TensorSource:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class StateSource(TensorSource):
    """The same interface over tensors already in memory (a model's ``state_dict``)."""

    check_finite = False  # a model's own tensors: what it computed is saved as it is

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__([])
        self._where = {k: (state, k) for k in state}


#: Elements cast to float32 at a time to check a dtype that ``aminmax`` does not take (float8).
_FINITE_CHUNK = 1 << 20
_MINMAX_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def all_finite(t: torch.Tensor) -> bool:
    """True when no element of ``t`` is NaN or ±inf. One ``aminmax`` pass (NaN and ±inf propagate to the min or the
    max): no temporary the size of the tensor, ~10x faster than ``torch.isfinite(t).all()`` on a CPU."""
    if t.numel() == 0:
        return True
    flat = t.detach().reshape(-1)
    if flat.dtype not in _MINMAX_DTYPES:
        return all(all_finite(flat[i:i + _FINITE_CHUNK].float()) for i in range(0, flat.numel(), _FINITE_CHUNK))
    lo, hi = torch.aminmax(flat)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))
