"""The ``af3`` command line. Thin: every command loads a model + processor and calls the library.

Errors a user can cause (``AF3Error``) print one line and exit with status 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import typer

from .commands.common import (
    DEVICE_OPT,
    DTYPE_OPT,
    EXIT_INCOMPLETE,  # noqa: F401 (part of the CLI's documented behaviour)
    MODEL_OPT,
    PRIVATE_OPT,
    QUANT_OPT,
    _answer,
    _audio_policy,
    _dtype,
    _engine,
    _options,
    _resolve_model,
    bundled_clip,
    embedded_model_path,
)
from .errors import AF3Error

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)


def _version(value: bool) -> None:
    if value:
        from . import __version__

        typer.echo(f"af3 {__version__}")
        raise typer.Exit(0)


#: Set by ``af3 --debug``: errors print their traceback too.
_DEBUG = {"on": False}


@app.callback()
def _main_options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                                help="Print af3's version and exit."),
                  debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error (for a bug "
                                             "report) besides its one-line message.")) -> None:
    """Audio Flamingo 3: ask about audio, chat, transcribe, caption, evaluate, run batches, serve, fine-tune.

    \b
    Examples:
      af3 ask clip.wav "How many beeps do you hear?"
      af3 chat meeting.wav --model nvidia/audio-flamingo-3-hf
      af3 --debug transcribe talk.mp3
    """
    _DEBUG["on"] = debug
    if debug:
        logging.getLogger("af3").setLevel(logging.DEBUG)


@app.command()
def ask(
    audio_and_question: list[str] = typer.Argument(..., metavar="AUDIO... QUESTION",
                                                   help="One or more audio files or http(s) URLs, then the question."),
    model: str = MODEL_OPT,
    max_new_tokens: int = typer.Option(256, help="Upper bound on the answer's length in tokens."),
    temperature: float = typer.Option(0.0, help="0 = greedy; > 0 samples."),
    top_p: float = typer.Option(None, help="Nucleus sampling (with --temperature > 0)."),
    top_k: int = typer.Option(None, help="Top-k sampling (with --temperature > 0)."),
    seed: int = typer.Option(None, help="Sampling seed (same seed, same answer)."),
    think: bool = typer.Option(False, "--think", help="Use the checkpoint's thinking adapter (think/ or stage35/)."),
    json_schema: str = typer.Option(None, "--json", help="Answer in JSON: 'any', a schema file, or inline schema."),
    stream: bool = typer.Option(True, help="Print the answer as it is generated."),
    quantize: str = QUANT_OPT,
    dtype: str = DTYPE_OPT,
    device: str = DEVICE_OPT,
    allow_private_urls: bool = PRIVATE_OPT,
) -> None:
    """Answer one question about one or more audio clips (all in one user turn, in the order given).

    \b
    Examples:
      af3 ask clip.wav "How many beeps do you hear?"
      af3 ask before.wav after.wav "What changed between the two recordings?" --model nvidia/audio-flamingo-3-hf
      af3 ask talk.mp3 "List the speakers." --json '{"type": "array", "items": {"type": "string"}}'
    """
    if len(audio_and_question) < 2:
        raise AF3Error("Missing argument 'question': af3 ask AUDIO... QUESTION (the question comes last)")
    *audios, question = audio_and_question
    conv = [{"role": "user", "content": [*({"type": "audio", "path": a} for a in audios),
                                         {"type": "text", "text": question}]}]
    options = _options(max_new_tokens, temperature, top_p, top_k, seed, think, json_schema)
    code = _answer(_resolve_model(model), conv, options, dtype, device, quantize, stream=stream,
                   allow_private_urls=allow_private_urls)
    if code:
        raise typer.Exit(code)


@app.command()
def transcribe(
    audio: str = typer.Argument(..., help="Audio file path or http(s) URL."),
    model: str = MODEL_OPT,
    prompt: str = typer.Option("Transcribe the input speech.", help="The instruction sent with the audio."),
    max_new_tokens: int = typer.Option(512, help="Upper bound on each segment's transcript in tokens."),
    output_format: str = typer.Option("text", "--format", help="text, srt, vtt or json (segments with times)."),
    quantize: str = QUANT_OPT,
    dtype: str = DTYPE_OPT,
    device: str = DEVICE_OPT,
    allow_private_urls: bool = PRIVATE_OPT,
) -> None:
    """Transcribe speech of any length (long recordings are cut at quiet points; the model's framing sentence
    and quotes are stripped)."""
    from . import longform

    formats = {"srt": longform.to_srt, "vtt": longform.to_vtt, "json": longform.to_json}
    if output_format not in (*formats, "text"):
        raise AF3Error(f"unknown --format {output_format!r}; use text, srt, vtt or json")
    _options(max_new_tokens, 0.0, None, None, None, False, None)  # checked before the model loads
    engine = _engine(_resolve_model(model), dtype, device, quantize, max_batch_size=8)
    transcript = longform.transcribe_long(None, engine.processor, audio, prompt=prompt, batch_size=8,
                                          max_new_tokens=max_new_tokens, policy=_audio_policy(allow_private_urls),
                                          generate_fn=longform.engine_generate_fn(engine))
    typer.echo(transcript.text if output_format == "text" else formats[output_format](transcript).rstrip("\n"))


@app.command()
def serve(
    model: str = typer.Option("tiny", "--model", "-m", help="'tiny' (the embedded model) or a checkpoint folder."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    api_key: str = typer.Option(None, help="Require 'Authorization: Bearer KEY' (default: $AF3_API_KEY)."),
    max_batch_size: int = typer.Option(8, help="Requests decoded together."),
    max_queue: int = typer.Option(64, help="Requests waiting beyond the batch; more get 429."),
    max_audios: int = typer.Option(8, help="Audio parts per chat request."),
    max_upload_mb: float = typer.Option(25.0, help="Audio bytes per request (chat parts together, or one upload)."),
    max_transcription_hours: float = typer.Option(3.0, help="Longest recording /v1/audio/transcriptions takes."),
    request_timeout: float = typer.Option(600.0, help="Seconds before a request is cancelled (504)."),
    prefix_cache_mb: float = typer.Option(1024.0, help="Keys/values of finished conversations kept for follow-ups."),
    audio_cache_mb: float = typer.Option(512.0, help="Encoded audio windows kept for requests that repeat them."),
    uuid_cache_mb: float = typer.Option(512.0, help="Decoded audio kept by uuid for later requests that omit it."),
    allow_url_fetch: bool = typer.Option(False, "--allow-url-fetch", help="Fetch http(s) audio URLs (public "
                                         "addresses only)."),
    allow_private_urls: bool = typer.Option(False, "--allow-private-urls", help="Let fetched URLs reach private "
                                            "networks (trusted networks only)."),
    allow_url_origin: list[str] = typer.Option(None, "--allow-url-origin", hidden=True,
                                               help="host:port fetched although private (tests)."),
    allowed_local_media_path: str = typer.Option(None, help="Allow file:// audio URLs below this folder."),
    quantize: str = QUANT_OPT,
    think: str = typer.Option("auto", help="auto: serve '<model>:think' when the checkpoint has the adapter; off."),
    dtype: str = DTYPE_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Serve an OpenAI-compatible API (/v1/chat/completions, /v1/audio/transcriptions, /v1/models) and a web page."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise AF3Error("af3 serve needs the serve extra: pip install 'af3[serve]'") from None
    from .serve import ServeSettings
    from .serve.server import build_engine, model_name_for
    from .serve.server import serve as run_server

    settings = ServeSettings(
        model_name=model_name_for(model), api_key=api_key or os.environ.get("AF3_API_KEY") or None,
        max_queue=max_queue, max_audios=max_audios, max_upload_mb=max_upload_mb,
        max_transcription_s=max_transcription_hours * 3600, allow_url_fetch=allow_url_fetch,
        allow_private_urls=allow_private_urls, allowed_url_origins=tuple(allow_url_origin or ()),
        allowed_local_media_path=allowed_local_media_path, request_timeout_s=request_timeout,
        uuid_cache_mb=uuid_cache_mb)
    for flag, mb in (("--prefix-cache-mb", prefix_cache_mb), ("--audio-cache-mb", audio_cache_mb)):
        if not 0 <= mb <= 1024**2:
            raise AF3Error(f"{flag} must be between 0 and {1024**2}, got {mb}")
    if not 0 < port < 65536:
        raise AF3Error(f"--port must be between 1 and 65535, got {port}")
    path = _resolve_model(model)
    engine = build_engine(path, dtype=_dtype(dtype), device=device, quantize=quantize, think=think,
                          max_batch_size=max_batch_size, max_audios=max_audios,
                          prefix_cache_bytes=int(prefix_cache_mb * 1024**2),
                          audio_cache_bytes=int(audio_cache_mb * 1024**2))
    logging.getLogger("af3.serve").setLevel(logging.INFO)
    run_server(engine, settings, host=host, port=port)


@app.command()
def convert(
    src: Path = typer.Argument(..., help="NVIDIA-layout checkpoint (llm/, sound_tower/, sound_mm_projector/)."),
    dst: Path = typer.Argument(..., help="Output folder for the HF layout (must not exist unless --force)."),
    dtype: str = typer.Option("auto", help="Weights' dtype in the output: auto keeps the input's."),
    force: bool = typer.Option(False, help="Replace an existing folder (whole, in one step, once the new one is "
                               "complete)."),
) -> None:
    """Convert NVIDIA's original checkpoint layout to the HF layout (loadable by af3 and transformers)."""
    from .convert import convert_checkpoint

    if dst.exists() and not force:
        raise AF3Error(f"{dst} already exists; choose a new folder or pass --force")
    convert_checkpoint(src, dst, dtype=_dtype(dtype))
    typer.echo(f"wrote {dst}")


TRAIN_HELP = """Train or fine-tune (the AF3 curriculum), or merge a LoRA adapter.

\b
af3 train CONFIG.yaml [KEY=VALUE ...] [--resume[=CHECKPOINT]]
af3 train merge-lora ADAPTER_DIR --out OUT_DIR [--base BASE_DIR] [--dtype bfloat16]
af3 train tiny [--out runs/tiny] [--install]   (the embedded tiny model: synthetic data, training, model card)
torchrun --nproc_per_node N -m af3.training.trainer CONFIG.yaml ...   (several GPUs or nodes)
"""


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True}, help=TRAIN_HELP)
def train(ctx: typer.Context) -> None:
    args = list(ctx.args)
    if not args or args[0] in ("-h", "--help"):
        typer.echo(TRAIN_HELP)
        raise typer.Exit(0 if args else 2)
    if args[0] == "merge-lora":
        _merge_lora(args[1:])
        return
    if args[0] == "tiny":
        _train_tiny(args[1:])
        return
    from .training.trainer import main as train_main

    code = train_main(args)
    if code:
        raise typer.Exit(code)


def _train_tiny(args: list[str]) -> None:
    import argparse
    import json

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):
            raise AF3Error(f"train tiny: {message}; usage: af3 train tiny [--out DIR] [--install] [KEY=VALUE ...]")

    parser = Parser(prog="af3 train tiny")
    parser.add_argument("--out", default="runs/tiny")
    parser.add_argument("--install", action="store_true", help="copy the result into af3/assets/tiny")
    parser.add_argument("overrides", nargs="*")
    ns = parser.parse_args(args)
    logging.getLogger("af3").setLevel(logging.INFO)
    from .training.tiny_recipe import run_recipe

    typer.echo(json.dumps(run_recipe(ns.out, overrides=ns.overrides, install=ns.install), indent=2))


def _merge_lora(args: list[str]) -> None:
    import argparse

    class Parser(argparse.ArgumentParser):
        def error(self, message: str):  # one line through AF3Error instead of argparse's usage dump
            raise AF3Error(f"merge-lora: {message}; usage: af3 train merge-lora ADAPTER --out OUT [--base BASE]")

    parser = Parser(prog="af3 train merge-lora")
    parser.add_argument("adapter")
    parser.add_argument("--out", required=True)
    parser.add_argument("--base", default=None)
    parser.add_argument("--dtype", default="auto")
    ns = parser.parse_args(args)
    from .training.lora import merge_lora

    typer.echo(f"wrote {merge_lora(ns.base, ns.adapter, ns.out, dtype=_dtype(ns.dtype))}")


@app.command()
def demo(
    question: str = typer.Option("How many beeps do you hear?", help="The question to ask about the clip."),
    audio: str = typer.Option(None, help="Another clip instead of the bundled one."),
) -> None:
    """Answer a question about a bundled clip with the embedded model (no download, no GPU)."""
    model_path = embedded_model_path()
    if model_path is None:
        raise AF3Error("this build has no embedded model (af3/assets/tiny); create it with `af3 train tiny --install`")
    clip = audio or str(bundled_clip())
    typer.echo(f"clip: {clip}\nquestion: {question}")
    conv = [{"role": "user", "content": [{"type": "audio", "path": clip}, {"type": "text", "text": question}]}]
    from .generation.engine import GenerationOptions

    engine = _engine(str(model_path), "auto", "cpu")
    answer = engine.generate(conv, GenerationOptions(max_new_tokens=32, temperature=0.0)).text
    typer.echo(f"answer: {answer}")


# ---------------------------------------------------------------------------------------------------------------
# Commands whose code lives in af3.commands (this file stays the command table).
from .commands import chat_repl, tools  # noqa: E402

app.command("chat")(chat_repl.chat)
app.command("info")(tools.info)
app.command("download")(tools.download)
app.command("caption")(tools.caption)
app.command("bench")(tools.bench)

from .commands import batch_cmd, evaluate  # noqa: E402

app.command("eval")(evaluate.evaluate)
app.command("batch")(batch_cmd.batch)


#: What typer raises for a usage error (unknown option or command, missing or unparsable argument). typer bundles
#: its own click from 0.29 on (whose exceptions are not ``click.ClickException``); this finds the class either way.
_USAGE_ERROR = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def _usage_line(e: Exception) -> str:
    """One line for a usage error: what was wrong and where to look."""
    message = " ".join(e.format_message().split())  # type: ignore[attr-defined]
    ctx = getattr(e, "ctx", None)
    where = f"af3 {ctx.command_path.split(' ', 1)[1]} --help" if ctx is not None and " " in ctx.command_path \
        else "af3 --help"
    return f"error: {message} (see '{where}')"


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the typer app. A user's mistake (AF3Error, or a usage error) prints one line on stderr and
    exits with status 2; Ctrl-C exits with 130."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    _DEBUG["on"] = False
    try:
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(code) comes back as a return value here
            return code
    except AF3Error as e:
        if _DEBUG["on"]:
            import traceback

            traceback.print_exc()
        typer.echo(f"error: {' '.join(str(e).split())}", err=True)
        return 2
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    except (typer.Exit, SystemExit) as e:
        return int(getattr(e, "exit_code", getattr(e, "code", 0)) or 0)
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except _USAGE_ERROR as e:
        if e.format_message().strip():  # (bare `af3` printed its help already and has nothing to add)
            typer.echo(_usage_line(e), err=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
