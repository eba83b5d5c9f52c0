"""A real `af3 serve` in a subprocess for the server tests, and small helpers around it."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import resources

import httpx
import numpy as np

CLIP = str(resources.files("af3") / "assets" / "clips" / "three_beeps.wav")
MODEL = "af3-tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*args: str, env: dict | None = None) -> Iterator[str]:
    """``af3 serve`` with ``args`` on a free port; yields its base URL and stops it (SIGINT) at the end."""
    port = free_port()
    log = open(os.devnull, "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen([sys.executable, "-m", "af3.cli", "serve", "--port", str(port), *args],
                            stdout=log, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"af3 serve exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("af3 serve did not become healthy in 120 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def wav_bytes(samples: np.ndarray, rate: int = 16000) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def clip_b64() -> str:
    with open(CLIP, "rb") as f:
        return b64(f.read())


def audio_part(data_b64: str | None, fmt: str = "wav", uuid: str | None = None) -> dict:
    part: dict = {"type": "input_audio", "input_audio": None if data_b64 is None else {"data": data_b64,
                                                                                        "format": fmt}}
    if uuid is not None:
        part["uuid"] = uuid
    return part


def ask(*audio: dict, question: str = "How many beeps do you hear?") -> list[dict]:
    return [{"role": "user", "content": [*audio, {"type": "text", "text": question}]}]


def metric(url: str, name: str, headers: dict | None = None) -> float:
    """The sum of a Prometheus metric's samples (all label values)."""
    text = httpx.get(url + "/metrics", headers=headers or {}, timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name) and (line[len(name)] in " {"))
