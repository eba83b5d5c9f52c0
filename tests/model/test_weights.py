"""Loading and saving checkpoints: HF layout (single, sharded), NVIDIA layout, conversion, errors, memory."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from conftest import synth_audio
from nvidia_layout import make_nvidia_layout
from safetensors.torch import load_file, save_file

from af3 import AF3Model, AF3Processor
from af3.cli import main as cli_main
from af3.errors import CheckpointError, InputError
from af3.model import weights


def reference_inputs(ref_proc):
    convs = [
        [{"role": "user", "content": [{"type": "text", "text": "What is it?"},
                                      {"type": "audio", "audio": synth_audio(3.0)}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Transcribe the input speech."},
                                      {"type": "audio", "audio": synth_audio(7.0, seed=1)}]}],
    ]
    return ref_proc.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True)


def real_positions_logits(model, inputs):
    """Logits of real (unpadded) positions; position ids from the mask so both sides see the same positions."""
    mask = inputs["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(**inputs, position_ids=pos).logits
    return logits[mask.bool()]


def assert_logits_match(ours, ref_model, ref_proc, tol=1e-4):
    inputs = reference_inputs(ref_proc)
    a = real_positions_logits(ours, inputs)
    b = real_positions_logits(ref_model, inputs)
    assert (a - b).abs().max().item() <= tol


def test_hf_checkpoint_loads_with_reference_logits(tiny_ckpt):
    folder, ref_proc, ref_model = tiny_ckpt
    model = AF3Model.from_pretrained(folder)
    assert model.dtype == torch.float32
    assert_logits_match(model, ref_model, ref_proc)
    # Generation defaults come from generation_config.json.
    assert model.generation_config.pad_token_id == ref_model.generation_config.pad_token_id


def test_save_pretrained_sharded_loads_in_af3_and_transformers(tiny_ckpt, tmp_path):
    from transformers import AudioFlamingo3ForConditionalGeneration

    folder, ref_proc, ref_model = tiny_ckpt
    model = AF3Model.from_pretrained(folder)
    model.save_pretrained(tmp_path, max_shard_bytes=200_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / s).is_file() for s in shards)
    assert not [e for e in os.listdir(tmp_path.parent) if e.startswith(f".{tmp_path.name}.")]  # no temporary
    again = AF3Model.from_pretrained(tmp_path)
    assert_logits_match(again, ref_model, ref_proc, tol=1e-4)
    theirs = AudioFlamingo3ForConditionalGeneration.from_pretrained(tmp_path).eval()
    assert_logits_match(model, theirs, ref_proc, tol=1e-4)
    # Saving again unsharded replaces the shards instead of leaving stale files behind.
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]


def test_bfloat16_load_keeps_bfloat16_weights(tiny_ckpt, tmp_path):
    folder, ref_proc, _ = tiny_ckpt
    model = AF3Model.from_pretrained(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert load_file(str(tmp_path / "model.safetensors"))["language_model.lm_head.weight"].dtype == torch.bfloat16
    again = AF3Model.from_pretrained(tmp_path)  # auto dtype = the checkpoint's
    assert again.dtype == torch.bfloat16


def test_nvidia_layout_loads_and_converts(tiny_ckpt, tmp_path):
    from transformers import AudioFlamingo3ForConditionalGeneration, AutoProcessor

    folder, ref_proc, ref_model = tiny_ckpt
    nv = make_nvidia_layout(folder, str(tmp_path / "nv"))
    model = AF3Model.from_pretrained(nv)
    assert_logits_match(model, ref_model, ref_proc)
    proc = AF3Processor.from_pretrained(nv)
    conv = [{"role": "user", "content": [{"type": "audio", "audio": synth_audio(2.0)},
                                         {"type": "text", "text": "What is it?"}]}]
    kw = dict(tokenize=True, add_generation_prompt=True, return_dict=True)
    assert torch.equal(proc.apply_chat_template(conv, **kw)["input_ids"],
                       ref_proc.apply_chat_template(conv, **kw)["input_ids"])

    out = tmp_path / "hf"
    assert cli_main(["convert", nv, str(out)]) == 0
    theirs = AudioFlamingo3ForConditionalGeneration.from_pretrained(out).eval()
    assert_logits_match(theirs, ref_model, ref_proc)
    assert_logits_match(AF3Model.from_pretrained(out), ref_model, ref_proc)
    their_proc = AutoProcessor.from_pretrained(out)
    assert torch.equal(their_proc.apply_chat_template(conv, **kw)["input_ids"],
                       ref_proc.apply_chat_template(conv, **kw)["input_ids"])
    # Converting into an existing folder is refused (exit code 2, nothing overwritten).
    assert cli_main(["convert", nv, str(out)]) == 2


def _copy_ckpt(folder, dst):
    shutil.copytree(folder, dst)
    return dst


def test_missing_and_unexpected_tensors_are_named(tiny_ckpt, tmp_path):
    folder, _, _ = tiny_ckpt
    broken = _copy_ckpt(folder, tmp_path / "broken")
    state = load_file(str(broken / "model.safetensors"))
    del state["audio_tower.layers.1.fc2.bias"]
    state["language_model.extra.weight"] = torch.zeros(2)
    save_file(state, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError) as err:
        AF3Model.from_pretrained(broken)
    assert "audio_tower.layers.1.fc2.bias" in str(err.value)
    assert "language_model.extra.weight" in str(err.value)


def test_wrong_shape_is_named(tiny_ckpt, tmp_path):
    folder, _, _ = tiny_ckpt
    broken = _copy_ckpt(folder, tmp_path / "shape")
    config = json.loads((broken / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 1
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="mlp"):
        AF3Model.from_pretrained(broken)


def test_missing_files_are_checkpoint_errors(tiny_ckpt, tmp_path):
    folder, _, _ = tiny_ckpt
    with pytest.raises(CheckpointError, match="does not exist"):
        AF3Model.from_pretrained(tmp_path / "nothing-here")
    no_config = _copy_ckpt(folder, tmp_path / "noconfig")
    os.remove(no_config / "config.json")
    with pytest.raises(CheckpointError, match="config.json"):
        AF3Model.from_pretrained(no_config)
    no_weights = _copy_ckpt(folder, tmp_path / "noweights")
    os.remove(no_weights / "model.safetensors")
    with pytest.raises(CheckpointError, match="no weights"):
        AF3Model.from_pretrained(no_weights)


def test_pickled_weights_need_explicit_opt_in(tiny_ckpt, tmp_path):
    folder, ref_proc, ref_model = tiny_ckpt
    pickled = _copy_ckpt(folder, tmp_path / "pickled")
    state = load_file(str(pickled / "model.safetensors"))
    os.remove(pickled / "model.safetensors")
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle"):
        AF3Model.from_pretrained(pickled)
    model = AF3Model.from_pretrained(pickled, allow_pickle=True)
    assert_logits_match(model, ref_model, ref_proc)


PEAK_RSS_SCRIPT = r"""
import sys, torch
from af3 import AF3Model

def high_water_mark():  # this process's own peak (ru_maxrss would include the parent's, inherited across exec)
    line = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    return int(line.split()[1]) * 1024

base = high_water_mark()
model = AF3Model.from_pretrained(sys.argv[1])
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print((high_water_mark() - base) / weights)
"""


def test_loading_peak_memory_is_close_to_weight_size(tmp_path):
    """Weights are read tensor by tensor into empty storage: loading costs about one copy of the weights."""
    from af3.config import AF3Config, EncoderConfig, TextConfig

    config = AF3Config(
        audio_config=EncoderConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=1024),
        text_config=TextConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=6,
                               num_attention_heads=8, num_key_value_heads=2, bos_token_id=0, eos_token_id=2,
                               pad_token_id=0),
        audio_token_id=5,
    )
    model = AF3Model(config)
    model.save_pretrained(tmp_path)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    del model
    assert nbytes > 300e6  # big enough that interpreter noise does not matter
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True,
                         check=True)
    ratio = float(out.stdout.strip().splitlines()[-1])
    assert ratio <= 1.15, f"peak RSS while loading grew by {ratio:.2f}x the weights"


def test_module_names_equal_checkpoint_keys(tiny_ckpt):
    """An HF checkpoint is a plain strict load_state_dict: our module names are the on-disk names."""
    from af3.config import AF3Config

    folder, _, _ = tiny_ckpt
    model = AF3Model(AF3Config.from_file(os.path.join(folder, "config.json")))
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=True)


# ---------------------------------------------------------------------- atomic writes
def tree(root) -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(folder, name), "rb") as f:
                out[os.path.relpath(os.path.join(folder, name), root)] = f.read()
    return out


def leftovers(folder) -> list[str]:
    parent, name = os.path.split(os.path.abspath(folder))
    return [e for e in os.listdir(parent) if e.startswith(f".{name}.")]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "interrupted"])
def test_a_save_that_fails_midway_leaves_the_previous_checkpoint(tiny_ckpt, tmp_path, monkeypatch, failure):
    folder, ref_proc, ref_model = tiny_ckpt
    out = tmp_path / "ckpt"
    AF3Model.from_pretrained(folder).save_pretrained(out, max_shard_bytes=200_000)
    AF3Processor.from_pretrained(folder).save_pretrained(out)
    before = tree(out)
    real, written = weights.save_file, []

    def save_file(tensors, path, metadata=None):  # the first shard is written, the second fails
        if written:
            raise failure
        written.append(path)
        real(tensors, path, metadata=metadata)

    monkeypatch.setattr(weights, "save_file", save_file)
    other = AF3Model.from_pretrained(folder, dtype=torch.bfloat16)  # every weight file would change
    with pytest.raises((CheckpointError, KeyboardInterrupt)) as err:
        other.save_pretrained(out, max_shard_bytes=200_000)
    if isinstance(failure, OSError):
        assert err.type is CheckpointError and "No space left on device" in str(err.value)
        assert "previous checkpoint there is unchanged" in str(err.value)
    assert len(written) == 1
    assert tree(out) == before  # byte-identical
    assert leftovers(out) == []  # no temporary folder
    monkeypatch.undo()
    assert_logits_match(AF3Model.from_pretrained(out), ref_model, ref_proc)


def test_a_processor_save_that_fails_leaves_the_old_files(tiny_ckpt, tmp_path, monkeypatch):
    from af3 import processor as processor_module

    folder, _, _ = tiny_ckpt
    out = tmp_path / "ckpt"
    shutil.copytree(folder, out)
    before = tree(out)
    proc = AF3Processor.from_pretrained(folder)
    proc.default_transcription_prompt = "Something else."

    def broken(path, data):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(processor_module, "write_json", broken)
    with pytest.raises(CheckpointError, match="Input/output error"):
        proc.save_pretrained(out)
    assert tree(out) == before and leftovers(out) == []


def test_saves_keep_other_files_drop_stale_shards_and_follow_the_umask(tiny_ckpt, tmp_path):
    folder, ref_proc, ref_model = tiny_ckpt
    model = AF3Model.from_pretrained(folder)
    out = tmp_path / "ckpt"
    old_mask = os.umask(0o027)
    try:
        model.save_pretrained(out, max_shard_bytes=200_000)
        AF3Processor.from_pretrained(folder).save_pretrained(out)  # processor files next to the weights
        (out / "think").mkdir()
        (out / "think" / "adapter_config.json").write_text("{}")
        (out / "notes.txt").write_text("mine")
        model.save_pretrained(out)  # unsharded now
    finally:
        os.umask(old_mask)
    names = sorted(os.listdir(out))
    assert "model.safetensors" in names and not [n for n in names if n.startswith("model-") or "index" in n]
    for kept in ("tokenizer.json", "processor_config.json", "chat_template.jinja", "notes.txt",
                 "think/adapter_config.json"):
        assert (out / kept).is_file(), kept
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        if path.name in ("notes.txt", "adapter_config.json") or path.name == "think":
            continue  # written by this test, not by a save
        assert mode == (0o750 if path.is_dir() else 0o640), (path, oct(mode))
    assert_logits_match(AF3Model.from_pretrained(out), ref_model, ref_proc)


def test_convert_force_replaces_an_existing_folder_whole_and_refuses_a_file(tiny_ckpt, tmp_path):
    folder, ref_proc, ref_model = tiny_ckpt
    nv = make_nvidia_layout(folder, str(tmp_path / "nv"))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    (out / "model-00001-of-00009.safetensors").write_bytes(b"old shard")
    (out / "tokenizer.json").write_text("old tokenizer")
    assert cli_main(["convert", nv, str(out), "--force"]) == 0
    names = set(os.listdir(out))
    assert "stale.txt" not in names and "model-00001-of-00009.safetensors" not in names
    assert_logits_match(AF3Model.from_pretrained(out), ref_model, ref_proc)
    AF3Processor.from_pretrained(out)
    assert leftovers(out) == []
    target = tmp_path / "a-file"
    target.write_text("keep me")
    assert cli_main(["convert", nv, str(target), "--force"]) == 2
    assert target.read_text() == "keep me" and leftovers(target) == []


def test_save_onto_a_file_is_an_input_error(tiny_ckpt, tmp_path):
    folder, _, _ = tiny_ckpt
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(InputError, match="is a file, not a folder"):
        AF3Model.from_pretrained(folder).save_pretrained(target)
    assert target.read_text() == "keep me"
