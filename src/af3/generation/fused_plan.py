"""The fused decoding step's plan: a Qwen2 decoder's tensors handed to ``af3.kernels.FusedDecoder`` once.

The C step (``af3/kernels/csrc/decode_step.c``) re-implements the forward of :class:`~af3.model.decoder.DecoderLayer`
(norms, q/k/v, rotary, cache write, GQA attention, o_proj, SwiGLU MLP) and the final norm. It may stand in for the
modules only where they are exactly the plain ones: every layer, attention, MLP and norm of the canonical classes
(not a subclass, a LoRA wrapper or an edited copy), no hooks on any of them, linear weights all of the activations'
dtype or all int8, one norm eps. :func:`read_plan` checks that and returns None otherwise (the runner then runs
the torch modules).

A plan remembers what it was read from (each module and tensor it looked up, the hook dictionaries, the tensors'
storage) so that :meth:`Plan.still_valid` can tell, in about 0.15 ms for 24 layers, whether the decoder changed
since (a module replaced, weights moved by ``.to``, a hook added). The runner checks it when requests are admitted,
not at every step: the model must not be changed while requests are decoding.
"""

from __future__ import annotations

import operator

import torch
from torch import Tensor
from torch.nn.modules import module as torch_module

from .. import kernels
from ..model.decoder import MLP, Attention, DecoderLayer, Qwen2Model, RMSNorm
from ..model.linear import Linear
from ..model.quantize import Int8Linear


def _global_hooks() -> bool:
    """Whether a global module hook is registered (``torch.nn.modules.module.register_module_forward_hook``):
    torch has no public reader, so its two registries are read defensively."""
    return bool(getattr(torch_module, "_global_forward_hooks", None)
                or getattr(torch_module, "_global_forward_pre_hooks", None))


class Plan:
    """A :class:`af3.kernels.FusedDecoder` for one decoder and ``dtype``, and what it was read from."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype
        self.decoder: kernels.FusedDecoder | None = None
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

    def still_valid(self, model: Qwen2Model) -> bool:
        """Whether ``model`` is still exactly what this plan was read from."""
        # map() keeps the loops in C: a Python loop over the ~1300 items of 24 layers costs twice as much.
        return (len(model.layers) == self.num_layers and not _global_hooks()
                and all(map(operator.is_, map(dict.get, self.owners, self.keys), self.found))
                and not any(self.hook_dicts)
                and all(n.eps == eps for n, eps in self.norms)
                and list(map(Tensor.data_ptr, self.tensors)) == self.ptrs)


def read_plan(model: Qwen2Model, dtype: torch.dtype) -> Plan | None:
    """``model`` planned for the fused step with ``dtype`` activations, or None where some part is not what the C
    step computes (see the module docstring)."""
    if type(model) is not Qwen2Model or not len(model.layers) or _global_hooks():
        return None
    d = Plan(dtype)
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
    if type(final) is not RMSNorm:
        return None
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
        d.decoder = kernels.FusedDecoder(layers, final_weight, inv_freq, eps, attn.num_heads, attn.num_kv_heads,
                                         attn.head_dim, dtype)
    except ValueError:  # shapes or dtypes the kernel does not take (e.g. head_dim % 8 != 0)
        return None
    return d
