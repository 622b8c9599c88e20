"""``steadyfit report``: a run's metrics.jsonl as a PNG figure and a short text summary (also mid-run)."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from steadyfit.checkpoint.lock import is_locked
from steadyfit.config import ConfigError
from steadyfit.layout import COMPARE_FILE, CONFIG_FILE, LOCK_FILE, METRICS_FILE, REPORT_FILE
from steadyfit.loggers.registry import import_extra, row_kind, row_step

# Eval keys that measure the evaluation itself rather than the model; they get no curve.
_NOT_EVAL_METRICS = ("eval_loss",)
_COST_SUFFIXES = ("_s", "_per_sec", "_per_second", "_bytes", "_runtime")

# A loss or gradient norm spanning more than this factor reads better on a log axis.
_LOG_SCALE_RATIO = 20.0
_LABEL_MINOR_DECADES = 2.5
_DPI = 110
_PANEL_WIDTH_IN = 6.2
_PANEL_HEIGHT_IN = 3.3


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of ``RUN_DIR/metrics.jsonl`` that parse as JSON objects, in file order.

    A run in progress may end with a half-written line, and a killed run may leave one in the middle
    (the resumed process appends after it): such lines are skipped, not fatal.

    Raises:
        ConfigError: when the run directory has no metrics.jsonl.

    Example:
        >>> rows = read_metrics("runs/demo")  # doctest: +SKIP
        >>> rows[0]["kind"]  # doctest: +SKIP
        'train'
    """
    path = Path(run_dir) / METRICS_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found; is {run_dir} a steadyfit run directory?") from None
    rows = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def latest_attempt(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop the rows a resume superseded.

    A resumed run repeats the steps after its last checkpoint. When a train row comes with a step not
    after the last train row (or an eval row with a step before the last eval row), the earlier rows from
    that step on belong to the interrupted attempt and are dropped, so every curve shows what the
    finished run did.

    Example:
        >>> rows = [{"kind": "train", "step": s, "loss": 1.0} for s in (1, 2, 3)]
        >>> [r["step"] for r in latest_attempt(rows + [{"kind": "train", "step": 2, "loss": 0.5}])]
        [1, 2]
    """
    kept: list[dict[str, Any]] = []
    last_step: dict[str, int] = {}
    for row in rows:
        kind, step = row_kind(row), row_step(row)
        if kind in ("train", "eval") and step is not None:
            # An eval may be repeated at the same step (a final evaluate()); a train step never is.
            if kind in last_step and (
                step < last_step[kind] or (kind == "train" and step == last_step[kind])
            ):
                kept = [old for old in kept if _is_before(old, step)]
                last_step = {k: v for k, v in last_step.items() if v < step}
            last_step[kind] = step
        kept.append(row)
    return kept


def _is_before(row: dict[str, Any], step: int) -> bool:
    """Whether a row stays when a resume restarts at ``step`` (rows without a step always stay)."""
    row_at = row_step(row)
    return row_at is None or row_at < step


@dataclass
class _Run:
    """One run as the report sees it: its rows (latest attempt) and the config fields it needs."""

    run_dir: Path
    all_rows: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    config: dict[str, Any]

    @classmethod
    def load(cls, run_dir: str | Path) -> _Run:
        all_rows = read_metrics(run_dir)
        return cls(Path(run_dir), all_rows, latest_attempt(all_rows), _read_config(Path(run_dir)))

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [row for row in self.rows if row_kind(row) == kind]

    def series(self, kind: str, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of one numeric key in the rows of one kind (a repeated step keeps its last)."""
        by_step: dict[int, float] = {}
        for row in self.of_kind(kind):
            step, value = row_step(row), row.get(key)
            if step is not None and _is_number(value):
                by_step[step] = float(value)
        return list(by_step), list(by_step.values())


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """The numbers that say how a run went, from metrics.jsonl and config.yaml.

    Returns:
        A dict with ``run_dir``; ``finished`` (a summary row was written) and its ``stop_reason``;
        ``stopped`` (not finished and no run writing it: crashed, killed or preempted);
        ``steps`` (last step logged); ``epoch``; ``wall_time_s`` (time spent, summed over resumed
        attempts: from ``time_s`` when rows carry it, else the train rows' ``step_time_s`` times the
        steps each covers; None without either);
        ``nonfinite_skips``; ``diagnostics`` (count) and ``diagnostic_counts`` (by name); ``best``
        (``{"metric", "value", "step"}`` of ``metric_for_best``, default ``eval_loss``, or None);
        ``final`` (last train loss and lr, last eval row's ``eval_*`` values); ``samples_per_sec``
        (median of the train rows, or None).

    Raises:
        ConfigError: when the run directory has no metrics.jsonl.

    Example:
        >>> summary = summarize("runs/demo")  # doctest: +SKIP
        >>> summary["best"]  # doctest: +SKIP
        {'metric': 'eval_accuracy', 'value': 0.98, 'step': 500}
    """
    return _summarize(_Run.load(run_dir))


def _summarize(run: _Run) -> dict[str, Any]:
    train, evals = run.of_kind("train"), run.of_kind("eval")
    positioned = [row for row in train + evals if row_step(row) is not None]
    diagnostics = Counter(str(row.get("diagnostic", "unnamed")) for row in run.of_kind("diagnostic"))
    final: dict[str, float] = {}
    if train:
        final.update({key: train[-1][key] for key in ("loss", "lr") if _is_number(train[-1].get(key))})
    if evals:
        final.update({k: v for k, v in evals[-1].items() if k.startswith("eval_") and _is_number(v)})
    throughput = [float(row["samples_per_sec"]) for row in train if _is_number(row.get("samples_per_sec"))]
    skips = [row["nonfinite_skips"] for row in run.rows if _is_number(row.get("nonfinite_skips"))]
    epochs = [row["epoch"] for row in positioned if _is_number(row.get("epoch"))]
    ended = run.of_kind("summary")
    return {
        "run_dir": str(run.run_dir),
        "finished": bool(ended),
        # Not finished, and no run holds the lock a run left: it crashed, was killed or preempted.
        "stopped": not ended and (run.run_dir / LOCK_FILE).exists() and not is_locked(run.run_dir),
        "stop_reason": ended[-1].get("stop_reason") if ended else None,
        "steps": max((row_step(row) or 0 for row in positioned), default=0),
        "epoch": epochs[-1] if epochs else None,
        "wall_time_s": _wall_time_s(run.all_rows) or _step_time_total_s(train),
        # A running total in every row (restored on resume): the largest is the run's count.
        "nonfinite_skips": int(max(skips, default=0)),
        "diagnostics": sum(diagnostics.values()),
        "diagnostic_counts": dict(diagnostics),
        "findings": sorted(
            (int(row_step(row) or 0), str(row.get("diagnostic", "unnamed")), str(row.get("message", "")))
            for row in run.of_kind("diagnostic")
        ),
        "best": _best(run),
        "final": final,
        "samples_per_sec": statistics.median(throughput) if throughput else None,
    }


def _step_time_total_s(train: list[dict[str, Any]]) -> float | None:
    """Without ``time_s``: each train row's ``step_time_s`` times the steps its logging window covers."""
    total, previous, seen = 0.0, 0, False
    for row in train:
        step, step_time = row_step(row), row.get("step_time_s")
        if step is not None and _is_number(step_time):
            total += step_time * max(step - previous, 0)
            seen = True
        previous = step if step is not None else previous
    return total if seen else None


def _wall_time_s(rows: list[dict[str, Any]]) -> float | None:
    """Time spent: ``time_s`` counts from each process start, so a drop marks a resume; sum the attempts."""
    total, last = 0.0, None
    for row in rows:
        value = row.get("time_s")
        if not _is_number(value):
            continue
        if last is not None and value < last:
            total += last
        last = float(value)
    return None if last is None else total + last


def _best(run: _Run) -> dict[str, Any] | None:
    name = run.config.get("metric_for_best") or "eval_loss"
    evals = run.of_kind("eval")
    keys = {key for row in evals for key in row}
    metric = name if name in keys or f"eval_{name}" not in keys else f"eval_{name}"
    greater = run.config.get("greater_is_better")
    if greater is None:
        greater = not metric.endswith("loss")
    best: dict[str, Any] | None = None
    for row in evals:
        value, step = row.get(metric), row_step(row)
        if not _is_number(value) or not math.isfinite(value) or step is None:
            continue
        if best is None or (value > best["value"] if greater else value < best["value"]):
            best = {"metric": metric, "value": value, "step": step}
    return best


def format_summary(summary: dict[str, Any]) -> str:
    """A few aligned lines for the terminal from ``summarize``'s dict.

    Example:
        >>> print(format_summary(summarize("runs/demo")))  # doctest: +SKIP
        run          runs/demo (finished)
        progress     step 600, epoch 3, wall time 1m 12s, 5,120 samples/s (median)
        best         eval_accuracy = 0.9811 at step 500
        final        loss 0.05321 · lr 0.0003 · eval_loss 0.08412 · eval_accuracy 0.979
        non-finite   0 steps skipped
        diagnostics  none
    """
    state = "in progress"
    if summary.get("stopped"):
        state = "stopped before the end (crashed, killed or preempted): rerun the same command to resume"
    if summary["finished"]:
        state = f"finished: {summary['stop_reason']}" if summary.get("stop_reason") else "finished"
    progress = [f"step {summary['steps']}"]
    if summary["epoch"] is not None:
        progress.append(f"epoch {summary['epoch']}")
    if summary["wall_time_s"] is not None:
        progress.append(f"wall time {_duration(summary['wall_time_s'])}")
    if summary["samples_per_sec"] is not None:
        progress.append(f"{summary['samples_per_sec']:,.0f} samples/s (median)")
    best = summary["best"]
    best_text = f"{best['metric']} = {best['value']:.4g} at step {best['step']}" if best else "no eval yet"
    final = " · ".join(f"{key} {value:.4g}" for key, value in summary["final"].items()) or "no metrics yet"
    counts, skips = summary["diagnostic_counts"], summary["nonfinite_skips"]
    diagnostics = ", ".join(f"{name} ×{count}" for name, count in counts.items()) if counts else "none"
    lines = [
        ("run", f"{summary['run_dir']} ({state})"),
        ("progress", ", ".join(progress)),
        ("best", best_text),
        ("final", final),
        ("non-finite", f"{skips} step{'' if skips == 1 else 's'} skipped"),
        ("diagnostics", diagnostics),
    ]
    text = "\n".join(f"{label:<12} {text}" for label, text in lines)
    findings = summary.get("findings", [])
    if findings:
        text += "\n" + "\n".join(f"  step {step}: {message or name}" for step, name, message in findings)
    return text


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{seconds:.1f}s"


@dataclass
class _Curve:
    label: str
    steps: list[int]
    values: list[float]
    color: str
    style: str = "-"
    marker: str | None = None


@dataclass
class _Panel:
    title: str
    ylabel: str
    curves: list[_Curve]
    log_if_wide: bool = False
    from_zero: bool = False
    marks: Sequence[int] = ()
    findings: Sequence[tuple[int, str]] = ()


def write_report(
    run_dir: str | Path, compare: Sequence[str | Path] = (), out: str | Path | None = None
) -> list[Path]:
    """Draw the run's curves into a PNG; with ``compare``, overlay those runs too (one colour per run).

    Panels (each only when it has data): train and eval loss, eval metrics, learning rate, gradient
    norm, throughput (samples/s, tokens/s), memory, fp16 loss scale. Loss and gradient norm switch to a
    log axis when they span more than a factor of 20; non-finite skips are marked on the loss panel.
    Works on a run in progress.

    Args:
        run_dir: the run directory.
        compare: more run directories to overlay.
        out: the PNG path; default ``RUN_DIR/report.png``, or ``RUN_DIR/compare.png`` with ``compare``.

    Returns:
        The paths written: one PNG, or none while no run has a row to plot yet (a run just started).

    Raises:
        ConfigError: when matplotlib is missing (``pip install steadyfit[plot]``), or a run directory has
            no metrics.jsonl.

    Example:
        >>> write_report("runs/demo")  # doctest: +SKIP
        [PosixPath('runs/demo/report.png')]
    """
    import_extra("matplotlib", "plot")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [_Run.load(path) for path in (run_dir, *compare)]
    panels = [panel for panel in _panels(runs) if any(curve.steps for curve in panel.curves)]
    if not panels:
        return []
    ncols = 1 if len(panels) == 1 else 2
    nrows = math.ceil(len(panels) / ncols)
    figure = Figure(figsize=(_PANEL_WIDTH_IN * ncols, _PANEL_HEIGHT_IN * nrows + 0.7), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, panel in zip(axes, panels, strict=False):
        _draw(ax, panel)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    figure.suptitle(_title(runs), fontsize=12)
    default_name = COMPARE_FILE if compare else REPORT_FILE
    target = Path(out) if out is not None else Path(run_dir) / default_name
    if target.is_dir():
        target = target / default_name
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, dpi=_DPI)
    return [target]


def _title(runs: list[_Run]) -> str:
    if len(runs) > 1:
        return "steadyfit — " + " vs ".join(_labels(runs))
    summary = _summarize(runs[0])
    parts = [f"steadyfit — {runs[0].run_dir.name}", f"step {summary['steps']}"]
    if summary["best"]:
        best = summary["best"]
        parts.append(f"best {best['metric']} {best['value']:.4g} @ {best['step']}")
    if not summary["finished"]:
        parts.append("stopped before the end" if summary["stopped"] else "in progress")
    return " · ".join(parts)


def _labels(runs: list[_Run]) -> list[str]:
    """Run directory names, or full paths where two runs share a name."""
    names = [run.run_dir.name for run in runs]
    return [
        name if names.count(name) == 1 else str(run.run_dir) for name, run in zip(names, runs, strict=True)
    ]


def _panels(runs: list[_Run]) -> list[_Panel]:
    single = len(runs) == 1
    labels = _labels(runs)
    loss: list[_Curve] = []
    metrics: list[_Curve] = []
    lr: list[_Curve] = []
    grad: list[_Curve] = []
    samples: list[_Curve] = []
    tokens: list[_Curve] = []
    memory: list[_Curve] = []
    scale: list[_Curve] = []
    for index, (run, label) in enumerate(zip(runs, labels, strict=True)):
        color = f"C{index % 10}"
        prefix = "" if single else f"{label} "
        # One run: train and eval in two colours; several: one colour per run, eval dashed.
        train_color, eval_color = ("C0", "C1") if single else (color, color)
        loss.append(_Curve(f"{prefix}train", *run.series("train", "loss"), train_color))
        loss.append(_Curve(f"{prefix}eval", *run.series("eval", "eval_loss"), eval_color, "--", "o"))
        for number, key in enumerate(_eval_metric_keys(run)):
            metric_color = f"C{number % 10}" if single else color
            style = "-" if single else ("-", "--", ":", "-.")[number % 4]
            metrics.append(
                _Curve(
                    f"{prefix}{key.removeprefix('eval_')}", *run.series("eval", key), metric_color, style, "o"
                )
            )
        lr.append(_Curve(label, *run.series("train", "lr"), color))
        grad.append(_Curve(label, *run.series("train", "grad_norm"), color))
        samples.append(_Curve(label, *run.series("train", "samples_per_sec"), color))
        tokens.append(_Curve(label, *run.series("train", "tokens_per_sec"), color))
        for number, key in enumerate(_memory_keys(run)):
            memory_color = f"C{number % 10}" if single else color
            steps, values = run.series("train", key)
            scale_to_gib = 2**30 if key.endswith("_bytes") else 2**10
            memory.append(_Curve(f"{prefix}{key}", steps, [v / scale_to_gib for v in values], memory_color))
        scale.append(_Curve(label, *run.series("train", "loss_scale"), color))
    return [
        _Panel(
            "Loss",
            "loss",
            loss,
            log_if_wide=True,
            marks=_skip_steps(runs[0]) if single else (),
            findings=_findings(runs[0]) if single else (),
        ),
        _Panel("Eval metrics", "value", metrics),
        _Panel("Learning rate", "learning rate", lr),
        _Panel("Gradient norm", "gradient norm", grad, log_if_wide=True),
        _Panel("Throughput", "samples / s", samples, from_zero=True),
        _Panel("Token throughput", "tokens / s", tokens, from_zero=True),
        _Panel("Memory", "GiB", memory, from_zero=True),
        _Panel("Loss scale (fp16)", "loss scale", scale, log_if_wide=True),
    ]


def _eval_metric_keys(run: _Run) -> list[str]:
    keys = dict.fromkeys(key for row in run.of_kind("eval") for key in row if key.startswith("eval_"))
    return [key for key in keys if key not in _NOT_EVAL_METRICS and not key.endswith(_COST_SUFFIXES)]


def _memory_keys(run: _Run) -> list[str]:
    keys = dict.fromkeys(key for row in run.of_kind("train") for key in row)
    return [key for key in keys if key.endswith(("_bytes", "_mb")) and ("mem" in key or "rss" in key)]


def _findings(run: _Run) -> list[tuple[int, str]]:
    """(step, name) of each diagnostic finding, to mark on the loss panel."""
    return [
        (step, str(row.get("diagnostic", "finding")))
        for row in run.of_kind("diagnostic")
        if (step := row_step(row)) is not None
    ]


def _skip_steps(run: _Run) -> list[int]:
    """Steps at which the running count of non-finite skips went up."""
    marks, previous = [], 0
    for row in run.of_kind("train"):
        count, step = row.get("nonfinite_skips"), row_step(row)
        if _is_number(count) and step is not None:
            if count > previous:
                marks.append(step)
            previous = count
    return marks


def _log_axis(ax: Any, decades: float) -> None:
    """A log y axis with plain numbers (0.2, not 2x10^-1); over few decades 2 and 5 are labelled too."""
    from matplotlib.ticker import FuncFormatter

    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    if decades <= _LABEL_MINOR_DECADES:
        ax.yaxis.set_minor_formatter(FuncFormatter(_minor_label))


def _minor_label(value: float, _: Any) -> str:
    mantissa = round(value / 10 ** math.floor(math.log10(value)), 6) if value > 0 else 0
    return f"{value:g}" if mantissa in (2, 5) else ""


def _draw(ax: Any, panel: _Panel) -> None:
    curves = [curve for curve in panel.curves if curve.steps]
    for curve in curves:
        few = len(curve.steps) <= 40
        ax.plot(
            curve.steps,
            curve.values,
            color=curve.color,
            linestyle=curve.style,
            marker=curve.marker if few else None,
            markersize=3.5,
            linewidth=1.4,
            label=curve.label,
        )
    for number, step in enumerate(panel.marks):
        ax.axvline(
            step,
            color="crimson",
            linestyle=":",
            linewidth=1,
            label="non-finite skip" if number == 0 else None,
        )
    for number, (step, name) in enumerate(panel.findings):
        ax.axvline(
            step, color="darkorange", linestyle="--", linewidth=1, label="diagnostic" if number == 0 else None
        )
        ax.annotate(
            name,
            (step, 1),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=7,
            color="darkorange",
            va="top",
            ha="right",
        )
    finite = [v for curve in curves for v in curve.values if math.isfinite(v)]
    if panel.log_if_wide and finite and min(finite) > 0 and max(finite) / min(finite) > _LOG_SCALE_RATIO:
        _log_axis(ax, decades=math.log10(max(finite) / min(finite)))
    ax.set_title(panel.title, fontsize=11, loc="left")
    ax.set_xlabel("step")
    # A lone eval metric has no legend: its name goes on the axis.
    ax.set_ylabel(curves[0].label if panel.ylabel == "value" and len(curves) == 1 else panel.ylabel)
    if panel.from_zero:
        # Noise around a steady 5,000 samples/s looks like collapse on an axis that starts at 4,990.
        ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    if ax.get_yscale() == "linear":
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    if len(curves) > 1 or panel.marks or panel.findings:
        ax.legend(fontsize=8, frameon=False)
