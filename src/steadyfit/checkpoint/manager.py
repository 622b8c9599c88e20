"""CheckpointManager: the checkpoints of one run directory, as a mapping of named components.

A component is anything with ``state_dict()`` and ``load_state_dict(state)``. Saving calls every
component's ``state_dict()`` once, restoring every ``load_state_dict()`` once, in the mapping's order, so
nothing can be saved and forgotten at resume. The ``model`` component is written to ``model.safetensors``
(or, when it has ``sharded_state()``, to ``shards/`` through torch.distributed.checkpoint); every other
component goes into one ``state`` payload (``state.json`` + ``state.safetensors``).

The manager knows files and processes, never the training loop: the caller decides when to save, what the
best checkpoint is and what happens after a resume. Under several ranks every method is called by every rank
at the same point; rank 0 alone writes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from steadyfit import layout
from steadyfit.checkpoint.async_writer import AsyncCheckpointWriter
from steadyfit.checkpoint.errors import CheckpointError
from steadyfit.checkpoint.payload import snapshot
from steadyfit.checkpoint.sharded import save_sharded
from steadyfit.checkpoint.store import CheckpointStore, LoadedCheckpoint
from steadyfit.config import ConfigError
from steadyfit.console import notice, warn
from steadyfit.identity import ExperimentChanged

if TYPE_CHECKING:
    from steadyfit.distributed import Distributed

MODEL = "model"
STATE = "state"

# Turns a checkpoint's state entries of an older layout into today's (given the checkpoint's extra files).
Upgrade = Callable[[dict[str, Any], Mapping[str, bytes]], dict[str, Any]]


class Stateful(Protocol):
    """What a checkpoint component provides."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


@dataclass
class _Capture:
    """One boundary's state, on rank 0 (empty elsewhere): the weights and every other component's state."""

    step: int
    model_state: dict[str, torch.Tensor] = field(default_factory=dict)
    states: dict[str, Any] = field(default_factory=dict)
    extra_files: dict[str, bytes] = field(default_factory=dict)
    protect: list[Path] = field(default_factory=list)


class CheckpointManager:
    """Saves, restores and rotates the checkpoints of one run directory.

    Args:
        run_dir: the run directory (checkpoints live in ``run_dir/checkpoints/``).
        dist: the process group (:class:`~steadyfit.distributed.Distributed`).
        keep_last: how many of the newest checkpoints rotation keeps (besides the protected ones).

    Example:
        >>> import tempfile
        >>> from steadyfit.config import TrainConfig
        >>> from steadyfit.distributed import Distributed
        >>> from steadyfit.state import TrainState
        >>> manager = CheckpointManager(tempfile.mkdtemp(), Distributed.setup(TrainConfig()), keep_last=2)
        >>> model, state = torch.nn.Linear(2, 1), TrainState(step=5)
        >>> components = {"model": model, "trainer_state": state}
        >>> manager.save(5, components); manager.wait()
        >>> state.step = 0
        >>> manager.restore(components, "auto").name, state.step
        ('step-00000005', 5)
    """

    def __init__(self, run_dir: str | Path, dist: Distributed, *, keep_last: int) -> None:
        self.store = CheckpointStore(run_dir)
        self.dist = dist
        self.keep_last = keep_last
        self.writer = AsyncCheckpointWriter(self.store)
        self.last_checkpoint: str | None = None
        self.last_saved_step: int | None = None
        # Appended by the writer thread, drained by the caller's: a deque's append and popleft are atomic.
        self._committed: deque[str] = deque()
        self._best: _Capture | None = None
        # The checkpoint whose weights a fine-tune started from (restore with resume=PATH of another run).
        self.started_from: str | None = None

    def path_for(self, step: int) -> Path:
        return self.store.path_for(step)

    # ------------------------------------------------------------------------------------------ saving
    def save(
        self,
        step: int,
        components: Mapping[str, Stateful],
        *,
        extra_files: Mapping[str, bytes] | None = None,
        protect: Iterable[Path] = (),
        copy_later: Iterable[torch.Tensor] = (),
    ) -> None:
        """Checkpoint this boundary as ``step-<step>``, replacing a checkpoint of the same step.

        Every component's state is copied to host memory now, but for what lives in ``copy_later``'s
        tensors, which the writer thread copies while the caller goes on until :meth:`wait_staged`; rank 0
        writes, fsyncs and commits it in the background. A held best checkpoint of an earlier step is
        committed first. Under FSDP the save is sharded and synchronous: every rank writes its shard, rank
        0 commits, every rank returns after it. A collective under several ranks.

        Raises:
            CheckpointError: an earlier background save failed, or (sharded) this one did.
        """
        best, self._best = self._best, None
        if best is not None and best.step != step:
            self._submit(best)
        sharded = getattr(components.get(MODEL), "sharded_state", None)
        if sharded is not None:
            self._save_sharded(step, components, extra_files, list(protect))
            return
        self._submit(self._capture(step, components, extra_files, protect), copy_later)

    def wait_staged(self) -> None:
        """Block until the last save's ``copy_later`` tensors are copied: the caller may modify them after.
        Local to the rank (only rank 0 copies); free when nothing is left to copy."""
        self.writer.wait_staged()

    def hold_best(
        self,
        step: int,
        components: Mapping[str, Stateful],
        *,
        extra_files: Mapping[str, bytes] | None = None,
        protect: Iterable[Path] = (),
        still_kept: Collection[int] = (),
    ) -> bool:
        """This boundary is among the best: keep its state in host memory and commit it at the next save.

        A run that improves at every evaluation then writes one best checkpoint, not one per evaluation; a
        crash before the next save loses nothing a resume does not recompute (the resumed run replays the
        same evaluations). One state is held at a time: one held before is committed now when its step is
        in ``still_kept`` (``keep_best`` > 1 keeps it), dropped otherwise. Sharded checkpoints are written
        right away: holding every rank's shards in host memory would cost as much memory as the training
        state itself.

        Returns:
            Whether the checkpoint was written now (sharded) rather than held.
        """
        held = self._best
        if held is not None and held.step != step and held.step in still_kept:
            self._submit(held)
        if getattr(components.get(MODEL), "sharded_state", None) is not None:
            self._best = None
            self._save_sharded(step, components, extra_files, list(protect))
            return True
        capture = self._capture(step, components, extra_files, protect)
        # A copy, because training goes on mutating the originals; costs one copy of the state in host memory.
        capture.model_state = snapshot(capture.model_state, where="model")
        capture.states = snapshot(capture.states, where="state")
        self._best = capture
        return False

    def wait(self) -> None:
        """Commit a held best checkpoint, then block until every save is committed; every rank returns only
        after rank 0's commit."""
        best, self._best = self._best, None
        if best is not None:
            self._submit(best)
        if self.dist.is_main:
            self.writer.wait()
        self.dist.barrier()

    def pop_committed(self) -> list[str]:
        """Checkpoints committed since the last call (rank 0; empty elsewhere), oldest first."""
        committed = []
        while self._committed:
            committed.append(self._committed.popleft())
        return committed

    @property
    def last_good_checkpoint(self) -> str | None:
        """The checkpoint a rerun would resume from: a best one held in memory (committed at the next save
        point or when the run closes), else the last one submitted."""
        if self._best is not None:
            return str(self.path_for(self._best.step))
        return self.last_checkpoint

    def close(self, *, quietly: bool = False, commit_held_best: bool = True) -> None:
        """Commit a best checkpoint held in memory, wait for the save in flight (rank 0) and refuse further
        saves.

        ``quietly``: while another error unwinds, a failed background save is not raised over it.
        ``commit_held_best``: False for an abort that must not wait for a write (a second Ctrl-C); the held
        best is otherwise a consistent capture of an earlier boundary, and an error must not lose it.
        """
        best, self._best = self._best, None
        if best is not None and commit_held_best:
            self._submit(best)
        if not self.dist.is_main:
            return
        if not quietly:
            self.writer.close()
            return
        try:
            self.writer.close()
        except CheckpointError as exc:
            warn(str(exc))

    def _capture(
        self,
        step: int,
        components: Mapping[str, Stateful],
        extra_files: Mapping[str, bytes] | None,
        protect: Iterable[Path],
    ) -> _Capture:
        # Every rank calls every state_dict(): some are collectives (RNG states, FSDP's full weights).
        states = {name: component.state_dict() for name, component in components.items()}
        if not self.dist.is_main:
            return _Capture(step)
        return _Capture(step, states.pop(MODEL, {}), states, dict(extra_files or {}), list(protect))

    def _submit(self, capture: _Capture, copy_later: Iterable[torch.Tensor] = ()) -> None:
        self.last_checkpoint = str(self.path_for(capture.step))
        self.last_saved_step = max(capture.step, self.last_saved_step or 0)
        if not self.dist.is_main:
            return

        def committed(path: Path) -> None:
            # The writer thread, after the commit; the caller hears of it through pop_committed().
            self._rotate(path, capture.protect)
            self._committed.append(str(path))

        self.writer.submit(
            capture.step,
            capture.model_state,
            {STATE: capture.states},
            capture.extra_files,
            on_done=committed,
            copy_later=copy_later,
        )

    def _save_sharded(
        self,
        step: int,
        components: Mapping[str, Stateful],
        extra_files: Mapping[str, bytes] | None,
        protect: list[Path],
    ) -> None:
        model = components[MODEL]
        tensors, entries = model.sharded_state()  # type: ignore[attr-defined]
        covered = {MODEL, *getattr(model, "covers", ())}
        states = {name: c.state_dict() for name, c in components.items() if name not in covered}
        states.update(entries)
        path = save_sharded(
            self.store,
            self.dist,
            step,
            tensors,
            {STATE: states} if self.dist.is_main else None,
            extra_files=extra_files,
            on_commit=lambda committed: self._rotate(committed, protect),
        )
        self.last_checkpoint = str(path)
        self.last_saved_step = step
        if self.dist.is_main:
            self._committed.append(str(path))

    def _rotate(self, path: Path, protect: list[Path]) -> None:
        """Apply ``keep_last`` after ``path`` was committed (rank 0). Best effort: the checkpoint is
        committed, so a failure is a warning and the save still counts; the next save rotates again."""
        try:
            self.store.rotate(self.keep_last, protect=protect, known_good=path)
        except Exception as exc:
            warn(
                f"checkpoint {path} is committed, but rotating older checkpoints (keep_last="
                f"{self.keep_last}) failed: {exc}"
            )

    # --------------------------------------------------------------------------------------- restoring
    def restore(
        self, components: Mapping[str, Stateful], mode: str, *, upgrade: Upgrade | None = None
    ) -> Path | None:
        """Restore every component from a checkpoint; returns its path, or None to start fresh.

        ``mode`` is ``auto`` (the newest checkpoint that restores; a damaged one, whether its files fail the
        manifest or its content does not fit a component, is reported, kept and skipped for the previous
        one), ``never`` (start fresh; refused when checkpoints exist) or the path of one checkpoint. A PATH
        outside this run directory starts it: once the run directory holds checkpoints of its own, a rerun
        of the same command continues from those, as ``auto`` does. A PATH of another experiment whose
        weights fit this model is a fine-tune: only the weights are loaded, the run starts at step 0 (the
        manager's ``started_from`` names it) and None is returned. Rank 0 chooses; every rank verifies and
        loads the same checkpoint, and all of them agree on the outcome.

        Raises:
            ConfigError: the checkpoint belongs to another experiment (a component said so; the message
                names the ways out), ``never`` with existing checkpoints, or a PATH that is no checkpoint
                directory.
            CheckpointError: every checkpoint is damaged (nothing restarts from step 0 over them), or the
                named PATH is.
        """
        if mode not in ("auto", "never") and self._continues_own_checkpoints(Path(mode)):
            if self.dist.is_main:
                notice(
                    f"resume={mode}: {self.store.checkpoints_dir} holds this run's own checkpoints; "
                    "continuing from the newest of them"
                )
            mode = "auto"
        candidates = self._candidates(mode)
        skipped: list[str] = []
        for path in candidates:
            try:
                fault = self._try_restore(path, components, upgrade)
            except ExperimentChanged as exc:
                if mode in ("auto", "never") or not exc.weights_fit or self.store.list_checkpoints():
                    raise ExperimentChanged(self._ways_out(exc, path, mode), exc.weights_fit) from None
                self.read_model(path, components[MODEL])
                self.started_from = str(path)
                return None
            if fault is None:
                self.last_checkpoint = str(path)
                self.last_saved_step = layout.step_of(path.name)
                return path
            if mode not in ("auto", "never"):
                raise CheckpointError(f"resume={mode}: cannot restore checkpoint {path}: {fault}")
            if self.dist.is_main:
                notice(f"skipping damaged checkpoint {path}: {fault}")
            skipped.append(f"{path}: {fault}")
        if skipped:
            raise CheckpointError(
                f"resume=auto: every checkpoint in {self.store.checkpoints_dir} is damaged "
                f"({'; '.join(skipped)}); refusing to restart from step 0 over them: move them away or "
                "pass resume=PATH"
            )
        return None

    def _continues_own_checkpoints(self, path: Path) -> bool:
        """``resume=PATH`` from outside the run directory, rerun once the run wrote checkpoints of its own."""
        if path.is_symlink() or not path.is_dir():
            return False  # _choose says what is wrong with it
        own = self.store.checkpoints_dir.resolve()
        return bool(self.store.list_checkpoints()) and own not in path.resolve().parents

    def _ways_out(self, exc: ExperimentChanged, path: Path, mode: str) -> str:
        ways = [
            "another run_dir starts a new run",
            f"resume=never starts over here once {self.store.checkpoints_dir} is moved away",
        ]
        if exc.weights_fit:
            ways.append(f"resume={path} with another run_dir fine-tunes from its weights")
        return (
            f"resume={mode}: {path} is a checkpoint of another experiment ({exc}); nothing was changed. "
            f"Ways out: {'; '.join(ways)}"
        )

    def read_model(self, path: str | Path, model: Stateful) -> None:
        """Load only the weights of the checkpoint at ``path`` into ``model`` (every rank, verified first)."""
        checkpoint = self._open_on_every_rank(Path(path))
        if checkpoint.shards_dir is not None:
            if not hasattr(model, "load_model_shards"):
                raise ConfigError(
                    f"strategy: {path} is a sharded (FSDP) checkpoint; load its weights with strategy=fsdp"
                )
            model.load_model_shards(checkpoint.shards_dir)  # type: ignore[attr-defined]
        else:
            model.load_state_dict(checkpoint.model_state)

    def _candidates(self, mode: str) -> list[Path]:
        """The checkpoints to try, newest first; rank 0 decides, every rank gets its answer."""
        answer: list[Path] | BaseException = []
        if self.dist.is_main:
            try:
                answer = self._choose(mode)
            except (ConfigError, CheckpointError) as exc:
                answer = exc
        answer = self.dist.broadcast_object(answer)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def _choose(self, mode: str) -> list[Path]:
        existing = self.store.list_checkpoints()
        if mode == "never":
            if existing:
                raise ConfigError(
                    f"resume: 'never' but {self.store.checkpoints_dir} holds {len(existing)} checkpoint(s); "
                    "use another run_dir or resume=auto (nothing was deleted)"
                )
            return []
        if mode == "auto":
            for entry in self.store.linked_entries():
                what = "a symlink" if entry.is_symlink() else "a file"
                notice(f"skipping {entry}: {what} where a checkpoint should be (links are never followed)")
            return list(reversed(existing))
        path = Path(mode)
        if path.is_symlink() or not path.is_dir():
            raise ConfigError(f"resume: {mode!r} is not a checkpoint directory")
        if not (path / layout.MANIFEST_FILE).exists():
            # A checkpoints/ folder or a run directory (an easy slip) holds checkpoints, not a checkpoint's
            # files; a checkpoint that lost its manifest is damaged instead, and reported as such.
            holder = path / layout.CHECKPOINTS_DIR if (path / layout.CHECKPOINTS_DIR).is_dir() else path
            names = (entry.name for entry in holder.iterdir())
            inside = sorted(name for name in names if layout.STEP_DIR_RE.match(name))
            if inside:
                raise ConfigError(
                    f"resume: {mode!r} is not a checkpoint directory but holds {len(inside)} of them; name "
                    f"one (resume={holder / inside[-1]}), or set run_dir to the run and resume=auto"
                )
            ours = (layout.MODEL_FILE, layout.SHARDS_DIR, *layout.component_files(STATE))
            if layout.step_of(path.name) is None and not any((path / name).exists() for name in ours):
                raise ConfigError(
                    f"resume: {mode!r} is not a checkpoint directory (no manifest.json nor any checkpoint "
                    "file); name a checkpoint (RUN_DIR/checkpoints/step-...)"
                )
        return [path]

    def _try_restore(
        self, path: Path, components: Mapping[str, Stateful], upgrade: Upgrade | None
    ) -> str | None:
        """Load ``path`` into every component; None when it worked, else why it is damaged (all ranks
        agree)."""
        try:
            checkpoint = self._open_on_every_rank(path)
        except CheckpointError as exc:
            prefix = f"checkpoint {path} failed verification: "
            return str(exc).removeprefix(prefix)
        fault, incompatible, fatal = None, None, None
        try:
            self._load(checkpoint, components, upgrade)
        except ExperimentChanged as exc:
            incompatible = exc
        except ConfigError as exc:
            incompatible = ConfigError(f"{exc}; checkpoint: {path}")
        except torch.OutOfMemoryError as exc:  # not the checkpoint's fault: an older one would not help
            fatal = exc
        except Exception as exc:  # anything else a component raised: this checkpoint's content is wrong
            fault = str(exc) if isinstance(exc, CheckpointError) else f"{type(exc).__name__}: {exc}"
        # Every rank learns every rank's verdict, so all of them go on, fall back or stop together.
        verdicts = self.dist.gather_objects((fault, incompatible, str(fatal) if fatal else None))
        if fatal is not None:
            raise fatal
        failed = next((message for _, _, message in verdicts if message), None)
        if failed is not None:
            raise CheckpointError(f"another rank ran out of memory restoring {path}: {failed}")
        incompatible = next((error for _, error, _ in verdicts if error is not None), None)
        if incompatible is not None:
            raise incompatible
        return next((message for message, _, _ in verdicts if message), None)

    def _open_on_every_rank(self, path: Path) -> LoadedCheckpoint:
        """Verify and read a checkpoint on every rank; all of them raise if any failed, before any loads.

        Each rank hashes its own share of a sharded checkpoint's shard files, in parallel (at the world size
        that saved, the shard it wrote and will read back), and checks the others' sizes; the ranks pool
        what they found, so every rank raises the same error, naming every fault found on any rank.
        """
        checkpoint, error = None, None
        try:
            checkpoint = self.store.open(path, shard_share=(self.dist.rank, self.dist.world_size))
        except CheckpointError as exc:
            error = exc
        except Exception as exc:  # an unexpected error on one rank must not leave the others waiting
            error = CheckpointError(f"could not read {path}: {type(exc).__name__}: {exc}")
        failures = [message for message in self.dist.gather_objects(str(error) if error else None) if message]
        if failures:
            prefix = f"checkpoint {path} failed verification: "
            if not all(message.startswith(prefix) for message in failures):
                raise CheckpointError("; ".join(dict.fromkeys(failures)))
            # A fault every rank found (a damaged state file) is named once.
            faults = (fault for message in failures for fault in message.removeprefix(prefix).split("; "))
            raise CheckpointError(prefix + "; ".join(dict.fromkeys(faults)))
        assert checkpoint is not None
        return checkpoint

    def _load(
        self, checkpoint: LoadedCheckpoint, components: Mapping[str, Stateful], upgrade: Upgrade | None
    ) -> None:
        states = checkpoint.components.get(STATE)
        if not isinstance(states, dict):
            raise CheckpointError(
                f"it has no {STATE!r} component (it holds {sorted(checkpoint.components)}): it was written "
                "by an older steadyfit layout that this version cannot resume; start a new run_dir, or "
                "resume=never after moving checkpoints/ away"
            )
        if upgrade is not None:
            states = upgrade(dict(states), checkpoint.extra_files)
        covered: set[str] = set()
        for name, component in components.items():
            if name == MODEL:
                if checkpoint.shards_dir is None:
                    if hasattr(component, "load_shards"):
                        raise ConfigError(
                            "strategy: the checkpoint is not sharded (written with strategy=ddp or in one "
                            "process) and this run shards the model (strategy=fsdp); resume it with the "
                            "strategy it was written with"
                        )
                    _load_one(name, component.load_state_dict, checkpoint.model_state)
                    continue
                if not hasattr(component, "load_shards"):
                    raise ConfigError(
                        "strategy: the checkpoint is sharded (written with strategy=fsdp); resume it with "
                        "strategy=fsdp under torchrun (any world size that keeps the global batch)"
                    )
                covered.update(getattr(component, "covers", ()))
                _load_one(name, component.load_shards, checkpoint.shards_dir, states)
            elif name in covered:
                continue
            elif name in states:
                _load_one(name, component.load_state_dict, states[name])
            elif getattr(component, "optional_in_checkpoint", False):
                _load_one(name, component.load_state_dict, None)  # absent: back to its initial state
            else:
                raise CheckpointError(f"it holds no {name!r} state")


def _load_one(name: str, load: Callable[..., None], *state: Any) -> None:
    """One component's load; what it raises about the content names the component."""
    try:
        load(*state)
    except (ConfigError, CheckpointError, torch.OutOfMemoryError):
        raise
    except Exception as exc:
        raise CheckpointError(
            f"component {name!r} does not fit this run: {type(exc).__name__}: {exc}"
        ) from exc
