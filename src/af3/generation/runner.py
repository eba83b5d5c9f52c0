"""The model runner: the only code that executes the model for inference.

It owns the KV cache (one row per running request, :class:`af3.model.kv_cache.KVCache`) and the audio cache, and
turns requests into logits:

* :meth:`ModelRunner.encode_audio`: projected audio embeddings per request, from the audio cache (keyed by each
  30 s window's content hash, byte-bounded LRU) or one batched encoder run for all missing windows;
* :meth:`ModelRunner.prefill`: one request's prompt (audio fused into its ``<sound>`` slots) into its cache row,
  from a given slot on (the rest came from the prefix cache) → the last position's logits;
* :meth:`ModelRunner.decode`: one new token for each of the first ``n`` rows → their logits.

The backend is chosen once per batch: the decoder's torch modules, or, where ``af3.kernels.policy`` says so and the
decoder is the plain one, the fused C step (every layer in one call; planned by :mod:`.fused_plan`, checked when
requests are admitted). The think adapter (a LoRA switched on per row) forces the torch modules for its batch.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor

from .. import kernels
from ..features import conv_output_lengths
from ..model.decoder import MixedBatch, PrefixMask, additive_mask, attention_mask_4d
from ..model.kv_cache import KVCache
from . import fused_plan
from .scheduler import LRUBytes, Request


#: Windows per audio-encoder call, by device (missing: all at once). On the CPU, attention over a window that is
#: not full runs torch's math kernel, whose [windows, heads, 1500, 1500] scores grow with the batch: one window at a
#: time is both the smallest and, measured (benchmarks/README.md), the fastest there.
ENCODER_WINDOWS = {"cpu": 1}


def hash_window(features: Tensor, mask: Tensor) -> int:
    """A content hash of one audio window (its log-mel features and valid-frame count): the audio-cache key."""
    h = hashlib.blake2b(digest_size=8)
    h.update(features.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(int(mask.sum()).to_bytes(4, "little"))
    return int.from_bytes(h.digest(), "little") & ((1 << 62) - 1)


class ModelRunner:
    """Executes one :class:`af3.model.AF3Model` for up to ``rows`` sequences of up to ``max_len`` tokens."""

    def __init__(self, model: Any, rows: int, max_len: int, *, audio_cache_bytes: int = 0, lora: Any = None,
                 kv_capacity: int | None = None):
        self.model = model
        self.decoder = model.language_model.model
        self.head = model.language_model.lm_head
        self.device, self.dtype = model.device, model.dtype
        # ``kv_capacity`` slots to start with (None: all max_len); the cache grows as longer requests arrive.
        self.cache = KVCache.for_decoder(model.config.text_config, rows, max_len, self.dtype, self.device,
                                         capacity=kv_capacity)
        self.audio_cache = LRUBytes(audio_cache_bytes)
        self.lora = lora
        self.vocab_size = model.config.text_config.vocab_size
        self.stats = {"prefill_tokens": 0, "decode_steps": 0, "fused_steps": 0, "encoded_windows": 0,
                      "prefix_cached_tokens": 0, "mixed_steps": 0}
        self._plan: fused_plan.Plan | None = None
        self._plan_read = False

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    # ------------------------------------------------------------------ backend
    def invalidate(self) -> None:
        """Forget the fused plan (read again at the next admission); call after changing the model's modules or
        weights."""
        self._plan, self._plan_read = None, False

    def check_backend(self) -> None:
        """Before new requests start: re-read the fused plan if the decoder changed since it was read."""
        if self._plan is not None and not self._plan.still_valid(self.decoder):
            self.invalidate()

    def _fused(self, rows: int, think: bool) -> kernels.FusedDecoder | None:
        if think or torch.is_grad_enabled() or self.device.type != "cpu":
            return None
        if not self._plan_read:  # (once per model: None where the decoder is not plain or not half precision)
            self._plan, self._plan_read = fused_plan.read_plan(self.decoder, self.dtype), True
        fused = None if self._plan is None else self._plan.decoder
        if fused is None or not kernels.policy.current().fused_decode_takes(rows, self.dtype, self.device, fused.int8):
            return None
        return fused

    def _think_rows(self, flags: list[bool]) -> None:
        if self.lora is not None:
            self.lora.rows = torch.tensor(flags, device=self.device) if any(flags) else None

    # ------------------------------------------------------------------ audio
    def encode_audio(self, reqs: list[Request]) -> None:
        """Fill ``audio_embeds`` [audio tokens, D] of every request that has ``features`` and none yet."""
        todo: list[tuple[Request, int, int]] = []  # (request, window, hash)
        keep: set[int] = set()  # hashes of windows whose request keeps its caches
        parts: dict[int, list[Tensor | int]] = {}
        for r in reqs:
            if r.features is None or r.audio_embeds is not None:
                continue
            got: list[Tensor | int] = []
            for w, h in enumerate(r.window_hashes):
                hit = self.audio_cache.get(h)
                if hit is None:
                    todo.append((r, w, h))
                    got.append(h)
                    if r.options.keep_cache:
                        keep.add(h)
                else:
                    got.append(hit)
                    r.audio_windows_cached += 1
            parts[r.id] = got
        fresh: dict[int, Tensor] = {}
        group = ENCODER_WINDOWS.get(self.device.type) or len(todo)
        for a in range(0, len(todo), group):
            part = todo[a : a + group]
            feats = self._to_device(torch.stack([r.features[w] for r, w, _ in part])).to(self.dtype)
            masks = self._to_device(torch.stack([r.features_mask[w] for r, w, _ in part]))
            self.stats["encoded_windows"] += len(part)
            emb = self.model.get_audio_features(feats, masks)  # [sum tokens, D], window-major
            lengths = conv_output_lengths(masks.sum(-1).long())[1].tolist()
            for (_, _, h), piece in zip(part, emb.split(lengths), strict=True):
                fresh[h] = piece.clone()
                if h in keep:
                    self.audio_cache.put(h, fresh[h], piece.numel() * piece.element_size())
        for r in reqs:
            if r.id in parts:
                pieces = [fresh[p] if isinstance(p, int) else p for p in parts[r.id]]
                r.audio_embeds = torch.cat(pieces) if pieces else None

    def _to_device(self, host: Tensor) -> Tensor:
        """A host tensor on the model's device; to a GPU through pinned memory, without waiting for the copy
        (the stream orders it before the kernels that read it)."""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    # ------------------------------------------------------------------ prefill / decode
    def prefill(self, row: int, req: Request, start: int = 0) -> Tensor:
        """Run ``req``'s prompt from slot ``start`` on into cache row ``row`` (slots before ``start`` must hold
        its first ``start`` tokens' keys/values) → the last position's logits [1, V] in the model's dtype (the core
        widens them where a processor or log-probabilities need fp32)."""
        ids = req.input_ids.to(self.device)
        x = self.model.embed(ids[None], req.audio_embeds)[:, start:]  # [1, T', D]
        t = x.shape[1]
        self.cache.reserve(start + t)
        pos = torch.arange(start, start + t, device=self.device)[None]  # [1, T']
        mask = None if start == 0 else attention_mask_4d(torch.ones(1, start + t, dtype=torch.bool,
                                                                    device=self.device), start, t)
        self._think_rows([req.options.think])
        try:
            hidden = self.decoder(x, pos, mask, self.cache.rows(row, row + 1), start, last_only=True)  # [1, 1, D]
        finally:
            self._think_rows([])  # the adapter's hooks are on the shared model: off between forwards
        self.stats["prefill_tokens"] += t
        return self.head(hidden[:, -1])[:, : self.vocab_size]  # [1, V]

    def prefill_mixed(self, row: int, req: Request, embeds: Tensor, start: int, stop: int, tokens: list[int],
                      lengths: list[int]) -> tuple[Tensor, Tensor]:
        """Slots ``start .. stop-1`` of ``req``'s prompt (``embeds`` [1, T, D]: its fused embeddings) into row
        ``row`` and, in the same forward, one decoding token per row ``0 .. n-1`` (``tokens[i]`` at slot
        ``lengths[i]``), so the weights are read once for both → (the chunk's last logits [1, V], the decoding
        rows' logits [n, V]), in the model's dtype. Not with the think adapter (its rows are per batch row)."""
        t = stop - start
        self.cache.reserve(max(stop, max(lengths) + 1))
        slots = torch.tensor(lengths, device=self.device)  # [n]
        last = self.model.embed(torch.tensor(tokens, device=self.device)[None])  # [1, n, D]
        x = torch.cat([embeds[:, start:stop], last], dim=1)  # [1, t+n, D]
        pos = torch.cat([torch.arange(start, stop, device=self.device), slots])[None]  # [1, t+n]
        pmask = None if start == 0 else additive_mask(attention_mask_4d(
            torch.ones(1, stop, dtype=torch.bool, device=self.device), start, t), self.dtype)
        valid = torch.arange(max(lengths) + 1, device=self.device)[None, :] <= slots[:, None]  # [n, S]
        mixed = MixedBatch(row, start, t, pmask, slots, valid[:, None, None, :])
        hidden = self.decoder(x, pos, mixed, self.cache)[0]  # [t+n, D]
        self.stats["prefill_tokens"] += t
        self.stats["mixed_steps"] += 1
        logits = self.head(hidden[t - 1:])[:, : self.vocab_size]  # [1+n, V]
        return logits[:1], logits[1:]

    def prompt_embeds(self, req: Request) -> Tensor:
        """``req``'s prompt embeddings with its audio fused in: [1, T, D]."""
        return self.model.embed(req.input_ids.to(self.device)[None], req.audio_embeds)

    def decode(self, tokens: list[int], lengths: list[int], think: list[bool]) -> Tensor:
        """One token per row for rows ``0 .. n-1``: ``tokens[i]`` goes into slot ``lengths[i]`` of row ``i`` (at
        that rotary position) → logits [n, V] in the model's dtype."""
        n = len(tokens)
        self.cache.reserve(max(lengths) + 1)
        last = torch.tensor(tokens, device=self.device)[:, None]  # [n, 1]
        slots = torch.tensor(lengths, device=self.device)  # [n]
        valid = torch.arange(max(lengths) + 1, device=self.device)[None, :] <= slots[:, None]  # [n, S]
        x = self.model.embed(last)  # [n, 1, D]
        cache = self.cache.rows(0, n)
        fused = self._fused(n, any(think))
        if fused is not None:
            amx = self.decoder.amx_decoding(self.dtype, self.device)  # where the modules would take it
            hidden = fused.step(x.reshape(n, -1), slots, slots, valid, *cache.layer_tensors(), amx)[:, None]
            self.stats["fused_steps"] += 1
        else:
            self._think_rows(think)
            try:
                mask = PrefixMask(valid[:, None, None, :], slots + 1)  # each row's valid slots: 0 .. slots[i]
                hidden = self.decoder(x, slots[:, None], mask, cache, slots[:, None])
            finally:
                self._think_rows([])
        self.stats["decode_steps"] += 1
        return self.head(hidden[:, -1])[:, : self.vocab_size]  # [n, V]

    # ------------------------------------------------------------------ rows
    def move_row(self, src: int, dst: int, length: int) -> None:
        self.cache.copy_row(src, dst, length)

    def read_row(self, row: int, length: int) -> list[tuple[Tensor, Tensor]]:
        return self.cache.read(row, length)

    def write_row(self, row: int, kv: list[tuple[Tensor, Tensor]], length: int) -> None:
        self.cache.reserve(length)
        self.cache.write(row, kv, length)
