"""Runners for peer frameworks (Hugging Face Trainer, Lightning, Accelerate), used by bench/overhead.py.

Each module exposes ``run(job) -> {"seconds_per_step", "steps", "final_loss"}`` and imports its framework
only when called, so overhead.py works (and skips the runner) when the framework is not installed.
"""
