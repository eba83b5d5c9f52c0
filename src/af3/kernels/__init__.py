"""af3's own CPU kernels: a leaf package (C sources in ``csrc/``, their build and ctypes binding) that knows nothing
of the model; callers hand it tensors."""

from __future__ import annotations

from .binding import DecodeWeights, available, decode_step, small_gemm

__all__ = ["DecodeWeights", "available", "decode_step", "small_gemm"]
