"""Training diagnostics: each check on synthetic rows, each provoked through the real Trainer, none on a
healthy run, and the same findings after a state_dict round trip."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from helpers import make_mlp, make_regression
from steadyfit import Callback, TrainConfig, Trainer
from steadyfit.assembly import prepare, train
from steadyfit.config import ConfigError
from steadyfit.diagnostics import CHECKS, DEFAULT_THRESHOLDS, Diagnostics
from steadyfit.recipes.tinylm import TinyLM, TinyLMConfig, lm_loss, load_stdlib_windows, token_accuracy

ROOT = Path(__file__).resolve().parents[2]
F = torch.nn.functional


def diagnostics(**config: object) -> Diagnostics:
    return Diagnostics(TrainConfig(**config), total_steps=1000)


def feed(diag: Diagnostics, rows: list[dict]) -> list[dict]:
    found = []
    for row in rows:
        found.extend(diag.observe(dict(row)))
    return found


def train_rows(losses: list[float | None], **extra: object) -> list[dict]:
    return [
        {"kind": "train", "step": 10 * (i + 1), "loss": loss, "grad_norm": 1.0, "samples_per_sec": 100.0}
        | extra
        for i, loss in enumerate(losses)
    ]


def names(findings: list[dict]) -> list[str]:
    return [finding["diagnostic"] for finding in findings]


def read_findings(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if row.get("kind") == "diagnostic"]


# ----------------------------------------------------------------------------------------- validation
def test_unknown_threshold_key_names_it_and_the_allowed_keys():
    with pytest.raises(ConfigError, match=r"'divergence\.windw'.*divergence\.window"):
        diagnostics(diagnostic_thresholds={"divergence.windw": 4})


@pytest.mark.parametrize("key", ["divergence.window", "at_chance.evals", "grad_spike.min_history"])
@pytest.mark.parametrize("value", [0, 0.5])
def test_a_count_threshold_must_be_a_whole_number_of_at_least_one(key, value):
    # A window of 0 rows fired on the first row and stopped a healthy run (stop_on).
    expected = f"{key} is a count (of logged rows or evaluations): a whole number >= 1"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        diagnostics(diagnostic_thresholds={key: value})


def test_unknown_stop_on_name_is_refused_by_the_trainer(tmp_path):
    config = TrainConfig(
        run_dir=str(tmp_path / "run"), progress=False, stop_on=["divergance"], diagnostics=False
    )
    with pytest.raises(ConfigError, match="stop_on: unknown diagnostic 'divergance'; allowed: divergence"):
        Trainer(make_mlp(), config, train_data=make_regression(), loss_fn=F.cross_entropy)


def test_every_threshold_is_documented():
    text = (ROOT / "docs" / "diagnostics.md").read_text()
    for key in DEFAULT_THRESHOLDS:
        assert f"`{key}`" in text, key
    for name in CHECKS:
        assert f"## {name}" in text, name


# ----------------------------------------------------------------------------------------- synthetic rows
def test_nonfinite_loss_is_divergence_at_once_and_reported_once():
    found = feed(diagnostics(), train_rows([2.0, 1.5, float("nan"), None, 1.0]))
    assert [(f["diagnostic"], f["step"], f["first_seen"]) for f in found] == [("divergence", 30, True)]
    assert found[0]["kind"] == "diagnostic" and "lower lr" in found[0]["message"]


def test_divergence_needs_a_sustained_rise_and_the_window_is_configurable():
    losses = [2.0, 1.0, 0.5, 3.0, 0.4, 3.0, 3.5, 4.0]  # one spike at row 4, a sustained rise from row 6
    assert [(f["diagnostic"], f["step"]) for f in feed(diagnostics(), train_rows(losses))] == [
        ("divergence", 80)
    ]
    quick = diagnostics(diagnostic_thresholds={"divergence.window": 1})
    assert [(f["diagnostic"], f["step"]) for f in feed(quick, train_rows(losses))] == [("divergence", 40)]


def test_a_converged_loss_wobbling_near_zero_is_not_divergence():
    losses = [2.3, 1.0, 0.1, 0.01, 0.001, 0.003, 0.004, 0.005, 0.002]
    assert feed(diagnostics(), train_rows(losses)) == []


def test_a_loss_far_above_the_first_step_from_the_first_row_on_is_divergence():
    # sgd lr=50 on digits: the first step's loss is 2.3 (ln 10), every logged window is in the hundreds.
    rows = train_rows([348.0, 208.0, 362.0, 228.0])
    rows[0]["first_step_loss"] = 2.3
    found = feed(diagnostics(), rows)
    assert [(f["diagnostic"], f["step"], f["first_step_loss"]) for f in found] == [("divergence", 30, 2.3)]
    assert "the first step's loss" in found[0]["message"]
    del rows[0]["first_step_loss"]
    assert feed(diagnostics(), rows) == []  # what the first row alone allowed to see: nothing
    healthy = train_rows([2.2, 1.4, 0.9, 0.6, 0.5, 0.45])
    healthy[0]["first_step_loss"] = 2.3
    assert feed(diagnostics(), healthy) == []


def test_evaluations_no_better_than_the_first_step_are_at_chance():
    def found(eval_losses: list[float], first_step_loss: float | None = 2.3, **config: object) -> list:
        rows = [{"kind": "train", "step": 1, "loss": 2.3, "first_step_loss": first_step_loss}]
        rows += [
            {"kind": "eval", "step": 10 * (i + 1), "eval_loss": loss, "eval_accuracy": 0.1}
            for i, loss in enumerate(eval_losses)
        ]
        return [
            (f["diagnostic"], f["step"], f.get("eval_accuracy")) for f in feed(diagnostics(**config), rows)
        ]

    assert found([9.6, 2.9, 2.3]) == [("at_chance", 20, 0.1)]  # two evaluations in a row
    assert found([2.4, 1.9, 2.5, 1.5]) == []  # one at a time: the baseline is one batch, it is noisy
    assert found([2.2, 2.1, 2.25]) == []  # below the untrained model's loss: it learned something
    assert found([2.4] * 4, warmup_steps=20) == [("at_chance", 40, 0.1)]  # 10 and 20: in the warm-up
    assert found([9.6, 9.6], first_step_loss=None) == []  # no baseline (a checkpoint of an older run)
    assert found([2.2, 2.2], diagnostic_thresholds={"at_chance.fraction": 0.95}) == [("at_chance", 20, 0.1)]


def test_plateau_when_the_loss_stays_high_but_not_after_convergence():
    stuck = [2.3] + [2.0 + 0.001 * (i % 2) for i in range(25)]
    found = feed(diagnostics(), train_rows(stuck))
    assert names(found) == ["plateau"] and found[0]["step"] == 220  # row 22: 20 rows after the last gain
    converged = [2.3, 1.0, 0.2] + [0.05] * 30
    assert feed(diagnostics(), train_rows(converged)) == []


def test_overfitting_reports_the_step_it_began():
    diag = diagnostics()
    rows = []
    train = iter([2.0, 1.5, 1.0, 0.7, 0.5, 0.3, 0.2])
    for step, eval_loss in [(10, 1.8), (20, 1.2), (30, 1.0), (40, 1.1), (50, 1.2), (60, 1.3), (70, 1.5)]:
        rows.append({"kind": "train", "step": step, "loss": next(train)})
        rows.append({"kind": "eval", "step": step, "eval_loss": eval_loss})
    found = [f for f in feed(diag, rows) if f["diagnostic"] == "overfitting"]
    assert [(f["step"], f["since_step"], f["evals_since_best"]) for f in found] == [(60, 30, 3)]


def test_noisy_eval_loss_around_its_floor_is_not_overfitting():
    rows = []
    for step, eval_loss in enumerate([1.0, 0.5, 0.3, 0.35, 0.31, 0.36, 0.32, 0.37, 0.3, 0.34], start=1):
        rows.append({"kind": "train", "step": step, "loss": 1.0 / step})
        rows.append({"kind": "eval", "step": step, "eval_loss": eval_loss})
    assert [f for f in feed(diagnostics(), rows) if f["diagnostic"] == "overfitting"] == []


def test_grad_spike_and_collapse():
    spike_rows = [
        {"kind": "train", "step": i, "grad_norm": norm} for i, norm in enumerate([1, 2, 1, 1.5, 1, 30])
    ]
    found = feed(diagnostics(), spike_rows)
    assert [(f["diagnostic"], f["step"], f["median_grad_norm"]) for f in found] == [("grad_spike", 5, 1.0)]
    collapse_rows = [
        {"kind": "train", "step": i, "grad_norm": n} for i, n in enumerate([1.0, 0.0, 0.0, 1e-9])
    ]
    assert [(f["diagnostic"], f["step"]) for f in feed(diagnostics(), collapse_rows)] == [
        ("grad_collapse", 3)
    ]


def test_lr_not_following_the_schedule():
    rows = [
        {"kind": "train", "step": 1, "lr": 1e-3, "scheduled_lr": 1e-3},
        {"kind": "train", "step": 2, "lr": 5e-4, "scheduled_lr": 1e-3},  # one row: not yet
        {"kind": "train", "step": 3, "lr": 1e-3, "scheduled_lr": 1e-3},
        {"kind": "train", "step": 4, "lr": 5e-4, "scheduled_lr": 9e-4},
        {"kind": "train", "step": 5, "lr": 4e-4, "scheduled_lr": 8e-4},
        {"kind": "train", "step": 6, "lr": 4e-4},  # a user scheduler: nothing to compare with
    ]
    found = feed(diagnostics(), rows)
    assert [(f["diagnostic"], f["step"], f["scheduled_lr"]) for f in found] == [("lr_schedule", 5, 8e-4)]


def test_throughput_drop_needs_consecutive_slow_rows():
    speeds = [100, 110, 90, 105, 95, 10, 100, 12, 11, 9, 100]
    rows = [{"kind": "train", "step": i, "samples_per_sec": s} for i, s in enumerate(speeds)]
    found = feed(diagnostics(), rows)
    assert [(f["diagnostic"], f["step"], f["median_samples_per_sec"]) for f in found] == [
        ("throughput", 9, 100)
    ]


def test_memory_growth_needs_a_steady_rise():
    steady = [{"kind": "train", "step": i, "memory_mb": 500.0 + 4 * i} for i in range(12)]
    assert [(f["diagnostic"], f["step"]) for f in feed(diagnostics(), steady)] == [("memory_growth", 10)]
    one_jump = [{"kind": "train", "step": i, "memory_mb": 500.0 + (60 if i > 3 else 0)} for i in range(20)]
    assert feed(diagnostics(), one_jump) == []


def test_warmup_missing_only_without_warmup():
    rows = train_rows([2.0, 1.9, 4.0, 2.0], scheduled_lr=0.01)  # 4.0 > 2 x 1.9, the best before it
    assert names(feed(diagnostics(lr=0.01), rows)) == ["warmup_missing"]
    assert feed(diagnostics(lr=0.01, warmup_steps=10), rows) == []
    assert feed(diagnostics(lr=1e-4), rows) == []


def test_resumed_diagnostics_report_what_an_uninterrupted_run_reports():
    rows = []
    for i in range(40):
        rows.append(
            {
                "kind": "train",
                "step": i + 1,
                "loss": 2.0 - 0.04 * i if i < 25 else 1.0 + 0.2 * (i - 25),
                "grad_norm": 1.0 if i != 30 else 50.0,
                "samples_per_sec": 100.0 if i < 33 else 5.0,
                "memory_mb": 400.0 + (5 * i if i > 20 else 0),
            }
        )
        if i % 3 == 2:
            rows.append({"kind": "eval", "step": i + 1, "eval_loss": 1.0 + abs(i - 15) / 10})
    rows[0]["first_step_loss"] = 2.1  # from step 27 on the eval loss is at or above it: at_chance
    whole = feed(diagnostics(), rows)
    assert set(names(whole)) >= {
        "divergence",
        "overfitting",
        "grad_spike",
        "throughput",
        "memory_growth",
        "at_chance",
    }
    for cut in (7, 30, 50):
        first = diagnostics()
        found = feed(first, rows[:cut])
        saved = json.loads(json.dumps(first.state_dict(), allow_nan=False))
        resumed = diagnostics()
        resumed.load_state_dict(saved)
        assert found + feed(resumed, rows[cut:]) == whole


def test_a_checkpoint_from_before_the_first_step_baseline_still_loads():
    older = diagnostics().state_dict()
    del older["first_step_loss"], older["chance_evals"]  # what checkpoints of earlier versions hold
    restored = diagnostics()
    restored.load_state_dict(older)
    assert (restored.first_step_loss, restored.chance_evals) == (None, 0)
    broken = diagnostics().state_dict()
    del broken["best_loss"]
    with pytest.raises(ValueError, match="best_loss"):
        diagnostics().load_state_dict(broken)


# ----------------------------------------------------------------------------------------- the real Trainer
def fit(tmp_path: Path, model: torch.nn.Module, data, callbacks=(), eval_data=None, **config) -> Trainer:
    values = {"run_dir": str(tmp_path / "run"), "progress": False, "log_every": 1, "max_epochs": 1} | config
    trainer = Trainer(
        model,
        TrainConfig(**values),
        train_data=data,
        eval_data=eval_data,
        loss_fn=F.cross_entropy,
        callbacks=callbacks,
    )
    trainer.fit()
    return trainer


def test_too_high_a_learning_rate_diverges_and_stop_on_stops(tmp_path):
    trainer = fit(
        tmp_path,
        make_mlp(),
        make_regression(64),
        optimizer="sgd",
        lr=5.0,
        batch_size=16,
        max_epochs=20,
        stop_on=["divergence"],
    )
    found = read_findings(tmp_path / "run")
    divergence = [f for f in found if f["diagnostic"] == "divergence"]
    assert len(divergence) == 1
    assert trainer.state.step == divergence[0]["step"] < 80  # stopped at that step's boundary
    assert trainer.state.stop_reason.startswith("diagnostic divergence")
    assert "warmup_missing" in names(found)  # lr 5 with no warm-up and an early spike


def test_tiny_training_set_overfits_and_the_finding_names_the_best_eval_step(tmp_path):
    fit(
        tmp_path,
        make_mlp(),
        make_regression(16, seed=1),
        eval_data=make_regression(200, seed=2),
        lr=0.03,
        batch_size=16,
        max_epochs=40,
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if row["kind"] == "eval"]
    found = [row for row in rows if row["kind"] == "diagnostic" and row["diagnostic"] == "overfitting"]
    assert len(found) == 1
    before = [row for row in evals if row["step"] <= found[0]["step"]]
    assert found[0]["since_step"] == min(before, key=lambda row: row["eval_loss"])["step"]


def test_dead_relu_model_has_collapsed_gradients(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3, bias=False))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU off: no gradient reaches any weight
    fit(tmp_path, model, make_regression(64), batch_size=16)
    found = read_findings(tmp_path / "run")
    assert [(f["diagnostic"], f["step"], f["grad_norm"]) for f in found] == [("grad_collapse", 3, 0.0)]


class SlowAfter(Callback):
    """Sleeps in every step after ``step``: a stall, as a slow data source would cause."""

    def __init__(self, step: int, seconds: float) -> None:
        self.step, self.seconds = step, seconds

    def on_step_end(self, trainer, state):
        if state.step > self.step:
            time.sleep(self.seconds)


def test_steps_that_sleep_are_a_throughput_drop(tmp_path):
    fit(
        tmp_path,
        make_mlp(),
        make_regression(160),
        callbacks=[SlowAfter(28, 0.25)],
        batch_size=4,
        log_every=2,
        max_steps=36,
    )
    found = [f for f in read_findings(tmp_path / "run") if f["diagnostic"] == "throughput"]
    assert len(found) == 1 and found[0]["step"] > 28  # caused by the sleeps, not before them


class Hoarder(torch.nn.Module):
    """Keeps a 4 MiB tensor per forward alive: a leak."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = make_mlp()
        self.kept: list[torch.Tensor] = []

    def forward(self, inputs):
        self.kept.append(torch.ones(1024 * 1024))
        return self.inner(inputs)


def test_a_model_that_keeps_tensors_grows_memory(tmp_path):
    fit(tmp_path, Hoarder(), make_regression(24), batch_size=1)
    found = [f for f in read_findings(tmp_path / "run") if f["diagnostic"] == "memory_growth"]
    assert len(found) == 1 and found[0]["growth_mb"] >= 20


class ExtraSchedulerStep(Callback):
    """The classic bug: stepping the scheduler a second time per optimizer step."""

    def on_step_end(self, trainer, state):
        trainer.scheduler.step()


def test_a_callback_stepping_the_scheduler_again_breaks_the_schedule(tmp_path):
    fit(
        tmp_path,
        make_mlp(),
        make_regression(64),
        callbacks=[ExtraSchedulerStep()],
        batch_size=8,
        scheduler="cosine",
    )
    found = read_findings(tmp_path / "run")
    assert names(found) == ["lr_schedule"]
    assert found[0]["lr"] < found[0]["scheduled_lr"]  # the schedule ran ahead


def test_no_callback_no_finding_on_the_same_run(tmp_path):
    fit(tmp_path, make_mlp(), make_regression(64), batch_size=8, scheduler="cosine")
    assert read_findings(tmp_path / "run") == []


def test_a_healthy_digits_run_has_no_findings(tmp_path):
    # The digits recipe with its defaults, on a shorter budget; log_every=5 gives the checks more rows.
    run_dir = tmp_path / "digits"
    train("digits", [f"run_dir={run_dir}", "progress=false", "max_epochs=4", "log_every=5"])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum(row["kind"] == "train" for row in rows) >= 30  # the checks had rows to look at
    assert sum(row["kind"] == "eval" for row in rows) == 4
    first = next(row for row in rows if row["kind"] == "train")
    assert first["first_step_loss"] == pytest.approx(2.3, abs=0.1)  # the baseline: about ln(10)
    assert read_findings(run_dir) == []


def test_sgd_at_lr_50_on_digits_diverges_and_evaluates_at_chance(tmp_path):
    # The reported run: a loss of ~350 from the first logged row on, and eval accuracy at 1/10.
    run_dir = tmp_path / "digits"
    overrides = ["optimizer=sgd", "lr=50", "max_steps=200"]
    train("digits", [f"run_dir={run_dir}", "progress=false", *overrides])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first = next(row for row in rows if row["kind"] == "train")
    assert first["loss"] > 100 * first["first_step_loss"]  # the first row hides where the run began
    found = {f["diagnostic"]: f for f in read_findings(run_dir)}
    assert found["divergence"]["step"] == 60  # the third logged row, as divergence.window says
    assert found["at_chance"]["step"] == 90  # the second evaluation
    assert found["at_chance"]["eval_accuracy"] < 0.15


def test_a_healthy_tinylm_run_has_no_findings(tmp_path):
    # The tinylm recipe's training settings (AdamW, cosine, warm-up, clipping, its lr) with the short
    # horizon and the tiny model test_tinylm.py trains (the defaults take ~90 s); warm-up kept at 5% of the
    # run. log_every=2 and eval_every=10 give the checks rows, and evaluations right after the warm-up, where
    # at_chance would first fire.
    overrides = {"max_steps": 30, "warmup_steps": 2, "log_every": 2, "eval_every": 10, "save_every": 0}
    _, config = prepare("tinylm", {"run_dir": str(tmp_path / "run"), "progress": False} | overrides)
    model_config = TinyLMConfig(context_length=32, d_model=32, n_layer=1)
    train_data, eval_data = load_stdlib_windows(model_config.context_length)
    torch.manual_seed(0)
    trainer = Trainer(
        TinyLM(model_config),
        config,
        train_data=train_data,
        eval_data=eval_data,
        loss_fn=lm_loss,
        metrics={"accuracy": token_accuracy},
    )
    trainer.fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert sum(row["kind"] == "eval" for row in rows) == 3
    first = next(row for row in rows if row["kind"] == "train")
    assert first["first_step_loss"] > 4  # the untrained model over ~100 characters
    assert read_findings(tmp_path / "run") == []
