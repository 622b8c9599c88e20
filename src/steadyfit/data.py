"""Data order and loading: a resumable sampler whose order depends only on (seed, epoch), and the loaders.

The training order of a map-style dataset is one permutation per epoch, drawn from ``(seed, epoch)``.
Micro-batches are consecutive slices of it, so the samples an optimizer step sees do not depend on how the
global batch is split into micro-batches or ranks: rank ``r`` of ``N`` takes every N-th sample of each
global micro-batch (striding), which is what makes N ranks with batch B/N equal one rank with batch B.
"""

from __future__ import annotations

import itertools
import random
import signal
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

from steadyfit.config import ConfigError
from steadyfit.rng import capture_rng, restore_rng
from steadyfit.worker_transfer import WorkerCollate

# Mixed into the seed so the data order stream differs from the model-init stream seeded by `seed`.
_ORDER_SALT = 0x5EED_DA7A


def epoch_permutation(length: int, seed: int, epoch: int) -> torch.Tensor:
    """The shuffled order of one epoch: a function of ``(seed, epoch)`` only.

    Example:
        >>> bool((epoch_permutation(5, 0, 1) == epoch_permutation(5, 0, 1)).all())
        True
    """
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + epoch + _ORDER_SALT) % (2**63))
    return torch.randperm(length, generator=generator)


class ResumableBatchSampler:
    """Yields the index lists of one epoch's micro-batches, starting at any micro-batch position.

    The global micro-batch ``i`` is ``order[i*B*N : (i+1)*B*N]`` (B = per-rank batch, N = world size) and
    rank ``r`` takes every N-th element of it starting at ``r``. Skipping ``start_batch`` micro-batches is
    a slice of the permutation: O(1), no sample is loaded. ``stop_batch`` ends the epoch before that
    micro-batch (an evaluation limited to its first batches), so no loader fetches a batch past it.

    Example:
        >>> list(ResumableBatchSampler(5, 2, seed=0, epoch=0, shuffle=False))
        [[0, 1], [2, 3], [4]]
        >>> list(ResumableBatchSampler(5, 2, seed=0, epoch=0, shuffle=False, start_batch=1, stop_batch=2))
        [[2, 3]]
    """

    def __init__(
        self,
        length: int,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        start_batch: int = 0,
        stop_batch: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.length = length
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = epoch
        self.shuffle = shuffle
        self.start_batch = start_batch
        self.stop_batch = stop_batch
        self.rank = rank
        self.world_size = world_size

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def num_batches(self) -> int:
        """Micro-batches in a whole epoch (the last may be short)."""
        return -(-self.length // self.global_batch_size)

    def __len__(self) -> int:
        stop = self.num_batches() if self.stop_batch is None else min(self.stop_batch, self.num_batches())
        return max(stop - self.start_batch, 0)

    def __iter__(self) -> Iterator[list[int]]:
        return (indices.tolist() for indices in self.index_tensors())

    def index_tensors(self) -> Iterator[torch.Tensor]:
        """The micro-batches' indices as tensors (what in-memory data indexes with directly)."""
        order = (
            epoch_permutation(self.length, self.seed, self.epoch)
            if self.shuffle
            else torch.arange(self.length)
        )
        step = self.global_batch_size
        end = self.length if self.stop_batch is None else min(self.length, self.stop_batch * step)
        for start in range(self.start_batch * step, end, step):
            share = order[start : start + step]
            if self.world_size > 1:
                share = share[self.rank :: self.world_size]
            # An empty share of a short last batch gets a stand-in sample, weighted zero by the loop, so every
            # rank runs the same number of forward/backward passes (collectives must match).
            yield share if share.numel() else order[start : start + 1]


class TensorBatches:
    """Batched fetch for in-memory tensors: one indexing operation per micro-batch, no per-sample collate.

    Yields exactly what a DataLoader with the default collate would (same values, same order), at a
    fraction of the Python overhead.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], sampler: ResumableBatchSampler) -> None:
        self.tensors = tensors
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for index in self.sampler.index_tensors():
            yield tuple([tensor[index] for tensor in self.tensors])


class _PositionedBatches:
    """A batch sampler yielding ``(epoch, position in the epoch, indices)``, for :class:`_PositionSeeded`.

    ``sampler`` may be replaced between epochs: a loader with persistent workers iterates this same object
    every epoch.
    """

    def __init__(self, sampler: ResumableBatchSampler) -> None:
        self.sampler = sampler

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int, list[int]]]:
        epoch = self.sampler.epoch
        for position, indices in enumerate(iter(self.sampler), start=self.sampler.start_batch):
            yield epoch, position, indices


class _PositionSeeded(torch.utils.data.Dataset):
    """Fetches each batch in a DataLoader worker after seeding python, numpy and torch from
    ``(seed, epoch, rank, position of the batch in the epoch)``.

    A dataset that draws random numbers (augmentation) then draws the same ones for a batch whatever worker
    fetches it, however many batches that worker fetched before and in whichever epoch it started: a run
    resumed mid-epoch, whose workers start afresh at the resume position, sees exactly the batches of the
    run that never stopped, and workers can live across epochs. The epoch arrives with each batch's key, so
    the copy of this object in a worker holds nothing that changes.
    """

    def __init__(self, dataset: Any, seed: int, rank: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.rank = rank

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, key: tuple[int, int, list[int]]) -> list[Any]:
        epoch, position, indices = key
        batch_seed = (
            ((self.seed * 1_000_003 + epoch) * 1_000_003 + self.rank) * 1_000_003 + position + _ORDER_SALT
        ) % (2**63)
        random.seed(batch_seed)
        np.random.seed(batch_seed % 2**32)
        torch.manual_seed(batch_seed)
        getitems = getattr(self.dataset, "__getitems__", None)
        return getitems(indices) if getitems else [self.dataset[index] for index in indices]


def _ignore_stop_signals(worker_id: int) -> None:
    """A worker's start: SIGTERM and SIGINT are the training process's to handle.

    A scheduler (Slurm's scancel, a terminal's Ctrl-C) signals the whole process group, and torchrun's agent
    signals its workers' groups again: a worker that died of either would fail the training process's next
    fetch before it could finish its step and write the preemption checkpoint. Ignored (inherited by what a
    worker starts, a decoder say), the signals leave it to stop when the training process shuts its loader
    down, or exits. The cost: torch's shutdown cannot end a worker stuck in a fetch with SIGTERM; the
    training process then waits for that fetch at its exit.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class _StartWithoutStopSignals:
    """A user DataLoader's ``worker_init_fn``, run after :func:`_ignore_stop_signals` (picklable, for
    workers that spawn)."""

    def __init__(self, worker_init_fn: Callable[[int], None] | None) -> None:
        self.worker_init_fn = worker_init_fn

    def __call__(self, worker_id: int) -> None:
        _ignore_stop_signals(worker_id)
        if self.worker_init_fn is not None:
            self.worker_init_fn(worker_id)


def keep_workers_through_stop_signals(loader: DataLoader) -> None:
    """Make a user DataLoader's workers leave SIGTERM and SIGINT to the training process (see
    :func:`_ignore_stop_signals`); its own ``worker_init_fn`` still runs, after. Once per loader."""
    if loader.num_workers and not isinstance(loader.worker_init_fn, _StartWithoutStopSignals):
        loader.worker_init_fn = _StartWithoutStopSignals(loader.worker_init_fn)


def _seed_worker(worker_id: int) -> None:
    _ignore_stop_signals(worker_id)
    # Derive python/numpy seeds from torch's per-worker seed, itself derived from the loader's generator
    # (seeded by seed and epoch), never from wall-clock state.
    worker_seed = torch.initial_seed() % 2**32
    random.seed(worker_seed)
    np.random.seed(worker_seed)


@dataclass
class LoaderSpec:
    """How to build the loaders; one per Trainer."""

    batch_size: int
    eval_batch_size: int
    num_workers: int
    seed: int
    pin_memory: bool
    collate_fn: Callable[..., Any] | None = None
    rank: int = 0
    world_size: int = 1
    # False under overfit_batches: every epoch trains on the same first batches.
    shuffle: bool = True

    @classmethod
    def of(
        cls,
        config: Any,
        device: torch.device,
        collate_fn: Callable[..., Any] | None,
        rank: int,
        world_size: int,
    ) -> LoaderSpec:
        """The loaders of a run of ``config`` (a TrainConfig) on ``device``, as rank ``rank``."""
        return cls(
            batch_size=config.batch_size,
            eval_batch_size=config.resolved_eval_batch_size,
            num_workers=config.num_workers,
            seed=config.seed,
            pin_memory=device.type == "cuda",
            collate_fn=collate_fn,
            rank=rank,
            world_size=world_size,
            shuffle=not config.overfit_batches,
        )


def is_map_style(data: Any) -> bool:
    """A Dataset with ``__len__`` and ``__getitem__`` that we can order and resume ourselves."""
    if isinstance(data, (DataLoader, IterableDataset)):
        return False
    return hasattr(data, "__getitem__") and hasattr(data, "__len__")


class BatchError(RuntimeError):
    """A micro-batch could not be loaded, or its forward, loss or backward raised.

    The message names where (step, epoch, micro-batch of the epoch) and what the batch held (its tensors'
    dtypes and shapes); the original exception is chained as ``__cause__``.

    Attributes:
        index_in_window: the failing micro-batch's position in its window (None: not known yet).
    """

    def __init__(self, message: str, index_in_window: int | None = None) -> None:
        super().__init__(message)
        self.index_in_window = index_in_window


def describe_batch(batch: Any) -> str:
    """The dtypes and shapes of a batch's parts, for error messages.

    Example:
        >>> describe_batch((torch.zeros(8, 6), torch.zeros(8, dtype=torch.long)))
        'inputs float32[8, 6], targets int64[8]'
    """
    if isinstance(batch, (tuple, list)) and len(batch) in (1, 2):  # a pair, or inputs alone (predict)
        parts: list[tuple[str, Any]] = list(zip(("inputs", "targets"), batch, strict=False))
    elif hasattr(batch, "keys") and hasattr(batch, "__getitem__"):
        parts = [(str(key), batch[key]) for key in batch]
    else:
        return _describe_value(batch)
    described = ", ".join(f"{name} {_describe_value(value)}" for name, value in parts)
    lists = [name for name, value in parts if isinstance(value, (tuple, list))]
    if lists and isinstance(batch, Mapping):
        # torch's default collate turns rows of Python lists into a list of per-position tensors.
        described += (
            f" ({', '.join(lists)}: rows of Python lists, not tensors; give a collate_fn that pads them into "
            "tensors, e.g. steadyfit.hf.PadToLongest(), or rows of tensors: dataset.with_format('torch'))"
        )
    return described


def _describe_value(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')}{list(value.shape)}"
    if isinstance(value, np.ndarray):
        return f"numpy {value.dtype}{list(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__} of {len(value)}"
    return "None" if value is None else type(value).__name__


_TEXT_DTYPES = ("string", "large_string")  # a datasets.Value's dtype for text


def load_hint(data: Any) -> str:
    """What a batch of ``data`` that failed to load most likely needs, for the error message: a
    ``datasets.Dataset`` (or a DataLoader over one) with text columns gets them named, since the Hugging
    Face Trainer drops the columns a model's ``forward`` does not take and steadyfit passes every one.

    Example:
        >>> load_hint([torch.zeros(2)])
        ' (a sample of another shape, or None, needs a collate_fn that pads or filters it)'
    """
    features = getattr(getattr(data, "dataset", data), "features", None)
    text_columns = (
        [name for name, feature in features.items() if getattr(feature, "dtype", None) in _TEXT_DTYPES]
        if isinstance(features, Mapping)
        else []
    )
    if text_columns:
        return (
            f" (text columns {', '.join(map(repr, text_columns))}: every column reaches model(**batch), "
            "where the Hugging Face Trainer drops those forward() does not take; drop them with "
            f"dataset.remove_columns({text_columns!r}), or tokenize them in a collate_fn)"
        )
    return " (a sample of another shape, or None, needs a collate_fn that pads or filters it)"


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line; a DataLoader worker's error carries the worker's whole traceback in
    its message, whose last line is the error itself."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and "Traceback" in str(exc):
        return lines[-1][:400]
    text = " ".join(lines)[:400]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def fetch_window(
    micro_batches: Iterator[Any], size: int, epoch: int, first_index: int, data: Any
) -> list[Any]:
    """The next ``size`` micro-batches of the epoch (fewer at its end, none after it) of ``data``; an error
    loading one (a dataset's ``__getitem__``, the collate) is a BatchError naming it."""
    window: list[Any] = []
    try:
        window.extend(itertools.islice(micro_batches, size))
    except (torch.OutOfMemoryError, ConfigError):
        raise
    except Exception as exc:
        raise BatchError(
            f"train_data: micro-batch {first_index + len(window)} of epoch {epoch} could not be loaded: "
            f"{one_line(exc)}{load_hint(data)}"
        ) from exc
    return window


def loading_errors_named(batches: Iterable[Any], what: str, data: Any) -> Iterator[Any]:
    """``batches`` of ``data``, with an error raised while loading one (a dataset's ``__getitem__``, the
    collate) turned into a BatchError naming ``what`` and the batch's index."""
    iterator = iter(batches)
    index = 0
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as exc:
            raise BatchError(
                f"{what}: batch {index} could not be loaded: {one_line(exc)}{load_hint(data)}"
            ) from exc
        yield batch
        index += 1


def loader_settings(
    fields_set: set[str], values: dict[str, Any], train_data: Any, eval_data: Any
) -> dict[str, Any]:
    """What a user's own DataLoader decides of the config: ``batch_size`` and ``num_workers`` (the train
    loader's), ``eval_batch_size`` and ``persistent_workers`` (the eval loader's). Returns the fields to
    record as what really happens.

    Args:
        fields_set: the config fields the user set (``TrainConfig.model_fields_set``).
        values: the config's current values.

    Raises:
        ConfigError: a field the user set explicitly disagrees with the loader.

    Example:
        >>> loader = DataLoader(TensorDataset(torch.zeros(10, 2)), batch_size=5)
        >>> loader_settings(set(), {"batch_size": 32, "num_workers": 0}, loader, None)
        {'batch_size': 5}
    """
    wanted: dict[str, Any] = {}
    loaders = (
        ("train_data", train_data, ("batch_size", "num_workers")),
        ("eval_data", eval_data, ("eval_batch_size", "persistent_workers")),
    )
    for which, data, fields in loaders:
        if not isinstance(data, DataLoader):
            continue
        batch_size = data.batch_size or getattr(data.batch_sampler, "batch_size", None)
        actual = {
            "batch_size": batch_size,
            "eval_batch_size": batch_size,
            "num_workers": data.num_workers,
            "persistent_workers": data.persistent_workers,
        }
        for name in fields:
            if actual[name] is None or actual[name] == values.get(name):
                continue
            if name in fields_set:
                raise ConfigError(
                    f"{name}: {values.get(name)!r}, but the DataLoader passed as {which} has {name} "
                    f"{actual[name]!r}, and a DataLoader of yours decides it; set {name}={actual[name]!r} "
                    f"or leave {name} out"
                )
            wanted[name] = actual[name]
    return wanted


def check_overfit_loader(config: Any, train_data: Any) -> None:
    """``overfit_batches`` trains on the same first batches every epoch: a user DataLoader that shuffles
    would give other ones each epoch (Lightning swaps its sampler; we do not touch a user's loader).

    Raises:
        ConfigError: naming the field and the two ways out.
    """
    if not config.overfit_batches or not isinstance(train_data, DataLoader):
        return
    samplers = (train_data.sampler, getattr(train_data.batch_sampler, "sampler", None))
    if any(
        isinstance(sampler, torch.utils.data.RandomSampler) or getattr(sampler, "shuffle", False)
        for sampler in samplers
    ):
        raise ConfigError(
            "overfit_batches: the DataLoader passed as train_data shuffles, so its first batches change "
            "every epoch; pass the dataset itself (steadyfit then keeps its order) or a DataLoader with "
            "shuffle=False"
        )


def check_persistent_workers(config: Any, eval_data: Any) -> None:
    """``persistent_workers`` keeps the workers of the eval loader steadyfit builds; refuse it where there are
    none to keep, or where keeping them would change what a resumed run evaluates.

    Raises:
        ConfigError: naming the field and the ways out.
    """
    if not config.persistent_workers or isinstance(eval_data, DataLoader):
        return  # off, or the user's own eval DataLoader decided it (loader_settings recorded its choice)
    if isinstance(eval_data, IterableDataset):
        # Its batches have no position to seed from: kept workers would carry their random streams from one
        # evaluation into the next, which a run resumed in between could not replay.
        raise ConfigError(
            "persistent_workers: eval_data is an IterableDataset, whose worker processes cannot be kept "
            "between evaluations without changing what a resumed run evaluates; pass a map-style dataset "
            "or leave persistent_workers out"
        )
    if not config.num_workers:
        raise ConfigError(
            "persistent_workers: true keeps the eval loader's worker processes, but num_workers is 0 (no "
            "workers); set num_workers >= 1 or leave persistent_workers out"
        )


def kept_worker_streams(train_data: Any) -> str | None:
    """A warning for a user's training DataLoader whose workers persist (``persistent_workers=True``):
    their random streams run on from one epoch to the next, and a run resumed after the first epoch starts
    them afresh, so it repeats the uninterrupted run only if the dataset draws no random numbers.
    steadyfit's own loaders seed every batch from its position instead (see ``_PositionSeeded``). (An eval
    DataLoader's kept workers would matter only for an eval set that augments: not warned about.)"""
    if not (isinstance(train_data, DataLoader) and train_data.num_workers and train_data.persistent_workers):
        return None
    return (
        "train_data: the DataLoader's persistent_workers=True keeps its workers, and their random streams, "
        "from one epoch to the next; a run resumed after the first epoch starts them afresh, so it repeats "
        "this run only if the dataset draws no random numbers (augmentation). Pass the dataset itself: "
        "steadyfit's workers (num_workers) live for the whole run, seed each batch from its position and "
        "resume exactly"
    )


def check_every_sample_read(data: Any, what: str) -> None:
    """Evaluation and prediction read every sample of ``data`` (guarantee 6: exact averages over the whole
    set, whatever the batch size): refuse data that would leave samples out, or has none.

    Raises:
        ConfigError: a DataLoader that drops its last incomplete batch, or data of length 0.

    Example:
        >>> loader = DataLoader(TensorDataset(torch.zeros(5, 2)), batch_size=2, drop_last=True)
        >>> check_every_sample_read(loader, "eval_data")
        Traceback (most recent call last):
        ...
        steadyfit.config.ConfigError: eval_data: the DataLoader drops its last incomplete batch ...
    """
    if isinstance(data, DataLoader) and (data.drop_last or getattr(data.batch_sampler, "drop_last", False)):
        raise ConfigError(
            f"{what}: the DataLoader drops its last incomplete batch (drop_last=True), so those samples "
            "would never be scored and the scores would change with the batch size; build it with "
            "drop_last=False, or pass its dataset"
        )
    sampler = getattr(data, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler) and sampler.total_size != len(
        sampler.dataset  # type: ignore[arg-type]
    ):
        uneven = sampler.total_size - len(sampler.dataset)  # type: ignore[arg-type]
        raise ConfigError(
            f"{what}: its DistributedSampler {'repeats' if uneven > 0 else 'drops'} {abs(uneven)} sample(s) "
            "to even out the ranks, so the scores would not be over the set; pass the dataset itself "
            "(steadyfit splits it over the ranks without repeats)"
        )
    if dataset_length(data) == 0:
        raise ConfigError(f"{what}: it holds no sample; pass data to score, or leave it out")


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell a user DataLoader's sampler and batch sampler the epoch (``DistributedSampler.set_epoch``), as the
    Hugging Face Trainer and Lightning do: their order is then a function of (their seed, epoch), so every
    epoch draws a new order and a resume mid-epoch replays the same one. An IterableDataset behind it is
    told too."""
    samplers = [loader.sampler, loader.batch_sampler, getattr(loader.batch_sampler, "sampler", None)]
    for sampler in {id(s): s for s in samplers if s is not None}.values():
        set_epoch = getattr(sampler, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
    if isinstance(loader.dataset, IterableDataset):
        _set_dataset_epoch(loader.dataset, epoch)


def _set_dataset_epoch(data: IterableDataset, epoch: int) -> None:
    """Tell an IterableDataset the epoch, when it listens (a Hugging Face streaming dataset's ``shuffle``
    draws each epoch's order from its seed and the epoch, as the Hugging Face Trainer tells it)."""
    set_epoch = getattr(data, "set_epoch", None)
    if callable(set_epoch):
        set_epoch(epoch)


class TrainBatches:
    """The micro-batches of the training epochs of one ``fit()``.

    Map-style data read through worker processes keeps one DataLoader for the whole fit, with persistent
    workers: they start once, not at every epoch (a restart forks ``num_workers`` processes and waits for
    their first batches). No batch changes: the order is the sampler's, set for each epoch in this
    process, and a batch's random streams are seeded in the worker from its (seed, epoch, rank, position)
    key. One consequence: a dataset object changed in place between epochs (by a callback, say) is not
    seen by workers that already hold their copy. :meth:`close` stops the workers.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> spec = LoaderSpec(batch_size=2, eval_batch_size=2, num_workers=0, seed=0, pin_memory=False)
        >>> batches = TrainBatches(TensorDataset(torch.arange(6.0), torch.arange(6)), spec)
        >>> [len(batch[0]) for batch in batches.epoch(0, start_batch=1)]
        [2, 2]
    """

    def __init__(self, data: Any, spec: LoaderSpec) -> None:
        self.data = data
        self.spec = spec
        self._positioned: _PositionedBatches | None = None
        self._loader: DataLoader | None = None
        # Data whose order is not ours: the random streams as the current epoch's loader was started.
        self.epoch_start_streams: dict[str, Any] | None = None

    @property
    def order_is_ours(self) -> bool:
        """Whether steadyfit's sampler orders the data (a map-style dataset); otherwise its order is drawn
        from random streams when the epoch's loader starts, which :meth:`state_dict` keeps."""
        return not isinstance(self.data, (DataLoader, IterableDataset))

    def epoch(self, epoch: int, start_batch: int) -> Iterable[Any]:
        """The micro-batches of ``epoch``, from micro-batch ``start_batch`` on.

        A user DataLoader is passed through (its order is the user's, told the epoch through
        ``set_loader_epoch``; we skip consumed batches by iterating, since we do not own its sampler). An
        IterableDataset is wrapped in a plain loader. Both are started from the random streams the epoch
        started with (see :meth:`_started`).
        """
        data, spec = self.data, self.spec
        if isinstance(data, DataLoader):
            keep_workers_through_stop_signals(data)
            set_loader_epoch(data, epoch)
            return self._started(data, start_batch)
        if isinstance(data, IterableDataset):
            _set_dataset_epoch(data, epoch)
            return self._started(_iterable_loader(data, spec.batch_size, spec), start_batch)
        sampler = ResumableBatchSampler(
            len(data),
            spec.batch_size,
            seed=spec.seed,
            epoch=epoch,
            shuffle=spec.shuffle,
            start_batch=start_batch,
            rank=spec.rank,
            world_size=spec.world_size,
        )
        if not spec.num_workers:
            return _map_style_loader(data, sampler, spec, epoch)
        if self._loader is None or self._positioned is None:
            self._positioned = _PositionedBatches(sampler)
            self._loader = _worker_loader(data, self._positioned, spec, epoch, persistent=True)
        self._positioned.sampler = sampler
        return self._loader

    def _started(self, loader: DataLoader, start_batch: int) -> Iterator[Any]:
        """``loader``'s batches from ``start_batch`` on, drawn as an uninterrupted run drew them.

        Starting a DataLoader draws from random streams: its base seed (worker seeds) from torch's global
        generator or its own, a shuffling sampler's seed from the same; an augmenting dataset without
        workers draws from the process's streams. An uninterrupted run draws all of these when the epoch
        starts. A run resumed in the middle of the epoch therefore starts the loader, and skips the consumed
        batches, from the streams saved at the epoch's start, and then puts back the streams of the
        checkpoint: the same order and worker seeds, and the model's dropout where the checkpoint left it.
        Costs one capture of every stream per epoch (about 0.1 ms).
        """
        if start_batch == 0:
            self.epoch_start_streams = capture_streams(loader)
            return iter(loader)
        if self.epoch_start_streams is None:  # a checkpoint written before steadyfit kept them
            return _skip(loader, start_batch)
        at_checkpoint = capture_streams(loader)
        restore_streams(loader, self.epoch_start_streams)
        try:
            return _skip(loader, start_batch)
        finally:
            restore_streams(loader, at_checkpoint)

    def state_dict(self) -> dict[str, Any]:
        """The streams the current epoch started from, and the user loader's own generators as they are now
        (a DataLoader's ``generator`` is not torch's global one, which the ``rng`` component keeps)."""
        generators = _loader_generators(self.data) if isinstance(self.data, DataLoader) else []
        return {
            "epoch_start": self.epoch_start_streams,
            "generators": [generator.get_state() for generator in generators],
            "generators_found": _GENERATORS_FOUND,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Inverse of :meth:`state_dict`; None (a checkpoint without it) keeps the current streams."""
        if state is None:
            self.epoch_start_streams = None
            return
        # A checkpoint from before every sampler attribute was searched holds only the `.generator`s.
        named_only = state.get("generators_found") != _GENERATORS_FOUND
        generators = _loader_generators(self.data, named_only) if isinstance(self.data, DataLoader) else []
        epoch_start = state.get("epoch_start")
        saved = state.get("generators") or []
        counts = {len(saved)} | ({len(epoch_start["generators"])} if epoch_start is not None else set())
        if counts != {len(generators)}:
            raise ConfigError(
                f"train_data: the checkpoint holds the state of {max(counts)} DataLoader generator(s) (the "
                f"DataLoader's generator=, its sampler's), the DataLoader passed now has {len(generators)}, "
                "so its order would not continue; build it as the run that saved did, or start a new run_dir"
            )
        self.epoch_start_streams = epoch_start
        for generator, generator_state in zip(generators, saved, strict=True):
            generator.set_state(generator_state)

    def close(self) -> None:
        """Stop the worker processes (they would otherwise live until the loader is garbage)."""
        self._loader = None
        self._positioned = None


# How _loader_generators finds them, as checkpoints record it: every torch.Generator a sampler holds.
# Checkpoints without the record found only the ``generator`` attributes.
_GENERATORS_FOUND = "sampler attributes"


def _loader_generators(loader: DataLoader, named_only: bool = False) -> list[torch.Generator]:
    """The torch generators a DataLoader draws its base seed and its order from, each once: its own
    ``generator``, and every generator its sampler and batch sampler hold (a custom sampler may keep one
    under any name); with ``named_only``, their ``generator`` attributes alone (older checkpoints)."""
    batch_sampler = loader.batch_sampler
    samplers = (loader.sampler, batch_sampler, getattr(batch_sampler, "sampler", None))
    found = [loader.generator]
    for sampler in samplers:
        if named_only:
            found.append(getattr(sampler, "generator", None))
        else:
            found.extend(getattr(sampler, "__dict__", {}).values())
    unique = {id(g): g for g in found if isinstance(g, torch.Generator)}
    return list(unique.values())


def capture_streams(loader: DataLoader) -> dict[str, Any]:
    """Every global random stream and the states of ``loader``'s own generators."""
    return {
        "global": capture_rng(),
        "generators": [generator.get_state() for generator in _loader_generators(loader)],
        "generators_found": _GENERATORS_FOUND,
    }


def restore_streams(loader: DataLoader, streams: dict[str, Any]) -> None:
    """Inverse of :func:`capture_streams` (also of its older form, which found fewer generators)."""
    restore_rng(streams["global"])
    named_only = streams.get("generators_found") != _GENERATORS_FOUND
    for generator, state in zip(_loader_generators(loader, named_only), streams["generators"], strict=True):
        generator.set_state(state)


class EvalBatches:
    """The eval batches of the evaluations of one ``fit()``.

    With ``persistent`` (``persistent_workers``) and worker processes, the fit's map-style eval data keeps
    one DataLoader whose workers live from one evaluation to the next, as the train loader's do, instead of
    starting ``num_workers`` processes at every evaluation. No batch changes: the order is the dataset's,
    and each batch's random streams are seeded in the worker from its position. The cost: the eval workers
    stay alive, idle, while training runs, each holding its copy of the dataset. Any other data (a
    DataLoader, an IterableDataset, data passed to ``evaluate(data)``) gets its loader of
    :func:`eval_batches` at every evaluation. :meth:`close` stops the workers.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> spec = LoaderSpec(batch_size=2, eval_batch_size=4, num_workers=0, seed=0, pin_memory=False)
        >>> data = TensorDataset(torch.arange(6.0))
        >>> [len(batch[0]) for batch in EvalBatches(data, spec, persistent=False).of(data)]
        [4, 2]
    """

    def __init__(self, data: Any, spec: LoaderSpec, *, persistent: bool) -> None:
        self.data = data
        self.spec = spec
        self.persistent = persistent and bool(spec.num_workers) and is_map_style(data)
        self._loader: DataLoader | None = None
        self._max_batches: int | None = None

    def of(self, data: Any, max_batches: int | None = None) -> Iterable[Any]:
        """The eval batches of ``data`` (its first ``max_batches``): through the kept loader when ``data`` is
        the fit's eval data."""
        if not self.persistent or data is not self.data:
            return eval_batches(data, self.spec, max_batches)
        if self._loader is None or self._max_batches != max_batches:
            sampler = _eval_sampler(data, self.spec, max_batches)
            self._loader = _worker_loader(data, _PositionedBatches(sampler), self.spec, 0, persistent=True)
            self._max_batches = max_batches
        return self._loader

    def close(self) -> None:
        """Stop the kept worker processes (they would otherwise live until the loader is garbage)."""
        self._loader = None


def eval_batches(data: Any, spec: LoaderSpec, max_batches: int | None = None) -> Iterable[Any]:
    """Eval micro-batches in dataset order; under several ranks each rank takes a strided share with no
    padding duplicates, so sums over ranks count every sample exactly once. ``max_batches`` ends a
    map-style dataset's batches there, so its workers prefetch none past them (other data is cut by the
    caller)."""
    if isinstance(data, DataLoader):
        keep_workers_through_stop_signals(data)
        return data
    if isinstance(data, IterableDataset):
        return _iterable_loader(data, spec.eval_batch_size, spec)
    return _map_style_loader(data, _eval_sampler(data, spec, max_batches), spec, epoch=0)


def _eval_sampler(data: Any, spec: LoaderSpec, max_batches: int | None) -> ResumableBatchSampler:
    return ResumableBatchSampler(
        len(data),
        spec.eval_batch_size,
        seed=spec.seed,
        epoch=0,
        shuffle=False,
        stop_batch=max_batches,
        rank=spec.rank,
        world_size=spec.world_size,
    )


def _iterable_loader(data: IterableDataset, batch_size: int, spec: LoaderSpec) -> DataLoader:
    """A plain loader over an IterableDataset: its order and its workers' sharding are the dataset's."""
    return DataLoader(
        data,
        batch_size=batch_size,
        num_workers=spec.num_workers,
        collate_fn=_collate_fn(spec),
        pin_memory=spec.pin_memory,
        worker_init_fn=_ignore_stop_signals if spec.num_workers else None,
    )


def _map_style_loader(
    data: Any, sampler: ResumableBatchSampler, spec: LoaderSpec, epoch: int
) -> Iterable[Any]:
    if spec.num_workers:
        return _worker_loader(data, _PositionedBatches(sampler), spec, epoch, persistent=False)
    if isinstance(data, TensorDataset) and spec.collate_fn is None:
        return TensorBatches(data.tensors, sampler)
    # Without workers the data-side random streams are the main process's, saved and restored with every
    # checkpoint. The loader's own generator keeps its base seed draw off torch's global stream.
    return DataLoader(
        data,
        batch_sampler=sampler,
        collate_fn=spec.collate_fn,
        pin_memory=spec.pin_memory,
        generator=_loader_generator(spec, epoch),
    )


def _worker_loader(
    data: Any, batches: _PositionedBatches, spec: LoaderSpec, epoch: int, *, persistent: bool
) -> DataLoader:
    """A DataLoader whose workers seed each batch's random streams from its key (see _PositionSeeded)."""
    return DataLoader(
        _PositionSeeded(data, spec.seed, spec.rank),
        batch_sampler=batches,
        num_workers=spec.num_workers,
        collate_fn=_collate_fn(spec),
        pin_memory=spec.pin_memory,
        worker_init_fn=_seed_worker,
        generator=_loader_generator(spec, epoch),
        persistent_workers=persistent,
        # Workers run further ahead of a consumer that takes their batches in order (torch's default is 2):
        # one slower batch then stalls the loop less. Four batches per worker in flight, in host memory.
        prefetch_factor=4,
    )


def _collate_fn(spec: LoaderSpec) -> Callable[..., Any] | None:
    """The collate of a loader steadyfit builds: with workers, small tensors reach this process by value (see
    :mod:`steadyfit.worker_transfer`)."""
    return WorkerCollate(spec.collate_fn) if spec.num_workers else spec.collate_fn


def _loader_generator(spec: LoaderSpec, epoch: int) -> torch.Generator:
    """Worker seeds come from this generator: a function of (seed, epoch the loader started, rank), never of
    the clock. Batches do not depend on them (each is seeded from its key); python's and numpy's streams in
    a worker outside a batch do (see _seed_worker)."""
    generator = torch.Generator()
    generator.manual_seed((spec.seed * 1_000_003 + epoch * 1009 + spec.rank + 2 * _ORDER_SALT) % (2**63))
    return generator


def _skip(loader: Iterable[Any], count: int) -> Iterator[Any]:
    iterator = iter(loader)
    for _ in range(count):
        next(iterator, None)
    return iterator


def count_samples(batch: Any) -> int:
    """Samples in a batch: the first dimension of its targets (pair) or of its first tensor (a dict, or any
    mapping such as a transformers ``BatchEncoding``).

    A tensor at the top of the batch (or of a dict) decides; only without one are nested containers read.
    There lists of tensors are one tensor per field when every tensor in them has the same first dimension
    (default collation of ``(x, (y1, y2))`` gives ``[X, [Y1, Y2]]``) and count that dimension; otherwise,
    and for lists of per-sample items (dicts, strings, numbers: a detection collate's targets, texts), a
    list counts its items. Ambiguous only when per-sample tensors happen to share their first dimension
    with each other across inputs and targets (images of 3 channels with 3 boxes each): pad them into
    tensors, or return ``(sum, count)`` from the loss.

    Example:
        >>> count_samples([torch.zeros(4, 3), [torch.zeros(4), torch.zeros(4, 2)]])
        4
        >>> targets = ({"boxes": torch.zeros(5, 4)}, {"boxes": torch.zeros(1, 4)})  # detection, 2 images
        >>> count_samples((torch.zeros(2, 3, 8, 8), targets)), count_samples(([], targets))
        (2, 2)
    """
    if type(batch) is tuple or type(batch) is list:  # an (inputs, targets) pair: every step, fast
        last = batch[-1] if batch else None
        if isinstance(last, torch.Tensor) and last.dim() > 0:
            return int(last.shape[0])
    count = _samples_in(batch, top=True)
    if count is not None:
        return count
    if isinstance(batch, Mapping):
        raise ValueError(
            "cannot count the samples of a dict batch: it holds no tensor (a Hugging Face dataset needs "
            "dataset.with_format('torch'), or a collate_fn that makes tensors)"
        )
    raise ValueError(
        f"cannot count the samples of a batch of type {type(batch).__name__}: it holds no tensor with a "
        "first dimension"
    )


def _samples_in(value: Any, top: bool) -> int | None:
    """The samples :func:`count_samples` reads in ``value``; None when it finds none. ``top``: ``value`` is
    the batch itself, a sequence of fields (a pair), never of samples."""
    if isinstance(value, Mapping):  # every step of a Hugging Face model: tensors first, no list built
        for key in ("labels", "label", "input_ids"):
            item = value.get(key)
            if isinstance(item, torch.Tensor) and item.dim() > 0:
                return int(item.shape[0])
        for item in value.values():
            if isinstance(item, torch.Tensor) and item.dim() > 0:
                return int(item.shape[0])
        return next((n for item in value.values() if (n := _samples_in(item, top=False)) is not None), None)
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.dim() > 0 else None
    if isinstance(value, (tuple, list)):
        return _samples_in_sequence(value, top) if value else None
    return None


def _samples_in_sequence(value: tuple | list, top: bool) -> int | None:
    """:func:`_samples_in` of a non-empty tuple or list."""
    if top:
        # The targets of a pair first (an input may be a scalar option); a tensor before any container.
        items = list(reversed(value))
        tensor = next((item for item in items if isinstance(item, torch.Tensor) and item.dim() > 0), None)
        if tensor is not None:
            return int(tensor.shape[0])
        if len(value) != 2 and all(isinstance(item, Mapping) for item in value):
            return len(value)  # a list of per-sample dicts a collate_fn left as it is
        # Lists of tensors are one tensor per field when every tensor in all of them has the same first
        # dimension (that is the batch), else one per sample: ([images], [boxes]) with 3 boxes per image.
        lists = [item for item in value if isinstance(item, (tuple, list)) and item]
        tensors = [t for seq in lists for t in seq if isinstance(t, torch.Tensor) and t.dim() > 0]
        if len({int(t.shape[0]) for t in tensors}) > 1:
            return len(next(seq for seq in reversed(lists) if any(isinstance(t, torch.Tensor) for t in seq)))
        return next((n for item in items if (n := _samples_in(item, top=False)) is not None), None)
    if all(isinstance(item, torch.Tensor) and item.dim() > 0 for item in value):
        firsts = {int(item.shape[0]) for item in value}
        return firsts.pop() if len(firsts) == 1 and len(value) > 1 else len(value)
    return len(value)


def split_batch(batch: Any, size: int) -> list[Any]:
    """Cut a batch into pieces of at most ``size`` samples along the first dimension (for micro-batching)."""
    if isinstance(batch, torch.Tensor):
        return list(batch.split(size))
    if isinstance(batch, Mapping):
        keys = list(batch)
        parts = [split_batch(batch[key], size) if _is_batched(batch[key]) else None for key in keys]
        count = max(len(p) for p in parts if p is not None)
        return [
            {
                key: (part[i] if part is not None else batch[key])
                for key, part in zip(keys, parts, strict=True)
            }
            for i in range(count)
        ]
    if isinstance(batch, (tuple, list)):
        if not any(_is_batched(item) for item in batch):  # per-sample values (texts, ids): slice them
            return [_same_sequence(batch, list(batch[i : i + size])) for i in range(0, len(batch), size)]
        parts = [split_batch(item, size) for item in batch]
        return [_same_sequence(batch, [part[i] for part in parts]) for i in range(len(parts[0]))]
    raise ValueError(f"micro_batch_size: cannot split a batch of type {type(batch).__name__}")


def _same_sequence(like: tuple | list, items: list[Any]) -> tuple | list:
    """``items`` as the kind of sequence ``like`` is: a named tuple takes its fields as arguments."""
    kind = type(like)
    if kind is tuple or kind is list or not hasattr(like, "_fields"):
        return kind(items)
    return kind(*items)


def _is_batched(value: Any) -> bool:
    return isinstance(value, (torch.Tensor, tuple, list, Mapping)) and not (
        isinstance(value, torch.Tensor) and value.dim() == 0
    )


def move_to(batch: Any, device: torch.device, non_blocking: bool) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        # Already there (data on the CPU for a CPU run): no dispatch at all, it is on every step.
        return batch if batch.device == device else batch.to(device, non_blocking=non_blocking)
    if isinstance(batch, (tuple, list)):
        return _same_sequence(batch, [move_to(value, device, non_blocking) for value in batch])
    if isinstance(batch, Mapping):  # after the cheap checks: an ABC check costs more, on every step
        # A plain dict from here on, also of a transformers BatchEncoding (a UserDict, not a dict): the
        # step, the loss and evaluation then meet one kind of dict batch.
        return {key: move_to(value, device, non_blocking) for key, value in batch.items()}
    return batch


def dataset_length(data: Any) -> int | None:
    """Number of samples when known (map-style datasets, loaders over them)."""
    if isinstance(data, DataLoader):
        try:
            return len(data.dataset)  # type: ignore[arg-type]
        except TypeError:
            return None
    if isinstance(data, IterableDataset):
        return None
    try:
        return len(data)
    except TypeError:
        return None


def batches_per_epoch(data: Any, batch_size: int, world_size: int = 1) -> int | None:
    """Micro-batches per epoch on each rank, when the data has a length."""
    if isinstance(data, DataLoader):
        try:
            return len(data)
        except TypeError:
            return None
    length = dataset_length(data)
    if length is None:
        return None
    return -(-length // (batch_size * world_size))
