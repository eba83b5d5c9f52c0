"""af3's Engine vs transformers' generate on one GPU, with a random AF3 of the real shapes built in GPU memory.

    python -m benchmarks.gpu_bench [--shape full|mid] [--device cuda] [--batches 1,8,32] [--tokens 64]
        [--json gpu.json] [--md gpu.md] [--no-hf]

Run by ``benchmarks/gpu_check.sh`` (which installs af3 first and runs the CUDA tests); ``--shape mid --device cpu``
runs the same code on a CPU in a minute (a check of the script, not a GPU figure).

The model is built directly on the device (no checkpoint on disk): af3's ``AF3Model`` of AF3's shapes (Qwen2.5-7B
decoder, Whisper-large encoder; ``--shape mid``: the CPU benchmarks' 0.5B-sized one) with random bf16 weights
(normal, std 0.02; norms 1, biases 0). transformers' ``AudioFlamingo3ForConditionalGeneration`` is built on the meta
device from the same config and given af3's tensors themselves (``load_state_dict(assign=True)``: the two share
every weight, so they are held once). Measured:

* **decode tok/s** summed over the batch at each ``--batches`` size: ``--tokens`` new tokens after 1 s of audio per
  request (greedy, end tokens ignored), timed from the step where every request has its first tokens to the last
  (af3: ``engine_bench.engine_decode``, whose steps end in a host copy of the chosen tokens; transformers:
  ``generate`` with a clock that synchronizes the device at every token); batch 1 also as a share of the roofline
  (device copy bandwidth ÷ decoder bytes per token);
* **time to first token** for 30 s and 10 minutes of audio (one request, the answer's first token; af3 with cold
  caches: a fresh Engine each time);
* **peak device memory** (``torch.cuda.max_memory_allocated``) of each system's runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.engine_bench import conversation, decoder_bytes, engine_decode


def configs(shape: str):
    if shape == "full":
        from benchmarks.full_size import full_config

        return full_config()
    from af3.config import AF3Config, EncoderConfig, GenerationConfig, TextConfig

    return AF3Config(
        audio_config=EncoderConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
        text_config=TextConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                               bos_token_id=0, eos_token_id=2, pad_token_id=0),
        audio_token_id=3,
    ), GenerationConfig(eos_token_id=2, pad_token_id=0, bos_token_id=0)


def build(shape: str, device: torch.device, folder: Path):
    """(af3 model, processor) with random weights on ``device``; the processor's files and config.json in
    ``folder``."""
    from af3 import AF3Model, AF3Processor
    from benchmarks.serve_load import write_decodable_tokenizer

    config, gen = configs(shape)
    with torch.device("meta"):
        model = AF3Model(config, gen).to(torch.bfloat16)
    model = model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.zero_()
            elif p.dim() == 1:  # norms
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
    model.eval()
    write_decodable_tokenizer(folder, config.text_config.vocab_size)
    config.save(folder / "config.json")
    return model, AF3Processor.from_pretrained(folder)


def reference(model, folder: Path, device: torch.device):
    """transformers' model holding ``model``'s own tensors. It is built on the device (its buffers, such as the
    rotary frequencies, computed there) and then given af3's parameters, which frees its own: the weights are held
    twice only for that moment."""
    from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration

    cfg = AudioFlamingo3Config.from_pretrained(folder)
    with torch.device(device):
        hf = AudioFlamingo3ForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16)
    ours = model.state_dict()
    wanted = set(hf.state_dict())
    if not set(ours) <= wanted:  # transformers 5 nests the checkpoint's names under `model.` when it loads them
        ours = {_v5_name(k): v for k, v in ours.items()}
    hf.load_state_dict(ours, strict=True, assign=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return hf.eval()


def _v5_name(key: str) -> str:
    """A checkpoint tensor name (af3's module names) as transformers 5's AF3 module tree spells it."""
    if key == "language_model.lm_head.weight":
        return "lm_head.weight"
    if key.startswith("language_model.model."):
        return "model.language_model." + key.removeprefix("language_model.model.")
    return "model." + key


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hf_decode(hf, inputs, tokens: int, device: torch.device) -> tuple[float, float]:
    """(time to first token, decode tok/s summed over rows) of transformers' generate, the device synchronized at
    every token."""
    from transformers import StoppingCriteria

    stamps: list[float] = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            sync(device)
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    sync(device)
    t0 = time.perf_counter()
    hf.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, stopping_criteria=[Clock()])
    rows = inputs["input_ids"].shape[0]
    return stamps[0] - t0, rows * (len(stamps) - 1) / (stamps[-1] - stamps[0])


def peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def copy_bandwidth(device: torch.device) -> float:
    """Device memory bandwidth (GB/s): the best of 5 copies of 1 GiB, read and write bytes counted."""
    x = torch.ones(256 * 1024**2, dtype=torch.float32, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    best = 0.0
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        best = max(best, 2 * x.numel() * 4 / (time.perf_counter() - t) / 1e9)
    del x, y
    return best


def run(args) -> dict:
    from af3.generation.engine import Engine
    from af3.system import cpu_description

    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_description()
    out: dict = {"device": name, "shape": args.shape, "tokens": args.tokens, "torch": torch.__version__,
                 "bandwidth_gbs": copy_bandwidth(device)}
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        model, proc = build(args.shape, device, Path(tmp))
        out["build_s"] = time.perf_counter() - t
        out["decoder_bytes"] = decoder_bytes(model)
        hf = None if args.no_hf else reference(model, Path(tmp), device)
    log(f"{name}: built in {out['build_s']:.1f} s; copy bandwidth {out['bandwidth_gbs']:.0f} GB/s")

    def inputs(convs):
        return proc.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True).to(
            device, dtype=torch.bfloat16)

    ours: dict = {}
    peak_reset(device)
    for b in batches:
        convs = [conversation(1.0, 100 * b + i) for i in range(b)]
        engine_decode(Engine(model, proc, max_batch_size=b), convs, 4)  # warm-up
        ours[f"decode{b}"] = engine_decode(Engine(model, proc, max_batch_size=b), convs, args.tokens).rate
        log(f"af3 batch {b}: {ours[f'decode{b}']:.1f} tok/s")
    for secs in (30.0, 600.0):
        engine = Engine(model, proc, max_batch_size=1)
        sync(device)
        t = time.perf_counter()
        engine.generate(conversation(secs, 7), max_new_tokens=1)
        ours[f"ttft{int(secs)}"] = time.perf_counter() - t
        log(f"af3 time to first token, {secs:g} s of audio: {ours[f'ttft{int(secs)}']:.2f} s")
    ours["peak_bytes"] = peak(device)
    out["af3"] = ours
    if hf is not None:
        ref: dict = {}
        peak_reset(device)
        with torch.inference_mode():
            for b in batches:
                x = inputs([conversation(1.0, 100 * b + i) for i in range(b)])
                hf_decode(hf, x, 4, device)
                ref[f"decode{b}"] = hf_decode(hf, x, args.tokens, device)[1]
                log(f"transformers batch {b}: {ref[f'decode{b}']:.1f} tok/s")
            for secs in (30.0, 600.0):
                x = inputs([conversation(secs, 7)])
                sync(device)
                t = time.perf_counter()
                hf.generate(**x, max_new_tokens=1, do_sample=False)
                sync(device)
                ref[f"ttft{int(secs)}"] = time.perf_counter() - t
                log(f"transformers time to first token, {secs:g} s of audio: {ref[f'ttft{int(secs)}']:.2f} s")
        ref["peak_bytes"] = peak(device)
        out["transformers"] = ref
    return out


def log(line: str) -> None:
    print(f"[gpu_bench] {line}", file=sys.stderr, flush=True)


def table(r: dict) -> str:
    roof = r["bandwidth_gbs"] * 1e9 / r["decoder_bytes"]
    ours, ref = r["af3"], r.get("transformers", {})
    lines = [f"{r['device']}; torch {r['torch']}; {r['shape']} shape (decoder {r['decoder_bytes'] / 1e9:.2f} GB read "
             f"per token), bf16; copy bandwidth {r['bandwidth_gbs']:.0f} GB/s, batch-1 roofline {roof:.0f} tok/s; "
             f"{r['tokens']} new tokens after 1 s of audio per request", "",
             "| metric | transformers | af3 Engine | af3 vs transformers |", "|---|---|---|---|"]

    def row(metric: str, key: str, higher: bool, extra: str = "") -> None:
        a, b = ref.get(key), ours[key]
        ratio = "–" if a is None else f"{(b / a) if higher else (a / b):.2f}x"
        lines.append(f"| {metric} | {'–' if a is None else f'{a:.2f}'} | {b:.2f}{extra} | {ratio} |")

    for key in sorted((k for k in ours if k.startswith("decode")), key=lambda k: int(k[6:])):
        b = int(key[6:])
        row(f"decode tok/s, batch {b}", key, True, f" ({ours[key] / roof:.0%} of roofline)" if b == 1 else "")
    row("time to first token, 30 s of audio, s", "ttft30", False)
    row("time to first token, 10 min of audio, s", "ttft600", False)
    gib = [None if d.get("peak_bytes") is None else f"{d['peak_bytes'] / 2**30:.1f}" for d in (ref, ours)]
    lines.append(f"| peak device memory, GiB | {gib[0] or '–'} | {gib[1] or '–'} | |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=("full", "mid"), default="full")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--no-hf", action="store_true", help="af3 only")
    p.add_argument("--json", default=None)
    p.add_argument("--md", default=None)
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: no CUDA device here (use --device cpu --shape mid to check the script on a CPU)",
              file=sys.stderr)
        raise SystemExit(2)
    if args.device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    results = run(args)
    text = table(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if args.md:
        Path(args.md).write_text(text + "\n")


if __name__ == "__main__":
    main()
