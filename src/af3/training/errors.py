"""The training error (its own module so that every part of the trainer can raise it without an import cycle)."""

from __future__ import annotations

from ..errors import AF3Error


class TrainingError(AF3Error):
    """A run that cannot go on: too many unreadable files, an output folder in use, a checkpoint that does not fit."""
