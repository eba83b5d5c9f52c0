"""Audio input: load, decode, mix to mono and resample to 16 kHz. Nothing here is model-specific.

:func:`load_audio` accepts a local path, an http(s) URL, a ``data:`` URI, encoded bytes, or a numpy
array / torch tensor, and always returns a 1-D float32 mono array at the target rate. Encoded data is
decoded with ``soundfile`` (wav, flac, ogg/vorbis, mp3) and, failing that, with PyAV/FFmpeg (m4a/aac,
webm/opus, ...). Channels are averaged and resampling uses ``soxr`` at "HQ" quality with the output length
``ceil(n * target / source)``: the same steps as transformers' ``load_audio`` (soundfile backend) and
``librosa.load``. Every user-caused problem is an :class:`AudioError` with a one-line message.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import numpy as np

from .errors import AudioError

SAMPLING_RATE = 16000
MAX_CHANNELS = 8

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_READ_CHUNK = 1 << 20


def load_audio(
    source: Any,
    sampling_rate: float | None = None,
    *,
    target_rate: int = SAMPLING_RATE,
    allow_urls: bool = True,
    allow_local_files: bool = True,
    max_bytes: int | None = None,
    timeout: float = 30.0,
) -> np.ndarray:
    """Load ``source`` as a 1-D float32 mono waveform at ``target_rate`` Hz.

    ``source`` is one of: a local path (``str`` / ``os.PathLike``), an ``http(s)://`` URL, a ``data:``
    URI (base64 or percent-encoded), encoded file contents (``bytes`` / ``bytearray`` / ``memoryview``), or
    samples as a numpy array / torch tensor ([T], [C, T] or [T, C] with C <= 8; integer PCM is scaled).
    ``sampling_rate`` is the rate of array input (default 16000); encoded input carries its own rate, so it
    is ignored there. ``max_bytes`` bounds the size of encoded input (file, download, data URI, bytes).
    Raises :class:`AudioError` for anything unusable.
    """
    _check_rate(target_rate, "target_rate")
    if _is_array(source):
        rate = SAMPLING_RATE if sampling_rate is None else sampling_rate
        _check_rate(rate, "sampling_rate")
        return _finish(_array_to_mono(source), rate, target_rate, "the audio array")

    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise AudioError("the audio bytes are empty (0 bytes)")
        _check_size(len(data), max_bytes, "the audio bytes")
        samples, rate = decode_audio(data, name="<bytes>")
        return _finish(samples, rate, target_rate, "the audio bytes")

    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, bytes):  # os.fspath of a bytes path
        source = os.fsdecode(source)
    if not isinstance(source, str):
        raise AudioError(
            f"cannot load audio from a {type(source).__name__}; pass a file path, an http(s) URL, a data: "
            "URI, encoded bytes, or a numpy array / torch tensor of samples"
        )

    if source[:5].lower() == "data:":
        data = _read_data_uri(source, max_bytes)
        samples, rate = decode_audio(data, name="data: URI")
        return _finish(samples, rate, target_rate, "the data: URI audio")

    match = _SCHEME_RE.match(source)
    if match:
        scheme = match.group(1).lower()
        if scheme not in ("http", "https"):
            raise AudioError(
                f"unsupported URL scheme '{scheme}://' in {_short(source)!r}; use an http(s) URL, a data: "
                "URI or a plain local path"
            )
        if not allow_urls:
            raise AudioError(f"audio URLs are not allowed here (allow_urls=False): {_short(source)!r}")
        data = _download(source, max_bytes, timeout)
        samples, rate = decode_audio(data, name=_short(source))
        return _finish(samples, rate, target_rate, f"the audio at {_short(source)!r}")

    if not allow_local_files:
        raise AudioError(
            f"local audio files are not allowed here (allow_local_files=False): {_short(source)!r}; send the "
            "audio as bytes, a data: URI or an http(s) URL instead"
        )
    _check_local_file(source, max_bytes)
    samples, rate = decode_audio(source, name=_short(source))
    return _finish(samples, rate, target_rate, f"audio file {_short(source)!r}")


def decode_audio(data: bytes | str, name: str = "<bytes>") -> tuple[np.ndarray, int]:
    """Decode encoded audio (bytes, or a local path) → (float32 mono samples [T], sampling rate).

    Tries ``soundfile`` first and PyAV/FFmpeg second; ``name`` is only used in error messages.
    """
    try:
        samples, rate = _decode_soundfile(data)
    except Exception:  # any soundfile failure means "try the next decoder"
        prefix = f"could not decode audio from {name!r}: not a supported audio format (tried soundfile"
        prefix += " and PyAV"
        try:
            samples, rate = _decode_pyav(data)
        except _NoAudioStream:
            raise AudioError(f"{prefix}; FFmpeg found no audio stream)") from None
        except Exception as av_error:
            raise AudioError(f"{prefix})") from av_error
    return samples, rate


def resample(samples: np.ndarray, orig_rate: float, target_rate: float) -> np.ndarray:
    """Resample a 1-D float32 signal with soxr "HQ" → exactly ``ceil(n * target / orig)`` samples."""
    if orig_rate == target_rate:
        return samples
    n_out = math.ceil(len(samples) * target_rate / orig_rate)
    out = soxr_resample(samples, orig_rate, target_rate)
    if len(out) < n_out:  # [T'] → pad / trim to the length librosa.load and transformers use
        out = np.pad(out, (0, n_out - len(out)))
    return np.ascontiguousarray(out[:n_out], dtype=np.float32)


def soxr_resample(samples: np.ndarray, orig_rate: float, target_rate: float) -> np.ndarray:
    """Plain ``soxr.resample`` at HQ quality (kept separate so the import stays lazy)."""
    import soxr

    return soxr.resample(samples, orig_rate, target_rate, quality="HQ")


# ----------------------------------------------------------------------------------------------------------
# arrays


def _is_array(source: Any) -> bool:
    if isinstance(source, np.ndarray):
        return True
    torch = _torch_if_loaded()
    return torch is not None and isinstance(source, torch.Tensor)


def _torch_if_loaded():
    """The torch module if it is already imported (arrays can only be tensors then), else None."""
    import sys

    return sys.modules.get("torch")


def _array_to_mono(x: Any) -> np.ndarray:
    """numpy array / torch tensor ([T], [C,T] or [T,C]) → float32 mono [T] (mean over channels)."""
    torch = _torch_if_loaded()
    if torch is not None and isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.float()  # bfloat16 / float16 have no (or lossy) numpy equivalents
        x = x.numpy()
    x = _to_float32(np.asarray(x))
    if x.ndim == 1 or (x.ndim == 2 and x.size == 0):
        return x.reshape(-1)  # an empty array is reported as "0 samples" by the caller
    if x.ndim != 2:
        raise AudioError(
            f"audio array has shape {tuple(x.shape)}; expected 1-D [samples] or 2-D [channels, samples] / "
            f"[samples, channels] with at most {MAX_CHANNELS} channels"
        )
    rows_small, cols_small = x.shape[0] <= MAX_CHANNELS, x.shape[1] <= MAX_CHANNELS
    if rows_small == cols_small:
        raise AudioError(
            f"ambiguous audio array shape {tuple(x.shape)}: expected [channels, samples] or [samples, "
            f"channels] where exactly one axis is the channel axis (at most {MAX_CHANNELS}); pass 1-D mono "
            "samples instead"
        )
    planar = x if rows_small else x.T  # [C, T]
    return planar[0] if planar.shape[0] == 1 else planar.mean(axis=0)


def _to_float32(x: np.ndarray) -> np.ndarray:
    """Scale integer PCM to [-1, 1) and cast floats to float32."""
    if x.dtype == np.float32:
        return x
    if x.dtype in (np.float64, np.float16):
        with np.errstate(over="ignore"):  # values beyond float32 become inf and are reported as such later
            return x.astype(np.float32)
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    if x.dtype == np.int32:
        return (x.astype(np.float64) / 2.0**31).astype(np.float32)
    if x.dtype == np.int8:
        return x.astype(np.float32) / 128.0
    if x.dtype == np.uint8:
        return (x.astype(np.float32) - 128.0) / 128.0
    raise AudioError(
        f"unsupported audio sample type {x.dtype}; use float32/float64 in [-1, 1] or int16/int32/uint8 PCM"
    )


def _check_rate(rate: Any, what: str) -> None:
    ok = isinstance(rate, (int, float, np.integer, np.floating)) and not isinstance(rate, bool)
    if not ok or not math.isfinite(rate) or rate <= 0:
        raise AudioError(f"{what} must be a positive number of Hz, got {rate!r}")


def _finish(samples: np.ndarray, rate: float, target_rate: int, name: str) -> np.ndarray:
    """Validate mono samples [T] (non-empty, finite) and resample them to ``target_rate``."""
    if samples.size == 0:
        raise AudioError(f"{name} is empty (0 samples)")
    if not np.isfinite(samples).all():
        raise AudioError(f"{name} contains NaN or infinite samples")
    _check_rate(rate, "the audio's sampling rate")
    return np.ascontiguousarray(resample(samples, rate, target_rate), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------
# decoding


class _NoAudioStream(Exception):
    pass


def _decode_soundfile(data: bytes | str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    with sf.SoundFile(io.BytesIO(data) if isinstance(data, bytes) else data) as f:
        rate = f.samplerate
        frames = f.read(dtype="float32", always_2d=True).T  # [C, T]
    return (frames[0] if frames.shape[0] == 1 else frames.mean(axis=0)), int(rate)


def _decode_pyav(data: bytes | str) -> tuple[np.ndarray, int]:
    """Decode every frame of the first audio stream with FFmpeg; channels are averaged as above.

    FFmpeg reads from a Python file object and may open nothing else (``protocol_whitelist``), so playlists
    (HLS, DASH, concat, SDP) cannot make it fetch URLs or read other local files.
    """
    import av

    chunks: list[np.ndarray] = []  # each [C, n] float32
    rate = 0
    source = io.BytesIO(data) if isinstance(data, bytes) else open(data, "rb")  # noqa: SIM115
    with source, av.open(source, mode="r", options={"protocol_whitelist": "none"}) as container:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            raise _NoAudioStream
        resampler = av.AudioResampler(format="fltp")  # keep the layout and rate, convert to float planar
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                rate = rate or out.sample_rate
                chunks.append(out.to_ndarray())
        for out in resampler.resample(None):  # flush
            rate = rate or out.sample_rate
            chunks.append(out.to_ndarray())
    if not chunks:
        return np.zeros(0, np.float32), int(stream.rate or 1)
    frames = np.concatenate(chunks, axis=1).astype(np.float32, copy=False)  # [C, T]; one layout throughout
    return (frames[0] if frames.shape[0] == 1 else frames.mean(axis=0)), int(rate)


# ----------------------------------------------------------------------------------------------------------
# sources


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_size(size: int, max_bytes: int | None, what: str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise AudioError(f"{what} is too large: {size} bytes, the limit is {max_bytes} bytes")


def _check_local_file(path: str, max_bytes: int | None) -> None:
    name = _short(path)
    if not os.path.exists(path):
        raise AudioError(f"audio file not found: {name!r}")
    if os.path.isdir(path):
        raise AudioError(f"{name!r} is a directory, not an audio file")
    if not os.access(path, os.R_OK):
        raise AudioError(f"cannot read audio file {name!r}: permission denied")
    size = os.path.getsize(path)
    if size == 0:
        raise AudioError(f"audio file {name!r} is empty (0 bytes)")
    _check_size(size, max_bytes, f"audio file {name!r}")


def _read_data_uri(uri: str, max_bytes: int | None) -> bytes:
    """``data:[<media type>][;base64],<payload>`` → the decoded bytes."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise AudioError("malformed data: URI (no ',' between the header and the data)")
    params = [p.strip().lower() for p in header[5:].split(";")]  # media type unchecked: the decoder decides
    if "base64" in params[1:]:
        compact = re.sub(r"\s+", "", urllib.parse.unquote(payload))
        if max_bytes is not None:
            _check_size(len(compact) * 3 // 4, max_bytes, "the data: URI audio")
        try:
            data = base64.b64decode(compact, validate=True)
        except (binascii.Error, ValueError):
            raise AudioError("data: URI is not valid base64") from None
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    _check_size(len(data), max_bytes, "the data: URI audio")
    if not data:
        raise AudioError("data: URI holds no data (empty audio)")
    return data


class _HttpOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to http(s) URLs (urllib would also follow ftp)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # noqa: PLR0917 (urllib's signature)
        if urllib.parse.urlsplit(newurl).scheme.lower() not in ("http", "https"):
            raise AudioError(f"refusing a redirect from {_short(req.full_url)!r} to non-http(s) {newurl!r}")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _download(url: str, max_bytes: int | None, timeout: float) -> bytes:
    """GET ``url`` and return the body, stopping as soon as it exceeds ``max_bytes``."""
    opener = urllib.request.build_opener(_HttpOnlyRedirects)
    request = urllib.request.Request(url, headers={"User-Agent": "af3-audio-loader"})
    name = _short(url)
    try:
        with opener.open(request, timeout=timeout) as response:
            declared = response.headers.get("Content-Length")
            if declared and declared.isdigit():
                _check_size(int(declared), max_bytes, f"the download from {name!r}")
            buf = bytearray()
            while True:
                chunk = response.read(_READ_CHUNK)
                if not chunk:
                    break
                buf += chunk
                _check_size(len(buf), max_bytes, f"the download from {name!r}")
    except AudioError:
        raise
    except urllib.error.HTTPError as e:
        raise AudioError(f"could not download audio from {name!r}: HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        if isinstance(e.reason, TimeoutError):
            raise AudioError(f"could not download audio from {name!r}: timed out after {timeout} s") from None
        raise AudioError(f"could not download audio from {name!r}: {e.reason}") from None
    except TimeoutError:
        raise AudioError(f"could not download audio from {name!r}: timed out after {timeout} s") from None
    except (OSError, ValueError) as e:
        raise AudioError(f"could not download audio from {name!r}: {e}") from None
    if not buf:
        raise AudioError(f"the download from {name!r} is empty (0 bytes)")
    return bytes(buf)
