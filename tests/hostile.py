"""Hostile inputs for the audio layer: damaged and forged files, and a misbehaving HTTP server.

Everything is generated on the fly (small files, a sparse 2-hour WAV) and the server runs in-process on
127.0.0.1 (``HostileServer``), so the tests need no network and no fixtures on disk.
"""

from __future__ import annotations

import gzip
import io
import os
import socket
import struct
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000


def tone(seconds: float, rate: int = RATE, freq: float = 440.0, channels: int = 1) -> np.ndarray:
    """[T] (or [T, C]) float32 sine at 0.5."""
    t = np.arange(int(round(seconds * rate))) / rate
    x = (0.5 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return x if channels == 1 else np.repeat(x[:, None], channels, axis=1)


def wav_bytes(x: np.ndarray, rate: int = RATE, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    bio = io.BytesIO()
    sf.write(bio, x, rate, format=fmt, subtype=subtype)
    return bio.getvalue()


def _data_chunk(b: bytes | bytearray) -> int:
    """Offset of the 'data' chunk header in a WAV written by libsndfile."""
    return bytes(b).index(b"data", 12)


# ----------------------------------------------------------------------------------------------------------
# damaged and forged files


def truncated_wav(seconds: float = 2.0, keep: float = 0.5) -> bytes:
    """A 16 kHz PCM16 WAV cut after ``keep`` of its bytes: the header promises ``seconds``."""
    b = wav_bytes(tone(seconds))
    return b[: int(len(b) * keep)]


def header_only_wav(seconds: float = 2.0) -> bytes:
    """A WAV header that promises ``seconds`` of audio, with none after it."""
    b = wav_bytes(tone(seconds))
    return b[: _data_chunk(b) + 8]


def wav_with_data_size(declared: int, seconds: float = 2.0) -> bytes:
    """A complete WAV whose data chunk size field says ``declared`` bytes."""
    b = bytearray(wav_bytes(tone(seconds)))
    i = _data_chunk(b)
    b[i + 4 : i + 8] = struct.pack("<I", declared)
    return bytes(b)


def wav_with_riff_size(declared: int, seconds: float = 2.0) -> bytes:
    b = bytearray(wav_bytes(tone(seconds)))
    b[4:8] = struct.pack("<I", declared)
    return bytes(b)


def wav_with_rate(rate: int, seconds: float = 0.25) -> bytes:
    """A valid 16 kHz WAV whose header is patched to claim ``rate`` Hz (and the matching byte rate)."""
    b = bytearray(wav_bytes(tone(seconds)))
    b[24:28] = struct.pack("<I", rate)
    b[28:32] = struct.pack("<I", rate * 2)
    return bytes(b)


def wav_with_channels(channels: int, frames: int = 16) -> bytes:
    """A small PCM16 WAV with ``channels`` channels, written by hand (libsndfile stops at 1024)."""
    data = np.zeros((frames, channels), np.int16).tobytes()
    fmt = struct.pack("<HHIIHH", 1, channels, RATE, RATE * 2 * channels, 2 * channels, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def float_wav_with(value: float, seconds: float = 0.5) -> bytes:
    x = tone(seconds)
    x[len(x) // 2] = value
    return wav_bytes(x, subtype="FLOAT")


def mp3_bytes(seconds: float = 2.0, rate: int = RATE) -> bytes:
    """MPEG layer III written by libsndfile (LAME), with its Xing/Info length header."""
    return wav_bytes(tone(seconds, rate), rate, subtype="MPEG_LAYER_III", fmt="MP3")


def corrupted_mp3(seconds: float = 2.0, span: int = 1000, seed: int = 0) -> bytes:
    """An MP3 with ``span`` random bytes written over its middle (frame headers included)."""
    b = bytearray(mp3_bytes(seconds))
    mid = len(b) // 2
    b[mid - span // 2 : mid + span // 2] = np.random.default_rng(seed).integers(0, 256, span, np.uint8).tobytes()
    return bytes(b)


def first_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def flac_without_total(seconds: float = 2.0) -> bytes:
    """A FLAC whose STREAMINFO total-samples field is 0 ("unknown"), as streaming encoders write it."""
    b = bytearray(wav_bytes(tone(seconds), fmt="FLAC", subtype="PCM_16"))
    field = int.from_bytes(b[18:26], "big") & ~((1 << 36) - 1)
    b[18:26] = field.to_bytes(8, "big")
    return bytes(b)


def truncated_flac(seconds: float = 2.0) -> bytes:
    b = wav_bytes(tone(seconds, channels=2), fmt="FLAC", subtype="PCM_16")
    return b[: len(b) // 2]


def truncated_aiff(seconds: float = 2.0) -> bytes:
    b = wav_bytes(tone(seconds, channels=2), fmt="AIFF", subtype="PCM_16")
    return b[: len(b) // 2]


def ogg_without_eos(seconds: float = 3.0) -> bytes:
    """An Ogg Vorbis file whose last page lost its end-of-stream flag (as if the writer died)."""
    b = bytearray(wav_bytes(tone(seconds, 44100), 44100, fmt="OGG", subtype="VORBIS"))
    last = bytes(b).rfind(b"OggS")
    b[last + 5] &= ~0x04  # the page CRC is left alone: decoders that check it skip nothing of the audio here
    return bytes(b)


def pyav_encoded(seconds: float, codec: str, container: str, rate: int = 48000) -> bytes:
    """Mono audio encoded with PyAV/FFmpeg (aac in mp4 with the index at the end, opus in webm, ...)."""
    import av

    x = tone(seconds, rate)
    bio = io.BytesIO()
    with av.open(bio, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate, layout="mono")
        for start in range(0, len(x), 960):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(x[None, start : start + 960]), format="fltp",
                                               layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return bio.getvalue()


def corrupt_middle(data: bytes, span: int = 300, seed: int = 1) -> bytes:
    b = bytearray(data)
    mid = len(b) // 2
    b[mid : mid + span] = np.random.default_rng(seed).integers(0, 256, span, np.uint8).tobytes()
    return bytes(b)


def video_only_mp4() -> bytes:
    import av

    bio = io.BytesIO()
    with av.open(bio, "w", format="mp4") as out:
        stream = out.add_stream("mpeg4", rate=5)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        for i in range(3):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 40 * i, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return bio.getvalue()


PNG = b"\x89PNG\r\n\x1a\n" + bytes(200)
HTML = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body>Not Found</body></html>\n"


def gzip_of(data: bytes) -> bytes:
    return gzip.compress(data)


def zip_of(data: bytes) -> bytes:
    bio = io.BytesIO()
    with zipfile.ZipFile(bio, "w") as z:
        z.writestr("a.wav", data)
    return bio.getvalue()


def random_bytes(n: int = 4000, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, np.uint8).tobytes()


def sparse_wav(path: Path, seconds: float, rate: int = RATE) -> Path:
    """A PCM16 mono WAV of ``seconds`` (hours are fine): one second of tone, then silence left as a hole in
    a sparse file, so it is written in milliseconds and takes no disk space."""
    frames = int(seconds * rate)
    head = tone(1.0, rate)
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)
    data_size = frames * 2
    with open(path, "wb") as f:
        f.write(b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt)
        f.write(b"data" + struct.pack("<I", data_size))
        f.write(np.round(head * 32767).astype("<i2").tobytes())
        f.truncate(44 + data_size)
    return path


def unix_socket_file(path: Path) -> socket.socket:
    """A listening Unix socket at ``path`` (the caller closes it)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    return s


# ----------------------------------------------------------------------------------------------------------
# a misbehaving HTTP server


class HostileServer:
    """A threaded HTTP server on 127.0.0.1 that answers with raw bytes, well or badly, by path:

    ``/ok.wav`` a small WAV; ``/big`` 64 KB with its Content-Length; ``/big-nocl`` the same without one;
    ``/endless`` a body that never ends; ``/trickle`` one byte every ``trickle_s``; ``/trickle-headers``
    headers one byte at a time; ``/slow-headers`` nothing for a long time; ``/short`` less than its
    Content-Length; ``/long`` more; ``/empty`` a 0-byte body; ``/html`` a web page; ``/loop`` a redirect to
    itself; ``/redirect-file`` to file://; ``/redirect-private`` to the cloud metadata address;
    ``/redirect-ten`` to 10.0.0.1; ``/no-location`` a 302 without Location; ``/redirect/<path>`` to
    ``/<path>``; ``/status/<code>``; ``/chunked`` the WAV in chunks; ``/chunked-cut`` chunks cut off;
    ``/garbage`` not HTTP at all.
    """

    def __init__(self, wav: bytes, trickle_s: float = 0.25):
        self.wav = wav
        self.trickle_s = trickle_s
        self.stop = threading.Event()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.threads: list[threading.Thread] = []
        self.thread = threading.Thread(target=self._accept, name="hostile-server", daemon=True)

    def __enter__(self) -> HostileServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        for t in self.threads:
            t.join(5)
        self.sock.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads = [x for x in self.threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        try:
            with conn:
                request = b""
                while b"\r\n\r\n" not in request and len(request) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    request += chunk
                    if request[:1] == b"\x16":  # a TLS ClientHello: answer as a plain HTTP server does
                        conn.sendall(self._head("400 Bad Request", {"Content-Length": "0"}))
                        return
                path = request.split(b" ", 2)[1].decode("latin-1")
                self._answer(conn, path)
        except OSError:  # the client went away: that is what several tests do on purpose
            pass

    @staticmethod
    def _head(status: str, headers: dict[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers.items()] + ["Connection: close", "", ""]
        return "\r\n".join(lines).encode()

    def _answer(self, conn: socket.socket, path: str) -> None:
        send = conn.sendall
        body = self.wav
        if path == "/ok.wav":
            send(self._head("200 OK", {"Content-Length": str(len(body)), "Content-Type": "audio/wav"}) + body)
        elif path == "/big":
            send(self._head("200 OK", {"Content-Length": str(65536)}) + bytes(65536))
        elif path == "/big-nocl":
            send(self._head("200 OK", {}) + bytes(65536))
        elif path == "/endless":
            send(self._head("200 OK", {"Content-Type": "audio/wav"}))
            block = bytes(65536)
            while not self.stop.is_set():
                send(block)
        elif path == "/trickle":
            send(self._head("200 OK", {"Content-Length": str(len(body))}))
            for i in range(len(body)):
                if self.stop.wait(self.trickle_s):
                    return
                send(body[i : i + 1])
        elif path == "/trickle-headers":
            for c in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10000:
                if self.stop.wait(self.trickle_s):
                    return
                send(bytes([c]))
        elif path == "/slow-headers":
            self.stop.wait(30)
        elif path == "/short":
            send(self._head("200 OK", {"Content-Length": str(len(body) + 5000)}) + body)
        elif path == "/long":
            send(self._head("200 OK", {"Content-Length": str(len(body) - 1000)}) + body)
            self.stop.wait(0.2)
        elif path == "/empty":
            send(self._head("200 OK", {"Content-Length": "0"}))
        elif path == "/html":
            send(self._head("200 OK", {"Content-Length": str(len(HTML)), "Content-Type": "text/html"}) + HTML)
        elif path in ("/loop", "/redirect-file", "/redirect-private", "/redirect-ten") or \
                path.startswith("/redirect/"):
            target = {"/loop": "/loop", "/redirect-file": "file:///etc/passwd",
                      "/redirect-private": "http://169.254.169.254/latest/meta-data/",
                      "/redirect-ten": "http://10.0.0.1/a.wav"}.get(path, path.removeprefix("/redirect"))
            send(self._head("302 Found", {"Location": target, "Content-Length": "0"}))
        elif path == "/no-location":
            send(self._head("302 Found", {"Content-Length": "0"}))
        elif path.startswith("/status/"):
            code = int(path.rsplit("/", 1)[1])
            text = b"nope"
            send(self._head(f"{code} Oops", {"Content-Length": str(len(text))}) + text)
        elif path in ("/chunked", "/chunked-cut"):
            send(self._head("200 OK", {"Transfer-Encoding": "chunked"}))
            step = 1000
            for start in range(0, len(body), step):
                piece = body[start : start + step]
                send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                if path == "/chunked-cut" and start > len(body) // 2:
                    return
            send(b"0\r\n\r\n")
        elif path == "/garbage":
            send(b"HELLO THERE\r\n\r\nthis is not http\r\n")
        else:
            text = b"not found"
            send(self._head("404 Not Found", {"Content-Length": str(len(text))}) + text)


def wait_until(predicate, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def peak_memory_script(src: str, body: str) -> str:
    """Python source for a subprocess that prints ``baseline_kb peak_kb`` (VmHWM) around ``body``.

    The baseline is taken after importing af3.audio and decoding a tiny file, so imports and lazy library
    setup are not counted."""
    return f"""
import sys
sys.path.insert(0, {src!r})
import numpy as np, soundfile, soxr, av
from af3.audio import load_audio, open_audio

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

load_audio(np.zeros(16000, np.float32))
base = hwm()
{body}
print(base, hwm())
"""


def file_of(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path
