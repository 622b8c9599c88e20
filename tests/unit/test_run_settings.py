"""The settings Hugging Face and Lightning users reach for daily: keep_best, eval_on_start, fast_dev_run,
limit_train_batches / limit_eval_batches / overfit_batches (Lightning's meaning) and
gradient_checkpointing; each test fails when its setting is ignored."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import base_config, make_mlp, make_regression
from steadyfit import Callback, ConfigError, TrainConfig, Trainer, seed_everything
from steadyfit.evaluation import check_eval_settings

CE = torch.nn.functional.cross_entropy
# One score per evaluation, exact in float32; the three best are at steps 2, 5 and 4.
SCORES = [0.25, 0.875, 0.125, 0.5, 0.75, 0.0625, 0.375]


def _rows(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row.get("kind") == kind]


class ScriptedScore:
    """A metric whose value at the i-th evaluation is ``values[i]`` (one eval batch per evaluation)."""

    def __init__(self, values):
        self.values = list(values)
        self.calls = 0

    def __call__(self, outputs, targets):
        value = self.values[self.calls]
        self.calls += 1
        return torch.tensor(value)


def _scored_run(tmp_path, scores, **overrides):
    overrides.setdefault("max_steps", len(scores))
    config = base_config(
        tmp_path,
        batch_size=8,
        max_epochs=None,
        eval_every=1,
        save_every=1,
        eval_batch_size=64,
        metric_for_best="score",
        greater_is_better=True,
        **overrides,
    )
    trainer = Trainer(
        make_mlp(),
        config,
        train_data=make_regression(64),
        eval_data=make_regression(16, seed=1),
        loss_fn=CE,
        metrics={"score": ScriptedScore(scores)},
    )
    return trainer, trainer.fit()


def test_keep_best_keeps_the_k_best_checkpoints_beside_the_newest(tmp_path):
    trainer, result = _scored_run(tmp_path, SCORES, keep_last=1, keep_best=3)
    kept = sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir())
    # The three best scores were at steps 2, 5 and 4; the newest is step 7.
    assert kept == ["step-00000002", "step-00000004", "step-00000005", "step-00000007"]
    assert trainer.state.kept_best == [[2, 0.875], [5, 0.75], [4, 0.5]]
    assert result.best_step == 2 and result.best_checkpoint.endswith("step-00000002")


def test_keep_best_one_keeps_only_the_best_as_before(tmp_path):
    _scored_run(tmp_path, SCORES[:5], keep_last=1, keep_best=1)
    kept = sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-00000002", "step-00000005"]


def test_keep_best_survives_a_resume(tmp_path):
    first, _ = _scored_run(tmp_path, SCORES[:4], keep_last=1, keep_best=2)
    assert first.state.kept_best == [[2, 0.875], [4, 0.5]]
    # Extending the run resumes at step 4 and evaluates steps 5-7 with the scores that follow.
    trainer, _ = _scored_run(tmp_path, SCORES[4:], keep_last=1, keep_best=2, max_steps=7)
    assert trainer.state.kept_best == [[2, 0.875], [5, 0.75]]
    kept = sorted(path.name for path in (tmp_path / "run" / "checkpoints").iterdir())
    assert kept == ["step-00000002", "step-00000005", "step-00000007"]


class StepOf(Callback):
    def __init__(self):
        self.events = []

    def on_evaluate(self, trainer, state, metrics):
        self.events.append(("evaluate", state.step))

    def on_step_end(self, trainer, state):
        self.events.append(("step", state.step))


def test_eval_on_start_evaluates_before_the_first_step_and_is_never_the_best(tmp_path):
    # The untrained model scores best here; it must not become the best checkpoint (there is none at 0).
    events = StepOf()
    config = base_config(
        tmp_path,
        batch_size=8,
        eval_batch_size=64,
        eval_on_start=True,
        metric_for_best="score",
        greater_is_better=True,
    )
    trainer = Trainer(
        make_mlp(),
        config,
        train_data=make_regression(32),
        eval_data=make_regression(16, seed=1),
        loss_fn=CE,
        metrics={"score": ScriptedScore([1.0, 0.5])},
        callbacks=[events],
    )
    result = trainer.fit()
    assert events.events[0] == ("evaluate", 0) and events.events[1] == ("step", 1)
    assert [row["step"] for row in _rows(tmp_path / "run", "eval")] == [0, 4]
    assert result.best_step == 4


def test_eval_on_start_without_eval_data_is_an_error():
    with pytest.raises(ConfigError, match="eval_on_start"):
        check_eval_settings(TrainConfig(eval_on_start=True), None)


def test_fast_dev_run_trains_n_batches_evaluates_n_and_leaves_run_dir_untouched(tmp_path, capfd):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("a real run's notes")
    config = base_config(tmp_path, batch_size=4, max_epochs=5, fast_dev_run=2, eval_batch_size=4)
    metric_calls = ScriptedScore([0.0] * 10)
    trainer = Trainer(
        make_mlp(),
        config,
        train_data=make_regression(64),
        eval_data=make_regression(40, seed=1),
        loss_fn=CE,
        metrics={"calls": metric_calls},
    )
    result = trainer.fit()
    assert result.global_step == 2 and result.epoch == 1
    assert metric_calls.calls == 2  # two eval batches of ten
    assert sorted(path.name for path in run_dir.iterdir()) == ["notes.txt"]
    assert not (tmp_path / "run" / "checkpoints").exists()
    scratch = trainer.run_directory.path
    assert not scratch.exists(), "the scratch directory is removed"
    assert "fast_dev_run" in capfd.readouterr().err


def _record_inputs(model):
    seen = []
    model.register_forward_pre_hook(
        lambda module, args: seen.append(args[0].clone()) if module.training else None
    )
    return seen


@pytest.mark.parametrize(("limit", "steps_per_epoch"), [(3, 3), (0.5, 4)])
def test_limit_train_batches_trains_the_first_batches_of_each_epoch(tmp_path, limit, steps_per_epoch):
    data = make_regression(64)  # 8 batches of 8
    seed_everything(0)
    model = make_mlp()
    seen = _record_inputs(model)
    config = base_config(tmp_path / "limited", batch_size=8, max_epochs=2, limit_train_batches=limit)
    trainer = Trainer(model, config, train_data=data, loss_fn=CE)
    result = trainer.fit()
    assert trainer.horizons.steps_per_epoch == steps_per_epoch
    assert result.global_step == 2 * steps_per_epoch
    # The same batches as the first ones of a full run's epochs.
    full_model = make_mlp()
    full_seen = _record_inputs(full_model)
    full = Trainer(
        full_model, base_config(tmp_path / "full", batch_size=8, max_epochs=2), train_data=data, loss_fn=CE
    )
    full.fit()
    expected = full_seen[:steps_per_epoch] + full_seen[8 : 8 + steps_per_epoch]
    assert len(seen) == len(expected)
    assert all(torch.equal(a, b) for a, b in zip(seen, expected, strict=True))


def test_a_limit_never_lets_a_window_cross_it(tmp_path):
    # 5 batches with accumulation 2: windows of 2, 2 and 1, never a sixth batch.
    model = make_mlp()
    seen = _record_inputs(model)
    config = base_config(tmp_path, batch_size=8, grad_accum_steps=2, limit_train_batches=5)
    result = Trainer(model, config, train_data=make_regression(64), loss_fn=CE).fit()
    assert len(seen) == 5 and result.global_step == 3


def test_limit_eval_batches_evaluates_the_first_batches_exactly(tmp_path):
    data, held_out = make_regression(32), make_regression(40, seed=1)
    config = base_config(tmp_path, batch_size=8, eval_batch_size=8, limit_eval_batches=3, eval_every=0)
    trainer = Trainer(make_mlp(), config, train_data=data, eval_data=held_out, loss_fn=CE)
    limited = trainer.evaluate()
    subset = torch.utils.data.TensorDataset(*(tensor[:24] for tensor in held_out.tensors))
    unlimited = Trainer(make_mlp(), base_config(tmp_path / "b", batch_size=8), train_data=data, loss_fn=CE)
    assert limited == unlimited.evaluate(subset)


def test_overfit_batches_trains_on_the_same_first_batches_every_epoch(tmp_path):
    data = make_regression(64)
    model = make_mlp()
    seen = _record_inputs(model)
    config = base_config(tmp_path, batch_size=8, max_epochs=3, overfit_batches=2)
    Trainer(model, config, train_data=data, eval_data=make_regression(40, seed=1), loss_fn=CE).fit()
    first_two = [data.tensors[0][:8], data.tensors[0][8:16]]  # dataset order, not shuffled
    assert len(seen) == 6
    assert all(torch.equal(a, b) for a, b in zip(seen, first_two * 3, strict=True))


def test_an_overfit_fraction_that_keeps_no_eval_batch_names_overfit_batches(tmp_path):
    # overfit_batches limits evaluation too; the error must name the field the user set.
    data = make_regression(64)
    config = base_config(tmp_path, batch_size=2, eval_batch_size=16, overfit_batches=0.1)
    with pytest.raises(ConfigError, match=r"^overfit_batches: 0\.1 of 4 eval batches keeps none"):
        Trainer(make_mlp(), config, train_data=data, eval_data=data, loss_fn=CE).fit()


def test_a_max_steps_that_the_default_max_epochs_cuts_short_is_warned_about(tmp_path, capsys):
    data = make_regression(64)
    config = TrainConfig(run_dir=str(tmp_path / "a"), max_steps=100, batch_size=16, progress=False)
    assert Trainer(make_mlp(), config, train_data=data, loss_fn=CE).fit().global_step == 12
    assert "max_steps=100, but max_epochs=3 (its default) ends the run at step 12" in capsys.readouterr().err
    # Both given: the user chose whichever comes first.
    config = TrainConfig(
        run_dir=str(tmp_path / "b"), max_steps=100, max_epochs=3, batch_size=16, progress=False
    )
    Trainer(make_mlp(), config, train_data=data, loss_fn=CE).fit()
    assert "max_steps=" not in capsys.readouterr().err


class Stream(torch.utils.data.IterableDataset):
    def __init__(self, data):
        self.data = data

    def __iter__(self):
        return iter(self.data)


def test_a_max_steps_over_data_without_a_length_is_warned_about_the_default_max_epochs(tmp_path, capsys):
    # 64 samples in batches of 16: 4 steps a pass, so the default 3 passes end the run at step 12 of 100.
    config = TrainConfig(run_dir=str(tmp_path / "a"), max_steps=100, batch_size=16, progress=False)
    trainer = Trainer(make_mlp(), config, train_data=Stream(make_regression(64)), loss_fn=CE)
    assert trainer.fit().global_step == 12
    assert "max_steps=100, but max_epochs=3 (its default) also ends the run" in capsys.readouterr().err
    config = config.model_copy(update={"run_dir": str(tmp_path / "b"), "max_epochs": None})
    assert (
        Trainer(make_mlp(), config, train_data=Stream(make_regression(64)), loss_fn=CE).fit().global_step
        == 100
    )


def test_overfit_batches_refuses_a_shuffling_dataloader(tmp_path):
    loader = torch.utils.data.DataLoader(make_regression(64), batch_size=8, shuffle=True)
    with pytest.raises(ConfigError, match="overfit_batches: the DataLoader passed as train_data shuffles"):
        Trainer(make_mlp(), base_config(tmp_path, overfit_batches=2), train_data=loader, loss_fn=CE)


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(16, 16)
        self.dropout = torch.nn.Dropout(0.3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.dropout(torch.tanh(self.linear(x)))


def _block_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), Block(), Block(), torch.nn.Linear(16, 3))


def test_gradient_checkpointing_recomputes_named_blocks_with_the_same_gradients(tmp_path):
    weights, calls = [], []
    for setting in (False, ["Block"]):
        seed_everything(0)
        model = _block_model()
        config = base_config(tmp_path / str(bool(setting)), batch_size=8, gradient_checkpointing=setting)
        Trainer(model, config, train_data=make_regression(32), loss_fn=CE).fit()
        weights.append(model.state_dict())
        calls.append(model[1].calls)
    assert calls == [4, 8], "each block runs again in the backward pass"
    for key, value in weights[0].items():
        assert torch.equal(value, weights[1][key]), key


def test_gradient_checkpointing_names_what_it_cannot_apply(tmp_path):
    for setting, message in ((["Missing"], "no submodule of class Missing"), (True, "has none")):
        config = base_config(tmp_path, gradient_checkpointing=setting)
        with pytest.raises(ConfigError, match=message):
            Trainer(_block_model(), config, train_data=make_regression(32), loss_fn=CE).fit()


def test_gradient_checkpointing_true_uses_a_hugging_face_models_own_switch(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
    model = transformers.GPT2LMHeadModel(config)
    ids = torch.randint(0, 32, (8, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    train = base_config(tmp_path, batch_size=4, gradient_checkpointing=True)
    Trainer(model, train, train_data=data).fit()
    assert any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def test_fast_dev_run_ignores_the_warm_up_a_one_step_run_cannot_have(tmp_path):
    config = base_config(tmp_path, batch_size=8, fast_dev_run=True, scheduler="cosine", warmup_ratio=0.1)
    assert Trainer(make_mlp(), config, train_data=make_regression(64), loss_fn=CE).fit().global_step == 1


def test_a_limit_that_cannot_apply_to_the_eval_data_fails_before_training(tmp_path):
    # 16 samples in batches of 8: a tenth of two batches keeps none.
    steps = StepOf()
    config = base_config(tmp_path, batch_size=8, limit_eval_batches=0.1)
    trainer = Trainer(
        make_mlp(),
        config,
        train_data=make_regression(64),
        eval_data=make_regression(16, seed=1),
        loss_fn=CE,
        callbacks=[steps],
    )
    with pytest.raises(ConfigError, match=r"limit_eval_batches: 0\.1 of 2 batches keeps none"):
        trainer.fit()
    assert steps.events == []


def test_overfit_batches_refuses_a_shuffling_batch_sampler(tmp_path):
    data = make_regression(64)
    sampler = torch.utils.data.BatchSampler(torch.utils.data.RandomSampler(data), 8, drop_last=False)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler)
    with pytest.raises(ConfigError, match="overfit_batches"):
        Trainer(make_mlp(), base_config(tmp_path, overfit_batches=2), train_data=loader, loss_fn=CE)


def test_lr_find_leaves_the_evaluation_and_debug_settings_out(tmp_path):
    from steadyfit.lr_finder import find_lr

    config = base_config(tmp_path, eval_on_start=True, limit_eval_batches=2, fast_dev_run=True)
    result = find_lr(make_mlp(), make_regression(64), loss_fn=CE, config=config, num_steps=12, max_lr=1.0)
    assert len(result.lrs) == 12


def test_gradient_checkpointing_of_hugging_face_blocks_turns_the_cache_off(tmp_path):
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 32, (8, 8), generator=torch.Generator().manual_seed(0))
    data = [{"input_ids": row, "labels": row} for row in ids]
    weights = []
    for setting in (False, ["GPT2Block"]):
        torch.manual_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=32, n_positions=16)
        model = transformers.GPT2LMHeadModel(config)
        train = base_config(tmp_path / str(bool(setting)), batch_size=4, gradient_checkpointing=setting)
        Trainer(model, train, train_data=data).fit()
        weights.append(model.state_dict())
    # The same dropout masks (the recomputed forward replays the RNG); the backward's sums may round apart.
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=1e-6)


def test_deterministic_holds_during_fit_and_not_after(tmp_path):
    seen = []

    class Watch(Callback):
        def on_step_end(self, trainer, state):
            seen.append(torch.are_deterministic_algorithms_enabled())

    config = base_config(tmp_path, deterministic=True, max_steps=2, max_epochs=None, batch_size=8)
    Trainer(make_mlp(), config, train_data=make_regression(32), loss_fn=CE, callbacks=[Watch()]).fit()
    assert seen == [True, True]
    assert not torch.are_deterministic_algorithms_enabled(), "a later Trainer or the user's code inherits it"
