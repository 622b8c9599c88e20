"""The loop's behaviour: modes, termination, evaluation, best tracking, early stopping, callbacks."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from helpers import base_config, make_mlp, make_regression, metric_rows
from steadyfit import Callback, TrainConfig, Trainer
from steadyfit.metrics import accuracy

CE = torch.nn.functional.cross_entropy


def test_max_steps_counts_optimizer_steps(tmp_path):
    config = base_config(tmp_path, batch_size=2, grad_accum_steps=3, max_epochs=100, max_steps=5)
    trainer = Trainer(make_mlp(), config, train_data=make_regression(60), loss_fn=CE)
    result = trainer.fit()
    assert result.global_step == 5
    assert trainer.state.samples_seen == 5 * 2 * 3
    assert trainer.state.batch_in_epoch == 15  # micro-batches consumed


@pytest.mark.parametrize("eval_batch_size", [1, 7, 13, 64])
def test_eval_metrics_are_exact_per_sample_means(tmp_path, eval_batch_size):
    data = make_regression(29)  # 29: every batch size above leaves a ragged last batch
    model = make_mlp()
    config = base_config(tmp_path, eval_batch_size=eval_batch_size)
    trainer = Trainer(
        model, config, train_data=data, eval_data=data, loss_fn=CE, metrics={"accuracy": accuracy}
    )
    scores = trainer.evaluate()
    inputs, targets = data.tensors
    with torch.no_grad():
        outputs = model(inputs)
    assert scores["eval_loss"] == pytest.approx(CE(outputs, targets).item(), rel=1e-6)
    assert scores["eval_accuracy"] == pytest.approx((outputs.argmax(1) == targets).float().mean().item())


def test_a_metric_computed_on_the_host_counts_like_a_tensor_one(tmp_path):
    # A metric may return a Python or numpy number, as a mean or as the sum of a (sum, count) pair.
    data = make_regression(29)
    model = make_mlp()
    metrics = {
        "tensor": accuracy,
        "mean": lambda outputs, targets: float((outputs.argmax(1) == targets).float().mean()),
        "pair": lambda outputs, targets: (
            np.float32((outputs.argmax(1) == targets).sum()),
            len(targets),
        ),
    }
    config = base_config(tmp_path, eval_batch_size=7)
    scores = Trainer(model, config, eval_data=data, loss_fn=CE, metrics=metrics).evaluate()
    assert scores["eval_mean"] == pytest.approx(scores["eval_tensor"], rel=1e-6)
    assert scores["eval_pair"] == scores["eval_tensor"]


def test_accuracy_counts_no_ignored_target():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    correct, count = accuracy(logits, torch.tensor([1, 1, -100, -100]))
    assert (float(correct), int(count)) == (1.0, 2)
    tokens = torch.tensor([[[0.0, 1.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]])
    correct, count = accuracy(tokens, torch.tensor([[1, -100], [0, 0]]))
    assert (float(correct), int(count)) == (2.0, 3)


def test_a_rerun_of_a_finished_run_reports_its_last_evaluation(tmp_path):
    data = make_regression(29)
    config = base_config(tmp_path, batch_size=8, max_epochs=2, eval_every=2)

    def fit():
        trainer = Trainer(
            make_mlp(), config, train_data=data, eval_data=data, loss_fn=CE, metrics={"acc": accuracy}
        )
        return trainer.fit()

    first = fit()
    rerun = fit()  # resumes the final checkpoint: nothing left to train
    assert rerun.global_step == first.global_step
    assert set(first.metrics) == {"eval_loss", "eval_acc"}
    assert rerun.metrics == first.metrics


def test_dropout_off_during_eval_and_back_on_after(tmp_path):
    seen_modes: list[bool] = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = make_mlp(dropout=0.5)

        def forward(self, inputs):
            seen_modes.append(self.inner[2].training)
            if not self.training:
                assert not torch.is_grad_enabled(), "evaluation must run without autograd"
            return self.inner(inputs)

    data = make_regression(16)
    config = base_config(tmp_path, batch_size=8, eval_every=1, max_epochs=1)
    trainer = Trainer(Probe(), config, train_data=data, eval_data=data, loss_fn=CE)
    trainer.fit()
    # step 1: train, train? no: batch 8 -> 2 steps; each step: 1 train forward then 2 eval forwards
    assert seen_modes == [True, False, False, True, False, False]
    assert trainer.model.training


class _AugmentingSamples(torch.utils.data.Dataset):
    """Draws noise from torch, numpy and python for every sample, in this process (no workers)."""

    def __init__(self, data: torch.utils.data.TensorDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, target = self.data[index]
        noise = torch.randn(inputs.shape) * 0.1 + float(np.random.normal(0, 0.1)) + random.gauss(0, 0.1)
        return inputs + noise, target


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, data: torch.utils.data.TensorDataset) -> None:
        self.data = data

    def __iter__(self):
        return (self.data[i] for i in range(len(self.data)))


EVAL_SETS = {
    # A DataLoader draws a base seed from torch's global stream every time it is iterated.
    "user_dataloader": lambda data: torch.utils.data.DataLoader(data, batch_size=5),
    "iterable_dataset": _Stream,
    "augmenting_dataset": _AugmentingSamples,
}


@pytest.mark.parametrize("eval_set", EVAL_SETS)
def test_evaluating_changes_no_random_draw_of_the_training(tmp_path, eval_set):
    # Dropout in training and shuffling draw from the global streams: an evaluation that drew from them
    # too would give another trajectory for every eval_every.
    data = make_regression(24)
    weights = {}
    for eval_every in (0, 1, 2):
        config = base_config(
            tmp_path / f"every{eval_every}", batch_size=4, eval_every=eval_every, max_epochs=2
        )
        model = make_mlp(dropout=0.5)
        trainer = Trainer(model, config, train_data=data, eval_data=EVAL_SETS[eval_set](data), loss_fn=CE)
        trainer.fit()
        weights[eval_every] = {name: value.clone() for name, value in model.state_dict().items()}
    for eval_every in (1, 2):
        for name, value in weights[0].items():
            assert torch.equal(weights[eval_every][name], value), (eval_every, name)


def test_early_stopping_after_patience_evaluations(tmp_path):
    calls = []

    def worsening(outputs, targets):
        calls.append(1)
        return torch.tensor(float(len(calls)))  # every evaluation is worse than the last

    data = make_regression(32)
    config = base_config(
        tmp_path,
        batch_size=8,
        eval_every=1,
        max_epochs=10,
        metric_for_best="bad",
        greater_is_better=False,
        early_stopping_patience=3,
        eval_batch_size=32,
    )
    trainer = Trainer(
        make_mlp(), config, train_data=data, eval_data=data, loss_fn=CE, metrics={"bad": worsening}
    )
    result = trainer.fit()
    # eval 1 sets the best; evals 2, 3, 4 do not improve -> stop after step 4
    assert result.global_step == 4
    assert result.best_step == 1
    assert "early stopping" in result.stop_reason


def test_load_best_at_end_restores_best_weights(tmp_path):
    snapshots = {}

    class Snapshot(Callback):
        def on_evaluate(self, trainer, state, metrics):
            snapshots[state.step] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    scores = iter([3.0, 1.0, 2.0, 4.0, 5.0, 6.0])  # best (lowest loss-like) at the second evaluation

    def scripted(outputs, targets):
        return torch.tensor(next(scores))

    data = make_regression(32)
    config = base_config(
        tmp_path,
        batch_size=8,
        eval_every=1,
        max_epochs=1,
        metric_for_best="error",
        load_best_at_end=True,
        eval_batch_size=32,
        lr=0.1,
    )
    trainer = Trainer(
        make_mlp(),
        config,
        train_data=data,
        eval_data=data,
        loss_fn=CE,
        metrics={"error": scripted},
        callbacks=[Snapshot()],
    )
    result = trainer.fit()
    assert result.best_step == 2 and result.best_metric == 1.0
    for key, value in trainer.model.state_dict().items():
        assert torch.equal(value, snapshots[2][key]), key
    from safetensors.torch import load_file

    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    for key, value in final.items():
        assert torch.equal(value, snapshots[2][key]), key


def test_callback_events_and_stop_request(tmp_path):
    events: list[str] = []

    class Recorder(Callback):
        def on_fit_start(self, trainer, state):
            events.append("fit_start")

        def on_epoch_start(self, trainer, state):
            events.append("epoch_start")

        def on_step_end(self, trainer, state):
            events.append("step_end")
            if state.step == 5:
                trainer.request_stop("test stop")

        def on_evaluate(self, trainer, state, metrics):
            events.append("evaluate")

        def on_checkpoint_saved(self, trainer, state, path):
            events.append("checkpoint_saved")

        def on_epoch_end(self, trainer, state):
            events.append("epoch_end")

        def on_fit_end(self, trainer, state):
            events.append("fit_end")

    data = make_regression(16)
    config = base_config(tmp_path, batch_size=8, max_epochs=10)
    result = Trainer(
        make_mlp(), config, train_data=data, eval_data=data, loss_fn=CE, callbacks=[Recorder()]
    ).fit()
    assert result.global_step == 5 and result.stop_reason == "test stop"
    assert events.count("step_end") == 5
    assert events.count("epoch_start") == 3 and events.count("epoch_end") == 2
    assert events[0] == "fit_start" and events[-1] == "fit_end"
    # epoch-end evaluations at steps 2 and 4, the final one at step 5
    assert events.count("evaluate") == 3
    assert events.count("checkpoint_saved") >= 1


def test_should_stop_set_by_a_callback_stops_with_a_reason(tmp_path):
    # The documented alternative to request_stop: the summary and the report must say why the run ended.
    class StopAtThree(Callback):
        def on_step_end(self, trainer, state):
            state.should_stop = state.step == 3

    config = base_config(tmp_path, batch_size=8, max_epochs=10)
    trainer = Trainer(
        make_mlp(), config, train_data=make_regression(16), loss_fn=CE, callbacks=[StopAtThree()]
    )
    result = trainer.fit()
    assert (
        result.global_step == 3 and result.stop_reason == "stop requested by a callback (state.should_stop)"
    )
    assert metric_rows(tmp_path / "run")[-1]["stop_reason"] == result.stop_reason


def test_metrics_jsonl_rows(tmp_path):
    data = make_regression(40)
    config = base_config(tmp_path, batch_size=4, log_every=5, max_epochs=1)
    Trainer(make_mlp(), config, train_data=data, eval_data=data, loss_fn=CE).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["kind"] == "train"]
    assert [row["step"] for row in train] == [5, 10]
    for row in train:
        assert {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_sec"} <= set(row)
    evals = [row for row in rows if row["kind"] == "eval"]
    assert evals and "eval_loss" in evals[-1]
    assert (tmp_path / "run" / "config.yaml").exists()


def test_logged_loss_is_the_window_mean(tmp_path):
    losses = []

    def recording(outputs, targets):
        value = CE(outputs, targets)
        losses.append(value.item())
        return value

    data = make_regression(40)
    config = base_config(tmp_path, batch_size=4, log_every=5, max_epochs=1, lr=0.01)
    Trainer(make_mlp(), config, train_data=data, loss_fn=recording).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [row for row in rows if row["kind"] == "train"]
    assert train[0]["loss"] == pytest.approx(sum(losses[:5]) / 5, rel=1e-6)
    assert train[1]["loss"] == pytest.approx(sum(losses[5:10]) / 5, rel=1e-6)


def test_dict_batches_use_model_loss(tmp_path):
    class HFStyle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(6, 3)

        def forward(self, inputs, labels):
            logits = self.linear(inputs)
            return {"logits": logits, "loss": CE(logits, labels)}

    inputs, labels = make_regression(24).tensors

    class DictData(torch.utils.data.Dataset):
        def __len__(self):
            return len(labels)

        def __getitem__(self, index):
            return {"inputs": inputs[index], "labels": labels[index]}

    config = base_config(tmp_path, batch_size=8, max_epochs=2)
    trainer = Trainer(HFStyle(), config, train_data=DictData(), eval_data=DictData())
    result = trainer.fit()
    assert result.global_step == 6
    assert "eval_loss" in result.metrics


def test_predict_returns_outputs_in_order(tmp_path):
    data = make_regression(21)
    model = make_mlp()
    trainer = Trainer(model, base_config(tmp_path, eval_batch_size=4), train_data=data, loss_fn=CE)
    outputs = trainer.predict(data)
    with torch.no_grad():
        expected = model(data.tensors[0])
    torch.testing.assert_close(outputs, expected)


def test_iterable_dataset_needs_max_steps(tmp_path):
    from steadyfit import ConfigError

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            generator = torch.Generator().manual_seed(0)
            for _ in range(1000):
                yield torch.randn(6, generator=generator), torch.tensor(1)

    with pytest.raises(ConfigError, match="max_steps"):
        Trainer(make_mlp(), base_config(tmp_path), train_data=Stream(), loss_fn=CE).fit()
    config = base_config(tmp_path, max_steps=7, max_epochs=None, batch_size=4)
    assert Trainer(make_mlp(), config, train_data=Stream(), loss_fn=CE).fit().global_step == 7


def test_user_dataloader_and_workers(tmp_path):
    data = make_regression(24)
    loader = torch.utils.data.DataLoader(data, batch_size=6, shuffle=False)
    result = Trainer(make_mlp(), base_config(tmp_path / "a"), train_data=loader, loss_fn=CE).fit()
    assert result.global_step == 4
    config = base_config(tmp_path / "b", num_workers=2, batch_size=6)
    assert Trainer(make_mlp(), config, train_data=data, loss_fn=CE).fit().global_step == 4


def test_train_config_defaults_are_valid():
    config = TrainConfig()
    assert config.optimizer == "adamw" and config.resume == "auto"


def test_token_losses_count_tokens_and_report_token_throughput(tmp_path):
    def two_tokens_per_sample(outputs, targets):
        return CE(outputs, targets, reduction="sum") * 2, torch.tensor(2 * targets.numel())

    config = base_config(tmp_path, batch_size=4, log_every=5, max_epochs=1)
    trainer = Trainer(make_mlp(), config, train_data=make_regression(40), loss_fn=two_tokens_per_sample)
    trainer.fit()
    assert trainer.state.tokens_seen == 80
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["tokens_per_sec"] > 0 for row in rows if row["kind"] == "train")
