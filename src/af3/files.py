"""Writing folders so that nothing a user has is ever half-replaced: build the new folder next to the old one,
flush it to disk, then swap the two in one step.

:func:`atomic_folder` is how every checkpoint, converted model and training checkpoint is written. A crash or a
power loss at any moment leaves either the old folder or the new one, complete, under the final name (plus at
most a hidden ``.<name>.tmp-*`` / ``.<name>.old-*`` sibling, which the next write removes). Files and folders get
the modes the process umask gives them (``tempfile`` would make them private).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator

from .errors import InputError

_RENAME_EXCHANGE = 2  # linux/fs.h


def umask() -> int:
    """The process umask: read from ``/proc/self/status`` where there is one (setting and restoring it, the only
    portable way, briefly changes it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (new names, renames) to disk; a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(fd)


def finish_tree(root: str) -> None:
    """Give everything under ``root`` (and ``root``) the umask's modes, then flush files, then folders."""
    mask = umask()
    for folder, dirs, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)
                fsync_file(path)
        for name in dirs:
            os.chmod(os.path.join(folder, name), 0o777 & ~mask)
    os.chmod(root, 0o777 & ~mask)
    for folder, _, _ in os.walk(root, topdown=False):
        fsync_dir(folder)


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where that is not available."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), b)


def _carry_over(old: str, new: str, drop: Callable[[str], bool] | None) -> None:
    """Hard-link (or copy, where links are refused) into ``new`` every file of ``old`` that ``new`` does not have,
    unless ``drop(relative path)`` says to leave it behind. Runs after the writer, so a writer never writes into a
    linked file (which would change the old folder's file too)."""
    for folder, dirs, files in os.walk(old):
        rel = os.path.relpath(folder, old)
        target = os.path.normpath(os.path.join(new, rel))
        if not os.path.isdir(target):
            dirs[:] = []  # the writer put a file where the old folder had a folder: the writer wins
            continue
        for name in files:
            path, dest = os.path.join(folder, name), os.path.join(target, name)
            if os.path.lexists(dest) or (drop is not None and drop(os.path.normpath(os.path.join(rel, name)))):
                continue
            try:
                os.link(path, dest)
            except OSError:
                shutil.copy2(path, dest)
        for name in dirs:
            dest = os.path.join(target, name)
            if not os.path.lexists(dest):
                os.mkdir(dest)


def _clean_leftovers(parent: str, name: str) -> None:
    for entry in os.listdir(parent):
        if entry.startswith((f".{name}.tmp-", f".{name}.old-")):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(final: str | os.PathLike, keep_existing: bool = False,
                  drop: Callable[[str], bool] | None = None) -> Iterator[str]:
    """``with atomic_folder(path) as tmp: <write into tmp>``: on success ``tmp`` becomes ``path``, replacing a
    folder that was there; on an exception ``path`` is untouched and ``tmp`` is removed.

    ``keep_existing=True`` adds to ``tmp``, once the writer is done, the files of the existing folder that it did
    not write (hard links, so nothing is copied), except those ``drop(relative path)`` names (stale shards, say):
    a save that writes some of a folder's files (the weights next to a processor's files) keeps the rest.
    A ``path`` that is a file, not a folder, is an :class:`InputError` (nothing is written).
    """
    final = os.path.abspath(os.fspath(final))
    parent, name = os.path.dirname(final), os.path.basename(final)
    if os.path.exists(final) and not os.path.isdir(final):
        raise InputError(f"{final} is a file, not a folder; choose a folder path")
    if not os.path.isdir(parent):
        if os.path.exists(parent):
            raise InputError(f"{parent} is a file, not a folder")
        os.makedirs(parent, exist_ok=True)
    _clean_leftovers(parent, name)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        yield tmp
        if keep_existing and os.path.isdir(final):
            _carry_over(final, tmp, drop)
        finish_tree(tmp)
        if not os.path.isdir(final):
            os.rename(tmp, final)
        elif _exchange(tmp, final):
            shutil.rmtree(tmp, ignore_errors=True)  # (now the old folder)
        else:
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(old)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write one file so that ``path`` holds either its old contents or all of ``data`` (flushed to disk)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
        fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
