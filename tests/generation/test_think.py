"""Think mode: the checkpoint's LoRA adapter switched on per request, in batches that mix both kinds of rows."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from conftest import load_ours, synth_audio
from safetensors.torch import save_file

from af3 import AF3Processor
from af3.errors import CheckpointError, InputError
from af3.generation.engine import Engine
from af3.model.adapters import THINK_SUFFIX

TARGETS = ["self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"]


def write_adapter(folder, model, r=4, alpha=8.0, prefix="base_model.model.language_model.model."):
    """A peft-format LoRA folder with random A and B (peft itself initialises B to zero: a no-op adapter)."""
    g = torch.Generator().manual_seed(0)
    tensors, weights = {}, {}
    for i, layer in enumerate(model.language_model.model.layers):
        for t in TARGETS:
            lin = layer.get_submodule(t)
            a = torch.randn(r, lin.in_features, generator=g) * 0.3
            b = torch.randn(lin.out_features, r, generator=g) * 0.3
            tensors[f"{prefix}layers.{i}.{t}.lora_A.weight"] = a
            tensors[f"{prefix}layers.{i}.{t}.lora_B.weight"] = b
            weights[f"language_model.model.layers.{i}.{t}"] = (a, b)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj", "down_proj"]}))
    return weights, alpha / r


def merged(model, weights, scale):
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, (a, b) in weights.items():
            m.get_submodule(name).weight += scale * (b @ a)
    return m


def conv(seed, text="What is it?"):
    return [{"role": "user", "content": [{"type": "audio", "audio": synth_audio(2.0, seed)},
                                         {"type": "text", "text": text}]}]


def with_suffix(c):
    c = copy.deepcopy(c)
    c[-1]["content"][-1]["text"] += THINK_SUFFIX
    return c


@pytest.fixture(scope="module")
def setup(ckpt_factory, tmp_path_factory):
    folder, _, _ = ckpt_factory("base")
    model, proc = load_ours(folder), AF3Processor.from_pretrained(folder)
    adapter = tmp_path_factory.mktemp("adapter") / "think"
    weights, scale = write_adapter(adapter, model)
    return folder, model, proc, adapter, merged(model, weights, scale)


def greedy(model, proc, c, n=12):
    inputs = proc.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=True)
    ids = model.generate(**inputs, max_new_tokens=n, min_new_tokens=n)
    return ids[0, inputs["input_ids"].shape[1]:].tolist()


def test_think_rows_use_the_adapter_and_plain_rows_do_not_in_one_batch(setup):
    _, model, proc, adapter, think_model = setup
    engine = Engine(model, proc, think_adapter=str(adapter))
    plain = engine.submit(conv(1), max_new_tokens=12, min_new_tokens=12)
    think = engine.submit(conv(2), max_new_tokens=12, min_new_tokens=12, think=True)
    engine._wait([plain, think])
    assert plain.output.token_ids == greedy(model, proc, conv(1))
    assert think.output.token_ids == greedy(think_model, proc, with_suffix(conv(2)))
    assert think.output.token_ids != greedy(model, proc, with_suffix(conv(2)))  # the adapter changes answers


def test_from_pretrained_finds_the_think_folder(setup, tmp_path):
    folder, _, proc, adapter, think_model = setup
    ckpt = tmp_path / "ckpt"
    shutil.copytree(folder, ckpt)
    shutil.copytree(adapter, ckpt / "think")
    engine = Engine.from_pretrained(str(ckpt))
    assert engine.generate(conv(3), max_new_tokens=8, min_new_tokens=8, think=True).token_ids == \
        greedy(think_model, proc, with_suffix(conv(3)), 8)
    with pytest.raises(InputError, match="think adapter"):
        Engine.from_pretrained(folder, think="auto").generate(conv(3), think=True)
    with pytest.raises(InputError):
        Engine.from_pretrained(folder, think=True)


def test_think_prefix_cache_is_kept_apart(setup):
    _, model, proc, adapter, _ = setup
    engine = Engine(model, proc, think_adapter=str(adapter))
    engine.generate(conv(4), max_new_tokens=4)
    out = engine.generate(conv(4), max_new_tokens=4, think=True)
    assert out.cached_prompt_tokens == 0 or out.cached_prompt_tokens < 5  # only the shared system-prompt head may
    # match in principle; entries made without the adapter are never reused for think rows
    assert engine.generate(conv(4), max_new_tokens=4).cached_prompt_tokens > 0


def test_bad_adapters_are_checkpoint_errors(setup, tmp_path):
    _, model, proc, adapter, _ = setup
    bad = tmp_path / "bad"
    shutil.copytree(adapter, bad)
    save_file({"base_model.model.audio_tower.layers.0.fc1.lora_A.weight": torch.zeros(2, 2)},
              str(bad / "adapter_model.safetensors"))
    with pytest.raises(CheckpointError, match="decoder"):
        Engine(model, proc, think_adapter=str(bad))
    with pytest.raises(CheckpointError, match="adapter"):
        Engine(model, proc, think_adapter=str(tmp_path))
