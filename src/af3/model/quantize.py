"""Int8 weight-only quantization of the Qwen2 decoder (attention, MLP, lm_head, token embeddings), for inference.

Each ``nn.Linear`` under ``model.language_model`` becomes an :class:`Int8Linear`: the weight is stored as int8
[out, in] with one symmetric scale per output channel (``scale = absmax / 127``, ``w ≈ q * scale``), the bias is
kept as it was. The audio encoder and the projector keep their dtype.

Kernels, as ``af3.kernels.policy`` chooses them (measurements in ``benchmarks/README.md``, from
``benchmarks/quantize_bench.py`` and ``benchmarks/gemv_bench.py``):

* x86 CPUs where af3's kernels build (every row count without native bf16 matrix instructions, up to 8 rows with
  them): af3's own C kernel (``af3.kernels``), which reads the int8 weight once for up to 4 rows at a time, or from
  24 rows widens it into fp32 panels a chunk at a time, and applies the scales in fp32;
* few bf16 rows elsewhere on the CPU: torch's ``_weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N])``, which
  computes ``(x @ w.T) * scales`` without a float weight (x 2-D and contiguous, scales in x's dtype; its bf16 CPU
  kernel is wrong unless K % 16 == 0, which the policy checks; its fp32/fp16 CPU kernels are scalar, so unused);
* everything else: the fallback ``F.linear(x, q.to(x.dtype)) * scale`` (int8 values are exact in bf16 and fp32),
  chunked over output rows for large weights so the temporary float weight stays small. It is also the CUDA path
  (untested here): the expression is the one ``torch.compile`` fuses into a single kernel (as in gpt-fast).
  ``torch._int_mm`` needs int8 activations too (W8A8), so it is not a weight-only kernel and is not used.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..kernels import binding as cpu_kernels
from ..kernels import policy as kernel_policy
from ..system import advise_huge_pages
from .linear import even_pieces, fp32_piece

log = logging.getLogger(__name__)

#: Quantization modes that :func:`quantize_model` (and ``AF3Model.from_pretrained(quantize=...)``) accept.
MODES = ("int8",)
#: Largest float weight chunk (elements) materialised by the fallback and by quantization.
CHUNK_ELEMENTS = 1 << 24
#: Elements of a weight quantized at a time (its fp32 temporaries, a few of them at once, stay near 16 MB each:
#: loading quantizes module by module, and these are its transient memory).
QUANT_CHUNK = 1 << 22


def _fused_mm(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """x [M, K] bf16 (contiguous) · int8 [N, K] · scales [N] (x's dtype) → [M, N] in one kernel."""
    return torch.ops.aten._weight_int8pack_mm(x, qweight, scales)


def _dequant_mm(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """Fallback: (x @ q.T) * scales with q cast to a float dtype, in chunks of output rows. x [M, K] → [M, N]."""
    dtype = x.dtype
    # bf16/fp32 hold x @ q.T (up to 127x the true output) safely; fp16 could overflow, so compute in fp32. So does a
    # CPU without a native bf16 GEMM for many rows (see af3.kernels.policy).
    compute = dtype if dtype in (torch.bfloat16, torch.float32, torch.float64) else torch.float32
    if kernel_policy.current().converts_to_fp32(x.shape[0], compute, x.device):
        compute = torch.float32
    xc = x.to(compute)
    n, k = qweight.shape
    # fp32 pieces as linear_via_fp32 cuts them: small enough to stay in the caches while the GEMM reads them (AF3-8B's
    # gate, 18944 x 3584, on a 2-vCPU Zen 3 EPYC: 100 rows 470 -> 234 ms, 780 rows 1631 -> 1042 ms against pieces of
    # CHUNK_ELEMENTS; its down projection 322 -> 151 and 1160 -> 929). Measured there only; fp32 products elsewhere
    # (fp16 activations, fp32 models) take the same pieces, half-precision ones keep CHUNK_ELEMENTS (not measured).
    rows = fp32_piece(n, k) if compute == torch.float32 else even_pieces(n, CHUNK_ELEMENTS // max(k, 1))
    if n <= rows:
        return (F.linear(xc, qweight.to(compute)) * scales.to(compute)).to(dtype)  # [M, N]
    out = x.new_empty(x.shape[0], n, dtype=dtype)  # [M, N]
    for a in range(0, n, rows):
        b = min(a + rows, n)
        out[:, a:b] = F.linear(xc, qweight[a:b].to(compute)) * scales[a:b].to(compute)  # [M, b-a]
    return out


def int8_linear(x: Tensor, qweight: Tensor, scales: Tensor, bias: Tensor | None = None,
                fused: bool | None = None) -> Tensor:
    """``x [..., K]`` times an int8 weight ``[N, K]`` with per-row ``scales [N]`` (+ ``bias [N]``) → ``[..., N]``.

    ``fused=None`` lets ``af3.kernels.policy`` pick the kernel for this device, dtype and row count (see the module
    docstring); ``True`` forces torch's fused kernel (for tests; it must exist), ``False`` forces the fallback.
    """
    n, k = qweight.shape
    if x.shape[-1] != k:
        raise InputError(f"int8 linear expects inputs with {k} features in the last dimension, got "
                         f"{list(x.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if fused is None:
        policy = kernel_policy.current()
        rows, grad = x2.shape[0], x2.requires_grad
        if not grad and policy.own_int8(rows, x2.dtype, x2.device):
            return cpu_kernels.small_gemm(x2, qweight, scales, bias, out_dtype=x2.dtype).reshape(*lead, n)  # [..., N]
        fused = not grad and policy.int8pack(rows, x2.dtype, k, x2.device)
    if fused:
        s = scales if scales.dtype == x2.dtype else scales.to(x2.dtype)
        out = _fused_mm(x2.contiguous(), qweight, s)  # [M, N]
    else:
        out = _dequant_mm(x2, qweight, scales)  # [M, N]
    if bias is not None:
        b = bias.to(out.dtype)
        out = out + b if out.requires_grad else out.add_(b)
    return out.reshape(*lead, n)  # [..., N]


def quantize_weight(weight: Tensor, scale_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: weight [N, K] → (q int8 [N, K], scales [N]) with |q·s − w| ≤ s/2.

    Scales are stored in ``scale_dtype`` (default: bf16 for a bf16 weight, else fp32); q is computed against the
    stored (rounded) scale, which is never below absmax/127, so no value is clipped. Works in row chunks.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise InputError(f"quantize_weight expects a 2-D float weight, got {weight.dtype} {list(weight.shape)}")
    if scale_dtype is None:
        scale_dtype = torch.bfloat16 if weight.dtype == torch.bfloat16 else torch.float32
    n, k = weight.shape
    q = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    advise_huge_pages([q])  # (before it is written: system.py)
    scales = torch.empty(n, dtype=scale_dtype, device=weight.device)
    rows = max(1, QUANT_CHUNK // max(k, 1))
    info = torch.finfo(scale_dtype)
    for a in range(0, n, rows):
        w = weight[a : a + rows].float()  # [r, K]
        absmax = w.abs().amax(dim=1)  # [r]
        exact = (absmax / 127.0).clamp_min(info.tiny)  # [r]
        s = exact.to(scale_dtype)
        # Rounding to the storage dtype may land below absmax/127; there, round up instead (half an eps above
        # rounds to nearest at or above it), so |w / s| ≤ 127 and nothing is clipped.
        s = torch.where(s.float() < exact, (exact * (1 + info.eps / 2)).to(scale_dtype), s)
        q[a : a + rows] = torch.round(w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        scales[a : a + rows] = s
    return q, scales


class Int8Linear(nn.Module):
    """A linear layer with an int8 weight [out, in], per-output-channel scales [out] and an optional bias.

    State-dict keys are ``qweight`` and ``scales`` (never ``weight``), so a quantized state dict cannot be loaded
    strictly into a float model by mistake. ``weight`` is a read-only alias of ``qweight`` (for ``.device``).
    """

    def __init__(self, qweight: Tensor, scales: Tensor, bias: Tensor | None = None):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or tuple(scales.shape) != (qweight.shape[0],):
            raise InputError(f"Int8Linear needs an int8 weight [out, in] and scales [out], got {qweight.dtype} "
                             f"{list(qweight.shape)} and {list(scales.shape)}")
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous())  # [out, in] int8
        self.register_buffer("scales", scales)  # [out]
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, requires_grad=False)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantize ``linear`` (its weight is not modified; the bias Parameter is shared, not copied)."""
        q, scales = quantize_weight(linear.weight.detach())
        return cls(q, scales, linear.bias)

    @property
    def weight(self) -> Tensor:
        """The int8 weight [out, in] (not a float weight: use :meth:`dequantize` for that)."""
        return self.qweight

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weight [out, in] that the int8 values and scales stand for."""
        return (self.qweight.to(torch.float32) * self.scales.to(torch.float32)[:, None]).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        return int8_linear(x, self.qweight, self.scales, self.bias)  # [..., in] → [..., out]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"scales={self.scales.dtype}")


class Int8Embedding(nn.Module):
    """An embedding table stored as int8 [vocab, dim] with one scale per row; lookups return ``dtype`` rows.

    Per-row scales are the same per-output-channel scheme as :class:`Int8Linear` on a [vocab, dim] weight, so a
    tied lm_head shares these buffers (one int8 copy of the table, not two).
    """

    def __init__(self, qweight: Tensor, scales: Tensor, dtype: torch.dtype):
        super().__init__()
        if qweight.dtype != torch.int8 or qweight.dim() != 2 or tuple(scales.shape) != (qweight.shape[0],):
            raise InputError(f"Int8Embedding needs an int8 table [vocab, dim] and scales [vocab], got "
                             f"{qweight.dtype} {list(qweight.shape)} and {list(scales.shape)}")
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.dtype = dtype
        self.register_buffer("qweight", qweight.contiguous())  # [V, D] int8
        self.register_buffer("scales", scales)  # [V]

    @classmethod
    @torch.no_grad()
    def from_embedding(cls, embedding: nn.Embedding) -> Int8Embedding:
        q, scales = quantize_weight(embedding.weight.detach())
        return cls(q, scales, embedding.weight.dtype)

    @property
    def weight(self) -> Tensor:
        """The int8 table [vocab, dim] (for ``.device``; not a float weight)."""
        return self.qweight

    def forward(self, ids: Tensor) -> Tensor:
        rows = F.embedding(ids, self.qweight)  # [..., D] int8
        return rows.to(self.dtype) * self.scales[ids].to(self.dtype).unsqueeze(-1)  # [..., D]

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}"


# ---------------------------------------------------------------------- model-level entry points
def quantize_int8(model: nn.Module, include_lm_head: bool = True, include_embeddings: bool = True) -> nn.Module:
    """Replace every ``nn.Linear`` under ``model.language_model`` with :class:`Int8Linear` (and the token embedding
    table with :class:`Int8Embedding`), in place.

    Layer by layer: each float weight is released as soon as its layer is replaced, so peak memory is the float
    model plus one layer. A tied lm_head and embedding table share one int8 copy. Returns ``model``.
    """
    lm = model.language_model
    names = [name for name, m in lm.named_modules() if isinstance(m, nn.Linear)]
    if not include_lm_head:
        names = [n for n in names if n != "lm_head"]
    tied = lm.config.tie_word_embeddings
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = lm.get_submodule(parent_name) if parent_name else lm
        setattr(parent, child, int8_module(f"{LM_PREFIX}{name}", getattr(parent, child)))
    if include_embeddings:
        head = lm.lm_head
        if tied and isinstance(head, Int8Linear):  # same [V, D] rows, same per-row scales: share the buffers
            emb = Int8Embedding(head.qweight, head.scales, lm.model.embed_tokens.weight.dtype)
        else:
            emb = int8_module(EMBEDDINGS, lm.model.embed_tokens)
        lm.model.embed_tokens = emb
    elif tied and "lm_head" in names:
        log.info("lm_head is tied to the embeddings: its int8 copy adds memory (the embedding table stays)")
    model.eval()
    return model


#: Where the quantized modules live in the AF3 model: the decoder (its linears), and its token embedding table.
LM_PREFIX = "language_model."
EMBEDDINGS = "language_model.model.embed_tokens"


def int8_module(name: str, module: nn.Module) -> nn.Module:
    """The rule of which module becomes what, shared by :func:`quantize_int8` and the load-time transform of
    ``load_pretrained`` (for untied embeddings): a module of the decoder as it will be kept, given its float module
    and its name in the AF3 model."""
    if not name.startswith(LM_PREFIX):
        return module
    if isinstance(module, nn.Linear):
        return Int8Linear.from_linear(module)
    if isinstance(module, nn.Embedding) and name == EMBEDDINGS:
        return Int8Embedding.from_embedding(module)
    return module


def check_mode(mode: str) -> None:
    """Raise :class:`InputError` unless ``mode`` is one of :data:`MODES` (before any weight is loaded)."""
    if mode not in MODES:
        raise InputError(f"unknown quantization mode {mode!r}; choose one of: {', '.join(MODES)}")


def quantize_model(model: nn.Module, mode: str, include_lm_head: bool = True,
                   include_embeddings: bool = True) -> nn.Module:
    """Apply quantization ``mode`` (one of :data:`MODES`) to ``model`` in place; the ``quantize=`` hook."""
    check_mode(mode)
    return quantize_int8(model, include_lm_head=include_lm_head, include_embeddings=include_embeddings)


def is_quantized(model: nn.Module) -> bool:
    """True when any submodule of ``model`` is an :class:`Int8Linear` or :class:`Int8Embedding`."""
    return any(isinstance(m, Int8Linear | Int8Embedding) for m in model.modules())


def check_not_quantized(model: nn.Module, action: str = "save") -> None:
    """Raise :class:`InputError` when ``model`` is quantized (quantized models are for inference only)."""
    if is_quantized(model):
        raise InputError(
            f"cannot {action} an int8-quantized model: quantization is for inference only and the checkpoint "
            "format stores float weights; load the float checkpoint again (without quantize=) and use that"
        )


def tensor_bytes(tensors: Iterable[Tensor]) -> int:
    """Resident bytes of ``tensors``: the sum of their distinct storages (shared storage counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def module_bytes(module: nn.Module) -> int:
    """Resident bytes of the parameters and buffers of ``module``."""
    return tensor_bytes([*module.parameters(), *module.buffers()])


# ---------------------------------------------------------------------- accuracy
_FORWARD_KEYS = ("input_ids", "attention_mask", "input_features", "input_features_mask")


@torch.inference_mode()
def top1_agreement(model_a: nn.Module, model_b: nn.Module, batches: Iterable[Mapping[str, Tensor]]) -> float:
    """Fraction of real token positions (attention_mask == 1) where both models pick the same next token.

    ``batches`` are model inputs (``input_ids`` [B, T], optional ``attention_mask``, ``input_features``,
    ``input_features_mask``; other keys are ignored), text-only or with audio. Teacher-forced: every position
    of every prompt is one next-token prediction.
    """
    agree = total = 0
    for batch in batches:
        inputs = {k: batch[k] for k in _FORWARD_KEYS if batch.get(k) is not None}
        ids = inputs["input_ids"]  # [B, T]
        valid = inputs.get("attention_mask", torch.ones_like(ids)).bool()  # [B, T]
        top_a = model_a(**inputs).logits.argmax(-1)  # [B, T]
        top_b = model_b(**inputs).logits.argmax(-1)  # [B, T]
        agree += int(((top_a == top_b) & valid).sum())
        total += int(valid.sum())
    if total == 0:
        raise InputError("top1_agreement needs at least one real token position")
    return agree / total
