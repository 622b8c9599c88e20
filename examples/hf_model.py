"""A Hugging Face model and dataset: a tiny GPT-2 built from a config, a ``datasets.Dataset`` of byte
tokens, token-exact accumulation with ``causal_lm_loss``, and final weights ``from_pretrained`` loads.

    python examples/hf_model.py [RUN_DIR]

Nothing is downloaded: the model is built from a config in code and the tokens are the bytes of this file.
Needs the ``hf`` extra (``pip install 'steadyfit[hf]'``); without it the script says so and exits 0.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this example never needs the hub

try:
    import datasets
    import transformers
except ImportError:
    print("examples/hf_model.py: skipped, needs transformers and datasets: pip install 'steadyfit[hf]'")
    sys.exit(0)

import torch

from steadyfit import TrainConfig, Trainer, seed_everything
from steadyfit.hf import PadToLongest, causal_lm_loss


def byte_dataset(text: bytes, num_rows: int, seed: int) -> datasets.Dataset:
    """Rows of 16 to 48 consecutive bytes: token ids below 256, no tokenizer, ragged lengths."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_rows):
        length = int(torch.randint(16, 49, (1,), generator=generator))
        start = int(torch.randint(0, len(text) - length, (1,), generator=generator))
        rows.append(list(text[start : start + length]))
    columns = {"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows], "labels": rows}
    return datasets.Dataset.from_dict(columns).with_format("torch")


def main(run_dir: str) -> None:
    transformers.logging.set_verbosity_error()  # keep the output to this script's own lines
    transformers.logging.disable_progress_bar()
    seed_everything(0)
    config = transformers.GPT2Config(
        n_layer=2,
        n_head=2,
        n_embd=32,
        vocab_size=256,
        n_positions=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    text = Path(__file__).read_bytes()
    train_config = TrainConfig(
        run_dir=run_dir,
        max_steps=40,
        max_epochs=None,
        batch_size=8,
        grad_accum_steps=2,  # exact over tokens: causal_lm_loss returns (sum, count)
        lr=1e-2,
        eval_every=20,
        log_every=20,
        progress=False,
    )
    trainer = Trainer(
        model,
        train_config,
        train_data=byte_dataset(text, 256, seed=1),
        eval_data=byte_dataset(text, 32, seed=2),
        loss_fn=causal_lm_loss,
        collate_fn=PadToLongest(),
    )
    before = trainer.evaluate()["eval_loss"]
    result = trainer.fit()
    print(f"eval loss per token: {before:.3f} before, {result.metrics['eval_loss']:.3f} after")

    reloaded = transformers.GPT2LMHeadModel.from_pretrained(Path(run_dir) / "final")
    same = all(torch.equal(value, model.state_dict()[key]) for key, value in reloaded.state_dict().items())
    print(f"from_pretrained({run_dir}/final): weights identical to the trained model: {same}")


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory(prefix="steadyfit-example-") as tmp:
            main(tmp)
