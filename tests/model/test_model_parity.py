"""AF3Model forward against transformers' AudioFlamingo3ForConditionalGeneration on the same tiny checkpoints.

Inputs come from the *reference* processor, so these tests do not depend on our processor.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import synth_audio
from safetensors.torch import load_file

from af3.config import AF3Config
from af3.errors import InputError
from af3.model import AF3Model

NAMES = ["base", "odd", "mha"]
TOL = 1e-4




def ref_logits(hf, inputs) -> torch.Tensor:
    """Reference logits with padding-aware positions (plain HF forward uses arange positions)."""
    am = inputs["attention_mask"]
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(**inputs, position_ids=pos).logits


def our_logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def max_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    d = (a - b).abs()
    if mask is not None:
        d = d[mask.bool()]
    return d.max().item()


def single(proc, text: str, audio=None):
    if audio is None:
        return proc(text=[text])
    return proc(text=[text], audio=[audio])


# ---------------------------------------------------------------- audio tower and projector


@pytest.mark.parametrize("name", NAMES)
def test_encoder_and_projector_match_reference_with_partial_and_empty_windows(trio, name):
    proc, hf, ours = trio(name)
    # windows: [3 s partial] [30 s full, 10 s partial] [empty window, 0 tokens] [1 frame, 0 tokens]
    clips = [synth_audio(3.0, 0), synth_audio(40.0, 1), synth_audio(0.0, 2), synth_audio(1 / 16000, 3)]
    inputs = proc(text=["<sound>a", "<sound>b", "<sound>c", "<sound>d"], audio=clips)
    feats, fmask = inputs["input_features"], inputs["input_features_mask"]
    assert feats.shape[0] == 5 and fmask.sum(-1).tolist()[-2:] == [0, 1]
    with torch.no_grad():
        ref_enc = hf.model.audio_tower(feats, input_features_mask=fmask).last_hidden_state
        ref_proj = hf.get_audio_features(feats, fmask).pooler_output
        enc = ours.audio_tower(feats, fmask)
        proj = ours.get_audio_features(feats, fmask)
    post = ((fmask.sum(-1) - 1) // 2 + 1 - 2) // 2 + 1
    valid = torch.arange(enc.shape[1])[None] < post[:, None]
    assert enc.shape == ref_enc.shape
    assert max_diff(enc, ref_enc, valid) <= TOL
    assert proj.shape == ref_proj.shape == (int(post.sum()), hf.config.text_config.hidden_size)
    assert max_diff(proj, ref_proj) <= TOL
    assert torch.isfinite(proj).all()


def test_encoder_without_padding_uses_no_mask_and_matches(trio):
    proc, hf, ours = trio("base")
    inputs = proc(text=["<sound>x"], audio=[synth_audio(30.0, 4)])
    assert inputs["input_features_mask"].all()
    with torch.no_grad():
        ref = hf.get_audio_features(inputs["input_features"], inputs["input_features_mask"]).pooler_output
        assert max_diff(ours.get_audio_features(inputs["input_features"], None), ref) <= TOL


# ---------------------------------------------------------------- logits


@pytest.mark.parametrize("name", NAMES)
def test_logits_single_clip_match_reference(trio, name):
    proc, hf, ours = trio(name)
    inputs = proc.apply_transcription_request(synth_audio(5.0, 5))
    ref = ref_logits(hf, inputs)
    out = ours(**inputs)
    assert out.logits.shape == ref.shape
    assert max_diff(out.logits, ref) <= TOL
    assert out["logits"] is out.logits and out.audio_embeds.shape[0] == (inputs["input_ids"] == 3).sum()


@pytest.mark.parametrize("seconds", [5.0, 40.0, 61.0])
def test_logits_with_one_two_and_three_windows_match_reference(trio, seconds):
    proc, hf, ours = trio("base")
    inputs = single(proc, "<sound>What is it?", synth_audio(seconds, 6))
    assert inputs["input_features"].shape[0] == int(-(-seconds // 30))
    assert max_diff(our_logits(ours, inputs), ref_logits(hf, inputs)) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_left_padded_batch_matches_reference_and_unpadded_rows(trio, name):
    proc, hf, ours = trio(name)
    texts = ["<sound>Transcribe the input speech.", "Hi <sound>", "<sound>What is surprising about it?"]
    clips = [synth_audio(2.0, 7), synth_audio(6.5, 8), synth_audio(0.7, 9)]
    inputs = proc(text=texts, audio=clips)
    am = inputs["attention_mask"]
    assert (am == 0).any(dim=1).sum() == 2  # two rows are left-padded
    ours_batch = our_logits(ours, inputs)
    assert torch.isfinite(ours_batch).all()  # pad positions too
    assert max_diff(ours_batch, ref_logits(hf, inputs), am) <= TOL
    for i, (text, clip) in enumerate(zip(texts, clips, strict=True)):
        one = single(proc, text, clip)
        n = one["input_ids"].shape[1]
        ours_one = our_logits(ours, one)[0]
        assert max_diff(ours_batch[i, -n:], ours_one) <= TOL  # our padded row == our unpadded row
        with torch.no_grad():
            assert max_diff(ours_one, hf(**one).logits[0]) <= TOL


def test_right_padded_batch_matches_unpadded_rows_and_reference(trio):
    """Right padding (training batches) takes the plain causal path; real positions must not change."""
    proc, hf, ours = trio("odd")
    texts = ["<sound>Transcribe the input speech.", "Hi <sound>"]
    clips = [synth_audio(2.0, 7), synth_audio(6.5, 8)]
    inputs = proc(text=texts, audio=clips, padding_side="right")
    am = inputs["attention_mask"]
    assert bool(am[:, 0].all()) and not bool(am[:, -1].all())  # right-padded
    assert not ours.needs_attention_mask(am)
    ours_batch = our_logits(ours, inputs)
    for i, (text, clip) in enumerate(zip(texts, clips, strict=True)):
        one = single(proc, text, clip)
        n = one["input_ids"].shape[1]
        assert max_diff(ours_batch[i, :n], our_logits(ours, one)[0]) <= TOL
        with torch.no_grad():
            assert max_diff(ours_batch[i, :n], hf(**one).logits[0]) <= TOL
    # Left padding still needs (and gets) the mask.
    assert ours.needs_attention_mask(proc(text=texts, audio=clips)["attention_mask"])


def test_batch_with_windows_spanning_samples_matches_reference(trio):
    proc, hf, ours = trio("odd")
    clips = [synth_audio(61.0, 10), synth_audio(4.0, 11)]
    inputs = proc(text=["<sound>long", "<sound>short one"], audio=clips)
    assert inputs["input_features"].shape[0] == 4
    assert max_diff(our_logits(ours, inputs), ref_logits(hf, inputs), inputs["attention_mask"]) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_text_only_rows_match_reference(trio, name):
    proc, hf, ours = trio(name)
    inputs = proc(text=["the quick brown fox jumps over the lazy dog", "How many beeps?"])
    assert "input_features" not in inputs
    assert max_diff(our_logits(ours, inputs), ref_logits(hf, inputs), inputs["attention_mask"]) <= TOL


def test_audio_row_and_text_only_row_in_one_batch(trio):
    proc, hf, ours = trio("base")
    audio_row = single(proc, "<sound>Describe.", synth_audio(1.5, 12))
    text_row = proc.tokenizer(["the lazy dog"], return_tensors="pt")
    t = audio_row["input_ids"].shape[1]
    n = text_row["input_ids"].shape[1]
    ids = torch.full((2, t), proc.tokenizer.pad_token_id)
    am = torch.zeros(2, t, dtype=torch.long)
    ids[0], am[0] = audio_row["input_ids"][0], 1
    ids[1, -n:], am[1, -n:] = text_row["input_ids"][0], 1
    batch = dict(input_ids=ids, attention_mask=am, input_features=audio_row["input_features"],
                 input_features_mask=audio_row["input_features_mask"])
    logits = our_logits(ours, batch)
    with torch.no_grad():
        assert max_diff(logits[0], hf(**audio_row).logits[0]) <= TOL
        assert max_diff(logits[1, -n:], hf(**text_row).logits[0]) <= TOL


@pytest.mark.parametrize("name", NAMES)
def test_multi_turn_conversation_matches_reference(trio, name):
    proc, hf, ours = trio(name)
    conv = [
        {"role": "user", "content": [{"type": "audio", "audio": synth_audio(2.0, 13)},
                                     {"type": "text", "text": "Describe. Be brief."}]},
        {"role": "assistant", "content": "A beep."},
        {"role": "user", "content": [{"type": "text", "text": "Why?"}]},
    ]
    other = [{"role": "user", "content": [{"type": "audio", "audio": synth_audio(0.5, 15)},
                                          {"type": "text", "text": "What is it?"}]}]
    inputs = proc.apply_chat_template([conv, other], add_generation_prompt=True, return_dict=True,
                                      tokenize=True)
    assert inputs["attention_mask"][1].min() == 0
    assert max_diff(our_logits(ours, inputs), ref_logits(hf, inputs), inputs["attention_mask"]) <= TOL


def test_two_audios_in_one_row_fill_placeholders_in_order(trio):
    # The reference processor takes one audio per sample; the model accepts several <sound> runs per row.
    proc, hf, ours = trio("odd")
    a = single(proc, "<sound>first", synth_audio(1.0, 25))
    b = single(proc, "then <sound>second", synth_audio(2.5, 26))
    both = dict(
        input_ids=torch.cat([a["input_ids"], b["input_ids"]], 1),
        attention_mask=torch.cat([a["attention_mask"], b["attention_mask"]], 1),
        input_features=torch.cat([a["input_features"], b["input_features"]]),
        input_features_mask=torch.cat([a["input_features_mask"], b["input_features_mask"]]),
    )
    assert (both["input_ids"] == proc.audio_token_id).sum() == 25 + 62
    assert max_diff(our_logits(ours, both), ref_logits(hf, both)) <= TOL


def test_zero_token_audio_is_accepted_and_unused(trio):
    proc, hf, ours = trio("base")
    clips = [synth_audio(0.0), synth_audio(1.0, 16)]
    inputs = proc(text=["<sound>empty clip", "<sound>a real clip"], audio=clips)
    assert inputs["input_features_mask"][0].sum() == 0
    logits = our_logits(ours, inputs)
    assert torch.isfinite(logits).all()
    assert max_diff(logits, ref_logits(hf, inputs), inputs["attention_mask"]) <= TOL


def test_logits_to_keep_returns_last_positions(trio):
    proc, _, ours = trio("base")
    inputs = single(proc, "<sound>Describe.", synth_audio(1.0, 17))
    full = our_logits(ours, inputs)
    with torch.no_grad():
        last = ours(**inputs, logits_to_keep=2).logits
    assert last.shape[1] == 2
    assert max_diff(last, full[:, -2:]) <= 1e-5


def test_chunked_forward_with_cache_equals_full_forward(trio):
    from af3.model.kv_cache import KVCache

    proc, _, ours = trio("odd")
    inputs = proc(text=["<sound>Transcribe the input speech.", "Hi <sound> the quick brown fox"],
                  audio=[synth_audio(1.0, 18), synth_audio(2.0, 19)])
    ids, am = inputs["input_ids"], inputs["attention_mask"]
    full = our_logits(ours, inputs)
    cfg = ours.config.text_config
    cache = KVCache(cfg.num_hidden_layers, 2, ids.shape[1] + 4, cfg.num_key_value_heads, cfg.head_dim,
                    dtype=torch.float32, device="cpu")
    k = ids.shape[1] - 3
    assert not (ids[:, k:] == proc.audio_token_id).any()  # audio is fused in the first chunk only
    with torch.no_grad():
        first = ours(ids[:, :k], am[:, :k], inputs["input_features"], inputs["input_features_mask"],
                     cache=cache)
        second = ours(ids[:, k:], am, cache=cache)
    assert cache.length == ids.shape[1]
    assert max_diff(torch.cat([first.logits, second.logits], 1), full, am) <= TOL


# ---------------------------------------------------------------- loss


@pytest.mark.parametrize("name", NAMES)
def test_loss_with_labels_matches_reference(trio, name):
    proc, hf, ours = trio(name)
    inputs = proc(text=["<sound>The spoken content of the audio is", "<sound>How many beeps do you hear?"],
                  audio=[synth_audio(1.5, 20), synth_audio(3.0, 21)], output_labels=True)
    assert (inputs["labels"] == -100).any()
    with torch.no_grad():
        ref = hf(**inputs).loss
        out = ours(**inputs)
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_loss_backpropagates_into_every_trainable_part(trio):
    import copy

    proc, _, ours = trio("mha")
    model = copy.deepcopy(ours).train()
    inputs = proc(text=["<sound>hi there"], audio=[synth_audio(1.0, 22)], output_labels=True)
    model(**inputs).loss.backward()
    for part in (model.audio_tower.conv1, model.multi_modal_projector.linear_1, model.language_model.lm_head):
        assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- errors


def test_placeholder_and_feature_count_mismatch_is_an_input_error(trio):
    proc, _, ours = trio("base")
    inputs = dict(single(proc, "<sound>x", synth_audio(2.0, 23)))
    ids = inputs["input_ids"].clone()
    first = (ids[0] == proc.audio_token_id).nonzero()[0, 0]
    ids[0, first] = proc.tokenizer.pad_token_id  # one placeholder fewer
    msg = r"^audio features and <sound> tokens do not match: 49 tokens, 50 audio frames$"
    with pytest.raises(InputError, match=msg):
        ours(**{**inputs, "input_ids": ids})
    longer = single(proc, "<sound>x", synth_audio(4.0, 23))  # more frames than placeholders
    with pytest.raises(InputError, match="do not match"):
        ours(**{**inputs, "input_features": longer["input_features"],
                "input_features_mask": longer["input_features_mask"]})


def test_bad_shapes_are_input_errors(trio):
    proc, _, ours = trio("base")
    inputs = dict(single(proc, "<sound>x", synth_audio(1.0, 24)))
    feats, fmask, ids, am = (inputs[k] for k in ("input_features", "input_features_mask", "input_ids",
                                                 "attention_mask"))
    bad = [
        ({"input_features": feats[:, :80]}, "input_features must be"),
        ({"input_features": feats[..., :2999]}, "input_features must be"),
        ({"input_features": feats[0]}, "input_features must be"),
        ({"input_features_mask": fmask[:, :100]}, "input_features_mask must be"),
        ({"input_ids": ids[0]}, "input_ids must be 2-D"),
        ({"attention_mask": am[:, 1:]}, "attention_mask must be"),
        ({"position_ids": am[:, 1:]}, "position_ids must be"),
        ({"labels": ids[:, 1:]}, "labels must be"),
    ]
    for override, message in bad:
        with pytest.raises(InputError, match=message):
            ours(**{**inputs, **override})
    with pytest.raises(InputError, match="need input_ids"):
        ours(inputs_embeds=torch.zeros(1, 3, ours.config.text_config.hidden_size), input_features=feats,
             input_features_mask=fmask)


def test_attention_mask_lets_padded_queries_see_only_themselves():
    from af3.model.decoder import attention_mask_4d

    key_valid = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    mask = attention_mask_4d(key_valid, 0, 5)[:, 0]  # [B, T, S]
    assert mask.any(-1).all()  # no query row is fully masked (that would give NaN in some SDPA kernels)
    assert torch.equal(mask[0, 0], torch.tensor([True, False, False, False, False]))
    assert torch.equal(mask[0, 4], torch.tensor([False, False, True, True, True]))
    assert torch.equal(mask[1], torch.ones(5, 5, dtype=torch.bool).tril())
    step = attention_mask_4d(torch.ones(2, 7, dtype=torch.bool), 6, 1)  # one decode step at slot 6
    assert step.shape == (2, 1, 1, 7) and step.all()


def test_model_built_on_meta_device_loads_and_matches(trio, ckpt_factory):
    # The checkpoint loader builds the model on the meta device, then allocates and fills it.
    folder = ckpt_factory("odd")[0]
    proc, _, ours = trio("odd")
    with torch.device("meta"):
        model = AF3Model(AF3Config.from_file(os.path.join(folder, "config.json")))
    model = model.to_empty(device="cpu")
    model.load_state_dict(load_file(os.path.join(folder, "model.safetensors")), strict=True)
    inputs = single(proc, "<sound>Describe.", synth_audio(1.0, 27))
    assert max_diff(our_logits(model.eval(), inputs), our_logits(ours, inputs)) == 0


def test_rope_linear_scaling_divides_positions_and_unknown_types_are_refused():
    from af3.config import TextConfig
    from af3.errors import CheckpointError
    from af3.model.decoder import RotaryEmbedding

    small = dict(hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    default = RotaryEmbedding(TextConfig(**small, rope_theta=1e4))
    linear = RotaryEmbedding(TextConfig(**small, rope_scaling={"type": "linear", "factor": 4.0}))
    pos = torch.arange(0, 64, 4)[None]  # [1, 16]
    cos, sin = linear(pos, torch.float32)
    cos_ref, sin_ref = default(pos // 4, torch.float32)
    assert torch.allclose(cos, cos_ref, atol=1e-6) and torch.allclose(sin, sin_ref, atol=1e-6)
    from transformers import Qwen2Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5}
    ref_inv, _ = ROPE_INIT_FUNCTIONS["linear"](Qwen2Config(**small, rope_parameters=dict(params)), "cpu")
    assert torch.equal(RotaryEmbedding(TextConfig(**small, rope_parameters=params)).inv_freq, ref_inv)
    for rope in ({"rope_type": "yarn", "factor": 2.0}, {"rope_type": "linear"}):
        with pytest.raises(CheckpointError, match="rope_type"):
            RotaryEmbedding(TextConfig(**small, rope_parameters=rope))


def test_tied_word_embeddings_share_the_lm_head():
    from af3.config import EncoderConfig, TextConfig

    cfg = AF3Config(
        audio_config=EncoderConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   intermediate_size=32),
        text_config=TextConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                               pad_token_id=0),
        audio_token_id=3,
    )
    model = AF3Model(cfg)
    assert model.language_model.lm_head.weight is model.language_model.model.embed_tokens.weight
    assert model.generation_config.pad_token_id == 0  # no generation config: defaults from the text config
