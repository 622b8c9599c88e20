"""Other trainers' names for our settings: the hints config errors give Hugging Face and Lightning users."""

from __future__ import annotations

import difflib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FOREIGN_NAMES",
    "HF_OPTIMIZERS",
    "HF_OPTIMIZERS_REFUSED",
    "HF_SCHEDULERS",
    "LIGHTNING_PRECISION",
    "MIGRATING_DOC",
    "ForeignName",
    "foreign_argument_hint",
    "foreign_name_hint",
    "foreign_value_hint",
]

MIGRATING_DOC = "docs/migrating.md"

HF = "the Hugging Face Trainer's"
LIGHTNING = "Lightning's"
CHECKPOINT_CALLBACK = "Lightning ModelCheckpoint's"
EARLY_STOPPING = "Lightning EarlyStopping's"


@dataclass(frozen=True)
class ForeignName:
    """A setting of another trainer, the steadyfit fields that hold it, and how its values translate.

    Attributes:
        owner: whose setting it is, as a possessive ("the Hugging Face Trainer's").
        fields: the steadyfit fields; empty when steadyfit has none (``note`` then says what to do).
        note: how values translate, or the way out when there is no field.
    """

    owner: str
    fields: tuple[str, ...]
    note: str = ""


# Names that are also ours (max_grad_norm, warmup_ratio, precision, max_steps, ...) never reach this table:
# they are valid fields. docs/migrating.md has the same rows, and a test keeps the two in step.
FOREIGN_NAMES: dict[str, ForeignName] = {
    # Hugging Face TrainingArguments
    "output_dir": ForeignName(HF, ("run_dir",)),
    "data_seed": ForeignName(HF, ("seed",), "one seed; the data order is a function of (seed, epoch)"),
    "num_train_epochs": ForeignName(HF, ("max_epochs",), "whole epochs only"),
    "per_device_train_batch_size": ForeignName(HF, ("batch_size",), "per process, as in Hugging Face"),
    "per_device_eval_batch_size": ForeignName(HF, ("eval_batch_size",)),
    "gradient_accumulation_steps": ForeignName(HF, ("grad_accum_steps",)),
    "auto_find_batch_size": ForeignName(HF, ("micro_batch_size",), "micro_batch_size=auto"),
    "optim": ForeignName(HF, ("optimizer",), "adamw_torch / adamw_torch_fused is adamw"),
    "learning_rate": ForeignName(HF, ("lr",)),
    "adam_beta1": ForeignName(HF, ("betas",), "betas=[adam_beta1, adam_beta2]"),
    "adam_beta2": ForeignName(HF, ("betas",), "betas=[adam_beta1, adam_beta2]"),
    "adam_epsilon": ForeignName(HF, ("eps",)),
    "lr_scheduler_type": ForeignName(
        HF, ("scheduler",), "constant_with_warmup is constant, warmup_stable_decay is wsd"
    ),
    "lr_scheduler_kwargs": ForeignName(
        HF,
        ("min_lr_ratio", "decay_ratio"),
        "min_lr_rate is min_lr_ratio, wsd's num_decay_steps is decay_ratio",
    ),
    "bf16": ForeignName(HF, ("precision",), "precision=bf16"),
    "fp16": ForeignName(HF, ("precision",), "precision=fp16"),
    "eval_strategy": ForeignName(HF, ("eval_every",), "'no' is 0, 'steps' is eval_steps, 'epoch' is 'epoch'"),
    "evaluation_strategy": ForeignName(
        HF, ("eval_every",), "'no' is 0, 'steps' is eval_steps, 'epoch' is 'epoch'"
    ),
    "eval_steps": ForeignName(HF, ("eval_every",)),
    "logging_strategy": ForeignName(
        HF, ("log_every",), "'no' is 0, 'steps' is logging_steps, 'epoch' is 'epoch'"
    ),
    "logging_steps": ForeignName(HF, ("log_every",)),
    "save_strategy": ForeignName(HF, ("save_every",), "'no' is 0, 'steps' is save_steps, 'epoch' is 'epoch'"),
    "save_steps": ForeignName(HF, ("save_every",)),
    "save_total_limit": ForeignName(HF, ("keep_last",), "the best checkpoints are kept beside them"),
    "metric_for_best_model": ForeignName(HF, ("metric_for_best",)),
    "load_best_model_at_end": ForeignName(HF, ("load_best_at_end",)),
    "resume_from_checkpoint": ForeignName(HF, ("resume",), "auto (the default), never, or a checkpoint path"),
    "dataloader_num_workers": ForeignName(HF, ("num_workers",)),
    "dataloader_persistent_workers": ForeignName(HF, ("persistent_workers",)),
    "full_determinism": ForeignName(HF, ("deterministic",)),
    "torch_compile": ForeignName(HF, ("compile",)),
    "report_to": ForeignName(HF, ("loggers",), "tensorboard, mlflow, wandb; metrics.jsonl is always written"),
    "disable_tqdm": ForeignName(HF, ("progress",), "disable_tqdm=true is progress=false"),
    "use_cpu": ForeignName(HF, ("device",), "device=cpu"),
    "fsdp": ForeignName(HF, ("strategy",), "strategy=fsdp"),
    "fsdp_config": ForeignName(HF, ("fsdp_blocks",), "its transformer_layer_cls_to_wrap"),
    "activation_checkpointing": ForeignName(HF, ("gradient_checkpointing",)),
    "logging_nan_inf_filter": ForeignName(
        HF, ("on_nonfinite",), "a non-finite step is skipped (on_nonfinite=skip) or stops the run (raise)"
    ),
    "remove_unused_columns": ForeignName(
        HF, (), "the whole dict batch reaches model(**batch); drop columns with dataset.remove_columns"
    ),
    "label_names": ForeignName(
        HF, (), "labels are batch['labels'], or the targets of an (inputs, targets) pair"
    ),
    # Lightning Trainer (and LightningCLI's seed_everything)
    "default_root_dir": ForeignName(LIGHTNING, ("run_dir",)),
    "seed_everything": ForeignName(LIGHTNING, ("seed",)),
    "accumulate_grad_batches": ForeignName(LIGHTNING, ("grad_accum_steps",)),
    "gradient_clip_val": ForeignName(
        LIGHTNING,
        ("max_grad_norm", "clip_value"),
        "max_grad_norm for gradient_clip_algorithm='norm' (the default), clip_value for 'value'",
    ),
    "gradient_clip_algorithm": ForeignName(
        LIGHTNING, ("max_grad_norm", "clip_value"), "'norm' is max_grad_norm, 'value' is clip_value"
    ),
    "val_check_interval": ForeignName(
        LIGHTNING, ("eval_every",), "N steps is eval_every=N, 1.0 is eval_every=epoch"
    ),
    "check_val_every_n_epoch": ForeignName(LIGHTNING, ("eval_every",), "1 is eval_every=epoch"),
    "limit_val_batches": ForeignName(LIGHTNING, ("limit_eval_batches",), "0 is eval_every=0"),
    "log_every_n_steps": ForeignName(LIGHTNING, ("log_every",)),
    "enable_progress_bar": ForeignName(LIGHTNING, ("progress",)),
    "accelerator": ForeignName(LIGHTNING, ("device",), "'gpu' is 'cuda'"),
    "devices": ForeignName(LIGHTNING, (), "launch with `torchrun --nproc-per-node N`"),
    "num_nodes": ForeignName(LIGHTNING, (), "launch with `torchrun --nnodes M`"),
    "logger": ForeignName(LIGHTNING, ("loggers",), "tensorboard, mlflow, wandb, csv"),
    "detect_anomaly": ForeignName(LIGHTNING, ("on_nonfinite",), "on_nonfinite=raise"),
    "callbacks": ForeignName(
        "Hugging Face's and Lightning's",
        (),
        "pass Trainer(callbacks=[...]) with steadyfit.Callback subclasses",
    ),
    "ckpt_path": ForeignName(LIGHTNING, ("resume",), "'last' is resume=auto (the default)"),
    "save_top_k": ForeignName(CHECKPOINT_CALLBACK, ("keep_best",), "by metric_for_best"),
    "every_n_train_steps": ForeignName(CHECKPOINT_CALLBACK, ("save_every",)),
    "monitor": ForeignName(CHECKPOINT_CALLBACK, ("metric_for_best",)),
    "mode": ForeignName(CHECKPOINT_CALLBACK, ("greater_is_better",), "'max' is true, 'min' is false"),
    "patience": ForeignName(EARLY_STOPPING, ("early_stopping_patience",)),
    "min_delta": ForeignName(EARLY_STOPPING, ("early_stopping_threshold",)),
}

# Values of another trainer for a setting whose name we share or translate: theirs -> ours.
HF_OPTIMIZERS: dict[str, str] = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",
    "sgd": "sgd",
}
# Hugging Face optimizers that share a name with ours but not its arithmetic -> why, and what to do.
HF_OPTIMIZERS_REFUSED: dict[str, str] = {
    "adafactor": (
        "the Hugging Face Trainer builds transformers' Adafactor with a fixed lr (scale_parameter=False, "
        "relative_step=False); steadyfit's adafactor is torch.optim.Adafactor, whose step is "
        "min(lr, 1/sqrt(t)) scaled by each parameter's RMS: other updates. Choose with an override: "
        "from_hf(args, optimizer='adafactor') takes torch's; to keep Hugging Face's, from_hf(args, "
        "optimizer='adamw') and Trainer(..., optimizer=functools.partial(transformers.optimization."
        "Adafactor, lr=..., scale_parameter=False, relative_step=False)), which replaces the config's choice"
    ),
}
HF_SCHEDULERS: dict[str, str] = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant",
    "constant_with_warmup": "constant",
    "cosine_with_min_lr": "cosine",
    "warmup_stable_decay": "wsd",
}
# YAML reads `precision: 16` as an int, so Lightning's integer spellings are keys too.
LIGHTNING_PRECISION: dict[Any, str] = {
    "bf16-mixed": "bf16",
    "16-mixed": "fp16",
    "16": "fp16",
    16: "fp16",
    "32-true": "fp32",
    "32": "fp32",
    32: "fp32",
}

# Lightning precisions with no steadyfit equivalent, and why (their values -> the clause that says so).
_LIGHTNING_PRECISION_WITHOUT_EQUIVALENT = {
    value: "weights kept in that dtype have no steadyfit equivalent: steadyfit's 'bf16' and 'fp16' are mixed "
    "precision (float32 weights, autocast)"
    for value in ("bf16-true", "16-true", "64-true", "64", 64)
}

# Our field -> (whose values, their name for the setting, their value -> ours).
_FOREIGN_VALUES: dict[str, tuple[str, str, Mapping[Any, Any]]] = {
    "precision": (LIGHTNING, "precision", LIGHTNING_PRECISION),
    "optimizer": (HF, "optim", HF_OPTIMIZERS),
    "scheduler": (HF, "lr_scheduler_type", HF_SCHEDULERS),
    "device": (LIGHTNING, "accelerator", {"gpu": "cuda"}),
    "max_steps": ("Hugging Face's and Lightning's", "max_steps", {-1: None}),
    "max_epochs": (LIGHTNING, "max_epochs", {-1: None}),
}


def foreign_name_hint(name: str) -> str | None:
    """Our field for another trainer's setting ``name``, as one clause; None when it is not in the table.

    Example:
        >>> foreign_name_hint("learning_rate")
        "the Hugging Face Trainer's `learning_rate` is steadyfit's `lr` (docs/migrating.md)"
    """
    foreign = FOREIGN_NAMES.get(name)
    if foreign is None:
        return None
    if not foreign.fields:
        return f"{foreign.owner} `{name}` has no steadyfit field: {foreign.note} ({MIGRATING_DOC})"
    fields = " or ".join(f"`{field}`" for field in foreign.fields)
    note = f": {foreign.note}" if foreign.note else ""
    return f"{foreign.owner} `{name}` is steadyfit's {fields}{note} ({MIGRATING_DOC})"


def foreign_value_hint(field: str, value: Any) -> str | None:
    """Our value for another trainer's value of ``field``, as one clause; None when there is none.

    Example:
        >>> foreign_value_hint("precision", "bf16-mixed")
        "Lightning's precision 'bf16-mixed' is steadyfit's 'bf16'"
    """
    owner, their_name, translation = _FOREIGN_VALUES.get(field, ("", "", {}))
    # bool is an int: True must not read as Lightning's precision 1.
    if not isinstance(value, Hashable) or isinstance(value, bool):
        return None
    if field == "precision" and value in _LIGHTNING_PRECISION_WITHOUT_EQUIVALENT:
        return f"Lightning's precision {value!r}: {_LIGHTNING_PRECISION_WITHOUT_EQUIVALENT[value]}"
    if value not in translation:
        return None
    ours = translation[value]
    return f"{owner} {their_name} {value!r} is steadyfit's {'null' if ours is None else repr(ours)}"


_TOKENIZER_ANSWER = (
    "nothing: tokenize in the dataset or the collate_fn, and save the tokenizer beside the final weights "
    "yourself (tokenizer.save_pretrained(RUN_DIR/final))"
)

# Keyword arguments of the Hugging Face Trainer and of Lightning's fit() -> what steadyfit's Trainer takes.
_TRAINER_ARGUMENTS: dict[str, tuple[str, str]] = {
    "args": (HF, "config=TrainConfig.from_hf(args)"),
    "train_dataset": (HF, "train_data="),
    "eval_dataset": (HF, "eval_data="),
    "data_collator": (HF, "collate_fn="),
    "compute_metrics": (
        HF,
        "metrics={name: fn}, each fn(outputs, targets) returning a mean or (sum, count) "
        "(steadyfit.accuracy, or a torchmetrics Metric)",
    ),
    "compute_loss_func": (HF, "loss_fn="),
    "optimizers": (HF, "optimizer= and scheduler="),
    "tokenizer": (HF, _TOKENIZER_ANSWER),
    "processing_class": (HF, _TOKENIZER_ANSWER),
    "train_dataloaders": (LIGHTNING, "train_data= (a DataLoader or, better, its dataset)"),
    "val_dataloaders": (LIGHTNING, "eval_data="),
}


def foreign_argument_hint(name: str) -> str:
    """What steadyfit's Trainer takes for another trainer's keyword argument ``name`` (or for a typo).

    Example:
        >>> foreign_argument_hint("data_collator")
        "the Hugging Face Trainer's `data_collator` is steadyfit's collate_fn= (docs/migrating.md)"
    """
    if name in _TRAINER_ARGUMENTS:
        owner, ours = _TRAINER_ARGUMENTS[name]
        return f"{owner} `{name}` is steadyfit's {ours} ({MIGRATING_DOC})"
    close = difflib.get_close_matches(name, _OUR_TRAINER_ARGUMENTS, n=1)
    suggestion = f" (did you mean '{close[0]}'?)" if close else ""
    return (
        f"`{name}` is not an argument of steadyfit's Trainer{suggestion}; it takes "
        f"{', '.join(_OUR_TRAINER_ARGUMENTS)}, and settings go in the config"
    )


_OUR_TRAINER_ARGUMENTS = (
    "model", "config", "train_data", "eval_data", "loss_fn", "metrics", "callbacks", "optimizer", "scheduler",
    "collate_fn",
)  # fmt: skip
