"""NVIDIA's original checkpoint layout → the HF layout, streamed tensor by tensor (no model in memory).

What it guarantees: the source is checked whole before anything is written (it exists, is a folder in NVIDIA's
layout, its configs and every tensor's name, shape and dtype fit), and the output folder is written through
:func:`af3.files.atomic_folder`: it appears complete or not at all, and an existing folder (``--force``) is
replaced whole, never mixed with its old files. A tensor with NaN or inf values, or one that a narrower ``dtype``
cannot hold, stops the conversion with a :class:`CheckpointError` that names it (nothing is written).
"""

from __future__ import annotations

import os

import torch

from .config import folder_path, is_nvidia_layout
from .errors import CheckpointError, InputError
from .files import atomic_folder
from .model import AF3Model
from .model.weights import (check_dtype, check_match, check_save_args, nvidia_tensor_source, read_nvidia_config,
                            write_checkpoint_files)
from .processor import AF3Processor


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_paths(src: str, dst: str) -> None:
    """``src`` is an NVIDIA-layout folder; ``dst`` is not a file and does not contain ``src`` or lie in it."""
    if not os.path.exists(src):
        raise CheckpointError(f"source checkpoint {src!r} does not exist; pass the folder that holds llm/, "
                              "sound_tower/ and sound_mm_projector/")
    if not os.path.isdir(src):
        raise CheckpointError(f"source checkpoint {src!r} is a file, not a checkpoint folder")
    if not is_nvidia_layout(src):
        raise CheckpointError(f"{src!r} is not in NVIDIA's layout (expected llm/, sound_tower/ and "
                              "sound_mm_projector/ sub-folders)")
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise InputError(f"output {dst!r} is a file, not a folder; choose a folder path (nothing was written)")
    real_src, real_dst = os.path.realpath(src), os.path.realpath(dst)
    if _inside(real_dst, real_src) or _inside(real_src, real_dst):
        raise InputError(f"output {dst!r} and source {src!r} overlap; writing one would replace the other — "
                         "choose an output folder outside the source")


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | None = None,
                       max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write ``dst`` in the HF layout (config, generation config, sharded safetensors, processor files).

    Every tensor is checked against the shapes the config implies before anything is written; a missing or
    unexpected tensor is an error that names it. An existing ``dst`` folder is replaced whole, in one step.
    """
    src, dst = folder_path(src, "source checkpoint"), folder_path(dst, "output folder")
    check_paths(src, dst)
    dtype = check_dtype(dtype)
    config, gen = read_nvidia_config(src)
    processor = AF3Processor.from_pretrained(src)
    with torch.device("meta"):
        skeleton = AF3Model(config, gen)
    check_save_args(skeleton, dtype, max_shard_bytes, dst)
    with nvidia_tensor_source(src) as source:
        names = check_match(skeleton, source, config.text_config.tie_word_embeddings)
        try:
            with atomic_folder(dst) as tmp:
                write_checkpoint_files(tmp, source, skeleton, names, dtype=dtype, max_shard_bytes=max_shard_bytes)
                processor.save_files(tmp)
        except OSError as e:
            raise CheckpointError(f"cannot write {dst!r}: {e.strerror or e}; check that the folder is writable and "
                                  "the disk has room (nothing was changed there)") from None
