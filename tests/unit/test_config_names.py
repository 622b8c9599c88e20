"""Config errors in our words and in theirs: ConfigError from Python, one message per union field, our field
for each Hugging Face and Lightning name (docs/migrating.md's two tables, row by row, from Python and from the
command line), and ``TrainConfig.from_hf`` on a real ``TrainingArguments``."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from steadyfit.cli import EXIT_USAGE, main
from steadyfit.config import ConfigError, TrainConfig, make_config
from steadyfit.foreign_names import FOREIGN_NAMES
from steadyfit.hf_arguments import _hf_defaults
from steadyfit.horizons import schedule_phases

ROOT = Path(__file__).resolve().parents[2]
MIGRATING = ROOT / "docs" / "migrating.md"
HF_TABLE = "| `TrainingArguments` / `Trainer` argument |"
LIGHTNING_TABLE = "| Lightning | steadyfit |"

# The names issue 13 promised an answer for; a table losing one of these rows fails here.
PROMISED = {
    "learning_rate", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "num_train_epochs", "max_grad_norm", "warmup_ratio", "save_total_limit",
    "report_to", "output_dir", "logging_steps", "eval_steps", "eval_strategy", "evaluation_strategy",
    "save_steps", "save_strategy", "lr_scheduler_type", "optim", "adam_beta1", "adam_beta2", "adam_epsilon",
    "bf16", "fp16", "load_best_model_at_end", "metric_for_best_model", "dataloader_num_workers",
    "dataloader_persistent_workers",
    "torch_compile", "full_determinism", "eval_on_start", "gradient_checkpointing",
    "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "val_check_interval",
    "check_val_every_n_epoch", "log_every_n_steps", "save_top_k", "default_root_dir", "devices",
    "accelerator", "enable_progress_bar", "limit_val_batches", "fast_dev_run", "limit_train_batches",
    "overfit_batches", "max_epochs", "max_steps", "precision",
}  # fmt: skip

# `name`, `name=value` or `name: value`; anything else in backticks (`Trainer(...)`, a command) is no name.
_NAME = re.compile(r"^([a-z_][a-z0-9_]*)(?:[=:].*)?$")
_PARENTHESES = re.compile(r"\([^()]*\)")


def _names(cell: str) -> list[str]:
    """The names a table cell gives in backticks, outside parentheses (which hold values and remarks)."""
    while _PARENTHESES.search(cell):
        cell = _PARENTHESES.sub("", cell)
    return [match.group(1) for span in re.findall(r"`([^`]*)`", cell) if (match := _NAME.match(span))]


def _table(header: str) -> list[tuple[list[str], list[str]]]:
    """(their names, steadyfit fields) of each row of the table under ``header``."""
    lines = MIGRATING.read_text(encoding="utf-8").splitlines()
    start = next(number for number, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        theirs, ours, _notes = (cell.strip() for cell in line.strip().strip("|").split("|"))
        rows.append((_names(theirs), _names(ours)))
    return rows


ROWS = _table(HF_TABLE) + _table(LIGHTNING_TABLE)
# Each foreign name that is not also ours, with the fields of its row: the hint must name all of them.
HINTED = [(name, ours) for theirs, ours in ROWS for name in theirs if name not in TrainConfig.model_fields]


@pytest.fixture(autouse=True)
def _restore_import_path(monkeypatch):
    # `main` puts the current directory on sys.path; each test gets the path back as it was.
    monkeypatch.setattr(sys, "path", list(sys.path))


# ------------------------------------------------------------------------------ ConfigError from Python
def test_construction_and_assignment_raise_config_error_with_make_configs_message():
    with pytest.raises(ConfigError) as built:
        TrainConfig(lr=-1, batch_size=0)
    with pytest.raises(ConfigError) as made:
        make_config({"lr": -1, "batch_size": 0})
    assert not isinstance(built.value, ValidationError)
    assert str(built.value) == str(made.value)
    assert str(built.value).startswith("invalid config: batch_size: ")
    assert "lr: Input should be greater than 0 (got -1)" in str(built.value)

    config = TrainConfig()
    with pytest.raises(ConfigError) as assigned:
        config.lr = -1
    assert str(assigned.value) == "invalid config: lr: Input should be greater than 0 (got -1)"
    assert config.lr == 1e-3, "a refused assignment leaves the field as it was"
    with pytest.raises(ConfigError, match=r"^invalid config: learning_rate: unknown field; .* `lr`"):
        config.learning_rate = 3e-4
    with pytest.raises(ConfigError, match="eval_every: got 'epochs'"):
        config.eval_every = "epochs"
    config.eval_every = "epoch"
    assert config.eval_every == "epoch"


# ------------------------------------------------------------------------------------- union fields
STEPS_OR_EPOCH = "a whole number of steps >= 0 (0: off), or 'epoch'"
BATCHES = "a whole number of batches >= 1, a fraction of the batches in (0, 1]"


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("eval_every", "epochs", "a whole number of steps >= 0 (0: off), 'epoch', or null (every epoch)"),
        ("log_every", -1, STEPS_OR_EPOCH),
        ("save_every", 1.5, STEPS_OR_EPOCH),
        ("limit_train_batches", 1.5, f"{BATCHES}, or null"),
        ("limit_eval_batches", 0, f"{BATCHES}, or null"),
        ("overfit_batches", -0.5, f"{BATCHES}, or 0 (off)"),
        ("fast_dev_run", -1, "true, false, or a whole number of batches >= 0"),
        ("gradient_checkpointing", ["Block", 1], "true, false, or a list of module names"),
        ("micro_batch_size", "big", "a whole number >= 1, 'auto', or null"),
    ],
)
def test_a_union_field_reads_as_one_message(field, value, allowed):
    with pytest.raises(ConfigError) as refused:
        TrainConfig(**{field: value})
    assert str(refused.value) == f"invalid config: {field}: got {value!r}; allowed: {allowed}"


class _Alien:
    """A value no field accepts."""

    def __repr__(self) -> str:
        return "<alien>"


@pytest.mark.parametrize("field", list(TrainConfig.model_fields))
def test_every_field_reports_a_bad_value_in_one_message(field):
    # Guards fields added later: a new union field without words in _UNION_ALLOWED fails here.
    with pytest.raises(ConfigError) as refused:
        TrainConfig(**{field: _Alien()})
    message = str(refused.value)
    assert message.startswith(f"invalid config: {field}: "), message
    assert f"{field}." not in message, "one message for the field, not one per member of its type"


# ------------------------------------------------------------------------- Hugging Face and Lightning names
def test_the_tables_cover_every_promised_name_and_every_hint():
    in_tables = {name for theirs, _ours in ROWS for name in theirs}
    assert PROMISED - in_tables == set()
    assert {name for name, _ours in HINTED} == set(FOREIGN_NAMES), "docs and foreign_names.py disagree"


def test_every_steadyfit_field_the_tables_name_exists():
    named = {field for _theirs, ours in ROWS for field in ours}
    assert named - set(TrainConfig.model_fields) == set()
    assert len(named) > 40, "the table parser found too few fields: has the table format changed?"


def _assert_hint(message: str, name: str, fields: list[str]) -> None:
    assert f"{name}: unknown field; " in message, message
    assert "docs/migrating.md" in message, message
    if not fields:
        assert f"`{name}` has no steadyfit field" in message, message
    for field in fields:
        assert f"`{field}`" in message, message


@pytest.mark.parametrize(("name", "fields"), HINTED, ids=[name for name, _ in HINTED])
def test_a_foreign_name_in_python_is_answered_with_our_field(name, fields):
    with pytest.raises(ConfigError) as refused:
        TrainConfig(**{name: 1})
    _assert_hint(str(refused.value), name, fields)


@pytest.mark.parametrize(("name", "fields"), HINTED, ids=[name for name, _ in HINTED])
def test_a_foreign_name_on_the_command_line_is_answered_with_our_field(
    name, fields, tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", f"{name}=1"]) == EXIT_USAGE
    _assert_hint(capsys.readouterr().err, name, fields)
    assert list(tmp_path.iterdir()) == [], "a refused config writes nothing"


def test_a_foreign_name_in_a_yaml_file_beats_the_closest_of_our_names(tmp_path, monkeypatch, capsys):
    # difflib alone offers our distributed `strategy` for Hugging Face's save_strategy.
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "hf.yaml"
    config.write_text("recipe: digits\nsave_strategy: steps\nper_device_train_batch_size: 16\n")
    assert main(["fit", str(config)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert (
        "save_strategy: unknown field; the Hugging Face Trainer's `save_strategy` is steadyfit's `save_every`"
        in err
    )
    assert "per_device_train_batch_size: unknown field; " in err and "`batch_size`" in err
    assert "did you mean" not in err
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        make_config({"batchsize": 4})  # our own near-misses still get difflib


@pytest.mark.parametrize(
    ("field", "value", "hint"),
    [
        ("precision", "bf16-mixed", "Lightning's precision 'bf16-mixed' is steadyfit's 'bf16'"),
        ("precision", "16-mixed", "Lightning's precision '16-mixed' is steadyfit's 'fp16'"),
        ("precision", "32-true", "Lightning's precision '32-true' is steadyfit's 'fp32'"),
        ("precision", 16, "Lightning's precision 16 is steadyfit's 'fp16'"),
        ("optimizer", "adamw_torch", "the Hugging Face Trainer's optim 'adamw_torch' is steadyfit's 'adamw'"),
        (
            "scheduler",
            "warmup_stable_decay",
            "the Hugging Face Trainer's lr_scheduler_type 'warmup_stable_decay' is steadyfit's 'wsd'",
        ),
        ("device", "gpu", "Lightning's accelerator 'gpu' is steadyfit's 'cuda'"),
        ("max_steps", -1, "Hugging Face's and Lightning's max_steps -1 is steadyfit's null"),
    ],
)
def test_a_foreign_value_is_answered_with_ours(field, value, hint):
    with pytest.raises(ConfigError) as refused:
        TrainConfig(**{field: value})
    assert str(refused.value).startswith(f"invalid config: {field}: ")
    assert str(refused.value).endswith(f"; {hint}")


def test_a_lightning_precision_on_the_command_line_gets_ours(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", "precision=bf16-mixed"]) == EXIT_USAGE
    assert (
        "allowed values: 'fp32', 'bf16' or 'fp16'; Lightning's precision 'bf16-mixed' is steadyfit's 'bf16'"
        in (capsys.readouterr().err)
    )


# ----------------------------------------------------------------------------------------- from_hf
@pytest.fixture
def training_arguments():
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers 5 builds a TrainingArguments only with accelerate")
    return transformers.TrainingArguments


@pytest.fixture
def hf_defaults(training_arguments):
    return training_arguments(output_dir="out").to_dict()


def test_from_hf_translates_a_real_training_arguments(training_arguments, tmp_path):
    args = training_arguments(
        output_dir=str(tmp_path / "hf"),
        per_device_train_batch_size=16,
        per_device_eval_batch_size=64,
        gradient_accumulation_steps=4,
        learning_rate=3e-4,
        weight_decay=0.01,
        adam_beta1=0.8,
        adam_beta2=0.95,
        adam_epsilon=1e-6,
        max_grad_norm=0.5,
        num_train_epochs=2,
        lr_scheduler_type="cosine_with_min_lr",
        lr_scheduler_kwargs={"min_lr_rate": 0.1},
        warmup_steps=0.05,
        optim="sgd",
        fp16=True,
        use_cpu=True,
        eval_strategy="steps",
        eval_steps=50,
        save_strategy="steps",
        save_steps=100,
        logging_steps=10,
        save_total_limit=2,
        report_to=["tensorboard"],
        seed=7,
        load_best_model_at_end=True,
        metric_for_best_model="accuracy",
        activation_checkpointing=True,
        eval_on_start=True,
        dataloader_num_workers=2,
        dataloader_persistent_workers=True,
        full_determinism=True,
        run_name="bookkeeping-is-ignored",
    )
    expected = {
        "run_dir": str(tmp_path / "hf"),
        "batch_size": 16,
        "eval_batch_size": 64,
        "grad_accum_steps": 4,
        "lr": 3e-4,
        "weight_decay": 0.01,
        "betas": (0.8, 0.95),
        "eps": 1e-6,
        "max_grad_norm": 0.5,
        "max_epochs": 2,
        "max_steps": None,
        "scheduler": "cosine",
        "min_lr_ratio": 0.1,
        "warmup_steps": 0,
        "warmup_ratio": 0.05,
        "optimizer": "sgd",
        "precision": "fp16",
        "device": "cpu",
        "eval_every": 50,
        "save_every": 100,
        "log_every": 10,
        "keep_last": 2,
        "loggers": ["tensorboard"],
        "seed": 7,
        "load_best_at_end": True,
        "metric_for_best": "accuracy",
        "greater_is_better": True,  # Hugging Face infers it from the metric's name
        "gradient_checkpointing": True,
        "eval_on_start": True,
        "num_workers": 2,
        "persistent_workers": True,
        "deterministic": True,
    }
    assert TrainConfig.from_hf(args).model_dump(include=set(expected)) == expected
    # Keyword arguments win over the translation.
    assert TrainConfig.from_hf(args, max_steps=30, lr=1e-2).model_dump(include={"max_steps", "lr"}) == {
        "max_steps": 30,
        "lr": 1e-2,
    }


def test_from_hf_carries_hugging_faces_defaults_over(hf_defaults):
    config = TrainConfig.from_hf(hf_defaults)
    assert config.model_dump(
        include={"lr", "batch_size", "scheduler", "optimizer", "max_grad_norm", "max_epochs", "seed"}
    ) == {
        "lr": 5e-5,
        "batch_size": 8,
        "scheduler": "linear",
        "optimizer": "adamw",
        "max_grad_norm": 1.0,
        "max_epochs": 3,
        "seed": 42,
    }
    assert (config.eval_every, config.save_every, config.log_every, config.loggers) == (0, 500, 500, [])


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"bf16": True}, {"precision": "bf16"}),
        ({"max_steps": 1000}, {"max_steps": 1000, "max_epochs": None}),
        ({"max_steps": 100, "num_train_epochs": 2.5}, {"max_steps": 100, "max_epochs": None}),
        ({"max_steps": -1, "num_train_epochs": 5.0}, {"max_steps": None, "max_epochs": 5}),
        ({"eval_strategy": "no"}, {"eval_every": 0}),
        ({"eval_strategy": "epoch"}, {"eval_every": "epoch"}),
        ({"eval_strategy": "steps", "eval_steps": 25}, {"eval_every": 25}),
        ({"evaluation_strategy": "steps", "eval_steps": 25}, {"eval_every": 25}),
        ({"save_strategy": "no"}, {"save_every": 0}),
        ({"save_strategy": "best"}, {"save_every": 0}),
        ({"save_strategy": "epoch"}, {"save_every": "epoch"}),
        ({"logging_strategy": "epoch"}, {"log_every": "epoch"}),
        ({"logging_strategy": "no"}, {"log_every": 0}),
        ({"max_steps": 200, "logging_steps": 0.1, "save_steps": 0.5}, {"log_every": 20, "save_every": 100}),
        ({"report_to": "none"}, {"loggers": []}),
        ({"report_to": "wandb"}, {"loggers": ["wandb"]}),
        ({"report_to": ["tensorboard", "mlflow", "wandb"]}, {"loggers": ["tensorboard", "mlflow", "wandb"]}),
        ({"max_grad_norm": 0.0}, {"max_grad_norm": None}),
        ({"warmup_steps": 100}, {"warmup_steps": 100, "warmup_ratio": 0.0}),
        ({"warmup_ratio": 0.1}, {"warmup_steps": 0, "warmup_ratio": 0.1}),  # a transformers 4 dict
        ({"optim": "adamw_torch"}, {"optimizer": "adamw"}),
        ({"optim": "adamw_torch_fused"}, {"optimizer": "adamw"}),
        ({"lr_scheduler_type": "cosine"}, {"scheduler": "cosine"}),
        ({"lr_scheduler_type": "constant", "warmup_steps": 10}, {"scheduler": "constant", "warmup_steps": 0}),
        (
            {"lr_scheduler_type": "constant_with_warmup", "warmup_steps": 10},
            {"scheduler": "constant", "warmup_steps": 10},
        ),
        (
            {
                "lr_scheduler_type": "cosine_with_min_lr",
                "learning_rate": 1e-3,
                "lr_scheduler_kwargs": {"min_lr": 2.5e-4},
            },
            {"scheduler": "cosine", "min_lr_ratio": 0.25},
        ),
        ({"torch_compile": True, "torch_compile_backend": "inductor"}, {"compile": True}),
        ({"disable_tqdm": True}, {"progress": False}),
        ({"auto_find_batch_size": True}, {"micro_batch_size": "auto"}),
        (
            {"resume_from_checkpoint": "runs/x/checkpoints/step-00000100"},
            {"resume": "runs/x/checkpoints/step-00000100"},
        ),
        ({"seed": 3, "data_seed": 3}, {"seed": 3}),
        ({"run_name": "x", "logging_dir": "tb", "hub_model_id": "me/model", "project": "p"}, {}),
    ],
)
def test_from_hf_translates_each_setting(hf_defaults, changes, expected):
    config = TrainConfig.from_hf({**hf_defaults, **changes})
    assert config.model_dump(include=set(expected)) == expected


def test_from_hf_turns_wsd_decay_steps_into_the_same_decay_steps(hf_defaults):
    args = {
        **hf_defaults,
        "lr_scheduler_type": "warmup_stable_decay",
        "max_steps": 900,
        "warmup_steps": 50,
        # 700 / 900 is a hair above 7/9 as a float: rounded up, it would decay over 701 steps.
        "lr_scheduler_kwargs": {"num_decay_steps": 700, "decay_type": "1-sqrt", "min_lr_ratio": 0.05},
    }
    config = TrainConfig.from_hf(args)
    assert (config.scheduler, config.min_lr_ratio) == ("wsd", 0.05)
    assert schedule_phases(config, 900) == (50, 700)


def test_from_hf_refuses_everything_it_cannot_honour_in_one_error(training_arguments):
    args = training_arguments(
        output_dir="out",
        num_train_epochs=2.5,
        optim="adagrad",
        lr_scheduler_type="polynomial",
        label_smoothing_factor=0.1,
        logging_first_step=True,
        eval_delay=3,
        report_to=["tensorboard", "trackio"],
        label_names=["label"],
    )
    given = {**args.to_dict(), "hub_token": "hf_secretsecret", "per_gpu_train_batch_size": 4}
    with pytest.raises(ConfigError) as refused:
        TrainConfig.from_hf(given)
    message = str(refused.value)
    for expected in (
        "num_train_epochs=2.5 (steadyfit trains whole epochs: set max_steps instead)",
        "optim='adagrad'",
        "lr_scheduler_type='polynomial'",
        "label_smoothing_factor=0.1",
        "logging_first_step=True",
        "eval_delay=3",
        "report_to=['trackio']",
        "label_names=['label'] (the targets are batch[\"labels\"])",
        "per_gpu_train_batch_size=4 (not a TrainingArguments field of the installed transformers)",
    ):
        assert expected in message, message
    assert message.startswith("TrainConfig.from_hf: steadyfit cannot honour 9 TrainingArguments setting(s)")
    assert "secret" not in message and "hub_token" not in message, (
        "bookkeeping is ignored, secrets never shown"
    )
    assert "learning_rate" not in message, "what translates is not refused"


def test_from_hf_masks_nested_url_and_environment_secrets_in_refused_values(hf_defaults, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_EnvTokenValue777")
    given = {
        **hf_defaults,
        "deepspeed": {"auth_token": "hf_HubTok111", "stage": 2},
        "my_endpoint": "https://bob:hunter2@x.example/",
        "hub_private": "hf_EnvTokenValue777",
    }
    with pytest.raises(ConfigError) as refused:
        TrainConfig.from_hf(given)
    message = str(refused.value)
    for expected in (
        "deepspeed={'auth_token': '***', 'stage': 2}",
        "my_endpoint='https://bob:***@x.example/'",
        "hub_private='***'",
    ):
        assert expected in message, message
    assert not any(secret in message for secret in ("hf_HubTok111", "hunter2", "hf_EnvTokenValue777"))


def test_from_hf_accepts_the_settings_that_say_what_steadyfit_does(training_arguments):
    # Scripts with a custom collator set remove_unused_columns=False; steadyfit passes the whole batch anyway.
    args = training_arguments(
        output_dir="out", remove_unused_columns=False, label_names=["labels"], eval_accumulation_steps=4
    )
    assert TrainConfig.from_hf(args).batch_size == 8


def test_from_hf_refuses_a_wsd_it_would_run_differently(hf_defaults):
    args = {
        **hf_defaults,
        "lr_scheduler_type": "warmup_stable_decay",
        "lr_scheduler_kwargs": {"num_cycles": 1},
    }
    with pytest.raises(ConfigError) as refused:
        TrainConfig.from_hf(args)
    message = str(refused.value)
    assert "lr_scheduler_kwargs.decay_type='cosine' (steadyfit's wsd decays as 1-sqrt" in message
    assert "lr_scheduler_kwargs.num_decay_steps=None (decay_ratio needs it and max_steps > 0)" in message
    assert "lr_scheduler_kwargs.num_cycles=1" in message


def test_from_hf_refuses_adafactor_whose_arithmetic_differs_and_names_hugging_faces(training_arguments):
    # The HF Trainer's adafactor runs at a fixed lr; torch's (ours) caps and scales it: other updates.
    transformers = pytest.importorskip("transformers")
    args = training_arguments(output_dir="out", optim="adafactor")
    with pytest.raises(ConfigError) as refused:
        TrainConfig.from_hf(args)
    message = str(refused.value)
    optimizer_class, kwargs = transformers.Trainer.get_optimizer_cls_and_kwargs(args)
    assert optimizer_class is transformers.optimization.Adafactor
    built = f"{optimizer_class.__module__}.{optimizer_class.__name__}"
    assert built in message, "the message names the optimizer the HF Trainer builds"
    for key, value in kwargs.items():
        assert key == "lr" or f"{key}={value}" in message, f"{key}={value} is how the HF Trainer builds it"
    assert "optimizer='adafactor'" in message
    # Both ways out the message names work.
    assert TrainConfig.from_hf(args, optimizer="adafactor").optimizer == "adafactor"
    assert TrainConfig.from_hf(args, optimizer="adamw").optimizer == "adamw"


def test_from_hf_without_transformers_says_what_to_install(monkeypatch):
    _hf_defaults.cache_clear()
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'steadyfit\[hf\]'"):
        TrainConfig.from_hf({"learning_rate": 1e-3})
    with pytest.raises(TypeError, match="expected a TrainingArguments or its to_dict"):
        TrainConfig.from_hf(42)


# ------------------------------------------------------------------ the Trainer's arguments, in their words
def test_the_trainers_arguments_in_hugging_face_and_lightning_words_are_answered_with_ours(
    training_arguments, tmp_path
):
    import torch

    from steadyfit import Trainer

    model = torch.nn.Linear(2, 2)
    cases = [
        ({"train_dataset": [], "data_collator": None}, r"`train_dataset` is steadyfit's train_data=.*"
         r"`data_collator` is steadyfit's collate_fn="),
        ({"compute_metrics": None}, r"`compute_metrics` is steadyfit's metrics=\{name: fn\}"),
        ({"val_dataloaders": None}, r"Lightning's `val_dataloaders` is steadyfit's eval_data="),
        ({"trian_data": None}, r"`trian_data` is not an argument of steadyfit's Trainer \(did you mean"),
        ({"config": training_arguments(output_dir=str(tmp_path))},
         r"config: got a Hugging Face TrainingArguments; pass TrainConfig.from_hf\(args\)"),
        ({"config": 3}, r"config: expected a TrainConfig or a dict of its fields, got int"),
        ({"metrics": lambda eval_prediction: {}}, r"metrics: expected a dict of name to metric"),
    ]  # fmt: skip
    for arguments, message in cases:
        with pytest.raises(ConfigError, match=message):
            Trainer(model, **arguments)


def test_a_choice_in_other_letter_cases_and_a_lightning_precision_without_equivalent_are_answered():
    with pytest.raises(ConfigError, match=r"optimizer: got 'Adam' \(did you mean 'adam'\?\); allowed values"):
        TrainConfig(optimizer="Adam")
    with pytest.raises(ConfigError, match=r"optimizer: got 'adagrad'; allowed"):
        TrainConfig(optimizer="adagrad")  # a close spelling is not offered: adagrad is no adam
    with pytest.raises(ConfigError, match=r"precision 'bf16-true': weights kept in that dtype have no"):
        TrainConfig(precision="bf16-true")
