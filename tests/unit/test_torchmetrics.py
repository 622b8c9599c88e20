"""torchmetrics ``Metric`` objects in ``metrics={...}``: same value as our exact accuracy, reset per
evaluation, updated with the logits of a model output that carries them."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

torchmetrics = pytest.importorskip("torchmetrics")

from steadyfit import ConfigError, TrainConfig, Trainer  # noqa: E402
from steadyfit.evaluation import check_metrics_meet_every_rank  # noqa: E402
from steadyfit.metrics import accuracy  # noqa: E402

F_CE = torch.nn.functional.cross_entropy


def classification_data(num_samples: int, seed: int, label_noise: float) -> TensorDataset:
    """Labels mostly follow a fixed linear rule, so a model's accuracy differs from set to set."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, 8, generator=generator)
    labels = (inputs[:, :5]).argmax(dim=1)
    noisy = torch.rand(num_samples, generator=generator) < label_noise
    labels[noisy] = torch.randint(0, 5, (int(noisy.sum()),), generator=generator)
    return TensorDataset(inputs, labels)


def make_trainer(tmp_path, eval_data: TensorDataset) -> Trainer:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 5)
    config = TrainConfig(
        run_dir=str(tmp_path / "run"),
        max_steps=20,
        max_epochs=None,
        batch_size=16,
        eval_batch_size=16,
        lr=0.05,
        progress=False,
        log_every=0,
        device="cpu",
    )
    metrics = {"accuracy": accuracy, "tm_accuracy": torchmetrics.Accuracy(task="multiclass", num_classes=5)}
    return Trainer(
        model,
        config,
        train_data=classification_data(200, seed=1, label_noise=0.2),
        eval_data=eval_data,
        loss_fn=torch.nn.functional.cross_entropy,
        metrics=metrics,
    )


def test_torchmetrics_accuracy_equals_ours_with_a_ragged_last_batch(tmp_path):
    eval_data = classification_data(103, seed=2, label_noise=0.3)  # 6 batches of 16 and one of 7
    trainer = make_trainer(tmp_path, eval_data)
    result = trainer.fit()
    assert result.metrics["eval_tm_accuracy"] == pytest.approx(result.metrics["eval_accuracy"], rel=1e-6)
    # The reference: plain counting over the whole set at once.
    with torch.no_grad():
        correct = (trainer.model(eval_data.tensors[0]).argmax(dim=1) == eval_data.tensors[1]).sum()
    assert result.metrics["eval_accuracy"] == pytest.approx(float(correct) / 103, rel=1e-9)


def test_torchmetrics_state_is_reset_for_each_evaluation(tmp_path):
    clean = classification_data(64, seed=3, label_noise=0.0)
    noisy = classification_data(80, seed=4, label_noise=0.9)
    trainer = make_trainer(tmp_path, clean)
    trainer.fit()
    on_noisy = trainer.evaluate(noisy)
    on_clean = trainer.evaluate(clean)
    assert on_noisy["eval_accuracy"] != pytest.approx(on_clean["eval_accuracy"])
    # Without a reset, the second value would mix both sets' counts.
    assert on_clean["eval_tm_accuracy"] == pytest.approx(on_clean["eval_accuracy"], rel=1e-6)
    assert on_noisy["eval_tm_accuracy"] == pytest.approx(on_noisy["eval_accuracy"], rel=1e-6)
    assert trainer.evaluate(clean) == on_clean


def test_a_torchmetric_receives_the_logits_of_a_dict_output(tmp_path):
    # A Hugging Face-style output (loss and logits): the Metric is updated with the logits alone.
    class WithLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(8, 5)

        def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.linear(inputs)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    inputs, labels = classification_data(37, seed=5, label_noise=0.3).tensors
    rows = [{"inputs": x, "labels": y} for x, y in zip(inputs, labels, strict=True)]
    config = TrainConfig(
        run_dir=str(tmp_path / "run"), max_steps=1, max_epochs=None, eval_batch_size=8, progress=False
    )
    model = WithLoss()
    metrics = {"tm_accuracy": torchmetrics.Accuracy(task="multiclass", num_classes=5)}
    scores = Trainer(model, config, eval_data=rows, metrics=metrics).evaluate()
    with torch.no_grad():
        correct = (model.linear(inputs).argmax(dim=1) == labels).sum()
    assert scores["eval_tm_accuracy"] == pytest.approx(float(correct) / 37, rel=1e-6)


def test_list_state_metrics_over_fewer_samples_than_ranks_are_refused_on_every_rank():
    # torchmetrics syncs a "cat" (list) state itself in compute(); a rank that updated nothing issues other
    # collectives than the rest and the process aborts. Every rank sees the same lengths, so all refuse.
    auroc = torchmetrics.classification.MulticlassAUROC(num_classes=5)
    fixed_size = torchmetrics.classification.MulticlassAccuracy(num_classes=5)
    one_sample = classification_data(1, seed=0, label_noise=0.0)
    with pytest.raises(ConfigError, match=r"eval_data: 1 sample\(s\) over 2 ranks .* metric\(s\) 'auroc'"):
        check_metrics_meet_every_rank({"acc": fixed_size, "auroc": auroc}, one_sample, 2, "eval_data")
    check_metrics_meet_every_rank({"acc": fixed_size, "mine": accuracy}, one_sample, 2, "eval_data")
    check_metrics_meet_every_rank({"auroc": auroc}, classification_data(2, 0, 0.0), 2, "eval_data")
    check_metrics_meet_every_rank({"auroc": auroc}, one_sample, 1, "eval_data")


def _evaluate_with(tmp_path, metrics):
    config = TrainConfig(run_dir=str(tmp_path / "run"), progress=False, device="cpu", eval_batch_size=16)
    trainer = Trainer(
        torch.nn.Linear(8, 5),
        config,
        train_data=classification_data(32, seed=1, label_noise=0.0),
        loss_fn=torch.nn.functional.cross_entropy,
        metrics=metrics,
    )
    return trainer.evaluate(classification_data(40, seed=2, label_noise=0.2))


def test_a_metric_collection_gives_one_score_per_member(tmp_path):
    collection = torchmetrics.MetricCollection(
        {
            "acc": torchmetrics.Accuracy(task="multiclass", num_classes=5),
            "f1": torchmetrics.F1Score(task="multiclass", num_classes=5, average="macro"),
        }
    )
    scores = _evaluate_with(tmp_path, {"cls": collection, "accuracy": accuracy})
    assert scores["eval_cls_acc"] == pytest.approx(scores["eval_accuracy"], rel=1e-6)
    assert 0.0 <= scores["eval_cls_f1"] <= 1.0


def test_a_torchmetric_that_computes_more_than_one_number_names_itself(tmp_path):
    # average=None: one score per class; a row holds numbers (it crashed the run, losing its training).
    per_class = torchmetrics.Accuracy(task="multiclass", num_classes=5, average=None)
    with pytest.raises(ConfigError, match=r"metrics: 'per_class' computes \[5\], not one number"):
        _evaluate_with(tmp_path, {"per_class": per_class})


def test_a_metric_or_loss_that_is_not_a_function_is_refused_at_construction(tmp_path):
    data = classification_data(32, seed=1, label_noise=0.0)
    config = TrainConfig(run_dir=str(tmp_path / "run"), progress=False)
    with pytest.raises(ConfigError, match=r"metrics: 'acc' is a str, not a metric"):
        Trainer(torch.nn.Linear(8, 5), config, train_data=data, metrics={"acc": "accuracy"})
    with pytest.raises(ConfigError, match=r"loss_fn: expected a function"):
        Trainer(torch.nn.Linear(8, 5), config, train_data=data, loss_fn="cross_entropy")
    with pytest.raises(ConfigError, match=r"model: expected a torch.nn.Module, got function"):
        Trainer(lambda x: x, config, train_data=data)
    # One callback alone is taken, as Lightning takes it.
    from steadyfit import Callback

    one = Trainer(torch.nn.Linear(8, 5), config, train_data=data, loss_fn=F_CE, callbacks=Callback())
    assert len(one.callbacks.callbacks) == 1
