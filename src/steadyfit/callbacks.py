"""User callbacks: nine events, a no-op base class, and dispatch only to callbacks that use an event.

Where the events fire (see trainer.py for the loop itself)::

    on_fit_start
    [on_log: the start row]
    for each epoch:
        on_epoch_start
        for each optimizer step:            (accumulation, clipping, guard, step: the loop's own)
            [on_log: the train row]         (at logging steps)
            on_step_end
            [evaluate -> on_log: the eval row -> on_evaluate]   (best tracking, early stopping: the loop's)
            [on_epoch_end]                  (after the epoch's last step)
            [on_checkpoint_saved]           (each checkpoint committed since it last fired)
            [save -> on_checkpoint_saved]   (for what committed by then: a save commits in the background)
    [on_log: the final train and eval rows, then the summary row]
    on_fit_end                              (on_exception instead, if anything raised)

``state.epoch`` counts completed epochs: ``on_epoch_end`` and the last ``on_step_end`` of an epoch see
the epoch just ended counted (1 after the first; Lightning's ``current_epoch`` there is 0).

``on_log`` receives every row written to metrics.jsonl, in file order, each diagnostic finding right after
the row that showed it. It fires where rows are written: on rank 0 only.

A callback stops training with ``trainer.request_stop(reason)`` (or ``state.should_stop = True``); the
loop stops at the next step boundary, after the step's own evaluation and checkpoint. The stop is part of
the run's state: a rerun of a stopped run finds it stopped.

A callback that defines ``state_dict()`` and ``load_state_dict(state)`` (as Lightning's callbacks do) has
its state saved with every checkpoint and restored on resume (see
:class:`steadyfit.components.CallbackState`); any other callback starts afresh in a resumed run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from steadyfit.state import TrainState
    from steadyfit.trainer import Trainer

EVENTS = (
    "on_fit_start",
    "on_epoch_start",
    "on_step_end",
    "on_evaluate",
    "on_checkpoint_saved",
    "on_epoch_end",
    "on_fit_end",
    "on_exception",
    "on_log",
)


class Callback:
    """Base class: override the events you need; each receives the trainer and its TrainState.

    Example:
        >>> class StopAt(Callback):
        ...     def on_step_end(self, trainer, state):
        ...         if state.step >= 100:
        ...             trainer.request_stop("enough")
    """

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        """Before the first step (after a resume has restored the state)."""

    def on_epoch_start(self, trainer: Trainer, state: TrainState) -> None:
        """At the start of each epoch (also a resumed, partly consumed one)."""

    def on_step_end(self, trainer: Trainer, state: TrainState) -> None:
        """After each optimizer step (skipped non-finite steps do not count)."""

    def on_evaluate(self, trainer: Trainer, state: TrainState, metrics: dict[str, float]) -> None:
        """After each evaluation, with its ``eval_*`` metrics."""

    def on_checkpoint_saved(self, trainer: Trainer, state: TrainState, path: str) -> None:
        """After a checkpoint was committed (may run after later steps began: saving is asynchronous)."""

    def on_epoch_end(self, trainer: Trainer, state: TrainState) -> None:
        """After the last step of each epoch."""

    def on_fit_end(self, trainer: Trainer, state: TrainState) -> None:
        """After training ended normally (also by early stopping or a stop request)."""

    def on_exception(self, trainer: Trainer, state: TrainState, exception: BaseException) -> None:
        """When fit() is about to raise."""

    def on_log(self, trainer: Trainer, state: TrainState, row: dict[str, Any]) -> None:
        """After each row was written to metrics.jsonl (``start``, ``train``, ``eval``, ``diagnostic``,
        ``summary``), on rank 0 only, with a copy of the row: the file's content before the JSON encoding
        (a non-finite number is a float here, ``null`` in the file). Rows exist only at logging steps, so
        this event adds no host-device synchronisation.

        Example:
            >>> class Losses(Callback):
            ...     def __init__(self): self.losses = []
            ...     def on_log(self, trainer, state, row):
            ...         if row["kind"] == "train":
            ...             self.losses.append(row["loss"])
        """


class CallbackList:
    """Calls each event only on the callbacks that override it, so unused events cost nothing per step."""

    def __init__(self, callbacks: Iterable[Callback]) -> None:
        self.callbacks = list(callbacks)
        for callback in self.callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(f"callbacks: {callback!r} is not a steadyfit.Callback")
        self._by_event = {
            event: [
                getattr(cb, event)
                for cb in self.callbacks
                if getattr(type(cb), event) is not getattr(Callback, event)
            ]
            for event in EVENTS
        }
        # Called before the handlers of any event that has some: the trainer makes everything a callback
        # may touch its own again (a checkpoint's background copy of the optimizer state is finished).
        self.before_handlers: Callable[[], None] | None = None

    def has(self, event: str) -> bool:
        return bool(self._by_event[event])

    def fire(self, event: str, *args: Any) -> None:
        handlers = self._by_event[event]
        if handlers and self.before_handlers is not None:
            self.before_handlers()
        for handler in handlers:
            handler(*args)
