"""Accelerate on a bench job: the hand-written DataLoader loop with ``accelerator.prepare`` / ``backward``
/ ``clip_grad_norm_``, the way its docs write it. Same optimizer, schedule, clipping, logging interval and
epoch-boundary evaluation as bench/raw_loop.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

if TYPE_CHECKING:
    from overhead import Job


def run(job: Job) -> dict[str, Any]:
    from accelerate import Accelerator

    from overhead import SEED, StepClock, build_model, build_optimization, evaluate

    accelerator = Accelerator(cpu=True)
    model = build_model(job)
    optimizer, scheduler = build_optimization(model, job)
    loader = DataLoader(
        job.train_data,
        batch_size=job.batch_size,
        shuffle=True,
        num_workers=job.num_workers,
        generator=torch.Generator().manual_seed(SEED),
    )
    prepared_model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    prepared_model.train()
    logged: list[float] = []
    clock = StepClock()
    step = 0
    for epoch in range(job.max_epochs):
        if job.eval_each_epoch and epoch > 0:
            assert job.eval_data is not None
            evaluate(prepared_model, *job.eval_data.tensors)
        for inputs, targets in loader:
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(prepared_model(inputs), targets)
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(prepared_model.parameters(), job.max_grad_norm)
            optimizer.step()
            scheduler.step()
            step += 1
            if step % job.log_every == 0:
                logged.append(loss.item())
            if step >= job.max_steps:
                break
        if step >= job.max_steps:
            break
    return clock.result(model, job)
