"""What every ``af3`` command shares: which model (``tiny``, a folder, or a hub id already downloaded), the dtype and
device, an Engine for one command, the generation options checked before a model loads, and the common options.

Commands live in :mod:`af3.cli` (the command table) and in this package's modules; none of them tokenizes, batches
or decodes on its own: they build a conversation and hand it to the Engine.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path

import typer

from ..errors import AF3Error


def _dtype(name: str | None):
    from ..config import torch_dtype

    try:
        return torch_dtype(name)
    except ValueError as e:
        raise AF3Error(str(e)) from None


def embedded_model_path() -> Path | None:
    """The tiny model shipped inside the package, if this build has one."""
    path = Path(str(resources.files("af3") / "assets" / "tiny"))
    return path if (path / "config.json").is_file() else None


def bundled_clip() -> Path:
    return Path(str(resources.files("af3") / "assets" / "clips" / "three_beeps.wav"))


def _resolve_model(model: str | None) -> str:
    """``--model`` → a checkpoint folder: ``tiny`` (the embedded model), a local folder (HF or NVIDIA layout), or a
    hub id (``org/name``) already in the local hub cache (``af3 download`` puts it there). Default: $AF3_MODEL,
    else the embedded model."""
    model = model or os.environ.get("AF3_MODEL") or "tiny"
    if model == "tiny":
        embedded = embedded_model_path()
        if embedded is None:
            raise AF3Error("this build has no embedded model; pass --model FOLDER (a local AF3 checkpoint) or a hub id")
        return str(embedded)
    if os.path.isdir(model):
        return model
    if os.path.exists(model):
        raise AF3Error(f"--model {model!r} is a file; pass the checkpoint's folder")
    parts = model.split("/")
    if len(parts) == 2 and all(parts) and not model.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(model, local_files_only=True)
        except Exception:  # noqa: BLE001 (not cached, or no huggingface_hub: the same advice)
            raise AF3Error(f"model {model!r} is not a local folder and not in the local hub cache; download it "
                           f"first with: af3 download {model}") from None
    raise AF3Error(f"--model {model!r}: no such folder (use 'tiny', a checkpoint folder, or a hub id org/name)")


def _audio_policy(allow_private_urls: bool):
    """The CLI's audio limits: the library's defaults, with private-network URLs when the user asks for them.
    Local files are the user's own (no byte cap, as in the library)."""
    import dataclasses

    from ..fetch import DEFAULT_POLICY

    return dataclasses.replace(DEFAULT_POLICY, allow_private_network=allow_private_urls)


def _engine(model_path: str, dtype: str, device: str, quantize: str | None = None, think: bool = False,
            max_batch_size: int = 1, allow_private_urls: bool = False, prefix_cache_bytes: int = 0,
            audio_cache_bytes: int = 0):
    """An Engine for one command; by default no audio or prefix cache (one conversation: nothing follows up)."""
    from ..generation.engine import Engine
    from ..system import check_device

    return Engine.from_pretrained(model_path, dtype=_dtype(dtype), device=check_device(device), quantize=quantize,
                                  think=True if think else "auto", max_batch_size=max_batch_size,
                                  prefix_cache_bytes=prefix_cache_bytes, audio_cache_bytes=audio_cache_bytes,
                                  audio_policy=_audio_policy(allow_private_urls))


def _json_schema(value: str | None):
    """--json: 'any' (any JSON object), a JSON schema file, or the schema inline."""
    import json

    if value is None:
        return None
    if value == "any":
        return True
    if os.path.isfile(value):
        with open(value, encoding="utf-8") as f:
            value = f.read()
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise AF3Error(f"--json: not a JSON schema file or inline JSON ({e.msg} at char {e.pos})") from None


#: Exit status when the answer was printed but is incomplete (JSON cut off by --max-new-tokens).
EXIT_INCOMPLETE = 3


def _answer(model_path: str, conversation: list[dict], options, dtype: str, device: str, quantize: str | None = None,
            stream: bool = True, strip_prefix: bool = False, allow_private_urls: bool = False) -> int:
    """Run one request through the Engine and print the answer (token by token when streaming); returns the exit
    status: 0, or :data:`EXIT_INCOMPLETE` when a JSON answer was cut off by the token limit (said on stderr)."""
    engine = _engine(model_path, dtype, device, quantize, think=options.think, allow_private_urls=allow_private_urls)
    if stream and not strip_prefix:
        out = None
        for delta in engine.stream(conversation, options):
            sys.stdout.write(delta.text)
            sys.stdout.flush()
            out = delta.output if delta.finished else out
        sys.stdout.write("\n")
    else:
        out = engine.generate(conversation, options)
        typer.echo(engine.processor.decode(out.token_ids, skip_special_tokens=True, strip_prefix=strip_prefix))
    if options.json_schema is not None and out is not None and out.finish_reason == "length":
        typer.echo(f"error: the JSON answer is incomplete: it was cut off after {len(out.token_ids)} tokens "
                   "(--max-new-tokens); raise --max-new-tokens", err=True)
        return EXIT_INCOMPLETE
    return 0


MODEL_OPT = typer.Option(None, "--model", "-m", help="'tiny' (the embedded model), a checkpoint folder (HF or "
                         "NVIDIA layout) or a downloaded hub id. Default: $AF3_MODEL, else tiny.")
DTYPE_OPT = typer.Option("auto", help="auto (the checkpoint's), float32, bfloat16 or float16.")
DEVICE_OPT = typer.Option("auto", help="auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:1, ...")
QUANT_OPT = typer.Option(None, "--quantize", help="int8: weight-only int8 decoder (about half the memory).")
PRIVATE_OPT = typer.Option(False, "--allow-private-urls", help="Let audio URLs reach loopback and private-network "
                           "addresses (refused by default).")


def _options(max_new_tokens: int, temperature: float, top_p: float | None, top_k: int | None, seed: int | None,
             think: bool, json_schema: str | None, min_new_tokens: int = 0):
    """The request's options, checked now (before a model is loaded) by the same rules the Engine applies."""
    from ..config import GenerationConfig
    from ..generation.options import GenerationOptions

    options = GenerationOptions(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                                temperature=temperature, do_sample=temperature > 0, top_p=top_p, top_k=top_k,
                                seed=seed, think=think, json_schema=_json_schema(json_schema))
    options.resolved(GenerationConfig())
    return options
