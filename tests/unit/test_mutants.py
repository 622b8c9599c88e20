"""`make mutants` stays meaningful: every break of tests/mutants.py still applies to today's source, and
every guarantee of DESIGN.md has at least one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_break_applies_to_the_source_exactly_once():
    completed = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "mutants.py"), "--check"], capture_output=True, text=True
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_every_guarantee_has_a_break():
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        from mutants import MUTANTS
    finally:
        sys.path.remove(str(ROOT / "tests"))
    covered = {int(part) for mutant in MUTANTS for part in mutant.guarantee.split(".")[0].split(", ")}
    assert covered == set(range(1, 10))
    documented = (ROOT / "docs" / "guarantees.md").read_text()
    assert all(f"`{mutant.name}`" in documented for mutant in MUTANTS)
