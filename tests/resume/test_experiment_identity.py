"""resume=auto continues only the same experiment: every trajectory field, the model and the optimizer are
fingerprinted in each checkpoint; a rerun that changes one is refused before it writes anything, and the
fields that may change on resume still resume. resume=PATH of another experiment fine-tunes from its
weights."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import assert_bitwise_equal, base_config, final_weights, make_mlp, make_regression, metric_rows
from steadyfit import Callback, ConfigError, Trainer
from steadyfit.config import TrainConfig
from steadyfit.identity import MAY_CHANGE_ON_RESUME, TRAJECTORY_FIELDS

CE = torch.nn.functional.cross_entropy
ROOT = Path(__file__).resolve().parents[2]

# A value for each trajectory field that is valid beside the base config below and differs from it.
CHANGED_TRAJECTORY = {
    "seed": {"seed": 1},
    "batch_size": {"batch_size": 4},
    "grad_accum_steps": {"grad_accum_steps": 2},
    "max_grad_norm": {"max_grad_norm": 1.0},
    "clip_value": {"clip_value": 0.5},
    "optimizer": {"optimizer": "adam"},
    "lr": {"lr": 0.05},
    "weight_decay": {"weight_decay": 0.01},
    "momentum": {"momentum": 0.5},
    "nesterov": {"nesterov": True, "optimizer": "sgd", "momentum": 0.9},
    "betas": {"betas": (0.8, 0.99)},
    "eps": {"eps": 1e-6},
    "scheduler": {"scheduler": "linear"},
    "warmup_steps": {"warmup_steps": 2},
    "warmup_ratio": {"warmup_ratio": 0.1},
    "min_lr_ratio": {"min_lr_ratio": 0.1},
    "decay_ratio": {"decay_ratio": 0.5},
    "step_size": {"step_size": 3},
    "gamma": {"gamma": 0.5},
    "precision": {"precision": "bf16"},
    "ema_decay": {"ema_decay": 0.9},
    "limit_train_batches": {"limit_train_batches": 2},
    "overfit_batches": {"overfit_batches": 2},
}

# Fields a rerun may change and still continue: each with a value that differs from the base config.
CHANGED_FREELY = {
    "max_steps": {"max_steps": 6},
    "max_epochs": {"max_epochs": 5},
    "log_every": {"log_every": 2},
    "eval_every": {"eval_every": 2},
    "save_every": {"save_every": 1},
    "keep_last": {"keep_last": 1},
    "loggers": {"loggers": ["csv"]},
    "progress": {"progress": True},
    "eval_batch_size": {"eval_batch_size": 5},
    "num_workers": {"num_workers": 1},
    "deterministic": {"deterministic": True},
    "on_nonfinite": {"on_nonfinite": "raise"},
    "max_consecutive_skips": {"max_consecutive_skips": 3},
    "diagnostics": {"diagnostics": False},
    "early_stopping_patience": {"early_stopping_patience": 5, "eval_every": 2},
    "metric_for_best": {"metric_for_best": "eval_loss", "eval_every": 2},
    "keep_best": {"keep_best": 2},
    "eval_on_start": {"eval_on_start": True},
    "limit_eval_batches": {"limit_eval_batches": 1},
    "gradient_checkpointing": {"gradient_checkpointing": ["Linear"]},
    "micro_batch_size": {"micro_batch_size": 4},
}


def _config(tmp_path: Path, **overrides) -> TrainConfig:
    values = {"batch_size": 8, "max_epochs": None, "max_steps": 4, "save_every": 2, "lr": 0.01}
    values.update(overrides)
    return base_config(tmp_path, **values)


def _fit(config: TrainConfig, model: torch.nn.Module | None = None, callbacks=()):
    trainer = Trainer(
        model or make_mlp(),
        config,
        train_data=make_regression(48),
        eval_data=make_regression(16, seed=1),
        loss_fn=CE,
        callbacks=list(callbacks),
    )
    return trainer, trainer.fit()


class StartStep(Callback):
    def __init__(self) -> None:
        self.step: int | None = None
        self.weights: dict[str, torch.Tensor] = {}

    def on_fit_start(self, trainer, state) -> None:
        self.step = state.step
        self.weights = {name: t.detach().clone() for name, t in trainer.model.state_dict().items()}


def test_every_config_field_is_either_fingerprinted_or_free_to_change():
    trajectory, free = set(TRAJECTORY_FIELDS), set(MAY_CHANGE_ON_RESUME)
    assert not trajectory & free
    assert trajectory | free == set(TrainConfig.model_fields)
    assert set(CHANGED_TRAJECTORY) == trajectory


def test_docs_list_the_fields_that_may_change_on_resume():
    text = (ROOT / "docs" / "checkpoints.md").read_text()
    section = text[text.index("## What a resume may change") :]
    for name in (*MAY_CHANGE_ON_RESUME, *TRAJECTORY_FIELDS):
        assert f"`{name}`" in section, name


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run that wrote checkpoints at steps 2 and 4 (copied per test: each rerun may write)."""
    root = tmp_path_factory.mktemp("original")
    _fit(_config(root))
    return root / "run"


def _copy(finished_run: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.parametrize("field", sorted(CHANGED_TRAJECTORY))
def test_a_changed_trajectory_field_is_refused_naming_it(field, finished_run, tmp_path):
    run_dir = _copy(finished_run, tmp_path)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as refused:
        _fit(_config(tmp_path, max_steps=8, **CHANGED_TRAJECTORY[field]))
    message = str(refused.value)
    assert re.search(rf"\b{field}: ", message), message
    assert len(re.findall(rf"(?:\(|; ){field}: ", message)) == 1, f"{field} named more than once: {message}"
    assert "another experiment" in message and "another run_dir" in message and "resume=never" in message
    assert "fine-tunes from its weights" in message  # the same model: its weights would fit
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after.keys() - before.keys() <= {Path(".lock")}
    assert all(after[name] == content for name, content in before.items()), "nothing was changed"


@pytest.mark.parametrize("field", sorted(CHANGED_FREELY))
def test_a_field_free_to_change_still_resumes(field, finished_run, tmp_path):
    _copy(finished_run, tmp_path)
    start = StartStep()
    overrides = {"max_steps": 6, **CHANGED_FREELY[field]}
    _, result = _fit(_config(tmp_path, **overrides), callbacks=[start])
    assert start.step == 4, "it continued from the step-4 checkpoint"
    assert result.global_step == overrides["max_steps"] or result.epoch >= 1


def test_a_changed_model_is_refused_naming_its_parameters_without_a_fine_tune(finished_run, tmp_path):
    _copy(finished_run, tmp_path)
    wider = torch.nn.Sequential(
        torch.nn.Linear(6, 32), torch.nn.Tanh(), torch.nn.Dropout(0.0), torch.nn.Linear(32, 3)
    )
    with pytest.raises(ConfigError) as refused:
        _fit(_config(tmp_path, max_steps=8), model=wider)
    message = str(refused.value)
    assert "model: other shapes: " in message and "0.weight (16, 6) -> (32, 6)" in message
    assert "fine-tunes" not in message
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000004"
    with pytest.raises(ConfigError, match="model: other shapes"):
        _fit(_config(tmp_path, run_dir=str(tmp_path / "other"), resume=str(checkpoint)), model=wider)


def test_a_model_cast_to_another_dtype_is_another_experiment(finished_run, tmp_path):
    # load_state_dict would cast the saved float32 weights silently: the run would go on in float64.
    _copy(finished_run, tmp_path)
    with pytest.raises(ConfigError) as refused:
        _fit(_config(tmp_path, max_steps=8), model=make_mlp().double())
    message = str(refused.value)
    assert "model: other dtypes: 0.bias float32 -> float64" in message, message
    assert "fine-tunes from its weights" in message  # the names and shapes fit: a cast fine-tune may start


def test_resume_path_of_another_experiment_fine_tunes_from_its_weights(finished_run, tmp_path, capfd):
    checkpoint = _copy(finished_run, tmp_path) / "checkpoints" / "step-00000004"
    other = tmp_path / "finetune"
    start = StartStep()
    config = _config(tmp_path, run_dir=str(other), resume=str(checkpoint), lr=0.05, max_steps=4)
    _, result = _fit(config, callbacks=[start])
    from safetensors.torch import load_file

    saved = load_file(str(checkpoint / "model.safetensors"))
    assert start.step == 0 and result.global_step == 4
    for name, tensor in start.weights.items():
        assert torch.equal(tensor, saved[name]), f"{name}: the fine-tune starts from the checkpoint's weights"
    assert "fine-tuning from the weights of" in capfd.readouterr().err
    # Rerun once it wrote checkpoints of its own: it continues those, not the other run's.
    again = StartStep()
    _fit(config.model_copy(update={"max_steps": 6}), callbacks=[again])
    assert again.step == 4
    assert "holds this run's own checkpoints" in capfd.readouterr().err


def test_resume_path_of_the_same_experiment_continues_it_in_a_new_run_dir(finished_run, tmp_path):
    # The new directory has no metrics.jsonl for the checkpoint's row count to cut back to.
    checkpoint = _copy(finished_run, tmp_path) / "checkpoints" / "step-00000002"
    start = StartStep()
    _, result = _fit(
        _config(tmp_path, run_dir=str(tmp_path / "new"), resume=str(checkpoint)), callbacks=[start]
    )
    assert start.step == 2 and result.global_step == 4
    assert_bitwise_equal(final_weights(tmp_path / "new"), final_weights(finished_run))
    kinds = [row["kind"] for row in metric_rows(tmp_path / "new")]
    assert kinds[0] == "start" and kinds[-1] == "summary" and kinds.count("start") == 1


def test_an_optimizer_of_another_class_passed_to_the_trainer_is_another_experiment(finished_run, tmp_path):
    # The config still says adamw; the Trainer gets its own SGD: the checkpoint's AdamW state cannot apply.
    _copy(finished_run, tmp_path)
    model = make_mlp()
    config = _config(tmp_path, max_steps=6)
    trainer = Trainer(
        model,
        config,
        train_data=make_regression(48),
        eval_data=make_regression(16, seed=1),
        loss_fn=CE,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
    )
    with pytest.raises(ConfigError, match="optimizer: optimizer 'AdamW' in the checkpoint, 'SGD' now"):
        trainer.fit()


def test_one_batch_and_the_whole_epoch_are_different_limits(finished_run, tmp_path):
    # limit_train_batches=1 is one batch, 1.0 the whole epoch: equal as numbers, not as experiments.
    root = tmp_path / "limits"
    _fit(_config(root, limit_train_batches=1.0))
    with pytest.raises(ConfigError, match=r"limit_train_batches: 1\.0 in the checkpoint, 1 now"):
        _fit(_config(root, limit_train_batches=1, max_steps=6))


def test_a_resumed_run_says_so_without_progress(finished_run, tmp_path, capfd):
    _copy(finished_run, tmp_path)
    _fit(_config(tmp_path, max_steps=6, progress=False))
    assert "resumed from" in capfd.readouterr().err


def _steadyfit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "steadyfit", "fit", "digits", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_new_lr_over_an_old_run_exits_2_naming_lr_and_max_steps_alone_resumes(tmp_path):
    first = _steadyfit("max_steps=40", "save_every=20", "progress=false", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run_dir = tmp_path / "runs" / "digits"
    config_before = (run_dir / "config.yaml").read_bytes()
    rows_before = (run_dir / "metrics.jsonl").read_bytes()
    refused = _steadyfit("max_steps=80", "save_every=20", "lr=0.05", "progress=false", cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "lr: 0.002 in the checkpoint, 0.05 now" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert (run_dir / "config.yaml").read_bytes() == config_before
    assert (run_dir / "metrics.jsonl").read_bytes() == rows_before
    resumed = _steadyfit("max_steps=60", "save_every=20", "progress=false", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr
