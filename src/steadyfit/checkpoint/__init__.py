"""Checkpoint storage: atomic, checksummed, pickle-free checkpoints of plain nested state."""

from steadyfit.checkpoint.async_writer import AsyncCheckpointWriter
from steadyfit.checkpoint.errors import CheckpointError, RunLockedError
from steadyfit.checkpoint.lock import RunLock
from steadyfit.checkpoint.store import CheckpointStore

__all__ = ["AsyncCheckpointWriter", "CheckpointError", "CheckpointStore", "RunLock", "RunLockedError"]
