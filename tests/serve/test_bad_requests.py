"""Nothing a client sends crashes `af3 serve` or gets an answer it should not: every bad request is a JSON error in
OpenAI's shape with its status, and the server answers a normal request correctly afterwards. Also: the API key,
the queue bound (429), the request timeout (504), a client that leaves mid-stream (its slot is freed), URL fetching
(no private addresses, no redirects into them) and file:// paths (only below the allowed folder)."""

from __future__ import annotations

import http.server
import json
import os
import threading
import time

import httpx
import numpy as np
import pytest
from server_helpers import MODEL, ask, audio_part, b64, clip_b64, metric, running_server, wav_bytes

GOOD = {"model": MODEL, "messages": ask(audio_part(None))}  # the audio filled in per row below
LONG = 5.0  # seconds of audio in a slow request (its 20000 new tokens take far longer than any timeout below)


def chat(**changes):
    body = {"model": MODEL, "messages": ask(audio_part(clip_b64())), "max_tokens": 8, "temperature": 0}
    body.update(changes)
    return body


def noise(seconds: float) -> str:
    return b64(wav_bytes((0.1 * np.random.default_rng(0).standard_normal(int(seconds * 16000))).astype(np.float32)))


def quiet_flac(seconds: float) -> str:
    """A long recording in few bytes (FLAC of near-silence), to hit the length limit under the byte limit."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.zeros(int(seconds * 16000), np.int16), 16000, format="FLAC", subtype="PCM_16")
    return b64(buf.getvalue())


def nan_wav() -> str:
    import io

    import soundfile as sf

    x = np.zeros(1600, np.float32)
    x[10] = np.nan
    buf = io.BytesIO()
    sf.write(buf, x, 16000, format="WAV", subtype="FLOAT")
    return b64(buf.getvalue())


JSON = {"content-type": "application/json"}

# (name, how to send it, status, message pattern)
ROWS = [
    ("malformed JSON", {"content": b'{"model": "af3-tiny", "messages": [', "headers": JSON}, 400, r"not valid JSON"),
    ("not JSON at all", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415,
     r"send the request as JSON"),
    ("JSON that is a list", {"json": [1, 2]}, 400, r"."),
    ("no messages", {"json": {"model": MODEL}}, 400, r"messages is required"),
    ("empty messages", {"json": {"model": MODEL, "messages": []}}, 400, r"messages"),
    ("no model", {"json": {"messages": ask(audio_part(clip_b64()))}}, 400, r"model is required"),
    ("unknown model", {"json": chat(model="gpt-4o")}, 404, r"the model 'gpt-4o' does not exist"),
    ("max_tokens as a string", {"json": chat(max_tokens="7")}, 400, r"max_tokens"),
    ("temperature as a string", {"json": chat(temperature="hot")}, 400, r"temperature"),
    ("stream as a number", {"json": chat(stream=1)}, 400, r"stream"),
    ("negative max_tokens", {"json": chat(max_tokens=-3)}, 400, r"max_tokens must be between 1 and"),
    ("huge max_tokens", {"json": chat(max_tokens=10**9)}, 400, r"max_tokens must be between 1 and"),
    ("negative temperature", {"json": chat(temperature=-1)}, 400, r"temperature must be in"),
    ("top_p above one", {"json": chat(top_p=2)}, 400, r"top_p must be in"),
    ("n of zero", {"json": chat(n=0)}, 400, r"n must be between 1 and 8"),
    ("n of a hundred", {"json": chat(n=100)}, 400, r"n must be between 1 and 8"),
    ("top_logprobs without logprobs", {"json": chat(top_logprobs=2)}, 400, r"top_logprobs needs logprobs"),
    ("too many top_logprobs", {"json": chat(logprobs=True, top_logprobs=50)}, 400, r"top_logprobs must be between"),
    ("frequency penalty", {"json": chat(frequency_penalty=0.5)}, 400, r"frequency_penalty is not supported"),
    ("empty stop string", {"json": chat(stop=[""])}, 400, r"stop strings must be non-empty"),
    ("seed beyond 64 bits", {"json": chat(seed=2**70)}, 400, r"seed"),
    ("schema that does not compile", {"json": chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}})}, 400, r"unsupported or invalid JSON schema"),
    ("unknown response format", {"json": chat(response_format={"type": "yaml"})}, 400, r"response_format"),
    ("unknown role", {"json": chat(messages=[{"role": "wizard", "content": "hi"}])}, 400, r"role 'wizard'"),
    ("tool role", {"json": chat(messages=[{"role": "tool", "content": "x"}])}, 400, r"role 'tool'"),
    ("content a number", {"json": chat(messages=[{"role": "user", "content": 5}])}, 400, r"content must be"),
    ("image part", {"json": chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://x/y.png"}}]}])}, 400, r"unsupported part type 'image_url'"),
    ("audio in an assistant message", {"json": chat(messages=[*ask(audio_part(clip_b64())), {
        "role": "assistant", "content": [audio_part(clip_b64())]}])}, 400, r"audio goes in user messages"),
    ("only an assistant message", {"json": chat(messages=[{"role": "assistant", "content": "hi"}])}, 400,
     r"no user message"),
    ("nine audios", {"json": chat(messages=ask(*[audio_part(clip_b64())] * 9))}, 400, r"at most 8 per request"),
    ("base64 that is not base64", {"json": chat(messages=ask(audio_part("@@@not base64@@@")))}, 400,
     r"not valid base64"),
    ("base64 that is not audio", {"json": chat(messages=ask(audio_part(b64(b"<html>hello</html>" * 20))))}, 400,
     r"HTML page"),
    ("empty audio", {"json": chat(messages=ask(audio_part("")))}, 400, r"empty"),
    ("truncated audio", {"json": chat(messages=ask(audio_part(b64(wav_bytes(np.zeros(32000, np.float32))[:20000]))))},
     400, r"truncated"),
    ("NaN audio", {"json": chat(messages=ask(audio_part(nan_wav())))}, 400, r"NaN"),
    ("audio longer than ten minutes", {"json": chat(messages=ask(audio_part(quiet_flac(601.0), fmt="flac")))}, 400,
     r"longer than 600 s"),
    ("unknown audio format", {"json": chat(messages=ask(audio_part(clip_b64(), fmt="exe")))}, 415,
     r"not an audio format"),
    ("data URL of text", {"json": chat(messages=ask({"type": "audio_url", "audio_url": {
        "url": "data:text/plain;base64," + clip_b64()}}))}, 415, r"says 'text/plain'"),
    ("data URL without a comma", {"json": chat(messages=ask({"type": "audio_url", "audio_url": {
        "url": "data:audio/wav;base64"}}))}, 400, r"malformed data: URL"),
    ("http URL while fetching is off", {"json": chat(messages=ask({"type": "audio_url", "audio_url": {
        "url": "http://example.com/a.wav"}}))}, 400, r"does not fetch audio URLs"),
    ("file URL while local media is off", {"json": chat(messages=ask({"type": "audio_url", "audio_url": {
        "url": "file:///etc/passwd"}}))}, 400, r"file:// URLs are not allowed"),
    ("ftp URL", {"json": chat(messages=ask({"audio_url": "ftp://example.com/a.wav"}))}, 400,
     r"unsupported URL scheme"),
    ("unknown uuid", {"json": chat(messages=ask(audio_part(None, uuid="never-sent")))}, 400,
     r"unknown audio uuid 'never-sent'"),
    ("audio part with nothing", {"json": chat(messages=ask(audio_part(None)))}, 400, r"the audio part has no data"),
    ("uuid that is not a string", {"json": chat(messages=ask(audio_part(clip_b64(), uuid=5)))}, 400, r"uuid"),
    ("body over the limit", {"content": b"x" * (5 * 1024 * 1024), "headers": JSON}, 413, r"larger than this server's"),
    ("base64 audio over the limit", {"json": chat(messages=ask(audio_part("A" * (3 * 1024 * 1024))))}, 413,
     r"larger than this server's|more than this server's"),
]

TRANSCRIPTION_ROWS = [
    ("no file", {"data": {"model": MODEL}, "files": {"other": ("x", b"x")}}, 400, r"file is required"),
    ("not multipart", {"json": {"model": MODEL}}, 415, r"multipart/form-data"),
    ("unknown model", {"data": {"model": "whisper-1"}}, 404, r"does not exist"),
    ("no model", {"data": {}}, 400, r"model is required"),
    ("unknown format", {"data": {"model": MODEL, "response_format": "docx"}}, 400, r"response_format must be one"),
    ("word timestamps", {"data": {"model": MODEL, "timestamp_granularities[]": "word"}}, 400,
     r"word timestamps are not supported"),
    ("temperature as text", {"data": {"model": MODEL, "temperature": "warm"}}, 400, r"temperature must be a number"),
    ("temperature of NaN", {"data": {"model": MODEL, "temperature": "nan"}}, 400, r"finite number"),
    ("stream of maybe", {"data": {"model": MODEL, "stream": "maybe"}}, 400, r"stream must be true or false"),
    ("a text file", {"data": {"model": MODEL}, "files": {"file": ("a.wav", b"just some text\n" * 50)}}, 400,
     r"text"),
    ("an empty file", {"data": {"model": MODEL}, "files": {"file": ("a.wav", b"")}}, 400, r"empty"),
]


@pytest.fixture(scope="module")
def url():
    with running_server("--max-upload-mb", "2", "--max-batch-size", "2") as base:
        yield base


def send(url: str, path: str, how: dict) -> httpx.Response:
    return httpx.post(url + path, timeout=120, **how)


@pytest.mark.parametrize(("name", "how", "status", "pattern"), ROWS, ids=[r[0] for r in ROWS])
def test_a_bad_chat_request_is_an_openai_error(url, name, how, status, pattern):
    r = send(url, "/v1/chat/completions", how)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and "Traceback" not in r.text
    assert __import__("re").search(pattern, error["message"]), error["message"]


@pytest.mark.parametrize(("name", "how", "status", "pattern"), TRANSCRIPTION_ROWS,
                         ids=[r[0] for r in TRANSCRIPTION_ROWS])
def test_a_bad_transcription_request_is_an_openai_error(url, name, how, status, pattern):
    if "files" not in how and "json" not in how:
        how = {**how, "files": {"file": ("clip.wav", wav_bytes(np.zeros(16000, np.float32)))}}
    r = send(url, "/v1/audio/transcriptions", how)
    assert r.status_code == status, r.text
    assert __import__("re").search(pattern, r.json()["error"]["message"]), r.text


def test_after_every_bad_request_a_normal_one_is_answered(url):
    r = send(url, "/v1/chat/completions", {"json": chat(max_tokens=24)})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "There are three beeps."
    assert metric(url, "af3_requests_in_progress") == 0
    assert metric(url, 'af3_http_requests_total{route="/v1/chat/completions",status="500"}') == 0


def test_an_error_after_the_stream_started_is_an_event_then_done(url):
    with httpx.stream("POST", url + "/v1/chat/completions", json=chat(stream=True, messages=ask(audio_part(
            None, uuid="gone"))), timeout=60) as r:
        assert r.status_code == 400  # found before the stream starts: a plain error
    lines = []
    with httpx.stream("POST", url + "/v1/chat/completions", json=chat(stream=True, max_tokens=4), timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


# ---------------------------------------------------------------------------------------------- the API key
def test_the_api_key_guards_the_api_but_not_health():
    with running_server(env={"AF3_API_KEY": "s3cret"}) as base:
        assert httpx.get(base + "/health").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.get(base + "/v1/models", headers=headers)
            assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
            assert httpx.post(base + "/v1/chat/completions", json=chat(), headers=headers).status_code == 401
        assert httpx.get(base + "/metrics").status_code == 401
        ok = {"Authorization": "Bearer s3cret"}
        assert httpx.get(base + "/v1/models", headers=ok).status_code == 200
        r = httpx.post(base + "/v1/chat/completions", json=chat(max_tokens=24), headers=ok, timeout=60)
        assert r.json()["choices"][0]["message"]["content"] == "There are three beeps."


# ---------------------------------------------------------------------------------------------- load and time
def slow(**changes):
    return chat(messages=ask(audio_part(noise(LONG))), max_tokens=20000, min_tokens=20000, **changes)


def test_a_full_queue_answers_429_and_a_timeout_504_and_the_slots_come_back():
    with running_server("--max-batch-size", "1", "--max-queue", "0", "--request-timeout", "2") as base:
        started = threading.Event()
        results = {}

        def first():
            started.set()
            results["first"] = httpx.post(base + "/v1/chat/completions", json=slow(), timeout=60)

        t = threading.Thread(target=first)
        t.start()
        started.wait()
        deadline = time.monotonic() + 30
        while metric(base, "af3_requests_in_progress") < 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        busy = httpx.post(base + "/v1/chat/completions", json=chat(), timeout=60)
        assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["type"] == "rate_limit_error"
        t.join()
        assert results["first"].status_code == 504 and "limit and was cancelled" in results["first"].text
        assert metric(base, "af3_requests_in_progress") == 0 and metric(base, "af3_batch_running") == 0
        r = httpx.post(base + "/v1/chat/completions", json=chat(max_tokens=24), timeout=60)
        assert r.json()["choices"][0]["message"]["content"] == "There are three beeps."


def test_a_client_that_leaves_mid_stream_frees_its_slot(url):
    with httpx.stream("POST", url + "/v1/chat/completions", json=slow(stream=True), timeout=60) as r:
        for line in r.iter_lines():
            if '"content"' in line:
                break  # one piece of text arrived: leave
    deadline = time.monotonic() + 20
    while (metric(url, "af3_batch_running") or metric(url, "af3_requests_in_progress")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(url, "af3_batch_running") == 0 and metric(url, "af3_requests_in_progress") == 0
    assert metric(url, "af3_requests_cancelled_total") >= 1


def test_a_client_that_leaves_a_plain_request_frees_its_slot(url):
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", json=slow(), timeout=httpx.Timeout(60, read=2.0))
    deadline = time.monotonic() + 20
    while metric(url, "af3_requests_in_progress") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(url, "af3_requests_in_progress") == 0 and metric(url, "af3_batch_running") == 0


# ---------------------------------------------------------------------------------------------- URLs and files
class _Handler(http.server.BaseHTTPRequestHandler):
    clip = b""

    def do_GET(self):  # noqa: N802 (http.server's name)
        routes = {"/clip.wav": (200, self.clip, {}), "/to-private": (302, b"", {"Location": "http://10.0.0.1/a.wav"}),
                  "/to-metadata": (302, b"", {"Location": "http://169.254.169.254/latest/meta-data"}),
                  "/to-self": (302, b"", {"Location": "/clip.wav"})}
        status, data, headers = routes.get(self.path, (404, b"", {}))
        self.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def media_server():
    with open(__import__("server_helpers").CLIP, "rb") as f:
        _Handler.clip = f.read()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def url_chat(url: str) -> dict:
    return chat(messages=ask({"type": "audio_url", "audio_url": {"url": url}}), max_tokens=24)


def test_url_fetching_reaches_only_the_allowed_origin_and_never_private_addresses(media_server):
    with running_server("--allow-url-fetch", "--allow-url-origin", media_server) as base:
        ok = httpx.post(base + "/v1/chat/completions", json=url_chat(f"http://{media_server}/clip.wav"), timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "There are three beeps."
        redirected = httpx.post(base + "/v1/chat/completions", json=url_chat(f"http://{media_server}/to-self"),
                                timeout=60)
        assert redirected.status_code == 200
        port = media_server.rsplit(":", 1)[1]
        refused = {
            "http://127.0.0.1:9/a.wav": r"127\.0\.0\.1 is a loopback address",
            "http://10.1.2.3/a.wav": r"10\.1\.2\.3 is a private address",
            "http://169.254.169.254/latest/meta-data": r"link-local address \(the cloud metadata service\)",
            "http://[::1]/a.wav": r"::1 is a loopback address",
            f"http://localhost:{port}/clip.wav": r"resolves to (127\.0\.0\.1|::1), which is a loopback address",
            f"http://{media_server}/to-private": r"10\.0\.0\.1 is a private address",
            f"http://{media_server}/to-metadata": r"cloud metadata service",
        }
        for target, pattern in refused.items():
            r = httpx.post(base + "/v1/chat/completions", json=url_chat(target), timeout=60)
            assert r.status_code == 400, (target, r.text)
            assert __import__("re").search(pattern, r.json()["error"]["message"]), (target, r.text)


def test_file_urls_only_below_the_allowed_folder(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    with open(__import__("server_helpers").CLIP, "rb") as f:
        (allowed / "clip.wav").write_bytes(f.read())
    (tmp_path / "secret.wav").write_bytes((allowed / "clip.wav").read_bytes())
    os.symlink(tmp_path / "secret.wav", allowed / "link.wav")
    with running_server("--allowed-local-media-path", str(allowed)) as base:
        ok = httpx.post(base + "/v1/chat/completions", json=url_chat(f"file://{allowed}/clip.wav"), timeout=60)
        assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "There are three beeps."
        for target in (f"file://{tmp_path}/secret.wav", f"file://{allowed}/../secret.wav", f"file://{allowed}/link.wav",
                       "file:///etc/passwd", "file://otherhost/etc/passwd"):
            r = httpx.post(base + "/v1/chat/completions", json=url_chat(target), timeout=60)
            assert r.status_code == 400, (target, r.text)
            assert "outside the allowed local media folder" in r.text or "must name a local path" in r.text, r.text
        missing = httpx.post(base + "/v1/chat/completions", json=url_chat(f"file://{allowed}/nope.wav"), timeout=60)
        assert missing.status_code == 400 and "not found" in missing.json()["error"]["message"]


def test_the_rows_are_many():
    assert len(ROWS) + len(TRANSCRIPTION_ROWS) >= 55 and json.dumps(GOOD)


def test_ctrl_c_lets_the_requests_in_flight_finish_then_exits_cleanly():
    import signal
    import subprocess
    import sys

    from server_helpers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "af3.cli", "serve", "--port", str(port)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        lines = []
        body = chat(messages=ask(audio_part(noise(LONG))), max_tokens=300, min_tokens=300, stream=True)
        with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if '"content"' in line and not lines:
                    proc.send_signal(signal.SIGINT)  # mid-answer
                if line:
                    lines.append(line)
        assert lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2]
        assert proc.wait(timeout=60) == 0
        log = proc.stdout.read()
        assert f"http://127.0.0.1:{port}" in log and "Traceback" not in log  # the URL was logged at start-up
    finally:
        if proc.poll() is None:
            proc.kill()
