"""settle_threads: at exit, with a process group that cannot be joined, other threads get the GIL first."""

from __future__ import annotations

import threading
import time

from steadyfit.distributed import settle_threads


def test_returns_at_once_when_every_other_thread_is_blocked():
    release = threading.Event()
    waiter = threading.Thread(target=release.wait)
    waiter.start()
    try:
        started = time.monotonic()
        settle_threads(timeout_s=30.0)
        assert time.monotonic() - started < 10.0
    finally:
        release.set()
        waiter.join()


def test_a_thread_that_needs_the_gil_gets_it_before_settle_returns():
    # A pure-Python thread runs only while it holds the GIL: settle_threads must give it up long enough
    # for the thread to finish its work (as a gloo worker dropping tensors must, before finalization).
    done = threading.Event()

    def work() -> None:
        total = 0
        for i in range(2_000_000):
            total += i
        done.set()

    worker = threading.Thread(target=work)
    worker.start()
    settle_threads(timeout_s=30.0)
    assert done.is_set()
    worker.join()


def test_gives_up_after_its_timeout_while_a_thread_stays_busy():
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        started = time.monotonic()
        settle_threads(timeout_s=0.3)
        assert time.monotonic() - started >= 0.3
    finally:
        stop.set()
        spinner.join()
