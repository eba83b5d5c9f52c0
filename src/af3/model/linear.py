"""``Linear``: ``nn.Linear`` (same parameters and state-dict keys) with faster CPU paths for bf16/fp16 inference.

Two shapes of half-precision product are slow in torch's CPU kernels, each on some CPUs (``benchmarks/gemv_bench.py``;
tables in ``benchmarks/README.md``):

* Decoding (1 to :data:`SMALL_ROWS` rows) on AVX-512 CPUs: ``F.linear`` (``x @ W.T``) reads the weight at up to half
  the bandwidth that ``W @ x.T`` (``torch.mv`` for one row) reaches, and decoding is bound by reading the weights.
  On AVX2-only CPUs that path is 0.72-0.99x as fast, so there it is off (:data:`GEMV_ROWS`).
* CPUs without native bf16/fp16 matrix instructions (AVX2; oneDNN reports no bf16 support), :data:`CONVERT_DTYPES`:
  with many rows (prefill, the audio encoder) ``F.linear`` in bf16 runs at 12-20 GFLOPS on 2 AVX2 cores, the fp32
  GEMM at 34-132, so from :data:`CONVERT_ROWS` rows the weight is converted to fp32 a chunk at a time and multiplied
  in fp32. With fewer rows (decoding) ``F.linear`` reads the weight at 1.4-2.3 GB/s with 8 rows, and af3's own
  kernel (:mod:`.cpu_kernels`) widens each weight vector to fp32 in registers instead, when it could be built.
  The products of bf16 values are exact in fp32, and every way accumulates in fp32 and rounds the result once.

Training (autograd), fp32 weights and CUDA always take plain ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..kernels import binding as cpu_kernels

#: Up to this many rows, CPU bf16/fp16 linears can run as ``W @ x.T`` (a GEMV-shaped product).
SMALL_ROWS = 8
#: Rows up to which :class:`Linear` takes that path on this machine (AVX-512 only, see the module docstring).
GEMV_ROWS = SMALL_ROWS if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 0
#: From this many rows, half-precision weights without a native CPU kernel are multiplied in fp32.
CONVERT_ROWS = 32
#: Largest fp32 piece (elements) of a converted weight, and of a block of its output.
CONVERT_CHUNK = 1 << 22


def _without_native_kernel() -> frozenset[torch.dtype]:
    """Half dtypes whose CPU matrix products oneDNN cannot run natively here (e.g. bf16 and fp16 on AVX2)."""
    slow = set()
    for dtype, probe in ((torch.bfloat16, "_is_mkldnn_bf16_supported"), (torch.float16, "_is_mkldnn_fp16_supported")):
        try:
            if not getattr(torch.ops.mkldnn, probe)():
                slow.add(dtype)
        except (AttributeError, RuntimeError):  # this torch cannot tell: keep F.linear
            pass
    return frozenset(slow)


#: Weight dtypes that take the fp32 path from :data:`CONVERT_ROWS` rows on this machine.
CONVERT_DTYPES = _without_native_kernel()


def linear_via_fp32(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` computed in fp32 with the weight converted a chunk of output channels at a time; the result is
    in ``x``'s dtype. x [..., K], weight [N, K] → [..., N]."""
    n, k = weight.shape
    x2 = x.reshape(-1, k).float()  # [M, K]
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    cols = max(1, CONVERT_CHUNK // k)
    for a in range(0, n, cols):
        b = min(n, a + cols)
        w = weight[a:b].float()  # [n', K]
        bb = None if bias is None else bias[a:b].float()
        rows = max(1, CONVERT_CHUNK // (b - a))
        for r in range(0, m, rows):
            out[r : r + rows, a:b] = F.linear(x2[r : r + rows], w, bb)  # fp32 [m', n'] → x's dtype
    return out.reshape(*x.shape[:-1], n)


#: The half-precision dtypes af3's CPU kernels take as activations.
HALF_DTYPES = frozenset({torch.bfloat16, torch.float16})


def own_kernel_takes(rows: int, dtype: torch.dtype, device: torch.device,
                     dtypes: frozenset[torch.dtype] | None = None) -> bool:
    """Whether a product of ``rows`` rows with ``dtype`` operands goes through af3's CPU kernel: few rows, on a CPU
    where oneDNN has no native kernel for the dtype (or ``dtype`` in ``dtypes``, when given), with the kernel built
    (``benchmarks/gemv_bench.py``)."""
    return (device.type == "cpu" and rows < CONVERT_ROWS and dtype in (CONVERT_DTYPES if dtypes is None else dtypes)
            and cpu_kernels.available())


class Linear(nn.Linear):
    """``nn.Linear`` with the faster CPU inference paths of this module (see its docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight
        if (x.device.type != "cpu" or w.dtype not in HALF_DTYPES
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return F.linear(x, w, self.bias)
        rows = x.numel() // max(x.shape[-1], 1)
        if rows >= CONVERT_ROWS and w.dtype in CONVERT_DTYPES:
            return linear_via_fp32(x, w, self.bias)
        if own_kernel_takes(rows, w.dtype, x.device):
            return cpu_kernels.small_gemm(x, w, bias=self.bias, out_dtype=x.dtype)
        if rows > GEMV_ROWS:
            return F.linear(x, w, self.bias)
        x2 = x.reshape(rows, x.shape[-1])  # [M, K]
        out = torch.mv(w, x2[0])[None] if rows == 1 else torch.mm(w, x2.T).T.contiguous()  # [M, N]
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], w.shape[0])
