"""A save leaves the copy of the optimizer state to the writer thread, overlapping the next step's forward
and backward: the loop waits for it before the optimizer step and before any callback, so the checkpoint
still holds the state of its own boundary. The copies are slowed down here, so that a missing wait would
let the next step (or a callback) write the state before it is copied."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from helpers import assert_bitwise_equal, base_config, final_weights, make_mlp, make_regression
from steadyfit import Callback, Trainer, seed_everything
from steadyfit.checkpoint import AsyncCheckpointWriter, CheckpointError, CheckpointStore, async_writer
from steadyfit.checkpoint.payload import snapshot
from steadyfit.checkpoint.staging import DeferredCopies

CE = torch.nn.functional.cross_entropy


class EveryCopyDeferred(DeferredCopies):
    """The tests' states are small: defer them all the same (a real run defers from MIN_BYTES up)."""

    MIN_BYTES = 0


def test_a_deferred_tensor_is_copied_when_the_copies_run_every_other_one_at_once() -> None:
    weights, moment = torch.ones(3), torch.full((2, 2), 5.0)
    later = EveryCopyDeferred([moment])
    copy = snapshot({"w": weights, "state": {"m": moment, "m_row": moment[0]}}, deferred=later)
    assert later.nbytes == (4 + 2) * 4  # the moment and a view of it: both live in its memory
    weights.zero_()
    moment.fill_(7.0)  # before run(): what run() copies
    assert torch.equal(copy["w"], torch.ones(3))
    later.run()
    assert torch.equal(copy["state"]["m"], torch.full((2, 2), 7.0))
    assert torch.equal(copy["state"]["m_row"], torch.full((2,), 7.0))
    assert later.nbytes == 0


def test_from_8_mib_of_state_up_the_copy_is_deferred() -> None:
    moments = [torch.zeros(1 << 20), torch.zeros(1 << 20)]  # 4 + 4 MiB
    later = DeferredCopies(moments)
    snapshot({"m": moments}, deferred=later)
    assert later.nbytes == 8 << 20


def test_a_small_state_is_copied_at_once() -> None:
    moment = torch.zeros(DeferredCopies.MIN_BYTES // 4 - 1)
    later = DeferredCopies([moment])
    copy = snapshot({"m": moment}, deferred=later)
    assert later.nbytes == 0
    moment.fill_(1.0)
    assert copy["m"].abs().sum() == 0


def test_deferred_copies_refill_the_host_buffers_of_the_save_before(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(async_writer, "DeferredCopies", EveryCopyDeferred)
    moment = torch.zeros(1000)
    seen = []

    class Recording(CheckpointStore):
        def save(self, step, model_state, components, **kwargs) -> Path:
            seen.append(components["optimizer"]["m"])
            return super().save(step, model_state, components, **kwargs)

    store = Recording(tmp_path)
    with AsyncCheckpointWriter(store) as writer:
        for step in (1, 2):
            moment.fill_(float(step))
            writer.submit(step, {"w": torch.ones(1)}, {"optimizer": {"m": moment}}, copy_later=[moment])
            writer.wait_staged()
            moment.fill_(-1.0)
            writer.wait()
    assert seen[0] is seen[1]
    for step in (1, 2):
        _, components, _ = store.load(store.path_for(step))
        assert torch.equal(components["optimizer"]["m"], torch.full((1000,), float(step)))


def test_wait_staged_blocks_until_the_background_copy_is_made(tmp_path: Path, monkeypatch) -> None:
    gate, copying = threading.Event(), threading.Event()

    class GatedCopies(EveryCopyDeferred):
        def run(self) -> None:
            copying.set()
            gate.wait()
            super().run()

    monkeypatch.setattr(async_writer, "DeferredCopies", GatedCopies)
    moment = torch.full((4,), 3.0)
    writer = AsyncCheckpointWriter(CheckpointStore(tmp_path))
    writer.submit(1, {"w": torch.ones(1)}, {"optimizer": {"m": moment}}, copy_later=[moment])
    copying.wait()
    returned = threading.Event()
    waiter = threading.Thread(target=lambda: (writer.wait_staged(), returned.set()))
    waiter.start()
    # A negative check: while the copy is held back, wait_staged must not return.
    assert not returned.wait(timeout=0.3)
    gate.set()
    waiter.join()
    assert writer.blocked_s >= 0.3
    moment.zero_()  # the caller's next optimizer step
    _, components, _ = writer.store.load(writer.wait())
    assert torch.equal(components["optimizer"]["m"], torch.full((4,), 3.0))
    writer.wait_staged()  # nothing left to wait for: returns at once


def test_a_failed_copy_releases_the_caller_and_commits_nothing(tmp_path: Path, monkeypatch) -> None:
    class FailingCopies(EveryCopyDeferred):
        def run(self) -> None:
            raise OSError("copy failed")

    monkeypatch.setattr(async_writer, "DeferredCopies", FailingCopies)
    moment = torch.ones(4)
    writer = AsyncCheckpointWriter(CheckpointStore(tmp_path))
    writer.submit(1, {"w": torch.ones(1)}, {"optimizer": {"m": moment}}, copy_later=[moment])
    writer.wait_staged()  # returns: the thread gave up on its copies
    with pytest.raises(CheckpointError, match="step 1 failed: copy failed"):
        writer.wait()
    assert writer.store.list_checkpoints() == []


class Interrupted(Exception):
    """What the test's SIGINT handler raises, standing for a Ctrl-C's KeyboardInterrupt."""


def _blocked_in(thread_id: int, function: str) -> bool:
    """Whether the thread waits on a threading primitive called from ``function`` (inside its try)."""
    frame = sys._current_frames().get(thread_id)
    waiting = False
    while frame is not None:
        if frame.f_code.co_name == "wait":
            waiting = True
        elif frame.f_code.co_name == function:
            return waiting
        frame = frame.f_back
    return False


@pytest.mark.parametrize("waiting_in", ["wait_staged", "close"])
def test_a_ctrl_c_returns_to_the_caller_only_after_the_copies(
    tmp_path: Path, monkeypatch, waiting_in
) -> None:
    gate, copying, copied = threading.Event(), threading.Event(), threading.Event()

    class GatedCopies(EveryCopyDeferred):
        def run(self) -> None:
            copying.set()
            gate.wait()
            super().run()
            copied.set()

    def interrupt(signum, frame):
        raise Interrupted

    monkeypatch.setattr(async_writer, "DeferredCopies", GatedCopies)
    previous = signal.signal(signal.SIGINT, interrupt)
    moment = torch.full((4,), 3.0)
    writer = AsyncCheckpointWriter(CheckpointStore(tmp_path))
    writer.submit(1, {"w": torch.ones(1)}, {"optimizer": {"m": moment}}, copy_later=[moment])
    copying.wait()

    caller = threading.get_ident()
    # Where the caller blocks: wait_staged in _wait_through_interrupts, close in _join_thread.
    blocking_function = "_wait_through_interrupts" if waiting_in == "wait_staged" else "_join_thread"

    def ctrl_c_then_release() -> None:
        deadline = time.monotonic() + 10  # a caller that never blocks there fails the test, not hangs it
        while not _blocked_in(caller, blocking_function) and time.monotonic() < deadline:
            time.sleep(0.005)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.3)
        gate.set()

    threading.Thread(target=ctrl_c_then_release).start()
    try:
        with pytest.raises(Interrupted):
            getattr(writer, waiting_in)()
        assert copied.is_set(), "the Ctrl-C reached the caller while the thread still read its tensors"
    finally:
        signal.signal(signal.SIGINT, previous)
        gate.set()
    moment.zero_()
    writer.close() if waiting_in == "wait_staged" else writer.wait()
    _, components, _ = writer.store.load(writer.store.path_for(1))
    assert torch.equal(components["optimizer"]["m"], torch.full((4,), 3.0))


def test_a_ctrl_c_while_the_thread_starts_waits_for_its_copies(tmp_path: Path, monkeypatch) -> None:
    """Thread.start() waits for the new thread to run: a Ctrl-C there reaches the caller once the thread
    already copies its tensors."""
    copied = threading.Event()

    class SlowCopies(EveryCopyDeferred):
        def run(self) -> None:
            time.sleep(0.3)
            super().run()
            copied.set()

    class InterruptedStart(threading.Thread):
        def start(self) -> None:
            super().start()
            raise Interrupted

    monkeypatch.setattr(async_writer, "DeferredCopies", SlowCopies)
    monkeypatch.setattr(async_writer.threading, "Thread", InterruptedStart)
    moment = torch.full((4,), 3.0)
    writer = AsyncCheckpointWriter(CheckpointStore(tmp_path))
    with pytest.raises(Interrupted):
        writer.submit(1, {"w": torch.ones(1)}, {"optimizer": {"m": moment}}, copy_later=[moment])
    assert copied.is_set()
    moment.zero_()
    assert writer.close() == writer.store.path_for(1)
    _, components, _ = writer.store.load(writer.store.path_for(1))
    assert torch.equal(components["optimizer"]["m"], torch.full((4,), 3.0))


@pytest.fixture
def slow_copies(monkeypatch):
    """Every background copy starts 0.2 s late: far longer than the tiny model's next forward and
    backward, so without the loop's waits its optimizer step would write the state first."""

    deferred: list[int] = []

    class SlowCopies(EveryCopyDeferred):
        def run(self) -> None:
            deferred.append(self.nbytes)
            if self.nbytes:
                time.sleep(0.2)
            super().run()

    monkeypatch.setattr(async_writer, "DeferredCopies", SlowCopies)
    return deferred


def _fit(run_dir: Path, callbacks=(), **overrides) -> Trainer:
    seed_everything(0)
    values = {"batch_size": 8, "max_steps": 6, "max_epochs": 2, "save_every": 1, "keep_last": 10}
    values.update(overrides)
    config = base_config(run_dir, **values)
    data = make_regression(40)
    trainer = Trainer(make_mlp(), config, train_data=data, loss_fn=CE, callbacks=list(callbacks))
    trainer.fit()
    return trainer


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_every_checkpoint_resumes_exactly_with_its_state_copied_during_the_next_step(
    tmp_path: Path, slow_copies, optimizer: str
) -> None:
    overrides = {"optimizer": optimizer, "momentum": 0.9 if optimizer == "sgd" else 0.0, "lr": 0.05}
    _fit(tmp_path / "full", **overrides)
    # Every save left the optimizer state, all of it, to the writer thread.
    parameters = list(make_mlp().parameters())
    values = sum(p.numel() for p in parameters)
    # AdamW: two moments and a float32 step count per parameter; SGD: one momentum buffer.
    state_bytes = 4 * (2 * values + len(parameters)) if optimizer == "adamw" else 4 * values
    assert len(slow_copies) >= 6 and set(slow_copies) == {state_bytes}
    expected = final_weights(tmp_path / "full" / "run")
    for step in (2, 4):
        checkpoint = tmp_path / "full" / "run" / "checkpoints" / f"step-{step:08d}"
        _fit(tmp_path / f"from-{step}", resume=str(checkpoint), **overrides)
        assert_bitwise_equal(final_weights(tmp_path / f"from-{step}" / "run"), expected)


class ResetMomentsAtEpochStart(Callback):
    """Lightning users' habit: reset the optimizer's moments when a new phase starts (here every epoch)."""

    def __init__(self) -> None:
        self.before_reset: list[torch.Tensor] = []

    def on_epoch_start(self, trainer, state) -> None:
        moments = [s["exp_avg"] for s in trainer.optimizer.state.values()]
        if moments:
            self.before_reset.append(moments[0].clone())
            for moment in moments:
                moment.zero_()


def test_a_callback_after_a_save_sees_the_copy_finished(tmp_path: Path, slow_copies) -> None:
    reset = ResetMomentsAtEpochStart()
    # 40 samples of batch 8: 5 steps an epoch, the epoch's end saved and then the next epoch's start.
    trainer = _fit(tmp_path, callbacks=[reset], max_steps=7, save_every="epoch")
    store = CheckpointStore(tmp_path / "run")
    _, components, _ = store.load(store.path_for(5))
    saved = components["state"]["optimizer"]["state"][0]["exp_avg"]
    assert len(reset.before_reset) == 1 and saved.abs().sum() > 0
    assert torch.equal(saved, reset.before_reset[0])
    assert trainer.state.step == 7


class AliasingSGD(torch.optim.SGD):
    """An optimizer that keeps its parameter itself in its state (as some mixed-precision optimizers keep
    a float32 master, which for a float32 parameter is the parameter)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            for parameter in group["params"]:
                self.state[parameter]["master"] = parameter.detach()
        return loss


class TaggedParameter(torch.nn.Parameter):
    """A Parameter subclass, as libraries define them to mark parameters (quantised, sharded, tied)."""


class WritingForward(torch.nn.Module):
    """A forward that writes its weights, as an Embedding with max_norm does (which renormalises the rows
    it looks up, the same however often); this one shifts them, so a copy after it would show."""

    def __init__(self, bias_kind: type = torch.nn.Parameter) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(6, 3)
        self.linear.bias = bias_kind(self.linear.bias.detach().clone())

    def forward(self, inputs):
        with torch.no_grad():
            self.linear.bias.add_(0.125)
        return self.linear(inputs)


@pytest.mark.parametrize("bias_kind", [torch.nn.Parameter, TaggedParameter])
def test_weights_a_forward_writes_are_copied_at_once_even_when_the_optimizer_aliases_them(
    tmp_path: Path, slow_copies, bias_kind: type
) -> None:
    def fit(run_dir: Path, **overrides) -> None:
        seed_everything(0)
        values = {"batch_size": 8, "max_steps": 6, "save_every": 1, "keep_last": 10}
        config = base_config(run_dir, **{**values, **overrides})
        model = WritingForward(bias_kind)
        optimizer = AliasingSGD(model.parameters(), lr=0.1)
        Trainer(model, config, train_data=make_regression(40), loss_fn=CE, optimizer=optimizer).fit()

    fit(tmp_path / "full")
    checkpoint = tmp_path / "full" / "run" / "checkpoints" / "step-00000003"
    fit(tmp_path / "resumed", resume=str(checkpoint))
    expected = final_weights(tmp_path / "full" / "run")
    assert_bitwise_equal(final_weights(tmp_path / "resumed" / "run"), expected)


def test_a_checkpoint_committed_while_a_save_waited_is_announced_at_that_boundary(
    tmp_path: Path, monkeypatch
) -> None:
    """Writes slower than a step: each save waits for the previous one's commit, which on_checkpoint_saved
    hears of at that boundary, not one later (when a raising step would lose it)."""
    write = CheckpointStore.save

    def slow_write(self, *args, **kwargs):
        time.sleep(0.2)
        return write(self, *args, **kwargs)

    monkeypatch.setattr(CheckpointStore, "save", slow_write)
    heard: list[tuple[int, str]] = []

    class Announced(Callback):
        def on_checkpoint_saved(self, trainer, state, path) -> None:
            heard.append((state.step, Path(path).name))

    _fit(tmp_path, callbacks=[Announced()], max_steps=5)
    assert heard[:3] == [(2, "step-00000001"), (3, "step-00000002"), (4, "step-00000003")]
    assert [name for _, name in heard] == [f"step-{step:08d}" for step in range(1, 6)]
