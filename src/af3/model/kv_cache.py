"""The key/value cache: one [rows, kv_heads, capacity, head_dim] tensor pair per decoder layer.

Slot ``s`` of row ``r`` holds the keys/values of the ``s``-th token fed for that row; which slots a query may read
is the caller's attention mask, and a token's rotary position is the caller's position id. Every step writes into
the same tensors (slice assignment for a shared slot, ``index_put`` for per-row slots). The memory follows what the
work needs, not the longest sequence allowed: ``capacity`` slots are allocated (all of ``max_len`` unless a smaller
start is asked for) and :meth:`reserve` grows them (geometrically, with headroom), up to ``max_len``, after checking
that the device has the memory (an :class:`~af3.errors.InputError` that says how much, instead of an allocator
failure). :meth:`rows`
gives a view of some rows (the generation runner prefills one request into its own row and decodes the first ``n``
rows together); :meth:`read` / :meth:`write` / :meth:`copy_row` move a row's prefix (the runner's prefix cache, and
closing gaps when a request leaves).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import TextConfig
from ..errors import InputError
from ..system import advise_huge_pages, available_memory

#: Slots a growing cache starts with and rounds its capacity up to.
GROW_STEP = 256


class KVCache:
    """Per-layer key/value tensors ``k[layer]``, ``v[layer]``: [rows, kv_heads, capacity, head_dim].

    ``length`` counts the slots filled by batch-synchronous writes through ``AF3Model.forward(cache=...)`` (every
    row at the same slot); callers that manage rows separately pass explicit slots to the decoder instead.
    ``capacity=None`` allocates all ``max_len`` slots at once.
    """

    def __init__(self, num_layers: int, rows: int, max_len: int, num_kv_heads: int, head_dim: int, *,
                 dtype: torch.dtype, device: torch.device | str, capacity: int | None = None):
        self.max_len = max_len
        self._shape = (rows, num_kv_heads, head_dim)
        self.dtype, self.device, self._view = dtype, torch.device(device), False
        self.k: list[Tensor] = [torch.zeros(0)] * num_layers
        self.v: list[Tensor] = [torch.zeros(0)] * num_layers
        self._allocate(max_len if capacity is None else max(1, min(capacity, max_len)), keep=0)
        self.length = 0

    def _allocate(self, slots: int, keep: int) -> None:
        rows, heads, dim = self._shape
        need = 2 * len(self.k) * rows * heads * slots * dim * torch.tensor([], dtype=self.dtype).element_size()
        free = available_memory(self.device)
        if free is not None and need - self.nbytes > free:
            raise InputError(f"not enough memory for the KV cache: {rows} rows × {slots} tokens need "
                             f"{need / 1e9:.2f} GB, {free / 1e9:.2f} GB are available; lower max_batch_size, "
                             "max_seq_len or the request's length")
        for kind in (self.k, self.v):
            for i, old in enumerate(kind):
                # Zeros, not garbage, in the unused slots: a masked-out NaN would still poison attention (0 * NaN).
                new = torch.empty((rows, heads, slots, dim), dtype=self.dtype, device=self.device)
                advise_huge_pages([new])  # every decoding step reads it (system.py)
                if keep:
                    new[:, :, :keep] = old[:, :, :keep]
                new[:, :, keep:].zero_()
                kind[i] = new

    @property
    def capacity(self) -> int:
        """Slots allocated now (<= ``max_len``)."""
        return self.k[0].shape[2]

    def reserve(self, slots: int) -> None:
        """Make sure ``slots`` slots are allocated: grow (to double, rounded up to :data:`GROW_STEP`, at most
        ``max_len``), keeping the contents. Views from :meth:`rows` taken before a growth are stale."""
        if slots <= self.capacity:
            return
        if slots > self.max_len:
            raise InputError(f"KV cache is full: {slots} tokens > {self.max_len} slots")
        if self._view:
            raise ValueError("reserve on the whole cache, not on a view of some rows")
        # Headroom for the answer and a follow-up turn (a quarter more than asked), and geometric growth: a
        # growing conversation re-allocates a few times, not at every turn. Doubling only while small: every row
        # gets the new capacity, so doubling a long cache would double memory that mostly sits unused.
        grown = max(slots + slots // 4, 2 * self.capacity if self.capacity < 4096 else self.capacity * 5 // 4)
        self._allocate(min(self.max_len, -(-grown // GROW_STEP) * GROW_STEP), keep=self.capacity)

    @classmethod
    def for_decoder(cls, cfg: TextConfig, rows: int, max_len: int, dtype: torch.dtype,
                    device: torch.device | str, capacity: int | None = None) -> KVCache:
        """A cache shaped for a decoder of config ``cfg``."""
        return cls(cfg.num_hidden_layers, rows, max_len, cfg.num_key_value_heads, cfg.head_dim, dtype=dtype,
                   device=device, capacity=capacity)

    def _of(self, k: list[Tensor], v: list[Tensor]) -> KVCache:
        view = KVCache.__new__(KVCache)
        view.k, view.v, view.length, view.max_len = k, v, 0, self.max_len
        view._shape, view.dtype, view.device, view._view = (k[0].shape[0], *self._shape[1:]), self.dtype, \
            self.device, True
        return view

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes allocated now."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows ``start .. stop-1`` as a cache of their own (views: writes land in this cache)."""
        if start == 0 and stop == self.batch_size:
            return self
        return self._of([t[start:stop] for t in self.k], [t[start:stop] for t in self.v])

    def update(self, layer: int, k: Tensor, v: Tensor, slots: int | Tensor) -> None:
        """Write ``k``/``v`` [B, kv_heads, T, head_dim] of ``layer``: at slots ``slots .. slots+T-1`` of every row
        (an int), or at per-row slots (a LongTensor [B, T])."""
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
        """The per-layer key and value tensors (for the fused decoding step, which writes them itself)."""
        return self.k, self.v

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` slots of row ``src`` into row ``dst``."""
        for kc, vc in zip(self.k, self.v, strict=True):
            kc[dst, :, :length] = kc[src, :, :length]
            vc[dst, :, :length] = vc[src, :, :length]

    def read(self, row: int, length: int) -> list[tuple[Tensor, Tensor]]:
        """A copy of one row's first ``length`` slots: per layer (keys, values) [kv_heads, length, head_dim]."""
        return [(kc[row, :, :length].clone(), vc[row, :, :length].clone())
                for kc, vc in zip(self.k, self.v, strict=True)]

    def write(self, row: int, kv: list[tuple[Tensor, Tensor]], length: int) -> None:
        """Put the first ``length`` slots of ``kv`` (as :meth:`read` returns it) into row ``row``."""
        for (k, v), kc, vc in zip(kv, self.k, self.v, strict=True):
            kc[row, :, :length] = k[:, :length]
            vc[row, :, :length] = v[:, :length]

    def reset(self) -> None:
        """Forget the contents (the tensors are reused; stale slots are masked out by the caller)."""
        self.length = 0
