"""The start-up summary of a fit: the ``kind: "start"`` row of metrics.jsonl and its one console line."""

from __future__ import annotations

from typing import Any

import torch

from steadyfit.config import TrainConfig
from steadyfit.data import dataset_length
from steadyfit.horizons import Horizons
from steadyfit.secrets import redact_text, secret_env_values
from steadyfit.state import TrainState


def start_row(
    model: torch.nn.Module,
    config: TrainConfig,
    horizons: Horizons,
    train_data: Any,
    device: torch.device | str,
    state: TrainState,
    resumed_from: str | None,
) -> dict[str, Any]:
    """What this fit is about to do, as the row that opens its part of metrics.jsonl.

    Shape metadata only (``numel`` reads no tensor data): no host-device synchronisation. Under FSDP a
    sharded parameter counts whole, so every rank writes the same numbers.

    Args:
        model: the model being trained (its parameters are counted once, shared ones too).
        config: the run's config (``batch_size``, ``grad_accum_steps``, ``precision``).
        horizons: the run's planned horizons (steps per epoch, total steps, global batch, world size).
        train_data: the training data; its sample count is None when it has no length.
        device: where this rank trains.
        state: where the run starts (step 0, or the restored step after a resume).
        resumed_from: the checkpoint a resume restored, or None for a fresh start.

    Returns:
        ``kind, step, epoch, parameters, trainable_parameters, train_samples, steps_per_epoch,
        total_steps, batch_size, grad_accum_steps, world_size, effective_batch, device, precision,
        resumed_from``.

    Example:
        >>> from steadyfit.horizons import compute_horizons
        >>> data = torch.utils.data.TensorDataset(torch.zeros(40, 4))
        >>> config = TrainConfig(batch_size=4, grad_accum_steps=2, max_epochs=1)
        >>> row = start_row(torch.nn.Linear(4, 2), config, compute_horizons(config, data), data, "cpu",
        ...                 TrainState(), None)
        >>> row["parameters"], row["steps_per_epoch"], row["effective_batch"]
        (10, 5, 8)
    """
    parameters = list(model.parameters())
    return {
        "kind": "start",
        "step": state.step,
        "epoch": state.epoch,
        "parameters": sum(p.numel() for p in parameters),
        "trainable_parameters": sum(p.numel() for p in parameters if p.requires_grad),
        "train_samples": dataset_length(train_data),
        "steps_per_epoch": horizons.steps_per_epoch,
        "total_steps": horizons.total_steps,
        "batch_size": config.batch_size,
        "grad_accum_steps": config.grad_accum_steps,
        "world_size": horizons.world_size,
        "effective_batch": horizons.global_batch,
        "device": str(device),
        "precision": config.precision,
        # Masked like config.yaml's run_dir and resume, which the path comes from.
        "resumed_from": redact_text(resumed_from, secret_env_values()) if resumed_from is not None else None,
    }


def format_start(row: dict[str, Any]) -> list[str]:
    """The start row as two console lines, each short enough for a piped log (the resume itself has its
    own notice just before): what is trained, then how.

    Example:
        >>> lines = format_start({"parameters": 1234, "trainable_parameters": 1234, "train_samples": 1797,
        ...     "steps_per_epoch": 45, "total_steps": 1800, "batch_size": 20, "grad_accum_steps": 2,
        ...     "world_size": 1, "effective_batch": 40, "device": "cpu", "precision": "fp32",
        ...     "step": 0, "resumed_from": None})
        >>> lines[0]
        'start: 1,234 parameters (1,234 trainable) · 1,797 samples'
        >>> lines[1]
        'start: 1,800 steps (45 per epoch) · batch 40 (20 × 1 rank × 2 accumulated) · cpu fp32'
    """
    samples = row["train_samples"]
    per_epoch = row["steps_per_epoch"]
    ranks = row["world_size"]
    what = [
        f"{row['parameters']:,} parameters ({row['trainable_parameters']:,} trainable)",
        f"{samples:,} samples" if samples is not None else "samples: unknown (no length)",
    ]
    if row["resumed_from"] is not None:
        what.append(f"resumed at step {row['step']}")
    how = [
        f"{row['total_steps']:,} steps" + (f" ({per_epoch:,} per epoch)" if per_epoch is not None else ""),
        f"batch {row['effective_batch']:,} ({row['batch_size']} × {ranks} rank{'s' if ranks != 1 else ''} "
        f"× {row['grad_accum_steps']} accumulated)",
        f"{row['device']} {row['precision']}",
    ]
    return ["start: " + " · ".join(what), "start: " + " · ".join(how)]
