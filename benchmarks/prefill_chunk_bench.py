"""What a prefill chunk size costs while other rows decode: the measurement behind ``core.PREFILL_CHUNK``.

    python -m benchmarks.prefill_chunk_bench [--riders 15] [--chunks 2048,512] [--tokens 2] [--pairs 8]

``--riders`` requests of 30 s of audio are decoding in one Engine. Then, ``--pairs`` times and for each chunk size
in turn (interleaved, so the VM's drift falls on both), a fresh 30 s request is admitted: its prompt (~800 tokens)
is prefilled in chunks of at most that size, each chunk carrying one token of every riding row, and the riding rows
then take decoding steps of their own until they have made ``--tokens`` tokens since the admission. The time of
those forwards (``ModelRunner.prefill_mixed`` and ``decode``; the encoder is left out) is the cost of the same work
(one prompt prefilled, ``--tokens`` tokens for every riding row) done both ways. With 800-token prompts, 512 and
``--tokens 2`` compare two 400-token forwards with one 800-token forward and a decoding step.
"""

from __future__ import annotations

import argparse
import statistics
import time

from af3.generation import core as core_mod
from af3.generation.engine import Engine, GenerationOptions
from af3.system import cpu_description
from benchmarks.engine_bench import conversation
from benchmarks.serve_load import serving_checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--riders", type=int, default=15)
    ap.add_argument("--chunks", default="2048,512")
    ap.add_argument("--tokens", type=int, default=2, help="tokens each riding row makes per admitted prompt")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--checkpoint", default=None, help="default: the serving checkpoint of serve_load (built once)")
    args = ap.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    engine = Engine.from_pretrained(str(args.checkpoint or serving_checkpoint()), max_batch_size=args.riders + 1)
    long = GenerationOptions(max_new_tokens=4000, min_new_tokens=4000, temperature=0.0)
    for i in range(args.riders):
        engine.submit(conversation(30.0, i), long)
    for _ in range(args.riders + 2):
        engine.step()
    runner = engine.core.runner
    spent = [0.0]

    def timed(f):
        def call(*a, **k):
            t = time.perf_counter()
            out = f(*a, **k)
            spent[0] += time.perf_counter() - t
            return out
        return call

    runner.prefill_mixed, runner.decode = timed(runner.prefill_mixed), timed(runner.decode)
    costs: dict[int, list[float]] = {c: [] for c in chunks}
    for k in range(args.pairs):
        for c in chunks:
            core_mod.PREFILL_CHUNK = c
            spent[0] = 0.0
            req = engine.submit(conversation(30.0, 1000 + 10 * k + c), GenerationOptions(max_new_tokens=4000))
            before = engine.stats["mixed_steps"]
            engine.step()  # the encoder, then the prompt in chunks with the rows riding
            for _ in range(args.tokens - (engine.stats["mixed_steps"] - before)):
                engine.step()  # decoding steps of their own, up to --tokens tokens per riding row
            costs[c].append(spent[0])
            engine.cancel(req)
            engine.step()  # (frees the row; not timed)
    print(f"{cpu_description()}; bf16; {args.riders} rows riding, {args.tokens} tokens each per admitted 30 s prompt")
    for c, v in costs.items():
        print(f"chunk {c}: median {statistics.median(v) * 1e3:.0f} ms  ({', '.join(f'{x * 1e3:.0f}' for x in v)})")
    base = costs[chunks[0]]
    for c in chunks[1:]:
        ratios = sorted(b / a for a, b in zip(base, costs[c], strict=True))
        print(f"chunk {c} / chunk {chunks[0]}, per pair: median {statistics.median(ratios):.3f} "
              f"({', '.join(f'{r:.3f}' for r in ratios)})")
    engine.close()


if __name__ == "__main__":
    main()
