"""A tiny GPT-2 trained with its own loss (``loss_fn=None``) on ragged rows padded by ``PadToLongest``:
``torchrun ... hf_dist_script.py RUN_DIR key=value ...`` (TrainConfig fields), or ``build_trainer`` in the
test's own process for the 1-rank reference.

Prints `result RANK {json}` at the end (the eval loss after training), one write per line.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it: nothing here may download

import torch
import transformers

from steadyfit import Trainer, seed_everything
from steadyfit.config import make_config, parse_overrides
from steadyfit.hf import PadToLongest

TEXT = b"every rank holds a different number of tokens, and the window is normalised over all of them. " * 4
# Ragged rows, 1 to 24 tokens (a row of 1 predicts nothing); 26 is not a multiple of the global batch of 8.
TRAIN_LENGTHS = [24, 3, 17, 1, 9, 22, 5, 14, 2, 19, 8, 24, 11, 4, 16, 7, 21, 6, 13, 1, 18, 10, 23, 12, 3, 15]
EVAL_LENGTHS = [7, 19, 2, 24, 11, 5, 16, 1, 22, 9, 14, 3, 18]
DEFAULTS = {
    "seed": 7,
    "max_steps": 4,
    "max_epochs": None,
    "log_every": 1,
    "progress": False,
    "optimizer": "sgd",
    "lr": 0.5,
    "device": "cpu",
}


def byte_rows(lengths: list[int], offset: int) -> list[dict[str, list[int]]]:
    rows = []
    for index, length in enumerate(lengths):
        start = (offset + 11 * index) % (len(TEXT) - length)
        tokens = list(TEXT[start : start + length])
        rows.append({"input_ids": tokens, "labels": tokens})
    return rows


def build_trainer(run_dir: str, overrides: dict[str, Any]) -> Trainer:
    """The run's Trainer; the model is built after seeding, so every process starts from the same weights."""
    config = make_config({"run_dir": run_dir, **DEFAULTS, **overrides})
    seed_everything(config.seed)
    # No dropout: ranks draw other random numbers than one process does.
    gpt2 = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=32, vocab_size=256, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    gpt2.resid_pdrop = gpt2.embd_pdrop = gpt2.attn_pdrop = 0.0
    model = transformers.GPT2LMHeadModel(gpt2)
    return Trainer(
        model,
        config,
        train_data=byte_rows(TRAIN_LENGTHS, offset=0),
        eval_data=byte_rows(EVAL_LENGTHS, offset=5),
        collate_fn=PadToLongest(),
    )


def main() -> None:
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    result = build_trainer(sys.argv[1], parse_overrides(sys.argv[2:])).fit()
    payload = json.dumps({"global_step": result.global_step, "metrics": result.metrics})
    sys.stdout.write(f"result {os.environ.get('RANK', '0')} {payload}\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
