"""Build a tiny valid AF3 checkpoint (HF layout, from :mod:`af3.tiny`) and break one thing of a copy of it.

Every helper takes the folder of a copy and changes one file in place: a JSON key, a safetensors header entry, a
tensor's values, the bytes of a file. The tests in ``test_bad_checkpoints.py`` pair each with the error it must give.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
#: Two tensors of the same shape and dtype (for overlapping offsets), and one to poison.
Q0 = "language_model.model.layers.0.self_attn.q_proj.weight"
Q1 = "language_model.model.layers.1.self_attn.q_proj.weight"
UP0 = "language_model.model.layers.0.mlp.up_proj.weight"


def make_tiny(folder: str) -> str:
    """A complete tiny checkpoint: model (64 wide, 2 layers, ~0.5k vocabulary) and processor files."""
    from af3 import AF3Model
    from af3.config import GenerationConfig
    from af3.tiny import tiny_config, train_tokenizer, write_tokenizer_files

    tok = train_tokenizer()
    torch.manual_seed(0)
    gen = GenerationConfig(bos_token_id=0, eos_token_id=2, pad_token_id=0, max_new_tokens=8)
    AF3Model(tiny_config(tok.get_vocab_size()), gen).save_pretrained(folder)
    write_tokenizer_files(folder, tok)
    return folder


# ---------------------------------------------------------------------------------------------- JSON files
def read(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)


def write(folder: str, name: str, data: Any) -> None:
    with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
        json.dump(data, f)


def set_key(name: str, dotted: str, value: Any) -> Callable[[str], None]:
    """``set_key("config.json", "text_config.num_hidden_layers", "four")`` as a corruption."""

    def corrupt(folder: str) -> None:
        data = read(folder, name)
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
        write(folder, name, data)

    return corrupt


def raw(name: str, content: bytes | str) -> Callable[[str], None]:
    """Replace a file's bytes."""

    def corrupt(folder: str) -> None:
        with open(os.path.join(folder, name), "wb") as f:
            f.write(content.encode() if isinstance(content, str) else content)

    return corrupt


def remove(name: str) -> Callable[[str], None]:
    return lambda folder: os.remove(os.path.join(folder, name))


# ---------------------------------------------------------------------------------------------- safetensors
def read_header(path: str) -> tuple[dict, bytes]:
    with open(path, "rb") as f:
        blob = f.read()
    size = struct.unpack("<Q", blob[:8])[0]
    return json.loads(blob[8:8 + size]), blob[8 + size:]


def write_header(path: str, header: Any, data: bytes) -> None:
    text = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)


def header_edit(edit: Callable[[dict], Any], name: str = WEIGHTS) -> Callable[[str], None]:
    """Rewrite the safetensors header with ``edit(header)`` (in place, or the header it returns); data unchanged."""

    def corrupt(folder: str) -> None:
        path = os.path.join(folder, name)
        header, data = read_header(path)
        out = edit(header)
        write_header(path, header if out is None else out, data)

    return corrupt


def raw_header(text: bytes, size: int | None = None) -> Callable[[str], None]:
    """A weight file whose header is ``text`` (with a claimed length of ``size``)."""

    def corrupt(folder: str) -> None:
        with open(os.path.join(folder, WEIGHTS), "wb") as f:
            f.write(struct.pack("<Q", len(text) if size is None else size) + text + b"\0" * 64)

    return corrupt


def truncate(nbytes: int, name: str = WEIGHTS) -> Callable[[str], None]:
    """Keep only the first ``nbytes`` of a file (negative: drop that many from its end)."""

    def corrupt(folder: str) -> None:
        path = os.path.join(folder, name)
        with open(path, "rb") as f:
            blob = f.read()
        with open(path, "wb") as f:
            f.write(blob[:nbytes])

    return corrupt


def tensors_edit(edit: Callable[[dict[str, torch.Tensor]], Any], name: str = WEIGHTS) -> Callable[[str], None]:
    """Load the weights, ``edit(state)`` in place, save them again (a valid file with other contents)."""

    def corrupt(folder: str) -> None:
        path = os.path.join(folder, name)
        state = load_file(path)
        edit(state)
        save_file(state, path, metadata={"format": "pt"})

    return corrupt


def poison(name: str, value: float, dtype: torch.dtype | None = None, file: str = WEIGHTS) -> Callable[[str], None]:
    """One element of tensor ``name`` set to ``value`` (NaN, inf, a huge number), optionally in another dtype."""

    def edit(state: dict[str, torch.Tensor]) -> None:
        t = state[name].to(dtype or state[name].dtype).clone()
        t.view(-1)[7] = value
        state[name] = t

    return tensors_edit(edit, file)


def shard(folder: str, extra: Callable[[dict, dict[str, dict]], None] | None = None) -> None:
    """Split the weights into two shards plus an index; ``extra(weight_map, shards)`` may break them first."""
    state = load_file(os.path.join(folder, WEIGHTS))
    os.remove(os.path.join(folder, WEIGHTS))
    names = sorted(state)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {n: f for f, ns in files.items() for n in ns}
    shards = {f: {n: state[n] for n in ns} for f, ns in files.items()}
    if extra is not None:
        extra(weight_map, shards)
    for f, tensors in shards.items():
        save_file(tensors, os.path.join(folder, f), metadata={"format": "pt"})
    write(folder, "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})


def sharded(extra: Callable[[dict, dict[str, dict]], None]) -> Callable[[str], None]:
    return lambda folder: shard(folder, extra)


def pickled(obj: Any, raw_pickle: bool = False) -> Callable[[str], None]:
    """Replace the safetensors weights by ``pytorch_model.bin`` holding ``obj`` (``torch.save`` or plain pickle)."""

    def corrupt(folder: str) -> None:
        import pickle

        os.remove(os.path.join(folder, WEIGHTS))
        path = os.path.join(folder, "pytorch_model.bin")
        if raw_pickle:
            with open(path, "wb") as f:
                pickle.dump(obj, f)
        else:
            torch.save(obj, path)

    return corrupt


def make_adapter(folder: str, r: Any = 4, alpha: Any = 8, a_shape: tuple = (4, 64), b_shape: tuple = (64, 4),
                 value: float = 0.01) -> str:
    """A peft LoRA adapter for layer 0's q_proj in ``folder/think`` (the layout the checkpoints ship)."""
    think = os.path.join(folder, "think")
    os.makedirs(think, exist_ok=True)
    write(think, "adapter_config.json", {"peft_type": "LORA", "r": r, "lora_alpha": alpha})
    prefix = "base_model.model.language_model.model.layers.0.self_attn.q_proj"
    a = torch.full(a_shape, 0.01)
    a.view(-1)[0] = value
    save_file({f"{prefix}.lora_A.weight": a, f"{prefix}.lora_B.weight": torch.full(b_shape, 0.01)},
              os.path.join(think, "adapter_model.safetensors"))
    return think


def chain(*corruptions: Callable[[str], None]) -> Callable[[str], None]:
    def corrupt(folder: str) -> None:
        for c in corruptions:
            c(folder)

    return corrupt


def tree(root: str) -> dict[str, bytes]:
    """Relative path → bytes of every file under ``root``."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out
