"""The `tinylm` recipe: a character-level causal transformer trained on the Python standard library's own
source files (found through ``sysconfig``, no download), with a token-level ``(sum, count)`` loss."""

from __future__ import annotations

import math
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from steadyfit.config import ConfigError, TrainConfig
from steadyfit.recipes import Recipe

# One token per byte: every file encodes, nothing is "unknown", and the vocabulary never depends on data.
VOCAB_SIZE = 256
IGNORE_INDEX = -100
PAD_TOKEN = 0
# Fixed so every head count follows from the width alone: a weights file then determines its architecture.
HEAD_DIM = 32

# The split is fixed (not config.seed) so every run trains and evaluates on the same files.
SPLIT_SEED = 0
EVAL_FRACTION = 0.05
# Caps keep building the data well under a second and make eval a small, fixed share of a run.
MAX_TRAIN_BYTES = 8_000_000
MAX_EVAL_WINDOWS = 512
SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib"})


@dataclass(frozen=True)
class TinyLMConfig:
    """Hyperparameters of the tinylm model; the defaults are the recipe's model.

    ``d_model`` must be a multiple of ``HEAD_DIM`` (32): the model has ``d_model // 32`` heads.

    Example:
        >>> TinyLMConfig(d_model=64, n_layer=2).n_head
        2
    """

    vocab_size: int = VOCAB_SIZE
    context_length: int = 128
    d_model: int = 64
    n_layer: int = 3
    mlp_ratio: int = 4

    def __post_init__(self) -> None:
        if self.d_model < HEAD_DIM or self.d_model % HEAD_DIM:
            raise ValueError(f"d_model: must be a positive multiple of {HEAD_DIM}, got {self.d_model}")
        for name in ("vocab_size", "context_length", "n_layer", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")

    @property
    def n_head(self) -> int:
        return self.d_model // HEAD_DIM

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> TinyLMConfig:
        """The hyperparameters a tinylm state dict was saved from (its shapes determine them).

        Raises:
            KeyError: when a tensor every tinylm model has is missing.
            ValueError: when the shapes do not fit together as a tinylm model.
        """
        vocab_size, d_model = state["tok_emb.weight"].shape
        context_length = state["pos_emb.weight"].shape[0]
        n_layer = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
        hidden = state["blocks.0.mlp.0.weight"].shape[0]
        if hidden % d_model:
            raise ValueError(f"MLP width {hidden} is not a multiple of d_model {d_model}")
        return cls(
            vocab_size=vocab_size,
            context_length=context_length,
            d_model=d_model,
            n_layer=n_layer,
            mlp_ratio=hidden // d_model,
        )


# ------------------------------------------------------------------------------------------------ data
def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The ``.py`` files of the standard library, sorted by relative path (tests and site-packages left out).

    Raises:
        ConfigError: when the directory holds no Python source (a stripped installation).
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files: list[Path] = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [name for name in subdirs if name not in SKIPPED_DIRS]
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    if not files:
        raise ConfigError(
            f"recipe tinylm: no .py files under the standard library directory {root}; "
            "this Python installation ships without its sources"
        )
    return sorted(files, key=lambda path: path.relative_to(root).as_posix())


def split_files(files: list[Path]) -> tuple[list[Path], list[Path]]:
    """A fixed, seeded split of whole files into (train, eval): no file contributes to both."""
    shuffled = list(files)
    random.Random(SPLIT_SEED).shuffle(shuffled)
    num_eval = max(1, math.ceil(len(shuffled) * EVAL_FRACTION))
    return shuffled[num_eval:], shuffled[:num_eval]


def read_corpus(files: list[Path], max_bytes: int) -> torch.Tensor:
    """The files' bytes concatenated in order, stopping at ``max_bytes``, as a uint8 tensor."""
    chunks: list[bytes] = []
    size = 0
    for path in files:
        if size >= max_bytes:
            break
        text = path.read_bytes()
        chunks.append(text)
        size += len(text)
    corpus = b"".join(chunks)[:max_bytes]
    return torch.frombuffer(bytearray(corpus), dtype=torch.uint8)


class CharWindows(Dataset):
    """Consecutive, non-overlapping windows of a byte stream: ``(inputs, targets)`` shifted by one.

    The last window is padded: its inputs with ``PAD_TOKEN`` and its targets with ``IGNORE_INDEX``, which
    the loss leaves out.

    Example:
        >>> windows = CharWindows(torch.tensor(list(b"abcdef"), dtype=torch.uint8), context_length=4)
        >>> [bytes(t.tolist()) for t in windows[0]]
        [b'abcd', b'bcde']
    """

    def __init__(self, data: torch.Tensor, context_length: int) -> None:
        if data.numel() < 2:
            raise ValueError("CharWindows needs at least two tokens")
        self.data = data
        self.context_length = context_length

    def __len__(self) -> int:
        return math.ceil((self.data.numel() - 1) / self.context_length)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        start = index * self.context_length
        chunk = self.data[start : start + self.context_length + 1].long()
        inputs = torch.full((self.context_length,), PAD_TOKEN, dtype=torch.long)
        targets = torch.full((self.context_length,), IGNORE_INDEX, dtype=torch.long)
        inputs[: chunk.numel() - 1] = chunk[:-1]
        targets[: chunk.numel() - 1] = chunk[1:]
        return inputs, targets


def load_stdlib_windows(
    context_length: int, root: str | Path | None = None
) -> tuple[CharWindows, CharWindows]:
    """Train and eval windows over the standard library source, split by file.

    Example:
        >>> train, evaluation = load_stdlib_windows(128)
        >>> len(evaluation)
        512
    """
    train_files, eval_files = split_files(stdlib_files(root))
    train = read_corpus(train_files, MAX_TRAIN_BYTES)
    evaluation = read_corpus(eval_files, MAX_EVAL_WINDOWS * context_length + 1)
    return CharWindows(train, context_length), CharWindows(evaluation, context_length)


# ----------------------------------------------------------------------------------------------- model
class CausalSelfAttention(nn.Module):
    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_head, HEAD_DIM).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.d_model
        self.attn_norm = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.mlp_norm = nn.LayerNorm(config.d_model)
        self.mlp = nn.Sequential(
            nn.Linear(config.d_model, hidden, bias=False),
            nn.GELU(),
            nn.Linear(hidden, config.d_model, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    """A small GPT: token and position embeddings, pre-norm blocks, final norm, head tied to the embedding.

    Example:
        >>> model = TinyLM(TinyLMConfig(context_length=16, d_model=32, n_layer=1))
        >>> model(torch.zeros(2, 16, dtype=torch.long)).shape
        torch.Size([2, 16, 256])
    """

    def __init__(self, config: TinyLMConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.context_length, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        # Tying saves vocab_size x d_model parameters and helps a model this small learn faster.
        self.head.weight = self.tok_emb.weight
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
        # Each block adds two residual branches: scale their outputs so the stream's variance stays flat.
        for block in self.blocks:
            for weight in (block.attn.proj.weight, block.mlp[2].weight):
                nn.init.normal_(weight, std=0.02 / math.sqrt(2 * self.config.n_layer))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` for token ids ``(B, T)`` with ``T <= context_length``."""
        length = inputs.shape[1]
        if length > self.config.context_length:
            raise ValueError(f"input length {length} exceeds context_length {self.config.context_length}")
        positions = torch.arange(length, device=inputs.device)
        x = self.tok_emb(inputs) + self.pos_emb(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


# ------------------------------------------------------------------------------------------ loss, metric
def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-level cross-entropy as ``(sum, count)`` over the targets that are not ``IGNORE_INDEX``.

    The count stays a tensor, so no host read; steadyfit divides by the count of the whole accumulation
    window, which makes ``batch_size=B*K`` and ``B`` with ``grad_accum_steps=K`` the same update.

    Example:
        >>> total, count = lm_loss(torch.zeros(1, 2, 256), torch.tensor([[65, IGNORE_INDEX]]))
        >>> round(float(total), 4), int(count)
        (5.5452, 1)
    """
    # float32: a bf16 log-softmax over 256 classes loses the digits the loss curve is read at.
    total = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return total, (targets != IGNORE_INDEX).sum()


def token_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-character top-1 accuracy as ``(correct, count)`` over the targets that are not ignored."""
    kept = targets != IGNORE_INDEX
    correct = ((logits.argmax(dim=-1) == targets) & kept).sum().to(torch.float32)
    return correct, kept.sum()


def build_model(config: TinyLMConfig | None = None) -> TinyLM:
    """The recipe's model (default hyperparameters unless ``config`` is given)."""
    return TinyLM(config or TinyLMConfig())


def build(config: TrainConfig) -> Recipe:
    """Model, stdlib windows, token-level loss and accuracy for the tinylm recipe.

    Example:
        >>> recipe = build(TrainConfig(max_steps=10))
        >>> inputs, targets = recipe.train_data[0]
        >>> bool((inputs[1:] == targets[:-1]).all())
        True
    """
    model_config = TinyLMConfig()
    train_data, eval_data = load_stdlib_windows(model_config.context_length)
    return Recipe(
        model=build_model(model_config),
        train_data=train_data,
        eval_data=eval_data,
        loss_fn=lm_loss,
        metrics={"accuracy": token_accuracy},
    )
