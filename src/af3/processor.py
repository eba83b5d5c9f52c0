"""Conversations and audio → the model's input tensors; generated ids → text.

``AF3Processor`` reproduces transformers' ``AudioFlamingo3Processor`` (same keys, dtypes, shapes, ids, labels) and
adds what training and chat need: several audios per message or per conversation, ``assistant_only`` labels, any
sampling rate, and clear errors.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .audio import load_audio
from .fetch import DEFAULT_POLICY, FetchPolicy
from .chat import ChatTemplate, RenderedChat, TextTokenizer, read_chat_template
from .config import IGNORE_INDEX, MAX_AUDIO_SECONDS, folder_path, is_nvidia_layout, read_json, write_json
from .config_checks import describe
from .errors import AudioError, CheckpointError, InputError
from .features import FeatureConfig, extract_features
from .files import atomic_folder

logger = logging.getLogger("af3")

DEFAULT_TRANSCRIPTION_PROMPT = "Transcribe the input speech."
# Sentences the model puts before a transcription; ``decode(strip_prefix=True)`` removes them.
TRANSCRIPTION_PREFIXES = (
    "The spoken content of the audio is",
    "The transcription of the audio is",
    "The content of the input audio is",
)


class AF3Inputs(dict):
    """A batch of model inputs: a dict of tensors with attribute access and a dtype-aware ``.to``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> AF3Inputs:
        """Move every tensor to ``device``; cast only floating tensors (audio features) to ``dtype``."""
        out = AF3Inputs()
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                cast = dtype if dtype is not None and value.is_floating_point() else None
                out[key] = value.to(device=device, dtype=cast)
            else:
                out[key] = value
        return out


def _as_list(x: Any) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _is_batch_of_conversations(conversation: Any) -> bool:
    return (isinstance(conversation, (list, tuple)) and len(conversation) > 0
            and isinstance(conversation[0], (list, tuple)))


def load_audio_part(part: dict, sampling_rate: int | None = None, **load_kwargs: Any) -> np.ndarray:
    """Decode one audio part of a message (any of the spellings users and APIs send). ``load_kwargs`` go to
    :func:`af3.audio.load_audio` (``max_seconds``, ``policy``, ``max_bytes``, ...)."""
    rate = part.get("sampling_rate", sampling_rate)
    limit = _byte_cap(load_kwargs)
    if "input_audio" in part:  # OpenAI: {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}}
        inner = part["input_audio"]
        data = inner.get("data") if isinstance(inner, dict) else inner
        if not isinstance(data, str):
            raise AudioError("input_audio.data must be a base64 string")
        return load_audio(_b64decode(data, limit), **load_kwargs)
    if "audio_url" in part:  # {"type": "audio_url", "audio_url": {"url": ...}}
        inner = part["audio_url"]
        url = inner.get("url") if isinstance(inner, dict) else inner
        return load_audio(url, **load_kwargs)
    if "base64" in part:
        if not isinstance(part["base64"], str):
            raise AudioError("an audio part's base64 must be a string")
        return load_audio(_b64decode(part["base64"], limit), **load_kwargs)
    for key in ("audio", "array", "path", "url"):
        if key in part and part[key] is not None:
            return load_audio(part[key], sampling_rate=rate, **load_kwargs)
    raise AudioError("an audio part needs one of 'path', 'url', 'audio', 'array' or 'base64'")


def _byte_cap(load_kwargs: dict) -> int | None:
    """The byte cap a load with these keywords applies to encoded data (checked before base64 is decoded)."""
    if load_kwargs.get("max_bytes") is not None:
        return load_kwargs["max_bytes"]
    policy = load_kwargs.get("policy")
    return (policy if isinstance(policy, FetchPolicy) else DEFAULT_POLICY).max_bytes


def _b64decode(data: str, max_bytes: int | None = None) -> bytes:
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    if max_bytes is not None and len(data) // 4 * 3 > max_bytes:
        raise AudioError(f"the base64 audio is too large: about {len(data) // 4 * 3} bytes, the limit is {max_bytes} "
                         "bytes")
    try:
        return base64.b64decode(data, validate=True)
    except ValueError:
        raise AudioError("audio data is not valid base64") from None


def _settings_problem(audio_token: Any, default_transcription_prompt: Any, max_audio_len: Any,
                      features: FeatureConfig) -> str | None:
    """What is wrong with the processor's own settings, or None."""
    if not isinstance(audio_token, str) or not audio_token:
        return f"audio_token must be a non-empty string, got {describe(audio_token)}"
    if not isinstance(default_transcription_prompt, str):
        return f"default_transcription_prompt must be a string, got {describe(default_transcription_prompt)}"
    if isinstance(max_audio_len, bool) or not isinstance(max_audio_len, (int, float)) \
            or not features.chunk_length <= max_audio_len < float("inf"):
        return (f"max_audio_len must be a number of seconds >= chunk_length ({features.chunk_length}: one window), "
                f"got {describe(max_audio_len)}")
    return None


def _check_fits_model(processor: AF3Processor, config_path: str) -> None:
    """The processor must fit the model of the same folder: its ``<sound>`` id, vocabulary size, mel bins and
    frames per window. (A broken or missing config.json is the model loader's to report.)"""
    try:
        config = read_json(config_path)
    except CheckpointError:
        return
    text = config.get("text_config", config)  # NVIDIA's llm/config.json is the text config itself
    audio = config.get("audio_config")
    fe, tok = processor.feature_config, processor.tokenizer
    checks = []
    if "text_config" in config:
        checks.append(("audio_token_id", config.get("audio_token_id"), processor.audio_token_id,
                       f"tokenizer.json gives {processor.audio_token!r} the id {processor.audio_token_id}"))
    if isinstance(text, dict):
        vocab, top = text.get("vocab_size"), max(tok.tokenizer.get_vocab(with_added_tokens=True).values(), default=0)
        if isinstance(vocab, int) and top >= vocab:
            raise CheckpointError(f"{config_path}: text_config.vocab_size is {vocab} but tokenizer.json has token ids "
                                  f"up to {top}; the tokenizer and the model are from different checkpoints")
    if isinstance(audio, dict):
        checks.append(("audio_config.num_mel_bins", audio.get("num_mel_bins"), fe.feature_size,
                       f"the feature extractor makes {fe.feature_size} mel bins (feature_size)"))
        positions = audio.get("max_source_positions")
        if isinstance(positions, int):
            checks.append(("audio_config.max_source_positions x 2", 2 * positions, fe.nb_max_frames,
                           f"the feature extractor makes {fe.nb_max_frames} frames per window"))
    for name, value, want, why in checks:
        if isinstance(value, int) and value != want:
            raise CheckpointError(f"{config_path}: {name} is {value} but {why}; the processor files and the model "
                                  "are from different checkpoints")


class AF3Processor:
    """Tokenizer + chat template + Whisper-style feature extractor for Audio Flamingo 3."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        feature_config: FeatureConfig | None = None,
        chat_template: str | None = None,
        audio_token: str = "<sound>",
        default_transcription_prompt: str = DEFAULT_TRANSCRIPTION_PROMPT,
        max_audio_len: float = MAX_AUDIO_SECONDS,
    ):
        self.tokenizer = tokenizer
        self.feature_config = feature_config or FeatureConfig()
        if not isinstance(self.feature_config, FeatureConfig):
            raise InputError(f"feature_config must be a FeatureConfig, got {type(feature_config).__name__}")
        problem = _settings_problem(audio_token, default_transcription_prompt, max_audio_len, self.feature_config)
        if problem:
            raise InputError(f"AF3Processor: {problem}")
        self.audio_token = audio_token
        self.default_transcription_prompt = default_transcription_prompt
        self.max_audio_len = max_audio_len
        self.audio_token_id = tokenizer.token_id(audio_token)
        if self.audio_token_id is None:
            raise CheckpointError(f"the tokenizer has no {audio_token!r} token (the processor's audio_token); is this "
                                  "an AF3 checkpoint? AF3's tokenizer has '<sound>'")
        for role in ("eos_token", "pad_token"):
            token = getattr(tokenizer, role)
            if token is not None and tokenizer.token_id(token) is None:
                raise CheckpointError(f"tokenizer_config.json names {role} {token!r}, which tokenizer.json does not "
                                      "have; fix the token in tokenizer_config.json")
        if tokenizer.eos_token_id is None and tokenizer.pad_token_id is None:
            raise CheckpointError("tokenizer_config.json sets neither eos_token nor pad_token; AF3 needs "
                                  "\"eos_token\": \"<|im_end|>\" there to end turns and pad batches")
        self.chat_template = ChatTemplate(chat_template, audio_token, tokenizer.eos_token)
        self.chat_template._template  # noqa: B018 (compiles now: a broken template is a load error, not a 500 later)

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> AF3Processor:
        """Load from a local folder in the HF layout (``tokenizer.json``, ``processor_config.json`` or
        ``preprocessor_config.json``, a chat template file).

        Every problem of the folder is a :class:`CheckpointError` naming the file and the field: settings of the
        wrong type or out of range, a template that does not compile, special tokens the tokenizer lacks, and a
        processor that does not fit the model of the same folder (``<sound>`` id, vocabulary, mel bins, frames).
        """
        folder = folder_path(path)
        if not os.path.exists(folder):
            raise CheckpointError(f"checkpoint folder {folder!r} does not exist")
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder!r} is a file, not a checkpoint folder; pass the folder that holds "
                                  "tokenizer.json and config.json")
        if is_nvidia_layout(folder) and not os.path.isfile(os.path.join(folder, "tokenizer.json")):
            # NVIDIA's layout: the tokenizer lives in llm/; its chat template is the LLM's text-only one, so the
            # AF3 processor template is used instead.
            processor = cls(TextTokenizer.from_folder(os.path.join(folder, "llm")), FeatureConfig(), None)
            _check_fits_model(processor, os.path.join(folder, "llm", "config.json"))
            return processor
        tokenizer = TextTokenizer.from_folder(folder)
        proc_cfg: dict[str, Any] = {}
        proc_path = os.path.join(folder, "processor_config.json")
        if os.path.exists(proc_path):
            proc_cfg = read_json(proc_path)
        fe_cfg, fe_path = proc_cfg.get("feature_extractor"), proc_path
        pre_path = os.path.join(folder, "preprocessor_config.json")
        if fe_cfg is None and os.path.exists(pre_path):
            fe_cfg, fe_path = read_json(pre_path), pre_path
        if fe_cfg is not None and not isinstance(fe_cfg, dict):
            raise CheckpointError(f"{fe_path}: feature_extractor must be an object, got {describe(fe_cfg)}")
        try:
            features = FeatureConfig.from_dict(fe_cfg or {})
        except CheckpointError as e:
            raise CheckpointError(f"{fe_path}: {e}; fix it in that file") from None
        settings = {"audio_token": "<sound>", "default_transcription_prompt": DEFAULT_TRANSCRIPTION_PROMPT,
                    "max_audio_len": MAX_AUDIO_SECONDS}
        settings.update({k: proc_cfg[k] for k in settings if k in proc_cfg})
        problem = _settings_problem(**settings, features=features)
        if problem:
            raise CheckpointError(f"{proc_path}: {problem}; fix it in that file")
        processor = cls(tokenizer, features, read_chat_template(folder), **settings)
        _check_fits_model(processor, os.path.join(folder, "config.json"))
        return processor

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write the processor files in the layout transformers writes (and reads back), through
        :func:`af3.files.atomic_folder`: the folder's other files (the model's) are kept, and a crash leaves the
        old files or the new ones, never a mix."""
        folder = folder_path(path, "output folder")
        try:
            with atomic_folder(folder, keep_existing=True) as tmp:
                self.save_files(tmp)
        except OSError as e:
            raise CheckpointError(f"cannot write the processor files to {folder!r}: {e.strerror or e}; check that "
                                  "the folder is writable and the disk has room") from None

    def save_files(self, folder: str) -> None:
        """Write the processor files into ``folder`` as they are (no atomic swap: for a folder being built)."""
        self.tokenizer.save(folder)
        with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(self.chat_template.source)
        write_json(os.path.join(folder, "processor_config.json"), {
            "processor_class": "AudioFlamingo3Processor",
            "audio_token": self.audio_token,
            "default_transcription_prompt": self.default_transcription_prompt,
            "max_audio_len": self.max_audio_len,
            "feature_extractor": self.feature_config.to_dict(),
        })

    # ------------------------------------------------------------------ ids
    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else self.tokenizer.eos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    # ------------------------------------------------------------------ tensors
    def __call__(
        self,
        text: str | Sequence[str],
        audio: Any = None,
        *,
        sampling_rate: int | None = None,
        output_labels: bool = False,
        padding_side: str = "left",
        max_audio_len: float | None = None,
        return_tensors: str = "pt",
        assistant_spans: Sequence[Sequence[tuple[int, int]]] | None = None,
    ) -> AF3Inputs:
        """Tokenize prompts that contain one ``<sound>`` per audio (in order, across the batch) and featurize
        the audio. Returns ``input_ids``, ``attention_mask`` (+ ``input_features``, ``input_features_mask`` when
        there is audio, + ``labels`` when ``output_labels``).

        ``assistant_spans`` (one list of character spans per text) restricts labels to those spans; it is what
        :meth:`apply_chat_template` passes for ``assistant_only=True``.
        """
        if return_tensors != "pt":
            raise InputError(f"return_tensors={return_tensors!r} is not supported; only 'pt'")
        if padding_side not in ("left", "right"):
            raise InputError(f"padding_side must be 'left' or 'right', not {padding_side!r}")
        if not isinstance(text, (str, Sequence)):
            raise InputError(f"text must be a string or a non-empty list of strings, not {type(text).__name__}")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise InputError("text must be a string or a non-empty list of strings")
        audios = [] if audio is None else _as_list(audio)
        if (isinstance(audio, np.ndarray) and audio.ndim == 2 and len(texts) > 1) or (
            isinstance(audio, torch.Tensor) and audio.dim() == 2 and len(texts) > 1
        ):
            audios = list(audio)  # a [B, T] array: one row per prompt
        n_placeholders = sum(t.count(self.audio_token) for t in texts)
        if n_placeholders != len(audios):
            raise InputError(
                f"the text has {n_placeholders} {self.audio_token} placeholder(s) but {len(audios)} audio(s) were "
                f"given; put exactly one {self.audio_token} in the text for each audio"
            )

        out = AF3Inputs()
        counts: list[int] = []
        if audios:
            cap = self.max_audio_len if max_audio_len is None else max_audio_len
            # Only the first `cap` seconds are decoded: a 2-hour file costs what 10 minutes cost.
            waves = [load_audio(a, sampling_rate=sampling_rate, max_seconds=cap) for a in audios]
            feats = extract_features(waves, self.feature_config, cap)
            counts = list(feats.tokens_per_audio)
            out["input_features"] = feats.input_features
            out["input_features_mask"] = feats.input_features_mask

        expanded, shifts = [], []
        it = iter(counts)
        for t in texts:
            e, s = self._expand(t, it)
            expanded.append(e)
            shifts.append(s)
        encodings = self.tokenizer.encode_batch(expanded)
        ids, mask = self._pad([e.ids for e in encodings], padding_side)
        result = AF3Inputs(input_ids=ids, attention_mask=mask)
        result.update(out)
        if output_labels:
            labels = ids.clone()
            labels[ids == self.audio_token_id] = IGNORE_INDEX
            labels[ids == self.pad_token_id] = IGNORE_INDEX
            if assistant_spans is not None:
                keep = torch.zeros_like(mask, dtype=torch.bool)
                for row, (enc, spans, shift) in enumerate(zip(encodings, assistant_spans, shifts, strict=True)):
                    mapped = [(shift(a), shift(b)) for a, b in spans]
                    offset = ids.shape[1] - len(enc.ids) if padding_side == "left" else 0
                    for k, (start, _end) in enumerate(enc.offsets):
                        if any(a <= start < b for a, b in mapped):
                            keep[row, offset + k] = True
                labels[~keep] = IGNORE_INDEX
            result["labels"] = labels
        return result

    def _expand(self, text: str, counts) -> tuple[str, Any]:
        """Replace each placeholder by one per audio frame; also return a map from old to new char positions."""
        parts = text.split(self.audio_token)
        marks: list[tuple[int, int]] = []  # (position of the placeholder in the old text, chars added)
        pieces = [parts[0]]
        pos = len(parts[0])
        for part in parts[1:]:
            k = next(counts)
            marks.append((pos, (k - 1) * len(self.audio_token)))
            pieces.append(self.audio_token * k)
            pieces.append(part)
            pos += len(self.audio_token) + len(part)

        def shift(p: int) -> int:
            return p + sum(d for q, d in marks if q < p)

        return "".join(pieces), shift

    def _pad(self, rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r, dtype=torch.long)
            mask[i, sl] = 1
        return ids, mask

    # ------------------------------------------------------------------ conversations
    def render(self, conversation: Sequence[dict], add_generation_prompt: bool = False,
               continue_final_message: bool = False) -> RenderedChat:
        """Render one conversation with the checkpoint's chat template (text with one placeholder per audio)."""
        return self.chat_template.render(conversation, add_generation_prompt, continue_final_message)

    def apply_chat_template(
        self,
        conversation: Sequence[dict] | Sequence[Sequence[dict]],
        *,
        tokenize: bool = False,
        add_generation_prompt: bool = False,
        return_dict: bool = False,
        output_labels: bool = False,
        assistant_only: bool = False,
        continue_final_message: bool = False,
        sampling_rate: int | None = None,
        max_audio_len: float | None = None,
        padding_side: str = "left",
        **load_kwargs: Any,
    ) -> Any:
        """One conversation or a list of them → prompt text(s), or tensors when ``tokenize=True``.

        ``output_labels=True`` gives the reference labels (everything but audio and padding is supervised);
        with ``assistant_only=True`` only assistant replies and their end token are.
        """
        batched = _is_batch_of_conversations(conversation)
        conversations = list(conversation) if batched else [conversation]
        rendered = [self.render(c, add_generation_prompt, continue_final_message) for c in conversations]
        if not tokenize:
            texts = [r.text for r in rendered]
            return texts if batched else texts[0]
        cap = self.max_audio_len if max_audio_len is None else max_audio_len
        load_kwargs = {"max_seconds": cap, **load_kwargs}  # decode only what the features will use
        audios = [load_audio_part(p, sampling_rate, **load_kwargs) for r in rendered for p in r.audios]
        inputs = self(
            [r.text for r in rendered],
            audios or None,
            output_labels=output_labels or assistant_only,
            padding_side=padding_side,
            max_audio_len=max_audio_len,
            assistant_spans=[r.assistant_spans for r in rendered] if assistant_only else None,
        )
        return inputs if return_dict else inputs["input_ids"]

    def apply_transcription_request(
        self,
        audio: Any,
        prompt: str | Sequence[str | None] | None = None,
        *,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Transcription prompts for one audio or a list of audios (``prompt`` defaults to the checkpoint's)."""
        audios = audio if isinstance(audio, (list, tuple)) else [audio]
        if isinstance(prompt, (list, tuple)):
            if len(prompt) != len(audios):
                raise InputError(f"{len(prompt)} prompts were given for {len(audios)} audios")
            prompts = list(prompt)
        else:
            prompts = [prompt] * len(audios)
        conversations = []
        for a, p in zip(audios, prompts, strict=True):
            part = {"type": "audio", "path": a} if isinstance(a, (str, os.PathLike)) else {"type": "audio", "audio": a}
            text = {"type": "text", "text": p if p is not None else self.default_transcription_prompt}
            conversations.append([{"role": "user", "content": [text, part]}])
        if not tokenize:  # like the reference: a list of prompts, even for one audio
            return self.apply_chat_template(conversations, add_generation_prompt=True)
        batch = conversations if isinstance(audio, (list, tuple)) else conversations[0]
        return self.apply_chat_template(batch, tokenize=True, add_generation_prompt=True, return_dict=True, **kwargs)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Any, skip_special_tokens: bool = False, strip_prefix: bool = False) -> str | list[str]:
        """Token ids → text. A 2-D batch gives a list of strings; ``strip_prefix`` removes the model's
        "The spoken content of the audio is '...'" framing around transcriptions."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        if isinstance(ids, np.ndarray):
            ids = ids.tolist()
        if isinstance(ids, int) and not isinstance(ids, bool):
            ids = [ids]
        if not isinstance(ids, (list, tuple)):
            raise InputError(f"decode takes token ids (a list, array or tensor of ints), not {type(ids).__name__}")
        if ids and isinstance(ids[0], (list, tuple)):
            return [self.decode(row, skip_special_tokens, strip_prefix) for row in ids]
        vocab = len(self.tokenizer)
        bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab), None)
        if bad is not None:
            raise InputError(f"cannot decode {bad!r}: token ids are integers from 0 to {vocab - 1}")
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        return strip_transcription(text) if strip_prefix else text

    def batch_decode(self, ids: Any, skip_special_tokens: bool = False, strip_prefix: bool = False) -> list[str]:
        out = self.decode(ids, skip_special_tokens, strip_prefix)
        return out if isinstance(out, list) else [out]


def strip_transcription(text: str) -> str:
    """Remove the assistant framing around a transcription: known prefix, final period, matching quotes."""
    text = text.strip()
    for prefix in TRANSCRIPTION_PREFIXES:
        if text.startswith(prefix):
            text = text[len(prefix):].strip()
            break
    if text.endswith("."):
        text = text[:-1].strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1].strip()
    return text

