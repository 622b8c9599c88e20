"""Exact resume in one process for every optimizer, schedule, precision and EMA: a run that crashes after a
checkpoint and is started again equals, bitwise, the run that never stopped."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import (
    assert_bitwise_equal,
    base_config,
    final_weights,
    make_mlp,
    make_regression,
    metric_rows,
)
from steadyfit import Callback, ConfigError, Trainer, accuracy, seed_everything
from steadyfit.schedules import linear_factor

CE = torch.nn.functional.cross_entropy


class Crash(Exception):
    pass


class CrashAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, state):
        if state.step == self.step:
            raise Crash


def _run(run_dir, crash_at=None, **overrides):
    seed_everything(0)
    model = make_mlp(dropout=0.2)
    values = {"batch_size": 8, "grad_accum_steps": 2, "max_epochs": 3, "save_every": 4, "deterministic": True}
    values.update(overrides)
    config = base_config(run_dir, **values)
    callbacks = [CrashAt(crash_at)] if crash_at else []
    data = make_regression(90)
    trainer = Trainer(model, config, train_data=data, eval_data=data, loss_fn=CE, callbacks=callbacks)
    if crash_at:
        with pytest.raises(Crash):
            trainer.fit()
        return None
    trainer.fit()
    return trainer


def _assert_resume_exact(tmp_path, **overrides):
    first = _run(tmp_path / "a", **overrides)
    second = _run(tmp_path / "b", **overrides)
    _run(tmp_path / "c", crash_at=10, **overrides)
    resumed = _run(tmp_path / "c", **overrides)
    for trainer in (second, resumed):
        for key, value in first.model.state_dict().items():
            assert torch.equal(value, trainer.model.state_dict()[key]), key
        assert trainer.state.step == first.state.step
        assert trainer.optimizer.param_groups[0]["lr"] == first.optimizer.param_groups[0]["lr"]
    return first, resumed


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw", "adafactor", "lamb", "lion"])
def test_every_optimizer_resumes_exactly(tmp_path, optimizer):
    if optimizer in ("lamb", "lion"):
        pytest.importorskip("pytorch_optimizer")
    _assert_resume_exact(tmp_path, optimizer=optimizer, lr=0.01, momentum=0.9 if optimizer == "sgd" else 0.0)


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine", "step", "onecycle", "wsd"])
def test_every_schedule_resumes_exactly(tmp_path, scheduler):
    _assert_resume_exact(tmp_path, scheduler=scheduler, warmup_steps=3, step_size=5, gamma=0.5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_resumes_exactly(tmp_path, precision):
    first, resumed = _assert_resume_exact(tmp_path, precision=precision)
    if precision == "fp16":
        assert resumed.precision.loss_scale() == first.precision.loss_scale()


def test_ema_resumes_exactly(tmp_path):
    first, resumed = _assert_resume_exact(tmp_path, ema_decay=0.9)
    for key, value in first.ema.state_dict().items():
        assert torch.equal(value, resumed.ema.state_dict()[key]), key
    # A rerun of the finished run reports the last evaluation's scores, the EMA's too.
    rerun = _run(tmp_path / "a", ema_decay=0.9)
    assert "ema_eval_loss" in rerun._result().metrics
    assert rerun._result().metrics == first._result().metrics


def test_extending_max_epochs_continues_the_run(tmp_path):
    short = _run(tmp_path / "a", max_epochs=2)
    longer = _run(tmp_path / "a", max_epochs=3)
    assert longer.state.step > short.state.step
    full = _run(tmp_path / "b", max_epochs=3)
    for key, value in full.model.state_dict().items():
        assert torch.equal(value, longer.model.state_dict()[key]), key


class FailsOnce(torch.utils.data.Dataset):
    """A dataset whose ``fail_at``-th read raises once (a transient I/O error), as a notebook user then
    calls fit() again on the same Trainer."""

    def __init__(self, data, fail_at):
        self.data, self.fail_at, self.reads = data, fail_at, 0

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads == self.fail_at:
            raise OSError("transient read error")
        return self.data[index]


def test_fit_again_after_an_error_continues_from_the_checkpoint_booking_no_stale_step(tmp_path):
    # The default fused AdamW decides steps on the device and books them at read points: the error lands
    # between two, with steps taken and not booked. The second fit must book none of them.
    def config(run_dir):
        return base_config(run_dir, max_steps=12, max_epochs=None, batch_size=8, save_every=4, log_every=0)

    reference = Trainer(make_mlp(), config(tmp_path / "a"), train_data=make_regression(64), loss_fn=CE)
    reference.fit()
    trainer = Trainer(
        make_mlp(), config(tmp_path / "b"), train_data=FailsOnce(make_regression(64), 50), loss_fn=CE
    )
    with pytest.raises(Exception, match="transient read error"):
        trainer.fit()
    assert trainer.fit().global_step == 12
    assert_bitwise_equal(trainer.model.state_dict(), reference.model.state_dict())


def test_fit_again_after_an_error_with_no_checkpoint_refuses_to_start_over_from_trained_weights(tmp_path):
    config = base_config(tmp_path, max_steps=12, max_epochs=None, batch_size=8, save_every=0, log_every=1)
    trainer = Trainer(make_mlp(), config, train_data=make_regression(64), loss_fn=CE, callbacks=[CrashAt(3)])
    with pytest.raises(Crash):
        trainer.fit()
    trainer.callbacks = type(trainer.callbacks)([])
    with pytest.raises(ConfigError, match=r"an earlier fit\(\) of this Trainer trained its model to step 3"):
        trainer.fit()


class CountSteps(Callback):
    """A Lightning-style callback with state of its own (state_dict / load_state_dict)."""

    def __init__(self):
        self.steps = 0
        self.losses = []

    def on_step_end(self, trainer, state):
        self.steps += 1

    def on_log(self, trainer, state, row):
        if row["kind"] == "train":
            self.losses.append(row["loss"])

    def state_dict(self):
        return {"steps": self.steps, "losses": list(self.losses)}

    def load_state_dict(self, state):
        self.steps, self.losses = state["steps"], list(state["losses"])


def test_a_callbacks_own_state_is_saved_and_restored_with_the_checkpoint(tmp_path):
    uninterrupted = CountSteps()
    config = base_config(tmp_path / "a", batch_size=8, max_epochs=2, save_every=4)
    Trainer(make_mlp(), config, train_data=make_regression(90), loss_fn=CE, callbacks=[uninterrupted]).fit()
    config = base_config(tmp_path / "b", batch_size=8, max_epochs=2, save_every=4)
    with pytest.raises(Crash):
        Trainer(
            make_mlp(),
            config,
            train_data=make_regression(90),
            loss_fn=CE,
            callbacks=[CountSteps(), CrashAt(10)],
        ).fit()
    resumed = CountSteps()  # a new process's callback starts at 0; the checkpoint at step 8 holds 8
    Trainer(make_mlp(), config, train_data=make_regression(90), loss_fn=CE, callbacks=[resumed]).fit()
    assert resumed.steps == uninterrupted.steps == 24
    assert resumed.losses == uninterrupted.losses


class KeepsASet(Callback):
    def __init__(self, fails_to_load=False):
        self.seen = {1, 2}
        self.fails_to_load = fails_to_load

    def state_dict(self):
        return {"seen": self.seen} if not self.fails_to_load else {"seen": sorted(self.seen)}

    def load_state_dict(self, state):
        raise KeyError("a bug in the callback")


def test_a_callback_state_a_checkpoint_cannot_hold_is_warned_about_and_a_failing_load_is_named(
    tmp_path, capfd
):
    config = base_config(tmp_path, batch_size=8, max_steps=4, max_epochs=None, save_every=2)
    Trainer(make_mlp(), config, train_data=make_regression(64), loss_fn=CE, callbacks=[KeepsASet()]).fit()
    assert "callback KeepsASet: its state_dict() holds a set" in capfd.readouterr().err
    config = base_config(tmp_path / "b", batch_size=8, max_steps=4, max_epochs=None, save_every=2)
    Trainer(make_mlp(), config, train_data=make_regression(64), loss_fn=CE, callbacks=[KeepsASet(True)]).fit()
    again = config.model_copy(update={"max_steps": 6})
    trainer = Trainer(
        make_mlp(), again, train_data=make_regression(64), loss_fn=CE, callbacks=[KeepsASet(True)]
    )
    with pytest.raises(ConfigError, match=r"callback KeepsASet: its load_state_dict raised KeyError"):
        trainer.fit()


class StopAt(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, state):
        if state.step == self.step:
            trainer.request_stop("time budget")


def test_a_stopped_run_stays_stopped_on_rerun_and_says_why(tmp_path, capfd):
    config = base_config(tmp_path, batch_size=8, max_steps=8, max_epochs=None)
    first = Trainer(make_mlp(), config, train_data=make_regression(64), loss_fn=CE, callbacks=[StopAt(3)])
    assert first.fit().global_step == 3
    capfd.readouterr()
    again = Trainer(make_mlp(), config, train_data=make_regression(64), loss_fn=CE).fit()
    assert again.global_step == 3 and again.stop_reason == "time budget"
    assert "the run had stopped early (time budget) and stays stopped" in capfd.readouterr().err


class LearningRatesUsed(Callback):
    """The first group's lr as each optimizer step reads it (a float on the host path, a device view on
    the fused path)."""

    def __init__(self):
        self.lrs = []

    def on_fit_start(self, trainer, state):
        trainer.optimizer.register_step_pre_hook(
            lambda optimizer, args, kwargs: self.lrs.append(float(optimizer.param_groups[0]["lr"]))
        )


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])  # the host path, and the fused device path
def test_a_longer_max_steps_applies_the_new_schedule_from_the_first_resumed_step(tmp_path, optimizer):
    # The restored optimizer holds the old schedule's lr after step 8 (0 at the end of a linear decay).
    def fit(max_steps):
        used = LearningRatesUsed()
        config = base_config(
            tmp_path,
            optimizer=optimizer,
            lr=0.1,
            scheduler="linear",
            max_steps=max_steps,
            max_epochs=None,
            batch_size=8,
        )
        Trainer(make_mlp(), config, train_data=make_regression(90), loss_fn=CE, callbacks=[used]).fit()
        return used.lrs

    fit(8)
    extended = fit(12)
    expected = [0.1 * linear_factor(step, 0, 12, 0.0) for step in range(8, 12)]
    assert extended == pytest.approx(expected, rel=1e-6, abs=0.0)


class Stream(torch.utils.data.IterableDataset):
    """Data without a length: its epoch ends when it runs out, one boundary after its last step."""

    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return iter(self.data)


class CountEvents(Callback):
    def __init__(self):
        self.epochs_started = 0

    def on_epoch_start(self, trainer, state):
        self.epochs_started += 1


def _rerun_changes_nothing(tmp_path, make_trainer):
    """Fit, then fit again on the same run directory: the second finds everything done."""
    first = make_trainer()
    first.fit()
    forwards = []
    second = make_trainer()
    second.model.register_forward_pre_hook(lambda module, args: forwards.append(module.training))
    counter = CountEvents()
    second.callbacks = type(second.callbacks)([counter])
    second.fit()
    assert True not in forwards, "a rerun of a finished run trained again"
    assert counter.epochs_started == 0
    assert second.state.to_dict() == first.state.to_dict()
    for key, value in first.model.state_dict().items():
        assert torch.equal(value, second.model.state_dict()[key]), key


def test_a_finished_run_over_data_without_a_length_reruns_without_training(tmp_path):
    data = list(zip(torch.randn(16, 6), torch.randint(0, 3, (16,)), strict=True))

    def make():
        seed_everything(0)
        config = base_config(tmp_path, batch_size=4, max_epochs=1, max_steps=50, save_every=2, log_every=2)
        return Trainer(make_mlp(), config, train_data=Stream(data), loss_fn=CE)

    _rerun_changes_nothing(tmp_path, make)


def test_a_finished_run_whose_last_step_was_skipped_reruns_without_training(tmp_path):
    data = make_regression(13)
    data.tensors[0][12] = float("nan")  # the last batch (one sample) has a NaN loss: that step is skipped

    def make():
        seed_everything(0)
        config = base_config(tmp_path, batch_size=4, max_epochs=1, save_every=3, optimizer="sgd", lr=0.1)
        loader = torch.utils.data.DataLoader(data, batch_size=4)
        return Trainer(make_mlp(), config, train_data=loader, loss_fn=CE)

    _rerun_changes_nothing(tmp_path, make)


def test_a_moved_run_directory_finds_its_best_checkpoint_in_the_new_place(tmp_path):
    # run_dir may change on resume: the best checkpoint recorded in the state must be looked up in the run
    # directory the run has now, or load_best_at_end fails at the end of every rerun (or, worse, reads a
    # checkpoint of whatever run now sits at the old path).
    settings = {
        "batch_size": 8,
        "eval_every": 2,
        "save_every": 2,
        "keep_last": 1,
        "load_best_at_end": True,
        "metric_for_best": "evaluations_before",
        "greater_is_better": False,
    }
    data = make_regression(90)
    evaluations = []

    class Count(Callback):
        def on_evaluate(self, trainer, state, scores):
            evaluations.append(state.step)

    def evaluations_before(outputs, targets):
        return float(len(evaluations))  # 0 at the first evaluation, worse at every later one

    def fit(parent, max_steps):
        seed_everything(0)
        config = base_config(parent, **settings, max_steps=max_steps, max_epochs=None)
        metrics = {"evaluations_before": evaluations_before}
        trainer = Trainer(
            make_mlp(),
            config,
            train_data=data,
            eval_data=data,
            loss_fn=CE,
            metrics=metrics,
            callbacks=[Count()],
        )
        return trainer.fit()

    first = fit(tmp_path / "before", 6)
    assert first.best_checkpoint == str(tmp_path / "before" / "run" / "checkpoints" / "step-00000002")
    (tmp_path / "before").rename(tmp_path / "after")
    result = fit(tmp_path / "after", 8)
    moved = tmp_path / "after" / "run"
    assert result.global_step == 8 and result.best_checkpoint == str(moved / "checkpoints" / "step-00000002")
    best = load_file(str(Path(result.best_checkpoint) / "model.safetensors"))
    assert_bitwise_equal(final_weights(moved), best)


def test_a_new_metric_for_best_on_resume_starts_the_best_tracking_over(tmp_path, capsys):
    # The best value a checkpoint holds was judged by its metric: compared with another metric's values
    # (an accuracy as if it were a loss) it would keep the wrong checkpoint and stop early on no evidence.
    data = make_regression(90)

    def fit(max_steps, **best):
        seed_everything(0)
        config = base_config(
            tmp_path, batch_size=8, eval_every=2, max_steps=max_steps, max_epochs=None, lr=0.3, **best
        )
        metrics = {"accuracy": accuracy}
        return Trainer(make_mlp(), config, train_data=data, eval_data=data, loss_fn=CE, metrics=metrics).fit()

    before = fit(6, metric_for_best="accuracy")
    assert before.best_metric is not None
    after = fit(12, metric_for_best="eval_loss", early_stopping_patience=1)
    assert "best tracking and early stopping start over" in capsys.readouterr().err
    losses = {
        row["step"]: row["eval_loss"]
        for row in metric_rows(tmp_path / "run")
        if "eval_loss" in row and row["step"] > 6
    }
    assert after.best_step == min(losses, key=losses.get) and after.best_metric == min(losses.values())
    assert after.best_checkpoint == str(tmp_path / "run" / "checkpoints" / f"step-{after.best_step:08d}")
