"""``af3 eval`` through the real entry point: each reader on a small file in its published shape, scores computed
by hand from predictions the test chose (written into the output folder first, so the resumed run only scores
them), a real run of the tiny model, resuming, and ``af3 eval synthetic`` equal to the model card's own scorer."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from af3.cli import bundled_clip, embedded_model_path

pytestmark = pytest.mark.skipif(embedded_model_path() is None, reason="this build has no embedded tiny model")


def af3(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "af3.cli", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def prewrite(folder, texts: dict[str, str]) -> None:
    """Predictions as if an earlier run had made them (the resumed run scores them and runs nothing else)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "predictions.jsonl").write_text("".join(
        json.dumps({"id": k, "index": i, "text": t, "error": None}) + "\n" for i, (k, t) in enumerate(texts.items())))


def run_json(*args) -> dict:
    r = af3("eval", *args, "--format", "json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


CHOICES = ["one", "two", "three", "four"]


def mmau_file(folder, rows) -> str:
    shutil.copy(bundled_clip(), folder / "clip.wav")
    data = [{"id": i, "audio_id": "./clip.wav", "question": "How many beeps do you hear?", "choices": CHOICES,
             "answer": answer, "task": task, "difficulty": "easy", "category": "Counting"}
            for i, task, answer in rows]
    (folder / "mmau-test-mini.json").write_text(json.dumps(data))
    return str(folder / "mmau-test-mini.json")


def test_mmau_scores_per_subset_as_counted_by_hand(tmp_path):
    data = mmau_file(tmp_path, [("s1", "sound", "three"), ("s2", "sound", "two"), ("m1", "music", "one"),
                                ("m2", "music", "four"), ("p1", "speech", "three"), ("p2", "speech", "two")])
    out = tmp_path / "run"
    prewrite(out, {"s1": "(C)",                      # letter → three: right
                   "s2": "There are three beeps.",   # text → three: wrong
                   "m1": "b",                        # letter → two: wrong
                   "m2": "The answer is D.",         # letter → four: right
                   "p1": "none of these",            # unmatched: wrong, counted
                   "p2": "I count two beeps"})       # text → two: right
    res = run_json("mmau", "--data", data, "--output-dir", str(out))
    subsets = res["scores"]["subsets"]
    assert list(subsets) == ["sound", "music", "speech"]
    assert [subsets[s]["accuracy"] for s in subsets] == [0.5, 0.5, 0.5]
    overall = res["scores"]["overall"]
    assert overall["correct"] == 3 and overall["items"] == 6 and overall["unmatched"] == 1
    assert overall["rules"] == {"letter": 3, "text": 2, "unmatched": 1}
    assert res["answered"] == 6 and json.loads((out / "results.json").read_text())["scores"] == res["scores"]
    lo, hi = overall["accuracy_ci95"]
    assert lo < 0.5 < hi


def test_a_real_run_answers_like_the_engine_and_resumes(tmp_path):
    data = mmau_file(tmp_path, [("a", "sound", "three"), ("b", "music", "three"), ("c", "speech", "two")])
    out = tmp_path / "run"
    first = run_json("mmau", "--data", data, "--output-dir", str(out), "--limit", "2")
    assert first["answered"] == 2 and first["items_in_data"] == 3
    from af3.eval import load_task
    from af3.generation.engine import Engine, GenerationOptions

    items = load_task("mmau", data)
    engine = Engine.from_pretrained(str(embedded_model_path()))
    want = engine.generate([it.messages for it in items], GenerationOptions(max_new_tokens=128, temperature=0))
    with open(out / "predictions.jsonl") as f:
        got = {r["id"]: r for r in map(json.loads, f)}
    assert {k: got[k]["text"] for k in got} == {"a": want[0].text, "b": want[1].text}
    second = run_json("mmau", "--data", data, "--output-dir", str(out))  # resumes: only "c" runs
    with open(out / "predictions.jsonl") as f:
        lines = [json.loads(line) for line in f]
    assert [r["id"] for r in lines] == ["a", "b", "c"] and lines[2]["text"] == want[2].text
    assert second["answered"] == 3
    r = af3("eval", "mmau", "--data", data, "--output-dir", str(out), "--max-new-tokens", "5")
    assert r.returncode == 2 and "other settings" in r.stderr and r.stderr.count("\n") == 1


def test_librispeech_folder_wer_and_cer_by_hand(tmp_path):
    chapter = tmp_path / "LibriSpeech" / "test-clean" / "1089" / "134686"
    chapter.mkdir(parents=True)
    refs = {"1089-134686-0000": "HE HOPED THERE WOULD BE STEW FOR DINNER",
            "1089-134686-0001": "TURNIPS AND CARROTS AND BRUISED POTATOES"}
    for utt in refs:
        sf.write(chapter / f"{utt}.flac", np.zeros(16000, dtype=np.float32), 16000)
    (chapter / "1089-134686.trans.txt").write_text("".join(f"{k} {v}\n" for k, v in refs.items()))
    out = tmp_path / "run"
    prewrite(out, {"1089-134686-0000": "He hoped there would be stew for dinner.",   # 0 of 8 words wrong
                   "1089-134686-0001": "Turnips and carrots."})                      # 3 of 6 words deleted
    res = run_json("librispeech", "--data", str(tmp_path / "LibriSpeech" / "test-clean"), "--output-dir", str(out))
    overall = res["scores"]["overall"]
    assert overall["wer"] == pytest.approx(3 / 14)
    deleted = len(" and bruised potatoes")
    assert overall["cer"] == pytest.approx(deleted / (len(refs["1089-134686-0000"]) + len(refs["1089-134686-0001"])))


def test_qa_and_nvidia_formats_by_hand(tmp_path):
    shutil.copy(bundled_clip(), tmp_path / "clip.wav")
    rows = [{"id": "q1", "audio": "clip.wav", "question": "What do you hear?", "answer": "beeps"},
            {"id": "q2", "audio": "clip.wav", "question": "Which sound?", "answer": "beep",
             "labels": ["beep", "dog", "rain"], "subset": "labels"},
            {"id": "q3", "audio": "clip.wav", "question": "Exactly?", "answer": "Three beeps", "match": "exact"},
            {"id": "q4", "audio": "clip.wav", "question": "How many?", "answer": "three",
             "choices": ["two", "three"], "subset": "mcq"}]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "qa-run"
    prewrite(out, {"q1": "I hear three beeps.", "q2": "a beep or a dog", "q3": "three beeps.", "q4": "(B)"})
    res = run_json("qa", "--data", str(tmp_path / "qa.jsonl"), "--output-dir", str(out))
    subsets = res["scores"]["subsets"]
    assert subsets["all"]["correct"] == 2 and subsets["all"]["items"] == 2  # contains: yes; exact: yes
    assert subsets["labels"]["correct"] == 0  # two labels named
    assert subsets["mcq"]["correct"] == 1
    nv = {"dataset_path": str(tmp_path), "split_path": str(tmp_path), "flamingo_task": "Counting",
          "data": {"0": {"name": "clip.wav", "prompt": "<sound>\nHow many beeps?\n(A) two\n(B) three",
                         "output": "three"},
                   "1": {"name": "clip.wav", "prompt": "Transcribe the input speech.", "output": "three beeps"},
                   "2": {"name": "clip.wav", "prompt": "Describe the sound.", "output": "beeps"}}}
    (tmp_path / "nv.json").write_text(json.dumps(nv))
    out = tmp_path / "nv-run"
    prewrite(out, {"0": "B", "1": "three deep", "2": "short beeps"})
    res = run_json("nvidia", "--data", str(tmp_path / "nv.json"), "--output-dir", str(out))
    overall = res["scores"]["overall"]
    assert overall["wer"] == pytest.approx(1 / 2)  # one substitution in two words
    assert overall["correct"] == 2 and overall["items"] == 3


def test_synthetic_matches_the_model_cards_scorer(tmp_path):
    from af3 import AF3Model, AF3Processor
    from af3.training.tiny_recipe import task_accuracy

    res = run_json("synthetic", "--n", "3", "--output-dir", str(tmp_path / "synthetic"))
    folder = str(embedded_model_path())
    want = task_accuracy(AF3Model.from_pretrained(folder), AF3Processor.from_pretrained(folder), n=3)
    assert {name: s["accuracy"] for name, s in res["scores"]["subsets"].items()} == want
    assert res["items"] == 15


@pytest.mark.parametrize(("args", "message"), [
    (["bogus", "--data", "x"], "unknown task 'bogus'"),
    (["mmau"], "needs --data"),
    (["mmau", "--data", "/nonexistent.json"], "does not exist"),
    (["synthetic", "--n", "0"], "--n must be between"),
    (["synthetic", "--limit", "0"], "--limit must be at least 1"),
    (["synthetic", "--format", "xml"], "unknown --format"),
])
def test_bad_eval_arguments_are_one_line_and_exit_2(args, message):
    r = af3("eval", *args)
    assert r.returncode == 2 and r.stderr.startswith("error:") and message in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
