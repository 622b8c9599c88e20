"""The same training script on one process or many: launch it with torchrun and nothing in it changes.

One process (CPU, a few seconds)::

    python examples/torchrun_example.py

Two processes on this machine (gloo on CPU, NCCL with one GPU per process)::

    torchrun --nproc-per-node=2 examples/torchrun_example.py

Two machines sharing a file system for the run directory (run on both; only --node-rank differs)::

    torchrun --nnodes=2 --node-rank=0 --nproc-per-node=8 --rdzv-backend=c10d \
        --rdzv-endpoint=HOST_OF_NODE_0:29400 --rdzv-id=demo examples/torchrun_example.py /shared/runs/demo

``batch_size`` is per process: with N processes each step sees N x 32 samples, split so that the run matches
one process with ``batch_size=N*32``. Rerunning the same command resumes from the last checkpoint.
"""

from __future__ import annotations

import os
import sys

import torch

from steadyfit import TrainConfig, Trainer, accuracy, seed_everything


def make_data(size: int, seed: int) -> torch.utils.data.TensorDataset:
    """A synthetic 3-class problem: the class depends on the sign of two features."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size, 20, generator=generator)
    targets = (inputs[:, 0] > 0).long() + (inputs[:, 1] > 0).long()
    return torch.utils.data.TensorDataset(inputs, targets)


def main() -> None:
    run_dir = sys.argv[1] if len(sys.argv) > 1 else "runs/torchrun_example"
    config = TrainConfig(
        run_dir=run_dir,
        max_epochs=2,
        batch_size=32,
        lr=1e-2,
        optimizer="adamw",
        save_every=10,
        log_every=10,
        progress=False,
    )
    # Seed before building the model: every process must start from the same weights.
    seed_everything(config.seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    trainer = Trainer(
        model,
        config,
        train_data=make_data(640, seed=1),
        eval_data=make_data(200, seed=2),
        loss_fn=torch.nn.functional.cross_entropy,
        metrics={"accuracy": accuracy},
    )
    result = trainer.fit()
    # Every process gets the same (reduced) result; one of them prints it.
    if int(os.environ.get("RANK", "0")) == 0:
        accuracy_now = result.metrics["eval_accuracy"]
        print(f"step {result.global_step}: eval accuracy {accuracy_now:.3f}, weights in {run_dir}/final")


if __name__ == "__main__":
    main()
