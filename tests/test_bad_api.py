"""The Python API refuses what it cannot answer rightly: conversations, generation options, token ids, Engine and
long-form arguments. Each row asserts the AF3Error subclass (never another exception) and a message naming the
problem. (Audio inputs: tests/test_bad_audio.py; checkpoints: tests/test_bad_checkpoints.py; training:
tests/training/test_bad_training.py; the command line: tests/test_bad_cli.py.)"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from af3 import AF3Model, AF3Processor, AudioError, InputError
from af3 import longform as L
from af3.cli import embedded_model_path
from af3.generation.engine import Engine, GenerationOptions

CLIP = (0.1 * np.random.default_rng(0).standard_normal(16000)).astype(np.float32)
GOOD = [{"role": "user", "content": [{"type": "audio", "audio": CLIP}, {"type": "text", "text": "What is it?"}]}]
IDS = torch.tensor([[1, 2, 3]])


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


class Ctx:
    def __init__(self):
        path = str(embedded_model_path())
        self.model, self.proc = AF3Model.from_pretrained(path), AF3Processor.from_pretrained(path)
        self.engine = Engine(self.model, self.proc, max_batch_size=2)

    def ask(self, conversation=GOOD, **kw):
        return self.engine.generate(conversation, max_new_tokens=kw.pop("max_new_tokens", 2), **kw)


def opt(name, value, pattern):
    """A generation option row: through Engine.generate."""
    return (f"option {name}={value!r}", lambda c: c.ask(**{name: value}), InputError, pattern)


ROWS = [
    # generation options: one set of rules (af3.generation.options)
    opt("temperature", -1.0, r"temperature must be in \[0, 100\]"),
    opt("temperature", math.nan, r"temperature must be a finite number"),
    opt("temperature", math.inf, r"temperature must be a finite number"),
    opt("temperature", 1e6, r"temperature must be in \[0, 100\]"),
    opt("temperature", "0.5", r"temperature must be a finite number"),
    opt("temperature", True, r"temperature must be a finite number"),
    opt("max_new_tokens", 1.5, r"max_new_tokens must be an integer"),
    opt("max_new_tokens", "7", r"max_new_tokens must be an integer"),
    opt("max_new_tokens", 0, r"max_new_tokens must be between 1 and"),
    opt("max_new_tokens", -3, r"max_new_tokens must be between 1 and"),
    opt("max_new_tokens", 10**9, r"max_new_tokens must be between 1 and 1048576"),
    opt("max_new_tokens", True, r"max_new_tokens must be an integer"),
    opt("min_new_tokens", -1, r"min_new_tokens must be between 0 and"),
    opt("min_new_tokens", 5, r"min_new_tokens \(5\) must not exceed max_new_tokens \(2\)"),
    opt("top_p", 0.0, r"top_p must be in \(0, 1\]"),
    opt("top_p", 1.5, r"top_p must be in \(0, 1\]"),
    opt("top_p", math.nan, r"top_p must be a finite number"),
    opt("top_k", -1, r"top_k must be >= 0"),
    opt("top_k", 2.5, r"top_k must be an integer"),
    opt("repetition_penalty", math.inf, r"repetition_penalty must be a finite number"),
    opt("repetition_penalty", 0.0, r"repetition_penalty must be in \(0, 100\]"),
    opt("repetition_penalty", -1.0, r"repetition_penalty must be in \(0, 100\]"),
    opt("seed", 2**70, r"seed must be between 0 and 18446744073709551615"),
    opt("seed", -5, r"seed must be between 0 and"),
    opt("seed", "1", r"seed must be an integer"),
    opt("stop", ("",), r"stop strings must be non-empty strings"),
    opt("stop", ["a", 3], r"stop strings must be non-empty strings"),
    opt("stop", 5, r"stop must be a string or a list of strings"),
    opt("stop", ["x"] * 17, r"at most 16 stop strings"),
    opt("stop", "x" * 300, r"at most 256 characters"),
    opt("stop_token_ids", (10**9,), r"stop token id 1000000000 is outside the vocabulary"),
    opt("stop_token_ids", (-1,), r"a stop token id must be >= 0"),
    opt("stop_token_ids", "2", r"stop_token_ids must be a list of token ids"),
    opt("top_logprobs", 21, r"top_logprobs must be between 0 and 20"),
    opt("logprobs", "yes", r"logprobs must be true or false"),
    opt("do_sample", "no", r"do_sample must be true or false"),
    opt("think", "yes", r"think must be true or false"),
    opt("keep_cache", 1, r"keep_cache must be true or false"),
    opt("json_schema", 5, r"json_schema must be a JSON schema object"),
    opt("json_schema", "{", r"json_schema is not valid JSON"),
    opt("json_schema", {"type": "array", "uniqueItems": True}, r"unsupported or invalid JSON schema"),
    ("sampling without temperature", lambda c: c.ask(do_sample=True, temperature=0.0), InputError,
     r"temperature must be > 0 when sampling"),
    ("unknown option", lambda c: c.ask(bogus=1), InputError, r"unknown generation option bogus"),
    ("options of the wrong type", lambda c: c.engine.generate(GOOD, {"temperature": 0}), InputError,
     r"options must be a GenerationOptions"),
    ("think without an adapter", lambda c: c.ask(think=True), InputError, r"needs the checkpoint's think adapter"),
    ("stream with a bad option", lambda c: list(c.engine.stream(GOOD, temperature=-1)), InputError,
     r"temperature must be in"),
    # conversations
    ("conversation is a string", lambda c: c.ask("hello"), InputError, r"a conversation is a list of messages"),
    ("conversation is empty", lambda c: c.ask([]), InputError, r"the conversation is empty"),
    ("message is a list", lambda c: c.ask([["user", "hi"]]), InputError, r"message 0 must be a dict"),
    ("message without role", lambda c: c.ask([{"content": "hi"}]), InputError, r"message 0 must be a dict"),
    ("unknown role", lambda c: c.ask([{"role": "wizard", "content": "hi"}]), InputError, r"role 'wizard'"),
    ("content is a number", lambda c: c.ask([{"role": "user", "content": 5}]), InputError,
     r"content must be a string or a list of parts"),
    ("content is missing", lambda c: c.ask([{"role": "user"}]), InputError, r"message 0 \(user\) has no content"),
    ("content is None", lambda c: c.ask([{"role": "user", "content": None}]), InputError, r"has no content"),
    ("part is a number", lambda c: c.ask(user(5)), InputError, r"part 0: expected a dict"),
    ("unknown part type", lambda c: c.ask(user({"type": "image", "url": "x"})), InputError, r"unknown part"),
    ("text part not text", lambda c: c.ask(user({"type": "text", "text": 5})), InputError,
     r"text must be a string, got int"),
    ("literal sound token", lambda c: c.ask(user({"type": "text", "text": "hi <sound>"})), InputError,
     r"contains a literal <sound>"),
    ("audio in an assistant turn", lambda c: c.ask([*GOOD, {"role": "assistant", "content": [
        {"type": "audio", "audio": CLIP}]}]), InputError, r"audio is only accepted in user messages"),
    ("only an assistant message", lambda c: c.ask([{"role": "assistant", "content": "hi"}]), InputError,
     r"no user message"),
    ("too many audios", lambda c: c.ask(user(*[{"type": "audio", "audio": CLIP}] * 33)), InputError,
     r"33 audio parts; this engine takes at most 32"),
    ("audio part without audio", lambda c: c.ask(user({"type": "audio"})), AudioError,
     r"an audio part needs one of"),
    ("audio as a list", lambda c: c.ask(user({"type": "audio", "audio": [0.1, 0.2]})), AudioError,
     r"cannot load audio from a list"),
    ("audio array of strings", lambda c: c.ask(user({"type": "audio", "audio": np.array(["a"])})), AudioError,
     r"unsupported audio sample type"),
    ("audio rate as text", lambda c: c.ask(user({"type": "audio", "audio": CLIP, "sampling_rate": "16k"})),
     AudioError, r"sampling_rate must be a positive number of Hz"),
    ("base64 that is not", lambda c: c.ask(user({"type": "audio", "base64": "%%%"})), AudioError,
     r"not valid base64"),
    ("base64 as bytes", lambda c: c.ask(user({"type": "audio", "base64": b"abc"})), AudioError,
     r"base64 must be a string"),
    # AF3Model.generate / forward
    ("generate 1-D ids", lambda c: c.model.generate(torch.tensor([1, 2])), InputError, r"must be 2-D"),
    ("generate float ids", lambda c: c.model.generate(torch.tensor([[1.0, 2.0]])), InputError,
     r"must hold integer token ids"),
    ("generate ids beyond the vocabulary", lambda c: c.model.generate(torch.tensor([[10**7]])), InputError,
     r"must lie in 0 \.\."),
    ("generate negative ids", lambda c: c.model.generate(torch.tensor([[-5]])), InputError, r"must lie in 0"),
    ("generate ids as a list", lambda c: c.model.generate([[1, 2]]), InputError, r"must be a tensor of token ids"),
    ("generate mask of another shape", lambda c: c.model.generate(IDS, attention_mask=torch.ones(1, 2)),
     InputError, r"attention_mask must be shaped like input_ids"),
    ("generate tokens as text", lambda c: c.model.generate(IDS, max_new_tokens="7"), InputError,
     r"max_new_tokens must be an integer"),
    ("generate negative temperature", lambda c: c.model.generate(IDS, do_sample=True, temperature=-1.0),
     InputError, r"temperature must be in"),
    ("generate eos beyond the vocabulary", lambda c: c.model.generate(IDS, eos_token_id=10**8), InputError,
     r"outside the vocabulary"),
    ("forward ids beyond the vocabulary", lambda c: c.model(input_ids=torch.tensor([[10**7]])), InputError,
     r"must lie in 0"),
    ("forward features of a wrong shape", lambda c: c.model(input_ids=IDS, input_features=torch.zeros(1, 2, 3)),
     InputError, r"input_features must be \[N, 128, 3000\]"),
    ("forward labels of a wrong shape", lambda c: c.model(input_ids=IDS, labels=torch.zeros(1, 2).long()),
     InputError, r"labels must be shaped like input_ids"),
    # the processor
    ("processor text is a number", lambda c: c.proc(text=5), InputError, r"text must be a string"),
    ("processor placeholders without audio", lambda c: c.proc(text=["<sound>"], audio=[]), InputError,
     r"1 <sound> placeholder\(s\) but 0 audio"),
    ("processor negative max_audio_len", lambda c: c.proc.apply_chat_template(GOOD, tokenize=True,
                                                                              max_audio_len=-1), AudioError,
     r"max_seconds must be a positive"),
    ("processor padding side", lambda c: c.proc.apply_chat_template([GOOD, GOOD], tokenize=True,
                                                                    padding_side="middle"), InputError,
     r"padding_side must be 'left' or 'right'"),
    ("decode an id beyond the vocabulary", lambda c: c.proc.decode([10**9]), InputError,
     r"cannot decode 1000000000"),
    ("decode text", lambda c: c.proc.decode("abc"), InputError, r"decode takes token ids"),
    ("decode a float", lambda c: c.proc.decode([1.5]), InputError, r"cannot decode 1\.5"),
    # the Engine
    ("engine of 0 rows", lambda c: Engine(c.model, c.proc, max_batch_size=0), InputError,
     r"max_batch_size must be a whole number >= 1"),
    ("engine of negative length", lambda c: Engine(c.model, c.proc, max_seq_len=-1), InputError,
     r"max_seq_len must be a whole number >= 2"),
    ("engine cache size as text", lambda c: Engine(c.model, c.proc, audio_cache_bytes="x"), InputError,
     r"audio_cache_bytes must be a whole number"),
    ("engine audio policy", lambda c: Engine(c.model, c.proc, audio_policy=5), InputError,
     r"audio_policy must be an af3.fetch.FetchPolicy"),
    ("prompt longer than the engine", lambda c: Engine(c.model, c.proc, max_seq_len=8).generate(GOOD), InputError,
     r"this engine holds at most 8"),
    # long-form
    ("ask_long chunk of a microsecond", lambda c: L.ask_long(c.model, c.proc, CLIP, "q", chunk_s=1e-6),
     InputError, r"chunk_s must be a number of seconds >= 2"),
    ("ask_long chunk of NaN", lambda c: L.ask_long(c.model, c.proc, CLIP, "q", chunk_s=math.nan), InputError,
     r"chunk_s must be a number of seconds"),
    ("ask_long empty question", lambda c: L.ask_long(c.model, c.proc, CLIP, " "), InputError,
     r"question must be a non-empty string"),
    ("ask_long chunks longer than the processor takes",
     lambda c: L.ask_long(c.model, c.proc, np.zeros(700 * 16000, np.float32), "q", chunk_s=900.0), InputError,
     r"longer than the processor's max_audio_len"),
    ("transcribe batch of 0", lambda c: L.transcribe_long(c.model, c.proc, CLIP, batch_size=0), InputError,
     r"batch_size must be a whole number >= 1"),
    ("transcribe segments of 1 s", lambda c: L.transcribe_long(c.model, c.proc, CLIP, max_segment_s=1),
     InputError, r"max_segment_s must be a number of seconds >= 2"),
    ("transcribe negative search", lambda c: L.transcribe_long(c.model, c.proc, CLIP, search_s=-1), InputError,
     r"search_s must be a number of seconds >= 0"),
    ("transcribe empty prompt", lambda c: L.transcribe_long(c.model, c.proc, CLIP, prompt=""), InputError,
     r"prompt must be a non-empty string"),
    ("transcribe 0 tokens", lambda c: L.transcribe_long(c.model, c.proc, CLIP, max_new_tokens=0), InputError,
     r"max_new_tokens must be a whole number >= 1"),
    ("transcribe empty audio", lambda c: L.transcribe_long(c.model, c.proc, np.zeros(0, np.float32)), AudioError,
     r"empty"),
    ("generate_fn with an unknown option", lambda c: L.engine_generate_fn(c.engine, bogus=1), InputError,
     r"unknown generation option bogus"),
    ("a long context below one window", lambda c: L.allow_long_context(c.proc, 1).__enter__(), InputError,
     r"at least one 30 s window"),
]


@pytest.fixture(scope="module")
def ctx():
    return Ctx()


def test_there_are_enough_distinct_rows():
    assert len(ROWS) >= 100 and len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize(("name", "call", "error", "pattern"), ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_is_the_right_af3_error(ctx, name, call, error, pattern):
    with pytest.raises(error, match=pattern) as info:
        call(ctx)
    assert type(info.value).__module__.startswith("af3") and "\n" not in str(info.value)


def test_the_engine_still_answers_after_every_refusal(ctx):
    out = ctx.ask(max_new_tokens=3)
    assert out.finish_reason in ("stop", "length") and out.text is not None
    assert GenerationOptions(temperature=0.0).resolved(ctx.model.generation_config).do_sample is False
