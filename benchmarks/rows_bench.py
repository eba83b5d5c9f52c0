"""Decoding steps by row count: which CPU path is fastest for a batch of n rows (the measurements behind
``af3.kernels.policy.KERNEL_ROWS`` and ``FUSED_ROWS``).

    python -m benchmarks.rows_bench [--rows 16,32,48,64,96,128,192,256] [--repeats 5] [--int8] [--json PATH]

For each row count, n requests (2 s of audio each) are admitted to one Engine with the mid-size benchmark model and
prefilled; then its decoding steps run with the paths alternating step by step on that same batch, so that every
path sees the same rows, cache lengths and machine state (this VM's memory speed drifts by tens of percent between
runs, so separate runs cannot be compared at this resolution):

* ``fp32``: every product widens its half (or int8) weight to fp32 in pieces and runs torch's fp32 GEMM (the path
  where af3's kernel is not usable; below ``CONVERT_ROWS`` rows that is torch's half GEMM instead);
* ``kernel``: af3's kernel in each module (``fused_decode=off``);
* ``fused``: the whole step in one C call (``fused_decode=always``).

Reported: decode tok/s summed over the rows (n / the median step). On CPUs with native half GEMMs the policy never
widens, and the first two columns are one path (torch's); the script is for CPUs without them (AVX2).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

PATHS = {"fp32": dict(kernel_rows=0, fused_decode="off"), "kernel": dict(fused_decode="off"),
         "fused": dict(fused_decode="always", fused_rows=1 << 30)}
#: With ``--int8`` on CPUs with native half GEMMs: torch's int8 products (dequantized GEMMs, or its fused kernel up
#: to 8 rows) against af3's kernel in each module (int8_rows unbounded) and the fused step.
INT8_PATHS = {"torch": dict(int8_rows=0, fused_decode="off"),
              "kernel": dict(int8_rows=1 << 30, fused_decode="off"),
              "fused": dict(int8_rows=1 << 30, fused_decode="always", fused_rows=1 << 30)}


def step_rates(model, proc, rows: int, repeats: int, paths: dict[str, dict] = PATHS) -> dict[str, float]:
    """tok/s of each path in ``paths`` over decoding steps of ``rows`` rows, alternating step by step."""
    from af3.generation.engine import Engine
    from af3.kernels import policy
    from benchmarks.engine_bench import conversation

    engine = Engine(model, proc, max_batch_size=rows)
    # Rows admitted first decode while later ones prefill: room for that, and a check below that no row ended
    # (the KV cache grows with what is held, not with max_new_tokens).
    tokens = 512
    reqs = [engine.submit(conversation(2.0, 600 + i), max_new_tokens=tokens, min_new_tokens=tokens)
            for i in range(rows)]
    while not all(r.tokens for r in reqs):
        engine.step()
    engine.step()  # (every row decodes from here)
    times: dict[str, list[float]] = {p: [] for p in paths}
    for _ in range(repeats):
        for path, changes in paths.items():
            with policy.override(**changes):
                t = time.perf_counter()
                engine.step()
                times[path].append(time.perf_counter() - t)
    if any(r.done.is_set() for r in reqs):
        raise RuntimeError(f"a request ended before the timed steps did: raise tokens above {tokens}")
    for r in reqs:
        engine.cancel(r)
    return {p: rows / statistics.median(v) for p, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="16,32,48,64,96,128,192,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--int8", action="store_true", help="quantize the decoder's weights to int8 first")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from af3 import AF3Model, AF3Processor
    from af3.kernels import policy
    from af3.system import cpu_description
    from benchmarks.serve_load import serving_checkpoint

    folder = serving_checkpoint()
    proc = AF3Processor.from_pretrained(folder)
    model = AF3Model.from_pretrained(folder, dtype=torch.bfloat16, quantize="int8" if args.int8 else None)
    paths = INT8_PATHS if args.int8 and torch.bfloat16 in policy.current().native_half else PATHS
    out = {"cpu": cpu_description(), "weights": "int8" if args.int8 else "bf16", "rates": {}}
    print(f"{out['cpu']}; {out['weights']} weights; decode tok/s summed over the rows")
    print("| rows | " + " | ".join(paths) + " |\n|---|" + "---|" * len(paths), flush=True)
    for rows in (int(r) for r in args.rows.split(",")):
        rates = out["rates"][rows] = step_rates(model, proc, rows, args.repeats, paths)
        print(f"| {rows} | " + " | ".join(f"{rates[p]:.1f}" for p in paths) + " |", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
