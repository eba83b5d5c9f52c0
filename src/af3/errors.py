"""Every failure a user can cause is an :class:`AF3Error` with a message that says what to do.

The CLI maps these to exit code 2 and one readable line. Each class names the HTTP status that fits it, for any
HTTP front end built on the library.
"""

from __future__ import annotations


class AF3Error(Exception):
    """Base class for errors caused by input, files or configuration (not by bugs)."""

    #: The HTTP status that fits this kind of error (a client's mistake: 400).
    status_code: int = 400


class AudioError(AF3Error, ValueError):
    """Audio that cannot be read, decoded or used (empty, NaN/inf, wrong shape, unknown format)."""


class InputError(AF3Error, ValueError):
    """A request that does not fit the model: bad conversation, placeholder/audio mismatch, wrong tensor shapes."""


class CheckpointError(AF3Error):
    """A checkpoint folder that is missing files or holds tensors that do not match the model."""

    status_code = 500
