"""Text classification with a Hugging Face model: a tiny BERT built from a config, dict batches, the model's
own loss (``loss_fn=None``), ``steadyfit.accuracy`` on its ``SequenceClassifierOutput``, then ``predict``.

    python examples/hf_text_classification.py [RUN_DIR]

Nothing is downloaded: the model is built from a config in code and the texts are token ids made up here.
Each text mixes words of one topic with noise words; the label is the topic. Needs ``transformers``
(``pip install 'steadyfit[hf]'``); without it the script says so and exits 0.
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # this example never needs the hub

try:
    import transformers
except ImportError:
    print("examples/hf_text_classification.py: skipped, needs transformers: pip install 'steadyfit[hf]'")
    sys.exit(0)

import torch

import steadyfit
from steadyfit import TrainConfig, Trainer
from steadyfit.hf import PadToLongest

NUM_TOPICS = 3
TOPIC_WORDS = 8  # token ids 1..24: eight words per topic
VOCAB_SIZE = 64  # ids 25..63: noise words any text may hold; 0 is padding


def topic_texts(num_texts: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """Texts of 8 to 20 tokens, about a third of them words of the text's topic, the rest noise."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(num_texts):
        topic = int(torch.randint(0, NUM_TOPICS, (1,), generator=generator))
        length = int(torch.randint(8, 21, (1,), generator=generator))
        topic_ids = 1 + topic * TOPIC_WORDS + torch.randint(0, TOPIC_WORDS, (length,), generator=generator)
        noise_ids = torch.randint(1 + NUM_TOPICS * TOPIC_WORDS, VOCAB_SIZE, (length,), generator=generator)
        is_topic = torch.rand(length, generator=generator) < 0.35
        rows.append({"input_ids": torch.where(is_topic, topic_ids, noise_ids), "labels": torch.tensor(topic)})
    return rows


def main(run_dir: str) -> None:
    transformers.logging.set_verbosity_error()  # keep the output to this script's own lines
    transformers.logging.disable_progress_bar()
    steadyfit.seed_everything(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=NUM_TOPICS,
    )
    model = transformers.BertForSequenceClassification(config)
    train_config = TrainConfig(
        run_dir=run_dir, max_epochs=3, batch_size=16, lr=3e-3, optimizer="adamw", log_every=20, progress=False
    )
    test_texts = topic_texts(90, seed=3)
    trainer = Trainer(
        model,
        train_config,
        train_data=topic_texts(480, seed=1),
        eval_data=topic_texts(120, seed=2),
        metrics={"accuracy": steadyfit.accuracy},  # receives the SequenceClassifierOutput's logits
        collate_fn=PadToLongest(),  # ragged texts: pads input_ids, writes attention_mask
    )
    before = trainer.evaluate()["eval_accuracy"]
    result = trainer.fit()
    print(f"eval_accuracy={result.metrics['eval_accuracy']:.3f} (before training: {before:.3f})")

    outputs = trainer.predict(test_texts)  # one SequenceClassifierOutput, a row per text
    labels = torch.stack([text["labels"] for text in test_texts])
    test_accuracy = float((outputs.logits.argmax(dim=-1) == labels).float().mean())
    print(
        f"predict(): one {type(outputs).__name__} with logits of shape {tuple(outputs.logits.shape)}; "
        f"test accuracy {test_accuracy:.3f}"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:
        with tempfile.TemporaryDirectory(prefix="steadyfit-example-") as tmp:
            main(tmp)
