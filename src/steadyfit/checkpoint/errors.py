"""The exceptions of the checkpoint package."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, verified or loaded; the message names the path and the fault."""


class RunLockedError(RuntimeError):
    """Another process holds the lock of a run directory."""
