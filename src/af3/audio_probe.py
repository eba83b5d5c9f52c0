"""What an encoded audio file says about itself, read before decoding, and what it is when it is not audio.

* :func:`probe`: RIFF/RF64 WAV, AIFF/AIFC and AU headers are parsed to learn what they promise (channels, rate,
  data size), MP3 files whether they carry a Xing/Info/VBRI length header, Ogg files whether their last page
  ends the stream; :mod:`af3.audio_decode` compares the promise with what the decoders deliver.
* :func:`describe_non_audio` / :func:`unsupported_error`: an HTML page, text, JSON, an image, an archive or a
  playlist sent as audio is named as such, so the message says what was sent instead of "not a format".
* :func:`check_file_rate` / :func:`check_file_channels`: the rates and channel counts a header may claim.
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from .errors import AudioError

MIN_RATE = 1000  # Hz; below this a "rate" is a damaged header or a hostile one (1 Hz: 8 KB → hours)
MAX_RATE = 768000  # Hz; the highest rate real recorders use
MAX_FILE_CHANNELS = 64
_HEAD_BYTES = 64 * 1024
_PLACEHOLDER_SIZE = 0x7F000000  # WAV/AU data sizes from here up are "unknown" (streaming writers)

# ----------------------------------------------------------------------------------------------------------
# rates and channels


def _hz(rate: float) -> str:
    return f"{int(rate)} Hz" if float(rate).is_integer() else f"{rate:g} Hz"


def check_rate_value(rate: Any, what: str) -> float:
    """``rate`` as a float after checking that it is a real, finite, positive number of Hz in range."""
    ok = isinstance(rate, (int, float, np.integer, np.floating)) and not isinstance(rate, (bool, np.bool_))
    if not ok or not math.isfinite(rate) or rate <= 0:
        raise AudioError(f"{what} must be a positive number of Hz, got {rate!r}")
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"{what} of {_hz(rate)} is outside the supported range {MIN_RATE} to {MAX_RATE} Hz; "
                         "pass the audio's real sampling rate")
    return float(rate)


def check_file_rate(rate: float, what: str) -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise AudioError(f"{what} declares a sampling rate of {_hz(rate)}, outside the supported range "
                         f"{MIN_RATE} to {MAX_RATE} Hz; its header is damaged or forged, re-encode the audio")


def check_file_channels(channels: int, what: str) -> None:
    if channels > MAX_FILE_CHANNELS:
        raise AudioError(f"{what} has {channels} channels; at most {MAX_FILE_CHANNELS} are supported, "
                         "mix it down first")
    if channels < 1:
        raise AudioError(f"{what} declares {channels} channels; its header is damaged, re-encode the audio")


# ----------------------------------------------------------------------------------------------------------
# header probes


@dataclass
class Probe:
    """What a file's header says, learnt without decoding."""

    kind: str = ""  # "wav", "aiff", "au", "mp3", "ogg" or ""
    channels: int | None = None
    rate: float | None = None
    data_declared: int | None = None  # bytes of audio the header promises (None: unknown / placeholder)
    data_available: int | None = None  # bytes of audio actually in the file
    promised_frames: int | None = None  # frames the header promises, when it says so directly (AIFF)
    block_align: int = 0  # bytes per frame of uncompressed data (WAV, AU), 0 if unknown
    placeholder: bool = False  # the data size is a streaming writer's "unknown"
    has_length_header: bool = False  # MP3: a Xing/Info/VBRI header gives the exact length
    ogg_eos: bool | None = None  # Ogg: does the last page carry the end-of-stream flag
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _read_at(f: BinaryIO, offset: int, n: int) -> bytes:
    f.seek(offset)
    return f.read(n)


def probe(f: BinaryIO, size: int, head: bytes, what: str) -> Probe:
    """Parse the header of a seekable file whose first bytes are ``head``; never raises for odd input."""
    try:
        if head[:4] in (b"RIFF", b"RIFX", b"RF64", b"BW64") and head[8:12] == b"WAVE":
            return _probe_riff(f, size, head, what)
        if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
            return _probe_aiff(f, size, what)
        if head[:4] == b".snd" and len(head) >= 24:
            return _probe_au(size, head)
        if head[:4] == b"OggS":
            return Probe(kind="ogg", ogg_eos=_ogg_ends_with_eos(f, size))
        if head[:3] == b"ID3" or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
            return Probe(kind="mp3", has_length_header=_mp3_has_length_header(f, head))
    except Exception:  # an odd header the decoders will judge
        pass
    finally:
        f.seek(0)
    return Probe()


def _probe_riff(f: BinaryIO, size: int, head: bytes, what: str) -> Probe:
    end = ">" if head[:4] == b"RIFX" else "<"
    info = Probe(kind="wav")
    riff_size = struct.unpack(end + "I", head[4:8])[0]
    ds64_data: int | None = None
    block_align = 0
    data_offset = None
    declared = 0
    for off, cid, csize in _walk_chunks(f, 12, size, end):
        if cid == b"ds64":
            body = _read_at(f, off + 8, 28)
            riff_size = struct.unpack("<Q", body[0:8])[0]
            ds64_data = struct.unpack("<Q", body[8:16])[0]
        elif cid == b"fmt ":
            body = _read_at(f, off + 8, 16)
            if len(body) >= 16:
                tag, channels, rate, _bps, block_align, _bits = struct.unpack(end + "HHIIHH", body)
                info.channels, info.rate = channels, float(rate)
                if tag in (1, 3, 6, 7, 0xFFFE):  # PCM, float, A-law, mu-law, extensible: fixed-size frames
                    info.block_align = block_align
        elif cid == b"data":
            data_offset = off + 8
            declared = ds64_data if (csize == 0xFFFFFFFF and ds64_data is not None) else csize
            break
    if data_offset is None:
        return info
    available = max(0, size - data_offset)
    info.data_available = available
    if declared == 0 and available > 0:
        info.placeholder = True  # written to a pipe: the size was never filled in
        return info
    if declared >= _PLACEHOLDER_SIZE and declared > available and ds64_data is None:
        info.placeholder = True
        return info
    info.data_declared = declared
    if declared > available:
        return info  # truncated: judged against what the decoder reads
    # The data chunk is complete. What follows it must be chunks; a long stretch that is not is audio the
    # data size leaves out (a size field that lies low).
    rest = size - (data_offset + declared)
    if rest > 8 and not (_chunks_follow(f, data_offset + declared, size, end)
                         or _chunks_follow(f, data_offset + declared + 1, size, end)):
        per_second = max(1, block_align) * (info.rate or 1)
        if rest > max(4096, 0.1 * per_second):
            seconds = declared / per_second
            extra = rest / per_second
            info.errors.append(
                f"{what} is malformed: its header declares {seconds:.2f} s of audio, but {extra:.2f} s more "
                "of data follow it that are not part of any chunk (the size field is wrong); re-encode the "
                "file, e.g. with ffmpeg"
            )
    elif riff_size not in (0, 0xFFFFFFFF) and riff_size + 8 > size + 1:
        info.warnings.append(
            f"{what} is incomplete: its RIFF header promises {riff_size + 8} bytes, the file has {size}; the "
            "audio data is complete and was used, what is missing is metadata after it"
        )
    return info


def _chunks_follow(f: BinaryIO, off: int, size: int, end: str) -> bool:
    """Do well-formed chunk headers (printable ids, sizes that fit) run from ``off`` to the end of the file?"""
    for _ in range(256):
        if size - off < 8:
            return True  # a padding byte or a few stray bytes at the end
        header = _read_at(f, off, 8)
        cid = header[:4]
        if len(header) < 8 or not all(32 <= c < 127 for c in cid):
            return False
        csize = struct.unpack(end + "I", header[4:])[0]
        if off + 8 + csize > size + 1:
            return off + 8 + csize - size < 1 << 20 and cid != b"data"  # a truncated trailing metadata chunk
        off += 8 + csize + (csize & 1)
    return True


def _probe_aiff(f: BinaryIO, size: int, what: str) -> Probe:
    info = Probe(kind="aiff")
    for off, cid, csize in _walk_chunks(f, 12, size, ">"):
        if cid == b"COMM":
            body = _read_at(f, off + 8, 18)
            channels, frames, _bits = struct.unpack(">hIh", body[:8])
            info.channels, info.promised_frames = channels, frames
            info.rate = _extended_to_float(body[8:18])
        elif cid == b"SSND":
            info.data_available = max(0, size - off - 16)
            info.data_declared = max(0, csize - 8)
            break
    return info


def _walk_chunks(f: BinaryIO, off: int, size: int, end: str):
    """(offset, id, size) of the chunks of a RIFF/AIFF body from ``off`` (at most 4096, padded to even sizes),
    until the file or a chunk header runs out."""
    for _ in range(4096):
        if off + 8 > size:
            return
        header = _read_at(f, off, 8)
        if len(header) < 8:
            return
        cid, csize = header[:4], struct.unpack(end + "I", header[4:])[0]
        yield off, cid, csize
        off += 8 + csize + (csize & 1)


def _extended_to_float(b: bytes) -> float:
    """80-bit IEEE 754 extended (AIFF sample rates) → float."""
    if len(b) < 10:
        return 0.0
    exponent = ((b[0] & 0x7F) << 8) | b[1]
    mantissa = int.from_bytes(b[2:10], "big")
    if exponent == 0 and mantissa == 0:
        return 0.0
    if exponent == 0x7FFF:
        return math.inf
    try:
        value = math.ldexp(mantissa, exponent - 16383 - 63)
    except OverflowError:
        return math.inf
    return -value if b[0] & 0x80 else value


def _probe_au(size: int, head: bytes) -> Probe:
    offset, data_size, encoding, rate, channels = struct.unpack(">IIIII", head[4:24])
    width = {1: 1, 2: 1, 3: 2, 4: 3, 5: 4, 6: 4, 7: 8, 27: 1}.get(encoding, 0)
    info = Probe(kind="au", channels=channels, rate=float(rate), data_available=max(0, size - offset),
                 block_align=width * channels)
    if data_size == 0xFFFFFFFF or data_size >= _PLACEHOLDER_SIZE:
        info.placeholder = True
    else:
        info.data_declared = data_size
    return info


def _mp3_has_length_header(f: BinaryIO, head: bytes) -> bool:
    start = 0
    if head[:3] == b"ID3" and len(head) >= 10:
        tag = ((head[6] & 0x7F) << 21) | ((head[7] & 0x7F) << 14) | ((head[8] & 0x7F) << 7) | (head[9] & 0x7F)
        start = 10 + tag + (10 if head[5] & 0x10 else 0)
    window = _read_at(f, start, 8192)
    sync = next((i for i in range(len(window) - 1) if window[i] == 0xFF and window[i + 1] & 0xE0 == 0xE0), None)
    if sync is None:
        return False
    frame = window[sync : sync + 200]
    return any(tag in frame for tag in (b"Xing", b"Info", b"VBRI"))


def _ogg_ends_with_eos(f: BinaryIO, size: int) -> bool | None:
    n = min(size, 1 << 16)
    tail = _read_at(f, size - n, n)
    pos = tail.rfind(b"OggS")
    while pos >= 0 and (pos + 6 > len(tail) or tail[pos + 4] != 0):
        pos = tail.rfind(b"OggS", 0, pos)
    if pos < 0:
        return None
    return bool(tail[pos + 5] & 0x04)


# ----------------------------------------------------------------------------------------------------------
# what a file that cannot be decoded actually is


_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\x89PNG", "a PNG image"),
    (0, b"\xff\xd8\xff", "a JPEG image"),
    (0, b"GIF8", "a GIF image"),
    (0, b"%PDF", "a PDF document"),
    (0, b"PK\x03\x04", "a ZIP archive (or an Office document)"),
    (0, b"\x1f\x8b", "gzip-compressed data"),
    (0, b"BZh", "bzip2-compressed data"),
    (0, b"\xfd7zXZ", "xz-compressed data"),
    (0, b"7z\xbc\xaf", "a 7-Zip archive"),
    (0, b"Rar!", "a RAR archive"),
    (0, b"\x7fELF", "a program (an ELF executable)"),
    (0, b"MZ", "a Windows program"),
    (8, b"WEBP", "a WebP image"),
    (8, b"AVI ", "an AVI video"),
)
_DAMAGED_KINDS: tuple[tuple[int, bytes, str], ...] = (
    (8, b"WAVE", "a WAV file"),
    (0, b"fLaC", "a FLAC file"),
    (0, b"OggS", "an Ogg file"),
    (4, b"ftyp", "an MP4/M4A file"),
    (0, b"\x1a\x45\xdf\xa3", "a Matroska/WebM file"),
    (0, b"FORM", "an AIFF file"),
    (0, b"ID3", "an MP3 file"),
    (0, b"caff", "a CAF file"),
)


def describe_non_audio(head: bytes) -> tuple[str, str] | None:
    """What ``head`` (a file's first bytes) is, if it is clearly not audio → ("a PNG image", a hint or "")."""
    for offset, magic, what in _SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            return what, ""
    sample = head[:4096]
    if not sample:
        return None
    if not sample.strip(b"\0"):
        return "nothing but zero bytes", ""
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError:
        try:
            text = sample[:-3].decode("utf-8")  # a character cut at the end of the sample
        except UnicodeDecodeError:
            return None
    printable = sum(c.isprintable() or c in "\r\n\t" for c in text)
    if printable < 0.97 * len(text):
        return None
    lowered = text.lstrip("\ufeff \r\n\t").lower()
    if lowered.startswith("#extm3u") or lowered.startswith("[playlist]"):
        return "a playlist", "a playlist only points to audio; pass the audio itself"
    if lowered.startswith(("<!doctype html", "<html")) or "<html" in lowered[:1024]:
        return "an HTML page", "a web page or an error page was saved or served instead of the audio"
    if lowered.startswith(("<?xml", "<")):
        return "XML text", ""
    if lowered.startswith(("{", "[")):
        return "JSON text", ""
    return "text", ""


def describe_damaged(head: bytes) -> str | None:
    """The audio container ``head`` starts like ("an MP4/M4A file"), for files that failed to decode."""
    for offset, magic, what in _DAMAGED_KINDS:
        if head[offset : offset + len(magic)] == magic:
            return what
    return None


_AUDIO_EXTENSIONS = frozenset((
    ".wav", ".wave", ".mp3", ".flac", ".ogg", ".oga", ".opus", ".m4a", ".aac", ".mp4", ".webm", ".mka", ".aif",
    ".aiff", ".aifc", ".au", ".snd", ".caf", ".wma", ".amr", ".w64", ".rf64", ".mp2",
))


def _extension_hint(label: str) -> str:
    ext = os.path.splitext(label.split("?", 1)[0])[1].lower()
    return f", despite its {ext} name" if ext in _AUDIO_EXTENSIONS else ""


def unsupported_error(label: str, head: bytes, detail: str | None = None) -> AudioError:
    prefix = f"could not decode audio from {label!r}: not a supported audio format"
    found = describe_non_audio(head)
    if found:
        what, hint = found
        verb = "holds" if what.startswith("nothing") else "is"
        return AudioError(f"{prefix}: it {verb} {what}, not audio{_extension_hint(label)}"
                          + (f" ({hint})" if hint else ""))
    if detail:
        return AudioError(f"{prefix} (tried soundfile and PyAV; {detail})")
    kind = describe_damaged(head)
    if kind:
        return AudioError(f"{prefix} (it starts like {kind}, but neither soundfile nor FFmpeg can read it: it is "
                          "truncated or damaged, e.g. an incomplete download or upload; send the whole file)")
    return AudioError(f"{prefix} (tried soundfile and PyAV; its contents are not recognised as audio)")

