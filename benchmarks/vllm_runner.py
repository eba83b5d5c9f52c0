"""vLLM-CPU side of the af3 benchmarks: one scenario, one JSON line on stdout.

Runs INSIDE the vLLM venv (``~/.cache/af3/vllm-venv``, see ``../shared/reference/vllm-cpu-notes.md``) and never
imports af3. ``benchmarks/vllm_ref.py`` launches it; by hand:

    ~/.cache/af3/vllm-venv/bin/python benchmarks/vllm_runner.py --model DIR --scenario decode1 --tokens 64 --runs 3

Scenarios (bf16, greedy, ``ignore_eos``, exactly ``--tokens`` new tokens, ``enforce_eager``, one warm-up request
with at most 30 s of audio, then ``--runs`` runs with fresh random audio so that no prefix or multimodal cache is hit;
a full-size warm-up would add minutes to the 5-minute and 8-prompt scenarios on CPUs without native bf16):

- ``decode1``: 1 prompt with ``--audio-seconds`` (30) of audio; ``decode8``: 8 such prompts at once. Both run
  the loop of ``LLM.generate`` step by step (``enqueue``, then ``llm_engine.step()`` until done)
  and note each request's tokens after every step; ``decode_tok_s`` and ``decode_all_rows_tok_s`` come from that
  trace through ``decode_trace.decode_run``, the definition af3's ``engine_bench.engine_decode`` uses (tokens made
  after the step in which the last request got its first token, over the time since). ``first_token_steps``: in how
  many steps the prompts got their first tokens (1: all prefilled together). ``decode_tok_s_metrics`` is the earlier
  figure from ``RequestOutput.metrics``, (tokens - prompts) / (last token time - the last first token time), which
  counts tokens made before that moment when the first tokens came in different steps; ``wall_s`` is the whole job.
- ``prefill``: 1 prompt with ``--audio-seconds`` (300) of audio and 1 new token. Time to first token (engine-core
  ``scheduled_ts`` -> ``first_token_ts``, no frontend feature extraction) and wall time of the call.
- ``startup``: process start -> first finished answer (16 tokens, 30 s of audio). ``startup_s`` counts from the
  top of this script, ``startup_from_exec_s`` from the kernel's process start time (adds interpreter start-up).
- ``batch``: every wav of ``--clips`` (a JSON list of 16-bit mono 16 kHz files, read here) in one
  ``LLM.generate`` call, as an offline batch job runs; ``wall_s`` includes reading the files and vLLM's feature
  extraction, ``items_per_s`` = clips / wall.

Time to first token is ``ttft_s`` (engine-core ``scheduled_ts`` -> ``first_token_ts``, the notes' prefill) and
``ttft_frontend_s`` (vLLM's ``first_token_latency``: from the request's arrival, so with audio feature extraction).
Every scenario also reports ``init_s`` (top of the script -> ``LLM(...)`` ready) and the prompt it used: the
checkpoint's chat template rendered by vLLM's tokenizer when it gives exactly one ``<sound>``, else AF3's literal
prompt (``prompt_source`` says which).

Times are seconds. All of vLLM's logging goes to stderr.
"""

import argparse
import json
import os
import statistics
import sys
import time

from decode_trace import Step, decode_run  # (a script: its own folder is on sys.path)

T0 = time.perf_counter()  # top of the script, before vLLM (and numpy) are imported

# Before vLLM is imported: both cores for the model worker (the notes: "auto" binds it to core 0 only).
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0-1")
# On AVX2 CPUs vLLM's oneDNN linear falls back to torch's bf16 linear, and one prefill step of 8 prompts or of 5 min
# of audio takes longer than vLLM's default 300 s limit on a worker call; allow an hour so that it can be measured.
os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SR = 16000
FALLBACK_PROMPT = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                   "<|im_start|>user\n<sound>Describe the recording in detail.<|im_end|>\n<|im_start|>assistant\n")
QUESTION = "Describe the recording in detail."
DEFAULT_AUDIO_SECONDS = {"decode1": 30.0, "decode8": 30.0, "prefill": 300.0, "startup": 30.0, "batch": 0.0}


def read_wav(path: str):
    """A 16-bit mono wav → float32 array (stdlib ``wave``: the vLLM venv needs no audio library for this)."""
    import wave

    import numpy as np

    with wave.open(path, "rb") as w:
        if w.getsampwidth() != 2 or w.getnchannels() != 1 or w.getframerate() != SR:
            raise ValueError(f"{path}: expected 16-bit mono {SR} Hz")
        return np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768.0


def process_age() -> float | None:
    """Seconds since the kernel started this process (10 ms resolution), or None where /proc can't tell."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return uptime - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


AGE_AT_T0 = None if (_age := process_age()) is None else _age - (time.perf_counter() - T0)  # interpreter start-up


def claim_stdout():
    """A private copy of stdout for the JSON line; fd 1 itself (inherited by vLLM's engine-core and worker
    processes, whose loggers write to stdout) then points at stderr."""
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return out


def render_prompt(llm) -> tuple[str, str]:
    """The prompt text from the model's own chat template, or AF3's literal prompt. Returns (prompt, source)."""
    messages = [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": QUESTION}]}]
    try:
        prompt = llm.get_tokenizer().apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception as exc:  # no template, or one this tokenizer can't render
        print(f"chat template not usable ({type(exc).__name__}: {exc}); using AF3's literal prompt", file=sys.stderr)
        return FALLBACK_PROMPT, "literal"
    if not isinstance(prompt, str) or prompt.count("<sound>") != 1:
        print(f"chat template gave {prompt!r}; using AF3's literal prompt", file=sys.stderr)
        return FALLBACK_PROMPT, "literal"
    return prompt, "chat_template"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder (HF layout)")
    parser.add_argument("--scenario", required=True, choices=sorted(DEFAULT_AUDIO_SECONDS))
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per prompt (prefill: 1, startup: 16)")
    parser.add_argument("--runs", type=int, default=3, help="timed runs after one warm-up (startup: always 1)")
    parser.add_argument("--audio-seconds", type=float, default=None, help="default: 30, prefill 300")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clips", default=None, help="batch: a JSON file listing the wav files")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="batch: vLLM's --max-num-seqs")
    args = parser.parse_args()
    scenario = args.scenario
    seconds = args.audio_seconds or DEFAULT_AUDIO_SECONDS[scenario]
    tokens = {"prefill": 1, "startup": 16}.get(scenario, args.tokens)
    n_prompts = 8 if scenario == "decode8" else 1

    stdout = claim_stdout()
    import numpy as np
    import vllm
    from vllm import LLM, SamplingParams

    # max_num_batched_tokens >= max_model_len: a whole prompt (even 5 min of audio, ~7600 tokens) in one step.
    llm = LLM(model=args.model, dtype="bfloat16", enforce_eager=True, max_model_len=8192,
              max_num_batched_tokens=8192,
              max_num_seqs=args.max_num_seqs if scenario == "batch" else max(8, n_prompts),
              limit_mm_per_prompt={"audio": 1}, seed=args.seed, disable_log_stats=False)
    init_s = time.perf_counter() - T0
    prompt, prompt_source = render_prompt(llm)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True)
    rng = np.random.default_rng(args.seed)

    def random_requests(prompts: int, audio_seconds: float) -> list[dict]:
        return [{"prompt": prompt, "multi_modal_data": {
            "audio": ((0.1 * rng.standard_normal(int(audio_seconds * SR))).astype(np.float32), SR)}}
            for _ in range(prompts)]

    def generate(prompts: int = n_prompts, audio_seconds: float = seconds):
        requests = random_requests(prompts, audio_seconds)
        t = time.perf_counter()
        outputs = llm.generate(requests, params, use_tqdm=False)
        return outputs, time.perf_counter() - t

    def traced():
        """``generate`` as a step loop (the loop ``LLM.generate`` runs), with each request's tokens after every
        step (the output processor's per-request counts; ``LLM`` hands out final outputs only): the trace
        ``decode_trace.decode_run`` reads."""
        requests = random_requests(n_prompts, seconds)
        t = time.perf_counter()
        ids = llm.enqueue(requests, params, use_tqdm=False)
        states = llm.llm_engine.output_processor.request_states
        external = [states[i].external_req_id for i in ids]
        final, steps = {}, []
        while llm.llm_engine.has_unfinished_requests():
            outs = llm.llm_engine.step()
            now = time.perf_counter()
            final.update((o.request_id, o) for o in outs if o.finished)
            count = tuple(len(final[e].outputs[0].token_ids) if e in final else states[i].stats.num_generation_tokens
                          for i, e in zip(ids, external, strict=True))
            steps.append(Step(now, count, len(final)))
        return [final[e] for e in external], steps, t

    result = {"engine": "vllm-cpu", "vllm_version": vllm.__version__, "scenario": scenario, "model": args.model,
              "tokens": tokens, "audio_seconds": seconds, "prompts": n_prompts, "prompt_source": prompt_source,
              "prompt": prompt, "init_s": init_s,
              "env": {k: os.environ[k] for k in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND",
                                                 "VLLM_CPU_NUM_OF_RESERVED_CPU")}}
    if scenario == "batch":
        with open(args.clips) as f:
            paths = json.load(f)
        generate(1, 30.0)  # warm-up
        t = time.perf_counter()
        requests = [{"prompt": prompt, "multi_modal_data": {"audio": (read_wav(p), SR)}} for p in paths]
        outputs = llm.generate(requests, params, use_tqdm=False)
        wall = time.perf_counter() - t
        count = [len(o.outputs[0].token_ids) for o in outputs]
        if any(c != tokens for c in count):
            raise RuntimeError(f"expected {tokens} tokens per prompt, got {count}")
        result.update(runs=1, prompts=len(paths), wall_s=wall, items_per_s=len(paths) / wall,
                      max_num_seqs=args.max_num_seqs)
    elif scenario == "startup":
        outputs, _ = generate()
        startup = time.perf_counter() - T0
        result.update(startup_s=startup, runs=1, startup_from_exec_s=None if AGE_AT_T0 is None else startup + AGE_AT_T0)
    else:
        generate(1, min(seconds, 30.0))  # warm-up
        per_run: dict[str, list[float]] = {}
        for _ in range(args.runs):
            if scenario == "prefill":
                outputs, wall = generate()
                count = [len(o.outputs[0].token_ids) for o in outputs]
            else:
                outputs, steps, t0 = traced()
                count, wall = list(steps[-1].tokens), steps[-1].time - t0
            metrics = [o.metrics for o in outputs]
            if any(c != tokens for c in count):
                raise RuntimeError(f"expected {tokens} tokens per prompt, got {count}")
            first = [m.first_token_ts for m in metrics]
            values = {"wall_s": wall, "ttft_s": max(first) - min(m.scheduled_ts for m in metrics),
                      "ttft_frontend_s": max(m.first_token_latency for m in metrics)}
            if scenario != "prefill":
                run = decode_run(t0, steps)
                values.update(decode_tok_s=run.rate, decode_all_rows_tok_s=run.all_rows,
                              first_token_steps=len({next(j for j, s in enumerate(steps) if s.tokens[i])
                                                     for i in range(n_prompts)}),
                              decode_tok_s_metrics=(sum(count) - n_prompts) / (max(m.last_token_ts for m in metrics)
                                                                               - max(first)))
            for key, value in values.items():
                per_run.setdefault(key, []).append(value)
        result["runs"] = args.runs
        result.update({key: statistics.median(v) for key, v in per_run.items()})
        result["per_run"] = per_run
    result["prompt_tokens"] = len(outputs[0].prompt_token_ids or [])
    print(json.dumps(result), file=stdout, flush=True)


if __name__ == "__main__":  # required: vLLM's engine core starts its processes with spawn
    main()
