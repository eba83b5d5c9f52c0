"""Stage presets freeze and unfreeze the right parameters (and only LoRA weights train in stage 3.5)."""

from __future__ import annotations

import logging
import re

import pytest
from af3.model import AF3Model
from af3.training.config import LoraSection
from af3.training.stages import apply_stage, parameter_counts

# (audio_tower, projector, language_model) expected to train
EXPECTED = {
    "stage1": (False, True, False),
    "stage2": (True, True, False),
    "stage3": (True, True, True),
    "stage4": (True, True, True),
}


def _sizes(model):
    parts = {"audio_tower": 0, "multi_modal_projector": 0, "language_model": 0}
    for name, p in model.named_parameters():
        parts[name.split(".")[0]] += p.numel()
    return parts


@pytest.mark.parametrize("stage", list(EXPECTED))
def test_full_stages_freeze_parts(tiny_ckpt, stage, caplog):
    model = AF3Model.from_pretrained(tiny_ckpt[0])
    sizes = _sizes(model)
    positions = model.audio_tower.embed_positions.weight.numel()
    with caplog.at_level(logging.INFO, logger="af3"):
        out = apply_stage(model, stage)
    assert out is model
    counts = parameter_counts(model)
    for part, trains in zip(("audio_tower", "multi_modal_projector", "language_model"), EXPECTED[stage],
                            strict=True):
        trainable, frozen = counts[part]
        assert trainable + frozen == sizes[part]
        if not trains:
            assert trainable == 0, part
        elif part == "audio_tower":  # Whisper's position table never trains
            assert (trainable, frozen) == (sizes[part] - positions, positions)
        else:
            assert frozen == 0, part
    assert not model.audio_tower.embed_positions.weight.requires_grad
    # The table is logged with one row per part.
    text = caplog.text
    assert "audio_tower" in text and "multi_modal_projector" in text and "language_model" in text and "total" in text


def test_lora_stage_trains_only_adapters(tiny_ckpt):
    model = AF3Model.from_pretrained(tiny_ckpt[0])
    sizes = _sizes(model)
    apply_stage(model, "stage3.5", LoraSection(r=4, alpha=8, dropout=0.0))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    layers = model.config.text_config.num_hidden_layers
    assert len(trainable) == layers * 7 * 2  # q, k, v, o, gate, up, down × (A, B)
    pattern = re.compile(r"language_model\.model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.lora_[AB]\.default\.weight")
    assert all(pattern.fullmatch(n) for n in trainable), trainable[:3]
    counts = parameter_counts(model)
    assert counts["audio_tower"] == (0, sizes["audio_tower"])
    assert counts["multi_modal_projector"] == (0, sizes["multi_modal_projector"])
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert counts["language_model"] == (lora, sizes["language_model"])
    assert not any("lora" in n for n, _ in model.named_modules() if n.startswith(("audio_tower", "multi_modal")))
