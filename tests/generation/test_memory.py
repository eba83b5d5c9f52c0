"""Memory follows the work: the Engine's KV cache starts small and grows with the longest running sequence (the
answers stay those of a fully preallocated cache), a growth that does not fit is an error before any allocation,
and requests that nobody continues leave nothing in the prefix cache."""

from __future__ import annotations

import pytest
import torch
from conftest import audio_question

from af3.errors import InputError
from af3.generation.engine import Engine
from af3.model import kv_cache
from af3.model.kv_cache import GROW_STEP, KVCache


@pytest.fixture(scope="module")
def pair(odd_pair):
    return odd_pair


def reference(model, proc, conv, n):
    inputs = proc.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True)
    ids = model.generate(**inputs, max_new_tokens=n, do_sample=False)  # a cache sized for the whole sequence
    return ids[0, inputs["input_ids"].shape[1]:].tolist()


def test_the_kv_cache_starts_small_grows_with_the_longest_request_and_answers_the_same(pair):
    model, proc = pair
    engine = Engine(model, proc, max_batch_size=4, max_seq_len=8192)
    cache = engine.runner.cache
    cfg = model.config.text_config
    per_slot = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4 * model.dtype.itemsize
    assert cache.capacity == GROW_STEP and cache.nbytes == per_slot * GROW_STEP  # 4 rows, not 8192 slots each
    short, long = audio_question(1.0, 1), audio_question(20.0, 2)
    outs = engine.generate([short, long], max_new_tokens=6, min_new_tokens=6)
    grown = cache.capacity
    prompt = proc.apply_chat_template(long, tokenize=True, add_generation_prompt=True, return_dict=True)
    assert prompt["input_ids"].shape[1] + 6 <= grown < 2 * (prompt["input_ids"].shape[1] + 6) + GROW_STEP
    assert grown % GROW_STEP == 0 and grown <= 8192
    assert [o.token_ids for o in outs] == [reference(model, proc, c, 6) for c in (short, long)]
    engine.generate(short, max_new_tokens=3)
    assert engine.runner.cache.capacity == grown  # it does not shrink between requests (no reallocation churn)


def test_growth_keeps_the_contents_and_stops_at_max_len():
    cache = KVCache(2, 3, 1000, 2, 4, dtype=torch.float32, device="cpu", capacity=10)
    k = torch.randn(3, 2, 10, 4)
    cache.update(0, k, k + 1, 0)
    cache.reserve(11)
    assert cache.capacity == GROW_STEP and torch.equal(cache.k[0][:, :, :10], k)
    assert torch.equal(cache.v[0][:, :, :10], k + 1) and not cache.k[0][:, :, 10:].any()
    cache.reserve(900)
    assert cache.capacity == 1000 and torch.equal(cache.k[0][:, :, :10], k)
    with pytest.raises(InputError, match="KV cache is full"):
        cache.reserve(1001)
    with pytest.raises(ValueError, match="whole cache"):
        KVCache(1, 2, 100, 1, 2, dtype=torch.float32, device="cpu", capacity=4).rows(0, 1).reserve(50)


def test_a_growth_that_does_not_fit_in_memory_is_refused_before_allocating(monkeypatch):
    cache = KVCache(4, 8, 1 << 20, 8, 128, dtype=torch.bfloat16, device="cpu", capacity=16)
    monkeypatch.setattr(kv_cache, "available_memory", lambda device: 1 << 30)  # 1 GB left
    # 65536 slots asked, a quarter more kept as headroom: 81920; keys and values: 2·4 layers·8 rows·8 heads·81920·128·2
    need = r"8 rows × 81920 tokens need 10\.74 GB"
    with pytest.raises(InputError, match="not enough memory for the KV cache: " + need):
        cache.reserve(65536)
    assert cache.capacity == 16  # unchanged, still usable
    cache.reserve(200)
    assert cache.capacity == GROW_STEP


def test_requests_that_nobody_continues_leave_nothing_in_the_caches(pair):
    model, proc = pair
    engine = Engine(model, proc, max_batch_size=2)
    engine.generate(audio_question(1.0, 3), max_new_tokens=2, keep_cache=False)
    assert len(engine.prefix_cache) == 0 and len(engine.runner.audio_cache.items) == 0
    engine.generate(audio_question(1.0, 3), max_new_tokens=2)
    assert len(engine.prefix_cache) == 1 and len(engine.runner.audio_cache.items) == 1
    again = engine.generate(audio_question(1.0, 3), max_new_tokens=2, keep_cache=False)
    assert again.audio_windows_cached == 1  # what the caches hold is still used


def test_a_cancelled_request_frees_its_row_and_the_others_go_on(pair):
    model, proc = pair
    engine = Engine(model, proc, max_batch_size=2)
    keep = engine.submit(audio_question(1.0, 4), max_new_tokens=6, min_new_tokens=6)
    gone = engine.submit(audio_question(1.0, 5), max_new_tokens=50, min_new_tokens=50)
    waiting = engine.submit(audio_question(1.0, 6), max_new_tokens=3)  # no free row yet: it waits
    engine.step()
    assert engine.load == (1, 2)
    engine.cancel(gone)
    engine.cancel(waiting)
    engine.step()
    assert engine.load == (0, 1)  # the cancelled one left its row at once, the waiting one never started
    assert gone.done.is_set() and gone.output.finish_reason == "cancelled" and len(gone.output.token_ids) < 50
    assert waiting.output.finish_reason == "cancelled" and waiting.output.token_ids == []
    while not keep.done.is_set():
        engine.step()
    alone = Engine(model, proc, max_batch_size=1).generate(audio_question(1.0, 4), max_new_tokens=6,
                                                            min_new_tokens=6)
    assert keep.output.token_ids == alone.token_ids and len(engine.prefix_cache) == 1  # only the finished one kept
