"""Whisper-compatible log-mel features, 30 s windowing and ``<sound>`` token counts for AF3.

Numerically this is ``WhisperFeatureExtractor(feature_size=128)`` (torch path) as AudioFlamingo3Processor
calls it: every clip is cut into 30 s windows (at most ``max_audio_len // 30`` of them), each window is
zero-padded to 480000 samples and turned into a [128, 3000] log-mel spectrogram normalised on its own, and a
frame mask marks the ``ceil(samples / 160)`` real frames. The number of audio tokens a clip becomes follows
the encoder's conv2 (stride 2) and average pool (stride 2) from the mask lengths. No librosa/transformers.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

from .config import MAX_AUDIO_SECONDS, MAX_AUDIO_WINDOWS, _JsonConfig, read_json, write_json
from .config_checks import check_features
from .errors import AudioError, CheckpointError, InputError

logger = logging.getLogger("af3")

# Whisper's feature extractor always spans 0..8 kHz, whatever the sampling rate.
MEL_FMIN = 0.0
MEL_FMAX = 8000.0
# Windows featurized at once: bounds the STFT's memory (~20 MB of complex spectrum per 4 windows).
_CHUNK_WINDOWS = 4

_Length = TypeVar("_Length", int, np.ndarray, torch.Tensor)


@dataclass
class FeatureConfig(_JsonConfig):
    """``preprocessor_config.json`` of a WhisperFeatureExtractor (field names as HF saves them).

    As in HF, ``n_samples`` and ``nb_max_frames`` are derived from ``chunk_length``, ``sampling_rate`` and
    ``hop_length`` (the values in the file are overwritten). Every field's type and range is checked when the
    config is built (:func:`af3.config_checks.check_features`), before anything is derived: a bad value is a
    :class:`CheckpointError` naming the field, never a ``ZeroDivisionError`` later.
    """

    feature_size: int = 128
    sampling_rate: int = 16000
    hop_length: int = 160
    n_fft: int = 400
    chunk_length: int = 30
    n_samples: int = 480000
    nb_max_frames: int = 3000
    padding_value: float = 0.0
    dither: float = 0.0
    return_attention_mask: bool = True
    padding_side: str = "right"
    feature_extractor_type: str = "WhisperFeatureExtractor"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # Every field's type and range first (one place: af3.config_checks), then what is derived from them.
        if self.padding_side != "right":
            raise CheckpointError(
                f"feature extractor padding_side={self.padding_side!r} is not supported; AF3 pads windows "
                "on the right"
            )
        check_features(self)
        self.n_samples = int(self.chunk_length * self.sampling_rate)
        self.nb_max_frames = self.n_samples // self.hop_length

    @property
    def window_samples(self) -> int:
        """Samples per window (480000 = 30 s at 16 kHz), as the processor computes it."""
        return self.n_samples

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> FeatureConfig:
        """Read ``preprocessor_config.json``, or ``processor_config.json`` (its ``feature_extractor``)."""
        data = read_json(path)
        if isinstance(data.get("feature_extractor"), dict):
            data = data["feature_extractor"]
        try:
            return cls.from_dict(data)
        except CheckpointError as e:
            raise CheckpointError(f"{os.fspath(path)}: {e}; fix it in that file") from None

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())


@dataclass(frozen=True, eq=False)
class AudioFeatures:
    """Model-ready audio inputs for a batch of clips (windows flattened clip-major, time-minor)."""

    input_features: torch.Tensor  # float32 [N_win, feature_size, nb_max_frames]
    input_features_mask: torch.Tensor  # int32 [N_win, nb_max_frames], 1 = real frame (a prefix)
    windows_per_audio: list[int]  # windows of each clip, sums to N_win
    tokens_per_audio: list[int]  # <sound> tokens each clip becomes

    @property
    def num_windows(self) -> int:
        return int(self.input_features.shape[0])


# ----------------------------------------------------------------------------------------------------------
# mel filter bank


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear (3 mels / 200 Hz) below 1 kHz, logarithmic (27 mels per factor 6.4) above."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz * 3.0 / 200.0
    high = hz >= 1000.0
    mel[high] = 15.0 + np.log(hz[high] / 1000.0) * (27.0 / np.log(6.4))
    return mel


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    """Inverse of :func:`_hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    hz = mel * 200.0 / 3.0
    high = mel >= 15.0
    hz[high] = 1000.0 * np.exp((mel[high] - 15.0) * (np.log(6.4) / 27.0))
    return hz


@functools.lru_cache(maxsize=8)
def _slaney_filter_bank(n_freqs: int, n_mels: int, sampling_rate: int, fmin: float, fmax: float
                        ) -> np.ndarray:
    """Triangular slaney-normalised mel filters in float64, [n_freqs, n_mels] (read-only, cached)."""
    bin_hz = np.linspace(0.0, sampling_rate // 2, n_freqs)  # [F] centre frequency of each FFT bin
    mel_lo, mel_hi = _hz_to_mel(np.array([fmin, fmax]))
    edges = _mel_to_hz(np.linspace(mel_lo, mel_hi, n_mels + 2))  # [M + 2] filter edges in Hz
    lo, mid, hi = edges[:-2], edges[1:-1], edges[2:]  # [M] each: left foot, peak, right foot of filter m
    rising = (bin_hz[:, None] - lo[None, :]) / (mid - lo)[None, :]  # [F, M]
    falling = (hi[None, :] - bin_hz[:, None]) / (hi - mid)[None, :]  # [F, M]
    bank = np.maximum(0.0, np.minimum(rising, falling))
    bank *= (2.0 / (hi - lo))[None, :]  # slaney norm: every filter has unit area in Hz
    bank.setflags(write=False)
    return bank


def mel_filters(config: FeatureConfig | None = None) -> torch.Tensor:
    """Mel filter bank of ``config`` as float32 [n_fft//2 + 1, feature_size]: transformers'
    ``mel_filter_bank`` with slaney scale and norm over 0..8 kHz. A fresh tensor each call (math cached)."""
    cfg = config or FeatureConfig()
    n_freqs = cfg.n_fft // 2 + 1
    bank = _slaney_filter_bank(n_freqs, cfg.feature_size, int(cfg.sampling_rate), MEL_FMIN, MEL_FMAX)
    return torch.from_numpy(bank.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------
# log-mel


@torch.no_grad()
def log_mel(windows: torch.Tensor, config: FeatureConfig | None = None,
            lengths: Sequence[int] | None = None) -> torch.Tensor:
    """Whisper log-mel of padded windows: [N, S] → float32 [N, feature_size, S // hop_length].

    Periodic Hann STFT (centered, reflect padding) minus its last frame, power, mel, log10 floored at 1e-10,
    then per window ``max(x, x.max() - 8)`` and ``(x + 4) / 4``. Runs on the device of ``windows``, a few
    windows at a time to bound memory.

    ``lengths`` (real samples per window; the rest is zero padding) lets the STFT stop where the padding
    starts: frames that only see zeros have zero power, so they are filled in instead of computed. A 2 s clip
    then costs 1/15 of a full window, with the same result.
    """
    cfg = config or FeatureConfig()
    if windows.dim() != 2:
        raise AudioError(f"log_mel expects windows of shape [N, samples], got {tuple(windows.shape)}")
    device = windows.device
    n_win, n_samples = windows.shape
    n_frames = n_samples // cfg.hop_length
    hop, half = cfg.hop_length, cfg.n_fft // 2
    filters_t = mel_filters(cfg).to(device).T.contiguous()  # [M, F]
    hann = torch.hann_window(cfg.n_fft, periodic=True, device=device)
    out = torch.empty(n_win, cfg.feature_size, n_frames, dtype=torch.float32, device=device)
    for start in range(0, n_win, _CHUNK_WINDOWS):
        x = windows[start : start + _CHUNK_WINDOWS].to(torch.float32)  # [B, S]
        if cfg.dither:
            x = x + cfg.dither * torch.randn_like(x)
        # Frames whose window [k*hop - half, k*hop + half) touches real samples; the STFT input is cut so that
        # the right-edge reflection only mirrors zeros, which keeps those frames exact.
        keep = n_frames
        if lengths is not None and not cfg.dither:
            longest = max(lengths[start : start + x.shape[0]])
            keep = min(n_frames, -(-(longest + half) // hop))
            cut = (keep - 1) * hop + half + half + 1
            if cut < n_samples:
                x = x[:, :cut]
            else:
                keep = n_frames
        spec = torch.stft(x, cfg.n_fft, hop, window=hann, center=True, pad_mode="reflect",
                          return_complex=True)  # [B, F, frames + 1]
        spec = spec[..., :keep]
        power = spec.real.square() + spec.imag.square()  # [B, F, keep] (5x faster than squaring and summing the
        del spec  # real view's last axis of 2, the same values)
        logmel = torch.full((x.shape[0], cfg.feature_size, n_frames), -10.0, device=device)  # log10(1e-10)
        logmel[..., :keep] = torch.matmul(filters_t, power).clamp_(min=1e-10).log10_()  # [B, M, keep]
        peak = logmel.amax(dim=(1, 2), keepdim=True)  # [B, 1, 1]
        logmel = torch.maximum(logmel, peak - 8.0)
        out[start : start + x.shape[0]] = (logmel + 4.0) / 4.0
    return out


# ----------------------------------------------------------------------------------------------------------
# windows and token counts


def conv_output_lengths(mel_lengths: _Length) -> tuple[_Length, _Length]:
    """Mel-frame lengths → (after the encoder's stride-2 conv2, after its stride-2 average pool).

    Works elementwise on ints, numpy arrays and tensors; 0 frames → (0, 0), 3000 → (1500, 750).
    """
    after_conv = (mel_lengths - 1) // 2 + 1
    after_pool = (after_conv - 2) // 2 + 1
    return after_conv, after_pool


def _max_windows(max_audio_len: float, config: FeatureConfig) -> int:
    max_windows = int(max_audio_len // config.chunk_length)
    if max_windows < 1:
        raise InputError(
            f"max_audio_len={max_audio_len} s is shorter than one {config.chunk_length} s window; use at "
            f"least {config.chunk_length}"
        )
    return max_windows


def _window_bounds(num_samples: int, config: FeatureConfig, max_windows: int, warn: bool = True
                   ) -> list[range]:
    """Sample ranges of the windows of a clip: ``max(1, ceil(n / W))`` of them, capped at ``max_windows``."""
    if max_windows < 1:
        raise InputError(f"max_windows must be at least 1, got {max_windows}")
    width = config.window_samples
    n_win = max(1, math.ceil(num_samples / width))
    if n_win > max_windows:
        if warn:
            logger.warning(
                "audio clip is %.1f s long; it is truncated to the first %g s (max %d windows of %g s)",
                num_samples / config.sampling_rate, max_windows * config.chunk_length, max_windows,
                config.chunk_length,
            )
        n_win = max_windows
    cap = min(num_samples, n_win * width)
    return [range(i * width, min((i + 1) * width, cap)) for i in range(n_win)]


def split_windows(audio: np.ndarray, config: FeatureConfig | None = None, max_windows: int = MAX_AUDIO_WINDOWS
                  ) -> list[np.ndarray]:
    """Cut a 1-D clip into consecutive ``chunk_length`` windows (views; the last one may be shorter).

    At least one window (possibly empty); a clip longer than ``max_windows`` windows is truncated with a
    warning on the ``af3`` logger.
    """
    bounds = _window_bounds(len(audio), config or FeatureConfig(), max_windows)
    return [audio[r.start : r.stop] for r in bounds]


def _mel_length(num_samples: int, config: FeatureConfig) -> int:
    """Real mel frames of a window holding ``num_samples`` samples: ceil(n / hop), at most nb_max_frames."""
    return min(-(-num_samples // config.hop_length), config.nb_max_frames)


def audio_token_count(num_samples: int, config: FeatureConfig | None = None,
                      max_windows: int = MAX_AUDIO_WINDOWS) -> int:
    """``<sound>`` tokens a clip of ``num_samples`` samples becomes (after windowing and truncation)."""
    cfg = config or FeatureConfig()
    bounds = _window_bounds(int(num_samples), cfg, max_windows, warn=False)
    return sum(conv_output_lengths(_mel_length(len(r), cfg))[1] for r in bounds)


def _as_clip(audio: Any, index: int) -> np.ndarray:
    if isinstance(audio, torch.Tensor):
        audio = audio.detach().cpu().float().numpy()
    clip = np.asarray(audio, dtype=np.float32)
    if clip.ndim != 1:
        raise AudioError(
            f"audio #{index} has shape {tuple(clip.shape)}; expected 1-D mono samples "
            "(af3.audio.load_audio mixes and resamples)"
        )
    return clip


def extract_features(
    audios: Sequence[np.ndarray],
    config: FeatureConfig | None = None,
    max_audio_len: float = MAX_AUDIO_SECONDS,
    device: torch.device | str | None = None,
) -> AudioFeatures:
    """Featurize 1-D mono clips at ``config.sampling_rate``, as AudioFlamingo3Processor does.

    Each clip → ``max(1, ceil(n / 30 s))`` windows (at most ``max_audio_len // 30``); all windows are
    stacked in clip order. Outputs live on ``device`` (default CPU).
    """
    cfg = config or FeatureConfig()
    if isinstance(audios, (np.ndarray, torch.Tensor)) and audios.ndim == 1:
        audios = [audios]  # one clip
    max_windows = _max_windows(max_audio_len, cfg)
    device = torch.device(device) if device is not None else torch.device("cpu")

    windows: list[np.ndarray] = []
    windows_per_audio: list[int] = []
    for i, audio in enumerate(audios):
        parts = split_windows(_as_clip(audio, i), cfg, max_windows)
        windows.extend(parts)
        windows_per_audio.append(len(parts))

    n_win, width, n_frames = len(windows), cfg.n_samples, cfg.nb_max_frames
    features = torch.empty(n_win, cfg.feature_size, n_frames, dtype=torch.float32, device=device)
    for start in range(0, n_win, _CHUNK_WINDOWS):
        chunk = windows[start : start + _CHUNK_WINDOWS]
        padded = torch.full((len(chunk), width), float(cfg.padding_value), dtype=torch.float32)  # [B, S]
        for row, window in enumerate(chunk):
            samples = np.ascontiguousarray(window[:width])
            padded[row, : len(samples)] = torch.from_numpy(samples)
        features[start : start + len(chunk)] = log_mel(padded.to(device), cfg, [len(w) for w in chunk])

    lengths = torch.tensor([_mel_length(len(w), cfg) for w in windows], dtype=torch.int64)  # [N]
    mask = (torch.arange(n_frames)[None, :] < lengths[:, None]).to(torch.int32)  # [N, frames]
    post = conv_output_lengths(lengths)[1].tolist()
    tokens, pos = [], 0
    for count in windows_per_audio:
        tokens.append(int(sum(post[pos : pos + count])))
        pos += count
    return AudioFeatures(
        input_features=features,
        input_features_mask=mask.to(device),
        windows_per_audio=windows_per_audio,
        tokens_per_audio=tokens,
    )
