"""Every file and directory name of a run directory, one module for all of them.

A run directory::

    RUN_DIR/config.yaml                 the resolved config, written first
    RUN_DIR/metrics.jsonl               one JSON row a line (start, train, eval, diagnostic, summary)
    RUN_DIR/.lock                       held while a run (or lr-find) writes here
    RUN_DIR/checkpoints/step-00000100/  one committed checkpoint (model, state, manifest)
    RUN_DIR/final/model.safetensors     the weights at the end (and ema.safetensors with ema_decay)
    RUN_DIR/report.png, compare.png     written by ``steadyfit report``
    RUN_DIR/lr_find.png                 written by ``steadyfit lr-find``
    RUN_DIR/metrics_<kind>.csv, tensorboard/, mlflow-artifacts/   written by the optional loggers

Rotation and cleanup only ever touch entries whose names match the patterns below, so anything a user puts
in ``RUN_DIR/checkpoints/`` under another name is left alone.
"""

from __future__ import annotations

import re

# ---------------------------------------------------------------------------------- the run directory
CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = ".lock"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
FINAL_MODEL_FILE = "model.safetensors"
FINAL_EMA_FILE = "ema.safetensors"
REPORT_FILE = "report.png"
COMPARE_FILE = "compare.png"
LR_FIND_FILE = "lr_find.png"
TENSORBOARD_DIR = "tensorboard"
MLFLOW_ARTIFACTS_DIR = "mlflow-artifacts"
CSV_FILE_PATTERN = "metrics_{kind}.csv"

# --------------------------------------------------------------------------- one checkpoint directory
FORMAT_VERSION = 1

MODEL_FILE = "model.safetensors"
# A sharded (FSDP) checkpoint holds this directory instead of MODEL_FILE: one safetensors file per rank,
# written by torch.distributed.checkpoint, model and optimizer tensors together. A directory of its own
# because the reader takes every *.safetensors file of the directory it is given.
SHARDS_DIR = "shards"
SHARD_SUFFIX = ".safetensors"
MANIFEST_FILE = "manifest.json"
COMPONENT_JSON_SUFFIX = ".json"
COMPONENT_TENSORS_SUFFIX = ".safetensors"

STEP_DIR_PREFIX = "step-"
# A save in progress; a crash leaves it behind for cleanup_stray() to remove.
TMP_DIR_PREFIX = ".tmp-step-"
# A committed checkpoint moved aside while a save of the same step replaces it.
OLD_DIR_PREFIX = ".old-step-"
# A damaged checkpoint moved out of the way by a save of the same step; never deleted automatically.
DAMAGED_DIR_PREFIX = "damaged-step-"
# A checkpoint rotation is deleting (".deleting-step-…"): renamed first, so a crash mid-delete leaves no
# torn step- directory.

STEP_DIR_RE = re.compile(r"^step-(\d{8,})$")
TMP_DIR_RE = re.compile(r"^\.tmp-step-(\d{8,})-[0-9a-f]{8}$")
OLD_DIR_RE = re.compile(r"^\.old-step-(\d{8,})-[0-9a-f]{8}$")
DELETING_DIR_RE = re.compile(r"^\.deleting-step-(\d{8,})-[0-9a-f]{8}$")

# A plain basename: no separator, no leading dot (so neither "." nor ".." nor hidden files).
FILE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$")
COMPONENT_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]{0,99}$")
RESERVED_COMPONENT_NAMES = frozenset({"model", "manifest"})


def step_dir_name(step: int) -> str:
    """Directory name of the committed checkpoint for ``step``.

    Example:
        >>> step_dir_name(100)
        'step-00000100'
    """
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"{STEP_DIR_PREFIX}{step:08d}"


def tmp_dir_name(step: int, token: str) -> str:
    """Name of the temporary sibling a save of ``step`` writes into (``token``: 8 lowercase hex digits)."""
    return f"{TMP_DIR_PREFIX}{step:08d}-{token}"


def old_dir_name(step: int, token: str) -> str:
    """Name a committed checkpoint is moved to while a new save of the same step replaces it."""
    return f"{OLD_DIR_PREFIX}{step:08d}-{token}"


def deleting_dir_name(step_dir: str, token: str) -> str:
    """Name the checkpoint directory ``step_dir`` is renamed to before rotation deletes its files.

    Example:
        >>> deleting_dir_name("step-00000100", "0a1b2c3d")
        '.deleting-step-00000100-0a1b2c3d'
    """
    return f".deleting-{step_dir}-{token}"


def damaged_dir_name(step: int, token: str) -> str:
    """Name a damaged checkpoint is kept under when a new save of the same step takes its place."""
    return f"{DAMAGED_DIR_PREFIX}{step:08d}-{token}"


def step_of(name: str) -> int | None:
    """Step encoded in a committed checkpoint directory name, or None if the name is not ours.

    Example:
        >>> step_of("step-00000100"), step_of("best")
        (100, None)
    """
    match = STEP_DIR_RE.match(name)
    return int(match.group(1)) if match else None


def shard_entry(file_name: str) -> str:
    """The manifest name of a shard file: its path relative to the checkpoint directory.

    Example:
        >>> shard_entry("shard-00001-model-00001-of-00001.safetensors")
        'shards/shard-00001-model-00001-of-00001.safetensors'
    """
    return f"{SHARDS_DIR}/{file_name}"


def shard_file_of(entry: str) -> str | None:
    """The file name inside ``shards/`` a manifest name refers to, or None if it names no shard.

    Example:
        >>> shard_file_of("shards/shard-00001-model-00001-of-00001.safetensors"), shard_file_of("state.json")
        ('shard-00001-model-00001-of-00001.safetensors', None)
    """
    directory, separator, name = entry.partition("/")
    if (
        directory != SHARDS_DIR
        or not separator
        or not FILE_NAME_RE.match(name)
        or not name.endswith(SHARD_SUFFIX)
    ):
        return None
    return name


def component_files(name: str) -> tuple[str, str]:
    """The JSON and safetensors file names of component ``name``."""
    return name + COMPONENT_JSON_SUFFIX, name + COMPONENT_TENSORS_SUFFIX
