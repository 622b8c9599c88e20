"""A custom callback that stops training once the eval accuracy is good enough.

    python examples/callback.py [RUN_DIR]

A callback overrides the events it needs (see ``steadyfit.Callback``) and stops the run with
``trainer.request_stop(reason)``: the loop finishes the current step, its evaluation and checkpoint, then
writes the final weights as usual.
"""

from __future__ import annotations

import sys
import tempfile

import torch

from steadyfit import Callback, TrainConfig, Trainer, accuracy, seed_everything


class StopAtAccuracy(Callback):
    """Stop as soon as an evaluation reaches ``target`` accuracy."""

    def __init__(self, target: float) -> None:
        self.target = target

    def on_evaluate(self, trainer, state, metrics):
        if metrics["eval_accuracy"] >= self.target:
            trainer.request_stop(f"eval_accuracy {metrics['eval_accuracy']:.3f} >= {self.target}")


def make_data(size: int, seed: int) -> torch.utils.data.TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(size, 16, generator=generator)
    targets = (inputs[:, :4].sum(dim=1) > 0).long()
    return torch.utils.data.TensorDataset(inputs, targets)


def main(run_dir: str) -> None:
    seed_everything(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))
    # Up to 1,000 steps, evaluated every 10: the callback should end the run long before.
    config = TrainConfig(
        run_dir=run_dir,
        max_steps=1000,
        max_epochs=None,
        batch_size=32,
        lr=1e-2,
        eval_every=10,
        progress=False,
    )
    trainer = Trainer(
        model,
        config,
        train_data=make_data(1024, seed=1),
        eval_data=make_data(256, seed=2),
        loss_fn=torch.nn.functional.cross_entropy,
        metrics={"accuracy": accuracy},
        callbacks=[StopAtAccuracy(0.9)],
    )
    result = trainer.fit()
    print(f"stopped at step {result.global_step}: {result.stop_reason}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory(prefix="steadyfit-example-") as tmp:
            main(tmp)
