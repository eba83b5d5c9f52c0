"""Training data layer: manifests (JSONL and NVIDIA JSON), mixtures, the length-grouped sampler, the collator."""

from __future__ import annotations

import json
import math
import os
import pickle
from collections import Counter

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import synth_audio
from torch.utils.data import DataLoader

from af3 import AF3Processor
from af3.errors import InputError
from af3.processor import IGNORE_INDEX
from af3.training.data import (
    Collator,
    Example,
    LengthGroupedSampler,
    MixtureDataset,
    load_manifest,
    parse_mixture,
)

SR = 16000
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def processor(tiny_ckpt):
    return AF3Processor.from_pretrained(tiny_ckpt[0])


def write_wav(path, seconds: float, seed: int = 0, rate: int = SR) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, synth_audio(seconds, seed, rate), rate)
    return str(path)


def write_jsonl(path, rows, blank_after_first: bool = False) -> str:
    lines = [json.dumps(r) for r in rows]
    if blank_after_first:
        lines.insert(1, "   ")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def write_json_list(path, rows) -> str:
    """One item per line, so item k (1-based) starts on line k + 1."""
    path.write_text("[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n", encoding="utf-8")
    return str(path)


def user(*parts):
    return {"role": "user", "content": list(parts)}


def text(t):
    return {"type": "text", "text": t}


def reply(t):
    return {"role": "assistant", "content": [text(t)]}


def qa_rows(n: int, tag: str):
    """Text-only NVIDIA rows, cheap to load in bulk."""
    return [{"id": f"{tag}{i}", "conversations": [{"from": "human", "value": f"{tag} question {i}"},
                                                   {"from": "gpt", "value": f"answer {i}"}]} for i in range(n)]


# ---------------------------------------------------------------------------------------------- JSONL


def test_jsonl_both_forms_paths_and_lengths(tmp_path, caplog):
    write_wav(tmp_path / "audio" / "a.wav", 2.0)
    elsewhere = write_wav(tmp_path.parent / f"{tmp_path.name}_abs" / "b.wav", 1.0, seed=1)
    rows = [
        {"id": "x", "messages": [user(text("What is it?"), {"type": "audio", "path": "audio/a.wav"}), reply("A dog.")]},
        [user({"type": "audio", "audio": elsewhere}, text("Hi")), reply("Hello.")],  # bare list, "audio" key
        {"duration": 100.0, "messages": [user({"type": "audio", "path": "missing.wav"}), reply("x")]},
        {"messages": [user({"type": "audio", "path": "https://example.com/c.wav"}), reply("y")]},
        {"messages": [{"role": "user", "content": "plain string"}, {"role": "assistant", "content": "ok"}]},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows, blank_after_first=True)
    with caplog.at_level("WARNING", logger="af3"):
        ex = load_manifest(path)
    assert "1 audio file(s) do not exist" in caplog.text and "missing.wav" in caplog.text
    assert all(isinstance(e, Example) for e in ex)
    assert [e.source for e in ex] == [f"{path}:{n}" for n in (1, 3, 4, 5, 6)]  # blank line 2 skipped

    a_wav = str(tmp_path / "audio" / "a.wav")
    assert ex[0].messages == [user(text("What is it?"), {"type": "audio", "path": a_wav}), reply("A dog.")]
    assert ex[1].messages[0]["content"][0] == {"type": "audio", "path": elsewhere}
    assert ex[2].messages[0]["content"][0]["path"] == str(tmp_path / "missing.wav")
    assert ex[3].messages[0]["content"][0]["path"] == "https://example.com/c.wav"
    assert ex[4].messages == [{"role": "user", "content": [text("plain string")]}, reply("ok")]

    # length = audio seconds * 25 (file header, row duration, or 30 s for URLs) + characters / 4
    assert ex[0].length == math.ceil(2.0 * 25 + len("What is it?A dog.") / 4)
    assert ex[1].length == math.ceil(1.0 * 25 + len("HiHello.") / 4)
    assert ex[2].length == math.ceil(100.0 * 25 + 1 / 4)
    assert ex[3].length == math.ceil(30.0 * 25 + 1 / 4)
    assert ex[4].length == math.ceil(len("plain stringok") / 4)
    # capped by max_audio_len
    assert load_manifest(path, max_audio_len=60.0)[2].length == math.ceil(60.0 * 25 + 1 / 4)


def test_duration_list_and_probe_of_other_rates(tmp_path):
    write_wav(tmp_path / "a.wav", 3.0, rate=8000)
    write_wav(tmp_path / "b.wav", 1.0)
    two = [user({"type": "audio", "path": "a.wav"}, {"type": "audio", "path": "b.wav"}), reply("")]
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": two}, {"messages": two, "duration": [700.0, 2.0]},
                                             {"messages": two, "duration": 10}])
    ex = load_manifest(path)
    assert [e.length for e in ex] == [100, 600 * 25 + 50, 250]  # probe 3 s + 1 s; cap 600 s; 10 s split


# ---------------------------------------------------------------------------------------------- NVIDIA JSON


def test_nvidia_json_single_multi_and_text_only(tmp_path, processor):
    write_wav(tmp_path / "clips" / "one.wav", 1.0)
    write_wav(tmp_path / "clips" / "two.wav", 1.5, seed=2)
    rows = [
        {"id": "s", "sound": "clips/one.wav", "duration": 1.0,
         "conversations": [{"from": "human", "value": "<sound>\nWhat is it?"}, {"from": "gpt", "value": "A beep."}]},
        {"id": "m", "sound": ["clips/one.wav", "clips/two.wav"], "duration": 2.5,
         "conversations": [{"from": "human", "value": "<sound-2>\n<sound-1>\nWhich is longer?"},
                           {"from": "gpt", "value": "The second."},
                           {"from": "human", "value": "Sure?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "t", "conversations": [{"from": "system", "value": "Be brief."},
                                      {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
        {"id": "n", "sound": "clips/two.wav",  # no placeholder: the audio goes first in the first human turn
         "conversations": [{"from": "human", "value": "Describe."}, {"from": "gpt", "value": "Noise."}]},
        {"id": "i", "sound": ["clips/one.wav", "clips/two.wav"],  # tags inside the text: tag + one newline go
         "conversations": [{"from": "human", "value": "Is <sound-1>\nlike <sound-2>\n\n?"},
                           {"from": "gpt", "value": "No."}]},
    ]
    path = write_json_list(tmp_path / "train.json", rows)
    ex = load_manifest(path)
    one, two = str(tmp_path / "clips" / "one.wav"), str(tmp_path / "clips" / "two.wav")
    assert [e.source for e in ex] == [f"{path}:{k}" for k in (2, 3, 4, 5, 6)]
    assert ex[0].messages == [user({"type": "audio", "path": one}, text("What is it?")), reply("A beep.")]
    assert ex[1].messages[0] == user({"type": "audio", "path": one}, {"type": "audio", "path": two},
                                     text("Which is longer?"))
    assert ex[3].messages[0] == user({"type": "audio", "path": two}, text("Describe."))

    rendered = [processor.apply_chat_template(e.messages, tokenize=False) for e in ex]
    assert rendered[0] == (SYSTEM + "<|im_start|>user\n<sound>What is it?<|im_end|>\n"
                           "<|im_start|>assistant\nA beep.<|im_end|>\n")
    assert rendered[1] == (SYSTEM + "<|im_start|>user\n<sound><sound>Which is longer?<|im_end|>\n"
                           "<|im_start|>assistant\nThe second.<|im_end|>\n<|im_start|>user\nSure?<|im_end|>\n"
                           "<|im_start|>assistant\nYes.<|im_end|>\n")
    assert rendered[2] == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                           "<|im_start|>assistant\nHello.<|im_end|>\n")
    assert rendered[3].count("<sound>") == 1
    assert ex[4].messages[0]["content"][2] == text("Is like \n?")
    assert ex[1].length == math.ceil(2.5 * 25 + len("Which is longer?The second.Sure?Yes.") / 4)


def test_minified_json_items_are_numbered(tmp_path):
    path = tmp_path / "mini.json"
    path.write_text(json.dumps(qa_rows(3, "q")), encoding="utf-8")
    assert [e.source for e in load_manifest(str(path))] == [f"{path}:1 (item {k})" for k in (1, 2, 3)]


GOOD = [user(text("q")), reply("a")]


def nv(*turns, sound=None):
    row = {"conversations": [{"from": f, "value": v} for f, v in turns]}
    if sound is not None:
        row["sound"] = sound
    return row


@pytest.mark.parametrize(("bad", "says"), [
    ('{"messages": [', "bad JSON"),
    (json.dumps([reply("a")]), "no user turn"),
    (json.dumps([{"role": "robot", "content": "x"}, reply("a")]), "unknown role 'robot'"),
    (json.dumps([user(text("q"))]), "assistant reply is missing"),
    (json.dumps([user(text("q")), {"role": "assistant", "content": [{"type": "audio", "path": "a.wav"}]}]),
     "audio in a assistant message"),
    (json.dumps([user(text("hear <sound>")), reply("a")]), "literal <sound>"),
    (json.dumps({"id": 3}), "expected"),
    (json.dumps([user({"type": "image", "url": "x"}), reply("a")]), "unknown part"),
    (json.dumps({"messages": GOOD, "duration": -1}), "duration"),
    (json.dumps({"messages": [user({"type": "audio", "path": "a.wav"}), reply("a")], "duration": [1, 2]}),
     "one per audio"),
    (json.dumps(nv(("human", "q"), ("bot", "a"))), "unknown \"from\" 'bot'"),
    (json.dumps(nv(("human", "<sound-3> q"), ("gpt", "a"), sound=["a.wav", "b.wav"])), "<sound-3> but the row has 2"),
    (json.dumps(nv(("human", "<sound> q"), ("gpt", "a <sound>"), sound=["a.wav", "b.wav"])), "in a 'gpt' turn"),
    (json.dumps(nv(("human", "<sound-1> q"), ("gpt", "a"), sound=["a.wav", "b.wav"])), "never referenced"),
    (json.dumps(nv(("human", "<sound> q"), ("gpt", "a"))), "<sound> but the row has 0"),
])
def test_malformed_lines_name_file_and_line(tmp_path, bad, says):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"messages": GOOD}) + "\n" + json.dumps(GOOD) + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(InputError) as info:
        load_manifest(str(path))
    assert f"{path}:3" in str(info.value)
    assert says in str(info.value)


def test_malformed_json_list_names_line(tmp_path):
    rows = qa_rows(3, "q")
    rows[2]["conversations"][1]["from"] = "narrator"
    path = write_json_list(tmp_path / "bad.json", rows)
    with pytest.raises(InputError, match=r"bad\.json:4: .*narrator"):
        load_manifest(path)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n{"conversations": []},\n{"conversations": [}\n]', encoding="utf-8")
    with pytest.raises(InputError, match=r"broken\.json:3: bad JSON"):
        load_manifest(str(broken))


def test_empty_or_absent_manifest(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(InputError, match="no examples"):
        load_manifest(str(empty))
    (tmp_path / "empty.json").write_text("[]", encoding="utf-8")
    with pytest.raises(InputError, match="no examples"):
        load_manifest(str(tmp_path / "empty.json"))
    with pytest.raises(InputError, match="does not exist"):
        load_manifest(str(tmp_path / "nope.jsonl"))


# ---------------------------------------------------------------------------------------------- mixtures


def test_parse_mixture_names_paths_weights(tmp_path):
    asr = write_jsonl(tmp_path / "asr.jsonl", [GOOD])
    qa = write_jsonl(tmp_path / "q+a.jsonl", [GOOD])  # a "+" inside a path
    named = {"asr": asr, "qa": qa}
    assert parse_mixture("2.0*asr+1.0*qa", named) == [(2.0, asr), (1.0, qa)]
    assert parse_mixture(" asr + 0.5*qa ", named) == [(1.0, asr), (0.5, qa)]
    assert parse_mixture(f"3*{asr}") == [(3.0, asr)]
    assert parse_mixture(qa) == [(1.0, qa)]
    assert parse_mixture({"asr": 2, qa: 0.25}, named) == [(2.0, asr), (0.25, qa)]
    assert parse_mixture([asr, "2*qa", (1.5, "asr"), {"path": qa, "weight": 3}], named) == [
        (1.0, asr), (2.0, qa), (1.5, asr), (3.0, qa)]


@pytest.mark.parametrize(("spec", "says"), [
    ("2.0*asr+1.0*music", "'music'"),
    ("0*asr", "'0*asr'"),
    ("-1*asr", "'-1*asr'"),
    ("nan*asr", "'nan*asr'"),
    ("two*asr", "'two*asr'"),
    ("asr++asr", "empty term"),
    ("", "empty"),
    ({"asr": 0}, "'asr: 0'"),
    ([], "empty"),
    (42, "not a int"),
])
def test_parse_mixture_errors(tmp_path, spec, says):
    named = {"asr": write_jsonl(tmp_path / "asr.jsonl", [GOOD])}
    with pytest.raises(InputError) as info:
        parse_mixture(spec, named)
    assert says in str(info.value)


def test_weight_semantics(tmp_path):
    a = write_json_list(tmp_path / "a.json", qa_rows(10, "a"))
    b = write_json_list(tmp_path / "b.json", qa_rows(400, "b"))
    c = write_json_list(tmp_path / "c.json", qa_rows(50, "c"))
    ds = MixtureDataset([(2.0, a), (0.5, b), (1.5, c)], seed=7)

    def counts(dataset):
        per = Counter(dataset.example(i).source for i in range(len(dataset)))
        return {name: Counter(n for s, n in per.items() if s.startswith(p)) for name, p in (("a", a), ("b", b),
                                                                                            ("c", c))}, per

    by, per = counts(ds)
    assert by["a"] == Counter({2: 10})  # integer weight: every example exactly twice
    assert set(by["b"]) == {1} and 160 <= by["b"][1] <= 240  # Binomial(400, 0.5): mean 200, sd 10
    assert set(by["c"]) <= {1, 2} and sum(by["c"].values()) == 50 and 10 <= by["c"][2] <= 40  # Bin(50, .5)
    assert len(ds) == sum(per.values()) == len(ds.lengths())
    assert ds.lengths() == [ds.example(i).length for i in range(len(ds))]

    first = [ds.example(i).source for i in range(len(ds))]
    again = MixtureDataset([(2.0, a), (0.5, b), (1.5, c)], seed=7)
    assert [again.example(i).source for i in range(len(again))] == first
    ds.set_epoch(1)
    epoch1 = [ds.example(i).source for i in range(len(ds))]
    assert epoch1 != first
    assert counts(ds)[0]["a"] == Counter({2: 10})
    ds.set_epoch(0)
    assert [ds.example(i).source for i in range(len(ds))] == first
    other_seed = MixtureDataset([(2.0, a), (0.5, b), (1.5, c)], seed=8)
    assert [other_seed.example(i).source for i in range(len(other_seed))] != first


# ---------------------------------------------------------------------------------------------- items and collation


@pytest.fixture
def audio_manifest(tmp_path):
    write_wav(tmp_path / "good.wav", 1.0)
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF" + bytes(np.random.default_rng(0).integers(0, 256, 2000,
                                                                                         dtype=np.uint8)))
    rows = [
        {"messages": [user({"type": "audio", "path": "good.wav"}, text("What is it?")), reply("A beep.")]},
        {"messages": [user({"type": "audio", "path": "gone.wav"}, text("And this?")), reply("Nothing.")]},
        {"messages": [user({"type": "audio", "path": "corrupt.wav"}, text("This?")), reply("Noise.")]},
        {"messages": [user(text("Hi")), reply("Hello."), user(text("Again?")), reply("Yes, again.")]},
    ]
    return write_jsonl(tmp_path / "m.jsonl", rows)


def test_items_decode_audio_and_skip_bad_files(audio_manifest):
    ds = MixtureDataset([(1.0, audio_manifest)])
    good = ds[0]
    assert good["source"] == f"{audio_manifest}:1"
    part = good["messages"][0]["content"][0]
    assert part["audio"].dtype == np.float32 and part["audio"].shape == (SR,) and part["sampling_rate"] == SR
    assert good["messages"][0]["content"][1] == text("What is it?")
    missing, corrupt = ds[1], ds[2]
    assert missing == {"skipped": f"{audio_manifest}:2", "reason": missing["reason"]}
    assert "not found" in missing["reason"] and "gone.wav" in missing["reason"] and "\n" not in missing["reason"]
    assert corrupt["skipped"] == f"{audio_manifest}:3" and "corrupt.wav" in corrupt["reason"]


def test_collator_drops_skipped_and_labels_only_replies(audio_manifest, processor):
    ds = MixtureDataset([(1.0, audio_manifest)])
    batch = Collator(processor)([ds[i] for i in range(4)])
    assert batch["skipped"] == [(f"{audio_manifest}:2", ds[1]["reason"]), (f"{audio_manifest}:3", ds[2]["reason"])]
    assert batch["sources"] == [f"{audio_manifest}:1", f"{audio_manifest}:4"]
    inputs = batch["inputs"]
    labels = inputs["labels"]
    assert labels.shape == inputs["input_ids"].shape and labels.shape[0] == 2
    assert inputs["input_features"].shape[0] == 1  # one audio window
    kept = [processor.decode(row[row != IGNORE_INDEX]) for row in labels]
    assert kept == ["A beep.<|im_end|>", "Hello.<|im_end|>Yes, again.<|im_end|>"]
    assert batch["num_label_tokens"] == int((labels[:, 1:] != IGNORE_INDEX).sum()) == int(
        (labels != IGNORE_INDEX).sum())
    assert inputs["attention_mask"][1, -1] == 0 or inputs["attention_mask"][0, -1] == 0  # right padding
    assert inputs["attention_mask"][:, 0].all()

    full = Collator(processor, assistant_only=False)([ds[0], ds[3]])
    assert full["num_label_tokens"] > batch["num_label_tokens"]
    # everything but audio and padding is supervised, the first token too: the causal shift drops one per row
    assert full["num_label_tokens"] == int((full["inputs"]["labels"] != IGNORE_INDEX).sum()) - 2

    nothing = Collator(processor)([ds[1], ds[2]])
    assert nothing["inputs"] is None and nothing["num_label_tokens"] == 0 and len(nothing["skipped"]) == 2


def test_collator_pickles_after_use(processor):
    """spawn/forkserver DataLoader workers pickle the collate_fn; the compiled chat template must not block it."""
    item = {"messages": [user(text("Hi")), reply("Hello.")], "source": "m:1"}
    collator = Collator(processor)
    before = collator([item])
    copy = pickle.loads(pickle.dumps(collator))
    after = copy([item])
    assert torch.equal(before["inputs"]["labels"], after["inputs"]["labels"])
    assert collator.processor.chat_template is processor.chat_template  # the original is untouched


def test_collator_reports_conversations_the_processor_rejects(processor):
    good = {"messages": [user(text("Hi")), reply("Hello.")], "source": "m:1"}
    bad = {"messages": [user({"type": "audio", "audio": np.zeros(0, np.float32), "sampling_rate": SR}),
                        reply("x")], "source": "m:2"}
    batch = Collator(processor)([good, bad])
    assert batch["sources"] == ["m:1"] and batch["skipped"][0][0] == "m:2" and "empty" in batch["skipped"][0][1]
    assert batch["inputs"]["input_ids"].shape[0] == 1


# ---------------------------------------------------------------------------------------------- sampler


def flat(batches):
    return [i for b in batches for i in b]


def test_sampler_deterministic_and_covers_every_index_once():
    lengths = np.random.default_rng(0).integers(1, 500, 103).tolist()
    s = LengthGroupedSampler(lengths, batch_size=4, seed=3, group_size=5)
    first = list(s)
    assert first == list(LengthGroupedSampler(lengths, batch_size=4, seed=3, group_size=5))
    assert sorted(flat(first)) == list(range(103)) and len(first) == len(s) == 26
    assert sorted(len(b) for b in first)[0] == 3 and all(len(b) == 4 for b in first if len(b) != 3)
    s.set_epoch(1)
    second = list(s)
    assert second != first and sorted(flat(second)) == list(range(103))
    assert list(LengthGroupedSampler(lengths, batch_size=4, seed=4, group_size=5)) != first

    dropped = LengthGroupedSampler(lengths, batch_size=4, seed=3, group_size=5, drop_last=True)
    batches = list(dropped)
    assert len(batches) == len(dropped) == 25 and all(len(b) == 4 for b in batches)
    assert len(set(flat(batches))) == 100


def test_sampler_groups_by_length():
    lengths = np.random.default_rng(1).permutation(1000).tolist()  # distinct lengths
    # One mega-group: the batches are consecutive runs of the length-sorted list.
    one = list(LengthGroupedSampler(lengths, batch_size=8, seed=0, group_size=1000))
    by_longest = sorted(one, key=lambda b: -lengths[b[0]])
    assert [lengths[i] for i in flat(by_longest)] == sorted(lengths, reverse=True)
    assert one != by_longest  # the order of batches is shuffled
    # Mega-groups of 40: every batch is sorted and spans a narrow band of lengths (random batches span ~600).
    batches = list(LengthGroupedSampler(lengths, batch_size=4, seed=0, group_size=10))
    spans = []
    for b in batches:
        ls = [lengths[i] for i in b]
        assert ls == sorted(ls, reverse=True)
        spans.append(ls[0] - ls[-1])
    assert np.mean(spans) < 150


def test_sampler_length_buckets_mix_sources_of_similar_length():
    rng = np.random.default_rng(2)
    # Two sources of short examples whose lengths do not overlap, and long examples (two windows).
    a, b, long = rng.integers(10, 100, 120), rng.integers(100, 240, 120), rng.integers(800, 1400, 40)
    lengths = np.concatenate([a, b, long]).tolist()
    source = ["a"] * 120 + ["b"] * 120 + ["long"] * 40
    exact = list(LengthGroupedSampler(lengths, batch_size=8, seed=0, group_size=35))
    bucketed = list(LengthGroupedSampler(lengths, batch_size=8, seed=0, group_size=35, length_bucket=750))
    assert sorted(flat(bucketed)) == list(range(280))

    def kinds(batch):
        return {source[i] for i in batch}

    # Sorting by exact length keeps sources apart; buckets of 750 mix the short sources in most batches...
    assert sum(kinds(x) == {"a", "b"} for x in exact) <= 1
    assert sum(kinds(x) == {"a", "b"} for x in bucketed) >= 20
    # ...but never put a long example with short ones (one mega-group holds everything here).
    assert all(kinds(x) == {"long"} or "long" not in kinds(x) for x in bucketed)
    with pytest.raises(InputError):
        LengthGroupedSampler(lengths, batch_size=8, length_bucket=-1)


@pytest.mark.parametrize(("n", "batch_size", "world_size"), [(6 * 9 + 5, 3, 2), (8 * 4 + 2, 2, 4), (40, 5, 2)])
def test_sampler_ranks_slice_the_one_process_batches(n, batch_size, world_size):
    lengths = np.random.default_rng(n).integers(1, 300, n).tolist()
    single = LengthGroupedSampler(lengths, batch_size=batch_size * world_size, seed=5, group_size=3)
    ranks = [LengthGroupedSampler(lengths, batch_size=batch_size, seed=5, rank=r, world_size=world_size,
                                  group_size=3) for r in range(world_size)]
    for s in [single, *ranks]:
        s.set_epoch(2)
    expected = list(single)
    assert all(r.global_batches() == expected for r in ranks)
    per_rank = [list(r) for r in ranks]
    assert all(len(p) == len(expected) == len(r) for p, r in zip(per_rank, ranks, strict=True))
    for k, batch in enumerate(expected):
        slices = [p[k] for p in per_rank]
        assert all(slices), "no rank may get an empty batch"
        if len(batch) >= world_size:
            assert flat(slices) == batch  # contiguous slices, in rank order
            assert max(map(len, slices)) - min(map(len, slices)) <= 1
        else:
            assert set(flat(slices)) == set(batch)  # fewer items than ranks: some ranks repeat one
        if len(batch) == batch_size * world_size:
            assert all(len(x) == batch_size for x in slices)


def test_sampler_skip_batches_resumes_at_the_right_batch():
    lengths = list(range(1, 51))
    s = LengthGroupedSampler(lengths, batch_size=2, seed=1, rank=1, world_size=2)
    s.set_epoch(3)
    full = list(s)
    s.skip_batches = 5
    assert list(s) == full[5:] and len(s) == len(full) - 5 == 8
    s.skip_batches = 100
    assert list(s) == [] and len(s) == 0


def test_dataloader_with_workers_end_to_end(tmp_path, processor):
    rows = []
    for i in range(7):
        write_wav(tmp_path / f"c{i}.wav", 0.5 + 0.25 * i, seed=i)
        rows.append({"messages": [user({"type": "audio", "path": f"c{i}.wav"}, text(f"Clip {i}?")),
                                  reply(f"Answer {i}.")]})
    rows.append({"messages": [user({"type": "audio", "path": "missing.wav"}), reply("x")]})
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    ds = MixtureDataset(parse_mixture(f"2*{path}"), seed=1)
    sampler = LengthGroupedSampler(ds.lengths(), batch_size=3, seed=1)
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=Collator(processor), num_workers=2)
    assert len(loader) == math.ceil(16 / 3)
    sources, skipped, labelled = [], [], 0
    for batch in loader:
        sources += batch["sources"]
        skipped += batch["skipped"]
        if batch["inputs"] is not None:
            inputs = batch["inputs"]
            assert inputs["input_ids"].dtype == torch.long and inputs["input_features"].shape[0] == len(
                batch["sources"])
            labelled += batch["num_label_tokens"]
    assert Counter(sources) == Counter({f"{path}:{k}": 2 for k in range(1, 8)})
    assert [s for s, _ in skipped] == [f"{path}:8"] * 2
    assert labelled > 0
