"""Tiny random AF3 checkpoints built with the transformers reference implementation (the test oracle).

Everything here runs offline in seconds: a byte-level BPE tokenizer is trained in-process, the reference processor and
model are built from it, and ``save_pretrained`` writes a folder in the HF layout that our code then loads.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from af3.tiny import train_tokenizer  # noqa: E402


# The processor chat template AF3 ships (the same text as transformers' converter writes).
PROCESSOR_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}"
    "{{ m['content'] }}"
    "{% else %}"
    "{% set audio = namespace(found=False) %}"
    "{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or 'audio' in c %}"
    "{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}"
    "{% set text_buf.v = text_buf.v + c['text'] %}"
    "{% endif %}"
    "{% endfor %}"
    "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

_CORPUS = [
    "You are a helpful assistant.",
    "Transcribe the input speech.",
    "The spoken content of the audio is",
    "What is surprising about the relationship between the barking and the music?",
    "How many beeps do you hear? There are three beeps.",
    "the quick brown fox jumps over the lazy dog",
]


def build_tokenizer(vocab_size: int = 400):
    """A Qwen2-like byte-level BPE wrapped as a transformers fast tokenizer."""
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer(_CORPUS, vocab_size)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<sound>"],
    )


def build_processor(max_audio_len: int = 600):
    from transformers import AudioFlamingo3Processor, WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)
    return AudioFlamingo3Processor(
        feature_extractor=fe,
        tokenizer=build_tokenizer(),
        chat_template=PROCESSOR_CHAT_TEMPLATE,
        max_audio_len=max_audio_len,
    )


# Named tiny configurations: (audio_config overrides, text_config overrides).
CONFIGS: dict[str, tuple[dict, dict]] = {
    "base": (
        dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
    ),
    # Odd widths, 3 heads, GQA 6:1, rope theta like Qwen2.5.
    "odd": (
        dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=3, intermediate_size=100),
        dict(
            hidden_size=72, intermediate_size=140, num_hidden_layers=3, num_attention_heads=6,
            num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ),
    ),
    # No GQA (kv heads == heads).
    "mha": (
        dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64),
        dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4),
    ),
}


def build_model(processor, name: str = "base", seed: int = 0):
    from transformers import AudioFlamingo3Config, AudioFlamingo3ForConditionalGeneration

    audio_over, text_over = CONFIGS[name]
    tok = processor.tokenizer
    torch.manual_seed(seed)
    cfg = AudioFlamingo3Config(
        audio_config={"model_type": "audioflamingo3_encoder", "num_mel_bins": 128, "max_source_positions": 1500,
                      **audio_over},
        text_config={
            "model_type": "qwen2",
            "vocab_size": len(tok),
            "max_position_embeddings": 32768,
            "bos_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id,
            **text_over,
        },
        audio_token_id=processor.audio_token_id,
    )
    model = AudioFlamingo3ForConditionalGeneration(cfg).eval()
    # Random weights are small; scale them up a bit so logits are not all ~0 and greedy choices are well separated.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(2.5)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.pad_token_id
    return model


def make_checkpoint(path: str | os.PathLike, name: str = "base", seed: int = 0):
    """Write a processor + model folder in the HF layout; return the reference (processor, model)."""
    processor = build_processor()
    model = build_model(processor, name, seed)
    processor.save_pretrained(path)
    model.save_pretrained(path)
    return processor, model
