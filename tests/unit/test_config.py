"""TrainConfig validation, YAML loading and key=value overrides."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from steadyfit.config import ConfigError, TrainConfig, make_config, parse_overrides, read_yaml

DESIGN_FIELDS = (
    "run_dir",
    "seed",
    "max_epochs",
    "max_steps",
    "batch_size",
    "eval_batch_size",
    "grad_accum_steps",
    "max_grad_norm",
    "clip_value",
    "optimizer",
    "lr",
    "weight_decay",
    "momentum",
    "nesterov",
    "betas",
    "eps",
    "scheduler",
    "warmup_steps",
    "warmup_ratio",
    "min_lr_ratio",
    "precision",
    "eval_every",
    "log_every",
    "save_every",
    "keep_last",
    "metric_for_best",
    "greater_is_better",
    "load_best_at_end",
    "early_stopping_patience",
    "early_stopping_threshold",
    "resume",
    "num_workers",
    "deterministic",
    "compile",
    "loggers",
    "on_nonfinite",
    "strategy",
    "device",
    "progress",
    "step_size",
    "gamma",
    "ema_decay",
    "micro_batch_size",
)


def test_every_design_field_exists():
    assert set(DESIGN_FIELDS) <= set(TrainConfig.model_fields)


def test_unknown_field_is_rejected_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"learning_rate: unknown field"):
        make_config({"learning_rate": 0.1})
    with pytest.raises(ConfigError, match=r"did you mean 'batch_size'"):
        make_config({"batchsize": 4})


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"optimizer": "adagrad"}, r"optimizer: got 'adagrad'; allowed values: 'sgd'"),
        ({"precision": "fp8"}, r"precision: got 'fp8'; allowed values"),
        ({"batch_size": 0}, r"batch_size: .*greater than or equal to 1"),
        ({"lr": -1}, r"lr: .*greater than 0"),
        ({"max_epochs": None, "max_steps": None}, r"max_epochs / max_steps"),
        ({"nesterov": True}, r"nesterov: needs optimizer=sgd"),
        ({"on_nonfinite": "ignore"}, r"on_nonfinite: got 'ignore'; allowed values: 'skip' or 'raise'"),
        # One evaluation at the end of the run: nothing to choose from or to stop early on.
        ({"eval_every": 0, "load_best_at_end": True}, r"load_best_at_end: needs evaluation"),
        ({"eval_every": 0, "early_stopping_patience": 2}, r"early_stopping_patience: needs periodic"),
        ({"eval_every": 0, "keep_best": 2}, r"keep_best: needs periodic evaluation"),
    ],
)
def test_invalid_values_name_the_field(values, expected):
    with pytest.raises(ConfigError, match=expected):
        make_config(values)


def test_overrides_parse_as_yaml_scalars_and_lists():
    parsed = parse_overrides(
        ["lr=3e-4", "betas=[0.9, 0.95]", "max_steps=10", "deterministic=true", "run_dir=a/b"]
    )
    assert parsed == {
        "lr": 3e-4,
        "betas": [0.9, 0.95],
        "max_steps": 10,
        "deterministic": True,
        "run_dir": "a/b",
    }
    assert make_config(parsed).betas == (0.9, 0.95)
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_overrides(["lr"])


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("lr: !!python/object/apply:os.system ['touch pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_yaml(evil)
    with pytest.raises(ConfigError, match="config file not found"):
        read_yaml(tmp_path / "missing.yaml")


def test_a_yaml_error_is_one_line_and_a_key_given_twice_is_one(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("recipe: digits\nlr: [0.1\n")
    with pytest.raises(ConfigError) as error:
        read_yaml(broken)
    assert "\n" not in str(error.value) and "not valid YAML: expected ',' or ']'" in str(error.value)
    twice = tmp_path / "twice.yaml"
    twice.write_text("recipe: digits\nlr: 0.1\nbatch_size: 8\nlr: 0.2\n")  # the second would win silently
    with pytest.raises(
        ConfigError, match=r"twice\.yaml: not valid YAML: 'lr' is given twice in one mapping at line 4"
    ):
        read_yaml(twice)


def test_a_yaml_alias_bomb_gives_one_short_line(tmp_path):
    # Four levels of nine aliases: 6,561 strings from 150 bytes, a 33 kB repr (eight levels: 226 MB).
    bomb = "[x, x, x, x, x, x, x, x, x]"
    for level in range(3):
        bomb = f"[&a{level} {bomb}" + f", *a{level}" * 8 + "]"
    path = tmp_path / "bomb.yaml"
    path.write_text(f"fsdp_blocks: [{bomb}]\n")
    with pytest.raises(ConfigError) as error:
        make_config(read_yaml(path))
    assert str(error.value) == (
        "invalid config: fsdp_blocks.0: Input should be a valid string (got [[[...], [...], [...], [...], "
        "[...], [...], [...], [...], ...], [[...], [...], [...], [...], [...], [...], [...], [.....)"
    )


@given(
    lr=st.floats(min_value=1e-6, max_value=10),
    batch_size=st.integers(1, 4096),
    accum=st.integers(1, 64),
    betas=st.tuples(st.floats(0, 0.999), st.floats(0, 0.999)),
)
def test_config_round_trips_through_yaml_data(lr, batch_size, accum, betas):
    config = TrainConfig(lr=lr, batch_size=batch_size, grad_accum_steps=accum, betas=betas)
    assert make_config(config.to_yaml_dict()) == config
