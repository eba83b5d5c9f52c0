"""The vLLM reference runner leaves no process behind: its workers (here a stand-in's grandchild) are killed when the
runner exits, when it times out, and when the benchmark that started it is stopped with SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import vllm_ref  # noqa: E402


def _fake_python(tmp_path: Path, then: str) -> tuple[Path, Path]:
    """An executable standing in for the vLLM venv's python: it starts a long-lived 'worker' (its pid written to a
    file), then runs ``then`` (shell)."""
    pid_file = tmp_path / "worker.pid"
    exe = tmp_path / "python"
    exe.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        sleep 300 < /dev/null > /dev/null 2>&1 &
        echo $! > {pid_file}.tmp && mv {pid_file}.tmp {pid_file}
        {then}
        """))
    exe.chmod(0o755)
    return exe, pid_file


def _alive(pid: int) -> bool:
    """Running and not a zombie waiting for a reaper."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def _wait_file(path: Path, seconds: float = 20.0) -> int:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if path.exists():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} never written")


def test_a_runner_that_exits_takes_its_workers_with_it(tmp_path):
    exe, pid_file = _fake_python(tmp_path, "echo '{\"tok_s\": 1.5}'")
    got = vllm_ref.run(tmp_path, "decode1", 8, 1, 30.0, python=exe, timeout=60)
    assert got == {"tok_s": 1.5}
    worker = _wait_file(pid_file)
    assert _wait_gone(worker), "the runner's worker outlived it"


def test_a_runner_past_its_deadline_is_killed_with_its_workers(tmp_path):
    exe, pid_file = _fake_python(tmp_path, "sleep 300")
    assert vllm_ref.run(tmp_path, "decode1", 8, 1, 30.0, python=exe, timeout=2) is None
    assert _wait_gone(_wait_file(pid_file))


def test_sigterm_to_the_benchmark_stops_the_runner_and_its_workers(tmp_path):
    exe, pid_file = _fake_python(tmp_path, "sleep 300")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from benchmarks import vllm_ref; "
            "vllm_ref.stop_on_sigterm(); vllm_ref.run(sys.argv[2], 'decode1', 8, 1, 30.0, python=sys.argv[3])")
    bench = subprocess.Popen([sys.executable, "-c", code, str(ROOT), str(tmp_path), str(exe)])
    try:
        worker = _wait_file(pid_file)
        assert _alive(worker)
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(30) == 128 + signal.SIGTERM
        assert _wait_gone(worker), "SIGTERM to the benchmark left the runner's worker running"
    finally:
        bench.kill()
        bench.wait()
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_stopping_a_server_whose_leader_has_exited_still_kills_its_workers(tmp_path):
    from benchmarks.serve_load import Server

    exe, pid_file = _fake_python(tmp_path, "exit 0")
    server = Server("fake", [str(exe)], port=0)
    server.proc = subprocess.Popen([str(exe)], start_new_session=True)  # what ``start`` does, minus the health wait
    worker = _wait_file(pid_file)
    server.proc.wait(30)
    assert _alive(worker)
    server.stop()
    assert _wait_gone(worker), "the server's worker outlived stop()"
