"""Log-mel features, windowing and <sound> token counts against transformers' WhisperFeatureExtractor and
AudioFlamingo3Processor (the oracle)."""

from __future__ import annotations

import json
import logging

import numpy as np
import oracle
import pytest
import torch
from conftest import synth_audio

from af3.errors import AudioError, CheckpointError, InputError
from af3.features import (
    AudioFeatures,
    FeatureConfig,
    audio_token_count,
    conv_output_lengths,
    extract_features,
    log_mel,
    mel_filters,
    split_windows,
)

SR = 16000
FEATURE_TOL = 1e-5

# Clip lengths in samples that exercise every windowing edge (names are for test ids).
LENGTHS = {
    "0.01s": 160,
    "1s": SR,
    "7s_odd": 112037,
    "29.99s": 479840,
    "30s": 480000,
    "30.01s": 480160,
    "61s": 61 * SR,
}


@pytest.fixture(scope="module")
def whisper_fe():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=128, return_attention_mask=True)


@pytest.fixture(scope="module")
def hf_processor():
    return oracle.build_processor()


@pytest.fixture(scope="module")
def hf_processor_60s():
    return oracle.build_processor(max_audio_len=60)


def run_hf_processor(processor, clips: list[np.ndarray]):
    """The oracle on one "<sound>" prompt per clip → (features, features mask, <sound> count per clip)."""
    texts = [f"Describe <sound> please {i}" for i in range(len(clips))]
    out = processor(text=texts, audio=clips, return_tensors="pt")
    counts = (out["input_ids"] == processor.audio_token_id).sum(-1).tolist()
    return out["input_features"], out["input_features_mask"], counts


def assert_matches_processor(ours: AudioFeatures, processor, clips: list[np.ndarray]) -> None:
    feats, mask, counts = run_hf_processor(processor, clips)
    assert ours.input_features.shape == feats.shape
    assert ours.input_features.dtype == torch.float32
    assert (ours.input_features - feats).abs().max().item() <= FEATURE_TOL
    assert ours.input_features_mask.dtype == torch.int32 == mask.dtype
    assert torch.equal(ours.input_features_mask, mask)
    assert ours.tokens_per_audio == counts
    assert sum(ours.windows_per_audio) == feats.shape[0]


# ----------------------------------------------------------------------------------------------------------
# mel filters and the log-mel transform


def test_mel_filters_match_transformers_mel_filter_bank():
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(
        num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0, max_frequency=8000.0,
        sampling_rate=16000, norm="slaney", mel_scale="slaney",
    )
    ours = mel_filters(FeatureConfig())
    assert ours.shape == (201, 128) and ours.dtype == torch.float32
    assert np.abs(ours.numpy().astype(np.float64) - ref).max() <= 1e-6
    assert (ours.amax(dim=0) > 0).all()  # no empty filter


def test_mel_filters_return_a_fresh_tensor_each_call():
    first = mel_filters()
    first.zero_()
    assert mel_filters().abs().sum() > 0


def test_mel_filters_follow_the_feature_size():
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(201, 80, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney")
    ours = mel_filters(FeatureConfig(feature_size=80))
    assert ours.shape == (201, 80)
    assert np.abs(ours.numpy() - ref).max() <= 1e-6


def test_log_mel_matches_whisper_feature_extractor_on_full_and_padded_windows(whisper_fe):
    clip = synth_audio(75.0, seed=3)
    windows = split_windows(clip, FeatureConfig(), max_windows=20)  # 30 s, 30 s, 15 s
    ref = whisper_fe(windows, sampling_rate=SR, padding="max_length", truncation=True,
                     return_attention_mask=True, return_tensors="pt")
    ours = extract_features([clip])
    assert ours.input_features.shape == (3, 128, 3000)
    assert (ours.input_features - ref["input_features"]).abs().max().item() <= FEATURE_TOL
    assert torch.equal(ours.input_features_mask, ref["attention_mask"])


def test_log_mel_takes_float64_windows_and_returns_float32_per_window_normalised():
    rng = np.random.default_rng(1)
    windows = torch.from_numpy(rng.standard_normal((3, 480000)) * np.array([[1e-3], [0.5], [0.0]]))  # float64
    out = log_mel(windows)
    assert out.shape == (3, 128, 3000) and out.dtype == torch.float32
    # Each window is clamped to 8 decades below its own peak, i.e. 2.0 after the /4 scaling.
    spans = (out.amax(dim=(1, 2)) - out.amin(dim=(1, 2))).tolist()
    assert all(s <= 2.0 + 1e-6 for s in spans)
    # An all-zero window sits at the 1e-10 floor everywhere: log10(1e-10) = -10 → (-10 + 4) / 4 = -1.5.
    assert torch.allclose(out[2], torch.full_like(out[2], -1.5))
    # Windows are normalised independently: featurizing one alone gives the same result.
    assert torch.allclose(log_mel(windows[1:2]), out[1:2], atol=1e-6)


def test_log_mel_rejects_a_1d_input():
    with pytest.raises(AudioError, match=r"\[N, samples\]"):
        log_mel(torch.zeros(480000))


def test_dither_adds_noise_only_when_configured():
    silence = [np.zeros(SR, np.float32)]
    plain = extract_features(silence).input_features
    dithered = extract_features(silence, FeatureConfig(dither=1e-4)).input_features
    assert torch.equal(plain, torch.full_like(plain, -1.5))
    assert not torch.equal(dithered, plain)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_extract_features_on_cuda_matches_cpu():
    clip = synth_audio(40.0)
    cpu = extract_features([clip])
    gpu = extract_features([clip], device="cuda")
    assert gpu.input_features.device.type == "cuda" and gpu.input_features_mask.device.type == "cuda"
    assert (gpu.input_features.cpu() - cpu.input_features).abs().max().item() <= 1e-4
    assert torch.equal(gpu.input_features_mask.cpu(), cpu.input_features_mask)


# ----------------------------------------------------------------------------------------------------------
# windowing and token counts against the AF3 processor


@pytest.mark.parametrize("n_samples", list(LENGTHS.values()), ids=list(LENGTHS))
def test_single_clip_matches_af3_processor(hf_processor, n_samples):
    clip = synth_audio(n_samples / SR, seed=n_samples % 7)
    assert len(clip) == n_samples
    ours = extract_features([clip])
    assert_matches_processor(ours, hf_processor, [clip])
    assert ours.tokens_per_audio == [audio_token_count(n_samples)]


def test_token_counts_and_windows_of_known_lengths():
    expected = {  # samples → (windows, tokens), from reference §4.2 and the machine notes' measurements
        160: (1, 0), SR: (1, 25), 112037: (1, 175), 479840: (1, 750), 480000: (1, 750),
        480160: (2, 750), 45 * SR: (2, 1125), 61 * SR: (3, 1525), 600 * SR: (20, 15000),
    }
    clips = [np.zeros(n, np.float32) for n in expected]
    feats = extract_features(clips)
    assert list(zip(feats.windows_per_audio, feats.tokens_per_audio, strict=True)) == list(expected.values())
    assert [audio_token_count(n) for n in expected] == [t for _, t in expected.values()]


def test_eleven_minute_clip_is_truncated_to_20_windows_with_a_warning(hf_processor, caplog):
    clip = synth_audio(660.0, seed=5)
    with caplog.at_level(logging.WARNING, logger="af3"):
        ours = extract_features([clip])
    warnings = [r.getMessage() for r in caplog.records if r.name == "af3" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "660.0 s" in warnings[0] and "first 600 s" in warnings[0]
    assert ours.windows_per_audio == [20] and ours.tokens_per_audio == [15000]
    assert_matches_processor(ours, hf_processor, [clip])


def test_max_audio_len_60_keeps_two_windows(hf_processor_60s, caplog):
    clip = synth_audio(61.0, seed=2)
    with caplog.at_level(logging.WARNING, logger="af3"):
        ours = extract_features([clip], max_audio_len=60)
    assert any("first 60 s" in r.getMessage() for r in caplog.records if r.name == "af3")
    assert ours.windows_per_audio == [2] and ours.tokens_per_audio == [1500]
    assert audio_token_count(len(clip), max_windows=2) == 1500
    assert_matches_processor(ours, hf_processor_60s, [clip])


def test_max_audio_len_45_rounds_down_to_one_window():
    ours = extract_features([np.zeros(40 * SR, np.float32)], max_audio_len=45)
    assert ours.windows_per_audio == [1] and ours.tokens_per_audio == [750]


def test_batch_of_mixed_lengths_matches_af3_processor(hf_processor, caplog):
    lengths = [112037, 160, 61 * SR, SR, 480160, 480000]
    clips = [synth_audio(n / SR, seed=i) for i, n in enumerate(lengths)]
    with caplog.at_level(logging.WARNING, logger="af3"):
        ours = extract_features(clips)
    assert not [r for r in caplog.records if r.name == "af3"]  # nothing truncated, nothing to warn about
    assert ours.windows_per_audio == [1, 1, 3, 1, 2, 1]
    assert ours.tokens_per_audio == [175, 0, 1525, 25, 750, 750]
    assert_matches_processor(ours, hf_processor, clips)


def test_batch_features_equal_the_features_of_each_clip_alone():
    clips = [synth_audio(7.0, seed=1), synth_audio(35.0, seed=2)]
    batch = extract_features(clips)
    alone = torch.cat([extract_features([c]).input_features for c in clips])
    assert torch.equal(batch.input_features, alone)


# ----------------------------------------------------------------------------------------------------------
# building blocks


def test_conv_output_lengths_for_ints_arrays_and_tensors():
    cases = {0: (0, 0), 1: (1, 0), 2: (1, 0), 3: (2, 1), 100: (50, 25), 701: (351, 175), 3000: (1500, 750)}
    for mel, expected in cases.items():
        assert conv_output_lengths(mel) == expected
    lengths = torch.arange(0, 3001)
    conv, pool = conv_output_lengths(lengths)
    assert conv.tolist() == [(n - 1) // 2 + 1 for n in range(3001)]
    assert pool.tolist() == [((n - 1) // 2 + 1 - 2) // 2 + 1 for n in range(3001)]
    conv_np, pool_np = conv_output_lengths(np.array([0, 701, 3000]))
    assert conv_np.tolist() == [0, 351, 1500] and pool_np.tolist() == [0, 175, 750]


def test_split_windows_cuts_at_30_second_boundaries_without_copying():
    clip = np.arange(480160, dtype=np.float32)
    windows = split_windows(clip, FeatureConfig(), max_windows=20)
    assert [len(w) for w in windows] == [480000, 160]
    assert windows[1][0] == 480000.0
    assert all(np.shares_memory(w, clip) for w in windows)


def test_split_windows_truncates_to_max_windows():
    clip = np.zeros(100 * SR, np.float32)
    windows = split_windows(clip, FeatureConfig(), max_windows=2)
    assert [len(w) for w in windows] == [480000, 480000]


def test_an_empty_clip_gives_one_empty_window_an_all_zero_mask_and_no_tokens():
    empty = np.zeros(0, np.float32)
    assert [len(w) for w in split_windows(empty, FeatureConfig(), 20)] == [0]
    feats = extract_features([empty])
    assert feats.windows_per_audio == [1] and feats.tokens_per_audio == [0]
    assert feats.input_features.shape == (1, 128, 3000)
    assert int(feats.input_features_mask.sum()) == 0


def test_frame_mask_counts_ceil_of_samples_over_hop():
    feats = extract_features([np.ones(n, np.float32) for n in (1, 159, 160, 161, 112037)])
    assert feats.input_features_mask.sum(-1).tolist() == [1, 1, 1, 2, 701]
    mask = feats.input_features_mask
    assert torch.equal(mask, torch.sort(mask, dim=-1, descending=True).values)  # ones form a prefix


def test_extract_features_accepts_a_single_1d_array_and_torch_tensors():
    clip = synth_audio(2.0)
    one = extract_features(clip)
    tensor = extract_features([torch.from_numpy(clip)])
    assert one.windows_per_audio == [1] and one.tokens_per_audio == [50]
    assert torch.equal(one.input_features, tensor.input_features)


def test_extract_features_of_no_clips_is_empty():
    feats = extract_features([])
    assert feats.input_features.shape == (0, 128, 3000) and feats.input_features_mask.shape == (0, 3000)
    assert feats.windows_per_audio == [] and feats.tokens_per_audio == []


def test_extract_features_rejects_multichannel_clips():
    with pytest.raises(AudioError, match=r"audio #1 has shape \(2, 16000\).*1-D"):
        extract_features([np.zeros(10, np.float32), np.zeros((2, SR), np.float32)])


def test_max_audio_len_shorter_than_a_window_is_rejected():
    with pytest.raises(InputError, match="max_audio_len=10"):
        extract_features([np.zeros(SR, np.float32)], max_audio_len=10)


# ----------------------------------------------------------------------------------------------------------
# FeatureConfig


def test_feature_config_defaults_equal_the_saved_whisper_preprocessor_config(whisper_fe, tmp_path):
    whisper_fe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    cfg = FeatureConfig.from_file(tmp_path / "preprocessor_config.json")
    assert cfg == FeatureConfig(extra=cfg.extra)
    for key, value in FeatureConfig().to_dict().items():
        assert saved[key] == value, key


def test_feature_config_reads_the_feature_extractor_entry_of_processor_config(hf_processor, tmp_path):
    hf_processor.save_pretrained(tmp_path)
    cfg = FeatureConfig.from_file(tmp_path / "processor_config.json")
    assert cfg.feature_size == 128 and cfg.n_samples == 480000 and cfg.nb_max_frames == 3000


def test_feature_config_keeps_unknown_fields_and_round_trips(tmp_path):
    cfg = FeatureConfig.from_dict({"feature_size": 80, "processor_class": "X", "chunk_length": 10})
    assert cfg.extra == {"processor_class": "X"}
    assert cfg.n_samples == 160000 and cfg.nb_max_frames == 1000  # derived, like HF
    cfg.save(tmp_path / "pp.json")
    again = FeatureConfig.from_file(tmp_path / "pp.json")
    assert again == cfg and again.to_dict()["processor_class"] == "X"


def test_feature_config_rejects_left_padding():
    with pytest.raises(CheckpointError, match="padding_side='left'"):
        FeatureConfig(padding_side="left")


@pytest.mark.parametrize("n", [0, 1, 150, 399, 401, 16000, 479_700, 480_000])
def test_log_mel_skipping_padding_frames_gives_the_same_features(n):
    """With ``lengths`` the STFT stops where zero padding starts; the result must not change."""
    from af3.features import log_mel

    rng = np.random.default_rng(n)
    windows = torch.zeros(3, 480_000)
    windows[0, :n] = torch.from_numpy(rng.standard_normal(n).astype(np.float32)) * 0.1
    windows[1, : n // 2] = 0.3
    full = log_mel(windows)
    fast = log_mel(windows, lengths=[n, n // 2, 0])
    assert (full - fast).abs().max().item() <= 1e-6
