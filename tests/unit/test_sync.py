"""No host reads in the hot loop between logging steps (guarantee 9), and the device-side skip they rely on.

Every `.item()`, `.cpu()`, `.tolist()` and `bool()` on a tensor is counted during a run; on a GPU each is a
host-device synchronisation. With the built-in Adam/AdamW (torch's fused kernel, which takes `found_inf`)
the non-finite check stays on the device, so a step between logging steps reads nothing. The device-side
skip must book steps, skips, the schedule and the logged rows exactly as the host-side check does.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from helpers import base_config, make_mlp, make_regression
from steadyfit import BatchError, Callback, Trainer
from steadyfit.guard import DeviceSkip, NonFiniteError

READS = ("item", "cpu", "tolist", "__bool__")
LOG_EVERY = 5


@pytest.fixture
def read_counter(monkeypatch):
    counts = {"reads": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counting(self, *args, _original=original, **kwargs):
            counts["reads"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts


def _sum_count(outputs, targets):
    return torch.nn.functional.cross_entropy(outputs, targets, reduction="sum"), targets.numel()


def _reads_per_step(model, counts, grad_accum_steps):
    """Reads between the first forward of one optimizer step and the first forward of the next, by step.

    A forward hook rather than a callback: an ``on_step_end`` callback makes every step a read point.
    """
    at_forward = []
    model.register_forward_pre_hook(lambda module, args: at_forward.append(counts["reads"]))

    def by_step():
        firsts = [*at_forward[::grad_accum_steps], counts["reads"]]
        return {step: firsts[step] - firsts[step - 1] for step in range(1, len(firsts))}

    return by_step


@pytest.mark.parametrize("optimizer", ["adam", "adamw"])
@pytest.mark.parametrize("loss", ["mean", "sum_count"])
def test_no_host_read_between_logging_steps(tmp_path, read_counter, loss, optimizer):
    loss_fn = torch.nn.functional.cross_entropy if loss == "mean" else _sum_count
    model = make_mlp()
    by_step = _reads_per_step(model, read_counter, grad_accum_steps=2)
    config = base_config(
        tmp_path,
        batch_size=4,
        grad_accum_steps=2,
        log_every=LOG_EVERY,
        max_epochs=1,
        max_grad_norm=1.0,
        scheduler="cosine",
        warmup_steps=2,
        optimizer=optimizer,
        lr=0.01,
    )
    Trainer(model, config, train_data=make_regression(80), loss_fn=loss_fn).fit()
    reads = by_step()
    # Step 1 is checked on the host (see Trainer._train_step); the last step ends the run.
    quiet = {step: n for step, n in reads.items() if step % LOG_EVERY and 1 < step < len(reads)}
    assert len(quiet) >= 6, "the run must have steps between logging steps"
    assert set(quiet.values()) == {0}, f"host reads per non-logging step: {quiet}"
    assert all(reads[step] > 0 for step in reads if step % LOG_EVERY == 0)


def test_sgd_checks_each_step_on_the_host(tmp_path, read_counter):
    # Documented: SGD stays on torch's foreach kernel (bitwise equal to a hand-written torch.optim.SGD loop),
    # which has no found_inf hook, so its guard reads one flag per step.
    model = make_mlp()
    by_step = _reads_per_step(model, read_counter, grad_accum_steps=1)
    config = base_config(tmp_path, batch_size=4, log_every=LOG_EVERY, optimizer="sgd", momentum=0.9, lr=0.01)
    trainer = Trainer(
        model, config, train_data=make_regression(40), loss_fn=torch.nn.functional.cross_entropy
    )
    trainer.fit()
    assert trainer.device_skip is None
    reads = by_step()
    assert {reads[step] for step in (2, 3, 4, 6, 7, 8, 9)} == {1}


def _poisoned_data():
    data = make_regression(96)
    inputs = data.tensors[0]
    inputs[7] = float("nan")  # two poisoned samples: non-finite loss
    inputs[8] = float("nan")
    inputs[50, 0] = float("inf")
    return data


class StepRecorder(Callback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, trainer, state):
        self.seen.append((state.step, state.nonfinite_skips, trainer.optimizer.param_groups[0]["lr"]))


def _run(
    tmp_path, monkeypatch, name, *, device_side, data, callbacks=(), loss_fn=F.cross_entropy, **overrides
):
    values = {
        "batch_size": 4,
        "log_every": LOG_EVERY,
        "max_epochs": 2,
        "max_grad_norm": 1.0,
        "scheduler": "cosine",
        "warmup_steps": 3,
        "optimizer": "adamw",
        "weight_decay": 0.01,
        "lr": 0.05,
        "save_every": 7,
        "run_dir": str(tmp_path / name),
    }
    values.update(overrides)
    config = base_config(tmp_path, **values)
    if not device_side:
        monkeypatch.setattr(DeviceSkip, "applies", staticmethod(lambda *args, **kwargs: False))
    model = make_mlp()
    trainer = Trainer(
        model,
        config,
        train_data=data,
        eval_data=make_regression(20, seed=1),
        loss_fn=loss_fn,
        callbacks=callbacks,
    )
    result = trainer.fit()
    monkeypatch.undo()
    assert (trainer.device_skip is not None) == device_side
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    timeless = [
        {k: v for k, v in row.items() if not any(part in k for part in ("time", "per_sec", "memory"))}
        for row in rows
    ]
    return model, result, trainer, timeless


def test_device_side_skip_books_exactly_what_the_host_check_does(tmp_path, monkeypatch):
    data = _poisoned_data()
    device_model, device_result, device_trainer, device_rows = _run(
        tmp_path, monkeypatch, "device", device_side=True, data=data
    )
    host_model, host_result, host_trainer, host_rows = _run(
        tmp_path, monkeypatch, "host", device_side=False, data=data
    )
    skips = host_result.nonfinite_skips
    assert skips >= 4  # the poisoned samples land in two or three batches of each epoch
    assert device_result.nonfinite_skips == skips
    assert device_result.global_step == host_result.global_step == 2 * 96 // 4 - skips
    assert device_trainer.scheduler.state_dict() == host_trainer.scheduler.state_dict()
    assert device_rows == host_rows
    for ours, theirs in zip(
        device_model.state_dict().values(), host_model.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs)
    steps = lambda run: sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir())  # noqa: E731
    assert steps("device") == steps("host")


def test_a_step_callback_sees_each_step_exactly(tmp_path, monkeypatch):
    data = _poisoned_data()
    device_steps, host_steps = StepRecorder(), StepRecorder()
    _run(tmp_path, monkeypatch, "device", device_side=True, data=data, callbacks=[device_steps], max_epochs=1)
    _run(tmp_path, monkeypatch, "host", device_side=False, data=data, callbacks=[host_steps], max_epochs=1)
    assert device_steps.seen == host_steps.seen
    assert isinstance(device_steps.seen[-1][2], float)


class SetsGroupLr(Callback):
    """Sets every group's lr after some steps, as a hand-made warm-up or a cool-down callback does."""

    def on_step_end(self, trainer, state):
        if state.step % 3 == 0:
            for group in trainer.optimizer.param_groups:
                group["lr"] = 0.0 if state.step % 2 else group["lr"] * 0.25


def test_a_callbacks_group_lr_applies_to_the_next_step_on_both_paths(tmp_path, monkeypatch):
    # On the host the scheduler's next step overwrites it; the device-side table must do the same.
    data = _poisoned_data()
    device_model, _, _, device_rows = _run(
        tmp_path, monkeypatch, "device", device_side=True, data=data, callbacks=[SetsGroupLr()]
    )
    host_model, _, _, host_rows = _run(
        tmp_path, monkeypatch, "host", device_side=False, data=data, callbacks=[SetsGroupLr()]
    )
    assert device_rows == host_rows
    for ours, theirs in zip(
        device_model.state_dict().values(), host_model.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs)


def test_too_many_consecutive_skips_stop_with_the_same_message(tmp_path, monkeypatch):
    device_steps = []
    original_arm = DeviceSkip.arm

    def counted_arm(self, finite):
        device_steps.append(None)
        return original_arm(self, finite)

    monkeypatch.setattr(DeviceSkip, "arm", counted_arm)
    messages = []
    for name, device_side in (("device", True), ("host", False)):
        calls = []

        def nan_after_the_first_step(outputs, targets, calls=calls):
            # Step 1 is always checked on the host; from step 2 on every loss is NaN.
            calls.append(None)
            loss = F.cross_entropy(outputs, targets)
            return loss if len(calls) == 1 else loss * float("nan")

        with pytest.raises(NonFiniteError) as raised:
            _run(
                tmp_path,
                monkeypatch,
                name,
                device_side=device_side,
                data=make_regression(96),
                loss_fn=nan_after_the_first_step,
                max_consecutive_skips=3,
            )
        messages.append(str(raised.value).replace(name, "RUN"))
        if device_side:
            assert len(device_steps) == LOG_EVERY - 1  # decided on the device, booked at step 5's read
    assert messages[0] == messages[1]
    assert "4 consecutive optimizer steps" in messages[0]


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA (run where the device tool lends a GPU)"
)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_no_synchronisation_between_read_points_on_cuda(tmp_path, precision):
    # torch raises on any host-device synchronisation while the debug mode is "error": it is switched on
    # from the second step's forward (the first step is checked on the host) to the last step's forward
    # (the end of the run reads its results).
    steps = 12
    model = make_mlp()
    forwards = []

    def strict_between_read_points(module, args):
        forwards.append(None)
        if len(forwards) == 2:
            torch.cuda.set_sync_debug_mode("error")
        elif len(forwards) == steps:
            torch.cuda.set_sync_debug_mode("default")

    model.register_forward_pre_hook(strict_between_read_points)
    config = base_config(
        tmp_path,
        device="cuda",
        precision=precision,
        batch_size=4,
        log_every=0,
        max_epochs=None,
        max_steps=steps,
        max_grad_norm=1.0,
        scheduler="cosine",
        warmup_steps=2,
    )
    try:
        result = Trainer(
            model, config, train_data=make_regression(400), loss_fn=torch.nn.functional.cross_entropy
        ).fit()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert result.global_step == steps


def test_an_error_between_read_points_hands_back_a_clean_optimizer(tmp_path):
    calls = []

    def fails_in_step_3(outputs, targets):
        calls.append(None)
        if len(calls) == 3:
            raise ValueError("bad batch")
        return F.cross_entropy(outputs, targets)

    config = base_config(tmp_path, batch_size=4, log_every=LOG_EVERY, optimizer="adamw", lr=0.01)
    trainer = Trainer(make_mlp(), config, train_data=make_regression(40), loss_fn=fails_in_step_3)
    with pytest.raises(BatchError, match=r"step 3 .*raised ValueError: bad batch") as raised:
        trainer.fit()
    assert isinstance(raised.value.__cause__, ValueError)
    assert trainer.device_skip is not None
    # Mid-window: the groups held device lr views and the optimizer a found_inf flag; both are gone.
    assert all(type(group["lr"]) is float for group in trainer.optimizer.param_groups)
    assert not hasattr(trainer.optimizer, "found_inf")
