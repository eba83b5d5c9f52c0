"""Static key/value cache: one preallocated [B, kv_heads, max_len, head_dim] tensor pair per decoder layer.

Slot ``s`` of row ``b`` holds the keys/values of the ``s``-th token fed for that row (pads included); which
slots are real tokens is the caller's attention mask, and the rotary position of a token is the caller's
position id. Nothing grows during decoding: every step writes into the same tensors (slice assignment, or
``index_put_`` for per-row slots).
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Per-layer key/value tensors ``k[layer]``, ``v[layer]``: [B, kv_heads, max_len, head_dim].

    ``length`` counts the slots filled by batch-synchronous writes (every row at the same slot, as in
    ``AF3Model.generate``); callers that manage rows separately pass explicit per-row slots to :meth:`update`.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = 0

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def update(self, layer: int, k: Tensor, v: Tensor, slots: int | Tensor) -> None:
        """Write ``k``/``v`` [B, kv_heads, T, head_dim] of ``layer``.

        ``slots`` is either an int (all rows write slots ``slots .. slots+T-1``) or a LongTensor [B, T] of
        slot indices per row.
        """
        if isinstance(slots, int):
            t = k.shape[2]
            self.k[layer][:, :, slots : slots + t] = k
            self.v[layer][:, :, slots : slots + t] = v
        else:
            rows = torch.arange(k.shape[0], device=k.device)[:, None]  # [B, 1]
            # Advanced indices (rows, slots) broadcast to [B, T] and come first: target [B, T, kv_heads, Dh].
            self.k[layer][rows, :, slots] = k.transpose(1, 2)
            self.v[layer][rows, :, slots] = v.transpose(1, 2)

    def keys_values(self, layer: int, length: int) -> tuple[Tensor, Tensor]:
        """Views of the first ``length`` slots of ``layer``: two [B, kv_heads, length, head_dim] tensors."""
        return self.k[layer][:, :, :length], self.v[layer][:, :, :length]

    def layer_tensors(self) -> tuple[list[Tensor], list[Tensor]]:
        """The per-layer key and value tensors, whose rows are the rows of every forward (for fused decoding)."""
        return self.k, self.v

    def reset(self) -> None:
        """Forget the contents (the tensors are reused; stale slots are masked out by the caller)."""
        self.length = 0
