"""Every script in examples/ runs as a user would run it (a subprocess, ``python examples/X.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_example(arguments: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
        # One thread per process: the examples are tiny, and 2-core CI machines run tests side by side.
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, *arguments],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("plain_model.py", "eval_accuracy="),
        ("callback.py", "stopped at step"),
        ("hf_model.py", "weights identical to the trained model: True"),
        ("hf_text_classification.py", "predict(): one SequenceClassifierOutput with logits of shape (90, 3)"),
        ("torchrun_example.py", "eval accuracy"),
    ],
)
def test_example_runs(script, expected, tmp_path):
    if script.startswith("hf_"):
        pytest.importorskip("transformers")
    if script == "hf_model.py":
        pytest.importorskip("datasets")
    run_dir = tmp_path / "run"
    completed = run_example([str(EXAMPLES / script), str(run_dir)], tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert expected in completed.stdout
    assert (run_dir / "final" / "model.safetensors").is_file()


@pytest.mark.parametrize(
    ("script", "expected"),
    [
        ("hf_model.py", "skipped, needs transformers and datasets"),
        ("hf_text_classification.py", "skipped, needs transformers"),
    ],
)
def test_hf_example_skips_cleanly_without_transformers(script, expected, tmp_path):
    # Importing a module set to None in sys.modules raises ImportError: as if the extra were not installed.
    code = (
        "import runpy, sys; sys.modules['transformers'] = None; sys.modules['datasets'] = None; "
        f"runpy.run_path({str(EXAMPLES / script)!r}, run_name='__main__')"
    )
    completed = run_example(["-c", code], tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert expected in completed.stdout
