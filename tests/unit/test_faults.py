"""A failing save stops training with a clear error and leaves earlier checkpoints intact; compile wiring."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors.torch import load_file

from helpers import base_config, final_weights, make_mlp, make_regression
from steadyfit import CheckpointError, Trainer
from steadyfit.checkpoint import CheckpointStore

CE = torch.nn.functional.cross_entropy


def test_disk_full_during_a_save_keeps_earlier_checkpoints(tmp_path, monkeypatch):
    config = base_config(tmp_path, batch_size=4, save_every=2, max_epochs=1, keep_last=5)
    trainer = Trainer(make_mlp(), config, train_data=make_regression(40), loss_fn=CE)
    real_rename = os.rename
    saves = []

    def full_disk_after_two_saves(src, dst, *args, **kwargs):
        if "step-" in str(dst) and "checkpoints" in str(dst):
            saves.append(dst)
            if len(saves) > 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", full_disk_after_two_saves)
    with pytest.raises(CheckpointError, match=r"No space left on device|ENOSPC") as failure:
        trainer.fit()
    assert "checkpoints" in str(failure.value)
    monkeypatch.setattr(os, "rename", real_rename)
    store = CheckpointStore(tmp_path / "run")
    good = store.list_checkpoints()
    assert [path.name for path in good] == ["step-00000002", "step-00000004"]
    assert all(store.verify(path) == [] for path in good)


def test_a_checkpoint_in_an_older_layout_is_refused_with_a_clear_error(tmp_path):
    # An intact, verified checkpoint whose components predate the single "state" component.
    config = base_config(tmp_path, batch_size=4)
    store = CheckpointStore(config.run_dir)
    store.save(3, make_mlp().state_dict(), {"trainer_state": {"step": 3}, "optimizer": {"state": {}}})
    trainer = Trainer(make_mlp(), config, train_data=make_regression(40), loss_fn=CE)
    with pytest.raises(CheckpointError, match=r"step-00000003: it has no 'state' component.*older steadyfit"):
        trainer.fit()


def test_compile_wraps_the_model_once(tmp_path, monkeypatch):
    compiled = []

    def fake_compile(module, *args, **kwargs):
        compiled.append(module)
        return module

    monkeypatch.setattr(torch, "compile", fake_compile)
    model = make_mlp()
    config = base_config(tmp_path, compile=True, batch_size=8, max_epochs=1)
    Trainer(model, config, train_data=make_regression(32), loss_fn=CE).fit()
    assert compiled == [model]


@pytest.mark.skipif(
    not os.environ.get("STEADYFIT_TEST_COMPILE"), reason="set STEADYFIT_TEST_COMPILE=1 (compiles C++)"
)
def test_compiled_training_matches_eager(tmp_path):
    weights = []
    for compile_model in (False, True):
        model = make_mlp()
        config = base_config(tmp_path / str(compile_model), compile=compile_model, optimizer="sgd", lr=0.1)
        Trainer(model, config, train_data=make_regression(32), loss_fn=CE).fit()
        weights.append(model.state_dict())
    for key in weights[0]:
        torch.testing.assert_close(weights[0][key], weights[1][key], rtol=1e-4, atol=1e-5)


def test_a_model_the_user_compiled_trains_compiled_and_saves_plain_weight_names(tmp_path):
    # torch.compile(model) names its weights "_orig_mod.*": saved so, they would not load into the model.
    # The eager backend traces with dynamo and generates no code: no C compiler needed.
    plain = make_mlp()
    config = base_config(tmp_path / "plain", optimizer="sgd", lr=0.1, save_every=2)
    Trainer(plain, config, train_data=make_regression(32), loss_fn=CE).fit()
    model = make_mlp()
    compiled = torch.compile(model, backend="eager")
    config = base_config(tmp_path / "compiled", optimizer="sgd", lr=0.1, save_every=2)
    trainer = Trainer(compiled, config, train_data=make_regression(32), loss_fn=CE)
    trainer.fit()
    assert trainer.model is model and trainer.config.compile
    run_dir = tmp_path / "compiled" / "run"
    final = final_weights(run_dir)
    assert final.keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(final[key], value, msg=key)
    for checkpoint in (run_dir / "checkpoints").iterdir():
        assert load_file(str(checkpoint / "model.safetensors")).keys() == plain.state_dict().keys()
    assert "compile: true" in (run_dir / "config.yaml").read_text()


def test_a_checkpoint_of_a_compiled_models_wrapper_still_loads_into_the_module(tmp_path):
    # Before steadyfit trained the module inside a compiled model, its checkpoints held "_orig_mod." names.
    from steadyfit.components import ModelWeights
    from steadyfit.config import TrainConfig
    from steadyfit.distributed import Distributed
    from steadyfit.identity import RunIdentity

    one_process = Distributed("none", 0, 0, 1)
    trained, model = make_mlp(seed=1), make_mlp(seed=0)
    old_names = {f"_orig_mod.{name}": value for name, value in trained.state_dict().items()}
    ModelWeights(one_process, model).load_state_dict(old_names)
    for name, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    identity = RunIdentity(TrainConfig(), one_process, make_regression(8), model, optimizer, has_ema=False)
    saved = identity.state_dict()
    for record in ("parameters", "dtypes"):
        saved[record] = {f"_orig_mod.{name}": value for name, value in saved[record].items()}
    identity.load_state_dict(saved)  # the same experiment: no ExperimentChanged
    from steadyfit.ema import WeightEMA

    ema = WeightEMA(model, decay=0.9)
    old_ema = {name.replace("module.", "module._orig_mod.", 1): v for name, v in ema.state_dict().items()}
    ema.load_state_dict(old_ema)  # the averaged weights were module._orig_mod.*
