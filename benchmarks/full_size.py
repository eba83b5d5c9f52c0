"""What AF3-8B costs on this CPU: a random AF3 of the real shapes, measured with af3 (int8, bf16) and transformers.

    python -m benchmarks.full_size [--tokens 16] [--only af3-int8,af3-bf16,hf-bf16] [--json PATH]

The checkpoint has AF3's shapes (Qwen2.5-7B decoder: 3584 wide, ffn 18944, 28 layers, 28/4 heads, vocab 151672;
Whisper-large encoder: 1280 wide, 32 layers, 20 heads; the 2-layer projector) and random bf16 weights (normal, std
0.02; norms 1, biases 0). It is built once in ``~/.cache/af3/bench-af3-full`` (16.6 GB on disk) by af3's own
checkpoint writer from a source that makes each tensor when its shard is written, so no more than one shard (2 GB)
is ever in memory. Its tokenizer is the small benchmark BPE given an ordinary token for every id (as in
``serve_load``), so that whatever a random model emits can be decoded.

Each system runs in its own process, one after the other, only where ``MemAvailable`` has room for its weights:

* **decode tok/s** at batch 1 and 4 (``--rows``), summed over the batch, ``--tokens`` new tokens after 1 s of
  audio per request, timed from the step where every request has its first tokens (af3:
  ``engine_bench.engine_decode``; transformers: ``generate`` with a clock in its stopping criteria); batch 1's rate
  also as a share of the roofline (bandwidth ÷ decoder bytes read per token; the best of an fp32 sum, a copy and
  an fp32 GEMV, probed before the runs) and, for af3, of the bandwidth read just before and after each run
  (``engine_bench.bracketed_share``);
* **encoder s per 30 s window** (the audio tower alone on one window, best of 2 after a warm-up);
* **load s** and **peak RSS** (the process's VmHWM, weights included) and the weight bytes.

A child reports after each measurement; one stopped at ``--timeout`` keeps what it measured before (marked as
stopped in the table: on an AVX2 CPU transformers' load and encoder, without its decoding rates).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import torch

from af3.system import cpu_description
from benchmarks.engine_bench import (bandwidth_checks, bandwidth_gbs, bracketed_share, conversation, engine_decode,
                                     hf_decode)

CACHE = Path(os.environ.get("AF3_CACHE", Path.home() / ".cache" / "af3")) / "bench-af3-full"
SHARD_BYTES = 2 * 1024**3
AUDIO_S = 1.0  # the decode prompts' audio (one 30 s encoder window each, like any clip up to 30 s)


def full_config():
    from af3.config import AF3Config, EncoderConfig, GenerationConfig, TextConfig

    config = AF3Config(
        audio_config=EncoderConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=20,
                                   intermediate_size=5120),
        text_config=TextConfig(vocab_size=151672, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                               num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
                               bos_token_id=0, eos_token_id=2, pad_token_id=0),
        audio_token_id=3,
    )
    return config, GenerationConfig(eos_token_id=2, pad_token_id=0, bos_token_id=0)


def build_checkpoint(folder: Path = CACHE) -> Path:
    """The random full-size checkpoint, built once (see the module docstring)."""
    if (folder / ".complete").is_file():
        return folder
    from af3.model import AF3Model
    from af3.model.tensor_files import TensorSource
    from af3.model.weights import write_checkpoint
    from benchmarks.serve_load import write_decodable_tokenizer

    config, gen = full_config()
    with torch.device("meta"):
        skeleton = AF3Model(config, gen).to(torch.bfloat16)
    shapes = {name: tuple(t.shape) for name, t in skeleton.state_dict().items()}

    class RandomSource(TensorSource):
        """Each tensor made when asked for, from a seed of its name: the writer holds one shard at a time."""

        check_finite = False

        def __init__(self):
            super().__init__([])
            self._where = {name: (None, name) for name in shapes}

        def get(self, name: str) -> torch.Tensor:
            shape = shapes[name]
            if name.endswith("norm.weight") or "layer_norm.weight" in name or name.endswith("layernorm.weight"):
                return torch.ones(shape, dtype=torch.bfloat16)
            if name.endswith(".bias"):
                return torch.zeros(shape, dtype=torch.bfloat16)
            g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            return (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)

        def shape_and_dtype(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
            return shapes[name], torch.bfloat16

    write_checkpoint(folder, RandomSource(), skeleton, max_shard_bytes=SHARD_BYTES)
    write_decodable_tokenizer(folder, config.text_config.vocab_size)
    (folder / ".complete").write_text("done")
    return folder


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def _proc_kib(path: str, field: str) -> int:
    """A ``field: N kB`` line of a /proc file, in bytes (0 where it is missing)."""
    with open(path) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def mem_available() -> int:
    return _proc_kib("/proc/meminfo", "MemAvailable")


def vm_hwm() -> int:
    return _proc_kib("/proc/self/status", "VmHWM")


def report(out: dict) -> None:
    """A child's results so far, as one JSON line: the parent keeps the last one, also from a child it had to stop
    at ``--timeout`` (transformers on a CPU without native bf16 GEMMs still gives its load and encoder times)."""
    print(json.dumps({**out, "peak_rss": vm_hwm()}), flush=True)


# ------------------------------------------------------------------------------------------ children
def child_af3(folder: Path, mode: str, tokens: int, rows_list: list[int]) -> dict:
    from af3 import AF3Model, AF3Processor
    from af3.generation.engine import Engine
    from benchmarks.engine_bench import decoder_bytes

    t = time.perf_counter()
    model = AF3Model.from_pretrained(folder, dtype=torch.bfloat16, quantize="int8" if mode == "int8" else None)
    load_s = time.perf_counter() - t
    proc = AF3Processor.from_pretrained(folder)
    out = {"load_s": load_s, "rss_after_load": vm_hwm(), "decoder_bytes": decoder_bytes(model)}
    batch = proc.apply_chat_template([conversation(30.0, 1)], tokenize=True, add_generation_prompt=True,
                                     return_dict=True)
    feats, mask = batch["input_features"].to(torch.bfloat16), batch["input_features_mask"]
    report(out)
    with torch.inference_mode():
        out["encoder_s"] = _best(lambda: model.audio_tower(feats, mask))
    report(out)
    for rows in rows_list:
        convs = [conversation(AUDIO_S, 10 * rows + i) for i in range(rows)]
        engine_decode(Engine(model, proc, max_batch_size=rows), convs, 4)  # warm-up (packs, plans, caches)
        def one(rows=rows, convs=convs):
            return engine_decode(Engine(model, proc, max_batch_size=rows), convs, tokens)

        if rows == 1:  # a share of the bandwidth only where one row reads each weight once per token
            # (probes of 256 MB: bf16 AF3-8B leaves no room for 1 GiB more)
            run, out["bracketed1"], out["bracket_gbs"] = bracketed_share(one, out["decoder_bytes"], probe_bytes=2**28)
        else:
            run = one()
        out[f"decode{rows}"] = run.rate
        out[f"ttft{rows}"] = run.ttft
        report(out)
    return out


def child_hf(folder: Path, tokens: int, rows_list: list[int]) -> dict:
    from transformers import AudioFlamingo3ForConditionalGeneration

    from af3 import AF3Processor

    t = time.perf_counter()
    model = AudioFlamingo3ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    load_s = time.perf_counter() - t
    proc = AF3Processor.from_pretrained(folder)
    out = {"load_s": load_s, "rss_after_load": vm_hwm()}

    def inputs(convs):
        return proc.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True).to(
            "cpu", dtype=torch.bfloat16)

    tower = getattr(getattr(model, "model", model), "audio_tower", None) or model.audio_tower
    report(out)
    b = inputs([conversation(30.0, 1)])
    with torch.inference_mode():
        out["encoder_s"] = _best(lambda: tower(b["input_features"], b["input_features_mask"]))
        report(out)
        for rows in rows_list:
            x = inputs([conversation(AUDIO_S, 10 * rows + i) for i in range(rows)])
            hf_decode(model, x, 4)
            run = hf_decode(model, x, tokens)
            out[f"ttft{rows}"], out[f"decode{rows}"] = run.ttft, run.rate
            report(out)
    return out


def _best(fn, repeats: int = 2) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


# ------------------------------------------------------------------------------------------ parent
SYSTEMS = {"af3-int8": ("af3", "int8", 0.55), "af3-bf16": ("af3", "bf16", 1.0), "hf-bf16": ("hf", "bf16", 1.0)}


def system(name: str) -> tuple[str, str, float, dict[str, str]]:
    """(kind, dtype, share of the bf16 bytes, environment) of a system name: one of :data:`SYSTEMS`, for af3
    optionally with ``:always`` or ``:off`` (its ``AF3_FUSED_DECODE``: the fused step's crossover at these shapes)."""
    base, _, fused = name.partition(":")
    if base not in SYSTEMS or (fused and (not base.startswith("af3") or fused not in ("auto", "always", "off"))):
        raise SystemExit(f"error: unknown system {name!r}; use {', '.join(SYSTEMS)} (af3 ones may end in "
                         ":always or :off)")
    return *SYSTEMS[base], ({"AF3_FUSED_DECODE": fused} if fused else {})


def last_report(stdout: str | bytes | None) -> dict | None:
    """The last JSON line a child printed (:func:`report`), or None."""
    text = stdout.decode(errors="replace") if isinstance(stdout, bytes) else stdout or ""
    lines = [line for line in text.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else None


def run(args) -> dict:
    folder = build_checkpoint()
    torch.set_num_threads(args.threads)
    results: dict = {"cpu": cpu_description(), "weights_bytes": weight_bytes(folder), "bandwidth_gbs": bandwidth_gbs(),
                     **bandwidth_checks(), "tokens": args.tokens, "threads": args.threads,
                     "rows": [int(n) for n in args.rows.split(",")], "systems": {}}
    print(f"[full_size] {results['cpu']}; fp32 sum {results['bandwidth_gbs']:.1f} GB/s, "
          f"copy {results['copy_gbs']:.1f}, GEMV {results['gemv_gbs']:.1f}", file=sys.stderr, flush=True)
    for name in args.only.split(","):
        kind, mode, share, env = system(name)
        need = int(results["weights_bytes"] * share * 1.1) + (1 << 30)
        free = mem_available()
        if free < need:
            results["systems"][name] = {"skipped": f"needs ~{need / 1e9:.1f} GB, {free / 1e9:.1f} GB available"}
            continue
        cmd = [sys.executable, "-m", "benchmarks.full_size", "--child", name, "--tokens", str(args.tokens),
               "--threads", str(args.threads), "--rows", args.rows]
        print(f"[full_size] {name} ...", file=sys.stderr, flush=True)
        try:
            done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=args.timeout,
                                  env={**os.environ, **env})
        except subprocess.TimeoutExpired as stopped:
            got = last_report(stopped.stdout)
            results["systems"][name] = ({"skipped": f"timed out after {args.timeout} s"} if got is None
                                        else {**got, "partial": f"stopped at the {args.timeout} s limit"})
            print(f"[full_size] {name}: {results['systems'][name]}", file=sys.stderr, flush=True)
            continue
        got = last_report(done.stdout)
        if done.returncode != 0 or got is None:
            tail = " / ".join(done.stderr.strip().splitlines()[-3:])
            results["systems"][name] = {"skipped": f"exit {done.returncode}: {tail[-300:]}"}
        else:
            results["systems"][name] = got
        print(f"[full_size] {name}: {results['systems'][name]}", file=sys.stderr, flush=True)
    return results


def table(r: dict) -> str:
    # the highest bandwidth read anywhere in the run: the probes at the start and those around af3's batch-1 runs
    # (minutes later, the VM's bandwidth may have moved by 2x)
    brackets = max((s.get("bracket_gbs", 0.0) for s in r["systems"].values()), default=0.0)
    bandwidth = max(r["bandwidth_gbs"], r["copy_gbs"], r["gemv_gbs"], brackets)
    hf = r["systems"].get("hf-bf16", {})
    lines = [f"CPU: {r['cpu']}; threads {r['threads']}; bandwidth {r['bandwidth_gbs']:.1f} GB/s (fp32 sum), copy "
             f"{r['copy_gbs']:.1f}, fp32 GEMV {r['gemv_gbs']:.1f}, around af3's batch-1 runs up to {brackets:.1f}: "
             f"roofline from {bandwidth:.1f} GB/s; random AF3 of "
             f"the real shapes, {r['weights_bytes'] / 1e9:.1f} GB of bf16 weights; {r['tokens']} new tokens after "
             f"{AUDIO_S:g} s of audio per request", "",
             "| system | decoder GB/token | decode tok/s, batch 1 | % of roofline | vs transformers | "
             + "".join(f"decode tok/s, batch {n} (sum) | vs transformers | " for n in r["rows"][1:])
             + "encoder s / 30 s window | load s | peak RSS GB |",
             "|---" * (8 + 2 * len(r["rows"][1:])) + "|"]
    for name, s in r["systems"].items():
        if "skipped" in s:
            lines.append(f"| {name} | not run: {s['skipped']} |||||||||")
            continue
        per_token = s.get("decoder_bytes", r["weights_bytes"] * 14.14 / 16.6)  # transformers: AF3-8B's 14.1 GB
        roof = bandwidth * 1e9 / per_token

        def vs(key: str, s: dict = s, name: str = name) -> str:
            return f"{s[key] / hf[key]:.2f}x" if key in hf and key in s and name != "hf-bf16" else "–"

        def num(key: str, s: dict = s) -> str:  # "–": not measured before a stopped child's limit
            return f"{s[key]:.2f}" if key in s else "–"

        more = "".join(f"{num(f'decode{n}')} | {vs(f'decode{n}')} | " for n in r["rows"][1:])
        share = f"{s['decode1'] / roof:.0%}" if "decode1" in s else "–"
        if "bracketed1" in s:  # (engine_bench.bracketed_share: the bandwidth read just before and after the run)
            share += f" ({s['bracketed1']:.0%} bracketed)"
        label = f"{name} ({s['partial']})" if "partial" in s else name
        encoder_vs = (f" ({hf['encoder_s'] / s['encoder_s']:.1f}x faster)" if "encoder_s" in hf and "encoder_s" in s
                      and name != "hf-bf16" else "")
        lines.append(f"| {label} | {per_token / 1e9:.2f} | {num('decode1')} | {share} | {vs('decode1')} | {more}"
                     f"{num('encoder_s')}{encoder_vs} | {s['load_s']:.1f} | {s['peak_rss'] / 1e9:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="af3-int8,af3-bf16,hf-bf16",
                   help=f"systems, of {', '.join(SYSTEMS)}; af3 ones may end in :always or :off (AF3_FUSED_DECODE)")
    p.add_argument("--rows", default="1,4", help="batch sizes of the decode rows (the first must be 1)")
    p.add_argument("--timeout", type=int, default=1800, help="seconds per system")
    p.add_argument("--json", default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        torch.set_num_threads(args.threads)
        kind, mode, _, _ = system(args.child)
        folder = build_checkpoint()
        rows = [int(n) for n in args.rows.split(",")]
        report(child_af3(folder, mode, args.tokens, rows) if kind == "af3" else child_hf(folder, args.tokens, rows))
        return
    results = run(args)
    if args.json:  # first: the raw numbers survive whatever the table does
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(table(results))


if __name__ == "__main__":
    main()
