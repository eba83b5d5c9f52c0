"""Where audio comes from, before decoding: numpy arrays and torch tensors (mixed to mono, integer PCM scaled),
local files (regular files only, opened so that a device or a FIFO can never block or flood a read), and
``data:`` URIs (size-checked before base64 is decoded). Downloads live in :mod:`af3.fetch`."""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
import urllib.parse
from typing import Any

import numpy as np

from .errors import AudioError

MAX_CHANNELS = 8  # arrays: the channel axis is the one that is at most this long

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
        try:
            x = x.detach()
            if x.is_complex():
                raise AudioError(f"unsupported audio sample type {str(x.dtype).removeprefix('torch.')}; use float "
                                 "samples in [-1, 1] or integer PCM")
            if x.layout != torch.strided:
                x = x.to_dense()
            x = x.cpu()
            if x.is_floating_point() and x.dtype != torch.float64:
                x = x.float()  # bfloat16 / float16 have no (or lossy) numpy equivalents
            x = x.resolve_conj().resolve_neg().numpy()
        except AudioError:
            raise
        except Exception:
            raise AudioError(f"cannot read samples from this torch tensor ({x.dtype}, {x.layout}, on "
                             f"{x.device}); pass a dense CPU tensor or a numpy array") from None
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


# ----------------------------------------------------------------------------------------------------------
# encoded sources


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_size(size: int, max_bytes: int | None, what: str) -> None:
    if max_bytes is not None and size > max_bytes:
        raise AudioError(f"{what} is too large: {size} bytes, the limit is {max_bytes} bytes (max_bytes; a trusted "
                         "caller can raise it)")


_FILE_KINDS = (
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(mode: int, name: str) -> AudioError:
    if stat.S_ISDIR(mode):
        return AudioError(f"{name!r} is a directory, not an audio file")
    kind = next((what for test, what in _FILE_KINDS if test(mode)), "not a regular file")
    return AudioError(f"{name!r} is {kind}, not a regular file; pass an audio file")


def _open_local_file(path: str, max_bytes: int | None) -> tuple[io.BufferedReader, int]:
    """Open a local audio file for reading → (file, size). Devices, FIFOs and sockets are refused before they
    are opened for reading (a FIFO is opened non-blocking, so a missing writer cannot hang the call)."""
    name = _short(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AudioError(f"audio file not found: {name!r}") from None
    except PermissionError:
        raise AudioError(f"cannot read audio file {name!r}: permission denied") from None
    except ValueError:
        raise AudioError(f"invalid audio file path {name!r} (it contains a NUL character)") from None
    except OSError as e:
        raise AudioError(f"cannot open audio file {name!r}: {(e.strerror or 'error').lower()}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(st.st_mode, name)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:
        raise AudioError(f"cannot read audio file {name!r}: permission denied") from None
    except OSError as e:
        raise AudioError(f"cannot open audio file {name!r}: {(e.strerror or 'error').lower()}") from None
    try:
        st = os.fstat(fd)  # what was opened, in case the path changed since the check
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(st.st_mode, name)
        if st.st_size == 0:
            raise AudioError(f"audio file {name!r} is empty (0 bytes)")
        _check_size(st.st_size, max_bytes, f"audio file {name!r}")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    return f, st.st_size


def _read_data_uri(uri: str, max_bytes: int | None) -> bytes:
    """``data:[<media type>][;base64],<payload>`` → the decoded bytes."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise AudioError("malformed data: URI (no ',' between the header and the data)")
    params = [p.strip().lower() for p in header[5:].split(";")]  # media type unchecked: the decoder decides
    if max_bytes is not None and len(payload) // 3 > max_bytes:  # too large even if all of it were %-escaped
        raise AudioError(f"the data: URI audio is too large: its {len(payload)} characters hold more than "
                         f"{max_bytes} bytes, the limit is {max_bytes} bytes (max_bytes)")
    if "base64" in params[1:]:
        compact = re.sub(r"\s+", "", urllib.parse.unquote(payload))
        if max_bytes is not None and len(compact) // 4 * 3 - 2 > max_bytes:
            raise AudioError(f"the data: URI audio is too large: about {len(compact) // 4 * 3} bytes, the limit "
                             f"is {max_bytes} bytes (max_bytes)")
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
