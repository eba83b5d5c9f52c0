"""Every mistake a user can make on the command line ends the same way: exit status 2, one line on stderr that
starts with ``error:`` and names the problem, and no traceback. Each row runs the real ``af3`` entry point in a
subprocess (rows that need no model fail before one is loaded; the others use the embedded tiny model)."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import wave

import numpy as np
import pytest

ROWS: list[tuple[str, list[str], str]] = [
    # usage errors: typer's own parser
    ("no audio", ["ask"], r"Missing argument 'AUDIO... QUESTION'"),
    ("no question", ["ask", "{clip}"], r"Missing argument 'question'"),
    ("unknown option", ["ask", "{clip}", "q", "--foo"], r"No such option: --foo"),
    ("unknown command", ["bogus"], r"No such command 'bogus'"),
    ("unknown global option", ["--bogus"], r"No such option: --bogus"),
    ("question taken for an audio", ["ask", "{clip}", "q", "extra"], r"audio file not found: .q."),
    ("tokens not a number", ["ask", "{clip}", "q", "--max-new-tokens", "abc"], r"Invalid value for '--max-new-tokens'"),
    ("tokens in e-notation", ["ask", "{clip}", "q", "--max-new-tokens", "1e9"], r"Invalid value for '--max-new-tok"),
    ("tokens without value", ["ask", "{clip}", "q", "--max-new-tokens"], r"requires an argument"),
    ("temperature not a number", ["ask", "{clip}", "q", "--temperature", "abc"], r"Invalid value for '--temperature'"),
    ("top-p not a number", ["ask", "{clip}", "q", "--top-p", "x"], r"Invalid value for '--top-p'"),
    ("top-k a fraction", ["ask", "{clip}", "q", "--top-k", "1.5"], r"Invalid value for '--top-k'"),
    ("seed not a number", ["ask", "{clip}", "q", "--seed", "abc"], r"Invalid value for '--seed'"),
    ("transcribe without audio", ["transcribe"], r"Missing argument 'audio'"),
    ("format without value", ["transcribe", "{clip}", "--format"], r"requires an argument"),
    ("convert without source", ["convert"], r"Missing argument 'src'"),
    ("convert without target", ["convert", "{tmp}"], r"Missing argument 'dst'"),
    ("demo with unknown option", ["demo", "--bogus"], r"No such option: --bogus"),
    ("merge-lora without arguments", ["train", "merge-lora"], r"merge-lora: the following arguments are required"),
    ("train tiny unknown option", ["train", "tiny", "--bogus"], r"train tiny: unrecognized arguments: --bogus"),
    ("serve port out of range", ["serve", "--port", "70000"], r"--port must be between 1 and 65535"),
    ("serve negative prefix cache", ["serve", "--prefix-cache-mb", "-1"], r"--prefix-cache-mb must be between 0"),
    ("serve nan audio cache", ["serve", "--audio-cache-mb", "nan"], r"--audio-cache-mb must be between 0"),
    ("serve zero uuid cache", ["serve", "--uuid-cache-mb", "0"], r"uuid_cache_mb must be a positive number"),
    # values: checked by the generation options' rules before a model is loaded
    ("zero tokens", ["ask", "{clip}", "q", "--max-new-tokens", "0"], r"max_new_tokens must be between 1 and"),
    ("negative tokens", ["ask", "{clip}", "q", "--max-new-tokens", "-5"], r"max_new_tokens must be between 1 and"),
    ("absurd tokens", ["ask", "{clip}", "q", "--max-new-tokens", "99999999"], r"max_new_tokens must be between"),
    ("negative temperature", ["ask", "{clip}", "q", "--temperature", "-1"], r"temperature must be in \[0, 100\]"),
    ("nan temperature", ["ask", "{clip}", "q", "--temperature", "nan"], r"temperature must be a finite number"),
    ("infinite temperature", ["ask", "{clip}", "q", "--temperature", "inf"], r"temperature must be a finite number"),
    ("huge temperature", ["ask", "{clip}", "q", "--temperature", "1000"], r"temperature must be in \[0, 100\]"),
    ("top-p zero", ["ask", "{clip}", "q", "--temperature", "0.7", "--top-p", "0"], r"top_p must be in \(0, 1\]"),
    ("top-p above one", ["ask", "{clip}", "q", "--temperature", "0.7", "--top-p", "1.5"], r"top_p must be in"),
    ("negative top-k", ["ask", "{clip}", "q", "--top-k", "-1"], r"top_k must be >= 0"),
    ("negative seed", ["ask", "{clip}", "q", "--seed", "-1"], r"seed must be between 0 and"),
    ("seed beyond 64 bits", ["ask", "{clip}", "q", "--seed", str(2**70)], r"seed must be between 0 and"),
    ("json not json", ["ask", "{clip}", "q", "--json", "{bad"], r"--json: not a JSON schema file or inline JSON"),
    ("json not a schema", ["ask", "{clip}", "q", "--json", "5"], r"json_schema must be a JSON schema object"),
    ("transcribe zero tokens", ["transcribe", "{clip}", "--max-new-tokens", "0"], r"max_new_tokens must be between"),
    ("transcribe unknown format", ["transcribe", "{clip}", "--format", "xml"], r"unknown --format 'xml'"),
    ("unknown device", ["ask", "{clip}", "q", "--device", "bogus"], r"unknown device 'bogus'"),
    ("missing gpu", ["ask", "{clip}", "q", "--device", "cuda:99"], r"device 'cuda:99'"),
    ("unsupported device", ["ask", "{clip}", "q", "--device", "meta"], r"device 'meta' is not supported"),
    ("unknown dtype", ["ask", "{clip}", "q", "--dtype", "int3"], r"unknown dtype 'int3'"),
    ("transcribe unknown dtype", ["transcribe", "{clip}", "--dtype", "fp8"], r"unknown dtype 'fp8'"),
    ("unknown quantization", ["ask", "{clip}", "q", "--quantize", "int4"], r"unknown quantization mode 'int4'"),
    # checkpoints and files
    ("missing model folder", ["ask", "{clip}", "q", "--model", "{tmp}/nowhere"], r"no such folder"),
    ("model id not downloaded", ["ask", "{clip}", "q", "--model", "af3-tests/not-here"], r"af3 download"),
    ("model is a file", ["ask", "{clip}", "q", "--model", "{text}"], r"is a file"),
    ("model folder is empty", ["ask", "{clip}", "q", "--model", "{tmp}"], r"config\.json|tokenizer|checkpoint"),
    ("convert a missing source", ["convert", "{tmp}/nowhere", "{tmp}/out"], r"does not exist"),
    ("convert a non-NVIDIA folder", ["convert", "{tmp}", "{tmp}/out"], r"not in NVIDIA's layout"),
    ("convert onto an existing folder", ["convert", "{tmp}", "{tmp}"], r"already exists"),
    ("merge-lora of a missing adapter", ["train", "merge-lora", "{tmp}/nowhere", "--out", "{tmp}/o"],
     r"nowhere"),
    ("train a missing config", ["train", "{tmp}/nowhere.yaml"], r"nowhere\.yaml"),
    # audio (the embedded model is loaded first)
    ("missing audio file", ["ask", "{tmp}/nowhere.wav", "q"], r"audio file not found"),
    ("audio is a folder", ["ask", "{tmp}", "q"], r"is a directory"),
    ("empty audio file", ["ask", "{empty}", "q"], r"empty"),
    ("text as audio", ["ask", "{text}", "q"], r"not a supported audio format"),
    ("ftp url", ["ask", "ftp://example.com/a.wav", "q"], r"unsupported URL scheme 'ftp://'"),
    ("file url", ["ask", "file:///etc/passwd", "q"], r"unsupported URL scheme 'file://'"),
    ("private address url", ["ask", "http://127.0.0.1:9/a.wav", "q"], r"127\.0\.0\.1"),
    ("wav of NaN", ["ask", "{nan}", "q"], r"NaN"),
    ("wav at 1 Hz", ["ask", "{one_hz}", "q"], r"1 Hz|sampling rate|sample rate"),
    ("transcribe an empty file", ["transcribe", "{empty}"], r"empty"),
    ("think without an adapter", ["ask", "{clip}", "q", "--think"], r"think adapter"),
    # af3 chat, info, download, caption, bench
    ("chat missing audio", ["chat", "{tmp}/nowhere.wav"], r"audio file not found"),
    ("chat audio is a folder", ["chat", "{tmp}"], r"is a directory"),
    ("chat zero tokens", ["chat", "--max-new-tokens", "0"], r"max_new_tokens must be between 1 and"),
    ("chat nan temperature", ["chat", "--temperature", "nan"], r"temperature must be a finite number"),
    ("chat think without an adapter", ["chat", "--think"], r"think adapter"),
    ("chat unknown dtype", ["chat", "--dtype", "int3"], r"unknown dtype 'int3'"),
    ("info without a model", ["info"], r"Missing argument 'MODEL'|Missing argument 'model'"),
    ("info unknown format", ["info", "tiny", "--format", "xml"], r"unknown --format 'xml'"),
    ("info missing folder", ["info", "{tmp}/nowhere"], r"no such folder"),
    ("info empty folder", ["info", "{tmp}"], r"config\.json"),
    ("info model is a file", ["info", "{text}"], r"is a file"),
    ("info zero seq-len", ["info", "tiny", "--seq-len", "0"], r"--seq-len must be between 1 and"),
    ("info unknown dtype", ["info", "tiny", "--dtype", "int3"], r"unknown dtype 'int3'"),
    ("download without a repo", ["download"], r"Missing argument"),
    ("download offline", ["download", "af3-tests/no-such-model"], r"HF_HUB_OFFLINE"),
    ("download bad repo id", ["download", "not a repo"], r"not a valid hub repository id"),
    ("caption without audio", ["caption"], r"Missing argument"),
    ("caption missing file", ["caption", "{clip}", "{tmp}/nowhere.wav"], r"audio file not found"),
    ("caption unknown format", ["caption", "{clip}", "--format", "xml"], r"unknown --format 'xml'"),
    ("caption empty prompt", ["caption", "{clip}", "--prompt", " "], r"--prompt must not be empty"),
    ("caption zero tokens", ["caption", "{clip}", "--max-new-tokens", "0"], r"max_new_tokens must be between"),
    ("caption text as audio", ["caption", "{text}"], r"not a supported audio format"),
    ("bench one token", ["bench", "--tokens", "1"], r"--tokens must be between 2 and"),
    ("bench tokens not a number", ["bench", "--tokens", "x"], r"Invalid value for '--tokens'"),
    ("bench audio too long", ["bench", "--audio-s", "601"], r"--audio-s must be a number of seconds"),
    ("bench nan audio", ["bench", "--audio-s", "nan"], r"--audio-s must be a number of seconds"),
    ("bench zero audio", ["bench", "--audio-s", "0"], r"--audio-s must be a number of seconds"),
]


def write_wav(path: str, samples: np.ndarray, rate: int) -> None:
    import soundfile as sf

    sf.write(path, samples, rate, subtype="FLOAT" if samples.dtype == np.float32 else "PCM_16")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("bad_cli")
    files = {"tmp": str(tmp), "clip": str(tmp / "clip.wav"), "empty": str(tmp / "empty.wav"),
             "text": str(tmp / "notes.txt"), "nan": str(tmp / "nan.wav"), "one_hz": str(tmp / "one_hz.wav")}
    write_wav(files["clip"], (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    open(files["empty"], "wb").close()
    with open(files["text"], "w") as f:
        f.write("not audio\n" * 20)
    nan = np.zeros(1600, np.float32)
    nan[100] = np.nan
    write_wav(files["nan"], nan, 16000)
    with wave.open(files["one_hz"], "wb") as w:  # an 8 KB file that declares 1 sample per second
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(1)
        w.writeframes(np.zeros(4000, np.int16).tobytes())
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AF3_MODEL": ""}

    def run(row):
        argv = [re.sub(r"\{(\w+)\}", lambda m: files.get(m.group(1), m.group(0)), a) for a in row[1]]
        return row[0], subprocess.run([sys.executable, "-m", "af3.cli", *argv], check=False, capture_output=True,
                                      text=True, env=env, timeout=300, cwd=str(tmp))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return dict(pool.map(run, ROWS))


def test_there_are_enough_rows():
    assert len(ROWS) >= 50 and len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize(("name", "argv", "pattern"), ROWS, ids=[r[0] for r in ROWS])
def test_a_mistake_is_one_line_and_exit_status_2(results, name, argv, pattern):
    proc = results[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, (proc.returncode, proc.stderr, proc.stdout[-500:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_json_cut_off_by_the_token_limit_says_so_with_exit_status_3(tmp_path):
    """The JSON is printed (the user asked for it) but it is incomplete: stderr says so and the status is 3."""
    clip = tmp_path / "clip.wav"
    write_wav(str(clip), (0.1 * np.sin(np.arange(16000) / 5)).astype(np.float32), 16000)
    schema = json.dumps({"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]})
    proc = subprocess.run([sys.executable, "-m", "af3.cli", "ask", str(clip), "Describe it.", "--json", schema,
                           "--max-new-tokens", "2"], check=False, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AF3_MODEL": ""})
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr and "JSON answer is incomplete" in proc.stderr
    with pytest.raises(json.JSONDecodeError):
        json.loads(proc.stdout)
