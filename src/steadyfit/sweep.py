"""Hyperparameter sweeps with Optuna: each trial a normal run in its own directory, the study in SQLite.

Layout of a sweep directory::

    SWEEP_DIR/study.db        the Optuna study (resumable; shared by worker processes)
    SWEEP_DIR/space.yaml      the search space, as given
    SWEEP_DIR/sweep.yaml      config source, overrides, objective, sampler and pruner settings
    SWEEP_DIR/trial-0003/     trial 3's run directory (config.yaml, metrics.jsonl, checkpoints/ ...)
    SWEEP_DIR/results.md      one row per trial: params, value, state; the best trial and its rerun command
    SWEEP_DIR/sweep.png       every trial's value (pruned ones marked) and the best so far (needs matplotlib)
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from steadyfit.assembly import build_trainer, prepare
from steadyfit.callbacks import Callback
from steadyfit.config import (
    ConfigError,
    TrainConfig,
    check_field_value,
    describe_unknown_field,
    parse_overrides,
    parse_scalar,
    read_yaml,
)
from steadyfit.recipes import build_recipe
from steadyfit.signals import Preempted
from steadyfit.tracking import infer_greater_is_better, metric_key

if TYPE_CHECKING:
    import optuna

    from steadyfit.state import TrainState
    from steadyfit.trainer import Trainer

STUDY_FILE = "study.db"
SPACE_FILE = "space.yaml"
SWEEP_FILE = "sweep.yaml"
RESULTS_FILE = "results.md"
PLOT_FILE = "sweep.png"
STUDY_NAME = "steadyfit-sweep"
RUN_DIR_ATTR = "run_dir"
PARAM_TYPES = ("float", "int", "categorical")
# Fields a trial may not draw -> why.
_NOT_SWEPT = {
    "run_dir": "each trial has its own",
    "resume": "each trial resumes its own run",
    "metric_for_best": "it is the objective every trial is ranked by: set it with an override",
    "greater_is_better": "it is the objective's direction: set it with an override",
}
# Median pruning compares a trial with the trials before it: it needs a couple of finished ones first.
PRUNER_STARTUP_TRIALS = 2


def _import_optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("sweep: needs Optuna; pip install 'steadyfit[sweep]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def read_space(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read and check a search space YAML: ``field: {type: float|int|categorical, ...}``.

    ``float`` / ``int`` take ``low``, ``high`` and optionally ``log: true`` or ``step``; ``categorical`` takes
    ``choices``. Every name must be a TrainConfig field.

    Raises:
        ConfigError: naming the file, the parameter and what is wrong.

    Example:
        >>> Path("/tmp/space.yaml").write_text("lr: {type: float, low: 1e-4, high: 1e-1, log: true}")
        51
        >>> read_space("/tmp/space.yaml")["lr"]["log"]
        True
    """
    space = read_yaml(path)
    if not space:
        raise ConfigError(
            f"{path}: the search space is empty; add e.g. lr: {{type: float, low: 1e-4, high: 1e-1}}"
        )
    for name, spec in space.items():
        where = f"{path}: {name}"
        if name not in TrainConfig.model_fields:
            raise ConfigError(f"{path}: {describe_unknown_field(name)}")
        if name in _NOT_SWEPT:
            raise ConfigError(f"{where}: not a TrainConfig field that a sweep can vary ({_NOT_SWEPT[name]})")
        if not isinstance(spec, dict) or spec.get("type") not in PARAM_TYPES:
            raise ConfigError(f"{where}: expected a mapping with type: {' | '.join(PARAM_TYPES)}")
        if spec["type"] == "categorical":
            choices = spec.get("choices")
            if not isinstance(choices, list) or not choices:
                raise ConfigError(f"{where}: categorical needs a non-empty 'choices' list")
            _check_values(path, name, choices)
            continue
        for key in ("low", "high", "step"):
            if isinstance(spec.get(key), str):
                spec[key] = parse_scalar(spec[key], f"{name}.{key}")  # YAML reads 1e-3 as a string
        low, high = spec.get("low"), spec.get("high")
        if (
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
            or low >= high
        ):
            raise ConfigError(f"{where}: needs numbers low < high (got low={low!r}, high={high!r})")
        if spec.get("log") and low <= 0:
            raise ConfigError(f"{where}: log: true needs low > 0")
        if spec.get("step") is not None:
            step = spec["step"]
            if spec.get("log"):
                raise ConfigError(f"{where}: log: true and step exclude each other (Optuna); keep one")
            if isinstance(step, bool) or not isinstance(step, (int, float)) or not step > 0:
                raise ConfigError(f"{where}: step must be a number > 0 (got {step!r})")
        unknown = set(spec) - {"type", "low", "high", "log", "step"}
        if unknown:
            raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; allowed: type, low, high, log, step")
        _check_values(path, name, [int(low), int(high)] if spec["type"] == "int" else [low, high])
    return space


def _check_values(path: str | Path, name: str, values: list[Any]) -> None:
    """Every value a trial may draw must be one the field takes: a wrong one would fail each trial that
    draws it, after the sweep started."""
    for value in values:
        try:
            check_field_value(name, value)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def suggest(trial: optuna.Trial, space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Draw one value per parameter of the space from the trial."""
    params: dict[str, Any] = {}
    for name, spec in space.items():
        if spec["type"] == "categorical":
            params[name] = trial.suggest_categorical(name, spec["choices"])
        elif spec["type"] == "int":
            params[name] = trial.suggest_int(
                name,
                int(spec["low"]),
                int(spec["high"]),
                step=int(spec.get("step", 1)),
                log=bool(spec.get("log")),
            )
        else:
            params[name] = trial.suggest_float(
                name,
                float(spec["low"]),
                float(spec["high"]),
                step=spec.get("step"),
                log=bool(spec.get("log")),
            )
    return params


class PruningCallback(Callback):
    """Reports each evaluation's objective to the trial; stops the run when the pruner says so.

    Also prints a flushed line for each committed checkpoint of the trial.

    Example:
        >>> callback = PruningCallback(trial, "eval_accuracy")  # doctest: +SKIP
    """

    def __init__(self, trial: optuna.Trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.pruned_at: int | None = None

    def on_evaluate(self, trainer: Trainer, state: TrainState, metrics: dict[str, float]) -> None:
        value = float(metrics[self.metric])
        if not math.isfinite(value):
            return
        self.trial.report(value, state.step)
        # The final evaluation of a finished run: pruning would only throw away a complete result.
        is_last = trainer.total_steps is not None and state.step >= trainer.total_steps
        if not is_last and self.trial.should_prune():
            self.pruned_at = state.step
            trainer.request_stop(f"pruned by the sweep at step {state.step} ({self.metric}={value:.4g})")

    def on_fit_start(self, trainer: Trainer, state: TrainState) -> None:
        if state.step:
            print(f"sweep: trial {self.trial.number} resumed its run at step {state.step}", flush=True)

    def on_checkpoint_saved(self, trainer: Trainer, state: TrainState, path: str) -> None:
        # A line to follow the sweep by (and for tests to synchronise on): the trial can resume from here.
        print(f"sweep: trial {self.trial.number} checkpoint {path}", flush=True)


class Objective:
    """One trial: draw params, train a normal run in the trial's directory, return ``metric_for_best``.

    Picklable, so worker processes started with 'spawn' get their own.
    """

    def __init__(
        self, source: str | None, overrides: dict[str, Any], space: dict[str, dict[str, Any]], sweep_dir: Path
    ) -> None:
        self.source = source
        self.overrides = overrides
        self.space = space
        self.sweep_dir = sweep_dir

    def __call__(self, trial: optuna.Trial) -> float:
        optuna = _import_optuna()
        params = suggest(trial, self.space)
        # A re-enqueued interrupted trial carries its old run directory: resume=auto continues it there.
        run_dir = trial.user_attrs.get(RUN_DIR_ATTR) or str(self.sweep_dir / f"trial-{trial.number:04d}")
        trial.set_user_attr(RUN_DIR_ATTR, run_dir)
        values = self.overrides | params | {"run_dir": run_dir, "progress": False, "resume": "auto"}
        recipe_name, config = prepare(self.source, values)
        metric = objective_metric(config)
        pruning = PruningCallback(trial, metric)
        print(f"sweep: trial {trial.number} started in {run_dir} with {params}", flush=True)
        result = build_trainer(recipe_name, config, callbacks=[pruning]).fit()
        if pruning.pruned_at is not None:
            print(f"sweep: trial {trial.number} pruned at step {pruning.pruned_at}", flush=True)
            raise optuna.TrialPruned()
        if result.best_metric is None or not math.isfinite(result.best_metric):
            raise RuntimeError(f"trial {trial.number}: no finite {metric} (see {run_dir}/metrics.jsonl)")
        print(f"sweep: trial {trial.number} completed {metric}={result.best_metric:.6g}", flush=True)
        return float(result.best_metric)


def objective_metric(config: TrainConfig) -> str:
    """The metric a sweep optimises: ``metric_for_best`` (``eval_loss`` when unset)."""
    return metric_key(config.metric_for_best or "eval_loss")


def is_greater_better(config: TrainConfig) -> bool:
    """The objective's direction: ``greater_is_better``, or inferred from the metric's name."""
    if config.greater_is_better is not None:
        return config.greater_is_better
    return infer_greater_is_better(objective_metric(config))


def run_sweep(
    config_source: str | None,
    space_path: str,
    trials: int,
    sweep_dir: str | None = None,
    workers: int = 1,
    overrides: list[str] = (),
) -> optuna.Study:
    """Run (or resume) a sweep of ``trials`` finished trials (completed or pruned) over a search space.

    Args:
        config_source: recipe name or YAML config, as for ``steadyfit fit`` (None: digits).
        space_path: the search space YAML (see :func:`read_space`).
        trials: how many trials should be finished when the sweep ends, counting earlier runs of it.
        sweep_dir: the sweep directory (default ``sweeps/<recipe or config name>``).
        workers: processes running trials in parallel on the shared SQLite study.
        overrides: ``key=value`` strings applied to every trial (the space's values win).

    Returns:
        The Optuna study (``study.best_trial``, ``study.trials``).

    Raises:
        ConfigError: for a bad space, config or argument; a missing Optuna.

    Example:
        >>> study = run_sweep("digits", "space.yaml", trials=6, sweep_dir="sweeps/digits")  # doctest: +SKIP
        >>> study.best_params  # doctest: +SKIP
        {'lr': 0.0071, 'weight_decay': 0.0003}
    """
    optuna = _import_optuna()
    if trials < 1:
        raise ConfigError(f"--trials: must be at least 1 (got {trials})")
    if workers < 1:
        raise ConfigError(f"--workers: must be at least 1 (got {workers})")
    space = read_space(space_path)
    fixed = parse_overrides(list(overrides))
    recipe_name, config = prepare(config_source, fixed)
    _check_evaluates(recipe_name, config)
    default_name = Path(config_source).stem if config_source else "digits"
    root = Path(sweep_dir or Path("sweeps") / default_name)
    direction = "maximize" if is_greater_better(config) else "minimize"
    _check_same_objective(root, objective_metric(config), direction)
    root.mkdir(parents=True, exist_ok=True)
    (root / SPACE_FILE).write_text(yaml.safe_dump(space, sort_keys=False), encoding="utf-8")
    storage = _storage_url(root)
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        direction=direction,
        sampler=_sampler(optuna, config.seed, 0),
        pruner=_pruner(optuna),
        load_if_exists=True,
    )
    _requeue_interrupted(optuna, study, root)
    settings = {
        "config": config_source,
        "overrides": list(overrides),
        "trials": trials,
        "metric": objective_metric(config),
        "direction": direction,
        "sampler": {"name": "TPESampler", "seed": config.seed},
        "pruner": {"name": "MedianPruner", "n_startup_trials": PRUNER_STARTUP_TRIALS},
        "study": STUDY_FILE,
    }
    (root / SWEEP_FILE).write_text(yaml.safe_dump(settings, sort_keys=False), encoding="utf-8")
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    remaining = trials - len(study.get_trials(deepcopy=False, states=finished))
    objective = Objective(config_source, fixed, space, root)
    seed = config.seed + len(study.get_trials(deepcopy=False))
    if remaining > 0:
        shares = [remaining // workers + (i < remaining % workers) for i in range(workers)]
        shares = [share for share in shares if share]
        if len(shares) == 1:
            _optimize(storage, seed, 0, objective, shares[0])
        else:
            _run_workers(storage, seed, objective, shares, root)
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    best = best_trial_lines(study, config_source, list(overrides), root, objective_metric(config))
    write_results(study, root, objective_metric(config), best)
    for line in best:
        print(f"sweep: {line}", flush=True)
    return study


def _check_evaluates(recipe_name: str, config: TrainConfig) -> None:
    """Every trial is ranked by an evaluation: refuse a sweep that would train every trial to the end and
    then fail it for having none."""
    if build_recipe(recipe_name, config).eval_data is None:
        raise ConfigError(
            f"sweep: the recipe {recipe_name} has no eval data, and every trial is ranked by its evaluation "
            f"({objective_metric(config)})"
        )


def _check_same_objective(root: Path, metric: str, direction: str) -> None:
    """A sweep directory ranks its trials by one objective: values of another metric or direction would be
    ranked with them, the stored study keeping its first direction."""
    settings = read_yaml(root / SWEEP_FILE) if (root / SWEEP_FILE).exists() else None
    if not isinstance(settings, dict):
        return
    before = (settings.get("metric"), settings.get("direction"))
    if before != (metric, direction):
        raise ConfigError(
            f"sweep: {root} ranks its trials by {before[0]} ({before[1]}), this command by {metric} "
            f"({direction}); trials of both cannot be ranked together: pass another --dir, or the "
            "metric_for_best and greater_is_better of that sweep"
        )


def best_trial_lines(
    study: optuna.Study, config_source: str | None, overrides: list[str], root: Path, metric: str
) -> list[str]:
    """The best completed trial, its parameters and the ``steadyfit fit`` command that reruns it.

    The command repeats the sweep's config source and overrides with the trial's parameters (which win, as
    in the trial), in a fresh run directory ``SWEEP_DIR/best``: the same config as the trial but for
    ``run_dir`` and ``progress``, so the same weights on the same machine.

    Example:
        >>> lines = best_trial_lines(study, "digits", ["max_steps=300"], Path("sw"), "eval_loss")
        >>> print("\n".join(lines))
        best trial 4: eval_loss=0.0731
        best params: lr=0.0042, weight_decay=0.0013
        rerun it: steadyfit fit digits max_steps=300 lr=0.0042 weight_decay=0.0013 run_dir=sw/best
    """
    optuna = _import_optuna()
    if not study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        return [f"no trial completed yet; see {root / RESULTS_FILE}"]
    best = study.best_trial
    params = best.params
    kept = [item for item in overrides if item.partition("=")[0] not in params]
    words = ["steadyfit", "fit", *([config_source] if config_source else [])]
    words += kept + [f"{name}={_override_value(value)}" for name, value in params.items()]
    words.append(f"run_dir={root / 'best'}")
    shown = ", ".join(f"{name}={_override_value(value)}" for name, value in params.items())
    return [
        f"best trial {best.number}: {metric}={best.value:.6g}",
        f"best params: {shown}",
        f"rerun it: {shlex.join(words)}",
    ]


def _override_value(value: Any) -> str:
    """A parameter as a ``key=value`` override reads it back: floats in full (repr round-trips)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _storage_url(root: Path) -> str:
    return f"sqlite:///{(root / STUDY_FILE).resolve()}"


def _sampler(optuna: Any, seed: int, worker: int) -> Any:
    # A different seed per process and per restart, so a resumed sweep does not replay the same draws.
    return optuna.samplers.TPESampler(seed=seed + 1000 * worker)


def _pruner(optuna: Any) -> Any:
    return optuna.pruners.MedianPruner(n_startup_trials=PRUNER_STARTUP_TRIALS)


def _requeue_interrupted(optuna: Any, study: optuna.Study, root: Path) -> None:
    """Trials left RUNNING by a killed sweep: mark them failed and queue their params again, with their run
    directory, so the new trial resumes from the old one's checkpoint."""
    storage = optuna.storages.RDBStorage(_storage_url(root))
    study_id = storage.get_study_id_from_name(STUDY_NAME)
    for stale in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, stale.number)
        storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        attrs = {"resumes_trial": stale.number}
        if RUN_DIR_ATTR in stale.user_attrs:
            attrs[RUN_DIR_ATTR] = stale.user_attrs[RUN_DIR_ATTR]
        study.enqueue_trial(stale.params, user_attrs=attrs)
        print(f"sweep: trial {stale.number} was interrupted; queued again to resume its run", flush=True)


def _optimize(storage: str, seed: int, worker: int, objective: Objective, count: int) -> None:
    optuna = _import_optuna()
    study = optuna.load_study(
        study_name=STUDY_NAME, storage=storage, sampler=_sampler(optuna, seed, worker), pruner=_pruner(optuna)
    )
    # A failing trial (an exception in the user's recipe) is recorded as FAIL; the others go on.
    study.optimize(objective, n_trials=count, catch=(Exception,))


def _worker_main(storage: str, seed: int, worker: int, objective: Objective, count: int, parent: int) -> None:
    # A process group of its own: a terminal's Ctrl-C reaches the parent alone, which passes it on once (a
    # second SIGINT would abort the trial without its checkpoint). On Linux the parent's death, however it
    # comes (SIGKILL, SIGHUP), reaches the worker as SIGTERM: its trial checkpoints instead of training on.
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    _signal_on_parent_death(signal.SIGTERM)
    if os.getppid() != parent:  # it died while this one started, before the signal was asked for
        return
    _optimize(storage, seed, worker, objective, count)


def _signal_on_parent_death(signum: int) -> None:
    """Linux's PR_SET_PDEATHSIG: ``signum`` to this process when its parent dies; elsewhere nothing."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signum), 0, 0, 0)


def _run_workers(storage: str, seed: int, objective: Objective, shares: list[int], root: Path) -> None:
    """Run the shares in worker processes. SIGTERM, SIGINT or SIGHUP reaching this process is passed on to
    each worker once (SIGHUP as SIGTERM), whose trial then writes its checkpoint and stops; once all have
    stopped, this process exits as preempted too (the rerun queues their trials again). Signals are
    handled in the main thread only: from another thread the workers run as they are."""
    # 'spawn': a fresh interpreter per worker, safe with threads and CUDA in the parent.
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_worker_main, args=(storage, seed, worker, objective, count, os.getpid()))
        for worker, count in enumerate(shares)
    ]
    received: list[int] = []
    told: set[int] = set()

    def tell_workers() -> None:
        for process in processes:
            if received and process.pid is not None and process.pid not in told and process.is_alive():
                told.add(process.pid)
                os.kill(process.pid, received[0])

    def pass_on(signum: int, frame: Any) -> None:
        if not received:
            received.append(signal.SIGTERM if signum == getattr(signal, "SIGHUP", None) else signum)
        tell_workers()

    handled = [signal.SIGTERM, signal.SIGINT, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
    in_main = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.signal(signum, pass_on) for signum in handled} if in_main else {}
    try:
        for process in processes:
            process.start()
        tell_workers()  # a signal that came while they started reaches them too
        for process in processes:
            process.join()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        raise Preempted(received[0], f"{root} (its interrupted trials are queued again)")
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"sweep: {len(failed)} worker process(es) failed (exit codes {failed})")


def write_results(study: optuna.Study, root: Path, metric: str, best: list[str] = ()) -> None:
    """``results.md`` (one row per trial, then the ``best`` lines) and ``sweep.png`` (every trial)."""
    optuna = _import_optuna()
    complete = optuna.trial.TrialState.COMPLETE
    best_number = study.best_trial.number if study.get_trials(deepcopy=False, states=(complete,)) else None
    lines = [
        f"# Sweep results ({metric}, {study.direction.name.lower()})",
        "",
        "| trial | params | value | state | run dir |",
        "|---|---|---|---|---|",
    ]
    for trial in study.get_trials(deepcopy=False):
        params = ", ".join(f"{name}={_format(value)}" for name, value in trial.params.items())
        value = _format(trial.value) if trial.value is not None else ""
        state = trial.state.name.lower()
        if trial.number == best_number:
            state += " (best)"
        if "resumes_trial" in trial.user_attrs:
            state += f" (resumes {trial.user_attrs['resumes_trial']})"
        run_dir = Path(trial.user_attrs.get(RUN_DIR_ATTR, "")).name
        lines.append(f"| {trial.number} | {params} | {value} | {state} | {run_dir} |")
    if best:
        lines += ["", *(f"- {line}" for line in best)]
    (root / RESULTS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(study, root / PLOT_FILE, metric)


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _plot(study: optuna.Study, path: Path, metric: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            f"sweep: skipping {path.name}: matplotlib is missing (pip install 'steadyfit[plot]')", flush=True
        )
        return
    figure = sweep_figure(study, metric)
    figure.savefig(path)
    plt.close(figure)


def sweep_figure(study: optuna.Study, metric: str) -> Any:
    """The sweep plot: every trial on integer ticks, completed ones as dots, pruned ones as crosses at their
    last reported value, failed ones as ticks on the axis, and the best completed value so far.

    Example:
        >>> sweep_figure(study, "eval_loss").savefig("sweep.png")  # doctest: +SKIP
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    maximize = study.direction.name == "MAXIMIZE"
    completed: list[tuple[int, float]] = []
    pruned: list[tuple[int, float]] = []
    failed: list[int] = []
    best: list[tuple[int, float]] = []
    for trial in study.get_trials(deepcopy=False):
        if trial.state.name == "COMPLETE" and trial.value is not None:
            completed.append((trial.number, trial.value))
            values = [value for _, value in completed]
            best.append((trial.number, max(values) if maximize else min(values)))
        elif trial.state.name == "PRUNED" and trial.intermediate_values:
            last_step = max(trial.intermediate_values)
            pruned.append((trial.number, trial.intermediate_values[last_step]))
        elif trial.state.name in ("PRUNED", "FAIL"):
            failed.append(trial.number)
    figure, axes = plt.subplots(figsize=(6, 4))
    if completed:
        axes.scatter(*zip(*completed, strict=True), label="completed", color="tab:gray")
    if pruned:
        axes.scatter(*zip(*pruned, strict=True), label="pruned (last value)", color="tab:red", marker="x")
    if failed:
        # On the x axis, whatever the y range: a failed trial has no value to place.
        axes.plot(
            failed,
            [0.0] * len(failed),
            "|",
            color="black",
            markersize=12,
            label="failed",
            transform=axes.get_xaxis_transform(),
            clip_on=False,
        )
    if best:
        axes.step(*zip(*best, strict=True), where="post", label="best so far", color="tab:blue")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("trial")
    axes.set_ylabel(metric)
    axes.legend()
    figure.tight_layout()
    return figure
