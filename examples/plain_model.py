"""A plain PyTorch model on an in-memory TensorDataset: the smallest complete steadyfit run.

    python examples/plain_model.py [RUN_DIR]

Without RUN_DIR the run goes to a temporary directory, removed at the end. With one, rerunning the same
command resumes from the last checkpoint (and, once finished, just reports the result again).
"""

from __future__ import annotations

import sys
import tempfile

import torch

from steadyfit import TrainConfig, Trainer, accuracy, seed_everything


def make_data(size: int, seed: int) -> torch.utils.data.TensorDataset:
    """Two classes separated by a hyperplane, with a fixed generator: the same data on every run."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size, 16, generator=generator)
    targets = (inputs.sum(dim=1) > 0).long()
    return torch.utils.data.TensorDataset(inputs, targets)


def main(run_dir: str) -> None:
    seed_everything(0)  # before building the model: its initial weights depend on it
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    config = TrainConfig(
        run_dir=run_dir, max_epochs=3, batch_size=32, lr=1e-2, eval_every=None, log_every=10, progress=False
    )
    trainer = Trainer(
        model,
        config,
        train_data=make_data(512, seed=1),
        eval_data=make_data(200, seed=2),
        loss_fn=torch.nn.functional.cross_entropy,
        metrics={"accuracy": accuracy},
    )
    result = trainer.fit()
    print(f"step {result.global_step}: eval_accuracy={result.metrics['eval_accuracy']:.3f}")
    print(f"final weights: {run_dir}/final/model.safetensors")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory(prefix="steadyfit-example-") as tmp:
            main(tmp)
