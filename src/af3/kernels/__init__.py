"""af3's own CPU kernels: a leaf package that knows nothing of the model (callers hand it tensors).

* ``csrc/``: the C sources (products with bf16/fp16/int8 weights; a whole decoding step of a Qwen2 decoder;
  the decoder's row-wise steps; AMX attention for prefills and the audio encoder).
* :mod:`.binding`: their build (at first use, cached per CPU) and ctypes binding; the product and the
  fused decoding step.
* :mod:`.ops`: the row-wise steps, the argmax and the AMX attention.
* :mod:`.policy`: which kernel runs which product, decided once per process.
"""

from __future__ import annotations

from . import policy
from .binding import DecodeWeights, FusedDecoder, available, decode_step, small_gemm

__all__ = ["DecodeWeights", "FusedDecoder", "available", "decode_step", "policy", "small_gemm"]
