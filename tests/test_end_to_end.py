"""Our processor + model against transformers' processor + model, end to end, on several tiny configs."""

from __future__ import annotations

import pytest
import torch
from conftest import synth_audio

from af3 import AF3Model, AF3Processor

KW = dict(tokenize=True, add_generation_prompt=True, return_dict=True)


def user(text, *clips):
    return {"role": "user", "content": [{"type": "text", "text": text}]
            + [{"type": "audio", "audio": c} for c in clips]}


def batches():
    """Named lists of conversations (each list is one left-padded batch the reference can also build)."""
    return {
        "single_5s": [[user("What is it?", synth_audio(5.0))]],
        "mixed_lengths": [[user("Transcribe the input speech.", synth_audio(0.01))],
                          [user("What do you hear in this long recording?", synth_audio(61.0, seed=1))],
                          [user("Hm?", synth_audio(29.99, seed=2))]],
        "window_edges": [[user("A", synth_audio(30.0, seed=3))], [user("B", synth_audio(30.01, seed=4))]],
        "multi_turn": [[user("Describe.", synth_audio(3.0, seed=5)),
                        {"role": "assistant", "content": "A beep."}, {"role": "user", "content": "Why?"}]],
        "text_only": [[user("What is the capital of France?")], [user("Hi")]],
    }


@pytest.fixture(scope="module", params=["base", "odd", "mha"])
def pair(request, ckpt_factory):
    folder, ref_proc, ref_model = ckpt_factory(request.param)
    return AF3Processor.from_pretrained(folder), AF3Model.from_pretrained(folder), ref_proc, ref_model


def real_logits(model, inputs):
    mask = inputs["attention_mask"]
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(**inputs, position_ids=pos).logits[mask.bool()]


@pytest.mark.parametrize("name", list(batches()))
def test_logits_and_greedy_generation_match_reference(pair, name):
    proc, model, ref_proc, ref_model = pair
    convs = batches()[name]
    ours = proc.apply_chat_template(convs, **KW)
    theirs = ref_proc.apply_chat_template(convs, **KW)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    diff = (real_logits(model, ours) - real_logits(ref_model, theirs)).abs().max().item()
    assert diff <= 1e-4
    n = ours["input_ids"].shape[1]
    mine = model.generate(**ours, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    ref = ref_model.generate(**theirs, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert torch.equal(mine[:, n:], ref[:, n:])
    assert torch.equal(mine[:, :n], ours["input_ids"])


def test_eleven_minutes_of_audio_match_reference(ckpt_factory):
    folder, ref_proc, ref_model = ckpt_factory("base")
    proc, model = AF3Processor.from_pretrained(folder), AF3Model.from_pretrained(folder)
    convs = [[user("Summarise the recording.", synth_audio(660.0, seed=7))]]
    ours, theirs = proc.apply_chat_template(convs, **KW), ref_proc.apply_chat_template(convs, **KW)
    assert int((ours["input_ids"] == proc.audio_token_id).sum()) == 15000
    with torch.no_grad():
        a = model(**ours, logits_to_keep=64).logits
        b = ref_model(**theirs, logits_to_keep=64).logits
    assert (a - b).abs().max().item() <= 1e-4
    n = ours["input_ids"].shape[1]
    mine = model.generate(**ours, max_new_tokens=5, min_new_tokens=5)
    ref = ref_model.generate(**theirs, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert torch.equal(mine[:, n:], ref[:, n:])
