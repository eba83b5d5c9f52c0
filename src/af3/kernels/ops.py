"""Python entry points of af3's prefill-side CPU kernels (``csrc/rowwise.c``, ``csrc/attention.c``): the decoder's
row-wise steps (RMSNorm with the residual add, SiLU * up, rotary), a one-pass argmax, and AMX attention for prefills,
the audio encoder and decoding steps. Each validates its tensors and calls the library that :mod:`.binding` builds
and loads; :mod:`.policy` decides where they run.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from .binding import KINDS, _library

#: Activation dtypes of the row-wise steps (``kernels/csrc/rowwise.c``).
ROWWISE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _rowwise(status: int, what: str) -> None:
    if status != 0:
        raise RuntimeError(f"af3's {what} kernel failed (status {status})")


def _rowwise_lib(*tensors: Tensor) -> ctypes.CDLL:
    lib = _library()
    if lib is None:
        raise RuntimeError("af3's CPU kernels are not available on this machine")
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in ROWWISE_DTYPES:
            raise ValueError(f"af3's row-wise kernels take bf16/fp16/fp32 CPU tensors, got {t.dtype} on {t.device}")
    return lib


def rms_norm(x: Tensor, weight: Tensor, eps: float, residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """``decoder.RMSNorm`` of x [..., D] with ``weight`` [D] → y [..., D]; with ``residual``, first s = x +
    residual (rounded to x's dtype) → (s, y), in one pass over each row."""
    lib = _rowwise_lib(x, weight, *(() if residual is None else (residual,)))
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"rms_norm: weight {list(weight.shape)} for {d} features")
    x2 = x.detach().reshape(-1, d).contiguous()  # [M, D]
    y = torch.empty_like(x2)
    s = r2 = None
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(f"rms_norm: residual {residual.dtype} {list(residual.shape)} for x {x.dtype} "
                             f"{list(x.shape)}")
        r2 = residual.detach().reshape(-1, d).contiguous()
        s = torch.empty_like(x2)
    w = weight.detach().contiguous()
    _rowwise(lib.af3_rms_norm(x2.data_ptr(), None if r2 is None else r2.data_ptr(),
                              None if s is None else s.data_ptr(), y.data_ptr(), w.data_ptr(), x2.shape[0], d, d,
                              KINDS[x2.dtype], KINDS[w.dtype], eps, torch.get_num_threads()), "rms_norm")
    y = y.reshape(x.shape)
    return y if s is None else (s.reshape(x.shape), y)


def argmax_rows(x: Tensor) -> list[int]:
    """``x.argmax(-1).tolist()`` for x [rows, n] (bf16, fp16 or fp32 on the CPU, rows may be strided): one pass per
    row, without widening the values first (torch's argmax of [8, 151936] took ~1 ms, and its fp32 copy another)."""
    lib = _rowwise_lib(x)
    if x.dim() != 2 or x.stride(1) != 1 or x.shape[1] < 1:
        raise ValueError(f"argmax_rows: x must be [rows, n] with contiguous rows, got {list(x.shape)} {x.stride()}")
    out = torch.empty(x.shape[0], dtype=torch.int64)
    _rowwise(lib.af3_argmax(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), KINDS[x.dtype], out.data_ptr(),
                            torch.get_num_threads()), "argmax")
    return out.tolist()


def silu_mul_(gate: Tensor, up: Tensor) -> Tensor:
    """gate = silu(gate) * up in place (each result rounded as torch's two ops round it); returns gate."""
    lib = _rowwise_lib(gate, up)
    if gate.shape != up.shape or gate.dtype != up.dtype or not gate.is_contiguous():
        raise ValueError(f"silu_mul_: gate {gate.dtype} {list(gate.shape)} (contiguous) and up "
                         f"{up.dtype} {list(up.shape)} must match")
    u = up.contiguous()
    _rowwise(lib.af3_silu_mul(gate.data_ptr(), u.data_ptr(), gate.numel(), KINDS[gate.dtype],
                              torch.get_num_threads()), "silu_mul")
    return gate


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``decoder.apply_rotary`` for x [B, T, H, Dh] (heads contiguous; rows may be strided), cos/sin [B, T, Dh]
    → a new contiguous [B, T, H, Dh]. Dh must be a multiple of 16."""
    lib = _rowwise_lib(x, cos, sin)
    b, t, h, dh = x.shape
    if cos.shape != (b, t, dh) or sin.shape != cos.shape or cos.dtype != x.dtype or sin.dtype != x.dtype:
        raise ValueError(f"rotary: cos/sin {cos.dtype} {list(cos.shape)} for x {x.dtype} {list(x.shape)}")
    if dh % 16:
        raise ValueError(f"rotary: head size {dh} is not a multiple of 16")
    if x.stride(3) != 1 or x.stride(2) != dh or x.stride(0) != t * x.stride(1):
        x = x.contiguous()
    c, s = cos.contiguous(), sin.contiguous()
    y = torch.empty(b, t, h, dh, dtype=x.dtype)
    _rowwise(lib.af3_rotary(x.data_ptr(), x.stride(1), y.data_ptr(), c.data_ptr(), s.data_ptr(), b * t, h, dh,
                            KINDS[x.dtype], torch.get_num_threads()), "rotary")
    return y


# ------------------------------------------------------------------------------------------------ attention
def amx_attention_available() -> bool:
    """af3's tile attention for prefills (``kernels/csrc/attention.c``) is built: a CPU with AMX-BF16 and AVX-512,
    or with AVX512-BF16 alone (the tiles emulated with pair dot products, ``amx_emul.h``)."""
    lib = _library()
    return lib is not None and lib.af3_attention_level() > 0


def amx_tiles_native() -> bool:
    """af3's tile kernels run on real AMX tiles (a CPU with AMX-BF16), not on tiles emulated with AVX512-BF16."""
    lib = _library()
    return lib is not None and lib.af3_attention_level() == 1


def _strides(t: Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * 3)(t.stride(0), t.stride(1), t.stride(2))


def attention(q: Tensor, k: Tensor, v: Tensor, *, scale: float | None = None, causal: bool = False, q_start: int = 0,
              kv_len: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """``softmax(scale * q k^T + mask) v`` with AMX tiles: q [B, H, T, Dh], k and v [B, G, S, Dh] bf16 (any batch,
    head and position strides; Dh contiguous, a multiple of 64 up to 256; head h reads kv head h // (H / G));
    ``causal``: query i sits at position ``q_start + i`` and sees keys up to it; ``kv_len`` [B] int64: valid keys
    per batch row (the rest is padding). Returns [B, H, T, Dh] (``out`` if given: a view with Dh contiguous).
    Requires :func:`amx_attention_available`."""
    lib = _library()
    if lib is None or lib.af3_attention_level() < 1:
        raise RuntimeError("af3's AMX attention is not available on this machine")
    b, h, t, dh = q.shape
    g, s = k.shape[1], k.shape[2]
    if (any(x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.stride(3) != 1 for x in (q, k, v))
            or k.shape != (b, g, s, dh) or v.shape != k.shape or h % g or dh % 64 or dh > 256):
        raise ValueError(f"attention: q {q.dtype} {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not fit "
                         "(bf16 on the CPU, Dh contiguous and a multiple of 64 up to 256, H a multiple of G)")
    if out is None:
        out = torch.empty(b, t, h, dh, dtype=q.dtype).transpose(1, 2)  # [B, H, T, Dh] over a [B, T, H, Dh] buffer
    lengths = None
    if kv_len is not None:
        lengths = kv_len.to(torch.int64).contiguous()
        if lengths.shape != (b,):
            raise ValueError(f"attention: kv_len {list(lengths.shape)} for batch {b}")
    status = lib.af3_attention(q.data_ptr(), _strides(q), k.data_ptr(), _strides(k), v.data_ptr(), _strides(v),
                               out.data_ptr(), _strides(out), b, h, g, t, s, dh,
                               None if lengths is None else lengths.data_ptr(), int(causal), q_start,
                               dh**-0.5 if scale is None else scale, torch.get_num_threads())
    _rowwise(status, "attention")
    return out


def decode_attention(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor, *, scale: float | None = None,
                     amx: bool = True) -> Tensor:
    """One query per row and head over its cached keys: q [B, H, 1, Dh], k and v [B, G, S, Dh] bf16 or fp16 (views of
    a cache: any batch, head and slot strides, the same slot stride for both, Dh contiguous, a multiple of 8), kv_len
    [B] int64: each row's valid keys, a prefix (1 to S) → [B, H, 1, Dh]. bf16 runs af3's AMX kernel where
    :func:`amx_attention_available` (Dh a multiple of 32 up to 256, H / G at most 16) and ``amx`` allows it,
    anything else the fused decoding step's attention (``kernels/csrc/decode_step.c``). Requires the kernels
    (``binding.available``)."""
    lib = _library()
    if lib is None:
        raise RuntimeError("af3's CPU kernels are not available on this machine")
    b, h, t, dh = q.shape
    g, s = k.shape[1], k.shape[2]
    if (t != 1 or q.dtype not in (torch.bfloat16, torch.float16)
            or any(x.dtype != q.dtype or x.device.type != "cpu" or x.stride(3) != 1 for x in (q, k, v))
            or k.shape != (b, g, s, dh) or v.shape != k.shape or k.stride(2) != v.stride(2) or h % g or dh % 8
            or kv_len.shape != (b,)):
        raise ValueError(f"decode_attention: q {q.dtype} {list(q.shape)}, k {list(k.shape)}, kv_len "
                         f"{list(kv_len.shape)} do not fit")
    lengths = kv_len.to(torch.int64).contiguous()
    out = torch.empty(b, h, 1, dh, dtype=q.dtype)
    qs = (ctypes.c_int64 * 2)(q.stride(0), q.stride(1))
    os_ = (ctypes.c_int64 * 2)(out.stride(0), out.stride(1))
    status = lib.af3_decode_attention_any(q.data_ptr(), qs, k.data_ptr(), _strides(k), v.data_ptr(), _strides(v),
                                          out.data_ptr(), os_, b, h, g, s, dh, lengths.data_ptr(), KINDS[q.dtype],
                                          int(amx), dh**-0.5 if scale is None else scale, torch.get_num_threads())
    _rowwise(status, "decode attention")
    return out
