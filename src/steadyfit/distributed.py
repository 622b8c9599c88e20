"""torch.distributed for the loop: the torchrun environment, process group, DDP / FSDP2 wrapping, gradient
sync control, reductions, and state dicts for checkpoints (full ones gathered on every rank, or each rank's
FSDP shards). No communication code of our own: every collective here is a torch.distributed call.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import os
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from steadyfit.config import ConfigError, TrainConfig
from steadyfit.data import count_samples, is_map_style

# A collective that waits longer than this on a vanished peer fails instead of hanging the job.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("STEADYFIT_COLLECTIVE_TIMEOUT_S", "300")))


def torchrun_world_size() -> int | None:
    """WORLD_SIZE from the torchrun environment, or None outside torchrun."""
    value = os.environ.get("WORLD_SIZE")
    return int(value) if value else None


class Distributed:
    """The process group and how the model takes part in it.

    ``strategy`` is ``none`` in a single process, ``ddp`` or ``fsdp`` under torchrun (``auto`` picks ddp
    when the world size is above one). Reductions are no-ops in a single process.

    Example:
        >>> context = Distributed.setup(TrainConfig())
        >>> context.world_size, context.is_main
        (1, True)
    """

    def __init__(self, strategy: str, rank: int, local_rank: int, world_size: int) -> None:
        self.strategy = strategy
        self.rank = rank
        self.local_rank = local_rank
        self.world_size = world_size

    @classmethod
    def setup(cls, config: TrainConfig) -> Distributed:
        """Read torchrun's environment and join (or create) the default process group."""
        world_size = torchrun_world_size()
        if world_size is None:
            if config.strategy in ("ddp", "fsdp"):
                raise ConfigError(
                    f"strategy: {config.strategy!r} needs a process group; launch with torchrun, e.g. "
                    "torchrun --nproc_per_node=2 -m steadyfit fit ..."
                )
            return cls("none", 0, 0, 1)
        strategy = config.strategy if config.strategy != "auto" else ("ddp" if world_size > 1 else "none")
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if strategy != "none" and not dist.is_initialized():
            use_cuda = config.device != "cpu" and torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(local_rank)
            dist.init_process_group(
                backend="nccl" if use_cuda else "gloo",
                timeout=COLLECTIVE_TIMEOUT,
                device_id=torch.device("cuda", local_rank) if use_cuda else None,
            )
            # One group per process, torn down at exit: a second Trainer in the same process joins it
            # (re-creating a group under torchrun can pick up the old group's addresses and hang).
            atexit.register(destroy_group)
        if strategy != "none":
            rank, world_size = dist.get_rank(), dist.get_world_size()
        return cls(strategy, rank, local_rank, world_size)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.strategy != "none" and dist.is_initialized()

    def device(self, name: str) -> torch.device:
        """The device of this rank: ``cuda:LOCAL_RANK`` under torchrun on GPUs."""
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        if name == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(
                    "device: 'cuda' was asked for but no CUDA device is available; use cpu or auto"
                )
            return torch.device(
                "cuda", self.local_rank if self.is_distributed else torch.cuda.current_device()
            )
        return torch.device(name)

    def samples_in(self, data: Any, batch: Any, batch_index: int, batch_size: int) -> int:
        """Real samples of this rank in micro-batch ``batch_index`` of ``data`` (0 for a stand-in).

        Under several ranks with map-style data the count comes from the data position, since a stand-in
        batch holds one sample that must weigh nothing; otherwise it is the batch's own size.
        """
        if self.is_distributed and is_map_style(data):
            global_batch = batch_size * self.world_size
            return local_share(len(data), global_batch, self.world_size, self.rank, batch_index)
        return count_samples(batch)

    def largest_shares(
        self, data: Any, first_index: int, num_batches: int, batch_size: int
    ) -> list[int] | None:
        """The most samples any rank holds of each of ``num_batches`` micro-batches from ``first_index``
        (rank 0's, under striding), from the data position for map-style data under several ranks; None
        otherwise (not known)."""
        if not (self.is_distributed and is_map_style(data)):
            return None
        global_batch = batch_size * self.world_size
        return [
            local_share(len(data), global_batch, self.world_size, 0, index)
            for index in range(first_index, first_index + num_batches)
        ]

    def step_samples(self, data: Any, first_index: int, num_batches: int, batch_size: int) -> int | None:
        """Samples of one optimizer step on all ranks, from the data position for map-style data (no host
        read); None for other data (the caller reads them from the step's reduction)."""
        if not is_map_style(data):
            return None
        global_batch = batch_size * self.world_size
        start = first_index * global_batch
        return max(0, min(num_batches * global_batch, len(data) - start))

    # ------------------------------------------------------------------------------------ the model
    def wrap(
        self, model: torch.nn.Module, precision: str, block_names: tuple[str, ...] = ()
    ) -> torch.nn.Module:
        """DDP, or FSDP2 ``fully_shard`` on each child block then the root. Returns the module to call."""
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [model_device(model).index] if model_device(model).type == "cuda" else None
            return DistributedDataParallel(model, device_ids=device_ids)
        if self.strategy == "fsdp":
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
            policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
            for block in shard_blocks(model, block_names):
                fully_shard(block, mp_policy=policy)
            fully_shard(model, mp_policy=policy)
            return model
        return model

    def gradient_sync(
        self, train_model: torch.nn.Module, enabled: bool
    ) -> contextlib.AbstractContextManager[Any]:
        """Synchronise gradients only on the last micro-batch of a window (DDP ``no_sync`` before it)."""
        if self.strategy == "ddp" and not enabled:
            return train_model.no_sync()  # type: ignore[operator]
        if self.strategy == "fsdp":
            train_model.set_requires_gradient_sync(enabled)  # type: ignore[operator]
        return contextlib.nullcontext()

    # ------------------------------------------------------------------------------------ reductions
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum across ranks (in place for the caller's tensor); identity in a single process."""
        if self.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def any_rank(self, flag: bool, device: torch.device) -> bool:
        """Whether ``flag`` holds on any rank (one all-reduce; for set-up, not for the hot loop)."""
        if not self.is_distributed:
            return flag
        votes = torch.tensor([float(flag)], dtype=torch.float64, device=device)
        self.all_reduce_sum(votes)
        return bool(votes > 0)

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's ``value`` on every rank (plain data such as RNG states, between our own processes)."""
        if not self.is_distributed:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.is_distributed:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    # ------------------------------------------------------------------------------------ state dicts
    def model_state(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """Full weights (FSDP shards gathered, on CPU) — a collective under FSDP: every rank calls it."""
        if self.strategy != "fsdp":
            return model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def optimizer_state(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        if self.strategy != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_model_state(self, model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
        if self.strategy != "fsdp":
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def load_optimizer_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
    ) -> None:
        if self.strategy != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))

    @property
    def is_sharded(self) -> bool:
        """Whether checkpoints are sharded: each rank saves and loads its own FSDP shards (no gathering)."""
        return self.strategy == "fsdp"

    def sharded_state(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """This rank's model and optimizer state as FSDP shards (DTensors), keyed by parameter name.

        Nothing is gathered or copied. An optimizer that has not stepped yet gets its state initialised
        (torch runs a step with zero gradients and no learning rate), so the result can receive a load.
        Without ``optimizer`` the second item is empty. A collective under FSDP: every rank calls it.
        """
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        if optimizer is None:
            return get_model_state_dict(model), {}
        return get_state_dict(model, optimizer)

    def load_sharded_state(
        self,
        model: torch.nn.Module,
        model_state: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer | None = None,
        optimizer_state: dict[str, Any] | None = None,
    ) -> None:
        """Inverse of :meth:`sharded_state`: load this rank's shards into the model (and the optimizer).

        The model load is strict. The optimizer's is not about parameters without state: the saved
        optimizer holds none for a parameter that never had a gradient (an unused branch), and it must
        have none after the load either (torch's strict load refuses such a state dict).
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        set_model_state_dict(model, model_state)
        if optimizer is not None:
            set_optimizer_state_dict(
                model, optimizer, optimizer_state or {}, options=StateDictOptions(strict=False)
            )


def destroy_group() -> None:
    """End the default process group while the interpreter is whole (steadyfit's exit handler for a group it
    created; call it yourself, instead of ``destroy_process_group``, to end a group your script created).

    gloo runs each collective on a worker thread, which drops the collective's tensors after the caller's
    wait has returned; dropping a tensor whose Python object is gone takes the GIL, and a thread that asks
    for the GIL once the interpreter finalizes aborts the process ("terminate called without an active
    exception", exit -6: a finished torchrun job reported failed). ``destroy_process_group`` only
    unregisters the group: its threads end with the last reference to it, and torch joins them without
    holding the GIL. So the garbage that may hold the group (a finished run's DDP wrapper) is collected
    here; a group still held (torch's DTensor caches keep an FSDP model's mesh and group) gets its threads
    settled instead (:func:`settle_threads`).

    Example:
        >>> destroy_group()  # no group: nothing to do
    """
    if not dist.is_initialized():
        return
    group = weakref.ref(dist.group.WORLD)
    dist.destroy_process_group()
    gc.collect()
    if group() is not None:
        settle_threads()


def settle_threads(timeout_s: float = 2.0) -> None:
    """Sleep, without the GIL, until no other thread of this process has been runnable for three polls
    in a row (at most ``timeout_s``): a worker thread with tensors still to drop gets the GIL and drops
    them before the interpreter finalizes. Linux reads thread states from /proc; elsewhere it sleeps
    50 ms. Costs a few milliseconds when the threads are idle.

    Example:
        >>> settle_threads(timeout_s=0.5)
    """
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        time.sleep(0.05)
        return
    own = str(threading.get_native_id())
    deadline = time.monotonic() + timeout_s
    quiet = 0
    while quiet < 3 and time.monotonic() < deadline:
        time.sleep(0.001)
        quiet = 0 if any(_is_runnable(task) for task in tasks.iterdir() if task.name != own) else quiet + 1


def _is_runnable(task: Path) -> bool:
    try:
        stat = (task / "stat").read_text()
    except OSError:  # the thread ended between the listing and the read
        return False
    # "tid (name) state ...": the name may hold spaces and parentheses, the state follows the last ")".
    return stat[stat.rindex(")") + 2] == "R"


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (FSDP2 grads), or the tensor itself: in-place ops act on the shard."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor gathered to a plain tensor (e.g. FSDP2's global grad norm), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def model_device(model: torch.nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def shard_blocks(model: torch.nn.Module, block_names: tuple[str, ...]) -> list[torch.nn.Module]:
    """What FSDP2 shards separately: modules whose class name is in ``block_names``, or by default each
    direct child that holds parameters (a transformer's blocks live one level down, in a ModuleList)."""
    if block_names:
        return [module for module in model.modules() if type(module).__name__ in block_names]
    blocks = []
    for child in model.children():
        if isinstance(child, torch.nn.ModuleList | torch.nn.ModuleDict):
            blocks.extend(grandchild for grandchild in child.children() if _has_parameters(grandchild))
        elif _has_parameters(child):
            blocks.append(child)
    return blocks


def _has_parameters(module: torch.nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def local_share(length: int, global_batch: int, world_size: int, rank: int, batch_index: int) -> int:
    """Samples rank ``rank`` gets from global micro-batch ``batch_index`` under striding (0 for an empty share
    of a short last batch)."""
    size = max(0, min(global_batch, length - batch_index * global_batch))
    return len(range(rank, size, world_size))
