"""``af3 chat``: an interactive, multi-turn conversation about audio in the terminal.

One :class:`ChatSession` holds the conversation (a list of messages with absolute audio paths, exactly what ``/save``
writes) and turns each line the user types into a command or a user turn. Replies stream from one Engine with a
prefix cache and an audio cache, so an earlier turn's audio is never encoded again and its keys/values are reused:
the status line after each reply says how many prompt tokens came from the cache.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import typer

from ..errors import AF3Error, InputError
from .common import DEVICE_OPT, DTYPE_OPT, MODEL_OPT, QUANT_OPT, _engine, _options, _resolve_model

logger = logging.getLogger("af3")

#: Keys/values of finished turns kept for the next one, and encoded audio windows kept for later turns.
PREFIX_CACHE_BYTES = 512 * 1024**2
AUDIO_CACHE_BYTES = 256 * 1024**2
HISTORY_FILE = Path("~/.cache/af3/chat_history")
PROMPT = "you> "
#: Largest conversation file /load reads.
MAX_LOAD_BYTES = 64 * 1024**2

HELP = """commands:
  /audio PATH [PATH ...]  attach audio files to your next message
  /think on|off           switch the model's think adapter (reasoning) on or off
  /reset                  start a new conversation
  /save FILE              write the conversation as JSON (audio as absolute paths)
  /load FILE              continue a conversation written by /save
  /help                   this list
  /quit, /exit, Ctrl-D    leave (Ctrl-C stops a reply that is being written)"""


def audio_file(path: str, base: str | None = None) -> str:
    """``path`` as an absolute path to an existing audio file (relative to ``base`` when given), or InputError."""
    full = os.path.abspath(os.path.join(base or os.getcwd(), os.path.expanduser(path)))
    if not os.path.exists(full):
        raise InputError(f"audio file not found: {path}")
    if os.path.isdir(full):
        raise InputError(f"{path} is a directory, not an audio file")
    return full


def load_conversation(path: str) -> list[dict]:
    """A conversation written by ``/save``, checked: a list of messages whose audio parts are paths to files that
    exist (a relative path is taken from the file's folder). Anything else is an InputError naming the problem."""
    from ..chat import is_audio_part, normalize_conversation

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_LOAD_BYTES + 1)
    except FileNotFoundError:
        raise InputError(f"no such file: {path}") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    if len(raw) > MAX_LOAD_BYTES:
        raise InputError(f"{path} is larger than {MAX_LOAD_BYTES // 1024**2} MB; it is not a saved conversation")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list):
        raise InputError(f"{path} must hold a list of messages like {{\"role\": \"user\", \"content\": ...}}")
    try:
        normalize_conversation(data)
    except InputError as e:
        raise InputError(f"{path}: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    messages = []
    for i, m in enumerate(data):
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for raw_part in content:
                part = {"type": "text", "text": raw_part} if isinstance(raw_part, str) else raw_part
                if is_audio_part(part):
                    if part.get("type") != "audio" or not isinstance(part.get("path"), str):
                        raise InputError(f"{path}: message {i}: an audio part must be {{\"type\": \"audio\", "
                                         "\"path\": FILE}")
                    part = {"type": "audio", "path": audio_file(part["path"], base)}
                parts.append(part)
            content = parts
        messages.append({"role": m["role"], "content": content})
    return messages


def _dim(text: str) -> str:
    """``text`` in the terminal's dim style (plain when stdout is not a terminal or NO_COLOR is set)."""
    if sys.stdout.isatty() and not os.environ.get("NO_COLOR"):
        return f"\x1b[2m{text}\x1b[0m"
    return text


class ChatSession:
    """The conversation and the commands that change it; :meth:`handle` takes one typed line."""

    def __init__(self, engine, options, audios: list[str] | None = None):
        self.engine = engine
        self.options = options
        self.messages: list[dict] = []
        self.pending: list[str] = list(audios or [])  # absolute paths attached to the next user message

    # ---------------------------------------------------------------- one line
    def handle(self, line: str) -> bool:
        """Run one typed line (a command or a message); False when the session should end."""
        line = line.strip()
        if not line:
            return True
        if not line.startswith("/"):
            self.turn(line)
            return True
        name, _, rest = line.partition(" ")
        try:
            args = shlex.split(rest)  # (quotes for paths with spaces)
        except ValueError as e:
            raise InputError(f"{name}: {e}") from None
        if name in ("/quit", "/exit"):
            return False
        commands = {"/audio": self.cmd_audio, "/think": self.cmd_think, "/reset": self.cmd_reset,
                    "/save": self.cmd_save, "/load": self.cmd_load, "/help": self.cmd_help}
        if name not in commands:
            raise InputError(f"unknown command {name}; /help lists the commands")
        commands[name](args)
        return True

    def say(self, text: str) -> None:
        typer.echo(text)

    def cmd_help(self, args: list[str]) -> None:
        self.say(HELP)

    def cmd_audio(self, args: list[str]) -> None:
        if not args:
            raise InputError("usage: /audio PATH [PATH ...]")
        paths = [audio_file(a) for a in args]  # all or none: one missing file attaches nothing
        self.pending.extend(paths)
        names = ", ".join(os.path.basename(p) for p in paths)
        self.say(f"attached {names} to your next message ({len(self.pending)} audio file(s) waiting)")

    def cmd_think(self, args: list[str]) -> None:
        if len(args) != 1 or args[0] not in ("on", "off"):
            raise InputError("usage: /think on|off")
        on = args[0] == "on"
        if on and self.engine.lora is None:
            raise InputError("this model has no think adapter (think/ or stage35/ in its folder); think mode stays off")
        self.options = replace(self.options, think=on)
        self.say(f"think mode {'on' if on else 'off'}")

    def cmd_reset(self, args: list[str]) -> None:
        self.messages, self.pending = [], []
        self.say("new conversation")

    def cmd_save(self, args: list[str]) -> None:
        from ..files import write_atomic

        if len(args) != 1:
            raise InputError("usage: /save FILE")
        if not self.messages:
            raise InputError("nothing to save: the conversation is empty")
        data = (json.dumps(self.messages, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            write_atomic(os.path.expanduser(args[0]), data)
        except OSError as e:
            raise InputError(f"cannot write {args[0]}: {e.strerror or e}") from None
        self.say(f"saved {len(self.messages)} messages to {args[0]}")

    def cmd_load(self, args: list[str]) -> None:
        if len(args) != 1:
            raise InputError("usage: /load FILE")
        self.messages, self.pending = load_conversation(os.path.expanduser(args[0])), []
        audios = sum(1 for m in self.messages if isinstance(m["content"], list)
                     for p in m["content"] if isinstance(p, dict) and p.get("type") == "audio")
        self.say(f"loaded {len(self.messages)} messages ({audios} audio file(s)) from {args[0]}; go on")

    # ---------------------------------------------------------------- one turn
    def turn(self, text: str) -> None:
        """Send ``text`` (with the attached audio) and stream the reply; the turn is kept only when it finishes."""
        attached, self.pending = self.pending, []
        content = [{"type": "audio", "path": p} for p in attached] + [{"type": "text", "text": text}]
        conversation = [*self.messages, {"role": "user", "content": content}]
        start = time.perf_counter()
        req = self.engine.submit(conversation, self.options, stream=True)  # bad audio, too long: raised here
        first = None
        try:
            while True:
                delta = req.stream.get()
                if first is None:
                    first = time.perf_counter()
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                if delta.finished:
                    break
        except KeyboardInterrupt:
            self.engine.cancel(req)
            while not req.done.wait(0.05):  # the loop ends it at its next step
                pass
            self.pending = attached
            self.say("\n" + _dim("[stopped; that message was not kept"
                                 + ("; its audio stays attached]" if attached else "]")))
            return
        end = time.perf_counter()
        sys.stdout.write("\n")
        if req.error is not None:
            raise req.error
        out = delta.output
        self.messages = [*conversation, {"role": "assistant", "content": out.text}]
        self.say(_dim(status_line(out, start, first or end, end)))


def status_line(out, start: float, first: float, end: float) -> str:
    """``[first token 0.12 s · 24 tokens · 31.0 tok/s · 812 of 830 prompt tokens cached]``."""
    n = len(out.token_ids)
    rate = (n - 1) / (end - first) if n > 1 and end > first else n / max(end - start, 1e-9)
    parts = [f"first token {first - start:.2f} s", f"{n} tokens", f"{rate:.1f} tok/s",
             f"{out.cached_prompt_tokens} of {out.prompt_tokens} prompt tokens cached"]
    if out.audio_windows_cached:
        parts.append(f"{out.audio_windows_cached} audio window(s) reused")
    if out.finish_reason == "length":
        parts.append("cut off by --max-new-tokens")
    return "[" + " · ".join(parts) + "]"


def _history(readline, write: bool) -> None:
    """Read or write the line history (~/.cache/af3/chat_history); a history that cannot be used is skipped."""
    path = HISTORY_FILE.expanduser()
    try:
        if write:
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.set_history_length(1000)
            readline.write_history_file(str(path))
        elif path.is_file():
            readline.read_history_file(str(path))
    except (OSError, ValueError):
        pass


def chat(
    audio: list[str] = typer.Argument(None, help="Audio files attached to your first message."),
    model: str = MODEL_OPT,
    think: bool = typer.Option(False, "--think", help="Start with the think adapter on (/think switches it)."),
    max_new_tokens: int = typer.Option(512, help="Upper bound on each reply's length in tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    quantize: str = QUANT_OPT,
    dtype: str = DTYPE_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Chat about audio, turn after turn: earlier turns' audio and text stay in the model's cache.

    Type a message and press Enter; Ctrl-C stops a reply. Commands:

    \b
      /audio PATH [PATH ...]  attach audio files to your next message
      /think on|off           the think adapter (when the checkpoint has one)
      /reset                  start a new conversation
      /save FILE, /load FILE  write the conversation as JSON, or continue one
      /help                   the commands
      /quit, /exit, Ctrl-D    leave

    \b
    Example:
      af3 chat clip.wav --model /models/audio-flamingo-3-hf
      you> How many beeps do you hear?
      you> /audio other.wav
      you> And in this one?
    """
    paths = [audio_file(a) for a in audio or []]
    options = _options(max_new_tokens, temperature, None, None, None, think, None)
    path = _resolve_model(model)
    engine = _engine(path, dtype, device, quantize, think=think, prefix_cache_bytes=PREFIX_CACHE_BYTES,
                     audio_cache_bytes=AUDIO_CACHE_BYTES)
    session = ChatSession(engine, options, paths)
    readline = None
    if sys.stdin.isatty():  # line editing and history for a person at a terminal (not for piped input)
        with contextlib.suppress(ImportError):  # (no readline on this platform: plain input())
            import readline
    if readline is not None:
        _history(readline, write=False)
    label = model or os.environ.get("AF3_MODEL") or "tiny"
    adapter = "think adapter available" if engine.lora is not None else "no think adapter"
    dtype_name = str(engine.model.dtype).removeprefix("torch.")
    typer.echo(f"af3 chat · model {label} · {dtype_name} on {engine.model.device} · {adapter}")
    if paths:
        typer.echo(f"attached to your first message: {', '.join(os.path.basename(p) for p in paths)}")
    typer.echo("type a message; /help lists the commands, /quit leaves")
    engine.start()
    try:
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                typer.echo()
                break
            except KeyboardInterrupt:
                typer.echo()
                continue
            try:
                if not session.handle(line):
                    break
            except AF3Error as e:
                typer.echo(f"error: {' '.join(str(e).split())}", err=True)
            except Exception as e:  # noqa: BLE001 (a turn that failed in the engine: the session goes on)
                logger.debug("turn failed", exc_info=True)
                typer.echo(f"error: {type(e).__name__}: {' '.join(str(e).split())[:300]}", err=True)
            except KeyboardInterrupt:
                typer.echo("\n" + _dim("[stopped]"))
    finally:
        engine.close()
        if readline is not None:
            _history(readline, write=True)
