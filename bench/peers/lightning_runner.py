"""Lightning on a bench job, configured to do what the others do.

Fairness: the same AdamW and linear decay (stepped every optimizer step), ``gradient_clip_val`` equal to
the job's ``max_grad_norm``, no logger, checkpointing, progress bar, model summary or sanity validation;
the loss is ``self.log``-ged every step and flushed every ``log_every`` steps (Lightning's own cadence);
validation each epoch only in the jobs that evaluate. Lightning needs a DataLoader: the standard one, with
the job's ``num_workers``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from overhead import Job


def _import_lightning() -> Any:
    try:
        import lightning.pytorch as lightning
    except ImportError:
        import pytorch_lightning as lightning
    return lightning


def run(job: Job) -> dict[str, Any]:
    from overhead import SEED, StepClock, build_model, build_optimization

    lightning = _import_lightning()

    class Module(lightning.LightningModule):
        def __init__(self, model: torch.nn.Module) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            inputs, targets = batch
            loss = F.cross_entropy(self.model(inputs), targets)
            self.log("train_loss", loss, on_step=True, on_epoch=False)
            return loss

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            inputs, targets = batch
            logits = self.model(inputs)
            self.log("val_loss", F.cross_entropy(logits, targets), on_epoch=True)
            self.log("val_accuracy", (logits.argmax(dim=1) == targets).float().mean(), on_epoch=True)

        def configure_optimizers(self) -> Any:
            optimizer, scheduler = build_optimization(self.model, job)
            return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    model = build_model(job)
    train_loader = DataLoader(
        job.train_data,
        batch_size=job.batch_size,
        shuffle=True,
        num_workers=job.num_workers,
        generator=torch.Generator().manual_seed(SEED),
    )
    eval_loader = DataLoader(job.eval_data, batch_size=256) if job.eval_each_epoch else None
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=job.max_steps,
        max_epochs=-1,
        gradient_clip_val=job.max_grad_norm,
        log_every_n_steps=job.log_every,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1.0 if job.eval_each_epoch else 0,
    )
    clock = StepClock()
    trainer.fit(Module(model), train_dataloaders=train_loader, val_dataloaders=eval_loader)
    return clock.result(model, job)
