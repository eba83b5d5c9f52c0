"""Tiny AF3-architecture checkpoints: same module names, template, ``<sound>`` token and HF layout as the real
model, small enough to build in a second. The embedded model's recipe (``af3.training.tiny_recipe``), the
benchmarks and the tests build their checkpoints from these pieces."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from .chat import DEFAULT_CHAT_TEMPLATE
from .config import MAX_AUDIO_SECONDS, AF3Config, EncoderConfig, TextConfig

# AF3's special tokens, in the order their ids are given (ids 0..3 in a tiny vocabulary).
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<sound>")

BASE_CORPUS = (
    "You are a helpful assistant.",
    "Transcribe the input speech.",
    "How many beeps do you hear? There are three beeps. There is one beep.",
    "Is the tone low, medium or high? The tone is high. The tone is low. The tone is medium.",
    "What kind of noise is this? This is white noise. This is pink noise. This is brown noise.",
    "the quick brown fox jumps over the lazy dog 0123456789",
)


def train_tokenizer(corpus: Iterable[str] = BASE_CORPUS, vocab_size: int = 512) -> Tokenizer:
    """A Qwen2-style byte-level BPE (every byte encodable) trained on ``corpus``, with AF3's special tokens."""
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) * 10, trainer=trainer)
    return tok


def tiny_config(vocab_size: int, width: int = 64, layers: int = 2) -> AF3Config:
    """A small config of the AF3 architecture (the encoder keeps 128 mels and 1500 positions: real features)."""
    return AF3Config(
        audio_config=EncoderConfig(hidden_size=width, num_hidden_layers=layers, num_attention_heads=4,
                                   intermediate_size=2 * width),
        text_config=TextConfig(vocab_size=vocab_size, hidden_size=width, intermediate_size=2 * width,
                               num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=32768, rope_parameters={"rope_type": "default",
                                                                               "rope_theta": 10000.0},
                               bos_token_id=0, eos_token_id=2, pad_token_id=0),
        audio_token_id=3,
    )


def write_tokenizer_files(folder: str, tok: Tokenizer) -> None:
    """``tokenizer.json``, ``tokenizer_config.json``, the chat template and the processor config."""
    from .features import FeatureConfig

    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "tokenizer_class": "Qwen2Tokenizer",
                   "extra_special_tokens": ["<|im_start|>", "<sound>"], "backend": "tokenizers"}, f, indent=2)
    with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(DEFAULT_CHAT_TEMPLATE)
    with open(os.path.join(folder, "processor_config.json"), "w", encoding="utf-8") as f:
        json.dump({"processor_class": "AudioFlamingo3Processor", "audio_token": "<sound>",
                   "default_transcription_prompt": "Transcribe the input speech.", "max_audio_len": MAX_AUDIO_SECONDS,
                   "feature_extractor": FeatureConfig().to_dict()}, f, indent=2)
