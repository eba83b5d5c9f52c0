"""AF3Model.generate against transformers' generate (greedy, penalty, EOS/pad handling) and sampling rules."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import synth_audio

from af3.config import GenerationConfig
from af3.errors import InputError
from af3.generation.options import DEFAULT_MAX_NEW_TOKENS, GenerationOptions
from af3.generation.sampling import apply_repetition_penalty, apply_top_k, apply_top_p, build_chain, process
from af3.model.kv_cache import KVCache

NAMES = ["base", "odd", "mha"]


@pytest.fixture(scope="module")
def trio_batch(trio):
    """``trio_batch(name)`` → (reference processor, reference model, our model, left-padded batch with audio)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            proc, hf, ours = trio(name)
            texts = ["<sound>Transcribe the input speech.", "Hi <sound>", "<sound>How many beeps do you hear"]
            batch = proc(text=texts, audio=[synth_audio(2.0, 1), synth_audio(3.5, 2), synth_audio(0.6, 3)])
            cache[name] = (proc, hf, ours, batch)
        return cache[name]

    return get


def hf_generate(hf, batch, **kw):
    with torch.no_grad():
        return hf.generate(**batch, do_sample=False, **kw)


@pytest.mark.parametrize("name", NAMES)
def test_greedy_batch_with_left_padding_matches_reference(trio_batch, name):
    _, hf, ours, batch = trio_batch(name)
    assert (batch["attention_mask"] == 0).any()
    ref = hf_generate(hf, batch, max_new_tokens=20, min_new_tokens=20)
    out = ours.generate(**batch, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert out.shape == ref.shape == (3, batch["input_ids"].shape[1] + 20)
    assert torch.equal(out, ref)
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])


def test_text_only_greedy_matches_reference(trio_batch):
    proc, hf, ours, _ = trio_batch("odd")
    batch = proc(text=["the quick brown fox", "You are a helpful assistant. How many beeps?"])
    ref = hf_generate(hf, batch, max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(ours.generate(**batch, max_new_tokens=12, min_new_tokens=12), ref)


@pytest.mark.parametrize("name", NAMES)
def test_early_eos_pads_finished_rows_and_stops_when_all_done(trio_batch, name):
    proc, hf, ours, batch = trio_batch(name)
    t = batch["input_ids"].shape[1]
    pad = proc.tokenizer.pad_token_id
    free = ours.generate(**batch, max_new_tokens=20, min_new_tokens=20)[:, t:]  # [3, 20]
    # An end token that row 0 emits early (so row 0 finishes and gets pads while others may go on).
    eos_a = int(free[0, 2])
    # End tokens that every row emits within a few steps: decoding must stop before 20 new tokens.
    eos_b = sorted({int(free[r, 1]) for r in range(3)})
    for eos in (eos_a, eos_b):
        ref = hf_generate(hf, batch, max_new_tokens=20, eos_token_id=eos)
        out = ours.generate(**batch, max_new_tokens=20, eos_token_id=eos)
        assert out.shape == ref.shape and torch.equal(out, ref)
        eos_ids = torch.tensor([eos] if isinstance(eos, int) else eos)
        for row in out[:, t:]:
            hits = torch.isin(row, eos_ids).nonzero()
            if len(hits):
                assert (row[hits[0, 0] + 1 :] == pad).all()  # pads after the end token
    assert ours.generate(**batch, max_new_tokens=20, eos_token_id=eos_b).shape[1] < t + 20
    # min_new_tokens keeps the end token away until it is reached.
    forced = ours.generate(**batch, max_new_tokens=6, min_new_tokens=6, eos_token_id=eos_b)
    assert forced.shape[1] == t + 6
    assert not torch.isin(forced[:, t:], torch.tensor(eos_b)).any()


@pytest.mark.parametrize("name", NAMES)
def test_repetition_penalty_matches_reference(trio_batch, name):
    _, hf, ours, batch = trio_batch(name)
    ref = hf_generate(hf, batch, max_new_tokens=20, min_new_tokens=20, repetition_penalty=1.3)
    out = ours.generate(**batch, max_new_tokens=20, min_new_tokens=20, repetition_penalty=1.3)
    assert torch.equal(out, ref)
    plain = ours.generate(**batch, max_new_tokens=20, min_new_tokens=20)
    assert not torch.equal(out, plain)  # the penalty changed the output: the comparison above means something


def test_defaults_come_from_generation_config(trio_batch):
    _, _, ours, batch = trio_batch("base")
    t = batch["input_ids"].shape[1]
    model = copy.copy(ours)
    model.generation_config = GenerationConfig(eos_token_id=[], pad_token_id=0)
    assert model.generate(**batch).shape[1] == t + DEFAULT_MAX_NEW_TOKENS  # the Engine's default too
    model.generation_config = GenerationConfig(eos_token_id=[], max_new_tokens=7)
    assert model.generate(**batch).shape[1] == t + 7
    model.generation_config = GenerationConfig(eos_token_id=[], max_length=t + 5)
    assert model.generate(**batch).shape[1] == t + 5


# ---------------------------------------------------------------- sampling


def test_same_seed_same_output_different_seeds_differ(trio_batch):
    _, _, ours, batch = trio_batch("base")
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=True, temperature=1.5, top_k=0)
    a = ours.generate(**batch, seed=1, **kw)
    assert torch.equal(a, ours.generate(**batch, seed=1, **kw))
    assert torch.equal(a, ours.generate(**batch, generator=torch.Generator().manual_seed(1), **kw))
    assert not torch.equal(a, ours.generate(**batch, seed=2, **kw))


def test_top_k_1_and_tiny_top_p_equal_greedy(trio_batch):
    _, _, ours, batch = trio_batch("odd")
    greedy = ours.generate(**batch, max_new_tokens=15, min_new_tokens=15, do_sample=False)
    for kw in (dict(top_k=1), dict(top_k=0, top_p=1e-6)):
        sampled = ours.generate(**batch, max_new_tokens=15, min_new_tokens=15, do_sample=True,
                                temperature=5.0, seed=3, **kw)
        assert torch.equal(sampled, greedy), kw


def test_logits_processing_matches_reference_processors():
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=g) * 3
    logits[0, :5] = 7.0  # ties at the top
    seq = torch.randint(0, 50, (4, 9), generator=g)
    assert torch.equal(apply_repetition_penalty(logits, seq, 1.3),
                       RepetitionPenaltyLogitsProcessor(1.3)(seq, logits.clone()))
    for k in (1, 3, 50, 80):
        assert torch.equal(apply_top_k(logits, k), TopKLogitsWarper(k)(seq, logits.clone()))
    for p in (0.01, 0.5, 0.9, 0.999):
        assert torch.equal(apply_top_p(logits, p), TopPLogitsWarper(p)(seq, logits.clone()))
    options = GenerationOptions(do_sample=True, temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.2,
                                max_new_tokens=1).resolved(GenerationConfig())
    ref = logits.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(10),
                 TopPLogitsWarper(0.8)):
        ref = proc(seq, ref)
    assert torch.allclose(process(build_chain(options), logits, seq, 0), ref)
    assert (apply_top_p(logits, 0.5) > float("-inf")).sum(-1).min() >= 1


def test_bad_sampling_options_are_input_errors(trio_batch):
    _, _, ours, batch = trio_batch("base")
    for kw in (dict(do_sample=True, temperature=0.0), dict(do_sample=True, top_p=0.0), dict(top_k=-1)):
        with pytest.raises(InputError):
            ours.generate(**batch, max_new_tokens=2, **kw)
    with pytest.raises(InputError, match="attention_mask"):
        ours.generate(batch["input_ids"], batch["attention_mask"][:, 1:], max_new_tokens=2)


# ---------------------------------------------------------------- cache


def test_kv_cache_writes_shared_and_per_row_slots():
    cache = KVCache(1, 2, 6, 1, 2, dtype=torch.float32, device="cpu")
    k = torch.arange(8.0).view(2, 1, 2, 2)  # [B=2, Hkv=1, T=2, Dh=2]
    cache.update(0, k, -k, 1)
    assert torch.equal(cache.k[0][:, :, 1:3], k) and torch.equal(cache.v[0][:, :, 1:3], -k)
    assert cache.k[0][:, :, [0, 3, 4, 5]].abs().sum() == 0
    slots = torch.tensor([[4, 5], [2, 3]])
    cache.update(0, k + 100, k, slots)
    assert torch.equal(cache.k[0][0, :, 4:6], k[0] + 100) and torch.equal(cache.k[0][1, :, 2:4], k[1] + 100)
    keys, values = cache.keys_values(0, 3)
    assert keys.shape == (2, 1, 3, 2) and values.shape == (2, 1, 3, 2)


# ---------------------------------------------------------------- bf16


def test_bf16_matches_reference_bf16_and_stays_close_to_fp32(trio_batch, ckpt_factory):
    from transformers import AudioFlamingo3ForConditionalGeneration

    _, _, ours, batch = trio_batch("base")
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    # The reference loaded in bf16 keeps its rotary frequencies in fp32, as we do.
    folder = ckpt_factory("base")[0]
    ref = AudioFlamingo3ForConditionalGeneration.from_pretrained(folder, dtype=torch.bfloat16)
    ref_batch = dict(batch, input_features=batch["input_features"].to(torch.bfloat16))
    real = batch["attention_mask"].bool()
    pos = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        full = ours(**batch).logits
        low = bf16(**batch).logits
        ref_low = ref.eval()(**ref_batch, position_ids=pos).logits
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref_low.float())[real].abs().max().item() <= 2e-2
    agree = (low.float().argmax(-1) == full.argmax(-1))[real].float().mean().item()
    assert agree >= 0.85  # tiny random models have flat logits; measured ~0.93
    out = bf16.generate(**batch, max_new_tokens=10, min_new_tokens=10)
    with torch.no_grad():
        ref_out = ref.generate(**ref_batch, max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert out.shape == (3, batch["input_ids"].shape[1] + 10)
    assert torch.equal(out, ref_out)
