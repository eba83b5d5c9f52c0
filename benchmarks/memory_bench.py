"""Peak memory of ``af3 transcribe`` against the length of the recording: memory must follow the model, not the file.

Writes speech-like recordings (noise with a syllable envelope, pauses every few seconds, a quiet stretch now and
then) of 10 minutes, 1 hour and 2 hours as 16 kHz wav, transcribes each with the embedded tiny model in a fresh
process, and reads that process's peak resident memory (its VmHWM, from /proc).

    python -m benchmarks.memory_bench [--lengths 600,3600,7200] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from af3.system import cpu_description

SR = 16000


def write_recording(path: str, seconds: int, seed: int = 0) -> None:
    """A speech-like 16-bit wav of ``seconds``, written a minute at a time (the benchmark itself stays small)."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    with sf.SoundFile(path, "w", SR, 1, subtype="PCM_16") as f:
        for minute in range(0, seconds, 60):
            n = min(60, seconds - minute) * SR
            t = np.arange(n) / SR
            x = 0.2 * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t)) * rng.standard_normal(n)
            for start in rng.uniform(0, n / SR - 1, size=8):  # pauses
                a = int(start * SR)
                x[a : a + int(0.5 * SR)] = 0
            if minute % 600 == 300:  # now and then a silent minute (skipped by the transcriber)
                x[:] = 0
            f.write(x.astype(np.float32))


#: Runs ``af3`` with the given arguments and writes the process's peak resident memory (VmHWM, counted from exec:
#: ``ru_maxrss`` of a child would include what it inherited from a large parent at fork) to the file in argv[1].
_WRAPPER = """
import atexit, sys
def report():
    hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM')][0].split()[1]
    open(sys.argv[1], 'w').write(hwm)
atexit.register(report)
from af3.cli import main
sys.exit(main(sys.argv[2:]))
"""


def peak_rss_mb(af3_args: list[str]) -> tuple[float, float, int]:
    """(peak RSS in MB, seconds, exit status) of ``af3 <af3_args>`` in a fresh process."""
    with tempfile.NamedTemporaryFile("r", suffix=".hwm") as out:
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", _WRAPPER, out.name, *af3_args], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, check=False)
        took = time.perf_counter() - start
        if proc.returncode:
            print(proc.stderr, file=sys.stderr)
        return int(out.read() or 0) / 1024, took, proc.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lengths", default="600,3600,7200", help="recording lengths in seconds")
    ap.add_argument("--keep", default=None, help="write the recordings here (default: a temporary folder)")
    args = ap.parse_args()
    folder = args.keep or tempfile.mkdtemp(prefix="af3-memory-")
    os.makedirs(folder, exist_ok=True)
    print(f"CPU: {cpu_description()}\n")
    print("| recording | file size | peak RSS of `af3 transcribe` | time | exit |\n|---|---|---|---|---|")
    for seconds in (int(s) for s in args.lengths.split(",")):
        path = os.path.join(folder, f"speech-{seconds}s.wav")
        if not os.path.exists(path):
            write_recording(path, seconds)
        rss, took, code = peak_rss_mb(["transcribe", path, "--format", "srt"])
        print(f"| {seconds / 60:g} min | {os.path.getsize(path) / 1e6:.0f} MB | {rss:.0f} MB | {took:.0f} s "
              f"| {code} |", flush=True)


if __name__ == "__main__":
    main()
