"""The command line: answers, one-line errors with exit code 2, the demo."""

from __future__ import annotations

import soundfile as sf
import torch
from conftest import synth_audio

from af3 import AF3Model, AF3Processor
from af3.cli import bundled_clip
from af3.cli import main as cli_main


def library_answer(folder, clip, text, max_new_tokens, strip_prefix=False, quantize=None):
    """The independent expectation: the same request through the Python API (``model.generate``)."""
    model, proc = AF3Model.from_pretrained(folder, quantize=quantize), AF3Processor.from_pretrained(folder)
    conv = [{"role": "user", "content": [{"type": "audio", "path": str(clip)}, {"type": "text", "text": text}]}]
    inputs = proc.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True)
    inputs = inputs.to(model.device, dtype=model.dtype)
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens)
    return proc.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True, strip_prefix=strip_prefix)


def test_ask_prints_the_greedy_answer_of_the_library(tiny_ckpt, tmp_path, capsys):
    folder, _, _ = tiny_ckpt
    clip = tmp_path / "clip.wav"
    sf.write(clip, synth_audio(2.0), 16000)
    assert cli_main(["ask", str(clip), "What is it?", "--model", folder, "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert printed == library_answer(folder, clip, "What is it?", 8) + "\n"


def test_transcribe_prints_the_stripped_transcript(tiny_ckpt, tmp_path, capsys):
    folder, _, _ = tiny_ckpt
    clip = tmp_path / "clip.flac"
    sf.write(clip, synth_audio(1.0), 16000)
    assert cli_main(["transcribe", str(clip), "--model", folder, "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr()
    assert out.err == ""
    assert out.out == library_answer(folder, clip, "Transcribe the input speech.", 6, strip_prefix=True) + "\n"


def test_missing_audio_is_one_line_and_exit_code_2(tiny_ckpt, tmp_path, capsys):
    folder, _, _ = tiny_ckpt
    code = cli_main(["ask", str(tmp_path / "missing.wav"), "What?", "--model", folder])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error:") and "missing.wav" in err and "\n" not in err


def test_bad_model_folder_is_one_line_and_exit_code_2(tmp_path, capsys):
    code = cli_main(["ask", str(bundled_clip()), "What?", "--model", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error:") and "\n" not in err


def test_unknown_dtype_is_an_error(tiny_ckpt, capsys):
    folder, _, _ = tiny_ckpt
    assert cli_main(["ask", str(bundled_clip()), "What?", "--model", folder, "--dtype", "int3"]) == 2
    assert "dtype" in capsys.readouterr().err


def test_demo_answers_about_the_bundled_clip(capsys):
    assert cli_main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "three_beeps.wav" in out and "answer:" in out
    info = sf.info(str(bundled_clip()))
    assert info.samplerate == 16000 and info.frames > 0
    assert torch.tensor(sf.read(str(bundled_clip()))[0]).abs().max() > 0.1


def test_ask_without_streaming_and_with_int8_match_the_library(tiny_ckpt, tmp_path, capsys):
    folder, _, _ = tiny_ckpt
    clip = tmp_path / "clip.wav"
    sf.write(clip, synth_audio(1.5), 16000)
    assert cli_main(["ask", str(clip), "What is it?", "--model", folder, "--max-new-tokens", "6", "--no-stream"]) == 0
    assert capsys.readouterr().out == library_answer(folder, clip, "What is it?", 6) + "\n"

    assert cli_main(["ask", str(clip), "What is it?", "--model", folder, "--max-new-tokens", "6",
                     "--quantize", "int8"]) == 0
    assert capsys.readouterr().out == library_answer(folder, clip, "What is it?", 6, quantize="int8") + "\n"


def test_transcribe_long_audio_as_subtitles(tiny_ckpt, tmp_path, capsys):
    from af3 import longform

    folder, _, _ = tiny_ckpt
    wave = synth_audio(70.0)
    wave[int(31 * 16000):int(33 * 16000)] = 0  # a pause near the first 30 s boundary
    clip = tmp_path / "long.wav"
    sf.write(clip, wave, 16000)
    assert cli_main(["transcribe", str(clip), "--model", folder, "--max-new-tokens", "4", "--format", "json"]) == 0
    import json

    printed = json.loads(capsys.readouterr().out)
    model, proc = AF3Model.from_pretrained(folder), AF3Processor.from_pretrained(folder)
    expected = longform.transcribe_long(model, proc, str(clip), max_new_tokens=4)
    assert len(expected.segments) >= 3
    assert [(s["start"], s["end"], s["text"]) for s in printed["segments"]] == \
        [(round(s.start, 3), round(s.end, 3), s.text) for s in expected.segments]

    assert cli_main(["transcribe", str(clip), "--model", folder, "--max-new-tokens", "4", "--format", "srt"]) == 0
    assert capsys.readouterr().out == longform.to_srt(expected).rstrip("\n") + "\n"
    assert cli_main(["transcribe", str(clip), "--model", folder, "--format", "doc"]) == 2
    assert "--format" in capsys.readouterr().err


def test_bad_json_schema_and_missing_think_adapter_are_one_line_errors(tiny_ckpt, capsys):
    folder, _, _ = tiny_ckpt
    clip = str(bundled_clip())
    assert cli_main(["ask", clip, "What?", "--model", folder, "--json", "{not json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --json") and "\n" not in err
    assert cli_main(["ask", clip, "What?", "--model", folder, "--think"]) == 2
    err = capsys.readouterr().err.strip()
    assert "think adapter" in err and "\n" not in err


def test_demo_without_the_embedded_model_says_how_to_make_it(monkeypatch, capsys):
    import af3.cli

    monkeypatch.setattr(af3.cli, "embedded_model_path", lambda: None)
    assert cli_main(["demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "af3 train tiny --install" in err and "\n" not in err


def test_ask_takes_several_audios_in_one_turn(tiny_ckpt, tmp_path, capsys):
    folder, _, _ = tiny_ckpt
    a, b = tmp_path / "a.wav", tmp_path / "b.flac"
    sf.write(a, synth_audio(1.0, seed=1), 16000)
    sf.write(b, synth_audio(2.0, seed=2), 16000)
    assert cli_main(["ask", str(a), str(b), "Which is longer?", "--model", folder, "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    model, proc = AF3Model.from_pretrained(folder), AF3Processor.from_pretrained(folder)
    conv = [{"role": "user", "content": [{"type": "audio", "path": str(a)}, {"type": "audio", "path": str(b)},
                                         {"type": "text", "text": "Which is longer?"}]}]
    inputs = proc.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert int((inputs["input_ids"] == model.config.audio_token_id).sum()) == 25 + 50  # both clips in the prompt
    ids = model.generate(**inputs, max_new_tokens=8)
    assert printed == proc.decode(ids[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True) + "\n"


def test_debug_adds_the_traceback_to_the_one_line_error(tmp_path, capsys):
    assert cli_main(["ask", str(bundled_clip()), "q", "--model", str(tmp_path / "nope")]) == 2
    quiet = capsys.readouterr().err
    assert "Traceback" not in quiet and quiet.count("\n") == 1
    assert cli_main(["--debug", "ask", str(bundled_clip()), "q", "--model", str(tmp_path / "nope")]) == 2
    loud = capsys.readouterr().err
    assert "Traceback (most recent call last)" in loud and loud.rstrip().endswith(quiet.rstrip())
