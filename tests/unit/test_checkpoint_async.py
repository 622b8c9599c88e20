"""AsyncCheckpointWriter: caller snapshots, a background thread writes, one save at a time, errors surface."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from steadyfit.checkpoint import AsyncCheckpointWriter, CheckpointError, CheckpointStore


class GatedStore(CheckpointStore):
    """A real store whose saves wait for the test to open a gate, so the test controls the interleaving."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__(run_dir)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.active = 0
        self.max_active = 0
        self._count_lock = threading.Lock()

    def save(self, *args, **kwargs) -> Path:
        with self._count_lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        self.entered.set()
        try:
            self.gate.wait()
            return super().save(*args, **kwargs)
        finally:
            with self._count_lock:
                self.active -= 1


def test_saved_state_is_the_snapshot_taken_at_submit(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    weights = torch.ones(4)
    momentum = {"state": {0: {"exp_avg": torch.full((2,), 3.0)}}}
    writer = AsyncCheckpointWriter(store)
    writer.submit(1, {"w": weights}, {"optimizer": momentum})
    store.entered.wait()
    # Training continues to mutate the originals before the writer has written anything.
    weights.mul_(0)
    momentum["state"][0]["exp_avg"].add_(1)
    momentum["state"][0]["new"] = torch.zeros(1)
    store.gate.set()
    path = writer.wait()
    model, components, _ = store.load(path)
    assert torch.equal(model["w"], torch.ones(4))
    saved_state = components["optimizer"]["state"]
    assert list(saved_state) == [0] and list(saved_state[0]) == ["exp_avg"]
    assert torch.equal(saved_state[0]["exp_avg"], torch.full((2,), 3.0))


def test_each_save_holds_its_own_values_though_host_copies_are_refilled(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    weights = torch.zeros(1000)
    host_copies = []

    class Recording(CheckpointStore):
        def save(self, step, model_state, *args, **kwargs) -> Path:
            host_copies.append(model_state["w"])
            return store.save(step, model_state, *args, **kwargs)

    writer = AsyncCheckpointWriter(Recording(tmp_path))
    paths = []
    for step in (1, 2, 3):
        weights.fill_(float(step))
        writer.submit(step, {"w": weights}, {"trainer": {"step": step}})
        weights.fill_(-1.0)  # training moves on at once
        paths.append(writer.wait())
    writer.close()
    for step, path in zip((1, 2, 3), paths, strict=True):
        model, components, _ = store.load(path)
        assert torch.equal(model["w"], torch.full((1000,), float(step))), step
        assert components["trainer"]["step"] == step
    # One host buffer, refilled by every save once the previous one is written.
    assert host_copies[0] is host_copies[1] is host_copies[2]


def test_at_most_one_save_in_flight_and_submit_waits_for_the_previous(tmp_path: Path) -> None:
    store = GatedStore(tmp_path)
    writer = AsyncCheckpointWriter(store)
    order: list[str] = []
    writer.submit(1, {"w": torch.ones(1)}, {}, on_done=lambda path: order.append(path.name))
    store.entered.wait()
    assert writer.is_busy()

    second_returned = threading.Event()

    def submit_second() -> None:
        writer.submit(2, {"w": torch.ones(1)}, {}, on_done=lambda path: order.append(path.name))
        order.append("second submit returned")
        second_returned.set()

    thread = threading.Thread(target=submit_second)
    thread.start()
    # A negative check: while save 1 is gated, the second submit must stay blocked.
    assert not second_returned.wait(timeout=0.3)
    store.gate.set()
    thread.join()
    assert writer.wait() == store.path_for(2)
    # Save 1 finished before the second submit returned; save 2 may finish before that thread records it.
    assert sorted(order) == ["second submit returned", "step-00000001", "step-00000002"]
    assert order.index("step-00000001") < order.index("second submit returned")
    assert store.max_active == 1
    assert writer.blocked_s > 0


def test_writer_error_surfaces_on_wait_with_its_cause(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # A file where the checkpoints directory should be: the background mkdir fails for real.
    (run_dir / "checkpoints").write_text("in the way")
    writer = AsyncCheckpointWriter(CheckpointStore(run_dir))
    writer.submit(3, {"w": torch.ones(1)}, {})
    with pytest.raises(CheckpointError, match=r"step 3 failed.*step-00000003") as info:
        writer.wait()
    assert isinstance(info.value.__cause__, CheckpointError)
    assert writer.wait() is None, "an error is reported once"


def test_writer_error_surfaces_on_next_submit_and_close(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    writer = AsyncCheckpointWriter(store)
    writer.submit(1, {"w": torch.ones(1)}, {}, on_done=lambda path: 1 / 0)
    with pytest.raises(CheckpointError, match="step 1 failed") as info:
        writer.submit(2, {"w": torch.ones(1)}, {})
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    writer.submit(2, {"w": torch.ones(1)}, {}, on_done=lambda path: 1 / 0)
    with pytest.raises(CheckpointError, match="step 2 failed"):
        writer.close()
    with pytest.raises(RuntimeError, match="closed"):
        writer.submit(3, {"w": torch.ones(1)}, {})


def test_on_done_runs_in_the_writer_thread_after_commit(tmp_path: Path) -> None:
    store = CheckpointStore(tmp_path)
    seen: list[tuple[Path, bool, list[str]]] = []

    def on_done(path: Path) -> None:
        seen.append((path, threading.current_thread() is threading.main_thread(), store.verify(path)))

    with AsyncCheckpointWriter(store) as writer:
        writer.submit(8, {"w": torch.ones(1)}, {"trainer": {"step": 8}}, on_done=on_done)
    assert seen == [(store.path_for(8), False, [])]
    assert writer.last_path == store.path_for(8)


def test_unsupported_values_fail_in_the_callers_thread(tmp_path: Path) -> None:
    writer = AsyncCheckpointWriter(CheckpointStore(tmp_path))
    with pytest.raises(CheckpointError, match=r"components\.trainer\.callback"):
        writer.submit(1, {"w": torch.ones(1)}, {"trainer": {"callback": print}})
    assert not writer.is_busy()
    assert writer.wait() is None
