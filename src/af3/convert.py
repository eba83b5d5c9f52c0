"""NVIDIA's original checkpoint layout → the HF layout, streamed tensor by tensor (no model in memory)."""

from __future__ import annotations

import os

import torch

from .config import is_nvidia_layout
from .errors import CheckpointError
from .model import AF3Model
from .model.weights import nvidia_tensor_source, read_nvidia_config, write_checkpoint
from .processor import AF3Processor


def convert_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, dtype: torch.dtype | None = None,
                       max_shard_bytes: int = 5 * 1024**3) -> None:
    """Write ``dst`` in the HF layout (config, generation config, sharded safetensors, processor files).

    Every tensor is checked against the shapes the config implies before anything is written; a missing or
    unexpected tensor is an error that names it.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    if not is_nvidia_layout(src):
        raise CheckpointError(f"{src!r} is not in NVIDIA's layout (expected llm/, sound_tower/ and "
                              "sound_mm_projector/ sub-folders)")
    config, gen = read_nvidia_config(src)
    processor = AF3Processor.from_pretrained(src)
    with torch.device("meta"):
        skeleton = AF3Model(config, gen)
    with nvidia_tensor_source(src) as source:
        write_checkpoint(dst, source, skeleton, dtype=dtype, max_shard_bytes=max_shard_bytes)
    processor.save_pretrained(dst)
