"""Hugging Face models and datasets through steadyfit's Trainer: a tiny GPT-2 built from a config (no hub
download) trains on a ``datasets.Dataset``, its final weights load with ``from_pretrained``, collators pass
through, the model's own loss (``loss_fn=None``) and ``causal_lm_loss`` make accumulation and eval_loss
exact over tokens, metrics get a ModelOutput's logits and ``predict`` returns one ModelOutput."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: nothing here may download
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

from helpers import assert_bitwise_equal, final_weights  # noqa: E402
from steadyfit import TrainConfig, Trainer, accuracy  # noqa: E402
from steadyfit.data import BatchError  # noqa: E402
from steadyfit.hf import PadToLongest, causal_lm_loss, model_loss_kind  # noqa: E402

TEXT = b"steadyfit trains pytorch models with a loop you can trust: every number it prints is exact. " * 8


def tiny_gpt2(seed: int = 0, dropout: float = 0.0) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=256,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
    )
    return transformers.GPT2LMHeadModel(config)


def byte_dataset(lengths: list[int], offset: int = 0) -> datasets.Dataset:
    """Token ids are the bytes of TEXT: no tokenizer, no download. Rows may have different lengths."""
    rows = []
    for index, length in enumerate(lengths):
        start = (offset + index * 7) % (len(TEXT) - length)
        rows.append(list(TEXT[start : start + length]))
    columns = {"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows], "labels": rows}
    return datasets.Dataset.from_dict(columns).with_format("torch")


def make_config(tmp_path, name: str, **fields) -> TrainConfig:
    defaults = dict(run_dir=str(tmp_path / name), max_epochs=None, progress=False, log_every=0, device="cpu")
    return TrainConfig(**{**defaults, **fields})


@torch.no_grad()
def test_causal_lm_loss_equals_the_models_own_loss():
    model = tiny_gpt2()
    batch = byte_dataset([24, 24, 24])[:]
    outputs = model(**batch)
    total, count = causal_lm_loss(outputs, batch["labels"])
    assert int(count) == 3 * 23  # the last position of each row predicts nothing
    torch.testing.assert_close(total / count, outputs.loss)
    # A logits tensor works as well as the output object.
    torch.testing.assert_close(causal_lm_loss(outputs.logits, batch["labels"])[0], total)


@torch.no_grad()
def test_causal_lm_loss_leaves_out_ignored_labels():
    model = tiny_gpt2()
    batch = PadToLongest()([{"input_ids": list(TEXT[:10]), "labels": list(TEXT[:10])}])
    total, count = causal_lm_loss(model(**batch), batch["labels"])
    masked = batch["labels"].clone()
    masked[0, 6:] = -100
    masked_total, masked_count = causal_lm_loss(model(**batch), masked)
    assert (int(count), int(masked_count)) == (9, 5)
    assert float(masked_total) < float(total)


def test_causal_lm_loss_names_the_problem():
    with pytest.raises(ValueError, match="no `logits`"):
        causal_lm_loss(object(), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="do not match"):
        causal_lm_loss(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("loss_fn", [None, causal_lm_loss], ids=["outputs.loss", "causal_lm_loss"])
def test_gpt2_trains_on_a_dataset_and_final_weights_load_with_from_pretrained(tmp_path, loss_fn):
    model = tiny_gpt2()
    collated = []

    def collate(features):
        collated.append(len(features))
        return transformers.default_data_collator(features)

    config = make_config(tmp_path, "run", max_steps=30, batch_size=8, lr=1e-2)
    trainer = Trainer(
        model,
        config,
        train_data=byte_dataset([32] * 48),
        eval_data=byte_dataset([32] * 12, offset=3),
        loss_fn=loss_fn,
        collate_fn=collate,
    )
    before = trainer.evaluate()["eval_loss"]
    result = trainer.fit()
    assert result.global_step == 30
    assert collated, "the collator given as collate_fn was never called"
    assert result.metrics["eval_loss"] < 0.6 * before

    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "run" / "final")
    trained = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, trained[name], rtol=0, atol=0, msg=name)
    # final/model.safetensors is steadyfit's own file: every key, the tied head too, so plain
    # load_state_dict takes it; save_pretrained would have overwritten it without lm_head.weight.
    assert_bitwise_equal(final_weights(tmp_path / "run"), trained)
    with safe_open(tmp_path / "run" / "final" / "model.safetensors", "pt") as final_file:
        assert final_file.metadata() == {"format": "pt", "step": "30"}
    config_json = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config_json["architectures"] == ["GPT2LMHeadModel"]


def test_equal_length_rows_need_no_collator(tmp_path):
    # datasets' __getitems__ returns a list of dicts of tensors; torch's default collate stacks them.
    config = make_config(tmp_path, "run", max_steps=3, batch_size=4)
    trainer = Trainer(
        tiny_gpt2(), config, train_data=byte_dataset([32] * 16), eval_data=byte_dataset([32] * 5)
    )
    result = trainer.fit()
    assert result.global_step == 3
    assert 0 < result.metrics["eval_loss"] < 6


def _train_ragged(tmp_path, name: str, loss_fn, batch_size: int, grad_accum_steps: int) -> dict:
    model = tiny_gpt2()
    config = make_config(
        tmp_path,
        name,
        max_steps=3,
        batch_size=batch_size,
        grad_accum_steps=grad_accum_steps,
        optimizer="sgd",
        lr=0.5,
    )
    lengths = [30, 5, 9, 28, 6, 31, 12, 4, 25, 8, 17, 3]  # ragged: micro-batches hold unequal token counts
    Trainer(model, config, train_data=byte_dataset(lengths), loss_fn=loss_fn, collate_fn=PadToLongest()).fit()
    return {key: value.clone() for key, value in model.state_dict().items()}


def test_workers_hand_the_collated_rows_over_unchanged(tmp_path):
    # The path of a transformers user: a datasets.Dataset, a padding collate run in the workers, dict batches
    # sent back by value (steadyfit.worker_transfer); the weights equal those of a run without workers.
    weights = []
    for workers in (0, 2):
        model = tiny_gpt2()
        config = make_config(tmp_path, f"workers{workers}", max_steps=4, batch_size=3, num_workers=workers)
        lengths = [30, 5, 9, 28, 6, 31, 12, 4, 25, 8, 17, 3]
        Trainer(model, config, train_data=byte_dataset(lengths), collate_fn=PadToLongest()).fit()
        weights.append(model.state_dict())
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_token_level_accumulation_is_exact_with_ragged_padding(tmp_path):
    large = _train_ragged(tmp_path, "large", causal_lm_loss, batch_size=4, grad_accum_steps=1)
    accumulated = _train_ragged(tmp_path, "accumulated", causal_lm_loss, batch_size=2, grad_accum_steps=2)
    for key in large:
        torch.testing.assert_close(accumulated[key], large[key], rtol=1e-4, atol=1e-6, msg=key)


def test_the_models_own_loss_is_token_exact_under_accumulation(tmp_path):
    # loss_fn=None: GPT-2's outputs.loss is a mean over one micro-batch's tokens. Weighted by samples it
    # differs from batch_size=8 by 0.14 in the weights; normalised over the window's tokens, by rounding.
    large = _train_ragged(tmp_path, "large", None, batch_size=8, grad_accum_steps=1)
    accumulated = _train_ragged(tmp_path, "accumulated", None, batch_size=2, grad_accum_steps=4)
    for key in large:
        torch.testing.assert_close(accumulated[key], large[key], rtol=2e-5, atol=2e-5, msg=key)


def test_eval_loss_of_the_models_own_loss_is_independent_of_eval_batch_size(tmp_path):
    model = tiny_gpt2()
    # A row of one token predicts nothing: alone in a batch, the model's own mean is 0/0 = NaN.
    lengths = [30, 5, 9, 28, 6, 31, 12, 4, 25, 8, 17, 3, 22, 11, 1, 19, 27, 7, 14, 10, 26, 13, 16]
    eval_data = byte_dataset(lengths)
    scores = {}
    for eval_batch_size in (1, 7, 64):
        config = make_config(tmp_path, f"eval{eval_batch_size}", max_steps=1, eval_batch_size=eval_batch_size)
        trainer = Trainer(model, config, eval_data=eval_data, collate_fn=PadToLongest())
        scores[eval_batch_size] = trainer.evaluate()["eval_loss"]
    # The reference: the token mean over the whole set in one forward.
    with torch.no_grad():
        batch = PadToLongest()([eval_data[i] for i in range(len(lengths))])
        total, count = causal_lm_loss(model(**batch), batch["labels"])
    for eval_batch_size, score in scores.items():
        assert score == pytest.approx(float(total / count), rel=1e-6), eval_batch_size


def test_the_models_own_loss_normalises_by_shift_labels_when_given():
    # ForCausalLMLoss takes `shift_labels` instead of shifting `labels`: the count must follow it.
    from steadyfit.loss import ModelLoss

    model = tiny_gpt2()
    rows = [{"input_ids": list(TEXT[:12]), "labels": list(TEXT[:12])}]
    rows.append({"input_ids": list(TEXT[20:27]), "labels": list(TEXT[20:27])})
    batch = PadToLongest()(rows)  # GPT-2 computes a loss only when given labels; shift_labels win
    shift_labels = torch.full_like(batch["input_ids"], -100)
    shift_labels[:, :4] = batch["input_ids"][:, 1:5]  # 4 predicted tokens per row
    batch["shift_labels"] = shift_labels
    with torch.no_grad():
        outputs = model(**batch)
    total, count = ModelLoss.of(model)(outputs, batch)
    assert int(count) == 8
    torch.testing.assert_close(total / count, outputs.loss)


@pytest.mark.parametrize(
    ("model_class", "kind"),
    [
        ("GPT2LMHeadModel", "next_token"),  # loss_type None, but its forward calls ForCausalLMLoss
        ("GPT2ForSequenceClassification", "sample"),
        ("GPT2DoubleHeadsModel", "unknown"),  # computes a sum of two losses in its own code
    ],
)
def test_model_loss_kind_follows_the_loss_the_model_computes(model_class, kind):
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=64, n_positions=32)
    assert model_loss_kind(getattr(transformers, model_class)(config)) == kind


def tiny_bert(cls, seed: int = 0, **config_fields):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        **config_fields,
    )
    return cls(config)


def classification_rows(num_rows: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1, 64, (num_rows, 10), generator=generator)
    labels = (input_ids[:, 0] % 3).long()
    return [{"input_ids": ids, "labels": label} for ids, label in zip(input_ids, labels, strict=True)]


def test_metrics_receive_the_logits_of_a_model_output(tmp_path):
    model = tiny_bert(transformers.BertForSequenceClassification, num_labels=3)
    rows = classification_rows(23, seed=1)
    config = make_config(tmp_path, "run", max_steps=1, eval_batch_size=5)
    trainer = Trainer(model, config, eval_data=rows, metrics={"accuracy": accuracy})
    scores = trainer.evaluate()  # before: 'SequenceClassifierOutput' object has no attribute 'argmax'
    with torch.no_grad():
        logits = model(input_ids=torch.stack([row["input_ids"] for row in rows])).logits
    labels = torch.stack([row["labels"] for row in rows])
    assert scores["eval_accuracy"] == pytest.approx(float((logits.argmax(-1) == labels).sum()) / 23, rel=1e-9)


def test_predict_returns_one_model_output_with_a_row_per_sample(tmp_path):
    model = tiny_bert(transformers.BertForSequenceClassification, num_labels=3)
    rows = classification_rows(23, seed=2)
    config = make_config(tmp_path, "run", max_steps=1, eval_batch_size=5)
    outputs = Trainer(model, config).predict(rows)
    assert type(outputs) is transformers.modeling_outputs.SequenceClassifierOutput
    assert "loss" not in outputs  # one mean per batch, not per sample: left out
    with torch.no_grad():
        expected = model(input_ids=torch.stack([row["input_ids"] for row in rows])).logits
    assert outputs.logits.shape == (23, 3)
    torch.testing.assert_close(outputs.logits, expected)


def test_predict_concatenates_tuple_fields_element_by_element(tmp_path):
    model = tiny_bert(transformers.BertForSequenceClassification, num_labels=3, output_hidden_states=True)
    rows = [{"input_ids": row["input_ids"]} for row in classification_rows(11, seed=3)]
    outputs = Trainer(model, make_config(tmp_path, "run", max_steps=1, eval_batch_size=4)).predict(rows)
    assert len(outputs.hidden_states) == 2  # embeddings and the one layer
    assert all(hidden.shape == (11, 10, 16) for hidden in outputs.hidden_states)


def test_pad_to_longest_pads_labels_with_ignore_index():
    batch = PadToLongest(pad_token_id=7)(
        [{"input_ids": [1, 2, 3], "labels": [1, 2, 3], "id": 0}, {"input_ids": [4], "labels": [4], "id": 1}]
    )
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7]]
    assert batch["labels"].tolist() == [[1, 2, 3], [4, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["id"].tolist() == [0, 1]


def word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (no download): [PAD] is 0, the words w0..w39 follow."""
    tokenizers = pytest.importorskip("tokenizers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(40)]
    model = tokenizers.models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="[UNK]")
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", mask_token="[MASK]"
    )


def word_rows(tokenizer, num_rows: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (num_rows,), generator=generator).tolist()
    return [
        dict(tokenizer(" ".join(f"w{int(i)}" for i in torch.randint(0, 40, (n,), generator=generator))))
        for n in lengths
    ]


def test_a_transformers_collator_batches_fit_evaluate_and_predict(tmp_path):
    # DataCollatorForLanguageModeling returns a BatchEncoding: a UserDict, not a dict. It must be the same
    # batch to every part of the loop as the dict it holds.
    tokenizer = word_tokenizer()
    collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    rows = word_rows(tokenizer, 24, seed=0)
    assert not isinstance(collator(rows[:2]), dict)
    results = {}
    for name, collate_fn in (("batch_encoding", collator), ("dict", lambda rows: dict(collator(rows)))):
        model = tiny_gpt2()
        config = make_config(tmp_path, name, max_steps=4, batch_size=4, grad_accum_steps=2, eval_batch_size=5)
        trainer = Trainer(model, config, train_data=rows, eval_data=rows[:11], collate_fn=collate_fn)
        trainer.fit()
        results[name] = (model.state_dict(), trainer.evaluate(), trainer.predict(rows[:6]).logits)
    (weights, scores, logits), (dict_weights, dict_scores, dict_logits) = results.values()
    for key in weights:
        assert torch.equal(weights[key], dict_weights[key]), key
    assert scores == dict_scores
    assert torch.equal(logits, dict_logits)


def test_token_accuracy_over_padded_labels_is_independent_of_eval_batch_size(tmp_path):
    # DataCollatorForTokenClassification pads labels with -100: padding must count neither as right nor as
    # wrong, or the score moves with how much padding the batches hold.
    tokenizer = word_tokenizer()
    rows = [
        {**row, "labels": [token % 3 for token in row["input_ids"]]}
        for row in word_rows(tokenizer, 13, seed=1)
    ]
    model = tiny_bert(transformers.BertForTokenClassification, num_labels=3)
    collator = transformers.DataCollatorForTokenClassification(tokenizer)
    scores = []
    for eval_batch_size in (1, 4, 13):
        config = make_config(tmp_path, f"eval{eval_batch_size}", max_steps=1, eval_batch_size=eval_batch_size)
        trainer = Trainer(model, config, eval_data=rows, collate_fn=collator, metrics={"accuracy": accuracy})
        scores.append(trainer.evaluate()["eval_accuracy"])
    correct = total = 0
    with torch.no_grad():
        for row in rows:
            predicted = model(input_ids=torch.tensor([row["input_ids"]])).logits.argmax(-1)[0]
            correct += int((predicted == torch.tensor(row["labels"])).sum())
            total += len(row["labels"])
    assert scores == [pytest.approx(correct / total, rel=1e-12)] * 3


def test_a_label_column_without_labels_is_named_in_the_missing_loss_error(tmp_path):
    model = tiny_bert(transformers.BertForSequenceClassification, num_labels=3)
    rows = [{"input_ids": row["input_ids"], "label": row["labels"]} for row in classification_rows(8, seed=4)]
    config = make_config(tmp_path, "run", max_steps=1, batch_size=4)
    with pytest.raises(
        Exception, match=r"has a 'label' key but no 'labels'.*rename_column\('label', 'labels'\)"
    ):
        Trainer(model, config, train_data=rows).fit()


def test_rows_of_python_lists_without_a_collator_are_named_with_the_fix(tmp_path):
    model = tiny_bert(transformers.BertForSequenceClassification, num_labels=3)
    rows = [{"input_ids": list(range(8)), "labels": 1} for _ in range(8)]
    config = make_config(tmp_path, "run", max_steps=1, batch_size=4)
    with pytest.raises(Exception, match=r"input_ids: rows of Python lists, not tensors; give a collate_fn"):
        Trainer(model, config, train_data=rows).fit()


def test_a_text_column_left_in_a_dataset_is_named_with_the_fix(tmp_path):
    # The Hugging Face Trainer drops columns forward() does not take; steadyfit passes every column, so the
    # text column a tokenizing map() leaves behind reaches the padding collator, which cannot make a tensor
    # of it. The error names the column and the way out, for train_data and eval_data alike.
    tokenizer = word_tokenizer()
    texts = [" ".join(f"w{(7 * i + j) % 40}" for j in range(2 + i % 5)) for i in range(8)]
    dataset = datasets.Dataset.from_dict({"text": texts, "labels": [i % 3 for i in range(8)]})
    dataset = dataset.map(lambda rows: tokenizer(rows["text"]), batched=True)
    collator = transformers.DataCollatorWithPadding(tokenizer)
    model = tiny_bert(transformers.BertForSequenceClassification, num_labels=3)
    fix = r"text columns 'text': .*dataset\.remove_columns\(\['text'\]\)"
    config = make_config(tmp_path, "train", max_steps=1, batch_size=4)
    with pytest.raises(BatchError, match=rf"train_data: micro-batch 0 .*{fix}"):
        Trainer(model, config, train_data=dataset, collate_fn=collator).fit()
    config = make_config(tmp_path, "eval", max_steps=1, eval_batch_size=4)
    with pytest.raises(BatchError, match=rf"eval_data: batch 0 .*{fix}"):
        Trainer(model, config, eval_data=dataset, collate_fn=collator).evaluate()
    tokens_only = dataset.remove_columns(["text"])
    trainer = Trainer(
        model,
        make_config(tmp_path, "fixed", max_steps=1, batch_size=4),
        train_data=tokens_only,
        collate_fn=collator,
    )
    assert trainer.fit().global_step == 1
