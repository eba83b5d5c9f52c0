"""Qwen2 decoder: token embeddings, pre-RMSNorm blocks with rotary GQA attention and SwiGLU MLP, lm_head."""

from __future__ import annotations

import functools
import logging
import operator
import os
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import TextConfig
from ..errors import CheckpointError
from ..generation.cache import KVCache
from ..kernels import binding as cpu_kernels
from .linear import HALF_DTYPES, Linear, own_kernel_takes

log = logging.getLogger(__name__)

#: When decoding steps run all layers in one call of af3's CPU kernel (``cpu_kernels.decode_step``; see
#: :meth:`Qwen2Model.fused_decode_weights` for which decoders): ``"auto"`` where af3's kernel replaces torch's for
#: few rows (CPUs without native half-precision GEMMs, where it was measured), ``"always"`` on any CPU where the
#: kernel builds (to measure it on AVX-512/AMX machines), ``"off"`` never. Set by ``$AF3_FUSED_DECODE``.
FUSED_DECODE = os.environ.get("AF3_FUSED_DECODE", "auto")
#: Qwen2Model → its _Described: outside the module, so deepcopy and pickling never see the C descriptions (ctypes
#: pointers), and the entry goes with the model.
_DECODE_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32, cast back before the weight (as in the reference)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
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


class Attention(nn.Module):
    """Grouped-query self-attention with rotary embeddings; q/k/v with bias, o_proj without."""

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
        mask: Tensor | None,
        cache: KVCache | None = None,
        slots: int | Tensor = 0,
    ) -> Tensor:
        b, t, _ = x.shape  # [B, T, D]
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, T, Dh]
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)

        if cache is not None:
            # The mask's width says how many cache slots this step reads; without a mask (a causal prefill
            # that starts at slot 0) it reads the slots just written.
            cache.update(self.layer_idx, k, v, slots)
            k, v = cache.keys_values(self.layer_idx, mask.shape[-1] if mask is not None else t)  # [B, Hkv, S, Dh]

        rep = self.num_heads // self.num_kv_heads
        if rep > 1 and t == 1 and mask is not None:
            # One query per row (decoding): fold each head group into the query axis so the kv heads are not
            # copied; the [B, 1, 1, S] mask broadcasts over the group.
            out = F.scaled_dot_product_attention(q.view(b, self.num_kv_heads, rep, self.head_dim), k, v, mask)
        else:
            if rep > 1:  # [B, Hkv, S, Dh] → [B, H, S, Dh], head h reads kv head h // rep
                k = k.repeat_interleave(rep, dim=1)
                v = v.repeat_interleave(rep, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        out = out.reshape(b, self.num_heads, t, self.head_dim)  # [B, H, T, Dh]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim))  # [B, T, D]


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
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        b, t = x.shape[0], x.shape[1]
        step = max(1, MLP_CHUNK // b)
        out = x.new_empty(b, t, self.down_proj.out_features)  # [B, T, D]
        for a in range(0, t, step):
            h = x[:, a:a + step]  # [B, c, D]
            g = F.silu(self.gate_proj(h), inplace=True)  # [B, c, I]
            out[:, a:a + step] = self.down_proj(g.mul_(self.up_proj(h)))
        return out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: KVCache | None,
                slots: int | Tensor) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, slots)
        return x + self.mlp(self.post_attention_layernorm(x))


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
        mask: Tensor | None = None,
        cache: KVCache | None = None,
        slots: int | Tensor = 0,
    ) -> Tensor:
        """inputs_embeds [B, T, D], position_ids [B, T], mask [B, 1, T, S] bool or None (plain causal, no
        cache) → final hidden states [B, T, D]. With a cache, k/v are written at ``slots``, S slots read."""
        if cache is not None and mask is None and not (isinstance(slots, int) and slots == 0):
            raise ValueError("a KV cache past slot 0 needs an explicit attention mask (its width = slots to read)")
        if mask is not None and cache is not None and inputs_embeds.shape[1] == 1:
            fused = self._fused_decode(inputs_embeds, position_ids, mask, cache, slots)
            if fused is not None:
                return fused
        rope = self.rotary(position_ids, inputs_embeds.dtype)  # cos, sin: [B, T, Dh] each
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, rope, mask, cache, slots)
        return self.norm(x)

    def _fused_decode(self, x: Tensor, position_ids: Tensor, mask: Tensor, cache: KVCache,
                      slots: int | Tensor) -> Tensor | None:
        """One decoding step (x [B, 1, D]) through ``cpu_kernels.decode_step``, or None where it does not apply."""
        b = x.shape[0]
        if (not _fused_decode_applies(b, x.dtype, x.device) or torch.is_grad_enabled()
                or mask.dtype != torch.bool or tuple(mask.shape[:3]) != (b, 1, 1)):
            return None
        weights = self.fused_decode_weights(x.dtype)
        if weights is None:
            return None
        slots = torch.full((b,), slots, dtype=torch.int64) if isinstance(slots, int) else slots.reshape(b)
        keys, values = cache.layer_tensors()
        out = cpu_kernels.decode_step(weights, x.reshape(b, -1), position_ids.reshape(b).long(), slots.long(),
                                      mask.reshape(b, -1), keys, values)
        return out[:, None]  # [B, 1, D]

    def fused_decode_weights(self, dtype: torch.dtype) -> cpu_kernels.DecodeWeights | None:
        """This decoder described for ``cpu_kernels.decode_step`` with ``dtype`` activations, or None when it cannot
        run there: a module is not the plain one (LoRA or other wrappers, hooks), weights are neither ``dtype``
        nor int8 (or mixed), or norms differ in eps. The description is kept until anything it was read from
        changes (a module or tensor replaced, a tensor's storage moved by ``.to``, a hook added), which every call
        checks (about 0.15 ms for 24 layers; reading the modules anew takes 0.5 ms)."""
        from torch.nn.modules import module as torch_module
        if not len(self.layers) or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
            return None
        cached = _DECODE_WEIGHTS.get(self)
        if cached is not None and cached.describes(self, dtype):
            return cached.weights
        described = _Described.read(self, dtype)
        if described is None:
            _DECODE_WEIGHTS.pop(self, None)
            return None
        _DECODE_WEIGHTS[self] = described
        return described.weights


def _fused_decode_applies(rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether :data:`FUSED_DECODE` lets a decoding step of ``rows`` rows in ``dtype`` take the fused kernel."""
    mode = FUSED_DECODE
    if mode not in ("auto", "always", "off"):
        _warn_unknown_mode(mode)
        mode = "auto"
    if mode == "always":
        return own_kernel_takes(rows, dtype, device, HALF_DTYPES)
    return mode == "auto" and own_kernel_takes(rows, dtype, device)


@functools.cache
def _warn_unknown_mode(mode: str) -> None:  # once per value, not at every decoding step
    log.warning("AF3_FUSED_DECODE=%r is not one of auto, always, off: using auto", mode)


class _Described:
    """A decoder's ``DecodeWeights`` and everything they were read from, to tell cheaply whether they still apply:
    each lookup made (container dict, key, object found), the modules whose hooks would change the forward, the
    norms' eps, and the tensors' addresses."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.weights: cpu_kernels.DecodeWeights | None = None
        # Each lookup made while reading: container dict, key, object found (three parallel lists for map()).
        self.owners: list[dict] = []
        self.keys: list[str] = []
        self.found: list[object] = []
        self.hook_dicts: list[dict] = []  # the read modules' own (registering a hook adds to them)
        self.norms: list[tuple[RMSNorm, float]] = []
        self.tensors: list[Tensor] = []
        self.ptrs: list[int] = []
        self.num_layers = 0

    def take(self, owner: dict, key: str):
        obj = owner.get(key)
        self.owners.append(owner)
        self.keys.append(key)
        self.found.append(obj)
        return obj

    def describes(self, model: Qwen2Model, dtype: torch.dtype) -> bool:
        # map() keeps the loops in C: Python loops over the ~1300 items of 24 layers cost 0.3 ms per step.
        return (dtype == self.dtype and len(model.layers) == self.num_layers
                and all(map(operator.is_, map(dict.get, self.owners, self.keys), self.found))
                and not any(self.hook_dicts)
                and all(n.eps == eps for n, eps in self.norms)
                and list(map(Tensor.data_ptr, self.tensors)) == self.ptrs)

    @classmethod
    def read(cls, model: Qwen2Model, dtype: torch.dtype) -> _Described | None:
        """Walk ``model``; None when some part is not what the fused step runs."""
        from .quantize import Int8Linear  # quantize imports this module's siblings, not the other way round

        d = cls(dtype)
        d.num_layers = len(model.layers)
        modules = []

        def linear(owner: dict, key: str) -> tuple[Tensor, Tensor | None, Tensor | None] | None:
            module = d.take(owner, key)
            modules.append(module)
            if type(module) is Linear:
                w = d.take(module._parameters, "weight")
                got = (w, None, d.take(module._parameters, "bias")) if w.dtype == dtype else None
            elif type(module) is Int8Linear:
                got = (d.take(module._buffers, "qweight"), d.take(module._buffers, "scales"),
                       d.take(module._parameters, "bias"))
            else:
                return None
            return got if got is not None and got[0].is_contiguous() else None

        final = d.take(model._modules, "norm")
        modules.append(final)  # (the rotary module too, below: the fused step stands in for both their forwards)
        eps = final.eps
        layers = []
        for i in range(d.num_layers):
            layer = d.take(model.layers._modules, str(i))
            parts = layer._modules
            attn, mlp = d.take(parts, "self_attn"), d.take(parts, "mlp")
            norms = d.take(parts, "input_layernorm"), d.take(parts, "post_attention_layernorm")
            if (type(layer) is not DecoderLayer or type(attn) is not Attention or type(mlp) is not MLP
                    or any(type(n) is not RMSNorm or n.eps != eps for n in norms)):
                return None
            modules += [layer, attn, mlp, *norms]
            d.norms += [(n, eps) for n in norms]
            a, p = attn._modules, mlp._modules
            lins = {"q": linear(a, "q_proj"), "k": linear(a, "k_proj"), "v": linear(a, "v_proj"),
                    "o": linear(a, "o_proj"), "gate": linear(p, "gate_proj"), "up": linear(p, "up_proj"),
                    "down": linear(p, "down_proj")}
            if any(v is None for v in lins.values()):
                return None
            layers.append({**lins, "norm1": d.take(norms[0]._parameters, "weight"),
                           "norm2": d.take(norms[1]._parameters, "weight")})
            d.tensors += [t for v in lins.values() for t in v if t is not None]
            d.tensors += [layers[-1]["norm1"], layers[-1]["norm2"]]
        modules.append(d.take(model._modules, "rotary"))
        d.hook_dicts = [h for m in modules for h in (m._forward_hooks, m._forward_pre_hooks)]
        if any(d.hook_dicts):
            return None
        final_weight, inv_freq = d.take(final._parameters, "weight"), d.take(modules[-1].__dict__, "inv_freq")
        d.norms.append((final, eps))
        d.tensors += [final_weight, inv_freq]
        d.ptrs = [t.data_ptr() for t in d.tensors]
        attn = model.layers[0].self_attn
        try:
            d.weights = cpu_kernels.DecodeWeights(layers, final_weight, inv_freq, eps, attn.num_heads,
                                                  attn.num_kv_heads, attn.head_dim, dtype, borrow=True)
        except ValueError:  # shapes or dtypes the kernel does not take (e.g. head_dim % 8 != 0)
            return None
        return d


class Qwen2ForCausalLM(nn.Module):
    """Decoder + lm_head (on-disk prefix ``language_model``)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
