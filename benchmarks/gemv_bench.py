"""bf16 linears on CPU: ``F.linear`` against af3's ``Linear`` paths. Decode-shaped (1-8 rows): ``W @ x.T`` /
``torch.mv``; prefill-shaped (32-512 rows): the weight converted to fp32 in chunks and multiplied in fp32; and, where
it could be built, af3's own CPU kernel (1-31 rows, bf16 and int8 weights) against torch's kernels.

Shapes are the mid-size benchmark model's (Qwen2.5-0.5B decoder: hidden 896, ffn 4864, vocab 151936). The GEMV path
and the fp32 path are forced on here whatever the CPU; ``af3.kernels.policy`` decides where the model takes them.

    python -m benchmarks.gemv_bench [--threads 2] [--repeats 30] [--only int8]

``--only int8`` measures the int8 crossover alone (``af3.kernels.policy.KernelPolicy.own_int8``): af3's kernel,
torch's fused ``_weight_int8pack_mm`` and the dequantized product, each over distinct copies of a weight (512 MB in
all, past any L3) so that every call reads its weight from memory, as a decoding step does.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch
import torch.nn.functional as F

from af3.kernels import binding as cpu_kernels
from af3.kernels import policy as kernel_policy
from af3.kernels.policy import SMALL_ROWS
from af3.model import linear, quantize
from af3.model.linear import Linear

SHAPES = {"q/k/v (1152x896)": (1152, 896), "mlp up (4864x896)": (4864, 896), "mlp down (896x4864)": (896, 4864),
          "lm_head (151936x896)": (151936, 896)}


def seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--only", choices=("int8",), help="only the int8 crossover table")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.only == "int8":
        int8_crossover()
        return
    # Measure the W @ x.T path itself, also where the model leaves it off; never af3's kernel in this table.
    kernel_policy.set_policy(dataclasses.replace(kernel_policy.current(), gemv_rows=SMALL_ROWS,
                                                 native_half=kernel_policy.HALF_DTYPES))
    print(f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads\n")
    print("| weight | rows | F.linear GB/s | W @ x.T path GB/s | speed-up |\n|---|---|---|---|---|")
    with torch.inference_mode():
        for name, (n, k) in SHAPES.items():
            layer = Linear(k, n, bias=False).to(torch.bfloat16)
            gb = layer.weight.numel() * 2 / 1e9
            for rows in (1, 4, 8):
                x = torch.randn(rows, k, dtype=torch.bfloat16)
                base = seconds(lambda x=x, w=layer.weight: F.linear(x, w), args.repeats)
                ours = seconds(lambda x=x, layer=layer: layer(x), args.repeats)
                print(f"| {name} | {rows} | {gb / base:.1f} | {gb / ours:.1f} | {base / ours:.2f}x |")
    print("\n| weight | rows | F.linear GFLOPS | fp32 path GFLOPS | speed-up |\n|---|---|---|---|---|")
    with torch.inference_mode():
        for name, (n, k) in SHAPES.items():
            if n * k > 10_000_000:  # lm_head: prefill runs it on the last position only
                continue
            w = torch.randn(n, k).to(torch.bfloat16)
            for rows in (32, 64, 512):
                x = torch.randn(rows, k, dtype=torch.bfloat16)
                flop = 2 * rows * n * k / 1e9
                repeats = max(3, args.repeats // 4)
                base = seconds(lambda x=x, w=w: F.linear(x, w), repeats)
                ours = seconds(lambda x=x, w=w: linear.linear_via_fp32(x, w), repeats)
                print(f"| {name} | {rows} | {flop / base:.1f} | {flop / ours:.1f} | {base / ours:.2f}x |")
    if not cpu_kernels.available():
        print("\naf3's CPU kernel is not available here (see af3/kernels/binding.py); its table is skipped")
        return
    print("\n| weight | rows | bf16 F.linear GB/s | af3 kernel bf16 GB/s | speed-up | int8 torch GB/s | "
          "af3 kernel int8 GB/s | speed-up |\n|---|---|---|---|---|---|---|---|")
    with torch.inference_mode():
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k).to(torch.bfloat16)
            q, scales = quantize.quantize_weight(w)
            for rows in (1, 2, 4, 8, 16, 31):
                x = torch.randn(rows, k, dtype=torch.bfloat16)
                repeats = args.repeats if n * k < 10_000_000 else max(3, args.repeats // 4)
                base = seconds(lambda x=x, w=w: F.linear(x, w), repeats)
                ours = seconds(lambda x=x, w=w: cpu_kernels.small_gemm(x, w, out_dtype=x.dtype), repeats)
                # int8 as quantize.int8_linear ran it before this kernel: the fused op up to 8 rows, else the fallback
                fused = rows <= kernel_policy.current().int8pack_rows
                qbase = seconds(lambda x=x, q=q, s=scales, fused=fused: quantize.int8_linear(x, q, s, fused=fused),
                                repeats)
                qours = seconds(lambda x=x, q=q, s=scales: cpu_kernels.small_gemm(x, q, s, out_dtype=x.dtype), repeats)
                gb, qgb = w.numel() * 2 / 1e9, q.numel() / 1e9
                print(f"| {name} | {rows} | {gb / base:.1f} | {gb / ours:.1f} | {base / ours:.2f}x "
                      f"| {qgb / qbase:.1f} | {qgb / qours:.1f} | {qbase / qours:.2f}x |")


#: Bytes of distinct weight copies each int8 crossover timing streams through (past the L3 of the machines we use).
STREAM_BYTES = 512 << 20


@torch.inference_mode()
def int8_crossover(rows_list=(1, 2, 4, 8, 16)) -> None:
    """ms per product of int8 weights read from memory: af3's kernel, torch's fused op, and the dequantized product."""
    if not cpu_kernels.available():
        print("af3's CPU kernel is not available here; the int8 crossover needs it")
        return
    print(f"torch CPU capability {torch.backends.cpu.get_cpu_capability()}; int8 weights streamed from memory\n")
    print("| weight | rows | af3 kernel ms | GB/s | int8pack ms | dequantized ms |\n|---|---|---|---|---|---|")
    for name, (n, k) in SHAPES.items():
        copies = max(2, STREAM_BYTES // (n * k))
        weights = [quantize.quantize_weight(torch.randn(n, k).to(torch.bfloat16)) for _ in range(copies)]
        for rows in rows_list:
            x = torch.randn(rows, k, dtype=torch.bfloat16)
            paths = {"af3": lambda q, s, x=x: cpu_kernels.small_gemm(x, q, s, out_dtype=x.dtype),
                     "int8pack": lambda q, s, x=x: torch.ops.aten._weight_int8pack_mm(x, q, s),
                     "dequant": lambda q, s, x=x: quantize.int8_linear(x, q, s, fused=False)}
            ms = {}
            for path, fn in paths.items():
                def every(fn=fn, weights=weights):
                    for q, s in weights:
                        fn(q, s)
                ms[path] = seconds(every, 3) / copies * 1e3
            print(f"| {name} | {rows} | {ms['af3']:.3f} | {n * k / ms['af3'] / 1e6:.1f} | {ms['int8pack']:.3f} "
                  f"| {ms['dequant']:.3f} |")


if __name__ == "__main__":
    main()
