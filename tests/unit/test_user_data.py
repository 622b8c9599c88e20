"""What a user's own data meets: a DataLoader's sampler is told the epoch (and resumes mid-epoch to the same
order), the config records the batch size the loader really uses, settings that cannot apply are errors,
and a batch that fails to load, or whose forward or loss raises, is named with its step, epoch, index,
dtypes and shapes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch.utils.data import ConcatDataset, DataLoader, DistributedSampler, TensorDataset

from helpers import assert_bitwise_equal, base_config, final_weights, make_mlp, make_regression
from steadyfit import BatchError, Callback, ConfigError, TrainConfig, Trainer
from steadyfit.loss import LossContractError


class SeenInputs:
    """Records the first feature of every sample the model sees, per forward."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seen: list[list[float]] = []
        model.register_forward_hook(lambda _m, args, _out: self.seen.append(args[0][:, 0].tolist()))


def _indexed_data(n: int = 16) -> TensorDataset:
    inputs, targets = make_regression(n).tensors
    inputs = inputs.clone()
    inputs[:, 0] = torch.arange(n, dtype=torch.float32)  # the sample's index, so orders can be read back
    return TensorDataset(inputs, targets)


def _loader(data: TensorDataset) -> DataLoader:
    return DataLoader(data, batch_size=4, sampler=DistributedSampler(data, num_replicas=1, rank=0, seed=3))


def test_a_distributed_sampler_is_told_each_epoch_like_a_hand_written_loop(tmp_path):
    data = _indexed_data()
    reference_model = make_mlp()
    reference = SeenInputs(reference_model)
    optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.1)
    loader = _loader(data)
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        for inputs, targets in loader:
            optimizer.zero_grad()
            F.cross_entropy(reference_model(inputs), targets).backward()
            optimizer.step()

    model = make_mlp()
    seen = SeenInputs(model)
    config = base_config(tmp_path, max_epochs=3, optimizer="sgd", lr=0.1)
    Trainer(model, config, train_data=_loader(data), loss_fn=F.cross_entropy).fit()
    assert seen.seen == reference.seen
    epochs = [[index for batch in seen.seen[i * 4 : (i + 1) * 4] for index in batch] for i in range(3)]
    assert epochs[0] != epochs[1] != epochs[2], "each epoch draws its own order"
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, reference_model.state_dict()[name], atol=1e-6), name


class ShuffledStream(torch.utils.data.IterableDataset):
    """An IterableDataset whose order is drawn from its seed and the epoch it is told, as a Hugging Face
    streaming dataset's ``shuffle`` draws it (``set_epoch``)."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        order = torch.randperm(len(self.data), generator=torch.Generator().manual_seed(3 + self.epoch))
        return (self.data[index] for index in order.tolist())


@pytest.mark.parametrize("wrapped", [False, True])
def test_an_iterable_dataset_is_told_each_epoch(tmp_path, wrapped):
    data = _indexed_data()
    model = make_mlp()
    seen = SeenInputs(model)
    stream = ShuffledStream(data)
    train = DataLoader(stream, batch_size=4) if wrapped else stream
    config = base_config(tmp_path, max_epochs=3, max_steps=12, batch_size=4, optimizer="sgd", lr=0.1)
    Trainer(model, config, train_data=train, loss_fn=F.cross_entropy).fit()
    epochs = [[index for batch in seen.seen[i * 4 : (i + 1) * 4] for index in batch] for i in range(3)]
    expected = [torch.randperm(16, generator=torch.Generator().manual_seed(3 + e)).tolist() for e in range(3)]
    assert epochs == [[float(index) for index in order] for order in expected]


def test_a_user_loader_with_persistent_workers_is_warned_about_resume(tmp_path, capfd):
    # Its workers' random streams run on across epochs; a resumed run starts new ones.
    data = make_regression(16)
    kept = DataLoader(data, batch_size=4, num_workers=1, persistent_workers=True)
    Trainer(make_mlp(), base_config(tmp_path), train_data=kept, eval_data=kept, loss_fn=F.cross_entropy)
    err = capfd.readouterr().err
    assert "train_data: the DataLoader's persistent_workers=True" in err and "after the first epoch" in err
    assert "eval_data" not in err, "an eval set rarely augments: no warning for every eval loader"
    fresh = DataLoader(data, batch_size=4, num_workers=1)
    Trainer(make_mlp(), base_config(tmp_path), train_data=fresh, loss_fn=F.cross_entropy)
    assert "persistent_workers" not in capfd.readouterr().err


class CrashAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, state) -> None:
        if state.step == self.step:
            raise RuntimeError("crash")


def test_a_user_loader_with_a_distributed_sampler_resumes_mid_epoch_bitwise(tmp_path):
    data = _indexed_data(24)

    def fit(run_dir, callbacks=()):
        config = base_config(
            tmp_path, run_dir=str(run_dir), max_epochs=3, save_every=4, optimizer="adamw", lr=0.01
        )
        Trainer(
            make_mlp(), config, train_data=_loader(data), loss_fn=F.cross_entropy, callbacks=callbacks
        ).fit()

    fit(tmp_path / "clean")
    with pytest.raises(RuntimeError, match="crash"):
        fit(tmp_path / "resumed", [CrashAt(10)])  # epoch 1 (6 steps an epoch), after the step-8 checkpoint
    fit(tmp_path / "resumed")
    assert_bitwise_equal(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "clean"))


class _AugmentedStream(torch.utils.data.IterableDataset):
    """An IterableDataset that adds noise drawn from torch's stream of the process that iterates it."""

    def __init__(self, data: TensorDataset) -> None:
        self.data = data

    def __iter__(self):
        for inputs, target in self.data:
            yield inputs + 0.1 * torch.randn_like(inputs), target


class BucketBatches(torch.utils.data.Sampler):
    """A custom batch sampler that draws each epoch's order from a generator of its own, named as it likes."""

    def __init__(self, n: int, batch_size: int) -> None:
        self.n, self.batch_size = n, batch_size
        self.rng = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self):
        order = torch.randperm(self.n, generator=self.rng).tolist()
        return iter([order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)])


def test_streams_kept_before_every_sampler_generator_was_found_still_restore():
    # Checkpoints written before held the `.generator`s alone: the loader's own, not BucketBatches' rng.
    from steadyfit.data import capture_streams, restore_streams

    loader = DataLoader(
        _indexed_data(24), batch_sampler=BucketBatches(24, 4), generator=torch.Generator().manual_seed(1)
    )
    streams = capture_streams(loader)
    assert len(streams["generators"]) == 2
    restore_streams(loader, {"global": streams["global"], "generators": streams["generators"][:1]})


_ORDERS_NOT_OURS = {
    "shuffling DataLoader": lambda data: DataLoader(data, batch_size=4, shuffle=True),
    "shuffling DataLoader with a generator": lambda data: DataLoader(
        data, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(5)
    ),
    "DataLoader with a DistributedSampler": _loader,
    "shuffling DataLoader with a worker": lambda data: DataLoader(
        data, batch_size=4, shuffle=True, num_workers=1
    ),
    "batch sampler with a generator of its own": lambda data: DataLoader(
        data, batch_sampler=BucketBatches(len(data), 4)
    ),
    "augmenting IterableDataset": _AugmentedStream,
    "augmenting IterableDataset, 2 workers": _AugmentedStream,  # each worker streams all of it
}
_STEADYFIT_WORKERS = {"augmenting IterableDataset, 2 workers": {"num_workers": 2}}


@pytest.mark.parametrize("save_every", [4, 5])
@pytest.mark.parametrize("kind", list(_ORDERS_NOT_OURS))
def test_data_whose_order_is_not_ours_resumes_mid_epoch_bitwise(tmp_path, kind, save_every):
    # Iterating a DataLoader draws from torch's global stream (its base seed, a RandomSampler's seed, a
    # generator's), as does an IterableDataset that augments; a resume in the middle of an epoch must start
    # the epoch's loader from the streams the epoch started with, and leave the model's dropout where the
    # checkpoint left it.
    data = _indexed_data(24)
    crash_step = 2 * save_every + 1  # after the checkpoint of step 2 * save_every, in the epoch's middle

    def fit(run_dir, callbacks=()):
        config = base_config(
            tmp_path,
            run_dir=str(run_dir),
            max_epochs=None,
            max_steps=18,
            batch_size=4,
            save_every=save_every,
            optimizer="adamw",
            lr=0.01,
            **_STEADYFIT_WORKERS.get(kind, {}),
        )
        train_data = _ORDERS_NOT_OURS[kind](data)
        model = make_mlp(dropout=0.3)
        Trainer(model, config, train_data=train_data, loss_fn=F.cross_entropy, callbacks=callbacks).fit()

    fit(tmp_path / "clean")
    with pytest.raises(RuntimeError, match="crash"):
        fit(tmp_path / "resumed", [CrashAt(crash_step)])
    fit(tmp_path / "resumed")
    assert_bitwise_equal(final_weights(tmp_path / "resumed"), final_weights(tmp_path / "clean"))


def test_the_config_records_the_batch_size_and_workers_of_a_user_loader(tmp_path):
    loader = DataLoader(make_regression(50), batch_size=5, shuffle=False)
    trainer = Trainer(make_mlp(), base_config(tmp_path), train_data=loader, loss_fn=F.cross_entropy)
    trainer.fit()
    assert trainer.config.batch_size == 5
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["batch_size"] == 5
    eval_loader = DataLoader(make_regression(20), batch_size=7)
    trainer = Trainer(make_mlp(), base_config(tmp_path / "b"), train_data=loader, eval_data=eval_loader)
    assert trainer.config.eval_batch_size == 7


def test_an_explicit_batch_size_that_the_loader_contradicts_is_refused(tmp_path):
    loader = DataLoader(make_regression(50), batch_size=5)
    with pytest.raises(
        ConfigError, match=r"batch_size: 64, but the DataLoader passed as train_data has .* 5"
    ):
        Trainer(make_mlp(), base_config(tmp_path, batch_size=64), train_data=loader, loss_fn=F.cross_entropy)
    with pytest.raises(ConfigError, match=r"num_workers: 2, but the DataLoader"):
        Trainer(make_mlp(), base_config(tmp_path, num_workers=2), train_data=loader, loss_fn=F.cross_entropy)


def test_from_hf_leaves_a_user_loader_its_batch_size_unless_the_arguments_name_one(tmp_path):
    # TrainConfig.from_hf carries Hugging Face's defaults over (batch 8, no workers); a default the user never
    # touched must not refuse their own DataLoader, while a batch size they did choose still does.
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers 5 builds a TrainingArguments only with accelerate")
    loader = DataLoader(make_regression(50), batch_size=5, num_workers=1, persistent_workers=True)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True)
    config = TrainConfig.from_hf(args, max_steps=1, progress=False)
    trainer = Trainer(make_mlp(), config, train_data=loader, eval_data=loader, loss_fn=F.cross_entropy)
    assert (trainer.config.batch_size, trainer.config.num_workers) == (5, 1)
    assert (trainer.config.eval_batch_size, trainer.config.persistent_workers) == (5, True)
    for chosen, field in (
        ({"per_device_train_batch_size": 16}, "batch_size: 16"),
        ({"per_device_eval_batch_size": 16}, "eval_batch_size: 16"),
        ({"dataloader_num_workers": 2}, "num_workers: 2"),
    ):
        args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), use_cpu=True, **chosen)
        with pytest.raises(ConfigError, match=f"{field}, but the DataLoader"):
            Trainer(make_mlp(), TrainConfig.from_hf(args), train_data=loader, eval_data=loader)
    # An override is the user's choice too.
    with pytest.raises(ConfigError, match="batch_size: 8, but the DataLoader"):
        Trainer(make_mlp(), TrainConfig.from_hf(args, batch_size=8, num_workers=1), train_data=loader)


def test_eval_and_predict_data_that_would_leave_samples_out_are_refused(tmp_path):
    # Guarantee 6: scores over the whole set whatever the batch size. A drop_last loader scored 20 of 23
    # samples at batch 5 and none (NaN) at batch 64, silently.
    data = make_regression(23)
    dropping = DataLoader(data, batch_size=5, drop_last=True)
    message = r"the DataLoader drops its last incomplete batch \(drop_last=True\)"
    with pytest.raises(ConfigError, match=rf"^eval_data: {message}"):
        Trainer(make_mlp(), base_config(tmp_path), eval_data=dropping, loss_fn=F.cross_entropy)
    trainer = Trainer(make_mlp(), base_config(tmp_path), eval_data=data, loss_fn=F.cross_entropy)
    with pytest.raises(ConfigError, match=rf"^evaluate\(data\): {message}"):
        trainer.evaluate(dropping)
    with pytest.raises(ConfigError, match=rf"^predict\(data\): {message}"):
        trainer.predict(dropping)
    with pytest.raises(ConfigError, match=r"^eval_data: it holds no sample"):
        Trainer(make_mlp(), base_config(tmp_path), eval_data=make_regression(0), loss_fn=F.cross_entropy)
    # A DistributedSampler evens out the ranks by repeating samples (23 over 2 ranks: one twice).
    padded = DataLoader(data, batch_size=5, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    with pytest.raises(ConfigError, match=r"^eval_data: its DistributedSampler repeats 1 sample\(s\)"):
        Trainer(make_mlp(), base_config(tmp_path), eval_data=padded, loss_fn=F.cross_entropy)


def test_eval_every_without_eval_data_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="eval_every: 5, but the Trainer has no eval_data"):
        Trainer(
            make_mlp(),
            base_config(tmp_path, eval_every=5),
            train_data=make_regression(),
            loss_fn=F.cross_entropy,
        )


def _fit(tmp_path, train_data, eval_data=None, **overrides):
    config = base_config(tmp_path, batch_size=4, **overrides)
    return Trainer(
        make_mlp(), config, train_data=train_data, eval_data=eval_data, loss_fn=F.cross_entropy
    ).fit()


def test_a_forward_that_raises_names_step_epoch_batch_and_shapes(tmp_path):
    inputs, targets = make_regression(12).tensors
    with pytest.raises(BatchError) as raised:
        _fit(tmp_path, TensorDataset(inputs.double(), targets))
    message = str(raised.value)
    assert message.startswith(
        "step 1 (epoch 0, micro-batch 0 of the epoch): the forward, loss or backward raised"
    )
    assert "inputs float64[4, 6], targets int64[4]" in message
    assert isinstance(raised.value.__cause__, RuntimeError), "the original error is chained"


def test_a_detached_loss_names_loss_fn_and_what_to_return(tmp_path):
    def detached(outputs, targets):
        return F.cross_entropy(outputs, targets).detach()

    config = base_config(tmp_path, batch_size=4)
    trainer = Trainer(make_mlp(), config, train_data=make_regression(12), loss_fn=detached)
    with pytest.raises(LossContractError, match=r"^loss_fn: the loss does not require grad \(float32\[\]\)"):
        trainer.fit()


def test_a_metric_that_raises_is_named_with_its_batch(tmp_path):
    def broken(outputs, targets):
        return outputs[:, 99].mean()

    trainer = Trainer(
        make_mlp(),
        base_config(tmp_path),
        train_data=make_regression(12),
        loss_fn=F.cross_entropy,
        metrics={"broken": broken},
    )
    with pytest.raises(BatchError, match=r"eval_data: batch 0: .*metric 'broken' raised IndexError"):
        trainer.evaluate(make_regression(12))


def test_a_label_out_of_range_names_its_step_and_batch(tmp_path):
    inputs, targets = make_regression(12).tensors
    targets = targets.clone()
    targets[9] = 7  # 3 classes; micro-batch 2 of the (unshuffled by index) epoch holds it somewhere
    with pytest.raises(BatchError, match=r"step \d \(epoch 0, micro-batch \d of the epoch\).*out of bounds"):
        _fit(tmp_path, TensorDataset(inputs, targets))
    with pytest.raises(
        BatchError, match=r"eval_data: batch 2: the forward, loss or a metric raised .*out of bounds"
    ):
        _fit(tmp_path / "eval", make_regression(12), eval_data=TensorDataset(inputs, targets))


def test_an_eval_stream_that_yields_nothing_is_an_error_not_a_nan(tmp_path):
    trainer = Trainer(
        make_mlp(), base_config(tmp_path), train_data=make_regression(8), loss_fn=F.cross_entropy
    )
    with pytest.raises(ConfigError, match=r"^eval_data: the evaluation read no sample"):
        trainer.evaluate(ShuffledStream(TensorDataset(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))))


def test_predict_names_the_batch_that_failed_to_load_or_to_run(tmp_path):
    inputs = make_regression(12).tensors[0]
    trainer = Trainer(make_mlp(), base_config(tmp_path, batch_size=4), train_data=make_regression(12))
    with pytest.raises(BatchError, match=r"^predict: batch 1: the forward raised .*float64\[4, 6\]"):
        trainer.predict(ConcatDataset([TensorDataset(inputs[:4]), TensorDataset(inputs[4:].double())]))
    with pytest.raises(BatchError, match=r"^predict: batch 1 could not be loaded: .*needs a collate_fn"):
        trainer.predict(Ragged())


class Ragged(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 8

    def __getitem__(self, index: int):
        if index == 5:
            return torch.zeros(3), None
        return torch.zeros(6 if index != 6 else 4), 0


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_batch_that_cannot_be_collated_is_named_on_one_line(tmp_path, num_workers):
    with pytest.raises(BatchError) as raised:
        _fit(tmp_path, Ragged(), num_workers=num_workers)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith("train_data: micro-batch ")
    assert "of epoch 0 could not be loaded" in message and "collate_fn" in message


def test_cli_bad_labels_end_in_one_line_and_exit_1(tmp_path):
    (tmp_path / "badlabels.py").write_text(
        textwrap.dedent(
            """
            import torch
            from steadyfit import Recipe

            def build(config):
                inputs = torch.randn(16, 6)
                targets = torch.full((16,), 9)
                data = torch.utils.data.TensorDataset(inputs, targets)
                return Recipe(torch.nn.Linear(6, 3), data, loss_fn=torch.nn.functional.cross_entropy)
            """
        )
    )
    completed = subprocess.run(
        [sys.executable, "-m", "steadyfit", "fit", "badlabels:build", "max_steps=2", "progress=false"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 1, completed.stderr
    assert "Traceback" not in completed.stderr
    lines = [line for line in completed.stderr.splitlines() if line.startswith("steadyfit: error:")]
    assert len(lines) == 1 and "step 1 (epoch 0, micro-batch 0 of the epoch)" in lines[0]
    assert "targets int64[" in lines[0]
