"""The Engine against AF3Model.generate (the parity reference) and its own promises: continuous batching,
streaming, seeds, stop strings, logprobs, audio and prefix caches."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import audio_question

from af3.errors import InputError
from af3.generation.engine import Engine, GenerationOptions


@pytest.fixture(scope="module")
def pair(odd_pair):
    return odd_pair


conv = audio_question


def reference(model, proc, convs, **kw):
    inputs = proc.apply_chat_template(convs, tokenize=True, add_generation_prompt=True, return_dict=True)
    ids = model.generate(**inputs, **kw)
    n = inputs["input_ids"].shape[1]
    rows = []
    for row in ids[:, n:].tolist():
        # model.generate pads finished rows; the engine stops them: compare up to and including the end token.
        eos = model.generation_config.eos_ids
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        rows.append(row[:cut])
    return rows


def test_greedy_batch_equals_model_generate(pair):
    model, proc = pair
    convs = [conv(2.0, 1), conv(7.0, 2, "A longer question about the sound?"), conv(0.5, 3),
             [{"role": "user", "content": "Text only, please."}]]
    engine = Engine(model, proc, max_batch_size=4)
    outs = engine.generate(convs, max_new_tokens=20, min_new_tokens=20)
    for out, ref in zip(outs, reference(model, proc, convs, max_new_tokens=20, min_new_tokens=20), strict=True):
        assert out.token_ids == ref
        assert out.finish_reason == "length"


def test_plain_greedy_rows_share_one_argmax_and_answer_as_each_alone(pair, monkeypatch):
    from af3.generation.core import EngineCore

    model, proc = pair
    convs = [conv(2.0, 11), conv(4.0, 12, "And this one?"), conv(1.0, 13), conv(3.0, 14)]
    alone = [Engine(model, proc, max_batch_size=1).generate(c, max_new_tokens=12).token_ids for c in convs]
    per_row, original = [], EngineCore._choose
    monkeypatch.setattr(EngineCore, "_choose", lambda self, r, lg: per_row.append(r.id) or original(self, r, lg))
    engine = Engine(model, proc, max_batch_size=4)
    handles = [engine.submit(c, max_new_tokens=12) for c in convs]
    sampled = engine.submit(conv(2.0, 15), max_new_tokens=5, temperature=0.8, seed=3)  # a row with a chain
    while not all(h.done.is_set() for h in [*handles, sampled]):
        engine.step()
    assert [h.output.token_ids for h in handles] == alone
    greedy_ids = {h.id for h in handles}
    # A greedy request goes through the per-row path for its first token (chosen alone after its prefill) and in
    # steps where it is the only plain row; its other tokens come from the shared argmax.
    greedy_tokens = sum(len(h.output.token_ids) for h in handles)
    assert sum(1 for i in per_row if i in greedy_ids) < greedy_tokens / 2, (per_row, greedy_tokens)
    assert sum(1 for i in per_row if i == sampled.id) == len(sampled.output.token_ids)


def test_greedy_rows_under_min_new_tokens_share_the_argmax_and_keep_the_ban(pair, monkeypatch):
    from af3.generation import core
    from af3.generation.core import EngineCore

    model, proc = pair
    convs = [conv(2.0, 21), conv(3.0, 22, "And this one?"), conv(1.5, 23)]
    free = [Engine(model, proc, max_batch_size=1).generate(c, max_new_tokens=10).token_ids for c in convs]
    # End tokens the rows would choose early on: banned until min_new_tokens, so the answers must change.
    stops = sorted({row[2] for row in free} | {row[4] for row in free})
    kw = dict(max_new_tokens=10, min_new_tokens=8, stop_token_ids=stops)

    def run(shared: bool) -> tuple[list[list[int]], int]:
        per_row, original = [], EngineCore._choose
        with monkeypatch.context() as m:
            m.setattr(EngineCore, "_choose", lambda self, r, lg: per_row.append(r.id) or original(self, r, lg))
            if not shared:  # the reference: every row through its own processor chain
                m.setattr(core, "_argmax_only", lambda r: False)
            outs = Engine(model, proc, max_batch_size=3).generate(convs, **kw)
        return [o.token_ids for o in outs], len(per_row)

    want, all_rows = run(shared=False)
    got, few_rows = run(shared=True)
    assert got == want
    assert want != [row[: len(w)] for row, w in zip(free, want, strict=True)]  # the ban changed the answers
    for row in got:
        assert not set(row[:7]) & set(stops)  # no end token before min_new_tokens
    assert few_rows < all_rows / 2


def test_early_end_tokens_stop_rows_like_model_generate(pair):
    model, proc = pair
    convs = [conv(1.0, s) for s in range(6)]
    outs = Engine(model, proc, max_batch_size=3).generate(convs, max_new_tokens=30)
    refs = reference(model, proc, convs, max_new_tokens=30)
    assert [o.token_ids for o in outs] == refs
    for o in outs:
        assert o.finish_reason == ("stop" if o.token_ids[-1] in model.generation_config.eos_ids else "length")


def test_requests_joining_mid_decode_get_the_same_answers(pair):
    model, proc = pair
    engine = Engine(model, proc, max_batch_size=2)
    first = engine.submit(conv(3.0, 4), max_new_tokens=25, min_new_tokens=25)
    for _ in range(5):
        engine.step()
    assert len(first.tokens) == 6  # one from prefill, five decode steps
    late = [engine.submit(conv(1.5, 5), max_new_tokens=12, min_new_tokens=12),
            engine.submit(conv(2.5, 6), max_new_tokens=8, min_new_tokens=8)]  # waits for a free slot
    engine._wait([first, *late])
    alone = Engine(model, proc, max_batch_size=1)
    for req, c, n in zip([first, *late], [conv(3.0, 4), conv(1.5, 5), conv(2.5, 6)], [25, 12, 8], strict=True):
        assert req.output.token_ids == alone.generate(c, max_new_tokens=n, min_new_tokens=n).token_ids


def test_streaming_pieces_add_up_to_the_final_text(pair):
    model, proc = pair
    engine = Engine(model, proc)
    pieces = list(engine.stream(conv(2.0, 7), max_new_tokens=15, min_new_tokens=15))
    assert pieces[-1].finished and pieces[-1].output is not None
    assert "".join(p.text for p in pieces) == pieces[-1].output.text
    assert pieces[-1].output.text == proc.decode(pieces[-1].output.token_ids, skip_special_tokens=True)


def test_same_seed_same_sample_and_different_seeds_differ(pair):
    model, proc = pair
    engine = Engine(model, proc)
    opts = GenerationOptions(temperature=1.5, max_new_tokens=16, min_new_tokens=16)
    a = engine.generate(conv(1.0, 8), opts, seed=1).token_ids
    b = engine.generate(conv(1.0, 8), opts, seed=1).token_ids
    c = engine.generate(conv(1.0, 8), opts, seed=2).token_ids
    assert a == b and a != c
    # top_k=1 sampling is greedy.
    greedy = engine.generate(conv(1.0, 8), max_new_tokens=16, min_new_tokens=16).token_ids
    assert engine.generate(conv(1.0, 8), opts, seed=3, top_k=1).token_ids == greedy


def test_stop_strings_cut_the_text(pair):
    model, proc = pair
    engine = Engine(model, proc)
    full = engine.generate(conv(1.0, 9), max_new_tokens=20, min_new_tokens=20)
    assert len(full.text) > 6
    stop = full.text[3:5]
    cut = engine.generate(conv(1.0, 9), max_new_tokens=20, min_new_tokens=20, stop=(stop,))
    assert cut.text == full.text[: full.text.find(stop)]
    assert cut.finish_reason == "stop"
    streamed = "".join(d.text for d in engine.stream(conv(1.0, 9), max_new_tokens=20, min_new_tokens=20,
                                                     stop=(stop,)))
    assert streamed == cut.text


def test_logprobs_are_log_softmax_of_the_model_logits(pair):
    model, proc = pair
    engine = Engine(model, proc)
    out = engine.generate(conv(1.0, 10), max_new_tokens=4, min_new_tokens=4, logprobs=True, top_logprobs=3)
    inputs = proc.apply_chat_template(conv(1.0, 10), tokenize=True, add_generation_prompt=True, return_dict=True)
    with torch.no_grad():
        first = model(**inputs).logits[0, -1].float().log_softmax(-1)
    lp = out.logprobs[0]
    assert lp.token_id == out.token_ids[0] == int(first.argmax())
    assert abs(lp.logprob - float(first.max())) < 1e-4
    assert [t for t, _ in lp.top] == first.topk(3).indices.tolist()


def test_audio_cache_skips_the_encoder_for_a_repeated_clip(pair):
    model, proc = pair
    engine = Engine(model, proc)
    engine.generate(conv(40.0, 11), max_new_tokens=2)
    assert engine.stats["encoded_windows"] == 2
    out = engine.generate(conv(40.0, 11, "Another question?"), max_new_tokens=2)
    assert engine.stats["encoded_windows"] == 2 and out.audio_windows_cached == 2


def test_follow_up_turn_reuses_the_prefix_and_answers_like_a_cold_engine(pair):
    model, proc = pair
    engine = Engine(model, proc)
    c1 = conv(35.0, 12)
    first = engine.generate(c1, max_new_tokens=10)
    c2 = c1 + [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Are you sure?"}]
    before = engine.stats["prefill_tokens"]
    second = engine.generate(c2, max_new_tokens=10)
    assert second.cached_prompt_tokens >= first.prompt_tokens
    assert engine.stats["prefill_tokens"] - before == second.prompt_tokens - second.cached_prompt_tokens
    cold = Engine(model, proc, prefix_cache_bytes=0, audio_cache_bytes=0).generate(c2, max_new_tokens=10)
    assert second.token_ids == cold.token_ids and cold.cached_prompt_tokens == 0


def test_background_thread_and_asyncio(pair):
    model, proc = pair
    engine = Engine(model, proc).start()
    try:
        async def main():
            outs = await asyncio.gather(*(engine.agenerate(conv(1.0, s), max_new_tokens=6, min_new_tokens=6)
                                          for s in range(3)))
            pieces = [d async for d in engine.astream(conv(1.0, 0), max_new_tokens=6, min_new_tokens=6)]
            return outs, pieces

        outs, pieces = asyncio.run(main())
    finally:
        engine.close()
    assert [o.token_ids for o in outs][0] == pieces[-1].output.token_ids
    ref = Engine(model, proc).generate([conv(1.0, s) for s in range(3)], max_new_tokens=6, min_new_tokens=6)
    assert [o.token_ids for o in outs] == [o.token_ids for o in ref]


def test_bad_options_and_oversized_prompts_are_input_errors(pair):
    model, proc = pair
    engine = Engine(model, proc, max_seq_len=64)
    with pytest.raises(InputError):
        engine.generate(conv(1.0, 0), max_new_tokens=0)
    with pytest.raises(InputError):
        engine.generate(conv(1.0, 0), top_p=0.0)
    with pytest.raises(InputError, match="at most 64"):
        engine.generate(conv(5.0, 0))


def test_json_schema_requests_return_valid_json_next_to_free_text(pair):
    import json

    model, proc = pair
    schema = {"type": "object", "properties": {"count": {"type": "integer", "minimum": 1, "maximum": 5},
                                               "pitch": {"enum": ["low", "medium", "high"]}},
              "required": ["count", "pitch"], "additionalProperties": False}
    engine = Engine(model, proc)
    free = engine.submit(conv(1.0, 13), max_new_tokens=10, min_new_tokens=10)
    constrained = [engine.submit(conv(1.0, 14 + i), max_new_tokens=200, json_schema=schema, temperature=t, seed=i)
                   for i, t in enumerate([0.0, 1.0, 1.5])]
    engine._wait([free, *constrained])
    for req in constrained:
        assert req.output.finish_reason == "stop"
        value = json.loads(req.output.text)
        assert set(value) == {"count", "pitch"} and 1 <= value["count"] <= 5 and value["pitch"] in schema["properties"][
            "pitch"]["enum"]
    assert free.output.token_ids == Engine(model, proc).generate(conv(1.0, 13), max_new_tokens=10,
                                                                 min_new_tokens=10).token_ids
    # Any JSON object: a random model may ramble inside a string until the length limit; what it wrote is still
    # the start of an object, and a stopped answer parses.
    for seed in range(3):
        out = engine.generate(conv(1.0, 20 + seed), max_new_tokens=60, json_schema=True)
        assert out.text.lstrip().startswith("{")
        if out.finish_reason == "stop":
            assert isinstance(json.loads(out.text), dict)
