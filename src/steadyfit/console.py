"""The one channel for what steadyfit tells the user outside progress output: notices and warnings on stderr.

Each message is one write of one line, so lines from several ranks sharing a terminal (torchrun) or a pipe
never interleave mid-line. They are printed whatever ``progress`` says: they are not progress.
"""

from __future__ import annotations

import sys

from steadyfit.secrets import redact_text, secret_env_values


def notice(message: str) -> None:
    """Print ``steadyfit: <message>`` (something the user should know: a resume, a preemption), secrets
    masked: messages quote paths, URLs and errors, which may hold a password.

    Example:
        >>> notice("resumed from runs/demo/checkpoints/step-00000020")  # doctest: +SKIP
    """
    sys.stderr.write(f"steadyfit: {redact_text(message, secret_env_values())}\n")
    sys.stderr.flush()


def warn(message: str) -> None:
    """Print ``steadyfit: warning: <message>`` (something that may be wrong and needs a look).

    Example:
        >>> warn("checkpoint rotation failed")  # doctest: +SKIP
    """
    notice(f"warning: {message}")
