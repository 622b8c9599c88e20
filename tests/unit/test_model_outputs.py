"""Models that return their own loss and output objects (Hugging Face style, no transformers needed): the
one-time warning for a loss steadyfit cannot make exact, metrics on a dict's logits, and ``predict``
concatenating per-sample fields."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from helpers import base_config
from steadyfit import Trainer, accuracy
from steadyfit.evaluation import concatenate_outputs


@dataclass
class TaggerOutput:
    loss: torch.Tensor
    logits: torch.Tensor


class Tagger(torch.nn.Module):
    """A token tagger of unknown loss type: its mean over tokens cannot be made exact by steadyfit."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embedding = torch.nn.Embedding(16, 4)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> TaggerOutput:
        logits = self.embedding(input_ids)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return TaggerOutput(loss, logits)


def tagged_rows(num_rows: int, labels_per_row: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 16, (num_rows, 6), generator=generator)
    labels = input_ids % 4
    return [
        {"input_ids": ids, "labels": label if labels_per_row > 1 else label[0]}
        for ids, label in zip(input_ids, labels, strict=True)
    ]


def test_a_model_loss_over_token_labels_of_unknown_kind_is_named_once(tmp_path, capsys):
    config = base_config(tmp_path, max_steps=3, max_epochs=None, batch_size=4, log_every=0)
    trainer = Trainer(Tagger(), config, train_data=tagged_rows(16, 6), eval_data=tagged_rows(8, 6))
    trainer.fit()
    trainer.evaluate()
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning: Tagger" in line]
    assert len(warnings) == 1, warnings
    assert "loss_fn=steadyfit.hf.causal_lm_loss" in warnings[0]


def test_a_model_loss_over_sample_labels_needs_no_warning(tmp_path, capsys):
    # One label per sample: a mean over samples, which sample weighting makes exact.
    class Classifier(Tagger):
        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> TaggerOutput:
            logits = self.embedding(input_ids).mean(dim=1)
            return TaggerOutput(torch.nn.functional.cross_entropy(logits, labels), logits)

    config = base_config(tmp_path, max_steps=2, max_epochs=None, batch_size=4, log_every=0)
    Trainer(Classifier(), config, train_data=tagged_rows(8, 1)).fit()
    assert "warning" not in capsys.readouterr().err


def test_metrics_receive_the_logits_of_a_dict_output(tmp_path):
    class DictClassifier(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.linear = torch.nn.Linear(6, 3)

        def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
            logits = self.linear(inputs)
            return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}

    generator = torch.Generator().manual_seed(2)
    inputs, labels = torch.randn(13, 6, generator=generator), torch.randint(0, 3, (13,), generator=generator)
    rows = [{"inputs": x, "labels": y} for x, y in zip(inputs, labels, strict=True)]
    config = base_config(tmp_path, max_steps=1, max_epochs=None, eval_batch_size=4)
    model = DictClassifier()
    scores = Trainer(model, config, eval_data=rows, metrics={"accuracy": accuracy}).evaluate()
    with torch.no_grad():
        correct = (model.linear(inputs).argmax(dim=1) == labels).sum()
    assert scores["eval_accuracy"] == pytest.approx(float(correct) / 13, rel=1e-9)


def test_concatenate_outputs_keeps_per_sample_fields_only():
    batches = [
        {"loss": torch.tensor(0.5), "logits": torch.ones(2, 3), "hidden": (torch.zeros(2, 4), "cache")},
        {"loss": torch.tensor(0.7), "logits": torch.zeros(1, 3), "hidden": (torch.ones(1, 4), "cache")},
    ]
    joined = concatenate_outputs(batches)
    assert sorted(joined) == ["hidden", "logits"]  # a 0-dim loss is one mean per batch: left out
    assert joined["logits"].tolist() == [[1.0] * 3, [1.0] * 3, [0.0] * 3]
    assert joined["hidden"][0].shape == (3, 4) and joined["hidden"][1] is None


def test_concatenate_outputs_names_a_field_of_different_lengths():
    batches = [{"logits": torch.ones(2, 5, 3)}, {"logits": torch.ones(2, 4, 3)}]
    with pytest.raises(ValueError, match=r"outputs\.logits has shapes .* pad every batch"):
        concatenate_outputs(batches)
