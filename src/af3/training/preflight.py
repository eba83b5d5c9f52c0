"""Checks before a run touches anything: the files and folders a config names are what they should be, and the
output folder can be written and is not in use by another run.

:func:`check_inputs` runs on every process (it only looks at files); :func:`open_output` runs on rank 0, creates
the output folder, takes its lock (``flock`` on the folder itself, released when the process ends, even by
SIGKILL) and removes what an interrupted run left behind. Manifests are only opened, not parsed, here: reading
them (and their audio headers) is the data loader's job, and its errors name ``file:line``.
"""

from __future__ import annotations

import os

from ..errors import InputError
from .checkpoint import clean_leftovers
from .errors import TrainingError
from .mixture import parse_mixture
from .sections import TrainConfig

try:
    import fcntl
except ImportError:  # not on POSIX: no lock
    fcntl = None  # type: ignore[assignment]

_MODEL_FILES = ("config.json", "adapter_config.json")


def check_inputs(cfg: TrainConfig) -> None:
    """An :class:`InputError` naming the config key of the first path that cannot work."""
    path = cfg.model.path
    if not os.path.exists(path):
        raise InputError(f"config key 'model.path': {path} does not exist; give the checkpoint folder to start from")
    if not os.path.isdir(path):
        raise InputError(f"config key 'model.path': {path} is a file, not a checkpoint folder; give the folder that "
                         "holds config.json and the weights")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _MODEL_FILES):
        raise InputError(f"config key 'model.path': {path} holds no config.json; it is not a checkpoint folder")
    try:
        parse_mixture(cfg.data.mixture, cfg.data.manifests, must_exist=True)
    except InputError as e:
        raise InputError(f"config key 'data.mixture': {e}") from None
    if cfg.data.eval and not os.path.isfile(cfg.data.eval):
        what = "is a folder" if os.path.isdir(cfg.data.eval) else "does not exist"
        raise InputError(f"config key 'data.eval': {cfg.data.eval} {what}; give an evaluation manifest file")
    _check_output_path(cfg.output)


def _check_output_path(output: str) -> None:
    if os.path.exists(output) and not os.path.isdir(output):
        raise InputError(f"config key 'output': {output} is a file, not a folder; choose a folder path")
    existing = output
    while not os.path.exists(existing):
        parent = os.path.dirname(existing)
        if parent == existing:
            break
        existing = parent
    if not os.path.isdir(existing):
        raise InputError(f"config key 'output': {existing} is a file, so {output} cannot be a folder; choose "
                         "another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"config key 'output': cannot write to {existing} (permission denied or a read-only file "
                         "system); choose a folder you can write to")


def open_output(output: str) -> int | None:
    """Create ``output``, lock it for this run and clean what a crashed run left there; returns the lock (a file
    descriptor to pass to :func:`close_output`), or None where folders cannot be locked."""
    _check_output_path(output)
    try:
        os.makedirs(output, exist_ok=True)
    except OSError as e:
        raise InputError(f"config key 'output': cannot create {output}: {e.strerror or e}") from None
    fd = None
    if fcntl is not None:
        try:
            fd = os.open(output, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise TrainingError(f"the output folder {output} is in use by another training run; wait for it to end "
                                "or choose another output folder") from None
        except OSError:  # a file system without locks: go on unlocked
            if fd is not None:
                os.close(fd)
            fd = None
    clean_leftovers(output)
    return fd


def close_output(lock: int | None) -> None:
    if lock is not None:
        os.close(lock)  # releases the flock
