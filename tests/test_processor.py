"""AF3Processor against transformers' AudioFlamingo3Processor on the same checkpoint folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import synth_audio

from af3 import AF3Processor
from af3.errors import CheckpointError, InputError

SR = 16000


@pytest.fixture(scope="module")
def procs(tiny_ckpt):
    folder, ref, _ = tiny_ckpt
    return AF3Processor.from_pretrained(folder), ref


def user(text=None, audio=None, *more_audio):
    content = []
    if text is not None:
        content.append({"type": "text", "text": text})
    for a in (audio, *more_audio):
        if a is not None:
            content.append({"type": "audio", "audio": a})
    return {"role": "user", "content": content}


def assistant(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def assert_same_batch(ours, ref, keys=None):
    keys = keys or list(ref.keys())
    assert set(ours.keys()) == set(ref.keys())
    for key in keys:
        a, b = ours[key], ref[key]
        assert a.dtype == b.dtype, key
        assert a.shape == b.shape, key
        if key == "input_features":
            assert (a - b).abs().max().item() <= 1e-5
        else:
            assert torch.equal(a, b), key


CONVERSATIONS = {
    "audio_and_text": [user("What is it?", synth_audio(2.0))],
    "audio_only": [user(None, synth_audio(1.0, seed=1))],
    "text_only": [user("What is the capital of France?")],
    "string_content": [{"role": "user", "content": "Hello there."}],
    "system_prompt": [{"role": "system", "content": "Answer briefly."}, user("Describe.", synth_audio(0.5))],
    "multi_turn": [user("Describe. Be brief.", synth_audio(3.0, seed=2)), assistant("A beep."), user("Why?")],
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_rendered_prompt_equals_reference(procs, name):
    ours, ref = procs
    conv = CONVERSATIONS[name]
    for gen in (True, False):
        expected = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen) == expected


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_chat_template_tensors_equal_reference(procs, name):
    ours, ref = procs
    conv = CONVERSATIONS[name]
    kw = dict(tokenize=True, add_generation_prompt=True, return_dict=True)
    assert_same_batch(ours.apply_chat_template(conv, **kw), ref.apply_chat_template(conv, **kw))


@pytest.mark.parametrize("seconds", [0.01, 1.0, 29.99, 30.0, 30.01, 61.0])
def test_audio_lengths_give_reference_tokens_and_features(procs, seconds):
    ours, ref = procs
    conv = [user("Listen.", synth_audio(seconds, seed=3))]
    kw = dict(tokenize=True, add_generation_prompt=True, return_dict=True)
    assert_same_batch(ours.apply_chat_template(conv, **kw), ref.apply_chat_template(conv, **kw))


def test_eleven_minutes_is_truncated_to_twenty_windows_like_reference(procs, caplog):
    ours, ref = procs
    wave = synth_audio(660.0, seed=4)
    text = "<|im_start|>user\n<sound>Summarise.<|im_end|>\n<|im_start|>assistant\n"
    with caplog.at_level("WARNING", logger="af3"):
        mine = ours(text=[text], audio=[wave])
    assert "660.0 s long; only its first 600 s are used" in caplog.text  # said once, by the audio loader
    theirs = ref(text=[text], audio=[wave])
    assert_same_batch(mine, theirs)
    assert mine["input_features"].shape[0] == 20
    assert int((mine["input_ids"] == ours.audio_token_id).sum()) == 15000


def test_batch_of_mixed_lengths_is_left_padded_like_reference(procs):
    ours, ref = procs
    convs = [
        [user("Transcribe the input speech.", synth_audio(5.0, seed=5))],
        [user("Short?", synth_audio(40.0, seed=6))],
        [user("No audio in this one, just a rather longer question about nothing at all.")],
        CONVERSATIONS["multi_turn"],
    ]
    kw = dict(tokenize=True, add_generation_prompt=True, return_dict=True)
    mine = ours.apply_chat_template(convs, **kw)
    # The reference cannot batch text-only rows with audio rows, so build its batch row by row: each row's ids
    # from its own call, left-padded with the pad id; features are the rows' windows in order.
    rows = [ref.apply_chat_template(c, **kw) for c in convs]
    width = max(r["input_ids"].shape[1] for r in rows)
    ids = torch.full((len(rows), width), ours.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        n = r["input_ids"].shape[1]
        ids[i, width - n:] = r["input_ids"][0]
        mask[i, width - n:] = 1
    assert torch.equal(mine["input_ids"], ids)
    assert torch.equal(mine["attention_mask"], mask)
    feats = torch.cat([r["input_features"] for r in rows if "input_features" in r])
    masks = torch.cat([r["input_features_mask"] for r in rows if "input_features" in r])
    assert (mine["input_features"] - feats).abs().max().item() <= 1e-5
    assert torch.equal(mine["input_features_mask"], masks)
    # The audio rows alone batch in the reference too.
    audio_rows = [convs[0], convs[1], convs[3]]
    assert_same_batch(ours.apply_chat_template(audio_rows, **kw), ref.apply_chat_template(audio_rows, **kw))
    # Left padding: every row ends with real tokens, pads sit at the start.
    assert bool(mine["attention_mask"][:, -1].all())
    assert bool((mine["input_ids"][mine["attention_mask"] == 0] == ours.pad_token_id).all())


def test_low_level_call_equals_reference(procs):
    ours, ref = procs
    prompt = "<|im_start|>user\n<sound>What is it?<|im_end|>\n<|im_start|>assistant\n"
    waves = [synth_audio(5.0), synth_audio(31.0, seed=1)]
    assert_same_batch(ours(text=[prompt, prompt], audio=waves), ref(text=[prompt, prompt], audio=waves))
    # Text only.
    assert_same_batch(ours(text=["hello", "a longer hello"]), ref(text=["hello", "a longer hello"]))


def test_reference_labels_are_reproduced(procs):
    ours, ref = procs
    convs = [
        [user("Transcribe the input speech.", synth_audio(2.0)), assistant("The spoken content is 'hi'.")],
        [user("A much longer question to force padding here?", synth_audio(1.0, seed=1)), assistant("No.")],
    ]
    kw = dict(tokenize=True, return_dict=True, output_labels=True)
    mine, theirs = ours.apply_chat_template(convs, **kw), ref.apply_chat_template(convs, **kw)
    assert_same_batch(mine, theirs)
    labels, ids = mine["labels"], mine["input_ids"]
    assert bool((labels[ids == ours.audio_token_id] == -100).all())
    assert bool((labels[mine["attention_mask"] == 0] == -100).all())
    # Text-only labels: only pads are masked.
    text_convs = [[user("one")], [user("a much longer one")]]
    mine_t, theirs_t = ours.apply_chat_template(text_convs, **kw), ref.apply_chat_template(text_convs, **kw)
    assert torch.equal(mine_t["labels"], theirs_t["labels"])


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_assistant_only_labels_keep_replies_and_end_token(procs, padding_side):
    ours, _ = procs
    conv = [
        {"role": "system", "content": "Be brief."},
        user("Describe. Be brief.", synth_audio(1.5)),
        assistant("A beep."),
        user("Why?"),
        assistant("Because it is loud."),
    ]
    other = [user("Hi?"), assistant("Hello there, friend.")]
    batch = ours.apply_chat_template([conv, other], tokenize=True, return_dict=True, assistant_only=True,
                                     padding_side=padding_side)
    end = ours.tokenizer.eos_token
    for row, replies in enumerate([["A beep.", "Because it is loud."], ["Hello there, friend."]]):
        kept = batch["labels"][row][batch["labels"][row] != -100]
        assert ours.decode(kept) == "".join(r + end for r in replies)
        # Kept labels are exactly the input ids at those positions.
        pos = batch["labels"][row] != -100
        assert torch.equal(batch["labels"][row][pos], batch["input_ids"][row][pos])


def test_several_audios_in_one_message_and_across_turns(procs):
    ours, ref = procs
    a, b, c = synth_audio(1.0, seed=1), synth_audio(2.5, seed=2), synth_audio(31.0, seed=3)
    conv = [user("Compare these.", a, b), assistant("The second is longer."), user("And this one?", c)]
    text = ours.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert text.count("<sound>") == 3
    batch = ours.apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=True)
    ids = batch["input_ids"][0]
    # Runs of <sound> tokens, in order, with the reference's per-clip token counts.
    is_snd = (ids == ours.audio_token_id).int().tolist()
    runs, k = [], 0
    for i, flag in enumerate(is_snd):
        if flag and (i == 0 or not is_snd[i - 1]):
            runs.append(0)
        if flag:
            runs[-1] += 1
            k += 1
    single = [int((ref(text=["<sound>"], audio=[w])["input_ids"] == ours.audio_token_id).sum()) for w in (a, b, c)]
    # a and b are adjacent in one message; the reference template puts audio first, so they form one run.
    assert runs == [single[0] + single[1], single[2]]
    # Features are the clips' windows in order.
    expected = torch.cat([ref(text=["<sound>"], audio=[w])["input_features"] for w in (a, b, c)])
    assert batch["input_features"].shape == expected.shape
    assert (batch["input_features"] - expected).abs().max().item() <= 1e-5


def test_placeholder_and_audio_count_mismatch_is_an_error(procs):
    ours, _ = procs
    with pytest.raises(InputError, match="placeholder"):
        ours(text=["<sound><sound>hi"], audio=[synth_audio(1.0)])
    with pytest.raises(InputError, match="placeholder"):
        ours(text=["hi"], audio=[synth_audio(1.0)])
    with pytest.raises(InputError, match="audio part"):
        ours.apply_chat_template([user("a literal <sound> in text")], tokenize=False)


@pytest.mark.parametrize("bad", [
    "not a conversation",
    [],
    [{"content": "no role"}],
    [{"role": "robot", "content": "hi"}],
    [{"role": "user", "content": [{"type": "image", "url": "x"}]}],
    [{"role": "assistant", "content": [{"type": "audio", "audio": np.zeros(16000, np.float32)}]}],
])
def test_malformed_conversations_are_clear_errors(procs, bad):
    ours, _ = procs
    with pytest.raises(InputError):
        ours.apply_chat_template(bad, tokenize=True, return_dict=True)


def test_transcription_request_equals_reference(procs):
    ours, ref = procs
    waves = [synth_audio(3.0), synth_audio(7.0, seed=1)]
    assert_same_batch(ours.apply_transcription_request(waves[0]), ref.apply_transcription_request(waves[0]))
    assert_same_batch(ours.apply_transcription_request(waves), ref.apply_transcription_request(waves))
    prompts = ["Write down what is said.", None]
    assert_same_batch(ours.apply_transcription_request(waves, prompt=prompts),
                      ref.apply_transcription_request(waves, prompt=prompts))
    assert ours.apply_transcription_request(waves[0], tokenize=False) == \
        ref.apply_transcription_request(waves[0], tokenize=False)


@pytest.mark.parametrize("text", [
    "The spoken content of the audio is 'hello world'.",
    "The transcription of the audio is \"summer follows spring\".",
    "The content of the input audio is 'x'.",
    "  plain text without a prefix.  ",
    "'quoted'",
])
def test_decode_and_strip_prefix_equal_reference(procs, text):
    ours, ref = procs
    ids = torch.tensor([ours.tokenizer.encode(text) + [ours.eos_token_id]])
    for skip in (True, False):
        for strip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip, strip_prefix=strip) == \
                ref.decode(ids, skip_special_tokens=skip, strip_prefix=strip)
    assert ours.batch_decode(ids, skip_special_tokens=True) == ref.batch_decode(ids, skip_special_tokens=True)
    assert ours.decode(ids[0], skip_special_tokens=True) == ref.decode(ids[0], skip_special_tokens=True)


def test_to_casts_only_floating_tensors(procs):
    ours, _ = procs
    batch = ours.apply_transcription_request(synth_audio(1.0)).to("cpu", dtype=torch.bfloat16)
    assert batch.input_features.dtype == torch.bfloat16
    assert batch.input_ids.dtype == torch.long
    assert batch.input_features_mask.dtype == torch.int32
    assert batch.attention_mask.dtype == torch.long


def test_sampling_rate_is_resampled(procs):
    ours, ref = procs
    t = np.arange(44100 * 2) / 44100
    wave44 = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    batch = ours(text=["<sound>"], audio=[wave44], sampling_rate=44100)
    # 2 s at 16 kHz → 50 audio tokens, whatever the input rate.
    assert int((batch["input_ids"] == ours.audio_token_id).sum()) == 50


def test_save_pretrained_round_trip_and_transformers_reads_it(procs, tmp_path):
    from transformers import AutoProcessor

    ours, ref = procs
    ours.save_pretrained(tmp_path)
    again = AF3Processor.from_pretrained(tmp_path)
    theirs = AutoProcessor.from_pretrained(tmp_path)
    conv = CONVERSATIONS["multi_turn"]
    kw = dict(tokenize=True, add_generation_prompt=True, return_dict=True)
    assert_same_batch(again.apply_chat_template(conv, **kw), ref.apply_chat_template(conv, **kw))
    assert_same_batch(theirs.apply_chat_template(conv, **kw), ref.apply_chat_template(conv, **kw))


def test_missing_tokenizer_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.json"):
        AF3Processor.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does not exist"):
        AF3Processor.from_pretrained(tmp_path / "nope")
