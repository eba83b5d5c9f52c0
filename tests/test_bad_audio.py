"""Bad input to the audio layer, table-driven: each row must raise AudioError (no other exception class)
with a message that names the problem — through load_audio and, where it applies, through open_audio.

Then the rest of the hardening: private-network refusal, deadlines against trickling servers, warnings for
damage that leaves the audio usable, the fd-2 capture of libmpg123's notes.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

import hostile  # noqa: E402

from af3 import fetch  # noqa: E402
from af3.audio import FetchPolicy, load_audio, open_audio  # noqa: E402
from af3.errors import AudioError  # noqa: E402

LOCAL = {"allow_private_network": True}

# name → bytes of each hostile file (written to disk by the fixture)
FILES: dict[str, Callable[[], bytes]] = {
    "truncated.wav": hostile.truncated_wav,
    "header_only.wav": hostile.header_only_wav,
    "data_size_high.wav": lambda: hostile.wav_with_data_size(10**9),
    "data_size_low.wav": lambda: hostile.wav_with_data_size(1000),
    "corrupted.mp3": hostile.corrupted_mp3,
    "truncated.mp3": lambda: hostile.first_half(hostile.mp3_bytes(4.0)),
    "rate_1hz.wav": lambda: hostile.wav_with_rate(1),
    "rate_999hz.wav": lambda: hostile.wav_with_rate(999),
    "rate_2mhz.wav": lambda: hostile.wav_with_rate(2_000_000),
    "ch1024.wav": lambda: hostile.wav_with_channels(1024),
    "ch65.wav": lambda: hostile.wav_with_channels(65),
    "ch4000.wav": lambda: hostile.wav_with_channels(4000),
    "truncated.flac": hostile.truncated_flac,
    "truncated.aiff": hostile.truncated_aiff,
    "truncated.webm": lambda: hostile.first_half(hostile.pyav_encoded(4.0, "libopus", "webm")),
    "corrupted.webm": lambda: hostile.corrupt_middle(hostile.pyav_encoded(4.0, "libopus", "webm")),
    "truncated.m4a": lambda: hostile.first_half(hostile.pyav_encoded(4.0, "aac", "mp4", 44100)),
    "page.wav": lambda: hostile.HTML,
    "image.mp3": lambda: hostile.PNG,
    "notes.flac": lambda: b"these are my notes, not audio\n" * 20,
    "zeros.wav": lambda: bytes(5000),
    "random.bin": hostile.random_bytes,
    "empty.wav": lambda: b"",
    "no_samples.wav": lambda: hostile.wav_bytes(np.zeros(0, np.float32)),
    "nan.wav": lambda: hostile.float_wav_with(float("nan")),
    "inf.wav": lambda: hostile.float_wav_with(float("inf")),
    "list.m3u": lambda: b"#EXTM3U\n#EXTINF:10,\nhttp://example.com/a.mp3\n",
    "video_only.mp4": hostile.video_only_mp4,
    "audio.wav.gz": lambda: hostile.gzip_of(hostile.wav_bytes(hostile.tone(0.5))),
    "audio.zip": lambda: hostile.zip_of(hostile.wav_bytes(hostile.tone(0.5))),
    "ok.wav": lambda: hostile.wav_bytes(hostile.tone(2.0)),
}


@dataclass
class Env:
    folder: Path
    url: str
    made: dict[str, Path] = field(default_factory=dict)

    def file(self, name: str) -> Path:
        if name not in self.made:
            self.made[name] = hostile.file_of(self.folder / name, FILES[name]())
        return self.made[name]

    def bytes(self, name: str) -> bytes:
        return self.file(name).read_bytes()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    with hostile.HostileServer(hostile.wav_bytes(hostile.tone(1.0))) as server:
        yield Env(folder, server.url)


@dataclass(frozen=True)
class Row:
    id: str
    source: Callable[[Env], Any]
    pattern: str
    kwargs: dict = field(default_factory=dict)
    stream: bool = True  # also through open_audio(...).blocks()


def _b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode()


def _dir(e: Env) -> str:
    return str(e.folder)


def _fifo(e: Env) -> Path:
    path = e.folder / "pipe.wav"
    if not path.exists():
        hostile.make_fifo(path)
    return path


def _socket_file(e: Env) -> Path:
    path = e.folder / "sock.wav"
    if not path.exists():
        e.made["socket"] = path
        hostile.unix_socket_file(path)  # left bound until the folder goes; nothing connects to it
    return path


def _closed_port(_: Env) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/a.wav"


POSITIVE_RATE = r"sampling_rate must be a positive number of Hz"

ROWS = [
    # --- damaged and forged files
    Row("truncated-wav", lambda e: e.file("truncated.wav"),
        r"truncated.wav' is truncated.*promises 2\.00 s, 1\.00 s could be decoded"),
    Row("header-only-wav", lambda e: e.file("header_only.wav"), r"truncated.*promises 2\.00 s, nothing could be"),
    Row("wav-data-size-lies-high", lambda e: e.file("data_size_high.wav"), r"truncated \(or its data size field"),
    Row("wav-data-size-lies-low", lambda e: e.file("data_size_low.wav"), r"malformed.*size field is wrong"),
    Row("corrupted-mp3", lambda e: e.file("corrupted.mp3"), r"corrupted\.mp3' is damaged.*skipped \d+ bytes"),
    Row("truncated-mp3", lambda e: e.file("truncated.mp3"), r"is truncated: its header promises 4\.00 s"),
    Row("rate-1-hz", lambda e: e.file("rate_1hz.wav"), r"sampling rate of 1 Hz, outside the supported range"),
    Row("rate-999-hz", lambda e: e.file("rate_999hz.wav"), r"999 Hz, outside the supported range"),
    Row("rate-2-mhz", lambda e: e.file("rate_2mhz.wav"), r"2000000 Hz, outside the supported range"),
    Row("1024-channels", lambda e: e.file("ch1024.wav"), r"has 1024 channels; at most 64"),
    Row("65-channels", lambda e: e.file("ch65.wav"), r"has 65 channels; at most 64"),
    Row("4000-channels", lambda e: e.file("ch4000.wav"), r"has 4000 channels; at most 64"),
    Row("truncated-flac", lambda e: e.file("truncated.flac"), r"truncated or damaged: its header promises 2\.00 s"),
    Row("truncated-aiff", lambda e: e.file("truncated.aiff"), r"is truncated: its header promises 2\.00 s, 1\.00 s"),
    Row("truncated-webm", lambda e: e.file("truncated.webm"), r"is truncated: its header promises 4\.0\d s"),
    Row("corrupted-webm", lambda e: e.file("corrupted.webm"), r"is (truncated|damaged).*promises 4\.0\d s"),
    Row("truncated-m4a", lambda e: e.file("truncated.m4a"), r"starts like an MP4/M4A file.*truncated or damaged"),
    Row("html-named-wav", lambda e: e.file("page.wav"), r"it is an HTML page, not audio, despite its \.wav name"),
    Row("png-named-mp3", lambda e: e.file("image.mp3"), r"it is a PNG image, not audio, despite its \.mp3 name"),
    Row("text-named-flac", lambda e: e.file("notes.flac"), r"it is text, not audio"),
    Row("zero-bytes", lambda e: e.file("zeros.wav"), r"holds nothing but zero bytes"),
    Row("random-bytes", lambda e: e.file("random.bin"), r"random\.bin': not a supported audio format"),
    Row("empty-file", lambda e: e.file("empty.wav"), r"empty \(0 bytes\)"),
    Row("zero-samples", lambda e: e.file("no_samples.wav"), r"empty \(0 samples\)"),
    Row("nan-samples", lambda e: e.file("nan.wav"), r"nan\.wav' contains NaN or infinite samples"),
    Row("inf-samples", lambda e: e.file("inf.wav"), r"contains NaN or infinite samples"),
    Row("playlist", lambda e: e.file("list.m3u"), r"it is a playlist.*pass the audio itself"),
    Row("video-only", lambda e: e.file("video_only.mp4"), r"no audio stream"),
    Row("gzip", lambda e: e.file("audio.wav.gz"), r"it is gzip-compressed data"),
    Row("zip", lambda e: e.file("audio.zip"), r"it is a ZIP archive"),
    Row("file-over-max-bytes", lambda e: e.file("ok.wav"), r"too large: \d+ bytes, the limit is 1000 bytes",
        {"max_bytes": 1000}),
    Row("file-over-max-duration", lambda e: e.file("ok.wav"), r"2\.00 s long, longer than the 1 s limit",
        {"max_duration_s": 1}),
    Row("local-files-off", lambda e: e.file("ok.wav"), r"allow_local_files=False", {"allow_local_files": False}),
    # --- paths that are not audio files
    Row("directory", _dir, r"is a directory, not an audio file"),
    Row("dev-urandom", lambda e: "/dev/urandom", r"'/dev/urandom' is a character device, not a regular file"),
    Row("dev-null", lambda e: "/dev/null", r"is a character device"),
    Row("fifo", _fifo, r"is a named pipe \(FIFO\), not a regular file"),
    Row("socket-file", _socket_file, r"is a socket, not a regular file"),
    Row("missing", lambda e: e.folder / "nope.wav", r"audio file not found: '.*nope\.wav'"),
    Row("nul-in-path", lambda e: "a\0b.wav", r"contains a NUL character"),
    Row("empty-string", lambda e: "", r"empty string"),
    # --- bytes
    Row("empty-bytes", lambda e: b"", r"the audio bytes are empty \(0 bytes\)"),
    Row("empty-memoryview", lambda e: memoryview(b""), r"empty \(0 bytes\)"),
    Row("zero-bytes-bytes", lambda e: bytes(64), r"nothing but zero bytes"),
    Row("random-bytes-bytes", lambda e: hostile.random_bytes(), r"'<bytes>': not a supported audio format"),
    Row("truncated-wav-bytes", lambda e: e.bytes("truncated.wav"), r"the audio data is truncated"),
    Row("bytes-over-max-bytes", lambda e: e.bytes("ok.wav"), r"the audio data is too large.*limit is 100 bytes",
        {"max_bytes": 100}),
    Row("html-bytes", lambda e: hostile.HTML, r"it is an HTML page"),
    Row("bytearray-truncated-mp3", lambda e: bytearray(e.bytes("truncated.mp3")), r"is truncated"),
    # --- data: URIs
    Row("data-uri-bad-base64", lambda e: "data:audio/wav;base64,@@@not-base64@@@", r"not valid base64"),
    Row("data-uri-no-comma", lambda e: "data:audio/wav;base64", r"malformed data: URI"),
    Row("data-uri-empty", lambda e: "data:,", r"holds no data"),
    Row("data-uri-over-max-bytes", lambda e: f"data:audio/wav;base64,{_b64(e.bytes('ok.wav'))}", r"too large",
        {"max_bytes": 1000}),
    Row("data-uri-text", lambda e: "data:text/plain,hello%20world%20this%20is%20text", r"it is text, not audio"),
    Row("data-uri-truncated-wav", lambda e: f"data:audio/wav;base64,{_b64(e.bytes('truncated.wav'))}",
        r"the data: URI audio is truncated"),
    # --- arrays, tensors, other objects
    Row("empty-array", lambda e: np.zeros(0, np.float32), r"empty \(0 samples\)"),
    Row("nan-array", lambda e: np.array([0.0, np.nan, 0.1] * 100, np.float32), r"NaN or infinite"),
    Row("huge-float64", lambda e: np.array([0.0, 1e300]), r"NaN or infinite"),
    Row("3d-array", lambda e: np.zeros((1, 2, 100), np.float32), r"shape \(1, 2, 100\)"),
    Row("0d-array", lambda e: np.array(0.5, np.float32), r"shape \(\)"),
    Row("ambiguous-array", lambda e: np.zeros((4, 4), np.float32), r"ambiguous audio array shape"),
    Row("int64-array", lambda e: np.arange(10), r"unsupported audio sample type int64"),
    Row("complex-array", lambda e: np.zeros(10, np.complex64), r"unsupported audio sample type complex64"),
    Row("bool-array", lambda e: np.zeros(10, bool), r"unsupported audio sample type bool"),
    Row("object-array", lambda e: np.array([object(), 1], dtype=object), r"unsupported audio sample type object"),
    Row("str-array", lambda e: np.array(["a", "b"]), r"unsupported audio sample type <U1"),
    Row("complex-tensor", lambda e: torch.zeros(10, dtype=torch.complex64), r"unsupported audio sample type"),
    Row("meta-tensor", lambda e: torch.zeros(10, device="meta"), r"cannot read samples from this torch tensor"),
    Row("list", lambda e: [0.0, 0.1], r"cannot load audio from a list"),
    Row("dict", lambda e: {"path": "a.wav"}, r"cannot load audio from a dict"),
    Row("none", lambda e: None, r"cannot load audio from a NoneType"),
    Row("int", lambda e: 16000, r"cannot load audio from a int"),
    # --- keyword values
    Row("rate-negative", lambda e: np.zeros(100, np.float32), r"sampling_rate must be a positive number",
        {"sampling_rate": -16000}),
    Row("rate-nan", lambda e: np.zeros(100, np.float32), POSITIVE_RATE, {"sampling_rate": math.nan}),
    Row("rate-inf", lambda e: np.zeros(100, np.float32), POSITIVE_RATE, {"sampling_rate": math.inf}),
    Row("rate-bool", lambda e: np.zeros(100, np.float32), POSITIVE_RATE, {"sampling_rate": True}),
    Row("rate-str", lambda e: np.zeros(100, np.float32), POSITIVE_RATE, {"sampling_rate": "16k"}),
    Row("rate-1", lambda e: np.zeros(100, np.float32), r"sampling_rate of 1 Hz is outside", {"sampling_rate": 1}),
    Row("rate-2mhz", lambda e: np.zeros(100, np.float32), r"2000000 Hz is outside", {"sampling_rate": 2_000_000}),
    Row("target-rate-0", lambda e: np.zeros(100, np.float32), r"target_rate must be a positive", {"target_rate": 0}),
    Row("target-rate-100", lambda e: np.zeros(100, np.float32), r"target_rate of 100 Hz is outside",
        {"target_rate": 100}),
    Row("max-seconds-0", lambda e: np.zeros(100, np.float32), r"max_seconds must be a positive", {"max_seconds": 0},
        stream=False),
    Row("max-seconds-negative", lambda e: e.file("ok.wav"), r"max_seconds must be", {"max_seconds": -1}, stream=False),
    Row("max-seconds-nan", lambda e: e.file("ok.wav"), r"max_seconds must be", {"max_seconds": math.nan}, stream=False),
    Row("max-seconds-inf", lambda e: e.file("ok.wav"), r"max_seconds must be", {"max_seconds": math.inf}, stream=False),
    Row("max-seconds-bool", lambda e: e.file("ok.wav"), r"max_seconds must be", {"max_seconds": True}, stream=False),
    Row("max-bytes-0", lambda e: e.file("ok.wav"), r"max_bytes must be a positive whole number", {"max_bytes": 0}),
    Row("max-bytes-negative", lambda e: b"RIFF", r"max_bytes must be a positive", {"max_bytes": -5}),
    Row("max-bytes-float", lambda e: b"RIFF", r"max_bytes must be a positive", {"max_bytes": 1.5}),
    Row("max-bytes-bool", lambda e: b"RIFF", r"max_bytes must be a positive", {"max_bytes": True}),
    Row("deadline-0", lambda e: "http://example.com/a.wav", r"deadline_s must be a positive", {"deadline_s": 0}),
    Row("deadline-nan", lambda e: "http://example.com/a.wav", r"deadline_s must be", {"deadline_s": math.nan}),
    Row("max-redirects-negative", lambda e: "http://example.com/", r"max_redirects must be", {"max_redirects": -1}),
    Row("max-redirects-huge", lambda e: "http://example.com/", r"max_redirects must be", {"max_redirects": 10**6}),
    Row("private-network-str", lambda e: "http://example.com/", r"allow_private_network must be True or False",
        {"allow_private_network": "yes"}),
    Row("policy-not-a-policy", lambda e: b"RIFF", r"policy must be an af3\.fetch\.FetchPolicy", {"policy": "strict"}),
    Row("max-duration-negative", lambda e: b"RIFF", r"max_duration_s must be", {"max_duration_s": -1}),
    # --- URLs
    Row("file-url", lambda e: "file:///etc/passwd", r"unsupported URL scheme 'file://'"),
    Row("ftp-url", lambda e: "ftp://example.com/a.wav", r"unsupported URL scheme 'ftp://'"),
    Row("url-without-host", lambda e: "http:///a.wav", r"names no host"),
    Row("url-bad-port", lambda e: "http://example.com:99999/a.wav", r"invalid audio URL.*[Pp]ort"),
    Row("url-with-credentials", lambda e: "http://user:secret@example.com/a.wav", r"credentials in URLs"),
    Row("url-with-space", lambda e: "http://example.com/a b.wav", r"spaces or control characters"),
    Row("urls-off", lambda e: "http://example.com/a.wav", r"allow_urls=False", {"allow_urls": False}),
    Row("http-404", lambda e: f"{e.url}/status/404", r"HTTP 404", LOCAL),
    Row("http-500", lambda e: f"{e.url}/status/500", r"HTTP 500", LOCAL),
    Row("non-ascii-path-404", lambda e: f"{e.url}/dossier/écoute ça.wav".replace(" ", "%20"), r"HTTP 404", LOCAL),
    Row("endless-body", lambda e: f"{e.url}/endless", r"too large: more than 1000000 bytes",
        {**LOCAL, "max_bytes": 1_000_000}),
    Row("body-shorter-than-content-length", lambda e: f"{e.url}/short", r"was cut off: \d+ of the \d+ bytes", LOCAL),
    Row("body-longer-than-content-length", lambda e: f"{e.url}/long", r"longer than its Content-Length", LOCAL),
    Row("content-length-over-cap", lambda e: f"{e.url}/big", r"too large: 65536 bytes \(Content-Length\)",
        {**LOCAL, "max_bytes": 10_000}),
    Row("body-over-cap-without-length", lambda e: f"{e.url}/big-nocl", r"too large: more than 10000 bytes",
        {**LOCAL, "max_bytes": 10_000}),
    Row("redirect-loop", lambda e: f"{e.url}/loop", r"more than 5 redirects", LOCAL),
    Row("redirect-loop-max-1", lambda e: f"{e.url}/loop", r"more than 1 redirects", {**LOCAL, "max_redirects": 1}),
    Row("redirect-to-file", lambda e: f"{e.url}/redirect-file", r"refusing a redirect .* to non-http\(s\) 'file:",
        LOCAL),
    Row("redirect-without-location", lambda e: f"{e.url}/no-location", r"redirect without a Location", LOCAL),
    Row("empty-body", lambda e: f"{e.url}/empty", r"is empty \(0 bytes\)", LOCAL),
    Row("html-body", lambda e: f"{e.url}/html", r"it is an HTML page", LOCAL),
    Row("trickling-body", lambda e: f"{e.url}/trickle", r"timed out after 1 s", {**LOCAL, "deadline_s": 1}),
    Row("trickling-headers", lambda e: f"{e.url}/trickle-headers", r"timed out after 1 s", {**LOCAL, "deadline_s": 1}),
    Row("slow-to-headers", lambda e: f"{e.url}/slow-headers", r"timed out after 1 s", {**LOCAL, "deadline_s": 1}),
    Row("not-http", lambda e: f"{e.url}/garbage", r"not valid HTTP", LOCAL),
    Row("chunked-cut", lambda e: f"{e.url}/chunked-cut", r"could not download.*(closed|cut)", LOCAL),
    Row("https-to-http-server", lambda e: e.url.replace("http://", "https://") + "/ok.wav", r"TLS handshake failed",
        LOCAL),
    Row("connection-refused", _closed_port, r"connection was refused", {**LOCAL, "deadline_s": 5}),
    Row("default-refuses-loopback", lambda e: f"{e.url}/ok.wav", r"127\.0\.0\.1 is a loopback address"),
]


CASES = [(row, via) for row in ROWS for via in ("load", "stream") if via == "load" or row.stream]


@pytest.mark.parametrize(("row", "via"), CASES, ids=[f"{row.id}-{via}" for row, via in CASES])
def test_bad_input_is_an_audio_error_naming_the_problem(env, row, via):
    source = row.source(env)
    start = time.monotonic()
    with pytest.raises(AudioError, match=row.pattern) as info:
        if via == "load":
            load_audio(source, **row.kwargs)
        else:
            with open_audio(source, **row.kwargs) as audio:
                for _ in audio.blocks(0.25):
                    pass
    message = str(info.value)
    assert "\n" not in message and len(message) < 500, message
    assert time.monotonic() - start < 10


def test_the_table_is_large_enough():
    assert len(ROWS) >= 60


# ----------------------------------------------------------------------------------------------------------
# private networks


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/a.wav", "http://127.1.2.3:8080/a.wav", "http://localhost/a.wav", "http://[::1]/a.wav",
    "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/a.wav", "http://172.16.0.1/a.wav",
    "http://192.168.1.1/a.wav", "http://[fe80::1]/a.wav", "http://[fc00::1]/a.wav", "http://0.0.0.0/a.wav",
    "http://100.64.0.1/a.wav", "http://224.0.0.1/a.wav", "http://[::ffff:127.0.0.1]/a.wav",
    "https://[::ffff:10.0.0.1]/a.wav", "http://[64:ff9b::a9fe:a9fe]/a.wav", "http://[2002:7f00:1::]/a.wav",
    "http://2130706433/a.wav",
])
def test_default_policy_refuses_private_addresses_without_connecting(monkeypatch, url):
    def no_connect(*args, **kwargs):
        raise AssertionError("a connection was opened")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    monkeypatch.setattr(socket, "create_connection", no_connect)
    with pytest.raises(AudioError, match=r"refusing to download audio from .* is (a|the) .*address.*"
                                         r"allow_private_network=True"):
        load_audio(url)


def _fake_dns(mapping: dict[str, list[str]]):
    real = socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if host in mapping:
            return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "",
                     (a, port) if ":" not in a else (a, port, 0, 0)) for a in mapping[host]]
        return real(host, port, *args, **kwargs)

    return getaddrinfo


@pytest.mark.parametrize("addresses", [["127.0.0.1"], ["93.184.216.34", "10.0.0.5"], ["2606:4700::1", "::1"],
                                       ["169.254.169.254"]])
def test_a_name_is_refused_if_any_of_its_addresses_is_private(monkeypatch, addresses):
    monkeypatch.setattr(socket, "getaddrinfo", _fake_dns({"audio.example": addresses}))
    monkeypatch.setattr(socket.socket, "connect", lambda *a: (_ for _ in ()).throw(AssertionError("connected")))
    bad = next(a for a in addresses if fetch.blocked_reason(ipaddress.ip_address(a)))
    with pytest.raises(AudioError, match=rf"'audio\.example' resolves to {bad}, which is"):
        load_audio("http://audio.example/a.wav")


def test_the_checked_address_is_the_one_connected_to(monkeypatch, env):
    """DNS rebinding: the name is resolved once; the connection goes to that address whatever the resolver
    says next."""
    answers = iter([["127.0.0.1"], ["203.0.113.9"]])
    real = socket.getaddrinfo
    calls = []

    def getaddrinfo(host, port, *args, **kwargs):
        if host == "rebind.example":
            calls.append(host)
            return _fake_dns({host: next(answers)})(host, port)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    port = env.url.rsplit(":", 1)[1]
    got = load_audio(f"http://rebind.example:{port}/ok.wav", **LOCAL)
    assert len(got) == 16000 and calls == ["rebind.example"]


def test_redirect_to_a_private_address_is_refused(monkeypatch, env):
    real = fetch.blocked_reason
    monkeypatch.setattr(fetch, "blocked_reason", lambda ip: None if str(ip) == "127.0.0.1" else real(ip))
    assert len(load_audio(f"{env.url}/ok.wav")) == 16000  # the test server now counts as public
    with pytest.raises(AudioError, match=r"169\.254\.169\.254 is a link-local address \(the cloud metadata"):
        load_audio(f"{env.url}/redirect-private")
    with pytest.raises(AudioError, match=r"10\.0\.0\.1 is a private address"):
        load_audio(f"{env.url}/redirect-ten")


def test_good_downloads_still_work(env):
    expected = load_audio(hostile.wav_bytes(hostile.tone(1.0)))
    for path in ("/ok.wav", "/chunked", "/redirect/ok.wav"):
        np.testing.assert_array_equal(load_audio(f"{env.url}{path}", **LOCAL), expected)
    policy = FetchPolicy(allow_private_network=True, max_bytes=1 << 20, deadline_s=10)
    np.testing.assert_array_equal(load_audio(f"{env.url}/ok.wav", policy=policy), expected)
    with open_audio(f"{env.url}/ok.wav", policy=policy) as audio:
        np.testing.assert_array_equal(np.concatenate(list(audio.blocks(0.3))), expected)


@pytest.mark.parametrize("path", ["/trickle", "/trickle-headers", "/slow-headers"])
def test_the_deadline_holds_against_trickling_servers(env, path):
    start = time.monotonic()
    with pytest.raises(AudioError, match="timed out"):
        load_audio(f"{env.url}{path}", deadline_s=0.8, **LOCAL)
    assert time.monotonic() - start < 2.5


def test_an_endless_body_costs_at_most_the_cap(env):
    start = time.monotonic()
    with pytest.raises(AudioError, match="too large"):
        load_audio(f"{env.url}/endless", max_bytes=5 << 20, **LOCAL)
    assert time.monotonic() - start < 10


def test_policy_defaults_live_in_one_place():
    p = FetchPolicy()
    assert (p.max_bytes, p.deadline_s, p.allow_private_network, p.max_redirects) == (100 << 20, 60.0, False, 5)
    assert p == fetch.DEFAULT_POLICY
    assert p.with_overrides(max_bytes=None, deadline_s=5).deadline_s == 5
    assert FetchPolicy(deadline_s=math.inf).deadline_s is None
    with pytest.raises(AttributeError):
        p.max_bytes = 1  # frozen


# ----------------------------------------------------------------------------------------------------------
# damage that leaves the audio usable: warnings, not silence


def test_riff_size_larger_than_the_file_warns(tmp_path, caplog):
    path = hostile.file_of(tmp_path / "riff.wav", hostile.wav_with_riff_size(10**6))
    with caplog.at_level(logging.WARNING, logger="af3"):
        got = load_audio(path)
    assert len(got) == 32000
    assert "RIFF header promises 1000008 bytes" in caplog.text


def test_stream_written_files_without_a_length_are_read_to_the_end(tmp_path):
    for size in (0, 0xFFFFFFFF):
        path = hostile.file_of(tmp_path / f"pipe{size}.wav", hostile.wav_with_data_size(size))
        np.testing.assert_allclose(load_audio(path), hostile.tone(2.0), atol=1e-4)
    path = hostile.file_of(tmp_path / "stream.flac", hostile.flac_without_total())
    np.testing.assert_allclose(load_audio(path), hostile.tone(2.0), atol=1e-4)
    with open_audio(path) as audio:
        assert audio.duration is None
        np.testing.assert_allclose(np.concatenate(list(audio.blocks(0.5))), hostile.tone(2.0), atol=1e-4)


def test_ogg_without_end_of_stream_warns(tmp_path, caplog):
    path = hostile.file_of(tmp_path / "cut.ogg", hostile.ogg_without_eos())
    with caplog.at_level(logging.WARNING, logger="af3"):
        got = load_audio(path)
    assert len(got) > 16000
    assert "end-of-stream" in caplog.text


def test_a_few_undecodable_packets_warn(tmp_path, caplog):
    data = hostile.corrupt_middle(hostile.pyav_encoded(4.0, "aac", "mp4", 44100), span=300, seed=1)
    path = hostile.file_of(tmp_path / "glitch.m4a", data)
    with caplog.at_level(logging.WARNING, logger="af3"):
        got = load_audio(path)
    assert abs(len(got) - 64000) < 2000
    assert "packets could not be decoded" in caplog.text and "glitch.m4a" in caplog.text


def test_streaming_raises_where_the_damage_is(tmp_path):
    path = hostile.file_of(tmp_path / "cut.wav", hostile.truncated_wav(4.0, 0.5))
    got = []
    with pytest.raises(AudioError, match="truncated"), open_audio(path) as audio:
        for block in audio.blocks(0.5):
            got.append(block)
    assert [len(b) for b in got] == [8000] * 3  # the full blocks of the two seconds that are there came first


# ----------------------------------------------------------------------------------------------------------
# libmpg123's notes on fd 2


def test_mp3_decoder_notes_never_reach_stderr(tmp_path, capfd):
    path = hostile.file_of(tmp_path / "bad.mp3", hostile.corrupted_mp3())
    before = os.fstat(2)
    with pytest.raises(AudioError, match="damaged"):
        load_audio(path)
    with pytest.raises(AudioError, match="not a supported audio format"):
        load_audio(b"hello, this is not an mp3 at all \x00\x01" * 40)
    after = os.fstat(2)
    assert (before.st_ino, before.st_dev) == (after.st_ino, after.st_dev)  # fd 2 is restored
    err = capfd.readouterr().err
    assert "Note:" not in err and "resync" not in err, err


def test_fd2_capture_is_safe_from_several_threads(tmp_path, capfd):
    bad = hostile.file_of(tmp_path / "bad.mp3", hostile.corrupted_mp3())
    good = hostile.file_of(tmp_path / "good.mp3", hostile.mp3_bytes(1.0))
    errors: list[BaseException] = []
    results: list[int] = []

    def work(i: int) -> None:
        try:
            for _ in range(3):
                if i % 2:
                    results.append(len(load_audio(good)))
                else:
                    with pytest.raises(AudioError):
                        load_audio(bad)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == [16000] * 9
    print("written to stderr after the captures", file=sys.stderr)
    err = capfd.readouterr().err
    assert "Note:" not in err and "written to stderr after the captures" in err


# ----------------------------------------------------------------------------------------------------------
# mutation fuzzing: whatever the bytes, an AudioError or audio, never another exception


def _mutants(seed: int, count: int):
    rng = np.random.default_rng(seed)
    originals = [hostile.wav_bytes(hostile.tone(0.5, channels=2)),
                 hostile.wav_bytes(hostile.tone(0.5, channels=2), fmt="FLAC", subtype="PCM_16"),
                 hostile.mp3_bytes(0.5),
                 hostile.wav_bytes(hostile.tone(0.5), fmt="AIFF", subtype="PCM_16"),
                 hostile.pyav_encoded(0.5, "aac", "mp4", 44100),
                 hostile.pyav_encoded(0.5, "libopus", "webm")]
    for i in range(count):
        b = bytearray(originals[i % len(originals)])
        op = i % 3
        if op == 0:
            b = b[: int(rng.integers(1, len(b)))]
        elif op == 1:
            for _ in range(int(rng.integers(1, 20))):
                b[int(rng.integers(0, len(b)))] = int(rng.integers(0, 256))
        else:
            p = int(rng.integers(0, min(200, len(b))))
            b[p : p + 4] = rng.integers(0, 256, 4, np.uint8).tobytes()
        yield bytes(b)


@pytest.mark.parametrize("seed", [0, 1])
def test_mutated_files_give_audio_or_an_audio_error(seed, caplog):
    outcomes = {"ok": 0, "error": 0}
    for data in _mutants(seed, 120):
        try:
            y = load_audio(data, max_seconds=0.3 if seed else None)
            assert y.dtype == np.float32 and y.ndim == 1 and len(y) > 0 and np.isfinite(y).all()
            outcomes["ok"] += 1
        except AudioError as e:
            assert "\n" not in str(e)
            outcomes["error"] += 1
    assert outcomes["ok"] and outcomes["error"]
