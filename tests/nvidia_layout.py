"""Turn an HF-layout test checkpoint into NVIDIA's original layout (llm/, sound_tower/, sound_mm_projector/).

This is the inverse of the documented conversion (key prefixes per folder, projector ``linear_1``/``linear_2`` ↔
``layers.0``/``layers.2``), written independently of af3's loader so the loader is tested against it.
"""

from __future__ import annotations

import json
import os
import shutil

from safetensors.torch import load_file, save_file

PREFIXES = {"language_model.": "llm", "audio_tower.": "sound_tower", "multi_modal_projector.": "sound_mm_projector"}


def make_nvidia_layout(hf_folder: str, dst: str, llm_shards: int = 2) -> str:
    state = load_file(os.path.join(hf_folder, "model.safetensors"))
    with open(os.path.join(hf_folder, "config.json")) as f:
        config = json.load(f)
    parts: dict[str, dict] = {sub: {} for sub in PREFIXES.values()}
    for key, tensor in state.items():
        for prefix, sub in PREFIXES.items():
            if key.startswith(prefix):
                name = key[len(prefix):]
                name = name.replace("linear_1.", "layers.0.").replace("linear_2.", "layers.2.")
                parts[sub][name] = tensor.contiguous()
    os.makedirs(dst)
    for sub in parts:
        os.makedirs(os.path.join(dst, sub))
    # llm: sharded safetensors with an index, Qwen2 config, tokenizer files.
    names = sorted(parts["llm"])
    chunks = [names[i::llm_shards] for i in range(llm_shards)]
    weight_map = {}
    for i, chunk in enumerate(chunks):
        fname = f"model-{i + 1:05d}-of-{llm_shards:05d}.safetensors"
        save_file({n: parts["llm"][n] for n in chunk}, os.path.join(dst, "llm", fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    with open(os.path.join(dst, "llm", "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    llm_cfg = dict(config["text_config"], architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    with open(os.path.join(dst, "llm", "config.json"), "w") as f:
        json.dump(llm_cfg, f)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(hf_folder, name), os.path.join(dst, "llm", name))
    # sound tower: Whisper-style field names.
    a = config["audio_config"]
    tower_cfg = {"model_type": "qwen2_audio_encoder", "d_model": a["hidden_size"],
                 "encoder_layers": a["num_hidden_layers"], "encoder_attention_heads": a["num_attention_heads"],
                 "encoder_ffn_dim": a["intermediate_size"], "num_mel_bins": a["num_mel_bins"],
                 "max_source_positions": a["max_source_positions"]}
    with open(os.path.join(dst, "sound_tower", "config.json"), "w") as f:
        json.dump(tower_cfg, f)
    save_file(parts["sound_tower"], os.path.join(dst, "sound_tower", "model.safetensors"))
    with open(os.path.join(dst, "sound_mm_projector", "config.json"), "w") as f:
        json.dump({"mm_projector_type": "mlp", "model_type": "sound_mm_projector"}, f)
    save_file(parts["sound_mm_projector"], os.path.join(dst, "sound_mm_projector", "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump({"model_type": "llava_llama", "llm_cfg": llm_cfg, "sound_tower_cfg": tower_cfg,
                   "sound_mm_projector_cfg": {"mm_projector_type": "mlp"}}, f)
    return dst
