"""The exceptions of the checkpoint package."""

from __future__ import annotations


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, verified or loaded; the message names the path and the fault."""


class UnstorableValue(CheckpointError):
    """A value of a state that no checkpoint can hold; ``kind`` says what it is (``"set"``, ``"dict key of
    type tuple"``), for callers that word their own message."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


class RunLockedError(RuntimeError):
    """Another process holds the lock of a run directory."""
