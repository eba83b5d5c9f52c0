"""LoRA (stage 3.5): adapters in peft's format, loadable by peft; merge-lora equals the un-merged model."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from af3 import AF3Processor
from af3.model import AF3Model
from af3.training.lora import load_adapter, merge_lora
from af3.training.trainer import train
from safetensors import safe_open
from train_helpers import base_config, make_config, write_manifest


@pytest.fixture(scope="module")
def lora_run(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    manifest = write_manifest(root / "data", 4)
    out = str(root / "run")
    cfg = base_config(tiny_ckpt[0], manifest, out, stage="stage3.5", lora={"r": 4, "alpha": 8, "dropout": 0.0},
                      optim={"lr": 2e-2}, train={"max_steps": 3, "save_every": 3})
    train(make_config(cfg))
    return root, manifest, out


def _inputs(ckpt: str, manifest: str):
    proc = AF3Processor.from_pretrained(ckpt)
    clip = os.path.join(os.path.dirname(manifest), "train_0.wav")
    conv = [{"role": "user", "content": [{"type": "audio", "path": clip}, {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "There are three beeps."}]
    return proc.apply_chat_template(conv, tokenize=True, return_dict=True)


def _logits(model, inputs):
    with torch.no_grad():
        return model.eval()(**inputs).logits


def test_adapter_files_are_peft_format(lora_run, tiny_ckpt):
    _, _, out = lora_run
    folder = os.path.join(out, "checkpoint-000003")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "trainer_state.pt"} <= \
        set(os.listdir(folder))
    assert not os.path.exists(os.path.join(folder, "model.safetensors"))  # only the adapter, not the base
    with open(os.path.join(folder, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8
    assert cfg["base_model_name_or_path"] == tiny_ckpt[0] and cfg["bias"] == "none"
    target = re.compile(cfg["target_modules"])
    model = AF3Model.from_pretrained(tiny_ckpt[0])
    matched = [n for n, _ in model.named_modules() if target.fullmatch(n)]
    layers = model.config.text_config.num_hidden_layers
    assert len(matched) == 7 * layers and all(n.startswith("language_model.model.layers.") for n in matched)

    with safe_open(os.path.join(folder, "adapter_model.safetensors"), "pt") as f:
        names = list(f.keys())
        shapes = {n: tuple(f.get_slice(n).get_shape()) for n in names}
    pattern = re.compile(r"base_model\.model\.language_model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\."
                         r"lora_[AB]\.weight")
    assert len(names) == 2 * 7 * layers and all(pattern.fullmatch(n) for n in names), names[:3]
    q = "base_model.model.language_model.model.layers.0.self_attn.q_proj"
    hidden = model.config.text_config.hidden_size
    assert shapes[f"{q}.lora_A.weight"] == (4, hidden)
    assert shapes[f"{q}.lora_B.weight"][1] == 4


def test_peft_loads_adapter_and_merge_matches(lora_run, tiny_ckpt):
    import peft

    root, manifest, out = lora_run
    adapter = os.path.join(out, "checkpoint-000003")
    inputs = _inputs(tiny_ckpt[0], manifest)
    base_logits = _logits(AF3Model.from_pretrained(tiny_ckpt[0]), inputs)

    with_peft = peft.PeftModel.from_pretrained(AF3Model.from_pretrained(tiny_ckpt[0]), adapter)
    peft_logits = _logits(with_peft, inputs)
    ours = load_adapter(AF3Model.from_pretrained(tiny_ckpt[0]), adapter)
    assert float((_logits(ours, inputs) - peft_logits).abs().max()) <= 1e-5
    assert float((peft_logits - base_logits).abs().max()) > 1e-2  # the adapter changes the model

    merged = merge_lora(None, adapter, str(root / "merged"))  # base from adapter_config.json
    merged_logits = _logits(AF3Model.from_pretrained(merged), inputs)
    assert float((merged_logits - peft_logits).abs().max()) <= 1e-4
    assert os.path.isfile(os.path.join(merged, "tokenizer.json"))
    # The run's final/ is the merged model of the last step (with its adapter alongside).
    final_logits = _logits(AF3Model.from_pretrained(os.path.join(out, "final")), inputs)
    assert float((final_logits - peft_logits).abs().max()) <= 1e-4
    assert os.path.isfile(os.path.join(out, "final", "adapter", "adapter_model.safetensors"))


def test_next_stage_can_start_from_lora_checkpoint(lora_run, tiny_ckpt, tmp_path):
    """A LoRA checkpoint folder (adapter + recorded base) works as model.path: it is loaded merged."""
    from af3.training.model_setup import load_training_model

    _, manifest, out = lora_run
    inputs = _inputs(tiny_ckpt[0], manifest)
    model = load_training_model(os.path.join(out, "checkpoint-000003"))
    assert not any("lora_" in n for n, _ in model.named_parameters())
    final_logits = _logits(AF3Model.from_pretrained(os.path.join(out, "final")), inputs)
    assert float((_logits(model, inputs) - final_logits).abs().max()) <= 1e-4
