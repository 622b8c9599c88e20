"""The test harness itself: what a fault test reads of its child must be everything the child printed."""

from __future__ import annotations

import os
import sys

from helpers import interrupt_on_cue


def test_lines_printed_right_after_the_cue_are_kept():
    # One write holds the cue and the lines after it, as when a run prints "step 5" then "step 6" before
    # the test reads the pipe: a reader that buffers ahead of the cue must not lose them.
    child = "import sys; sys.stdout.write('step 5\\nstep 6\\nstep 7\\n'); sys.stdout.flush()"
    status, output = interrupt_on_cue(
        [sys.executable, "-c", child], dict(os.environ), lambda line: line == "step 5", lambda *_: None, 60
    )
    assert status == 0
    assert output.splitlines() == ["step 5", "step 6", "step 7"]
