"""The web page (``src/af3/serve/web``) in a real browser against a real ``af3 serve``.

One server (the embedded tiny model) and one headless Chromium serve every test of this module. The browser is
Debian's ``/usr/bin/chromium`` driven by Playwright for Python (``playwright install`` is never used: it downloads
browsers). ``make install-test`` installs chromium where apt-get is usable as root; where it is not, these tests
skip and say so. Chromium's fake media-stream flags give the page a microphone (a test tone) without a prompt.

Run alone: ``.venv/bin/python -m pytest -q tests/serve/test_web.py`` (screenshots go to each test's tmp_path; set
``AF3_WEB_SCREENSHOTS=/some/folder`` to keep copies).
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from importlib import resources
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api", reason="the web page tests need Playwright for Python "
                               "(pip install playwright; the browser is Debian's chromium, not a download)")
expect = sync_api.expect

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    # without these three, Chromium's own background connections are refused by a closed network and it stalls
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    # a microphone for MediaRecorder: a fake device, allowed without a permission prompt
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
]
CLIP = Path(str(resources.files("af3") / "assets" / "clips" / "three_beeps.wav"))
QUESTION = "How many beeps do you hear?"
STARTUP_S = 120
MODEL_MS = 120_000  # a reply or a transcription on a busy CPU
UI_MS = 10_000


# ------------------------------------------------------------------------------------------------ helpers
def _chromium() -> str:
    """Debian's chromium: installed here if it is missing and apt-get is usable as root; else the tests skip."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    is_root = getattr(os, "geteuid", lambda: -1)() == 0
    if shutil.which("apt-get") and is_root:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "chromium"]):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600,
                               check=False)
            if os.path.exists(CHROMIUM):
                return CHROMIUM
        pytest.skip(f"{CHROMIUM} is missing and `apt-get install chromium` did not install it (offline?): "
                    "the web page tests need Debian's chromium")
    pytest.skip(f"{CHROMIUM} is missing and cannot be installed here (apt-get needs root): run "
                "`apt-get install chromium` (or `make install-test` as root) for the web page tests")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, chars: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=20)


def _keep(path: Path) -> None:
    """Copy a screenshot to $AF3_WEB_SCREENSHOTS when it is set (for a person to look at)."""
    folder = os.environ.get("AF3_WEB_SCREENSHOTS")
    if folder:
        os.makedirs(folder, exist_ok=True)
        shutil.copy(path, Path(folder) / path.name)


def _shot(page, tmp_path: Path, name: str) -> Path:
    path = tmp_path / f"{name}.png"
    page.screenshot(path=str(path), animations="disabled")
    assert path.stat().st_size > 0
    _keep(path)
    return path


def _setting(page, selector: str, value: str) -> None:
    """Type a value into the settings panel (opening it first where a narrow window hides it)."""
    if not page.locator("#settings").is_visible():
        page.click("#settings-toggle")
    page.fill(selector, value)


def _attach_clip(page) -> None:
    page.set_input_files("#file-input", str(CLIP))
    expect(page.locator("#attachments .clip audio")).to_have_count(1, timeout=UI_MS)


def _no_page_errors(page) -> None:
    assert page.js_errors == [], f"the page threw: {page.js_errors}"


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def chromium_path() -> str:
    return _chromium()


@pytest.fixture(scope="module")
def server(tmp_path_factory, chromium_path):
    """A real `af3 serve` (embedded tiny model) on a free port; its base URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("serve") / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("AF3_API_KEY", None)  # the page is tested without a key
    cmd = [sys.executable, "-m", "af3.cli", "serve", "--port", str(port), "--host", "127.0.0.1"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`{' '.join(cmd[1:])}` exited with {proc.returncode} before answering /health:\n"
                            f"{_log_tail(log)}")
            with contextlib.suppress(OSError, urllib.error.URLError), \
                    urllib.request.urlopen(base + "/health", timeout=2) as r:
                if r.status == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"`af3 serve` did not answer GET /health with 200 within {STARTUP_S} s:\n"
                            f"{_log_tail(log)}")
            time.sleep(0.5)
        yield base
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def browser(chromium_path):
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, args=BROWSER_ARGS)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, server):
    """A fresh browser context (empty localStorage) with the page loaded and its model list filled."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    context.set_default_timeout(UI_MS)
    pg = context.new_page()
    pg.js_errors = []
    pg.on("pageerror", lambda e: pg.js_errors.append(str(e)))
    pg.goto(server + "/")
    expect(pg.locator("body")).to_have_attribute("data-models", "loaded", timeout=UI_MS)
    expect(pg.locator("#model option[value='af3-tiny']")).to_have_count(1)
    try:
        yield pg
    finally:
        context.close()


# ------------------------------------------------------------------------------------------------ tests
def test_page_basics(page, tmp_path):
    """Empty state, the model list, think mode off for a model without the adapter, drag and drop, New chat."""
    expect(page.locator("#empty-state")).to_be_visible()
    expect(page.locator("#error-banner")).to_be_hidden()
    expect(page.locator("#server-status")).to_have_attribute("data-state", "ok")
    _shot(page, tmp_path, "empty")

    # the tiny model has no thinking adapter: the switch is disabled and says why
    expect(page.locator("#think")).to_be_disabled()
    assert "no thinking adapter" in (page.get_attribute("#think-wrap", "title") or "")

    # a file dropped on the page becomes an attachment with a player; it can be removed again
    data = base64.b64encode(CLIP.read_bytes()).decode()
    page.evaluate("""(b64) => {
        const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
        const dt = new DataTransfer();
        dt.items.add(new File([bytes], "dropped.wav", { type: "audio/wav" }));
        for (const type of ["dragenter", "dragover", "drop"]) {
            document.querySelector("#log").dispatchEvent(
                new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
        }
    }""", data)
    clip = page.locator("#attachments .clip")
    expect(clip).to_have_count(1)
    expect(clip.locator("audio")).to_have_count(1)
    expect(clip.locator(".clip-name")).to_have_text("dropped.wav")
    expect(page.locator("#drop-overlay")).to_be_hidden()
    clip.locator(".clip-remove").click()
    expect(clip).to_have_count(0)

    # New chat empties the conversation
    page.fill("#prompt", "Hello")
    page.click("#send")
    expect(page.locator(".msg.assistant")).to_have_count(1)
    expect(page.locator(".msg.assistant").last).to_have_attribute("data-state", re.compile("done|error"),
                                                                     timeout=MODEL_MS)
    page.click("#new-chat")
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#empty-state")).to_be_visible()
    _no_page_errors(page)


def test_ask_about_the_bundled_clip(page, tmp_path):
    """Upload the clip, ask, watch the reply stream in; a second turn names the clip by uuid (no re-upload)."""
    _setting(page, "#temperature", "0")
    _attach_clip(page)
    page.fill("#prompt", QUESTION)
    # The tiny model can answer before a check could look: record whether the send button was ever disabled.
    page.evaluate("""() => { const b = document.querySelector('#send'); window.__sendWasDisabled = false;
        new MutationObserver(() => { if (b.disabled) window.__sendWasDisabled = true; })
            .observe(b, {attributes: true}); }""")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as first:
        page.click("#send")
    body = first.value.post_data_json
    assert body["stream"] is True and body["model"] == "af3-tiny" and body["temperature"] == 0
    audio, text = body["messages"][0]["content"]
    assert audio["type"] == "input_audio" and audio["input_audio"]["format"] == "wav" and audio["uuid"]
    assert base64.b64decode(audio["input_audio"]["data"]) == CLIP.read_bytes()
    assert text == {"type": "text", "text": QUESTION}

    reply = page.locator(".msg.assistant").first
    expect(reply).to_have_attribute("data-state", "done", timeout=MODEL_MS)
    assert page.evaluate("window.__sendWasDisabled"), "the send button stayed enabled while the request ran"
    answer = reply.locator(".msg-text").inner_text().strip()
    assert answer, "the reply is empty"
    assert "three" in answer.lower(), answer
    expect(page.locator(".msg.user audio")).to_have_count(1)
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_hidden()
    expect(page.locator("#error-banner")).to_be_hidden()
    _shot(page, tmp_path, "chat")

    # the next turn sends the history, the clip by its uuid only
    page.fill("#prompt", QUESTION)
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as second:
        page.click("#send")
    messages = second.value.post_data_json["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"][0] == {"type": "input_audio", "input_audio": None, "uuid": audio["uuid"]}
    assert messages[1]["role"] == "assistant" and messages[1]["content"].strip() == answer
    expect(page.locator(".msg.assistant").nth(1)).to_have_attribute("data-state", "done", timeout=MODEL_MS)
    expect(page.locator("#error-banner")).to_be_hidden()
    _no_page_errors(page)


def test_transcribe_with_subtitle_download(page, tmp_path):
    """Transcribe shows timestamped segments; the SRT button downloads the API's SRT file."""
    _attach_clip(page)
    with page.expect_response(lambda r: r.url.endswith("/v1/audio/transcriptions"), timeout=MODEL_MS) as info:
        page.click("#attachments .clip .transcribe")
    assert info.value.status == 200, info.value.text()
    assert "segments" in info.value.json()  # the page asked for verbose_json
    card = page.locator(".transcript").last
    expect(card).to_have_attribute("data-state", "done", timeout=MODEL_MS)
    segments = card.locator(".segment")
    assert segments.count() >= 1, card.inner_text()
    stamp = segments.first.locator(".ts").inner_text()
    assert re.fullmatch(r"\[(\d+:)?\d\d:\d\d\.\d → (\d+:)?\d\d:\d\d\.\d\]", stamp), stamp
    _shot(page, tmp_path, "transcript")

    with page.expect_download(timeout=MODEL_MS) as info:
        card.locator(".download-srt").click()
    download = info.value
    assert download.suggested_filename == "three_beeps.srt"
    srt = Path(download.path()).read_text(encoding="utf-8")
    assert srt.startswith("1\n"), srt[:200]
    assert "-->" in srt, srt[:200]

    with page.expect_download(timeout=MODEL_MS) as info:
        card.locator(".download-vtt").click()
    assert info.value.suggested_filename == "three_beeps.vtt"
    assert Path(info.value.path()).read_text(encoding="utf-8").startswith("WEBVTT")
    expect(page.locator("#error-banner")).to_be_hidden()
    _no_page_errors(page)


def test_api_error_is_shown(page, tmp_path):
    """An invalid setting (max tokens 0): the banner shows the API's error.message; the message is kept."""
    _setting(page, "#max-tokens", "0")
    _attach_clip(page)
    page.fill("#prompt", QUESTION)
    with page.expect_response(lambda r: r.url.endswith("/v1/chat/completions")) as info:
        page.click("#send")
    response = info.value
    assert 400 <= response.status < 500, response.status
    message = response.json()["error"]["message"]
    assert message
    banner = page.locator("#error-banner")
    expect(banner).to_be_visible()
    expect(page.locator("#error-message")).to_have_text(message)
    assert "max_tokens" in message or "max_new_tokens" in message, message
    if response.json()["error"].get("param") == "max_tokens":  # the page points at the field the API names
        expect(page.locator("#max-tokens")).to_have_attribute("aria-invalid", "true")
    _shot(page, tmp_path, "error")

    # nothing came back: the question and the clip return to the composer, ready to resend
    expect(page.locator(".msg")).to_have_count(0)
    expect(page.locator("#prompt")).to_have_value(QUESTION)
    expect(page.locator("#attachments .clip")).to_have_count(1)
    expect(page.locator("#send")).to_be_enabled()
    page.click("#error-dismiss")
    expect(banner).to_be_hidden()
    _no_page_errors(page)


def test_record_from_the_microphone(page, tmp_path):
    """Record ~1 s from Chromium's fake microphone: an attachment with a player; the server takes it."""
    record = page.locator("#record")
    record.click()
    expect(record).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#record-time")).to_be_visible()
    page.wait_for_timeout(1200)
    record.click()
    expect(record).to_have_attribute("aria-pressed", "false")
    clip = page.locator("#attachments .clip")
    expect(clip).to_have_count(1)
    expect(clip.locator("audio")).to_have_count(1)
    assert page.eval_on_selector("#attachments .clip audio", "a => a.src.startsWith('blob:')")
    _shot(page, tmp_path, "recorded")

    page.fill("#prompt", "What do you hear?")
    with page.expect_request(lambda r: r.url.endswith("/v1/chat/completions")) as req:
        page.click("#send")
    part = req.value.post_data_json["messages"][0]["content"][0]
    assert part["input_audio"]["format"] in ("webm", "ogg", "m4a"), part["input_audio"]["format"]
    assert len(base64.b64decode(part["input_audio"]["data"])) > 1000
    expect(page.locator(".msg.assistant").first).to_have_attribute("data-state", "done", timeout=MODEL_MS)
    expect(page.locator("#error-banner")).to_be_hidden()
    _no_page_errors(page)
