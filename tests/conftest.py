"""Shared fixtures: small deterministic models and data built after seeding."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Fewer threads: less contention on 2-core CI machines and identical reductions between runs.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Under `pytest -n 2` (pytest-xdist, as `make test` runs it), the tests that launch groups of training
# processes (torchrun, SIGKILL/SIGTERM children) share one worker and run one at a time: two of them at once
# on a 2-core machine would compete for the cores their signal-timing tests rely on.
_PROCESS_HEAVY = ("distributed", "resume")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if Path(item.path).parent.name in _PROCESS_HEAVY:
            item.add_marker(pytest.mark.xdist_group("processes"))
