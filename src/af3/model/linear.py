"""``Linear``: ``nn.Linear`` (same parameters and state-dict keys) with faster CPU paths for bf16/fp16 inference.

Which path a product takes is decided by ``af3.kernels.policy`` (the rules and their reasons are written there;
the measurements are in ``benchmarks/README.md`` from ``benchmarks/gemv_bench.py``):

* a half weight on a CPU without native half GEMMs (AVX2): af3's own C kernel (``af3.kernels``), which widens the
  weight in registers for few rows and into fp32 panels a chunk at a time for many;
* many rows on such a CPU where af3's kernel is not usable (no C compiler, ``AF3_CPU_KERNELS=0``):
  :func:`linear_via_fp32`, the weight widened to fp32 a chunk at a time (torch's bf16 GEMM is several times slower
  there than its fp32 one);
* CPUs with native half GEMMs (AVX-512-BF16/AMX): a copy of the weight packed once in oneDNN's layout
  (:func:`packed_weight`), where ``F.linear`` would reorder it at every call;
* few rows on other AVX-512 CPUs: ``W @ x.T`` (``torch.mv`` for one row), which reads the weight faster than
  ``F.linear``;
* everything else, training (autograd), fp32 weights and CUDA: plain ``F.linear``.

The products of bf16 values are exact in fp32, and every path accumulates in fp32 and rounds the result once.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import binding as cpu_kernels
from ..kernels import policy as kernel_policy
from ..kernels.policy import HALF_DTYPES
from ..system import available_memory, physical_memory

#: Largest fp32 piece (elements) of a converted weight, unless that would be fewer than :data:`PIECE_COLS` output
#: channels: a piece the GEMM still finds in the CPU's caches. On a 2-vCPU Zen 3 EPYC, 780 rows through AF3-8B's
#: gate (18944 x 3584) and down (3584 x 18944) projections ran at 114-126 and 113-131 GFLOP/s in pieces of 4M
#: elements and 125-139 and 125-147 in pieces of 1M or 256 channels; 3000 rows through the gate 79 against 110; the
#: mid-size benchmark's and the Whisper-large encoder's shapes within the noise (interleaved, medians of 5).
CONVERT_CHUNK = 1 << 20
#: Fewest output channels of a converted piece (a GEMM over a thin sliver of columns is slow).
PIECE_COLS = 256
#: Largest fp32 block (elements) of the output, computed at a time.
OUTPUT_BLOCK = 1 << 22
#: The row count oneDNN is told to pack a weight for (decode batches); the packed copy serves every row count.
PACK_ROWS = 16
#: Packed copies by module: (the weight's storage, version) they were made from, and the copy (None: no room).
#: Outside the modules, so that deepcopy, pickling and ``state_dict`` never see them.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def pack_reserve() -> int:
    """Memory that packed copies must leave free: an eighth of the RAM, at least 2 GiB (the KV cache, activations
    and the rest of the machine need it more than a faster prefill: a model that fills most of the RAM, such as
    AF3-8B in bf16 on 24 GB, gets copies of only some of its weights, or none)."""
    return max(2 << 30, (physical_memory() or 0) // 8)


def packed_weight(module: nn.Linear) -> Tensor | None:
    """``module``'s weight packed for oneDNN (made on first use, again after the weight changes), or None when the
    machine has no room for a second copy of it."""
    w = module.weight
    key = (w.data_ptr(), w._version)
    got = _PACKED.get(module)
    if got is not None and got[0] == key:
        return got[1]
    free = available_memory(w.device)
    size = w.numel() * w.element_size()
    packed = None
    if free is None or free - size > pack_reserve():
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach(), PACK_ROWS)
        except RuntimeError:  # (a dtype this oneDNN build cannot pack after all: the plain product serves)
            packed = None
    _PACKED[module] = (key, packed)
    return packed


def even_pieces(total: int, most: int) -> int:
    """The size of the fewest equal pieces of ``total`` of at most ``most`` each (at least 1). Equal pieces, not
    full ones and a remainder: a sliver of a GEMM costs far more than its share (AVX2 Zen 3, 780 rows by 896, the
    4864 outputs as 4681 + 183 columns: 87 ms; as 2 x 2432: 57 ms; all at once: 58)."""
    pieces = -(-total // max(1, most))
    return -(-total // pieces)


def fp32_piece(n: int, k: int) -> int:
    """Output channels per piece of an [n, k] weight widened to fp32: equal pieces of at most CONVERT_CHUNK elements,
    never under PIECE_COLS channels (linear_via_fp32 and int8's dequantized product)."""
    return even_pieces(n, max(CONVERT_CHUNK // max(k, 1), PIECE_COLS))


def linear_via_fp32(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` computed in fp32 with the weight converted a chunk of output channels at a time; the result is
    in ``x``'s dtype. x [..., K], weight [N, K] → [..., N]."""
    n, k = weight.shape
    x2 = x.reshape(-1, k).float()  # [M, K]
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    cols = fp32_piece(n, k)
    rows = even_pieces(m, OUTPUT_BLOCK // cols)
    for a in range(0, n, cols):
        b = min(n, a + cols)
        w = weight[a:b].float()  # [n', K]
        bb = None if bias is None else bias[a:b].float()
        for r in range(0, m, rows):
            out[r : r + rows, a:b] = F.linear(x2[r : r + rows], w, bb)  # fp32 [m', n'] → x's dtype
    return out.reshape(*x.shape[:-1], n)


class Linear(nn.Linear):
    """``nn.Linear`` with the faster CPU inference paths of this module (see its docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (x.device.type != "cpu" or w.dtype not in HALF_DTYPES
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return F.linear(x, w, self.bias)
        rows = x.numel() // max(x.shape[-1], 1)
        policy = kernel_policy.current()
        if policy.packed(rows, w.dtype, x.device) and (packed := packed_weight(self)) is not None:
            return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [], "")
        if policy.own_gemm(rows, w.dtype, x.device):
            return cpu_kernels.small_gemm(x, w, bias=self.bias, out_dtype=x.dtype)
        if policy.converts_to_fp32(rows, w.dtype, x.device):
            return linear_via_fp32(x, w, self.bias)
        if not policy.gemv(rows, w.dtype, x.device):
            return F.linear(x, w, self.bias)
        x2 = x.reshape(rows, x.shape[-1])  # [M, K]
        out = torch.mv(w, x2[0])[None] if rows == 1 else torch.mm(w, x2.T).T.contiguous()  # [M, N]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], w.shape[0])
