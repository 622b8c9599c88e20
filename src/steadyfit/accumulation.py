"""Exact gradient accumulation: forward and backward over the micro-batches of one window, each weighted by
its share of the window's samples (or tokens), and what is done to the summed gradients before the
optimizer step (normalised over the window, measured, clipped).

The weighting is what guarantee 1 rests on: ``batch_size=B, grad_accum_steps=K`` performs the update of
``batch_size=B*K``. A mean loss of a micro-batch of ``n_i`` samples is backpropagated as ``mean * n_i / n``
(``n`` the window's samples), never as ``mean / K``: the two differ when the window ends with a short
micro-batch. A ``(sum, count)`` loss is backpropagated as its sum and the gradients are divided by the
window's total count afterwards (over all ranks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from steadyfit import data as data_mod
from steadyfit.config import ConfigError
from steadyfit.distributed import Distributed, full_tensor, local_tensor
from steadyfit.loss import LossContractError, ModelLoss, as_weighted_loss, forward_batch
from steadyfit.precision import Precision


@dataclass
class WindowLoss:
    """The loss of one window on this rank: ``value * weight`` is its sum, that over ``count`` its mean.

    Attributes:
        value: detached, float32 on the device (float64 once summed over ranks): the mean of a window of one
            mean-loss micro-batch (``weight`` its samples), otherwise the sum (``weight`` 1).
        weight: what ``value`` is multiplied by to make the sum; the multiplication is left to the host.
        count: samples, or tokens for a ``(sum, count)`` loss (a device tensor when the loss returned one).
        counts_tokens: whether the loss returned ``(sum, count)``.
    """

    value: torch.Tensor
    weight: int
    count: Any
    counts_tokens: bool

    @property
    def total(self) -> torch.Tensor:
        """The sum over the window's samples (or tokens), on the device: one op when ``weight`` is not 1."""
        return _as_sum(self.value, self.weight)


def _as_sum(value: torch.Tensor, weight: int) -> torch.Tensor:
    return value if weight == 1 else value * weight


class WindowBackward:
    """Forward and backward of every micro-batch of a window; gradients end up summed over the window.

    With ``micro_batch_size`` a micro-batch larger than it is cut into pieces, each weighted by its own
    samples (the same result); ``"auto"`` halves the pieces and redoes the window after an out-of-memory
    error.

    Example:
        >>> model = torch.nn.Linear(2, 1)
        >>> from steadyfit.config import TrainConfig
        >>> backward = WindowBackward(
        ...     model, torch.nn.functional.mse_loss, Precision("fp32", torch.device("cpu")),
        ...     Distributed.setup(TrainConfig()), list(model.parameters()), micro_batch_size=None)
        >>> window = [(torch.ones(4, 2), torch.zeros(4, 1)), (torch.ones(2, 2), torch.zeros(2, 1))]
        >>> loss = backward.run(window, [4, 2])
        >>> loss.count
        6
    """

    def __init__(
        self,
        model: Callable[..., Any],
        loss_fn: Callable[..., Any],
        precision: Precision,
        dist: Distributed,
        params: list[torch.nn.Parameter],
        *,
        micro_batch_size: int | str | None,
        on_out_of_memory: Callable[[str], None] = print,
    ) -> None:
        self.model = model
        self.loss_fn = loss_fn
        self.precision = precision
        self.dist = dist
        self.params = params
        self.device = precision.device
        self.non_blocking = self.device.type == "cuda"
        self.adaptive = micro_batch_size == "auto"
        self.micro_limit = micro_batch_size if isinstance(micro_batch_size, int) else None
        self.on_out_of_memory = on_out_of_memory

    def run(
        self, window: list[Any], sample_counts: list[int], largest_shares: list[int] | None = None
    ) -> WindowLoss:
        """Zero the grads, then forward and backward every micro-batch; ``sample_counts`` are this rank's
        real samples of each (0 for a stand-in that only keeps ranks in step).

        ``largest_shares``: under several ranks, the most samples any rank holds of each micro-batch, when
        the data position tells (map-style data). Cut into pieces, every rank then runs as many pieces as
        the largest share needs, padding with zero-weight stand-ins: FSDP's all-gathers and DDP's
        all-reduce are collectives, paired only if every rank runs the same forward and backward passes.
        """
        window_samples = sum(sample_counts)
        while True:
            try:
                return self._run(window, sample_counts, window_samples, largest_shares)
            except torch.OutOfMemoryError as exc:
                if not self.adaptive or (self.micro_limit or 2) <= 1:
                    raise
                size = self.micro_limit or max(sample_counts)
                if self.dist.is_distributed:
                    # The other ranks wait in this window's collectives: halving here alone would run
                    # more passes than they do, so the run stops with the size to ask for instead.
                    raise torch.OutOfMemoryError(
                        f"out of memory with micro-batches of {size} on rank {self.dist.rank}: under "
                        f"{self.dist.world_size} ranks micro_batch_size='auto' cannot halve them on one rank "
                        f"alone; rerun with micro_batch_size={max(1, size // 2)} (it resumes from the last "
                        f"checkpoint). {exc}"
                    ) from exc
                # Halve the forward size and redo the window: same samples, same weighting, same result.
                self.micro_limit = max(1, size // 2)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                self.on_out_of_memory(f"steadyfit: out of memory; micro-batches of {self.micro_limit} now")

    def _run(
        self,
        window: list[Any],
        sample_counts: list[int],
        window_samples: int,
        largest_shares: list[int] | None,
    ) -> WindowLoss:
        for param in self.params:
            param.grad = None
        window_loss: WindowLoss | None = None
        pieces = self._pieces(window, sample_counts, largest_shares)
        for position, (index_in_window, micro_batch, num_samples) in enumerate(pieces):
            try:
                loss, weight, count, counts_tokens = self._forward_backward(
                    micro_batch, num_samples, window_samples, last=position == len(pieces) - 1
                )
            except (torch.OutOfMemoryError, LossContractError, ConfigError):
                raise  # their own messages say what to do; an OOM may be retried with smaller pieces
            except Exception as exc:
                raise data_mod.BatchError(
                    f"the forward, loss or backward raised {data_mod.one_line(exc)}; the micro-batch holds "
                    f"{data_mod.describe_batch(micro_batch)}",
                    index_in_window,
                ) from exc
            loss = loss.detach()
            if loss.dtype != torch.float32:
                loss = loss.float()
            elif loss.untyped_storage().nbytes() > loss.element_size():
                # A view into a larger tensor (a loss_fn returning ``losses[0]``) would keep all of it
                # alive in the log window until the window reads its steps: keep the one number.
                loss = loss.clone()
            # The first piece is the window's loss as it is: no op for the common one-piece window.
            if window_loss is None:
                window_loss = WindowLoss(loss, weight, count, counts_tokens)
            else:
                total = window_loss.total + _as_sum(loss, weight)
                window_loss = WindowLoss(total, 1, window_loss.count + count, counts_tokens)
        assert window_loss is not None  # a window holds at least one micro-batch
        return window_loss

    def _forward_backward(
        self, micro_batch: Any, num_samples: int, window_samples: int, *, last: bool
    ) -> tuple[torch.Tensor, int, Any, bool]:
        """One micro-batch's forward and backward; returns its loss as ``(loss, weight, count,
        counts_tokens)``, ``loss * weight`` its sum (see :func:`~steadyfit.loss.as_weighted_loss`)."""
        micro_batch = data_mod.move_to(micro_batch, self.device, self.non_blocking)
        with self.dist.gradient_sync(self.model, last):
            with self.precision.autocast():
                _, value, _ = forward_batch(self.model, micro_batch, self.loss_fn)
            loss, weight, count, counts_tokens = as_weighted_loss(value, num_samples)
            if counts_tokens or self.dist.is_distributed:
                loss, weight = _as_sum(loss, weight), 1
                if num_samples == 0:
                    # A stand-in for this rank's empty share of a short last batch: it takes part in the
                    # gradient sync with weight zero.
                    loss, count = loss * 0.0, count * 0
                backward_loss = loss  # a sum; the grads are divided by the window's count afterwards
            elif num_samples == window_samples:
                backward_loss = value  # one micro-batch: exactly the plain loop's backward
            else:
                # The micro-batch's share of the window's samples (the last one may be short).
                backward_loss = value * (num_samples / window_samples)
            if not backward_loss.requires_grad:  # an attribute read: no device work
                source = "the model's outputs.loss" if isinstance(self.loss_fn, ModelLoss) else "loss_fn"
                raise LossContractError(
                    f"{source}: the loss does not require grad ({_tensor_kind(backward_loss)}): it was "
                    "detached (.item(), .detach(), torch.no_grad) or computed from values without gradients "
                    "(integer tensors, the targets alone); return a loss computed from the model's outputs"
                )
            self.precision.scale(backward_loss).backward()
        return loss, weight, count, counts_tokens

    def _pieces(
        self, window: list[Any], sample_counts: list[int], largest_shares: list[int] | None
    ) -> list[tuple[int, Any, int]]:
        """(position in the window, piece, samples): micro-batches, cut to ``micro_limit`` when set, and
        padded with zero-weight stand-ins to the pieces of the largest share (see :meth:`run`)."""
        limit = self.micro_limit
        pieces = []
        for index, (batch, num_samples) in enumerate(zip(window, sample_counts, strict=True)):
            if limit is None:
                pieces.append((index, batch, num_samples))
                continue
            cut = (
                [(index, batch, num_samples)]
                if num_samples <= limit
                else [
                    (index, piece, data_mod.count_samples(piece))
                    for piece in data_mod.split_batch(batch, limit)
                ]
            )
            needed = -(-largest_shares[index] // limit) if largest_shares is not None else len(cut)
            stand_in = (index, cut[0][1], 0)  # this rank's own first piece, weighted zero
            pieces += cut + [stand_in] * (needed - len(cut))
        return pieces

    def reduce_over_ranks(
        self, loss: WindowLoss, samples: int, global_samples: int | None, preemption_vote: float
    ) -> tuple[WindowLoss, int, torch.Tensor]:
        """Sum the window's count, loss and samples over all ranks in one all-reduce, with this rank's
        preemption vote (:func:`~steadyfit.signals.preemption_vote`) riding on it; then divide the grads
        (DDP / FSDP averaged them over ranks) by the global count. Returns the global loss, the global
        samples and the summed votes (on the device).

        ``global_samples``: the step's samples on all ranks when the caller knows them from the data
        position; otherwise they are read from the reduction (a host read).
        """
        totals = torch.stack(
            [
                torch.as_tensor(loss.count, dtype=torch.float64, device=self.device),
                loss.total.to(torch.float64),
                torch.tensor(preemption_vote, dtype=torch.float64, device=self.device),
                torch.tensor(float(samples), dtype=torch.float64, device=self.device),
            ]
        )
        self.dist.all_reduce_sum(totals)
        self.divide_grads(totals[0] / self.dist.world_size)
        if global_samples is None:
            global_samples = int(totals[3])
        return WindowLoss(totals[1], 1, totals[0], loss.counts_tokens), global_samples, totals[2]

    def divide_grads(self, divisor: Any) -> None:
        """Turn summed gradients into means: divide every gradient by the window's (global) count."""
        grads = [local_tensor(p.grad) for p in self.params if p.grad is not None]
        torch._foreach_div_(grads, torch.as_tensor(divisor, device=self.device, dtype=torch.float32))

    def clip(self, max_grad_norm: float | None, clip_value: float | None) -> torch.Tensor:
        """The pre-clip global gradient norm (logged and checked by the guard), after clipping if asked."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        grad_norm = full_tensor(torch.nn.utils.get_total_norm(grads, foreach=True))
        if max_grad_norm is not None:
            # A non-finite norm turns every gradient into NaN here; the guard skips that step anyway.
            torch.nn.utils.clip_grads_with_norm_(self.params, max_grad_norm, grad_norm, foreach=True)
        if clip_value is not None:
            torch.nn.utils.clip_grad_value_(self.params, clip_value, foreach=True)
        return grad_norm


def _tensor_kind(tensor: torch.Tensor) -> str:
    """``float32[]`` for error messages."""
    return f"{str(tensor.dtype).removeprefix('torch.')}{list(tensor.shape)}"
