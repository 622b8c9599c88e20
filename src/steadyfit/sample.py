"""Text generation from a tinylm model: ``generate`` for a model in memory, ``sample_run`` for a run
directory's final weights."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from steadyfit.config import ConfigError
from steadyfit.layout import CONFIG_FILE, FINAL_DIR, FINAL_MODEL_FILE
from steadyfit.recipes.tinylm import TinyLM, TinyLMConfig

# Tokens are bytes; sampling only ASCII makes every new token exactly one character of the result.
_ASCII = 128


@torch.no_grad()
def generate(
    model: TinyLM,
    prompt: str,
    max_new_chars: int,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
) -> str:
    """Continue ``prompt`` by ``max_new_chars`` characters sampled from ``model``.

    Sampling draws from its own generator seeded by ``seed``: the same call gives the same text and the
    global RNG is left alone. ``temperature=0`` picks the most likely character each time.

    Args:
        model: a :class:`TinyLM` (any device; evaluated in eval mode, its mode restored afterwards).
        prompt: the start of the text (UTF-8 encoded); may be empty.
        max_new_chars: how many characters to add.
        temperature: divides the logits; lower is more conservative.
        top_k: sample among the ``top_k`` most likely characters only (None: all).
        seed: seeds the sampling.

    Returns:
        ``prompt`` followed by exactly ``max_new_chars`` generated characters.

    Raises:
        ValueError: for a negative length or temperature, or ``top_k < 1``.

    Example:
        >>> model = TinyLM(TinyLMConfig(context_length=16, d_model=32, n_layer=1))
        >>> len(generate(model, "def ", 10))
        14
    """
    if max_new_chars < 0:
        raise ValueError(f"max_new_chars: must be >= 0, got {max_new_chars}")
    if temperature < 0:
        raise ValueError(f"temperature: must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k: must be >= 1 or None, got {top_k}")
    device = next(model.parameters()).device
    context_length = model.config.context_length
    # An empty prompt still needs one token to condition on: start after a newline, as a file line does.
    tokens = list(prompt.encode("utf-8")) or [ord("\n")]
    generator = torch.Generator(device=device).manual_seed(seed)
    new_tokens: list[int] = []
    was_training = model.training
    model.eval()
    try:
        for _ in range(max_new_chars):
            context = torch.tensor([tokens[-context_length:]], dtype=torch.long, device=device)
            logits = model(context)[0, -1, :_ASCII].float()
            new_tokens.append(_pick(logits, temperature, top_k, generator))
            tokens.append(new_tokens[-1])
    finally:
        model.train(was_training)
    return prompt + bytes(new_tokens).decode("ascii")


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        threshold = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def load_tinylm(run_dir: str | Path, device: str | torch.device = "cpu") -> TinyLM:
    """The tinylm model of a run directory, rebuilt from its final weights.

    The architecture follows from the tensors' shapes (see :meth:`TinyLMConfig.from_state_dict`); the
    weights are read with safetensors, never unpickled.

    Raises:
        ConfigError: when the directory is not a finished tinylm run.
    """
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    weights_path = run_dir / FINAL_DIR / FINAL_MODEL_FILE
    if not config_path.is_file():
        raise ConfigError(f"{run_dir}: no {CONFIG_FILE} here; is it a steadyfit run directory?")
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_path}: not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{config_path}: expected a mapping of config fields")
    recipe = config.get("recipe")
    if recipe is not None and recipe != "tinylm":
        raise ConfigError(f"{config_path}: a run of recipe {recipe!r}; sampling needs a tinylm run")
    if not weights_path.is_file():
        raise ConfigError(
            f"{weights_path}: no final weights; the run has not finished (rerun `steadyfit fit` with the "
            "same run_dir to complete it)"
        )
    try:
        state = load_file(weights_path, device=str(device))
    except (SafetensorError, OSError) as exc:
        raise ConfigError(f"{weights_path}: cannot read the weights ({exc})") from None
    try:
        model = TinyLM(TinyLMConfig.from_state_dict(state))
        model.load_state_dict(state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{weights_path}: not the weights of a tinylm model ({exc})") from None
    return model.to(device)


def sample_run(
    run_dir: str | Path,
    prompt: str = "def ",
    chars: int = 300,
    temperature: float = 0.8,
    top_k: int | None = 40,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> str:
    """Text generated by a finished tinylm run: ``prompt`` followed by ``chars`` sampled characters.

    Raises:
        ConfigError: when ``run_dir`` has no final weights or is not a tinylm run.

    Example:
        >>> print(sample_run("runs/tinylm", prompt="def ", chars=200))  # doctest: +SKIP
    """
    return generate(load_tinylm(run_dir, device), prompt, chars, temperature, top_k, seed)
