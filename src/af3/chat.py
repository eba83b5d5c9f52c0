"""Text side of the processor: the checkpoint's tokenizer (via ``tokenizers``) and its chat template (via jinja2).

Conversations are lists of messages ``{"role": ..., "content": str | [parts]}``; a part is ``{"type": "text",
"text": ...}`` or an audio part (``{"type": "audio", "path" | "url" | "audio" | "array" | "base64": ...}``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from .config import read_json
from .errors import CheckpointError, InputError

# The processor template AF3 checkpoints ship; used only when a folder has no template of its own.
DEFAULT_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages if m['content'] is not none %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}"
    "{% set audio = namespace(found=False) %}{% set text_buf = namespace(v='') %}"
    "{% for c in m['content'] %}"
    "{% if c.get('type') == 'audio' or 'audio' in c %}{% set audio.found = True %}"
    "{% elif c.get('type') == 'text' or 'text' in c %}{% set text_buf.v = text_buf.v + c['text'] %}"
    "{% endif %}{% endfor %}"
    "{% if audio.found %}{{ '<sound>' }}{% endif %}{{ text_buf.v }}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: Largest ``tokenizer.json`` / ``chat_template.jinja`` read (bounded memory for a hostile folder).
MAX_TOKENIZER_BYTES = 512 * 1024**2
MAX_TEMPLATE_CHARS = 1024**2

AUDIO_KEYS = ("audio", "path", "url", "array", "base64", "input_audio", "audio_url")
ROLES = ("system", "user", "assistant")


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json spells a token as a string or as a serialised AddedToken dict."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and "content" in value:
        return value["content"]
    return None


class TextTokenizer:
    """The checkpoint's ``tokenizer.json`` plus the special tokens named in ``tokenizer_config.json``."""

    def __init__(self, tokenizer: Tokenizer, special: dict[str, str | None] | None = None):
        self.tokenizer = tokenizer
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        special = special or {}
        self.eos_token = special.get("eos_token")
        self.pad_token = special.get("pad_token")
        self.bos_token = special.get("bos_token")

    @classmethod
    def from_folder(cls, folder: str | os.PathLike) -> TextTokenizer:
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            raise CheckpointError(f"missing file {path!r}: the tokenizer is needed to build prompts")
        if os.path.getsize(path) > MAX_TOKENIZER_BYTES:
            raise CheckpointError(f"{path!r} is larger than {MAX_TOKENIZER_BYTES // 1024**2} MB; it is not a "
                                  "tokenizer (Qwen2's is about 11 MB)")
        try:
            tok = Tokenizer.from_file(path)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"cannot read {path!r}: {e}") from None
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        cfg = read_json(cfg_path) if os.path.isfile(cfg_path) else {}
        special = {k: _token_text(cfg.get(k)) for k in ("eos_token", "pad_token", "bos_token")}
        for key, text in special.items():
            if text is None and cfg.get(key) is not None:
                raise CheckpointError(f"{cfg_path}: {key} must be a token string (or an AddedToken object with "
                                      f"\"content\"), got {cfg.get(key)!r}")
        return cls(tok, special)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.tokenizer.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self.token_id(self.pad_token)

    def __len__(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode_batch(self, texts: Sequence[str]):
        """Tokenize several texts; returns ``tokenizers.Encoding`` objects (ids and char offsets)."""
        return self.tokenizer.encode_batch(list(texts), add_special_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def save(self, folder: str | os.PathLike) -> None:
        self.tokenizer.save(os.path.join(folder, "tokenizer.json"))
        cfg_path = os.path.join(folder, "tokenizer_config.json")
        cfg = {k: v for k, v in (("eos_token", self.eos_token), ("pad_token", self.pad_token),
                                  ("bos_token", self.bos_token)) if v is not None}
        cfg.update({"tokenizer_class": "Qwen2Tokenizer", "backend": "tokenizers"})
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2)


def read_chat_template(folder: str | os.PathLike) -> str | None:
    """The checkpoint's chat template, looked up in the places transformers writes it (newest first)."""
    jinja_path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_path):
        try:
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read(MAX_TEMPLATE_CHARS + 1)
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read the chat template {jinja_path!r}: {e}") from None
        if len(template) > MAX_TEMPLATE_CHARS:
            raise CheckpointError(f"{jinja_path!r} is longer than {MAX_TEMPLATE_CHARS} characters; it is not a "
                                  "chat template")
        return template
    for name in ("chat_template.json", "processor_config.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            template = read_json(path).get("chat_template")
            if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}]
                named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
                template = named.get("default")
            if isinstance(template, str):
                return template
    return None


def _raise_exception(message: str) -> None:
    raise InputError(f"chat template: {message}")


@dataclass(frozen=True)
class RenderedChat:
    """A rendered conversation: the prompt text, its audio parts in placeholder order, and the character spans
    of the assistant replies (reply text plus the end token) — what ``assistant_only`` labels keep."""

    text: str
    audios: list[dict]
    assistant_spans: list[tuple[int, int]]


class ChatTemplate:
    """A jinja2 chat template rendered the way transformers renders it (sandboxed, trim/lstrip blocks)."""

    def __init__(self, source: str | None, audio_token: str = "<sound>", end_token: str | None = "<|im_end|>"):
        self.source = source or DEFAULT_CHAT_TEMPLATE
        self.audio_token = audio_token
        self.end_token = end_token

    def __getstate__(self) -> dict:
        # The compiled template holds lambdas; drop it so processors pickle (DataLoader workers under spawn).
        state = dict(self.__dict__)
        state.pop("_template", None)
        return state

    @cached_property
    def _template(self) -> jinja2.Template:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            return env.from_string(self.source)
        except jinja2.TemplateError as e:
            raise CheckpointError(f"the chat template does not compile: {e}") from None

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateError as e:
            raise InputError(f"the chat template failed on this conversation: {e}") from None

    def render(self, conversation: Sequence[dict], add_generation_prompt: bool = False,
               continue_final_message: bool = False) -> RenderedChat:
        messages, audios = normalize_conversation(conversation, self.audio_token)
        text = self._render(messages, add_generation_prompt and not continue_final_message)
        if continue_final_message:
            text = _cut_after_final_message(text, messages, self.end_token)
        n_placeholders = text.count(self.audio_token)
        if n_placeholders != len(audios):
            raise InputError(
                f"the conversation has {len(audios)} audio part(s) but its prompt has {n_placeholders} "
                f"{self.audio_token} placeholder(s); write the placeholder only through audio parts"
            )
        return RenderedChat(text, audios, self._assistant_spans(messages, text))

    def _assistant_spans(self, messages: list[dict], full: str) -> list[tuple[int, int]]:
        """Character spans of assistant replies, found by rendering growing prefixes of the conversation."""
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant" or m.get("content") is None:
                continue
            before = self._render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise InputError("the chat template does not render conversations as growing prefixes; "
                                 "assistant_only labels cannot be used with it")
            start, end = len(before), len(upto)
            # Keep the reply and its end token; drop what the template appends after the end token ("\n").
            if self.end_token:
                k = full.rfind(self.end_token, start, end)
                if k >= 0:
                    end = k + len(self.end_token)
            spans.append((start, end))
        return spans


def _cut_after_final_message(text: str, messages: list[dict], end_token: str | None) -> str:
    """For ``continue_final_message``: drop the end-of-turn tokens that follow the last message's content."""
    last = messages[-1]["content"]
    last_text = last if isinstance(last, str) else "".join(p.get("text", "") for p in last if "text" in p)
    k = text.rfind(last_text) if last_text else -1
    if k < 0:
        raise InputError("continue_final_message: the final message's text is not in the rendered prompt")
    return text[: k + len(last_text)]


def is_audio_part(part: dict) -> bool:
    """An audio part: typed as audio, or untyped with an audio key (``{"audio": array}``)."""
    if "type" in part:
        return part["type"] in ("audio", "input_audio", "audio_url")
    return any(k in part for k in AUDIO_KEYS)


def normalize_conversation(conversation: Sequence[dict], audio_token: str = "<sound>") -> tuple[list[dict], list[dict]]:
    """Validate a conversation and put it in the form the AF3 template expects.

    Returns the messages to render and the audio parts in the order their placeholders appear. A message with
    several audio parts keeps its first one as the audio part and gets one extra ``audio_token`` text part per
    further audio in front of its text, so every audio becomes its own placeholder run, in order (the template
    always puts audio before the text of a message).
    """
    if isinstance(conversation, dict) or not isinstance(conversation, Sequence) or isinstance(conversation, str):
        raise InputError("a conversation is a list of messages like {'role': 'user', 'content': ...}")
    if not conversation:
        raise InputError("the conversation is empty")
    messages: list[dict] = []
    audios: list[dict] = []
    for i, m in enumerate(conversation):
        if not isinstance(m, dict) or "role" not in m:
            raise InputError(f"message {i} must be a dict with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise InputError(f"message {i} has role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if "content" not in m or m["content"] is None:
            raise InputError(f"message {i} ({m['role']}) has no content; give a string or a list of parts")
        content = m["content"]
        if isinstance(content, str):
            if isinstance(content, str) and audio_token in content:
                raise InputError(f"message {i} contains a literal {audio_token}; pass audio as an audio part")
            messages.append({**m})
            continue
        if isinstance(content, dict):
            content = [content]
        if not isinstance(content, Sequence):
            raise InputError(f"message {i}: content must be a string or a list of parts")
        texts, msg_audios = [], []
        for j, raw in enumerate(content):
            part = {"type": "text", "text": raw} if isinstance(raw, str) else raw
            if not isinstance(part, dict):
                raise InputError(f"message {i}, part {j}: expected a dict like {{'type': 'text', 'text': ...}}")
            if is_audio_part(part):
                msg_audios.append(part)
            elif part.get("type", "text") == "text" and isinstance(part.get("text"), str):
                if audio_token in part["text"]:
                    raise InputError(f"message {i} contains a literal {audio_token}; pass audio as an audio part")
                texts.append({"type": "text", "text": part["text"]})
            elif part.get("type", "text") == "text" and "text" in part:
                raise InputError(f"message {i}, part {j}: text must be a string, got {type(part['text']).__name__}")
            else:
                raise InputError(f"message {i}, part {j}: unknown part {sorted(part)}; use 'text' or 'audio' parts")
        if msg_audios and m["role"] != "user":
            raise InputError(f"message {i}: audio is only accepted in user messages")
        parts: list[dict] = []
        if msg_audios:
            parts.append({"type": "audio"})
            parts.extend({"type": "text", "text": audio_token} for _ in msg_audios[1:])
        parts.extend(texts)
        audios.extend(msg_audios)
        messages.append({**m, "content": parts})
    return messages, audios
