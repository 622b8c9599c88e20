"""The storage writer of sharded saves: DCP's safetensors writer, remembering which files this rank wrote.

A module of its own because importing torch.distributed.checkpoint costs about a second: it is imported
only when a sharded save runs.
"""

from __future__ import annotations

import os
from typing import Any

from torch.distributed.checkpoint import HuggingFaceStorageWriter
from torch.futures import Future


class ShardWriter(HuggingFaceStorageWriter):
    """``HuggingFaceStorageWriter(path, save_distributed=True)`` that records this rank's write results.

    With ``save_distributed`` each rank writes its slices to ``shard-<rank+1, 5 digits>-model-00001-of-
    00001.safetensors``, or nothing when its save plan is empty; the write results say which, so no rank
    has to guess the file name or look for it in a directory listing.

    Example:
        >>> import tempfile, torch
        >>> from pathlib import Path
        >>> from steadyfit.checkpoint.sharded import write_shards  # a one-process save through ShardWriter
        >>> write_shards(Path(tempfile.mkdtemp()), {"w": torch.ones(2)})
        ['shard-00001-model-00001-of-00001.safetensors']
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        super().__init__(str(path), save_distributed=True)
        self._writes: list[Future[Any]] = []

    def write_data(self, plan: Any, planner: Any) -> Future[Any]:
        future = super().write_data(plan, planner)
        self._writes.append(future)
        return future

    def written_files(self) -> list[str]:
        """Names (inside the save directory) of the files this rank wrote, once ``dcp.save`` returned."""
        return sorted(
            {result.storage_data.relative_path for future in self._writes for result in future.wait()}
        )
