"""The Hugging Face ``transformers.Trainer`` on a bench job, configured to do what the others do.

Fairness: the optimizer and scheduler are passed in (the same AdamW and linear decay), no checkpoints, no
reporting integrations, no tqdm bar, the same logging interval and ``max_grad_norm``, evaluation each epoch
only in the jobs that evaluate, and ``dataloader_num_workers`` equal to the job's.
"""

from __future__ import annotations

import tempfile
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from overhead import Job


class _WithLoss(torch.nn.Module):
    """The HF Trainer expects ``model(**batch)`` to return the loss: wrap the job's model."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(inputs)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def _collate(samples: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    inputs, labels = zip(*samples, strict=True)
    return {"inputs": torch.stack(inputs), "labels": torch.stack(labels)}


def _accuracy(prediction: Any) -> dict[str, float]:
    logits, labels = prediction.predictions, prediction.label_ids
    return {"accuracy": float((logits.argmax(axis=1) == labels).mean())}


def run(job: Job) -> dict[str, Any]:
    from transformers import Trainer, TrainingArguments

    from overhead import StepClock, build_model, build_optimization

    model = build_model(job)
    optimizer, scheduler = build_optimization(model, job)
    with tempfile.TemporaryDirectory(prefix="bench-hf-") as output_dir:
        args = TrainingArguments(
            output_dir=output_dir,
            max_steps=job.max_steps,
            per_device_train_batch_size=job.batch_size,
            per_device_eval_batch_size=256,
            learning_rate=job.lr,
            weight_decay=0.0,
            max_grad_norm=job.max_grad_norm,
            logging_strategy="steps",
            logging_steps=job.log_every,
            eval_strategy="epoch" if job.eval_each_epoch else "no",
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=job.num_workers,
            use_cpu=True,
            seed=1234,
        )
        trainer = Trainer(
            model=_WithLoss(model),
            args=args,
            train_dataset=job.train_data,
            eval_dataset=job.eval_data if job.eval_each_epoch else None,
            data_collator=_collate,
            optimizers=(optimizer, scheduler),
            compute_metrics=_accuracy if job.eval_each_epoch else None,
        )
        clock = StepClock()
        trainer.train()
        result = clock.result(model, job)
    return result
