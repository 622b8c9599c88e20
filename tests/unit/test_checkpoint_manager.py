"""The checkpoint manager on its own (no Trainer), and content damage behind a matching manifest.

A checkpoint whose files match their manifest can still hold content that does not fit the run: a state
file without one component, a value of the wrong type, a tensor of the wrong shape, a pickle planted by
someone who also rewrote the manifest. Each must count as damaged (reported, kept, skipped for the previous
checkpoint), never stop the run with a traceback nor, for the pickle, run anything.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import xxhash
from safetensors.torch import save as save_safetensors

from helpers import base_config, make_mlp, make_regression
from steadyfit import Callback, CheckpointError, ConfigError, Trainer, seed_everything
from steadyfit.checkpoint.manager import CheckpointManager
from steadyfit.components import RankRNG
from steadyfit.config import TrainConfig
from steadyfit.distributed import Distributed
from steadyfit.state import TrainState

CE = torch.nn.functional.cross_entropy
ONE_PROCESS = Distributed.setup(TrainConfig())


class Counter:
    """A component of the caller's own: anything with state_dict / load_state_dict."""

    def __init__(self) -> None:
        self.value = 0

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        if not isinstance(state.get("value"), int):
            raise TypeError("value must be an int")
        self.value = state["value"]


def _components():
    return {
        "model": torch.nn.Linear(3, 2),
        "trainer_state": TrainState(),
        "rng": RankRNG(ONE_PROCESS),
        "counter": Counter(),
    }


def test_every_component_is_saved_and_restored_without_a_trainer(tmp_path):
    manager = CheckpointManager(tmp_path, ONE_PROCESS, keep_last=2)
    saved = _components()
    saved["counter"].value, saved["trainer_state"].step = 7, 7
    torch.manual_seed(3)
    manager.save(7, saved)
    manager.wait()
    expected_draw = torch.rand(1)
    assert manager.pop_committed() == [str(tmp_path / "checkpoints" / "step-00000007")]

    restored = _components()
    torch.manual_seed(99)
    path = manager.restore(restored, "auto")
    assert path.name == "step-00000007"
    assert restored["counter"].value == 7 and restored["trainer_state"].step == 7
    assert torch.equal(restored["model"].weight, saved["model"].weight)
    assert torch.equal(torch.rand(1), expected_draw), "the RNG continues where the checkpoint left it"


def _saved_at_steps_2_and_4(tmp_path):
    manager = CheckpointManager(tmp_path, ONE_PROCESS, keep_last=3)
    components = _components()
    for step in (2, 4):
        components["counter"].value = step
        manager.save(step, components)
    manager.wait()
    return manager


def test_a_component_missing_from_every_checkpoint_is_damage_and_nothing_restarts(tmp_path, capsys):
    manager = _saved_at_steps_2_and_4(tmp_path)
    more = {**_components(), "extra": Counter()}  # a component step-4 does not hold... nor step-2
    with pytest.raises(CheckpointError, match=r"every checkpoint .* is damaged.*holds no 'extra' state"):
        manager.restore(more, "auto")
    assert "skipping damaged checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]


def test_resume_never_and_a_named_checkpoint(tmp_path):
    manager = _saved_at_steps_2_and_4(tmp_path)
    with pytest.raises(ConfigError, match="resume: 'never' but"):
        manager.restore(_components(), "never")
    restored = _components()
    assert manager.restore(restored, str(tmp_path / "checkpoints" / "step-00000002")).name == "step-00000002"
    assert restored["counter"].value == 2
    with pytest.raises(ConfigError, match="is not a checkpoint directory"):
        manager.restore(_components(), str(tmp_path / "nowhere"))
    # A new run naming the checkpoints folder, or the run directory, instead of one checkpoint in it.
    newest = tmp_path / "checkpoints" / "step-00000004"
    fine_tune = CheckpointManager(tmp_path / "fine-tune", ONE_PROCESS, keep_last=3)
    for holder in (tmp_path / "checkpoints", tmp_path):
        with pytest.raises(
            ConfigError, match=rf"not a checkpoint directory but holds 2 of them; .*={newest}"
        ):
            fine_tune.restore(_components(), str(holder))
    # A directory with nothing of a checkpoint (resume=/etc, an empty folder) is a usage error too, while a
    # checkpoint that lost its manifest is damage, reported as such.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=r"is not a checkpoint directory \(no manifest.json nor any"):
        fine_tune.restore(_components(), str(elsewhere))
    (newest / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing manifest\.json"):
        fine_tune.restore(_components(), str(newest))


# ------------------------------------------------------------------------------ damage behind a manifest
class CrashAfter(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, state):
        if state.step == self.step:
            raise RuntimeError("crash")


def _fit(run_dir, crash_after=None):
    seed_everything(0)
    config = base_config(
        run_dir,
        batch_size=8,
        max_epochs=None,
        max_steps=8,
        save_every=2,
        keep_last=5,
        lr=0.05,
        scheduler="cosine",
        deterministic=True,
    )
    callbacks = [CrashAfter(crash_after)] if crash_after else []
    trainer = Trainer(
        make_mlp(dropout=0.2), config, train_data=make_regression(90), loss_fn=CE, callbacks=callbacks
    )
    if crash_after:
        with pytest.raises(RuntimeError, match="crash"):
            trainer.fit()
    else:
        trainer.fit()
    return trainer


def _rewrite(checkpoint: Path, name: str, data: bytes) -> None:
    """Replace one file of a checkpoint and its manifest record, as a careful attacker or bug would."""
    (checkpoint / name).write_bytes(data)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def _edit_state(checkpoint: Path, edit) -> None:
    document = json.loads((checkpoint / "state.json").read_text())
    edit(document["state"])
    _rewrite(checkpoint, "state.json", json.dumps(document).encode())


class Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _without_rng(state):
    del state["rng"]


def _wrong_type(state):
    state["trainer_state"]["step"] = "six"


def _wrong_rng(state):
    state["rng"]["ranks"] = []


def _wrong_optimizer_shape(checkpoint: Path):
    from safetensors.torch import load_file

    tensors = load_file(checkpoint / "state.safetensors")
    key = next(k for k in tensors if k.endswith("exp_avg"))
    tensors[key] = torch.zeros(tensors[key].numel() + 1)
    _rewrite(checkpoint, "state.safetensors", save_safetensors(tensors))


def _wrong_model_shape(checkpoint: Path):
    from safetensors.torch import load_file

    tensors = load_file(checkpoint / "model.safetensors")
    tensors["0.weight"] = torch.zeros(2, 2)
    _rewrite(checkpoint, "model.safetensors", save_safetensors(tensors))


def _planted_pickle(checkpoint: Path):
    import io

    buffer = io.BytesIO()
    torch.save({"x": Evil()}, buffer)
    _rewrite(checkpoint, "model.safetensors", buffer.getvalue())


DAMAGE = {
    "state without rng": lambda c: _edit_state(c, _without_rng),
    "a count that is a string": lambda c: _edit_state(c, _wrong_type),
    "no rng states": lambda c: _edit_state(c, _wrong_rng),
    "an optimizer tensor of the wrong shape": _wrong_optimizer_shape,
    "a weight of the wrong shape": _wrong_model_shape,
    "a planted pickle": _planted_pickle,
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return _fit(tmp_path_factory.mktemp("uninterrupted")).model.state_dict()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_content_damage_behind_a_matching_manifest_falls_back(
    tmp_path, uninterrupted, damage, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    _fit(tmp_path, crash_after=7)
    newest = tmp_path / "run" / "checkpoints" / "step-00000006"
    DAMAGE[damage](newest)
    capsys.readouterr()
    resumed = _fit(tmp_path)
    err = capsys.readouterr().err
    assert f"skipping damaged checkpoint {newest}" in err
    assert "resumed from" in err and "step-00000004" in err
    assert not (tmp_path / "pwned").exists(), "a pickle in a checkpoint was executed"
    for key, value in uninterrupted.items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_a_symlink_in_place_of_a_checkpoint_is_skipped_and_moved_aside(tmp_path, uninterrupted, capsys):
    _fit(tmp_path, crash_after=5)
    checkpoints = tmp_path / "run" / "checkpoints"
    elsewhere = tmp_path / "elsewhere"
    (checkpoints / "step-00000004").rename(elsewhere)
    (checkpoints / "step-00000006").symlink_to(elsewhere, target_is_directory=True)
    capsys.readouterr()
    resumed = _fit(tmp_path)
    assert "a symlink where a checkpoint should be" in capsys.readouterr().err
    for key, value in uninterrupted.items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    assert elsewhere.is_dir(), "the link's target is never touched"
    assert (checkpoints / "step-00000006").is_dir() and not (checkpoints / "step-00000006").is_symlink()
    assert any(p.name.startswith("damaged-step-00000006") for p in checkpoints.iterdir())


def test_another_optimizer_on_resume_is_another_experiment_not_damage(tmp_path):
    _fit(tmp_path, crash_after=3)
    config = base_config(tmp_path, batch_size=8, max_epochs=None, max_steps=8, optimizer="sgd", lr=0.05)
    trainer = Trainer(make_mlp(dropout=0.2), config, train_data=make_regression(90), loss_fn=CE)
    changed = r"another experiment \(optimizer: 'adamw' in the checkpoint, 'sgd' now"
    with pytest.raises(ConfigError, match=changed):
        trainer.fit()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002"]
