"""Small deterministic models, data and configs for the tests."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file


def make_regression(n: int = 50, features: int = 6, seed: int = 0) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(n, features, generator=generator)
    targets = torch.randint(0, 3, (n,), generator=generator)
    return torch.utils.data.TensorDataset(inputs, targets)


def make_mlp(features: int = 6, classes: int = 3, seed: int = 0, dropout: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(features, 16),
        torch.nn.Tanh(),
        torch.nn.Dropout(dropout),
        torch.nn.Linear(16, classes),
    )


def base_config(tmp_path: Path, **overrides):
    from steadyfit import TrainConfig

    values = {"run_dir": str(tmp_path / "run"), "progress": False, "log_every": 1, "max_epochs": 1}
    values.update(overrides)
    return TrainConfig(**values)


def interrupt_on_cue(
    command: list[str],
    env: dict[str, str],
    is_cue: Callable[[str], bool],
    act: Callable[[subprocess.Popen[bytes], list[str]], None],
    timeout_s: float,
    cwd: Path | None = None,
    stdin: int | None = None,
    new_session: bool = False,
) -> tuple[int, str]:
    """Start ``command``; when a printed line satisfies ``is_cue``, call ``act(process, lines so far)``.

    Synchronises on what the child prints, never on sleeps. Returns (exit status, everything printed,
    stdout and stderr together); a child that ends without the cue fails the test.
    """
    # Unbuffered bytes, read a line at a time: a buffered reader reads ahead of the cue, and communicate()
    # then reads the pipe itself, so lines printed right after the cue (a later "step N") would be lost.
    process = subprocess.Popen(
        command,
        env=env,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        bufsize=0,
        cwd=cwd,
        start_new_session=new_session,
    )
    seen: list[str] = []
    try:
        assert process.stdout is not None
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode(errors="replace")
            seen.append(line)
            if is_cue(line.strip()):
                act(process, seen)
                break
        else:
            raise AssertionError(f"the child ended before the cue:\n{''.join(seen)}")
        rest, _ = process.communicate(timeout=timeout_s)
        seen.append(rest.decode(errors="replace"))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()
    return process.returncode, "".join(seen)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The final weights a run wrote (RUN_DIR/final/model.safetensors)."""
    return load_file(str(run_dir / "final" / "model.safetensors"))


def assert_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
