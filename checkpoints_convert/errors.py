"""The converter's errors: one-line messages meant for the user."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A file that cannot be read or converted; the message is one line, meant for the user."""


class ForbiddenGlobalError(CheckpointError):
    """The pickle names a global outside the allow-list; nothing was called."""
