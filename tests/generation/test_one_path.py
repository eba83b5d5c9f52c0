"""One inference path: the Engine, ``AF3Model.generate`` and long-form transcription all decode through the same
runner and loop; the Engine is safe from any number of threads, with or without its background thread; one set of
options rules (defaults, greedy) for every way in; the prefix cache's block index finds the longest prefix."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch
from conftest import audio_question, synth_audio

from af3.config import GenerationConfig
from af3.errors import InputError
from af3.generation import core, runner
from af3.generation.engine import Engine
from af3.generation.options import DEFAULT_MAX_NEW_TOKENS, GenerationOptions
from af3.generation.scheduler import PrefixCache


@pytest.fixture(scope="module")
def pair(odd_pair):
    return odd_pair


conv = audio_question


class Spy:
    """Counts the runner's decode calls and the loop's steps, whoever makes them."""

    def __init__(self, monkeypatch):
        self.decodes = self.steps = 0
        real_decode, real_step = runner.ModelRunner.decode, core.EngineCore.step

        def decode(r, *a, **kw):
            self.decodes += 1
            return real_decode(r, *a, **kw)

        def step(c, *a, **kw):
            self.steps += 1
            return real_step(c, *a, **kw)

        monkeypatch.setattr(runner.ModelRunner, "decode", decode)
        monkeypatch.setattr(core.EngineCore, "step", step)


def test_engine_generate_and_longform_decode_through_the_same_runner(pair, monkeypatch):
    from af3 import longform

    model, proc = pair
    spy = Spy(monkeypatch)
    Engine(model, proc).generate(conv(1.0, 1), max_new_tokens=5, min_new_tokens=5)
    assert spy.decodes == 4 and spy.steps >= 4  # the first token comes from the prefill
    inputs = proc.apply_chat_template(conv(1.0, 1), tokenize=True, add_generation_prompt=True, return_dict=True)
    model.generate(**inputs, max_new_tokens=5, min_new_tokens=5)
    assert spy.decodes == 8
    longform.transcribe_long(model, proc, synth_audio(3.0, 2), max_new_tokens=3)
    assert spy.decodes > 8


def test_greedy_generate_matches_the_engine_row_by_row(pair):
    model, proc = pair
    convs = [conv(1.5, 3), conv(4.0, 4, "A longer question?"), [{"role": "user", "content": "Text only."}]]
    inputs = proc.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert (inputs["attention_mask"] == 0).any()  # left padding
    ids = model.generate(**inputs, max_new_tokens=9, min_new_tokens=9, temperature=0)
    outs = Engine(model, proc).generate(convs, max_new_tokens=9, min_new_tokens=9, temperature=0)
    assert ids[:, inputs["input_ids"].shape[1]:].tolist() == [o.token_ids for o in outs]


def _alone(model, proc, seeds):
    return {s: Engine(model, proc, max_batch_size=1).generate(conv(1.0, s), max_new_tokens=8).token_ids
            for s in seeds}


@pytest.mark.parametrize("background", [False, True])
def test_eight_threads_on_one_engine_get_the_answers_they_would_get_alone(pair, background):
    model, proc = pair
    seeds = list(range(8))
    alone = _alone(model, proc, seeds)
    engine = Engine(model, proc, max_batch_size=3)
    if background:
        engine.start()
    got: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def call(seed: int) -> None:
        try:
            kind = seed % 3
            if kind == 0:
                got[seed] = engine.generate(conv(1.0, seed), max_new_tokens=8).token_ids
            elif kind == 1:
                pieces = list(engine.stream(conv(1.0, seed), max_new_tokens=8))
                assert pieces[-1].finished and "".join(p.text for p in pieces) == pieces[-1].output.text
                got[seed] = pieces[-1].output.token_ids
            else:
                got[seed] = asyncio.run(engine.agenerate(conv(1.0, seed), max_new_tokens=8)).token_ids
        except BaseException as e:  # noqa: BLE001 (every failure is reported below)
            errors.append(e)

    try:
        for _ in range(2):
            got.clear()
            threads = [threading.Thread(target=call, args=(s,)) for s in seeds]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            assert not errors, errors
            assert got == alone
    finally:
        engine.close()


def test_astream_works_without_the_background_thread(pair):
    model, proc = pair

    async def main():
        return [d async for d in Engine(model, proc).astream(conv(1.0, 5), max_new_tokens=6)]

    pieces = asyncio.run(main())
    assert pieces[-1].finished
    assert pieces[-1].output.token_ids == _alone(model, proc, [5])[5][:6]


def test_a_failing_step_fails_its_requests_with_the_error_and_the_engine_goes_on(pair, monkeypatch):
    model, proc = pair
    engine = Engine(model, proc)
    real = runner.ModelRunner.decode

    def broken(*a, **kw):
        raise RuntimeError("boom")

    monkeypatch.setattr(runner.ModelRunner, "decode", broken)
    with pytest.raises(RuntimeError, match="boom"):
        engine.generate(conv(1.0, 6), max_new_tokens=4)
    monkeypatch.setattr(runner.ModelRunner, "decode", real)
    assert engine.generate(conv(1.0, 6), max_new_tokens=4).token_ids == _alone(model, proc, [6])[6][:4]


# ---------------------------------------------------------------------------------------------- options
def test_one_set_of_option_rules():
    gc = GenerationConfig(eos_token_id=2)
    assert GenerationOptions().resolved(gc).max_new_tokens == DEFAULT_MAX_NEW_TOKENS
    assert GenerationOptions().resolved(GenerationConfig(max_length=30), prompt_tokens=12).max_new_tokens == 18
    greedy = GenerationOptions(temperature=0).resolved(GenerationConfig(do_sample=True, temperature=0.7))
    assert not greedy.do_sample  # temperature 0 is greedy, whatever the checkpoint says
    assert GenerationOptions(temperature=0.7).resolved(gc).do_sample
    assert GenerationOptions(stop="END").resolved(gc).stop == ("END",)
    assert GenerationOptions().resolved(gc).stop_token_ids == (2,)
    for bad in (dict(do_sample=True, temperature=0), dict(temperature=float("nan")), dict(top_p=0),
                dict(top_k=-1), dict(max_new_tokens=0), dict(max_new_tokens=2.5), dict(repetition_penalty=0),
                dict(top_logprobs=21), dict(min_new_tokens=-1), dict(stop=("",))):
        with pytest.raises(InputError):
            GenerationOptions(**bad).resolved(gc)


def test_temperature_zero_is_greedy_in_generate_and_in_the_engine(pair):
    model, proc = pair
    inputs = proc.apply_chat_template(conv(1.0, 7), tokenize=True, add_generation_prompt=True, return_dict=True)
    plain = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, temperature=0, top_k=3), plain)
    engine = Engine(model, proc)
    assert engine.generate(conv(1.0, 7), max_new_tokens=6, min_new_tokens=6, temperature=0).token_ids == \
        plain[0, inputs["input_ids"].shape[1]:].tolist()


# ---------------------------------------------------------------------------------------------- prefix cache
def _kv(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(1, n, 2), torch.zeros(1, n, 2))]


def test_the_prefix_index_finds_the_longest_shared_prefix_and_forgets_evicted_entries():
    cache = PrefixCache(max_bytes=10**6)
    base = torch.arange(100, 180)  # 80 tokens
    other = torch.cat([base[:40], torch.arange(500, 540)])
    cache.put(base, _kv(80), think=False)
    cache.put(other, _kv(80), think=False)
    query = torch.cat([base[:70], torch.tensor([7, 8, 9])])
    entry, n = cache.match(query, think=False)
    assert entry.key is base and n == 70  # token-exact, inside a block
    entry, n = cache.match(torch.cat([base[:45], torch.arange(500, 520)]), think=False)
    assert entry.key is base and n == 45  # both share the first 32-token blocks; base shares more tokens
    entry, n = cache.match(torch.cat([base[:40], torch.arange(500, 530)]), think=False)
    assert entry.key is other and n == 69  # all of it but the last query token
    assert cache.match(query, think=True) == (None, 0)  # keys computed with the think adapter are apart
    assert cache.match(base[:10], think=False) == (None, 0)  # less than one block in common is not reused
    assert cache.match(base, think=False)[1] == 79  # the last prompt token is always computed again
    small = PrefixCache(max_bytes=_kv(80)[0][0].numel() * 4 * 2 + 1)
    small.put(base, _kv(80), think=False)
    small.put(other, _kv(80), think=False)  # evicts base
    assert len(small) == 1 and all(e.key is other for holders in small.index.values() for e in holders)
    assert small.match(query, think=False)[0].key is other
