"""Preemption: SIGTERM / SIGINT set a flag the loop reads at step boundaries; a second SIGINT aborts."""

from __future__ import annotations

import signal
import threading
from types import FrameType

EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}


class Preempted(SystemExit):
    """Raised by fit() after a preemption checkpoint was written; exits the process with 143 or 130."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        self.signum = signum
        self.checkpoint = checkpoint
        super().__init__(EXIT_CODES.get(signal.Signals(signum), 1))


class PreemptionFlag:
    """Installs handlers for SIGTERM and SIGINT while training; reading the flag costs a Python attribute
    load, no collective and no host-device sync.

    Handlers can only be installed from the main thread; elsewhere (a notebook worker thread) the flag
    simply never rises and the signals keep their previous behaviour.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionFlag:
        if threading.current_thread() is threading.main_thread():
            for signum in EXIT_CODES:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    @property
    def is_set(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            # A second Ctrl-C means "now": abort without waiting for the step and the checkpoint.
            raise KeyboardInterrupt
        self.signum = signum


def preemption_vote(signum: int | None, world_size: int) -> float:
    """This rank's share of a preemption vote summed over ranks: 0 without a signal, 1 for SIGINT and
    ``world_size + 1`` for SIGTERM, so the sum says whether any rank was signalled and whether any got
    SIGTERM (see :func:`voted_signal`).

    Example:
        >>> preemption_vote(None, 2), preemption_vote(signal.SIGINT, 2), preemption_vote(signal.SIGTERM, 2)
        (0.0, 1.0, 3.0)
    """
    if signum is None:
        return 0.0
    return 1.0 if signum == signal.SIGINT else float(world_size + 1)


def voted_signal(votes: float, world_size: int) -> int | None:
    """The signal every rank exits with, from the summed :func:`preemption_vote`: SIGTERM when any rank got
    it (a scheduler's preemption), else SIGINT when any rank got that, else None.

    Example:
        >>> [voted_signal(votes, 2) for votes in (0.0, 1.0, 2.0, 3.0, 4.0)]
        [None, <Signals.SIGINT: 2>, <Signals.SIGINT: 2>, <Signals.SIGTERM: 15>, <Signals.SIGTERM: 15>]
    """
    if votes > world_size:
        return signal.SIGTERM
    return signal.SIGINT if votes > 0 else None
