"""Chunked prefill with decoding rows riding along (``EngineCore._prefill`` / ``ModelRunner.prefill_mixed``): the
same logits as a separate prefill and decoding step, and the same greedy answers as each request alone, also when
a riding row finishes in the middle of another's prefill, with prefix-cache hits, and with the think adapter
(which never rides)."""

from __future__ import annotations

import pytest
import torch
from conftest import audio_question

from af3.generation import core
from af3.generation.engine import Engine, GenerationOptions

conv = audio_question


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(core, "PREFILL_CHUNK", 16)  # every prompt here spans several chunks


def alone(model, proc, c, n):
    return Engine(model, proc, max_batch_size=1).generate(c, max_new_tokens=n, min_new_tokens=n).token_ids


def test_mixed_forward_gives_the_logits_of_a_prefill_and_a_decode_step(odd_pair):
    model, proc = odd_pair
    a, b = Engine(model, proc, max_batch_size=2), Engine(model, proc, max_batch_size=2)
    for engine in (a, b):  # both: row 0 decoding (3 tokens in), row 1 admitted, not prefilled yet
        engine.submit(conv(2.0, 1), max_new_tokens=9, min_new_tokens=9)
        engine.step()
        engine.step()
    ra, rb = a.submit(conv(3.0, 2), max_new_tokens=4), b.submit(conv(3.0, 2), max_new_tokens=4)
    for engine, req in ((a, ra), (b, rb)):
        engine.core.scheduler.admit()
        engine.runner.encode_audio([req])
    first = a.core.scheduler.running[0]
    with torch.inference_mode():
        embeds = a.runner.prompt_embeds(ra)
        t = ra.prompt_tokens
        lp, ld = a.runner.prefill_mixed(1, ra, embeds, 0, t, [first.tokens[-1]], [first.length])
        ref_p = b.runner.prefill(1, rb, 0)
        other = b.core.scheduler.running[0]
        ref_d = b.runner.decode([other.tokens[-1]], [other.length], [False])
    assert lp.shape == ref_p.shape and ld.shape == ref_d.shape
    torch.testing.assert_close(lp, ref_p, rtol=0, atol=1e-4)
    torch.testing.assert_close(ld, ref_d, rtol=0, atol=1e-4)
    for layer in range(len(a.runner.cache.k)):  # and the same keys/values were written
        torch.testing.assert_close(a.runner.cache.k[layer][:2, :, : t + 1], b.runner.cache.k[layer][:2, :, : t + 1],
                                   rtol=0, atol=1e-5)


def test_rows_decode_while_a_long_prompt_is_prefilled_and_answer_as_alone(odd_pair, small_chunks):
    model, proc = odd_pair
    engine = Engine(model, proc, max_batch_size=4)
    first = engine.submit(conv(3.0, 4), max_new_tokens=40, min_new_tokens=40)
    short = engine.submit(conv(1.0, 5), max_new_tokens=3, min_new_tokens=3)  # finishes during the next prefill
    engine.step()
    engine.step()
    before = len(first.tokens)
    late = engine.submit(conv(6.0, 6, "A question that comes later?"), max_new_tokens=12, min_new_tokens=12)
    engine.step()  # admits `late`: its prompt goes in chunks of 16, each carrying a token of the running rows
    chunks = -(-late.prompt_tokens // 16)
    assert engine.stats["mixed_steps"] >= 2
    assert short.finish_reason == "length" and len(short.tokens) == 3  # rode until done, then stopped riding
    assert before < len(first.tokens) <= before + chunks
    engine._wait([first, late])
    assert first.output.token_ids == alone(model, proc, conv(3.0, 4), 40)
    assert short.output.token_ids == alone(model, proc, conv(1.0, 5), 3)
    assert late.output.token_ids == alone(model, proc, conv(6.0, 6, "A question that comes later?"), 12)


def test_a_prompt_goes_in_equal_chunks_of_at_most_the_budget(odd_pair, small_chunks):
    model, proc = odd_pair
    engine = Engine(model, proc, max_batch_size=2)
    engine.submit(conv(2.0, 12), max_new_tokens=30, min_new_tokens=30)
    engine.step()
    spans = []
    real = engine.runner.prefill_mixed

    def spy(row, req, embeds, start, stop, tokens, lengths):
        spans.append((start, stop))
        return real(row, req, embeds, start, stop, tokens, lengths)

    engine.runner.prefill_mixed = spy
    late = engine.submit(conv(5.0, 13, "A longer question about the second recording?"), max_new_tokens=2)
    engine.step()
    t = late.prompt_tokens
    sizes = [b - a for a, b in spans]
    assert t > 2 * 16 and len(sizes) == -(-t // 16)  # as few chunks as the budget of 16 allows
    assert spans[0][0] == 0 and spans[-1][1] == t and all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))
    assert max(sizes) <= 16 and max(sizes) - min(sizes) <= 1  # of equal size, not 16, 16, ..., and a short tail


def test_many_requests_at_once_answer_as_alone(odd_pair, small_chunks):
    model, proc = odd_pair
    convs = [conv(1.0 + s, s) for s in range(6)]
    outs = Engine(model, proc, max_batch_size=3).generate(convs, max_new_tokens=10, min_new_tokens=10)
    assert [o.token_ids for o in outs] == [alone(model, proc, c, 10) for c in convs]


def test_a_prefix_cache_hit_prefills_only_the_rest_in_chunks(odd_pair, small_chunks):
    model, proc = odd_pair
    engine = Engine(model, proc, max_batch_size=2)
    c1 = conv(4.0, 8)
    first = engine.generate(c1, max_new_tokens=6)
    c2 = c1 + [{"role": "assistant", "content": first.text},
               {"role": "user", "content": "And what else can you hear in the recording, in detail?"}]
    busy = engine.submit(conv(2.0, 9), max_new_tokens=30, min_new_tokens=30)
    engine.step()
    follow = engine.submit(c2, max_new_tokens=6, min_new_tokens=6)
    engine._wait([busy, follow])
    assert follow.output.cached_prompt_tokens >= first.prompt_tokens
    cold = Engine(model, proc, max_batch_size=1, prefix_cache_bytes=0)
    assert follow.output.token_ids == cold.generate(c2, max_new_tokens=6, min_new_tokens=6).token_ids
    assert busy.output.token_ids == alone(model, proc, conv(2.0, 9), 30)


def test_greedy_options_and_text_are_unchanged_by_riding(odd_pair, small_chunks):
    model, proc = odd_pair
    opts = GenerationOptions(max_new_tokens=8, min_new_tokens=8, temperature=0, logprobs=True, top_logprobs=2)
    engine = Engine(model, proc, max_batch_size=2)
    a = engine.submit(conv(2.0, 10), opts)
    engine.step()
    b = engine.submit(conv(5.0, 11), opts)
    engine._wait([a, b])
    for req, c in ((a, conv(2.0, 10)), (b, conv(5.0, 11))):
        ref = Engine(model, proc, max_batch_size=1).generate(c, opts)
        assert req.output.token_ids == ref.token_ids and req.output.text == ref.text
        got = [lp.logprob for lp in req.output.logprobs]
        want = [lp.logprob for lp in ref.logprobs]
        assert got == pytest.approx(want, abs=1e-4)
