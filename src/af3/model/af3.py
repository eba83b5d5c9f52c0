"""AF3Model: audio encoder → projector → Qwen2 decoder, with audio embeddings written into ``<sound>`` slots.

Fusion is in place: each ``<sound>`` token of ``input_ids`` is one 40 ms audio embedding, so the sequence
length never changes. Placeholders are filled in row-major (batch, time) order with the window-major audio
embeddings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import IGNORE_INDEX, AF3Config, GenerationConfig
from ..errors import InputError
from ..features import conv_output_lengths
from .decoder import Qwen2ForCausalLM, attention_mask_4d
from .encoder import AudioEncoder
from .kv_cache import KVCache
from .projector import Projector
from .quantize import check_mode, check_not_quantized, int8_module, is_quantized, quantize_model


@dataclass
class AF3Output:
    """What :meth:`AF3Model.forward` returns; also readable as ``out["logits"]``."""

    loss: Tensor | None = None
    logits: Tensor | None = None  # [B, T or logits_to_keep, V]
    cache: KVCache | None = None
    audio_embeds: Tensor | None = None  # [sum of audio tokens, D_text]

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


def causal_lm_loss(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Next-token cross entropy in float32: position t predicts labels[t+1]; :data:`IGNORE_INDEX` is ignored.

    ``reduction="mean"`` is the model's ``.loss`` (transformers' value); training sums (``"sum"``) and divides by
    the label tokens of the whole accumulated batch, so that every token weighs the same across micro-batches."""
    vocab = logits.shape[-1]
    pred = logits[:, :-1].float().reshape(-1, vocab)  # [B*(T-1), V]
    target = labels[:, 1:].to(logits.device).reshape(-1)  # [B*(T-1)]
    return F.cross_entropy(pred, target, ignore_index=IGNORE_INDEX, reduction=reduction)


def positions_from_mask(attention_mask: Tensor) -> Tensor:
    """Rotary positions that skip padding: cumsum(mask) - 1, pads at 0. [B, S] → [B, S]."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


class AF3Model(nn.Module):
    """Audio Flamingo 3. Submodule names equal the checkpoint's key prefixes (plain ``load_state_dict``)."""

    def __init__(self, config: AF3Config, generation_config: GenerationConfig | None = None):
        super().__init__()
        text = config.text_config
        self.config = config
        self.generation_config = generation_config or GenerationConfig(
            bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
        )
        self.audio_tower = AudioEncoder(config.audio_config)
        self.multi_modal_projector = Projector(config)
        self.language_model = Qwen2ForCausalLM(text)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", allow_pickle: bool = False,
                        quantize: str | None = None) -> AF3Model:
        """Load a local checkpoint folder (HF layout, sharded or not, or NVIDIA's layout).

        ``dtype=None`` keeps the checkpoint's dtype. Storage is allocated empty on ``device`` and filled tensor by
        tensor with plain file reads (peak memory: the weights plus one tensor). Pickled ``.bin`` weights are
        refused unless ``allow_pickle``. ``quantize="int8"`` stores the decoder's linear weights (and the token
        embeddings) as int8 with per-channel scales; everything else computes in ``dtype`` (default bf16).

        Every problem of the folder is a :class:`~af3.errors.CheckpointError` naming the file, key or tensor (see
        :mod:`af3.model.weights`); a bad argument is an :class:`~af3.errors.InputError`, raised before any file
        is read.
        """
        from .weights import check_device, check_dtype, load_pretrained

        dtype, device = check_dtype(dtype), check_device(device)
        if not isinstance(allow_pickle, bool):
            raise InputError(f"allow_pickle must be True or False, got {allow_pickle!r}")
        if quantize is None:
            return load_pretrained(cls, path, dtype=dtype, device=device, allow_pickle=allow_pickle)
        # Quantized on the CPU while loading, module by module (the float decoder is never whole in memory), then
        # moved: an accelerator only ever holds the int8 model. Tied embeddings share one int8 table, so such a
        # model is loaded whole and quantized after.
        check_mode(quantize)
        model = load_pretrained(cls, path, dtype=dtype or torch.bfloat16, device="cpu", allow_pickle=allow_pickle,
                                transform=int8_module, itemsize=1.1)
        if not is_quantized(model):
            model = quantize_model(model, quantize)
        return model.to(device)

    def save_pretrained(self, path: str | os.PathLike, max_shard_bytes: int = 5 * 1024**3) -> None:
        """Write the HF layout (config, generation config, safetensors) through :func:`af3.files.atomic_folder`:
        the folder is replaced in one step, its other files (a processor's, an adapter's) are kept, and a failed
        save leaves the previous checkpoint as it was."""
        from .weights import save_pretrained

        check_not_quantized(self)
        save_pretrained(self, path, max_shard_bytes=max_shard_bytes)

    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.model.norm.weight.dtype  # (the embedding table may be int8)

    # ---------------------------------------------------------------- audio

    def get_audio_features(self, input_features: Tensor, input_features_mask: Tensor | None = None) -> Tensor:
        """Log-mel windows [N, mel, 2P] + frame mask [N, 2P] → audio embeddings [sum of post-pool lengths,
        D_text], window-major (valid frames of window 0, then window 1, ...). No mask means full windows."""
        input_features_mask = self._check_audio(input_features, input_features_mask)
        hidden = self.audio_tower(input_features, input_features_mask)  # [N, P/2, D_audio]
        lengths = conv_output_lengths(input_features_mask.sum(-1).long())[1]  # [N] audio tokens per window
        keep = torch.arange(hidden.shape[1], device=hidden.device) < lengths[:, None]  # [N, P/2]
        # The projector works per frame, so project only the frames that are used.
        return self.multi_modal_projector(hidden[keep])  # [sum(lengths), D_text]

    def _check_audio(self, features: Tensor, mask: Tensor | None) -> Tensor:
        cfg = self.config.audio_config
        frames = 2 * cfg.max_source_positions
        if features.dim() != 3 or features.shape[1] != cfg.num_mel_bins or features.shape[2] != frames:
            raise InputError(
                f"input_features must be [N, {cfg.num_mel_bins}, {frames}] (windows, mel bins, frames), "
                f"got {list(features.shape)}"
            )
        if mask is None:
            return torch.ones(features.shape[0], frames, dtype=torch.long, device=features.device)
        if tuple(mask.shape) != (features.shape[0], frames):
            raise InputError(
                f"input_features_mask must be [{features.shape[0]}, {frames}] (one row per window), "
                f"got {list(mask.shape)}"
            )
        return mask.to(features.device)

    def embed(self, input_ids: Tensor, audio_embeds: Tensor | None = None) -> Tensor:
        """Token embeddings [B, T, D] of ``input_ids`` [B, T], with ``audio_embeds`` [N_tok, D] (from
        :meth:`get_audio_features`) in the ``<sound>`` slots."""
        embeds = self.language_model.model.embed_tokens(input_ids)  # [B, T, D]
        return embeds if audio_embeds is None else self.fuse_audio(input_ids, embeds, audio_embeds)

    def fuse_audio(self, input_ids: Tensor, embeds: Tensor, audio: Tensor) -> Tensor:
        """Write ``audio`` [N_tok, D] into the ``<sound>`` slots of ``embeds`` [B, T, D] (row-major order)."""
        slots = input_ids == self.config.audio_token_id  # [B, T]
        n = int(slots.sum())
        if n != audio.shape[0]:
            raise InputError(
                f"audio features and <sound> tokens do not match: {n} tokens, {audio.shape[0]} audio frames"
            )
        audio = audio.to(device=embeds.device, dtype=embeds.dtype)
        return embeds.masked_scatter(slots[..., None].expand_as(embeds), audio)  # [B, T, D]

    # ---------------------------------------------------------------- forward

    def forward(  # noqa: PLR0917 (HF-compatible positional order)
        self,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        input_features: Tensor | None = None,
        input_features_mask: Tensor | None = None,
        labels: Tensor | None = None,
        position_ids: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        cache: KVCache | None = None,
        logits_to_keep: int = 0,
    ) -> AF3Output:
        """Logits (and loss with ``labels``) for a batch of token sequences with optional audio.

        ``attention_mask`` [B, S] (1 = real token) covers the cached tokens plus the new ones
        (S = cache.length + T); without ``position_ids`` positions come from it (left padding is transparent).
        With ``cache`` the new keys/values are written at slots ``cache.length ..``; ``cache.length`` advances
        by T.
        """
        embeds = self._embed(input_ids, inputs_embeds)  # [B, T, D]
        b, t = embeds.shape[:2]
        audio_embeds = None
        if input_features is not None:
            if input_ids is None:
                raise InputError("input_features need input_ids: the <sound> ids mark where the audio goes")
            audio_embeds = self.get_audio_features(input_features, input_features_mask)
            embeds = self.fuse_audio(input_ids, embeds, audio_embeds)

        start = cache.length if cache is not None else 0
        mask, position_ids = self._mask_and_positions(attention_mask, position_ids, (b, t), cache)
        if labels is not None:
            if tuple(labels.shape) != (b, t):
                raise InputError(f"labels must be shaped like input_ids {[b, t]}, got {list(labels.shape)}")
            if logits_to_keep:
                raise InputError("labels need the logits of every position; do not pass logits_to_keep")
        if cache is not None:
            cache.reserve(start + t)  # grows a cache that started small; refuses beyond its max_len

        hidden = self.language_model.model(embeds, position_ids, mask, cache, start)  # [B, T, D]
        if cache is not None:
            cache.length = start + t
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]  # [B, k, D]
        logits = self.language_model.lm_head(hidden)  # [B, T or k, V]
        loss = causal_lm_loss(logits, labels) if labels is not None else None
        return AF3Output(loss=loss, logits=logits, cache=cache, audio_embeds=audio_embeds)

    def check_input_ids(self, input_ids: Any) -> None:
        """Raise :class:`InputError` unless ``input_ids`` is a 2-D integer tensor of ids inside the vocabulary."""
        if not isinstance(input_ids, Tensor):
            raise InputError(f"input_ids must be a tensor of token ids, not {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise InputError(f"input_ids must be 2-D [batch, tokens], got shape {list(input_ids.shape)}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise InputError(f"input_ids must hold integer token ids, not {input_ids.dtype}")
        vocab = self.config.text_config.vocab_size
        if input_ids.numel() and not (int(input_ids.min()) >= 0 and int(input_ids.max()) < vocab):
            raise InputError(f"input_ids must lie in 0 .. {vocab - 1} (the vocabulary), got ids from "
                             f"{int(input_ids.min())} to {int(input_ids.max())}")

    def _embed(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        if input_ids is not None:
            self.check_input_ids(input_ids)
        if inputs_embeds is not None:
            if inputs_embeds.dim() != 3:
                raise InputError(f"inputs_embeds must be 3-D, got {list(inputs_embeds.shape)}")
            if input_ids is not None and input_ids.shape != inputs_embeds.shape[:2]:
                raise InputError("input_ids and inputs_embeds describe different sequence shapes")
            return inputs_embeds
        if input_ids is None:
            raise InputError("give input_ids or inputs_embeds")
        return self.language_model.model.embed_tokens(input_ids)

    def _mask_and_positions(
        self, attention_mask: Tensor | None, position_ids: Tensor | None, shape: tuple[int, int],
        cache: KVCache | None,
    ) -> tuple[Tensor | None, Tensor]:
        """SDPA mask [B, 1, T, start+T] (None = plain causal, no cache) and rotary positions [B, T]."""
        b, t = shape
        device = self.device
        start = cache.length if cache is not None else 0
        if position_ids is not None and tuple(position_ids.shape) != (b, t):
            raise InputError(f"position_ids must be [{b}, {t}], got {list(position_ids.shape)}")
        if attention_mask is None:
            if position_ids is None:
                position_ids = torch.arange(start, start + t, device=device).expand(b, t)  # [B, T]
            if cache is None:
                return None, position_ids  # no padding, empty cache: plain causal attention
            attention_mask = torch.ones(b, start + t, dtype=torch.bool, device=device)
        if tuple(attention_mask.shape) != (b, start + t):
            want = f"[{b}, {t}]" if start == 0 else f"[{b}, {start} cached + {t} new]"
            raise InputError(f"attention_mask must be {want}, got {list(attention_mask.shape)}")
        if position_ids is None:
            position_ids = positions_from_mask(attention_mask)[:, start:]  # [B, T]
        if cache is None and not self.needs_attention_mask(attention_mask):
            # Every row is real tokens then padding (right padding or none): plain causal attention is exact for
            # the real positions (they never see a pad), and SDPA's causal kernel is 2-3x faster than a mask.
            return None, position_ids
        return attention_mask_4d(attention_mask.to(device), start, t), position_ids

    @staticmethod
    def needs_attention_mask(attention_mask: Tensor) -> bool:
        """False when each row of ``attention_mask`` [B, T] is a prefix of ones (no left or inner padding)."""
        return bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any())

    # ---------------------------------------------------------------- generation

    def generate(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                 input_features: Tensor | None = None, input_features_mask: Tensor | None = None,
                 **options: Any) -> Tensor:
        """Decode up to ``max_new_tokens`` per row → [B, T_prompt + new] (prompt followed by the new tokens), as
        transformers' ``generate`` does; runs on the Engine's decoding loop (``af3.generation.batch_generate``).

        Options: ``max_new_tokens``, ``min_new_tokens``, ``do_sample``, ``temperature`` (0 = greedy), ``top_k``,
        ``top_p``, ``repetition_penalty``, ``eos_token_id``, ``pad_token_id``, ``generator``, ``seed``; unset ones
        come from ``self.generation_config`` (rules in ``af3.generation.options``). Rows stop at an end token and
        are padded with ``pad_token_id`` afterwards; decoding stops once every row has finished. Left padding is
        supported. The repetition penalty sees the whole row, prompt pads and ``<sound>`` ids included (as
        transformers does).
        """
        # The one place model/ reaches up into generation/: this method is the transformers-style entry point to
        # the same loop the Engine runs (nothing in generation/ imports this file at module level).
        from ..generation.batch_generate import generate

        return generate(self, input_ids, attention_mask, input_features, input_features_mask, **options)
