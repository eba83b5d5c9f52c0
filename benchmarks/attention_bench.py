"""af3's AMX attention (``kernels/csrc/attention.c``) against torch's SDPA, on the shapes the models give it.

    python -m benchmarks.attention_bench [--reps 10] [--against OLD.c]

Shapes: the benchmark model's decoder prefill of 30 s of audio (14 heads over 2 key/value heads, 800 causal
positions) and of 5 minutes (4000), its encoder window (8 heads, 1500 positions, no mask), and AF3-8B's decoder
(28 over 4 heads of 128) and encoder (20 heads of 64). ``--against`` builds another version of ``attention.c`` (for
example the previous commit's, ``git show REV:src/af3/kernels/csrc/attention.c > old.c``) with the same flags and
headers and times it in the same loop, the versions alternating. Times are the minimum over the repetitions of one
call, in ms, on this machine's threads; the table names the CPU. Needs a CPU with AMX-BF16.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from af3.kernels import binding
from af3.kernels import ops as kernel_ops
from af3.system import cpu_description

SHAPES = [  # label, heads, kv heads, positions, head size, causal
    ("benchmark decoder, 30 s prefill", 14, 2, 800, 64, True),
    ("benchmark encoder, one window", 8, 8, 1500, 64, False),
    ("benchmark decoder, 5 min prefill", 14, 2, 4000, 64, True),
    ("AF3-8B decoder, 30 s prefill", 28, 4, 800, 128, True),
    ("AF3-8B encoder, one window", 20, 20, 1500, 64, False),
]


def build(source: Path) -> ctypes.CDLL:
    """``source`` compiled as af3's kernels are (flags, compiler, the csrc headers), alone."""
    out = Path(tempfile.mkdtemp()) / "attention_alt.so"
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or "cc"
    subprocess.run([*shlex.split(compiler), *binding.FLAGS, f"-I{binding.KERNELS}", "-o", str(out), str(source)],
                   check=True, timeout=300)
    return ctypes.CDLL(str(out))


def call_library(lib: ctypes.CDLL, q, k, v, causal: bool) -> torch.Tensor:
    b, h, t, dh = q.shape
    out = torch.empty(b, h, t, dh, dtype=torch.bfloat16)

    def strides(x):
        return (ctypes.c_int64 * 3)(x.stride(0), x.stride(1), x.stride(2))

    i64 = ctypes.c_int64
    status = lib.af3_attention(ctypes.c_void_p(q.data_ptr()), strides(q), ctypes.c_void_p(k.data_ptr()), strides(k),
                               ctypes.c_void_p(v.data_ptr()), strides(v), ctypes.c_void_p(out.data_ptr()),
                               strides(out), i64(b), i64(h), i64(k.shape[1]), i64(t), i64(k.shape[2]), i64(dh), None,
                               ctypes.c_int(int(causal)), i64(0), ctypes.c_float(dh**-0.5),
                               ctypes.c_int(torch.get_num_threads()))
    if status != 0:
        raise RuntimeError(f"the other attention.c returned {status}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--against", type=Path, help="another attention.c to time in the same loop")
    args = parser.parse_args()
    if not kernel_ops.amx_attention_available():
        raise SystemExit("af3's AMX attention needs a CPU with AMX-BF16 and AVX-512 (and a C compiler)")
    other = build(args.against) if args.against else None
    print(f"CPU: {cpu_description()}, {torch.get_num_threads()} threads, bf16, minimum of {args.reps} calls, ms\n")
    head = "| shape | SDPA | af3 |" + (" --against |" if other else "") + " af3 vs SDPA |" + (
        " af3 vs --against |" if other else "")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for label, h, g, t, dh, causal in SHAPES:
            best = time_shape(h, g, t, dh, causal, other, args.reps, gen)
            row = f"| {label} ({h}/{g} heads of {dh}, {t}{' causal' if causal else ''}) | {best['sdpa']:.2f} | " \
                  f"{best['af3']:.2f} |"
            if other is not None:
                row += f" {best['other']:.2f} |"
            row += f" {best['sdpa'] / best['af3']:.2f}x |"
            if other is not None:
                row += f" {best['other'] / best['af3']:.2f}x |"
            print(row, flush=True)


def time_shape(h: int, g: int, t: int, dh: int, causal: bool, other: ctypes.CDLL | None, reps: int,
               gen: torch.Generator) -> dict[str, float]:
    """The minimum ms of one call of each way, the ways alternating call by call."""
    q = torch.randn(1, h, t, dh, generator=gen).bfloat16()
    k, v = (torch.randn(1, g, t, dh, generator=gen).bfloat16() for _ in range(2))
    ways = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=h != g),
            "af3": lambda: kernel_ops.attention(q, k, v, causal=causal)}
    if other is not None:
        ways["other"] = lambda: call_library(other, q, k, v, causal)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(max(1, reps)):
        for name, fn in ways.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(ts) * 1e3 for name, ts in times.items()}

if __name__ == "__main__":
    main()
