"""Runners for peer frameworks (Hugging Face Trainer, Lightning, Accelerate), used by bench/overhead.py.

Each module exposes ``run(job) -> StepClock.result(...)`` (wall and CPU seconds per step, steps, final
loss) and imports its framework only when called, so overhead.py works (and skips the runner) when the
framework is not installed.
"""
