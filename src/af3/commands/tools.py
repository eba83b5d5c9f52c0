"""``af3 info``, ``af3 download``, ``af3 caption`` and ``af3 bench``: a checkpoint's facts without loading it, a hub
download, captions for many clips in one batch, and a short speed check of this install."""

from __future__ import annotations

import json
import math
import os
import time

import typer

from ..errors import AF3Error, InputError
from .common import DEVICE_OPT, DTYPE_OPT, MODEL_OPT, QUANT_OPT, _dtype, _engine, _options, _resolve_model

#: The instruction ``af3 caption`` sends with each clip (AF3's papers and code give no fixed captioning prompt).
CAPTION_PROMPT = "Describe the audio in detail."
#: Checkpoint key prefix → the part ``af3 info`` counts it under.
PARTS = {"audio_tower.": "audio_encoder", "multi_modal_projector.": "projector", "language_model.": "language_model"}
#: Sequences ``af3 info`` states the memory for.
INFO_BATCHES = (1, 8)


def _check_format(value: str) -> str:
    if value not in ("text", "json"):
        raise AF3Error(f"unknown --format {value!r}; use text or json")
    return value


def _size(n: float) -> str:
    """Bytes for people: 1.5 KiB, 13.2 MiB, 15.3 GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _count(n: int) -> str:
    """Parameters for people: 812, 3.46 M, 8.27 B."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    return f"{n:,}"


# ------------------------------------------------------------------------------------------------------- info
def _tensor_headers(folder: str, nvidia: bool):
    """(our tensor name, shape, torch dtype) of every weight, from the safetensors headers only."""
    from ..config import NVIDIA_FOLDERS
    from ..errors import CheckpointError
    from ..model.tensor_files import SafetensorsFile, weight_files

    groups = [(os.path.join(folder, sub), prefix + ".") for sub, prefix in NVIDIA_FOLDERS.items()] if nvidia \
        else [(folder, "")]
    for sub, prefix in groups:
        for path in weight_files(sub):
            if not path.endswith(".safetensors"):
                raise CheckpointError(f"{path!r} is not a safetensors file; af3 info reads safetensors headers only")
            f = SafetensorsFile(path)
            try:
                for key in f.keys():  # noqa: SIM118 (a SafetensorsFile is not a dict)
                    yield prefix + key, f.shape(key), f.dtype(key)
            finally:
                f.close()


def checkpoint_info(folder: str, dtype: str = "auto", seq_len: int | None = None) -> dict:
    """What ``af3 info --format json`` prints (the keys are listed in :func:`info`'s help)."""
    import torch

    from ..config import MAX_AUDIO_SECONDS, is_nvidia_layout
    from ..features import audio_token_count
    from ..model.adapters import find_adapter
    from ..model.tensor_files import INDEX
    from ..model.weights import read_hf_config, read_nvidia_config

    nvidia = is_nvidia_layout(folder) and not os.path.isfile(os.path.join(folder, INDEX)) \
        and not os.path.isfile(os.path.join(folder, "model.safetensors"))
    config, _ = read_nvidia_config(folder) if nvidia else read_hf_config(folder)
    params = dict.fromkeys((*PARTS.values(), "other"), 0)
    dtypes: dict[str, dict[str, int]] = {}
    embed_dtype = None
    for name, shape, tdtype in _tensor_headers(folder, nvidia):
        numel = math.prod(shape)
        part = next((p for prefix, p in PARTS.items() if name.startswith(prefix)), "other")
        params[part] += numel
        row = dtypes.setdefault(str(tdtype).removeprefix("torch."), {"tensors": 0, "parameters": 0, "bytes": 0})
        row["tensors"] += 1
        row["parameters"] += numel
        row["bytes"] += numel * tdtype.itemsize
        if name.endswith("embed_tokens.weight"):
            embed_dtype = tdtype
    params["total"] = sum(params.values())
    run_dtype = _dtype(dtype)
    if run_dtype is None:  # what loading picks: the embeddings' dtype when it is a model dtype, else float32
        run_dtype = embed_dtype if embed_dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    text = config.text_config
    head_dim = text.head_dim or text.hidden_size // text.num_attention_heads
    kv_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * run_dtype.itemsize
    context = text.max_position_embeddings
    if seq_len is None:  # the longest audio a request takes, and room for the question and the answer
        seq_len = min(context, audio_token_count(int(MAX_AUDIO_SECONDS * 16000)) + 512)
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= context:
        raise InputError(f"--seq-len must be between 1 and the model's context ({context}), got {seq_len}")
    weights = params["total"] * run_dtype.itemsize
    adapter = find_adapter(folder)
    return {
        "model": os.path.abspath(folder),
        "layout": "nvidia" if nvidia else "hf",
        "parameters": params,
        "dtypes": dtypes,
        "checkpoint_bytes": sum(d["bytes"] for d in dtypes.values()),
        "run_dtype": str(run_dtype).removeprefix("torch."),
        "weights_bytes": weights,
        "kv_cache_bytes_per_token": kv_per_token,
        "memory": {"seq_len": seq_len, **{f"sequences_{b}_bytes": weights + b * seq_len * kv_per_token
                                         for b in INFO_BATCHES}},
        "think_adapter": None if adapter is None else os.path.abspath(adapter),
        "context_tokens": context,
        "max_audio_seconds": MAX_AUDIO_SECONDS,
    }


def _info_text(d: dict) -> str:
    p, m = d["parameters"], d["memory"]
    parts = " · ".join(f"{name.replace('_', ' ')} {_count(p[name])}" for name in (*PARTS.values(), "other")
                       if name != "other" or p[name])
    rows = [("model", f"{d['model']} ({'NVIDIA' if d['layout'] == 'nvidia' else 'HF'} layout)"),
            ("parameters", f"{_count(p['total'])} ({parts})")]
    for name, row in d["dtypes"].items():
        rows.append(("dtype", f"{name}: {row['tensors']} tensors, {_count(row['parameters'])} parameters, "
                              f"{_size(row['bytes'])}"))
    rows += [
        ("weights", f"{_size(d['weights_bytes'])} in {d['run_dtype']} (on disk {_size(d['checkpoint_bytes'])})"),
        ("KV cache", f"{_size(d['kv_cache_bytes_per_token'])} per token in {d['run_dtype']}"),
        ("memory", " · ".join(f"{b} sequence{'s' if b > 1 else ''}: {_size(m[f'sequences_{b}_bytes'])}"
                              for b in INFO_BATCHES)
         + f" (weights + KV cache at {m['seq_len']:,} tokens each; activations not counted)"),
        ("context", f"{d['context_tokens']:,} tokens (max_position_embeddings)"),
        ("audio", f"up to {d['max_audio_seconds']:.0f} s ({d['max_audio_seconds'] / 60:.0f} minutes) per request; "
                  "af3 transcribe takes longer recordings"),
        ("think", f"yes ({d['think_adapter']})" if d["think_adapter"] else "no think adapter"),
    ]
    return "\n".join(f"{k:<11} {v}" for k, v in rows)


def info(
    model: str = typer.Argument(..., help="'tiny', a checkpoint folder (HF or NVIDIA layout) or a downloaded hub id."),
    output_format: str = typer.Option("text", "--format", help="text or json."),
    dtype: str = typer.Option("auto", help="The dtype the memory figures assume: auto (the checkpoint's), float32, "
                              "bfloat16 or float16."),
    seq_len: int = typer.Option(None, help="Tokens per sequence for the memory figures (default: 10 minutes of "
                                "audio + 512)."),
) -> None:
    """Describe a checkpoint without loading its weights: layout, parameters per part, dtypes, the memory it needs,
    its think adapter, context and audio limits.

    \b
    --format json prints one object with these keys:
      model                     the checkpoint's absolute folder
      layout                    "hf" or "nvidia"
      parameters                {audio_encoder, projector, language_model, other, total}
      dtypes                    {NAME: {tensors, parameters, bytes}} as stored
      checkpoint_bytes          bytes of all tensors as stored
      run_dtype                 the dtype the figures below assume (--dtype)
      weights_bytes             parameters x the run dtype's size
      kv_cache_bytes_per_token  keys + values of one token, all layers
      memory                    {seq_len, sequences_1_bytes, sequences_8_bytes}: weights + KV cache
      think_adapter             the think adapter's folder, or null
      context_tokens            max_position_embeddings
      max_audio_seconds         the longest audio one request takes

    \b
    Example:
      af3 info tiny
      af3 info /models/audio-flamingo-3-hf --format json --dtype bfloat16
    """
    _check_format(output_format)
    data = checkpoint_info(_resolve_model(model), dtype, seq_len)
    typer.echo(json.dumps(data, indent=2) if output_format == "json" else _info_text(data))


# --------------------------------------------------------------------------------------------------- download
def _download_error(repo_id: str, e: Exception) -> str:
    kind = type(e).__name__
    detail = " ".join(str(e).split())[:200]
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if kind == "HFValidationError":
        return f"{repo_id!r} is not a valid hub repository id (expected org/name): {detail}"
    if offline or kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled"):
        if offline:
            return (f"cannot download {repo_id}: offline mode (HF_HUB_OFFLINE is set) and it is not in the local hub "
                    "cache; unset HF_HUB_OFFLINE, or copy the checkpoint folder here and pass it with --model")
        return f"cannot download {repo_id}: the hub cannot be reached (no network?) and it is not in the local cache"
    if kind == "GatedRepoError":
        return f"{repo_id} is gated: accept its terms on huggingface.co, then log in (hf auth login)"
    if kind == "RepositoryNotFoundError":
        return f"no repository {repo_id} on the hub (or it is private: log in with hf auth login)"
    if kind == "RevisionNotFoundError":
        return f"{repo_id} has no such revision: {detail}"
    return f"cannot download {repo_id} ({kind}): {detail}"


def download(
    repo_id: str = typer.Argument(..., help="Hub repository, e.g. nvidia/audio-flamingo-3-hf."),
    revision: str = typer.Option(None, help="A branch, tag or commit (default: main)."),
) -> None:
    """Download a checkpoint from the Hugging Face hub into the local hub cache and print its folder; afterwards
    --model REPO_ID finds it without the network.

    \b
    Example:
      af3 download nvidia/audio-flamingo-3-hf
      af3 ask clip.wav "What is it?" --model nvidia/audio-flamingo-3-hf
    """
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise AF3Error("af3 download needs huggingface_hub: pip install huggingface_hub") from None
    try:
        folder = snapshot_download(repo_id, revision=revision)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # noqa: BLE001 (the hub client raises many kinds; each becomes one line)
        raise AF3Error(_download_error(repo_id, e)) from None
    typer.echo(folder)


# ---------------------------------------------------------------------------------------------------- caption
def _check_audio_args(audios: list[str]) -> None:
    for a in audios:
        if "://" not in a and not os.path.exists(a):
            raise InputError(f"audio file not found: {a}")


def caption(
    audio: list[str] = typer.Argument(..., help="Audio files or http(s) URLs."),
    model: str = MODEL_OPT,
    output_format: str = typer.Option("text", "--format", help="text (PATH: caption per line) or json."),
    prompt: str = typer.Option(CAPTION_PROMPT, help="The instruction sent with each clip."),
    max_new_tokens: int = typer.Option(256, help="Upper bound on each caption's length in tokens."),
    quantize: str = QUANT_OPT,
    dtype: str = DTYPE_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Describe each audio clip, all clips batched together: one "PATH: caption" line per clip, or with
    --format json a list of {"audio": PATH, "caption": TEXT} in the order given.

    \b
    Example:
      af3 caption street.wav birds.flac --model /models/audio-flamingo-3-hf
      af3 caption *.wav --format json > captions.json
    """
    _check_format(output_format)
    if not prompt.strip():
        raise AF3Error("--prompt must not be empty")
    options = _options(max_new_tokens, 0.0, None, None, None, False, None)
    _check_audio_args(audio)
    engine = _engine(_resolve_model(model), dtype, device, quantize, max_batch_size=min(len(audio), 8))
    convs = [[{"role": "user", "content": [{"type": "audio", "path": a}, {"type": "text", "text": prompt}]}]
             for a in audio]
    outs = engine.generate(convs, options)
    rows = [{"audio": a, "caption": o.text} for a, o in zip(audio, outs, strict=True)]
    if output_format == "json":
        typer.echo(json.dumps(rows, indent=2, ensure_ascii=False))
    else:
        for row in rows:
            typer.echo(f"{row['audio']}: {' '.join(row['caption'].split())}")


# ------------------------------------------------------------------------------------------------------ bench
def bench_clip(seconds: float, seed: int):
    """``seconds`` of beeps in noise at 16 kHz (float32), different for each seed."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = int(round(seconds * 16000))
    t = np.arange(n) / 16000
    x = 0.02 * rng.standard_normal(n) + 0.3 * np.sin(2 * np.pi * (440 + 40 * seed) * t) * (np.sin(2 * np.pi * t) > 0.5)
    return x.astype(np.float32)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(
    model: str = MODEL_OPT,
    tokens: int = typer.Option(32, help="Tokens decoded per request in the decode measurements."),
    audio_s: float = typer.Option(30.0, "--audio-s", help="Seconds of (generated) audio per request."),
    quantize: str = QUANT_OPT,
    dtype: str = DTYPE_OPT,
    device: str = DEVICE_OPT,
) -> None:
    """Measure this install: time to first token for one request with --audio-s seconds of audio, and decode speed
    at batch 1 and batch 4 (after one warm-up; caches off, so every request encodes its audio).

    \b
    Decode speed: (tokens - 1) per request over the time beyond a one-token request (the same prefill).
    Comparisons with transformers and vLLM: the repository's benchmarks/ folder (benchmarks/README.md).

    \b
    Example:
      af3 bench --model /models/audio-flamingo-3-hf --dtype bfloat16
      af3 bench --tokens 64 --audio-s 10
    """
    from ..config import MAX_AUDIO_SECONDS
    from ..generation.options import GenerationOptions
    from ..system import cpu_description

    if not 2 <= tokens <= 4096:
        raise AF3Error(f"--tokens must be between 2 and 4096, got {tokens}")
    if not (math.isfinite(audio_s) and 0 < audio_s <= MAX_AUDIO_SECONDS):
        raise AF3Error(f"--audio-s must be a number of seconds in (0, {MAX_AUDIO_SECONDS:.0f}], got {audio_s}")
    engine = _engine(_resolve_model(model), dtype, device, quantize, max_batch_size=4)  # no prefix or audio cache
    clips = [bench_clip(audio_s, seed) for seed in range(4)]

    def conv(i: int) -> list[dict]:
        return [{"role": "user", "content": [{"type": "audio", "audio": clips[i]},
                                             {"type": "text", "text": CAPTION_PROMPT}]}]

    def run(batch: int, n: int) -> None:
        opts = GenerationOptions(max_new_tokens=n, min_new_tokens=n, temperature=0.0, keep_cache=False)
        engine.generate([conv(i) for i in range(batch)], opts)

    run(4, 2)  # warm-up: kernels, plans and buffers for both batch sizes
    run(1, 2)
    ttft = _timed(lambda: run(1, 1))
    rows = [(f"time to first token ({audio_s:g} s of audio, batch 1)", f"{ttft:.3f} s")]
    for batch in (1, 4):
        first = ttft if batch == 1 else _timed(lambda b=batch: run(b, 1))
        whole = _timed(lambda b=batch: run(b, tokens))
        rate = f"{batch * (tokens - 1) / (whole - first):.1f} tok/s" if whole > first \
            else "n/a (lost in timing noise: raise --tokens)"
        rows.append((f"decode, batch {batch} ({tokens} tokens per request)", rate))
    m = engine.model
    typer.echo(f"af3 bench · model {model or os.environ.get('AF3_MODEL') or 'tiny'}")
    typer.echo(f"CPU: {cpu_description()}")
    typer.echo(f"device {m.device} · dtype {str(m.dtype).removeprefix('torch.')}"
               + (" · int8 decoder" if quantize else ""))
    width = max(len(r[0]) for r in rows)
    typer.echo(f"{'measurement':<{width}}  value")
    for name, value in rows:
        typer.echo(f"{name:<{width}}  {value}")
    typer.echo("Comparisons with transformers and vLLM: the scripts in the af3 repository's benchmarks/ folder "
               "(results in benchmarks/README.md).")
