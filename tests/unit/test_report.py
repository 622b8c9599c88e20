"""`steadyfit report`: reading metrics.jsonl (also mid-run), the summary numbers, and the PNG figure."""

from __future__ import annotations

import json
import math
import sys

import pytest

from steadyfit.checkpoint import RunLock
from steadyfit.config import ConfigError
from steadyfit.report import format_summary, latest_attempt, read_metrics, summarize, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train(step, loss, skips=0, time_s=None):
    return {
        "kind": "train",
        "step": step,
        "epoch": step // 100,
        "loss": loss,
        "lr": 1e-3 * (1 - step / 400),
        "grad_norm": 4.0 * math.exp(-step / 80),
        "samples_per_sec": 5000.0 + step,
        "step_time_s": 0.01,
        "nonfinite_skips": skips,
        "time_s": step / 100 if time_s is None else time_s,
    }


def _eval(step, loss, accuracy):
    return {"kind": "eval", "step": step, "epoch": step // 100, "eval_loss": loss, "eval_accuracy": accuracy}


def _write_run(path, rows, config=None, tail=""):
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(json.dumps(config or {}))  # JSON is YAML
    (path / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)
    return path


def _full_rows(scale=1.0):
    rows = []
    for step in range(10, 301, 10):
        rows.append(_train(step, scale * (2.5 * math.exp(-step / 50) + 0.05), skips=int(step >= 120)))
        if step % 50 == 0:
            rows.append(
                _eval(step, scale * (2.0 * math.exp(-step / 60) + 0.1), 1 - 0.8 * math.exp(-step / 60))
            )
    rows.append(
        {"kind": "diagnostic", "step": 120, "diagnostic": "nonfinite", "message": "inf loss, skipped"}
    )
    # A final evaluate() at the last step: a second eval row at the same step.
    rows.append({"kind": "eval", "step": 300, "eval_loss": 0.2, "eval_accuracy": 0.999, "time_s": 3.2})
    return rows


def _png_size(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.size


def test_read_metrics_skips_a_half_written_last_line_and_a_torn_middle_line(tmp_path):
    rows = [_train(10, 1.0), _train(20, 0.5)]
    run = _write_run(tmp_path / "run", rows, tail='{"kind": "train", "st')
    with (run / "metrics.jsonl").open("r+") as handle:
        text = handle.read()
        handle.seek(0)
        handle.write(text.replace("\n", '\n{"torn\n[1, 2]\n', 1))

    assert read_metrics(run) == rows


def test_latest_attempt_drops_rows_superseded_by_a_resume():
    first = [_train(10, 1.0), _eval(10, 0.9, 0.5), _train(20, 0.8), _eval(20, 0.7, 0.6), _train(30, 0.6)]
    resumed = [_train(20, 0.75), _eval(20, 0.65, 0.62), _train(30, 0.55)]

    assert latest_attempt(first + resumed) == first[:2] + resumed


def test_summarize_reports_best_final_steps_wall_time_skips_and_diagnostics(tmp_path):
    rows = [_train(10, 1.0), _eval(10, 0.9, 0.5), _train(20, 0.8, skips=1), _eval(20, 0.7, 0.75)]
    rows += [_train(30, 0.6, skips=2, time_s=0.3), _eval(30, 0.65, 0.7)]
    # Killed at step 30, resumed from step 20 in a new process whose clock starts again at zero.
    rows += [
        _train(30, 0.55, skips=1, time_s=0.1),
        _eval(30, 0.6, 0.74),
        _train(40, 0.5, skips=1, time_s=0.2),
    ]
    rows += [{"kind": "diagnostic", "step": 20, "diagnostic": "nonfinite", "message": "m"}]
    rows += [
        {"kind": "diagnostic", "diagnostic": "memory", "message": "m"},
        {"kind": "summary", "step": 40, "stop_reason": "max_steps"},
    ]
    run = _write_run(tmp_path / "run", rows, {"metric_for_best": "accuracy", "greater_is_better": True})

    summary = summarize(run)

    assert summary == {
        "run_dir": str(run),
        "finished": True,
        "stopped": False,
        "stop_reason": "max_steps",
        "steps": 40,
        "epoch": 0,
        "wall_time_s": pytest.approx(0.3 + 0.2),
        "nonfinite_skips": 1,
        "diagnostics": 2,
        "diagnostic_counts": {"nonfinite": 1, "memory": 1},
        "best": {"metric": "eval_accuracy", "value": 0.75, "step": 20},
        "final": {"loss": 0.5, "lr": pytest.approx(9e-4), "eval_loss": 0.6, "eval_accuracy": 0.74},
        "samples_per_sec": 5025.0,  # median of steps 10, 20, 30 (resumed), 40
        "findings": [(0, "memory", "m"), (20, "nonfinite", "m")],
    }


def test_start_rows_change_no_summary_number_and_no_panel(tmp_path):
    pytest.importorskip("matplotlib")
    start = {"kind": "start", "step": 0, "epoch": 0, "parameters": 163, "device": "cpu", "time_s": 0.0}
    resumed = {**start, "step": 150, "epoch": 1, "resumed_from": "checkpoints/step-00000150"}
    rows = _full_rows()
    # Two attempts, as a resumed run writes them: the second one's clock starts again after its start row.
    first = rows[:18]
    second = [{**row, "time_s": row["time_s"] - 1.5} if "time_s" in row else row for row in rows[18:]]
    with_starts = [start, *first, resumed, *second]
    plain = _write_run(tmp_path / "plain", [*first, *second])
    started = _write_run(tmp_path / "started", with_starts)

    assert summarize(started) | {"run_dir": ""} == summarize(plain) | {"run_dir": ""}
    assert _png_size(write_report(started)[0]) == _png_size(write_report(plain)[0])


def test_summarize_defaults_to_lowest_eval_loss_and_reads_a_run_in_progress(tmp_path):
    rows = [_train(10, 1.0), _eval(10, 0.9, 0.5), _train(20, 0.8), _eval(20, 0.95, 0.6)]
    run = _write_run(tmp_path / "run", rows, tail='{"kind": "train", "step": 30, "lo')

    summary = summarize(run)

    assert summary["best"] == {"metric": "eval_loss", "value": 0.9, "step": 10}
    assert (summary["finished"], summary["steps"]) == (False, 20)


def test_wall_time_without_time_s_adds_up_step_time_over_the_steps_each_row_covers(tmp_path):
    rows = [
        {"kind": "train", "step": 10, "loss": 1.0, "step_time_s": 0.5, "samples_seen": 320},
        {"kind": "eval", "step": 10, "eval_loss": 0.9},
        {"kind": "train", "step": 25, "loss": 0.8, "step_time_s": 0.25, "samples_seen": 800},
        {"kind": "summary", "step": 25, "best_metric": 0.9, "best_step": 10, "stop_reason": "max_steps"},
    ]
    run = _write_run(tmp_path / "run", rows)

    summary = summarize(run)

    assert summary["wall_time_s"] == 10 * 0.5 + 15 * 0.25
    assert "(finished: max_steps)" in format_summary(summary)


def test_format_summary_states_the_numbers_a_user_asks_first(tmp_path):
    run = _write_run(tmp_path / "run", _full_rows(), {"metric_for_best": "eval_accuracy"})

    text = format_summary(summarize(run))

    assert f"{run} (in progress)" in text
    assert "best         eval_accuracy = 0.999 at step 300" in text
    # A run that left its lock file but holds it no longer crashed, was killed or preempted.
    with RunLock(run):
        assert f"{run} (in progress)" in format_summary(summarize(run))
    assert f"{run} (stopped before the end (crashed, killed or preempted)" in format_summary(summarize(run))
    assert "step 300, epoch 3, wall time 3.2s" in text
    assert f"final        loss {2.5 * math.exp(-6) + 0.05:.4g} · lr 0.00025 · eval_loss 0.2" in text
    assert "1 step skipped" in text and "nonfinite ×1" in text


def test_report_writes_a_readable_png_for_one_run(tmp_path):
    pytest.importorskip("matplotlib")
    run = _write_run(tmp_path / "run", _full_rows())

    (png,) = write_report(run)

    assert png == run / "report.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE and png.stat().st_size > 10_000
    width, height = _png_size(png)
    # Five panels (loss, eval metrics, lr, grad norm, throughput) in two columns: three rows.
    assert 1200 <= width <= 1600 and 1000 <= height <= 1300


def test_report_leaves_out_panels_without_data(tmp_path):
    pytest.importorskip("matplotlib")
    run = _write_run(tmp_path / "run", [{"step": step, "loss": 1 / step} for step in range(1, 30)])

    (png,) = write_report(run, out=tmp_path / "only-loss.png")

    assert png == tmp_path / "only-loss.png"
    width, height = _png_size(png)
    assert width < 800 and height < 500  # one panel, not an empty grid


def test_report_on_a_run_in_progress_with_a_truncated_last_line(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [row for row in _full_rows() if row["step"] <= 150]
    run = _write_run(tmp_path / "run", rows, tail='{"kind": "train", "step": 160, "loss": 0.1')

    (png,) = write_report(run)

    assert png.stat().st_size > 10_000 and _png_size(png)[0] >= 1200


def test_report_compares_two_runs_into_compare_png(tmp_path):
    pytest.importorskip("matplotlib")
    first = _write_run(tmp_path / "lr-1e-3", _full_rows())
    second = _write_run(tmp_path / "lr-3e-3", _full_rows(scale=0.8)[:40])

    (png,) = write_report(first, compare=[second])

    assert png == first / "compare.png" and not (first / "report.png").exists()
    assert png.stat().st_size > 10_000 and _png_size(png)[1] >= 1000


def test_the_report_command_on_a_run_that_just_started_exits_0(tmp_path, capsys):
    # A script polling a run must not read "nothing logged yet" as a usage error (exit 2).
    pytest.importorskip("matplotlib")
    from steadyfit.cli import EXIT_OK, main

    run = _write_run(tmp_path / "started", [{"kind": "start", "step": 0, "epoch": 0}])
    assert main(["report", str(run)]) == EXIT_OK
    assert "no train or eval row to plot yet" in capsys.readouterr().out


def test_report_errors_name_the_problem(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    with pytest.raises(ConfigError, match=r"metrics\.jsonl: not found"):
        write_report(tmp_path)
    empty = _write_run(tmp_path / "empty", [], tail='{"kind": "tr')
    assert write_report(empty) == [], "a run that just started: nothing to plot, not an error"
    assert not list(empty.glob("*.png"))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ConfigError, match=r"pip install steadyfit\[plot\]"):
        write_report(empty)
