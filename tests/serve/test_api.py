"""`af3 serve` through the official `openai` client: chat with one and several audios (streamed or not), multi-turn
with audio reuse by uuid, JSON schemas, n and logprobs, transcriptions in every format, 16 concurrent clients, and
the answers compared with the Engine's own in this process (the server only translates)."""

from __future__ import annotations

import concurrent.futures
import json
import re

import httpx
import numpy as np
import pytest
from openai import OpenAI
from server_helpers import CLIP, MODEL, ask, audio_part, b64, clip_b64, metric, running_server, wav_bytes

from af3.cli import embedded_model_path
from af3.generation.engine import Engine


@pytest.fixture(scope="module")
def url():
    with running_server("--max-batch-size", "4") as base:
        yield base


@pytest.fixture(scope="module")
def client(url):
    return OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine():
    from af3 import AF3Model, AF3Processor

    path = str(embedded_model_path())
    return Engine(AF3Model.from_pretrained(path), AF3Processor.from_pretrained(path), max_batch_size=4)


def tone(seed: int, beeps: int, seconds: float = 3.0) -> bytes:
    """A clip of ``beeps`` short tones in noise (what the embedded model was trained to count)."""
    rng = np.random.default_rng(seed)
    x = 0.01 * rng.standard_normal(int(seconds * 16000))
    for k in range(beeps):
        a = int((0.3 + k * 0.8) * 16000)
        t = np.arange(int(0.25 * 16000)) / 16000
        x[a:a + len(t)] += 0.4 * np.sin(2 * np.pi * 880 * t)
    return wav_bytes(x.astype(np.float32))


def local(engine, data: list[bytes], question: str, **options) -> str:
    """The Engine's answer in this process for the same audio and question (greedy)."""
    conv = [{"role": "user", "content": [*({"type": "audio", "audio": d} for d in data),
                                         {"type": "text", "text": question}]}]
    return engine.generate(conv, temperature=0.0, **options).text


def test_models_health_and_ready(url, client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/ready").status_code == 200


def test_one_audio_answered_as_the_engine_answers_streamed_or_not(client, engine):
    with open(CLIP, "rb") as f:
        clip = f.read()
    r = client.chat.completions.create(model=MODEL, messages=ask(audio_part(b64(clip))), temperature=0, max_tokens=24)
    expected = local(engine, [clip], "How many beeps do you hear?", max_new_tokens=24)
    assert r.choices[0].message.content == "There are three beeps." == expected
    assert r.choices[0].finish_reason == "stop" and r.object == "chat.completion"
    u = r.usage
    assert u.prompt_tokens > u.prompt_tokens_details.audio_tokens > 0 and u.total_tokens == u.prompt_tokens + \
        u.completion_tokens
    chunks = list(client.chat.completions.create(model=MODEL, messages=ask(audio_part(b64(clip))), temperature=0,
                                                 max_tokens=24, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "There are three beeps."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == u.completion_tokens


def test_three_audios_in_one_message(client, engine):
    clips = [tone(1, 2), tone(2, 3), tone(3, 1)]
    question = "How many beeps are there in total?"
    r = client.chat.completions.create(model=MODEL, messages=ask(*(audio_part(b64(c)) for c in clips),
                                                                 question=question), temperature=0, max_tokens=24)
    assert r.choices[0].message.content == local(engine, clips, question, max_new_tokens=24)
    one = client.chat.completions.create(model=MODEL, messages=ask(audio_part(b64(clips[0]))), temperature=0,
                                         max_tokens=24)
    assert r.usage.prompt_tokens_details.audio_tokens == 3 * one.usage.prompt_tokens_details.audio_tokens


def test_multi_turn_reuses_audio_by_uuid_without_encoding_it_again(url, client):
    first = ask(audio_part(clip_b64(), uuid="clip-42"))
    r1 = client.chat.completions.create(model=MODEL, messages=first, temperature=0, max_tokens=24)
    encoded = metric(url, 'af3_audio_cache_lookups_total{result="miss"}')
    follow = [*first, {"role": "assistant", "content": r1.choices[0].message.content},
              {"role": "user", "content": "Are you sure?"}]
    follow[0] = ask(audio_part(None, uuid="clip-42"))[0]  # the audio left out: the server has it by uuid
    r2 = client.chat.completions.create(model=MODEL, messages=follow, temperature=0, max_tokens=24)
    again = [*first, *follow[1:]]  # the same conversation with the data sent again
    r3 = client.chat.completions.create(model=MODEL, messages=again, temperature=0, max_tokens=24)
    assert r2.choices[0].message.content == r3.choices[0].message.content
    assert metric(url, 'af3_audio_cache_lookups_total{result="miss"}') == encoded  # not encoded again
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens  # the first turn's prefill kept


def test_json_schema_reply_parses_and_follows_the_schema(client):
    # (The embedded model never learnt JSON: it pads with the most whitespace the grammar allows, hence the tokens.)
    schema = {"type": "object", "properties": {"beeps": {"enum": [1, 2, 3, 4]}, "sound": {"enum": ["tone", "noise"]}},
              "required": ["beeps", "sound"], "additionalProperties": False}
    r = client.chat.completions.create(model=MODEL, messages=ask(audio_part(clip_b64())), temperature=0, max_tokens=256,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "count", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert r.choices[0].finish_reason == "stop"
    assert set(value) == {"beeps", "sound"} and value["beeps"] in (1, 2, 3, 4) and value["sound"] in ("tone", "noise")
    r = client.chat.completions.create(model=MODEL, messages=ask(audio_part(clip_b64())), temperature=0, max_tokens=64,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_n_choices_seeds_and_logprobs(client):
    r = client.chat.completions.create(model=MODEL, messages=ask(audio_part(clip_b64())), temperature=1.0, seed=7,
                                       max_tokens=12, n=3, logprobs=True, top_logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    again = client.chat.completions.create(model=MODEL, messages=ask(audio_part(clip_b64())), temperature=1.0, seed=7,
                                           max_tokens=12, n=3, logprobs=True, top_logprobs=2)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]  # seeds repeat
    for c in r.choices:
        lps = c.logprobs.content
        assert lps and all(lp.logprob <= 0 and len(lp.top_logprobs) == 2 for lp in lps)
        assert all(lp.top_logprobs[0].logprob >= lp.top_logprobs[1].logprob for lp in lps)
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)


def test_transcriptions_in_every_format(client, url):
    with open(CLIP, "rb") as f:
        clip = f.read()

    def create(fmt, **kw):
        return client.audio.transcriptions.create(model=MODEL, file=("clip.wav", clip), response_format=fmt, **kw)

    text = create("json").text
    assert text and "spoken content" not in text  # AF3's framing stripped
    assert create("text").strip() == text
    srt = create("srt")
    times = re.findall(r"(\d\d):(\d\d):(\d\d),(\d\d\d) --> (\d\d):(\d\d):(\d\d),(\d\d\d)", srt)
    assert srt.startswith("1\n") and times
    seconds = [(int(h) * 3600 + int(m) * 60 + int(s) + int(ms) / 1000) for h, m, s, ms, *_ in times]
    assert seconds == sorted(seconds)
    assert create("vtt").startswith("WEBVTT")
    verbose = create("verbose_json", timestamp_granularities=["segment"])
    assert verbose.duration == pytest.approx(3.0, abs=0.01) and verbose.text == text
    assert verbose.segments[0].start == 0.0 and verbose.segments[-1].end == pytest.approx(verbose.duration, abs=0.05)
    events = list(client.audio.transcriptions.create(model=MODEL, file=("clip.wav", clip), stream=True))
    assert [e.type for e in events][-1] == "transcript.text.done" and events[-1].text == text
    assert "".join(e.delta for e in events if e.type == "transcript.text.delta") == text


def test_sixteen_concurrent_clients_get_the_answers_they_get_alone(client):
    clips = [tone(100 + i, 1 + i % 4) for i in range(16)]
    def one(clip):
        r = client.chat.completions.create(model=MODEL, messages=ask(audio_part(b64(clip))), temperature=0,
                                           max_tokens=16)
        return r.choices[0].message.content

    alone = [one(c) for c in clips]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(one, clips))
    assert together == alone


def test_metrics_count_requests_and_tokens(url, client):
    before = metric(url, "af3_completion_tokens_total")
    client.chat.completions.create(model=MODEL, messages=ask(audio_part(clip_b64())), temperature=0, max_tokens=5,
                                   extra_body={"min_tokens": 5})
    assert metric(url, "af3_completion_tokens_total") == before + 5
    assert metric(url, 'af3_http_requests_total{route="/v1/chat/completions",status="200"}') >= 1
    assert metric(url, "af3_requests_in_progress") == 0


def test_a_checkpoint_with_a_think_adapter_serves_model_colon_think(tmp_path):
    """The think adapter as a second model id: its answers are the Engine's think=True answers."""
    import shutil
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "generation"))
    from test_think import write_adapter

    from af3 import AF3Model

    folder = tmp_path / "ckpt"
    shutil.copytree(embedded_model_path(), folder)
    model = AF3Model.from_pretrained(folder)
    write_adapter(folder / "think", model)
    local_engine = Engine.from_pretrained(str(folder), max_batch_size=1)
    assert local_engine.lora is not None
    with open(CLIP, "rb") as f:
        clip = f.read()
    with running_server("--model", str(folder)) as base:
        c = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in c.models.list()] == ["ckpt", "ckpt:think"]
        plain = c.chat.completions.create(model="ckpt", messages=ask(audio_part(b64(clip))), temperature=0,
                                          max_tokens=12).choices[0].message.content
        think = c.chat.completions.create(model="ckpt:think", messages=ask(audio_part(b64(clip))), temperature=0,
                                          max_tokens=12).choices[0].message.content
        extra = c.chat.completions.create(model="ckpt", messages=ask(audio_part(b64(clip))), temperature=0,
                                          max_tokens=12, extra_body={"think": True}).choices[0].message.content
    assert plain == local(local_engine, [clip], "How many beeps do you hear?", max_new_tokens=12)
    assert think == extra == local(local_engine, [clip], "How many beeps do you hear?", max_new_tokens=12, think=True)
    assert think != plain

