"""``af3 batch`` as a user runs it (subprocesses of the real entry point, the embedded tiny model): answers equal
the Engine's for the same conversations, bad items are written with their error while the run goes on, a run
killed with SIGKILL resumes to exactly one line per id, and two shards (``--shard`` and torchrun) merged equal one
process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from af3.batch.results import ResultsFile, read_records
from af3.cli import embedded_model_path
from af3.errors import InputError
from af3.training import synthetic as S

pytestmark = pytest.mark.skipif(embedded_model_path() is None, reason="this build has no embedded tiny model")


def af3(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", "af3.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, **kw)


def jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def count_clip(path, seed: int) -> tuple[int, float]:
    """A synthetic count clip (the kind the tiny model was trained on) → (beeps, seconds)."""
    sample = S.make_sample("count", np.random.default_rng(seed))
    sf.write(path, sample.audio, S.SR)
    return sample.label["count"], sample.duration


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """12 count questions (1-4 beeps), one missing file and one file that is not audio."""
    d = tmp_path_factory.mktemp("batch")
    (d / "clips").mkdir()
    lines = []
    for i in range(12):
        beeps, seconds = count_clip(d / "clips" / f"c{i}.wav", i)
        lines.append({"id": f"c{i}", "audio": f"clips/c{i}.wav", "prompt": "How many beeps do you hear?",
                      "beeps": beeps, "seconds": seconds})  # (keys a manifest may carry; af3 ignores them)
    lines.insert(3, {"id": "missing", "audio": "clips/nope.wav", "prompt": "How many beeps?"})
    (d / "clips" / "junk.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunkjunkjunk")
    lines.insert(7, {"id": "junk", "audio": "clips/junk.wav", "prompt": "How many beeps?"})
    lines.append({"id": "conv", "messages": [
        {"role": "system", "content": "You are a careful listener."},
        {"role": "user", "content": [{"type": "audio", "path": "clips/c1.wav"},
                                     {"type": "text", "text": "How many beeps do you hear?"}]}]})
    path = d / "manifest.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path, lines


def engine_answers(lines, folder) -> dict[str, str]:
    """The independent expectation: each good conversation through the Engine in this process."""
    from af3.batch.manifest import read_manifest
    from af3.generation.engine import Engine, GenerationOptions

    engine = Engine.from_pretrained(str(embedded_model_path()))
    items = [it for it in read_manifest(folder / "manifest.jsonl") if it.id not in ("missing", "junk")]
    outs = engine.generate([it.messages for it in items], GenerationOptions(max_new_tokens=16, temperature=0))
    return {it.id: o.text for it, o in zip(items, outs, strict=True)}


def by_id(path) -> dict[str, dict]:
    records = jsonl(path)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"duplicate ids in {path}"
    return {r["id"]: r for r in records}


def test_batch_writes_one_record_per_item_with_the_engines_answers_and_errors_for_bad_items(manifest, tmp_path):
    path, lines = manifest
    out = tmp_path / "out.jsonl"
    r = af3("batch", str(path), "--output", str(out), "--max-new-tokens", "16", "--batch-size", "4",
            "--format", "json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["done"] == len(lines) and report["errors"] == 2 and report["skipped"] == 0
    got = by_id(out)
    assert set(got) == {x["id"] for x in lines}
    assert "nope.wav" in got["missing"]["error"] and got["missing"]["text"] is None
    assert got["junk"]["error"] and got["junk"]["text"] is None
    expected = engine_answers(lines, path.parent)
    assert {k: got[k]["text"] for k in expected} == expected
    for k in expected:
        rec = got[k]
        assert rec["error"] is None and rec["completion_tokens"] >= 1 and rec["finish_reason"] in ("stop", "length")
        line = next(x for x in lines if x["id"] == k)
        if k != "conv":
            assert rec["audio_seconds"] == pytest.approx(line["seconds"], abs=0.1)
        assert rec["index"] == lines.index(line)
    # the count answers are right for most clips (the tiny model's card: well above chance)
    right = sum(S.parse_answer("count", got[x["id"]]["text"]) == x["beeps"] for x in lines if "beeps" in x)
    assert right >= 9


def test_an_existing_output_is_never_overwritten_without_asking(manifest, tmp_path):
    path, _ = manifest
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "c0", "text": "kept"}\n')
    r = af3("batch", str(path), "--output", str(out))
    assert r.returncode == 2 and r.stderr.startswith("error:") and "--resume" in r.stderr
    assert out.read_text() == '{"id": "c0", "text": "kept"}\n'


def test_a_run_killed_with_sigkill_resumes_to_exactly_one_line_per_id(manifest, tmp_path):
    path, lines = manifest
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "af3.cli", "batch", str(path), "--output", str(out),
                             "--batch-size", "1", "--max-new-tokens", "16"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 4):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = by_id(out)
    assert 4 <= len(before) < len(lines), "the kill came too late to test a resume"
    with open(out, "a") as f:  # and as if the kill had come in the middle of writing a line
        f.write('{"id": "c11", "index": 14, "text": "There are thr')
    r = af3("batch", str(path), "--output", str(out), "--resume", "--max-new-tokens", "16", "--format", "json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["skipped"] == len(before) and report["done"] == len(lines) - len(before)
    after = by_id(out)  # asserts no id twice
    assert set(after) == {x["id"] for x in lines}
    assert all(after[k] == v for k, v in before.items())  # what was written before the kill is untouched
    assert after["c11"]["text"] and not after["c11"]["text"].endswith("thr")


def test_two_shards_merged_equal_one_process(manifest, tmp_path):
    path, lines = manifest
    one = tmp_path / "one.jsonl"
    assert af3("batch", str(path), "--output", str(one), "--max-new-tokens", "16").returncode == 0
    out = tmp_path / "sharded.jsonl"
    procs = [subprocess.Popen([sys.executable, "-m", "af3.cli", "batch", str(path), "--output", str(out),
                               "--shard", f"{i}/2", "--max-new-tokens", "16"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    shard0, shard1 = by_id(tmp_path / "sharded.rank0.jsonl"), by_id(tmp_path / "sharded.rank1.jsonl")
    assert not set(shard0) & set(shard1) and len(shard0) + len(shard1) == len(lines)
    assert {r["index"] % 2 for r in shard0.values()} == {0}
    r = af3("batch", "merge", str(out), "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["records"] == len(lines)
    merged = jsonl(out)
    assert [m["id"] for m in merged] == [x["id"] for x in lines]  # manifest order
    single = by_id(one)
    assert {m["id"]: (m["text"], m["error"]) for m in merged} == {k: (v["text"], v["error"]) for k, v in single.items()}


@pytest.mark.skipif(shutil.which("torchrun", path=os.path.dirname(sys.executable)) is None,
                    reason="torchrun is not installed next to this python")
def test_torchrun_with_two_processes_shards_by_rank(manifest, tmp_path):
    path, lines = manifest
    out = tmp_path / "tr.jsonl"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    r = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "af3.batch", str(path),
                        "--output", str(out), "--max-new-tokens", "16"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    ranks = [by_id(tmp_path / f"tr.rank{i}.jsonl") for i in range(2)]
    assert sorted([*ranks[0], *ranks[1]]) == sorted(x["id"] for x in lines)
    assert af3("batch", "merge", str(out)).returncode == 0
    assert [r["id"] for r in jsonl(out)] == [x["id"] for x in lines]


def test_results_file_drops_a_torn_last_line_and_refuses_a_damaged_one(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "te')
    with ResultsFile(path, resume=True) as results:
        assert set(results.done) == {"a", "b"}
        results.write({"id": "c", "text": "done"})
    assert [r["id"] for r in read_records(str(path))[0]] == ["a", "b", "c"]
    path.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n')
    with pytest.raises(InputError, match=r"r.jsonl:2 is not a record"):
        ResultsFile(path, resume=True)
    path.write_text('{"id": "a"}\n{"id": "b"}')  # complete JSON without its newline: written again
    with ResultsFile(path, resume=True) as results:
        assert set(results.done) == {"a"}
    assert path.read_text() == '{"id": "a"}\n'
