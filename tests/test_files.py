"""af3.files.atomic_folder: a folder is replaced whole or not at all, keeps what the writer does not replace, and
gets the umask's modes."""

from __future__ import annotations

import os
import stat

import pytest
from pathlib import Path

from af3.errors import InputError
from af3.files import atomic_folder, umask, write_atomic


def tree(root) -> dict[str, bytes]:
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def test_a_new_folder_appears_complete_and_an_old_one_is_replaced_whole(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_folder(final) as tmp:
        assert not final.exists()  # nothing under the final name while writing
        (tmp_path / "ckpt_probe").write_text("x")
        Path(tmp, "a.bin").write_bytes(b"1")
    assert tree(final) == {"a.bin": b"1"}
    with atomic_folder(final) as tmp:
        Path(tmp, "b.bin").write_bytes(b"2")
        assert tree(final) == {"a.bin": b"1"}  # the old folder is intact until the swap
    assert tree(final) == {"b.bin": b"2"}
    assert [e for e in os.listdir(tmp_path) if e.startswith(".")] == []  # no leftovers


def test_a_failed_write_leaves_the_old_folder_and_no_temporary(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_folder(final, keep_existing=True) as tmp:
        Path(tmp, "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")
    assert tree(final) == {"model.safetensors": b"old"}
    assert [e for e in os.listdir(tmp_path) if e != "ckpt"] == []


def test_keep_existing_keeps_the_files_and_subfolders_the_writer_does_not_replace(tmp_path):
    final = tmp_path / "ckpt"
    (final / "think").mkdir(parents=True)
    (final / "tokenizer.json").write_text("tok")
    (final / "think" / "adapter_config.json").write_text("{}")
    (final / "model.safetensors").write_bytes(b"old")
    (final / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")
    stale = lambda rel: rel.startswith("model-")  # noqa: E731
    with atomic_folder(final, keep_existing=True, drop=stale) as tmp:
        assert os.listdir(tmp) == []  # the writer starts empty: it can never write into the old files
        Path(tmp, "model.safetensors").write_bytes(b"new")
        assert (final / "model.safetensors").read_bytes() == b"old"
    assert tree(final) == {"tokenizer.json": b"tok", os.path.join("think", "adapter_config.json"): b"{}",
                           "model.safetensors": b"new"}


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert umask() == 0o027
        with atomic_folder(tmp_path / "ckpt") as tmp:
            Path(tmp, "w.safetensors").write_bytes(b"w")
            os.mkdir(os.path.join(tmp, "sub"))
        write_atomic(tmp_path / "ckpt" / "x.json", b"{}")
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "ckpt") == 0o750 and mode(tmp_path / "ckpt" / "sub") == 0o750
    assert mode(tmp_path / "ckpt" / "w.safetensors") == 0o640 and mode(tmp_path / "ckpt" / "x.json") == 0o640


def test_a_file_in_the_way_is_refused_and_left_alone(tmp_path):
    target = tmp_path / "out"
    target.write_text("mine")
    with pytest.raises(InputError, match="is a file"), atomic_folder(target):
        pass
    assert target.read_text() == "mine"
    with pytest.raises(InputError, match="is a file"), atomic_folder(target / "sub"):
        pass
