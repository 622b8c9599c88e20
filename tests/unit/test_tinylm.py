"""The tinylm recipe: file-level split, shifted windows, the (sum, count) loss, causality, training,
exact accumulation for token losses, and sampling from a run directory."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from safetensors.torch import save_file

from steadyfit import TrainConfig, Trainer
from steadyfit.config import ConfigError
from steadyfit.recipes import resolve_recipe
from steadyfit.recipes.tinylm import (
    IGNORE_INDEX,
    PAD_TOKEN,
    CharWindows,
    TinyLM,
    TinyLMConfig,
    lm_loss,
    load_stdlib_windows,
    split_files,
    stdlib_files,
    token_accuracy,
)
from steadyfit.sample import generate, sample_run

TINY = TinyLMConfig(context_length=32, d_model=32, n_layer=1)


def tiny_model(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM(TINY)


@pytest.fixture(scope="module")
def stdlib_windows():
    return load_stdlib_windows(TINY.context_length)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, stdlib_windows):
    """A tiny model trained for 30 steps on the real corpus; its eval loss before and after, and run dir."""
    train_data, eval_data = stdlib_windows
    run_dir = tmp_path_factory.mktemp("tinylm") / "run"
    config = TrainConfig(
        run_dir=str(run_dir),
        max_epochs=None,
        max_steps=30,
        batch_size=16,
        eval_batch_size=128,
        lr=3e-3,
        scheduler="cosine",
        warmup_steps=5,
        max_grad_norm=1.0,
        eval_every=0,
        progress=False,
    )
    trainer = Trainer(tiny_model(), config, train_data=train_data, eval_data=eval_data, loss_fn=lm_loss)
    before = trainer.evaluate()["eval_loss"]
    result = trainer.fit()
    return before, result.metrics["eval_loss"], run_dir


# ---------------------------------------------------------------------------------------------- data
def fake_stdlib(root, count: int = 40):
    for index in range(count):
        package = root / f"pkg{index % 3}"
        package.mkdir(exist_ok=True)
        (package / f"mod{index}.py").write_text(f"x = {index}\n" * 20)
    for skipped in ("test", "site-packages", "__pycache__"):
        (root / skipped).mkdir()
        (root / skipped / "hidden.py").write_text("hidden = True\n")
    return root


def test_split_is_by_file_fixed_and_skips_tests_and_site_packages(tmp_path):
    files = stdlib_files(fake_stdlib(tmp_path))
    assert len(files) == 40, "test/, site-packages/ and __pycache__/ are left out"
    train, evaluation = split_files(files)
    assert not set(train) & set(evaluation), "no file may be in both splits"
    assert sorted(train + evaluation) == sorted(files)
    assert len(evaluation) == 2  # ceil(5% of 40)
    assert split_files(stdlib_files(tmp_path)) == (train, evaluation), "the split is fixed"


def test_stdlib_split_is_disjoint_and_deterministic(stdlib_windows):
    train, evaluation = split_files(stdlib_files())
    assert train and evaluation and not set(train) & set(evaluation)
    again_train, again_eval = load_stdlib_windows(TINY.context_length)
    assert torch.equal(again_train.data, stdlib_windows[0].data)
    assert torch.equal(again_eval.data, stdlib_windows[1].data)
    eval_head = b"".join(path.read_bytes() for path in evaluation)[:100]
    assert bytes(again_eval.data[:100].tolist()) == eval_head, "eval text comes from the eval files"


def test_windows_shift_targets_by_one_and_pad_the_last():
    stream = torch.arange(11, dtype=torch.uint8)
    windows = CharWindows(stream, context_length=4)
    assert len(windows) == 3  # 10 (input, target) pairs in windows of 4
    inputs, targets = windows[1]
    assert inputs.tolist() == [4, 5, 6, 7]
    assert targets.tolist() == [5, 6, 7, 8]
    inputs, targets = windows[2]
    assert inputs.tolist() == [8, 9, PAD_TOKEN, PAD_TOKEN]
    assert targets.tolist() == [9, 10, IGNORE_INDEX, IGNORE_INDEX]
    with pytest.raises(IndexError):
        windows[3]


def test_recipe_resolves_and_builds_default_model():
    recipe = resolve_recipe("tinylm")(TrainConfig(max_steps=1))
    inputs, targets = recipe.eval_data[0]
    assert torch.equal(inputs[1:], targets[:-1])
    assert recipe.loss_fn is lm_loss
    assert recipe.model.head.weight is recipe.model.tok_emb.weight


# ---------------------------------------------------------------------------------------- loss, model
def test_loss_is_sum_and_count_of_non_ignored_tokens():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 256, generator=generator)
    targets = torch.randint(0, 256, (3, 5), generator=generator)
    targets[0, 3:] = IGNORE_INDEX
    targets[2, 1] = IGNORE_INDEX
    total, count = lm_loss(logits, targets)
    assert int(count) == 15 - 3
    mean = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), targets.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(total, mean * 12)
    correct, kept = token_accuracy(logits, targets)
    expected = ((logits.argmax(-1) == targets) & (targets != IGNORE_INDEX)).sum()
    assert int(kept) == 12 and int(correct) == int(expected)


def test_model_is_causal():
    model = tiny_model().eval()
    inputs = torch.randint(0, 256, (2, TINY.context_length), generator=torch.Generator().manual_seed(1))
    changed = inputs.clone()
    changed[:, 20] = (changed[:, 20] + 1) % 256
    with torch.no_grad():
        logits, changed_logits = model(inputs), model(changed)
    assert logits.shape == (2, TINY.context_length, 256)
    torch.testing.assert_close(changed_logits[:, :20], logits[:, :20], rtol=0, atol=1e-6)
    assert not torch.allclose(changed_logits[:, 20:], logits[:, 20:]), "the changed token must matter"


def test_architecture_is_recovered_from_weights():
    config = TinyLMConfig(context_length=48, d_model=64, n_layer=2, mlp_ratio=3)
    assert TinyLMConfig.from_state_dict(TinyLM(config).state_dict()) == config
    with pytest.raises(ValueError, match="multiple of 32"):
        TinyLMConfig(d_model=48)


# ------------------------------------------------------------------------------------------ training
def test_training_lowers_eval_loss(trained_run):
    before, after, _ = trained_run
    assert before == pytest.approx(math.log(256), abs=0.3), "an untrained model is near uniform"
    assert after < before - 1.0


def test_accumulation_is_exact_for_token_losses(tmp_path):
    # Ragged ignore masks give each micro-batch a different token count: a per-micro-batch mean would
    # weight them wrongly, the (sum, count) contract divides by the whole window's count.
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, 256, (24, TINY.context_length), generator=generator)
    targets = torch.randint(0, 256, (24, TINY.context_length), generator=generator)
    for row in range(24):
        targets[row, (row * 5) % TINY.context_length :] = IGNORE_INDEX
    data = torch.utils.data.TensorDataset(inputs, targets)
    start = tiny_model()

    def train(batch_size: int, grad_accum_steps: int) -> dict[str, torch.Tensor]:
        model = copy.deepcopy(start)
        config = TrainConfig(
            run_dir=str(tmp_path / f"run{batch_size}"),
            max_epochs=1,
            batch_size=batch_size,
            grad_accum_steps=grad_accum_steps,
            optimizer="sgd",
            lr=0.5,
            progress=False,
        )
        Trainer(model, config, train_data=data, loss_fn=lm_loss).fit()
        return model.state_dict()

    large, accumulated = train(8, 1), train(4, 2)
    assert any(not torch.equal(large[k], start.state_dict()[k]) for k in large), "the weights moved"
    for key in large:
        torch.testing.assert_close(accumulated[key], large[key], rtol=1e-5, atol=1e-6)


def test_bf16_trains_with_finite_loss(tmp_path, stdlib_windows):
    config = TrainConfig(
        run_dir=str(tmp_path / "run"),
        max_epochs=None,
        max_steps=3,
        batch_size=8,
        precision="bf16",
        log_every=1,
        progress=False,
    )
    Trainer(tiny_model(), config, train_data=stdlib_windows[0], loss_fn=lm_loss).fit()
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if row.get("kind") == "train"]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)


# ------------------------------------------------------------------------------------------ sampling
def test_sample_run_continues_the_prompt(trained_run):
    _, _, run_dir = trained_run
    text = sample_run(run_dir, prompt="def ", chars=50)
    assert len(text) == 54 and text.startswith("def ")
    assert sample_run(run_dir, prompt="def ", chars=50) == text, "a fixed seed gives the same text"
    assert sample_run(run_dir, prompt="def ", chars=50, seed=1) != text


def test_generate_respects_context_and_greedy_is_deterministic():
    model = tiny_model()
    long_prompt = "x" * (TINY.context_length + 10)
    text = generate(model, long_prompt, 5, temperature=0)
    assert text.startswith(long_prompt) and len(text) == len(long_prompt) + 5
    assert generate(model, "", 7, top_k=None) != "" and len(generate(model, "", 7)) == 7
    assert model.training, "generate restores the model's mode"


def test_sample_run_refuses_unfinished_or_foreign_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.yaml"):
        sample_run(tmp_path)
    (tmp_path / "config.yaml").write_text("run_dir: x\n")
    with pytest.raises(ConfigError, match="no final weights"):
        sample_run(tmp_path)
    (tmp_path / "final").mkdir()
    save_file({"0.weight": torch.zeros(2, 2)}, tmp_path / "final" / "model.safetensors")
    with pytest.raises(ConfigError, match="not the weights of a tinylm model"):
        sample_run(tmp_path)
    (tmp_path / "config.yaml").write_text("recipe: digits\n")
    with pytest.raises(ConfigError, match="digits"):
        sample_run(tmp_path)
