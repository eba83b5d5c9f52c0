"""``af3 chat`` driven through a pseudo-terminal (pexpect), as a person would use it: answers about the bundled clip,
a follow-up served from the prefix cache, /audio, /think, /save and /load, errors that leave the session going,
and Ctrl-C (at the prompt, and during a reply through the real Engine). The replies of every turn equal a fresh
Engine's answer to the same conversation."""

from __future__ import annotations

import json
import os
import queue
import re
import sys

import numpy as np
import pytest
import soundfile as sf

from af3.cli import bundled_clip, embedded_model_path
from af3.commands.chat_repl import PROMPT, ChatSession
from af3.generation.engine import Engine, GenerationOptions
from af3.training import synthetic as S

pexpect = pytest.importorskip("pexpect")

COUNT = "How many beeps do you hear?"
PITCH = "Are the beeps low, medium or high?"
STATUS = re.compile(r"\[first token ([\d.]+) s · (\d+) tokens · ([\d.]+) tok/s · (\d+) of (\d+) prompt tokens "
                    r"cached[^\]]*\]")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def engine():
    return Engine.from_pretrained(str(embedded_model_path()), max_batch_size=1)


def greedy(engine, conversation) -> str:
    return engine.generate(conversation, GenerationOptions(max_new_tokens=512, temperature=0.0)).text


@pytest.fixture(scope="module")
def two_beeps(engine, tmp_path_factory) -> str:
    """A generated clip of two beeps that the tiny model counts right (it is good, not perfect, at counting)."""
    path = str(tmp_path_factory.mktemp("clips") / "two.wav")
    for seed in range(20):
        rng = np.random.default_rng(seed)
        x, _ = S.beeps(2, 2.5, 600.0, rng)
        sf.write(path, (0.5 * x / np.abs(x).max()).astype(np.float32), S.SR)
        answer = greedy(engine, [{"role": "user", "content": [{"type": "audio", "path": path},
                                                               {"type": "text", "text": COUNT}]}])
        if "two" in answer:
            return path
    raise AssertionError("no generated two-beep clip was counted right by the tiny model")


def spawn(tmp_path, *args):
    env = {**os.environ, "HOME": str(tmp_path), "AF3_MODEL": "", "TERM": "dumb", "PYTHONIOENCODING": "utf-8",
           "NO_COLOR": ""}
    return pexpect.spawn(sys.executable, ["-m", "af3.cli", "chat", *args], env=env, encoding="utf-8",
                         timeout=180, cwd=str(tmp_path), dimensions=(40, 250))


def command(child, line: str, expect: str) -> str:
    """Wait for the prompt, type ``line``, wait for ``expect`` (a regex); what came before it, without escapes."""
    child.expect_exact(PROMPT)
    child.sendline(line)
    child.expect(expect)
    return ANSI.sub("", child.before)


def ask(child, line: str) -> tuple[str, dict]:
    """One turn: the reply text as printed and the status line's numbers."""
    before = command(child, line, STATUS.pattern)
    first, tokens, rate, cached, prompt = child.match.groups()
    reply = before.split(line, 1)[-1].strip()  # (the terminal echoes the typed line first)
    return reply, {"tokens": int(tokens), "cached": int(cached), "prompt": int(prompt), "first": float(first),
                   "rate": float(rate)}


def test_a_chat_session_end_to_end(tmp_path, two_beeps, engine):
    clip = str(bundled_clip())
    child = spawn(tmp_path, clip)
    child.expect("af3 chat · model tiny")
    reply1, st1 = ask(child, COUNT)
    assert "three" in reply1 and st1["tokens"] > 0 and st1["prompt"] > 0
    reply2, st2 = ask(child, PITCH)
    assert reply2 and 0 < st2["cached"] < st2["prompt"]  # turn 1's prompt and reply came from the prefix cache
    assert st2["cached"] >= st1["prompt"] - 16
    command(child, f"/audio {two_beeps}", r"attached two\.wav")
    reply3, st3 = ask(child, COUNT)  # (the tiny model never saw two clips in one conversation: checked below)
    assert reply3 and st3["cached"] > st2["prompt"] - 16

    # mistakes: one line each, and the session goes on
    before = command(child, "/audio missing.wav", r"error: audio file not found: missing\.wav\r?\n")
    assert "Traceback" not in before
    command(child, "/think on", r"error: this model has no think adapter[^\r\n]*\r?\n")
    command(child, "/bogus", r"error: unknown command /bogus[^\r\n]*\r?\n")
    command(child, "/load nowhere.json", r"error: no such file: nowhere\.json\r?\n")
    command(child, "/help", r"/audio PATH")
    child.expect_exact(PROMPT)
    child.sendintr()  # Ctrl-C at the prompt: a new prompt, nothing else
    command(child, "/save conv.json", r"saved 6 messages to conv\.json")
    command(child, "/reset", r"new conversation")
    command(child, f"/audio {two_beeps}", r"attached two\.wav")
    reply5, st5 = ask(child, COUNT)
    assert "two" in reply5 and st5["cached"] == 0  # a new conversation: nothing of it was cached
    command(child, "/quit", pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before

    saved = json.loads((tmp_path / "conv.json").read_text())
    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    assert saved == [
        {"role": "user", "content": [{"type": "audio", "path": clip}, text(COUNT)]},
        {"role": "assistant", "content": reply1},
        {"role": "user", "content": [text(PITCH)]},
        {"role": "assistant", "content": reply2},
        {"role": "user", "content": [{"type": "audio", "path": two_beeps}, text(COUNT)]},
        {"role": "assistant", "content": reply3},
    ]
    # The cached replies equal what a fresh Engine says to each prefix of the conversation.
    for k in (1, 3, 5):
        assert greedy(engine, saved[:k]) == saved[k]["content"]

    # A new process continues the saved conversation.
    child = spawn(tmp_path)
    command(child, "/load conv.json", r"loaded 6 messages \(2 audio file\(s\)\)")
    reply4, st4 = ask(child, PITCH)
    assert st4["prompt"] > st3["prompt"]  # the whole saved conversation is in the prompt
    command(child, "/save conv2.json", r"saved 8 messages")
    child.expect_exact(PROMPT)
    child.sendeof()  # Ctrl-D
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    again = json.loads((tmp_path / "conv2.json").read_text())
    assert again[:6] == saved and again[6] == {"role": "user", "content": [text(PITCH)]}
    assert again[7]["content"] == reply4 == greedy(engine, again[:7])
    assert (tmp_path / ".cache" / "af3" / "chat_history").is_file()


def test_reset_and_a_turn_that_fails_keep_the_session(tmp_path):
    child = spawn(tmp_path)
    bad = tmp_path / "notes.wav"
    bad.write_text("not audio\n" * 20)
    command(child, f"/audio {bad}", r"attached notes\.wav")
    before = command(child, COUNT, r"error: [^\r\n]*\r?\n")  # the audio cannot be decoded: one line
    assert "Traceback" not in before
    command(child, "/save x.json", r"error: nothing to save")  # the failed turn was not kept
    command(child, "/reset", r"new conversation")
    command(child, "/exit", pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_bad_saved_conversation_is_refused_in_one_line(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"role": "user", "content": [{"type": "audio",
                                                                                 "path": "gone.wav"}]}]))
    (tmp_path / "notlist.json").write_text('{"role": "user"}')
    child = spawn(tmp_path)
    command(child, "/load bad.json", r"error: audio file not found: gone\.wav\r?\n")
    command(child, "/load notlist.json", r"error: notlist\.json must hold a list of messages")
    command(child, "/quit", pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


class _InterruptingQueue:
    """The reply's queue, interrupted (as by Ctrl-C) once after ``after`` pieces."""

    def __init__(self, inner: queue.Queue, after: int):
        self.inner, self.after = inner, after

    def __getattr__(self, name):  # put, empty, ...: the engine's side of the queue
        return getattr(self.inner, name)

    def get(self, *args, **kwargs):
        if self.after == 0:
            self.after = -1
            raise KeyboardInterrupt
        self.after -= 1
        return self.inner.get(*args, **kwargs)


def test_ctrl_c_during_a_reply_cancels_it_and_the_next_turn_is_right(engine, capsys):
    clip = str(bundled_clip())
    engine.start()
    try:
        session = ChatSession(engine, GenerationOptions(max_new_tokens=64, temperature=0.0), [clip])
        submit, cancelled = engine.submit, []

        def interrupted_submit(*args, **kwargs):
            req = submit(*args, **kwargs)
            req.stream = _InterruptingQueue(req.stream, after=1)
            cancelled.append(req)
            return req

        engine.submit = interrupted_submit
        session.turn(COUNT)
        del engine.submit
        req = cancelled[0]
        assert req.done.is_set() and req.output.finish_reason in ("cancelled", "stop")
        assert session.messages == [] and session.pending == [clip]  # nothing kept; the audio stays attached
        assert "[stopped" in capsys.readouterr().out
        session.turn(COUNT)
        assert session.messages[-1] == {"role": "assistant", "content": "There are three beeps."}
    finally:
        engine.close()
