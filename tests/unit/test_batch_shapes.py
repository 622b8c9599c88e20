"""Batches of the shapes users' datasets and collate functions give: nested targets, named tuples, a pair of
dicts, per-sample strings. Each is counted by its samples (accumulation and eval averages stay exact), moved
and cut into micro-batches without losing its type."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from helpers import base_config, make_mlp, make_regression
from steadyfit import Trainer
from steadyfit.data import count_samples, split_batch

CE = torch.nn.functional.cross_entropy


class Samples(torch.utils.data.Dataset):
    """make_regression's samples, each reshaped by ``shape(index, x, y)``."""

    def __init__(self, n: int, shape) -> None:
        self.data = make_regression(n)
        self.shape = shape

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        return self.shape(index, *self.data[index])


def two_targets(n: int) -> Samples:
    """``(x, (class, weight))`` samples: default collation gives ``[X, [CLASSES, WEIGHTS]]``."""
    return Samples(n, lambda index, x, y: (x, (y, torch.tensor(1.0))))


def two_target_loss(outputs, targets):
    classes, weights = targets
    return (CE(outputs, classes, reduction="none") * weights).mean()


def _weights(tmp_path, name, data, loss_fn=CE, **overrides):
    config = base_config(tmp_path / name, max_epochs=2, lr=0.05, optimizer="sgd", **overrides)
    trainer = Trainer(make_mlp(), config, train_data=data, loss_fn=loss_fn)
    trainer.fit()
    return trainer.model.state_dict(), trainer


def test_nested_targets_count_samples_so_accumulation_stays_exact(tmp_path):
    # 30 samples: the last window of each epoch is short, where a miscount shows most.
    data = two_targets(30)
    accumulated, _ = _weights(tmp_path, "a", data, two_target_loss, batch_size=4, grad_accum_steps=3)
    large, _ = _weights(tmp_path, "b", data, two_target_loss, batch_size=12, grad_accum_steps=1)
    for name, value in large.items():
        torch.testing.assert_close(accumulated[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_nested_targets_give_the_same_eval_mean_at_every_eval_batch_size(tmp_path):
    def eval_loss(batch_size):
        config = base_config(tmp_path, max_epochs=1, eval_batch_size=batch_size)
        trainer = Trainer(make_mlp(), config, train_data=two_targets(10), loss_fn=two_target_loss)
        return trainer.evaluate(two_targets(10))["eval_loss"]

    assert eval_loss(4) == pytest.approx(eval_loss(10), rel=1e-6)


class Sample(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def named_samples(n: int) -> Samples:
    return Samples(n, lambda index, x, y: Sample(x, y))


def test_a_named_tuple_batch_trains_predicts_and_splits_like_a_pair(tmp_path):
    plain, _ = _weights(tmp_path, "plain", make_regression(20), batch_size=4)
    named, trainer = _weights(tmp_path, "named", named_samples(20), batch_size=4, micro_batch_size=2)
    for name, value in plain.items():
        torch.testing.assert_close(named[name], value, msg=name)
    assert trainer.predict(named_samples(20)).shape == (20, 3)
    pieces = split_batch(Sample(torch.zeros(5, 2), torch.zeros(5)), 2)
    assert [type(piece) for piece in pieces] == [Sample] * 3 and pieces[-1].x.shape == (1, 2)


def test_a_pair_of_dicts_is_counted_by_its_targets():
    batch = ({"x": torch.zeros(6, 3), "mask": torch.ones(6, 3)}, {"y": torch.zeros(6), "w": torch.ones(6)})
    assert count_samples(batch) == 6
    assert count_samples([torch.zeros(3, 2), ["a", "b", "c"]]) == 3  # per-sample strings, read last
    with pytest.raises(ValueError, match="holds no tensor"):
        count_samples(({"x": 1}, {"y": 2}))


def test_lists_of_per_sample_items_count_their_items_not_an_items_length():
    # A detection collate (tuple(zip(*batch))): images of one channel count, targets one dict per image.
    images = tuple(torch.zeros(3, 8 + k, 8) for k in range(4))
    targets = tuple({"boxes": torch.zeros(k, 4), "labels": torch.zeros(k)} for k in (2, 9, 1, 5))
    assert count_samples((images, targets)) == 4
    variable = [torch.zeros(k) for k in (3, 5, 2, 3)]  # unpadded sequences, one per sample
    assert count_samples(({"x": torch.zeros(4, 6)}, variable)) == 4
    assert count_samples({"input_values": torch.zeros(4, 100), "labels": variable}) == 4
    assert count_samples([{"x": torch.zeros(5)} for _ in range(10)]) == 10
    # The same number of boxes in every image: the lists disagree on a first dimension, so per sample.
    assert count_samples(([torch.zeros(3, 8, 8)] * 5, [torch.zeros(2, 4)] * 5)) == 5
    # Default-collated two-field inputs and targets: every tensor has the batch's first dimension.
    assert count_samples(([torch.zeros(4, 3), torch.zeros(4)], [torch.zeros(4), torch.zeros(4, 2)])) == 4


def with_texts(n: int) -> Samples:
    """Dict samples with a string field, which default collation leaves as a list of strings."""
    return Samples(n, lambda index, x, y: {"x": x, "labels": y, "text": f"sample {index}"})


class DictModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = make_mlp()
        self.texts_seen: list[str] = []

    def forward(self, x, labels, text):
        self.texts_seen.extend(text)
        logits = self.net(x)
        return {"loss": CE(logits, labels), "logits": logits}


def test_micro_batches_slice_a_list_of_strings_with_the_samples(tmp_path):
    model = DictModel()
    config = base_config(tmp_path, max_epochs=1, batch_size=4, micro_batch_size=3, optimizer="sgd")
    Trainer(model, config, train_data=with_texts(8), loss_fn=None).fit()
    assert sorted(model.texts_seen) == sorted(f"sample {i}" for i in range(8))
    pieces = split_batch({"x": torch.zeros(4, 6), "text": ["a", "b", "c", "d"]}, 3)
    assert [piece["text"] for piece in pieces] == [["a", "b", "c"], ["d"]]
