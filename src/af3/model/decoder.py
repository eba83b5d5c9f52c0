"""Qwen2 decoder: token embeddings, pre-RMSNorm blocks with rotary GQA attention and SwiGLU MLP, lm_head."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TextConfig
from ..errors import CheckpointError
from ..kernels import ops as kernel_ops
from ..kernels import policy as kernel_policy
from .kv_cache import KVCache
from .linear import Linear


def _sdpa_groups_heads() -> bool:
    """Whether this torch's SDPA takes ``enable_gqa`` (2.5+): kv heads shared by a query group without copies."""
    q = torch.zeros(1, 2, 1, 4)
    try:
        F.scaled_dot_product_attention(q, q[:, :1], q[:, :1], enable_gqa=True)
    except (TypeError, RuntimeError):
        return False
    return True


#: SDPA reads each kv head for its whole query group itself (no ``repeat_interleave`` copy of k and v).
SDPA_GQA = _sdpa_groups_heads()


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, cast back before the weight (as in the reference).

    With ``residual``, the residual add in front of the norm too: ``s = x + residual``, returns ``(s, norm(s))``.
    On CPUs where af3's kernels run (half precision, inference), both are one pass over each row."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        if self.weight.dtype == x.dtype and kernel_policy.current().rowwise(x):
            return kernel_ops.rms_norm(x, self.weight, self.eps, residual)
        if residual is not None:
            x = x + residual
            return x, self(x)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position ids; rope_type "default" or "linear" (positions / factor)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        rope = cfg.rope()
        rope_type = rope["rope_type"]
        if rope_type not in ("default", "linear"):
            raise CheckpointError(f"rope_type {rope_type!r} is not supported (only 'default' and 'linear')")
        dim = cfg.head_dim
        # Explicit CPU device: also correct when the model is built under `with torch.device("meta")`.
        steps = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        inv_freq = 1.0 / (rope["rope_theta"] ** steps)
        if rope_type == "linear":
            if "factor" not in rope:
                raise CheckpointError("rope_type 'linear' needs a 'factor' in the rope parameters")
            inv_freq = inv_freq / float(rope["factor"])
        # A plain attribute, not a buffer: `model.to(bfloat16)` must not round the frequencies. Moved lazily.
        self.inv_freq = inv_freq  # [Dh/2] float32

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """position_ids [B, T] → cos, sin [B, T, Dh] in ``dtype`` (computed in float32)."""
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        freqs = position_ids[..., None].float() * self.inv_freq  # [B, T, Dh/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, Dh]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, H, T, Dh], cos/sin [B, T, Dh] → rotated x."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, Dh]
    return x * cos + rotate_half(x) * sin


def attention_mask_4d(key_valid: Tensor, start: int, num_queries: int) -> Tensor:
    """Boolean SDPA mask (True = attend) for queries in slots ``start .. start+T-1`` over ``S`` key slots.

    key_valid [B, S] marks real (non-pad) keys. A query sees valid keys at or before its own slot, and always
    itself, so fully padded query rows (left padding) stay finite instead of softmax-ing over nothing → NaN.
    Returns [B, 1, T, S].
    """
    s = key_valid.shape[1]
    q = torch.arange(start, start + num_queries, device=key_valid.device)[:, None]  # [T, 1]
    k = torch.arange(s, device=key_valid.device)[None, :]  # [1, S]
    mask = (k <= q)[None] & key_valid.bool()[:, None, :]  # [B, T, S]
    mask = mask | (k == q)[None]  # [B, T, S]
    return mask[:, None]  # [B, 1, T, S]


def additive_mask(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean SDPA mask (True = attend) as the additive one CPU SDPA runs ~2x faster (0 / dtype's minimum)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


@dataclass
class PrefixMask:
    """A decoding step's mask (one query per row) whose valid keys are a prefix of each row, as af3's KV cache
    keeps them: the AMX decoding attention reads ``lengths`` instead of the mask."""

    mask: Tensor  # [B, 1, 1, S] bool
    lengths: Tensor  # [B] int64: valid keys per row


def prefix_mask(mask: Tensor) -> PrefixMask | None:
    """``mask`` [B, 1, 1, S] bool as a :class:`PrefixMask`, or None where some row's valid keys are not a prefix."""
    b, s = mask.shape[0], mask.shape[-1]
    flat = mask.reshape(b, s)
    lengths = flat.sum(-1)
    if not bool(torch.equal(torch.arange(s, device=mask.device)[None, :] < lengths[:, None], flat)):
        return None
    return PrefixMask(mask, lengths)


@dataclass
class MixedBatch:
    """One forward over a prefill chunk and one decoding token per running row (passed as ``mask``).

    The input is ``[1, t + n, D]``: the ``t`` prompt tokens of cache row ``row`` (slots ``start ..
    start+t-1``), then one token for each of rows ``0 .. n-1`` at slot ``slots[i]``. The linear layers see all
    ``t + n`` positions at once (the weights are read once for both); attention runs per part.
    """

    row: int
    start: int
    t: int
    prefill_mask: Tensor | None  # [1, 1, t, start+t] additive, or None for a causal chunk from slot 0
    slots: Tensor  # [n] int64: each decoding row's new slot
    decode_mask: Tensor  # [n, 1, 1, S] bool: slots each decoding row reads


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings; q/k/v with bias, o_proj without.

    Its C twin: on CPUs where af3's kernels run decoding, one decoding step of every layer (this attention, the
    norms and the MLP) runs as one call of ``af3/kernels/csrc/decode_step.c``, planned by
    ``af3/generation/fused_plan.py``. An edit to the math here (or in :class:`RMSNorm`, :class:`MLP`, the rotary
    helpers) must be made there too; ``tests/model/test_decode_step.py`` compares both on random weights on every
    x86 CPU where the kernel builds.
    """

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = Linear(d, self.num_heads * hd, bias=True)
        self.k_proj = Linear(d, self.num_kv_heads * hd, bias=True)
        self.v_proj = Linear(d, self.num_kv_heads * hd, bias=True)
        self.o_proj = Linear(self.num_heads * hd, d, bias=False)

    def forward(
        self,
        x: Tensor,
        rope: tuple[Tensor, Tensor],
        mask: Tensor | MixedBatch | None,
        cache: KVCache | None = None,
        slots: int | Tensor = 0,
        last: bool = False,
    ) -> Tensor:
        if last:
            return self._last_query(x, rope, mask, cache, slots)
        b, t, _ = x.shape  # [B, T, D]
        lengths = None
        if isinstance(mask, PrefixMask):
            mask, lengths = mask.mask, mask.lengths
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)  # [B, T, H, Dh]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, Dh]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        q, k = self._rotated(q, rope), self._rotated(k, rope)  # [B, H, T, Dh], [B, Hkv, T, Dh]
        if isinstance(mask, MixedBatch):
            out = self._mixed(q, k, v, mask, cache)  # [1, H, T, Dh]
            return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))

        k, v = self._cached(k, v, mask, cache, slots)  # [B, Hkv, S, Dh]
        rep = self.num_heads // self.num_kv_heads
        if mask is None and kernel_policy.current().amx_attention(q):  # causal from slot 0: af3's AMX kernel
            out = kernel_ops.attention(q, k, v, causal=True)
        elif lengths is not None:  # one query per row over a prefix of its cache (Qwen2Model checked the policy)
            out = kernel_ops.decode_attention(q, k, v, lengths)
        elif rep > 1 and t == 1 and mask is not None:
            # One query per row (decoding): fold each head group into the query axis so the kv heads are not
            # copied; the [B, 1, 1, S] mask broadcasts over the group.
            out = F.scaled_dot_product_attention(q.view(b, self.num_kv_heads, rep, self.head_dim), k, v, mask)
        elif SDPA_GQA and rep > 1:  # head h reads kv head h // rep inside the kernel
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        else:
            if rep > 1:  # [B, Hkv, S, Dh] → [B, H, S, Dh], head h reads kv head h // rep
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        out = out.reshape(b, self.num_heads, t, self.head_dim)  # [B, H, T, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))  # [B, T, D]

    def _rotated(self, z: Tensor, rope: tuple[Tensor, Tensor]) -> Tensor:
        """Rotary embeddings on z [B, T, heads, Dh] → [B, heads, T, Dh] (af3's one-pass kernel where it runs, in the
        [B, T, heads, Dh] layout)."""
        if self.head_dim % 16 == 0 and kernel_policy.current().rowwise(z):
            return kernel_ops.rotary(z, *rope).transpose(1, 2)
        return apply_rotary(z.transpose(1, 2), *rope)

    def _cached(self, k: Tensor, v: Tensor, mask: Tensor | None, cache: KVCache | None,
                slots: int | Tensor) -> tuple[Tensor, Tensor]:
        """This step's k and v [B, Hkv, T, Dh] written into ``cache`` at ``slots``, and the keys and values to attend
        to: the mask's width in cache slots (without a mask, a causal prefill from slot 0: the slots just written);
        without a cache, k and v themselves."""
        if cache is None:
            return k, v
        cache.update(self.layer_idx, k, v, slots)
        return cache.keys_values(self.layer_idx, mask.shape[-1] if mask is not None else k.shape[2])

    def _last_query(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: KVCache | None,
                    slots: int | Tensor) -> Tensor:
        """A prefill's attention for its last position only → [B, 1, D]: every position's keys and values are still
        computed and cached, the query, attention and output projection only for the last one (the last layer's
        other positions feed nothing but logits nobody reads). ``mask``: None (causal from slot 0, so the last
        query sees every key) or the prefill's [B, 1, T, S] mask, of which the last query's row is used."""
        b, t, _ = x.shape  # [B, T, D]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, Dh]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        q = self.q_proj(x[:, -1:]).view(b, 1, self.num_heads, self.head_dim)  # [B, 1, H, Dh]
        k, q = self._rotated(k, rope), self._rotated(q, (rope[0][:, -1:], rope[1][:, -1:]))  # the last position's
        k, v = self._cached(k, v, mask, cache, slots)  # [B, Hkv, S, Dh]
        row = None if mask is None else mask[:, :, -1:]  # [B, 1, 1, S]
        rep = self.num_heads // self.num_kv_heads
        # Each head group folded into the query axis (as a decoding step): the kv heads are not copied.
        out = F.scaled_dot_product_attention(q.reshape(b, self.num_kv_heads, rep, self.head_dim), k, v, row)
        return self.o_proj(out.reshape(b, 1, self.num_heads * self.head_dim))  # [B, 1, D]

    def _mixed(self, q: Tensor, k: Tensor, v: Tensor, m: MixedBatch, cache: KVCache) -> Tensor:
        """Attention of a :class:`MixedBatch`: the chunk over its own row, each decoding token over its row; the
        same math as a separate prefill and decoding step."""
        rep = self.num_heads // self.num_kv_heads
        row = cache.rows(m.row, m.row + 1)
        row.update(self.layer_idx, k[:, :, : m.t], v[:, :, : m.t], m.start)
        kp, vp = row.keys_values(self.layer_idx, m.start + m.t)  # [1, Hkv, start+t, Dh]
        qp = q[:, :, : m.t]
        if kernel_policy.current().amx_attention(qp):  # the chunk is causal from slot m.start over valid keys
            out_p = kernel_ops.attention(qp, kp, vp, causal=True, q_start=m.start)
        elif SDPA_GQA or rep == 1:
            out_p = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=m.prefill_mask,
                                                   is_causal=m.prefill_mask is None, **({"enable_gqa": True}
                                                                                        if rep > 1 else {}))
        else:
            out_p = F.scaled_dot_product_attention(qp, kp.repeat_interleave(rep, 1), vp.repeat_interleave(rep, 1),
                                                   attn_mask=m.prefill_mask, is_causal=m.prefill_mask is None)
        n = m.slots.shape[0]
        rows = cache.rows(0, n)
        kd, vd = k[0, :, m.t:].transpose(0, 1)[:, :, None], v[0, :, m.t:].transpose(0, 1)[:, :, None]  # [n,Hkv,1,Dh]
        rows.update(self.layer_idx, kd, vd, m.slots[:, None])
        kc, vc = rows.keys_values(self.layer_idx, m.decode_mask.shape[-1])  # [n, Hkv, S, Dh]
        qd = q[0, :, m.t:].transpose(0, 1).reshape(n, self.num_kv_heads, rep, self.head_dim)  # [n, Hkv, rep, Dh]
        if kernel_policy.current().own_decode_attention(qd.dtype, qd.device, self.num_heads, self.num_kv_heads,
                                                         self.head_dim):  # each row's valid slots: 0 .. slots[i]
            q1 = qd.reshape(n, self.num_heads, 1, self.head_dim)
            out_d = kernel_ops.decode_attention(q1, kc, vc, m.slots + 1)  # [n, H, 1, Dh]
        else:
            out_d = F.scaled_dot_product_attention(qd, kc, vc, m.decode_mask)  # [n, Hkv, rep, Dh]
        out_d = out_d.reshape(n, self.num_heads, self.head_dim).transpose(0, 1)[None]  # [1, H, n, Dh]
        return torch.cat([out_p, out_d], dim=2)  # [1, H, t+n, Dh]


#: Without autograd, long inputs go through the MLP this many positions (batch × time) at a time.
MLP_CHUNK = 512


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases.

    Without autograd and for more than :data:`MLP_CHUNK` positions (a long prefill) it runs over chunks of the
    time axis with the activation done in place: the [chunk, intermediate] temporaries stay in the CPU cache instead
    of streaming [T, intermediate] tensors through memory several times (same results: rows are independent).
    """

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[0] * x.shape[1] <= MLP_CHUNK or torch.is_grad_enabled():
            return self.down_proj(self._act(self.gate_proj(x), self.up_proj(x)))
        b, t = x.shape[0], x.shape[1]
        step = max(1, MLP_CHUNK // b)
        step = -(-t // -(-t // step))  # chunks of equal size (799 rows: 400 + 399, not 512 + 287; measured 5-8% faster)
        out = x.new_empty(b, t, self.down_proj.out_features)  # [B, T, D]
        for a in range(0, t, step):
            h = x[:, a:a + step]  # [B, c, D]
            out[:, a:a + step] = self.down_proj(self._act(self.gate_proj(h), self.up_proj(h)))  # [B, c, I] inside
        return out

    @staticmethod
    def _act(gate: Tensor, up: Tensor) -> Tensor:
        """silu(gate) * up; without autograd in place in ``gate`` (one C pass where af3's kernels run)."""
        if torch.is_grad_enabled():
            return F.silu(gate) * up
        if kernel_policy.current().rowwise(gate) and gate.is_contiguous():
            return kernel_ops.silu_mul_(gate, up)
        return F.silu(gate, inplace=True).mul_(up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: KVCache | None,
                slots: int | Tensor, last: bool = False) -> Tensor:
        """→ [B, T, D]; with ``last`` (a prefill's last layer) only the last position's output, [B, 1, D]."""
        a = self.self_attn(self.input_layernorm(x), rope, mask, cache, slots, last)
        x, h = self.post_attention_layernorm(a, x[:, -1:].contiguous() if last else x)
        return x + self.mlp(h)


class Qwen2Model(nn.Module):
    """Embeddings + decoder layers + final norm (on-disk prefix ``language_model.model``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        if cfg.hidden_act != "silu":
            raise CheckpointError(f"text_config.hidden_act {cfg.hidden_act!r} is not supported (only 'silu')")
        pad = cfg.pad_token_id
        pad = pad if pad is not None and 0 <= pad < cfg.vocab_size else None  # padding_idx: no gradient
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg)

    def forward(
        self,
        inputs_embeds: Tensor,
        position_ids: Tensor,
        mask: Tensor | MixedBatch | PrefixMask | None = None,
        cache: KVCache | None = None,
        slots: int | Tensor = 0,
        last_only: bool = False,
    ) -> Tensor:
        """inputs_embeds [B, T, D], position_ids [B, T], mask [B, 1, T, S] bool or None (plain causal, no
        cache) → final hidden states [B, T, D]. With a cache, k/v are written at ``slots``, S slots read. A decoding
        step whose rows' valid keys are known to be cache prefixes may pass a :class:`PrefixMask`. ``last_only``
        (a prefill that needs only its next token's logits): → [B, 1, D], the last position's, with the last layer
        computing only that position's query, attention and MLP (every layer's keys and values are still cached);
        not for a :class:`MixedBatch`."""
        if cache is not None and mask is None and not (isinstance(slots, int) and slots == 0):
            raise ValueError("a KV cache past slot 0 needs an explicit attention mask (its width = slots to read)")
        rope = self.rotary(position_ids, inputs_embeds.dtype)  # cos, sin: [B, T, Dh] each
        if isinstance(mask, Tensor) and mask.dtype == torch.bool and inputs_embeds.shape[1] > 1:
            # Several queries: CPU SDPA runs an additive mask ~2x faster than a boolean one (converted once here,
            # not per layer). Every query sees at least itself, so no row is all -inf.
            mask = additive_mask(mask, inputs_embeds.dtype)
        decoding = isinstance(mask, PrefixMask) or (isinstance(mask, Tensor) and mask.dtype == torch.bool
                                                     and inputs_embeds.shape[1] == 1 and cache is not None)
        if decoding:  # one query per row: af3's AMX decoding attention reads each row's length instead of the mask
            amx = self.amx_decoding(inputs_embeds.dtype, inputs_embeds.device)
            if isinstance(mask, PrefixMask):  # declared by the caller (the engine's runner knows its rows)
                mask = mask if amx else mask.mask
            elif amx:  # found here: a cache prefix per row, or not
                mask = prefix_mask(mask) or mask
        x = inputs_embeds
        if last_only and isinstance(mask, (MixedBatch, PrefixMask)):
            raise ValueError("last_only is for a prefill: its rows' last positions, not a mixed or decoding batch")
        last = len(self.layers) - 1 if last_only and x.shape[1] > 1 else -1
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, cache, slots, i == last)
        return self.norm(x[:, -1:] if last_only else x)

    def amx_decoding(self, dtype: torch.dtype, device: torch.device) -> bool:
        """Decoding steps of this decoder in ``dtype`` on ``device`` attend through af3's AMX decoding kernel (the
        policy's rule for its head shapes; the fused C step follows the same answer)."""
        att = self.layers[0].self_attn if len(self.layers) else None
        return att is not None and kernel_policy.current().amx_decode_attention(
            dtype, device, att.num_heads, att.num_kv_heads, att.head_dim)


class Qwen2ForCausalLM(nn.Module):
    """Decoder + lm_head (on-disk prefix ``language_model``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
