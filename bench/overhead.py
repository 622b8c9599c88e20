"""Per-step overhead of steadyfit against the hand-written loop and its peers, on the same jobs.

Each (runner, job) pair trains in its own subprocess; repetitions are interleaved (every runner once, then
again) so a noisy neighbour hurts all runners alike. Only the training loop is timed: a global optimizer
step post-hook (``torch.optim.optimizer.register_optimizer_step_post_hook``) stamps the end of every
optimizer step, and the time per step is ``(last stamp - first stamp) / (steps - 1)``, in wall time and in
the CPU time of the training process (``time.process_time``: insensitive to other processes on a shared
machine, but blind to work done in DataLoader worker processes, so use wall time for the workers job).
Imports, model and data construction, the first step (lazy optimizer state, compilation under
``torch.compile``; reported apart as ``first_step_s`` in the JSON) and anything after the last
step (a final evaluation, a final checkpoint) are outside it; evaluation at epoch boundaries between steps
is inside it, for every runner alike.

Language-model jobs (``lm``, and ``lm_compiled`` under ``torch.compile``) also report tokens per second:
the tokens of a step over the wall time per step.

Runners: ``raw`` (bench/raw_loop.py over in-memory tensors, one indexing operation per batch: the floor),
``raw_dataloader`` (the same loop fed by a standard ``torch.utils.data.DataLoader``), ``steadyfit`` (its
``Trainer``), and when installed ``hf`` (transformers.Trainer), ``lightning`` and ``accelerate``.

Usage::

    python bench/overhead.py                          # every job, 3 repetitions, markdown table
    python bench/overhead.py --jobs tiny,workers --reps 5 --json results.json
    python bench/overhead.py --jobs lm,lm_compiled --runners raw,raw_dataloader,steadyfit --threads 1
    python bench/overhead.py --smoke                  # tiny versions, 1 repetition, no peers (CI)
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.data import DataLoader, Dataset, TensorDataset

BENCH_DIR = Path(__file__).resolve().parent
SRC_DIR = BENCH_DIR.parent / "src"
JOBS = ("tiny", "compute", "digits", "workers", "lm", "lm_compiled")
# Left out of --smoke unless named: a cold torch.compile of the LM takes ~35 s on a CPU, too long for CI.
SLOW_TO_START_JOBS = ("lm_compiled",)
CORE_RUNNERS = ("raw", "raw_dataloader", "steadyfit")
PEER_RUNNERS = ("hf", "lightning", "accelerate")
RESULT_PREFIX = "RESULT "
_PEERS_WITHOUT_TOKEN_LOSS = "bench/peers train a per-sample cross-entropy, not this job's token-level loss"
NOT_APPLICABLE = {
    ("workers", "raw"): "needs a TensorDataset (this job's __getitem__ is the point)",
    **{(job, peer): _PEERS_WITHOUT_TOKEN_LOSS for job in ("lm", "lm_compiled") for peer in PEER_RUNNERS},
}
# Final losses of runners trained on the same data, seed, optimizer and schedule should agree this closely
# (peers draw their own shuffling order, so they are not bitwise equal).
LOSS_RTOL = 0.10
LOSS_ATOL = 0.02
SEED = 1234


# ------------------------------------------------------------------------------------------------ jobs
class SlowDataset(Dataset):
    """In-memory samples whose ``__getitem__`` burns a fixed, deterministic amount of CPU (a decode)."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, work: int) -> None:
        self.inputs = inputs
        self.targets = targets
        self.work = work

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Stands in for decoding or augmenting a sample: pure Python work that holds the GIL.
        checksum = 0
        for k in range(self.work):
            checksum = (checksum * 31 + k) % 1_000_003
        return self.inputs[index], self.targets[index]


@dataclass
class Job:
    """One training job, identical for every runner."""

    name: str
    build_model: Callable[[], torch.nn.Module]
    train_data: Dataset
    check_inputs: torch.Tensor  # final loss is measured on these after training, outside the timing
    check_targets: torch.Tensor
    batch_size: int
    max_steps: int
    max_epochs: int
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    log_every: int = 50
    num_workers: int = 0
    eval_each_epoch: bool = False
    eval_data: TensorDataset | None = None
    # What steadyfit's Trainer gets: a scalar mean, or (sum, count) over tokens (then the hand-written loops
    # backpropagate sum / count, the same mean).
    loss_fn: Callable[[torch.Tensor, torch.Tensor], Any] = F.cross_entropy
    # Set for language-model jobs: every target is a token the loss counts, so a step trains
    # batch_size * tokens_per_sample tokens and the table reports tokens per second.
    tokens_per_sample: int | None = None
    # torch.compile the model in every runner (steadyfit: TrainConfig(compile=True)); compilation happens
    # in the first step, which the clock leaves out.
    compile: bool = False

    @property
    def in_memory(self) -> bool:
        return isinstance(self.train_data, TensorDataset)


def _mlp(sizes: Iterable[int]) -> torch.nn.Module:
    sizes = list(sizes)
    layers: list[torch.nn.Module] = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers[:-1])


def _teacher_data(
    num_samples: int, features: int, classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian inputs labelled by a fixed random linear teacher: learnable, so losses fall and compare."""
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(num_samples, features, generator=generator)
    teacher = torch.randn(features, classes, generator=generator)
    noise = 0.5 * torch.randn(num_samples, classes, generator=generator)
    return inputs, (inputs @ teacher + noise).argmax(dim=1)


class TinyTransformer(torch.nn.Module):
    """A small encoder classifier over token sequences: compute-bound on a CPU."""

    def __init__(self, vocab: int = 64, d_model: int = 128, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, d_model)
        layer = torch.nn.TransformerEncoderLayer(
            d_model, nhead=4, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True
        )
        self.encoder = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))


def _token_data(num_samples: int, seq_len: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token sequences; the label is a simple function of token counts, so the loss can fall."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (num_samples, seq_len), generator=generator)
    return tokens, (tokens < vocab // 2).sum(dim=1) % 10


def _markov_tokens(num_windows: int, length: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of a fixed random Markov chain over ``vocab`` tokens, each token followed by one of 4 tokens
    of its own: text an LM can learn (loss floor ln 4), so final losses fall and compare. Returns
    ``(inputs, targets)``, the targets shifted by one."""
    generator = torch.Generator().manual_seed(seed)
    successors = torch.randint(0, vocab, (vocab, 4), generator=generator)
    choices = torch.randint(0, 4, (num_windows, length), generator=generator)
    tokens = torch.empty(num_windows, length + 1, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, vocab, (num_windows,), generator=generator)
    for position in range(length):  # every window at once: `length` vectorised steps
        tokens[:, position + 1] = successors[tokens[:, position], choices[:, position]]
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def token_mean(loss_fn: Callable[[torch.Tensor, torch.Tensor], Any]) -> Callable[..., torch.Tensor]:
    """The mean a hand-written loop backpropagates for ``loss_fn``: ``sum / count`` of a ``(sum, count)``
    loss (steadyfit backpropagates the sum and divides the gradients by the count: the same gradient),
    ``loss_fn`` itself for a scalar mean."""

    def mean(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = loss_fn(outputs, targets)
        if isinstance(value, tuple):
            total, count = value
            return total / count
        return value

    return mean


def _lm_job(name: str, smoke: bool) -> Job:
    """The tinylm recipe's model and token-level (sum, count) loss on Markov-chain windows of its context
    length; ``lm_compiled`` is the same job under torch.compile."""
    from steadyfit.recipes import tinylm

    model_config = tinylm.TinyLMConfig()
    batch_size = 8 if smoke else 32
    max_steps = 6 if smoke else 100
    # One epoch of whole batches: every step has the same shape, so a compiled model never recompiles for
    # a short last batch.
    num_train = batch_size * max_steps
    context, vocab = model_config.context_length, model_config.vocab_size
    inputs, targets = _markov_tokens(num_train + 64, context, vocab, SEED)
    return Job(
        name,
        lambda: tinylm.build_model(model_config),
        TensorDataset(inputs[:num_train], targets[:num_train]),
        inputs[num_train:],  # held-out windows of the same chain
        targets[num_train:],
        batch_size=batch_size,
        max_steps=max_steps,
        max_epochs=1,
        log_every=10,
        loss_fn=tinylm.lm_loss,
        tokens_per_sample=context,
        compile=name == "lm_compiled",
    )


def _digits_data() -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    inputs = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(SEED))
    inputs, targets = inputs[order], targets[order]
    split = int(0.8 * len(targets))
    return TensorDataset(inputs[:split], targets[:split]), TensorDataset(inputs[split:], targets[split:])


def make_job(name: str, smoke: bool = False) -> Job:
    """Build a job's model factory and data (deterministic: fixed seeds, no download).

    Example:
        >>> make_job("tiny", smoke=True).max_steps
        40
    """
    if name == "tiny":
        inputs, targets = _teacher_data(4096 if smoke else 16384, 32, 10, SEED)
        return Job(
            name,
            lambda: _mlp([32, 64, 64, 10]),
            TensorDataset(inputs, targets),
            inputs[:2048],
            targets[:2048],
            batch_size=64,
            max_steps=40 if smoke else 2000,
            max_epochs=1000,
        )
    if name == "compute":
        tokens, labels = _token_data(256 if smoke else 4096, 16 if smoke else 64, 64, SEED)
        return Job(
            name,
            TinyTransformer,
            TensorDataset(tokens, labels),
            tokens[:256],
            labels[:256],
            batch_size=32,
            max_steps=4 if smoke else 80,
            max_epochs=1000,
            log_every=10,
        )
    if name == "digits":
        train, evaluation = _digits_data()
        steps_per_epoch = -(-len(train) // 64)
        epochs = 1 if smoke else 10
        return Job(
            name,
            lambda: _mlp([64, 128, 10]),
            train,
            *evaluation.tensors,
            batch_size=64,
            max_steps=steps_per_epoch * epochs,
            max_epochs=epochs,
            log_every=10,
            eval_each_epoch=True,
            eval_data=evaluation,
        )
    if name == "workers":
        inputs, targets = _teacher_data(640 if smoke else 2560, 32, 10, SEED)
        return Job(
            name,
            lambda: _mlp([32, 64, 64, 10]),
            SlowDataset(inputs, targets, work=2000),
            inputs[:2048],
            targets[:2048],
            batch_size=64,
            max_steps=12 if smoke else 200,
            max_epochs=1000,
            log_every=10,
            num_workers=2,
        )
    if name in ("lm", "lm_compiled"):
        return _lm_job(name, smoke)
    raise ValueError(f"--jobs: unknown job {name!r}; choose from {', '.join(JOBS)}")


# ------------------------------------------------------------------------------- shared by all runners
class StepClock:
    """Stamps the end of every optimizer step through torch's global optimizer post-hook, in wall time and
    in this process's CPU time (robust to other processes sharing the machine)."""

    def __init__(self) -> None:
        self.count = 0
        self.started = time.perf_counter()
        self.first = self.last = 0.0
        self.first_cpu = self.last_cpu = 0.0
        self._handle = register_optimizer_step_post_hook(self._stamp)

    def _stamp(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        now, cpu = time.perf_counter(), time.process_time()
        if self.count == 0:
            self.first, self.first_cpu = now, cpu
        self.last, self.last_cpu = now, cpu
        self.count += 1

    def seconds_per_step(self) -> float:
        """Wall seconds per step between the first and the last stamp; stops stamping."""
        self._handle.remove()
        if self.count < 2:
            raise RuntimeError(f"the runner made {self.count} optimizer step(s); at least 2 are needed")
        return (self.last - self.first) / (self.count - 1)

    def result(self, model: torch.nn.Module, job: Job) -> dict[str, Any]:
        """What every runner reports: timings, step count and the final loss (measured after the timing)."""
        seconds = self.seconds_per_step()
        result = {
            "seconds_per_step": seconds,
            "cpu_seconds_per_step": (self.last_cpu - self.first_cpu) / (self.count - 1),
            "steps": self.count,
            # From the clock's start (model, data and the runner's objects built) to the end of the first
            # step, which the timing leaves out: torch.compile's compilation shows here.
            "first_step_s": self.first - self.started,
            "final_loss": final_loss(model, job),
        }
        if job.tokens_per_sample is not None:
            result["tokens_per_step"] = job.batch_size * job.tokens_per_sample
        return result


def build_model(job: Job) -> torch.nn.Module:
    """The job's model, initialised identically in every runner."""
    torch.manual_seed(SEED)
    return job.build_model()


def build_optimization(
    model: torch.nn.Module, job: Job
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (torch's fused kernel, no weight decay) and a linear decay to 0 over ``max_steps``: what
    steadyfit builds from ``optimizer=adamw, scheduler=linear``, so every runner uses the same kernel."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=job.lr, weight_decay=0.0, fused=True)
    total = job.max_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: max(0.0, 1.0 - step / total))
    return optimizer, scheduler


def evaluate(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Exact per-sample loss and accuracy (batches of 256), one host read at the end."""
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros(())
    correct = torch.zeros((), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(targets), 256):
            logits = model(inputs[start : start + 256])
            labels = targets[start : start + 256]
            loss_sum += F.cross_entropy(logits, labels, reduction="sum")
            correct += (logits.argmax(dim=1) == labels).sum()
    model.train(was_training)
    return {"loss": loss_sum.item() / len(targets), "accuracy": correct.item() / len(targets)}


def final_loss(model: torch.nn.Module, job: Job) -> float:
    """The trained model's mean loss on the job's check set: per sample, or per token for a language model."""
    if job.tokens_per_sample is None:
        return evaluate(model, job.check_inputs, job.check_targets)["loss"]
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, len(job.check_targets), job.batch_size):
            window_total, window_count = job.loss_fn(
                model(job.check_inputs[start : start + job.batch_size]),
                job.check_targets[start : start + job.batch_size],
            )
            total += window_total
            count += window_count
    model.train(was_training)
    return total.item() / count.item()


def with_epoch_evaluation(
    model: torch.nn.Module, job: Job, batches_of_epoch: Callable[[int], Iterable[Any]]
) -> Callable[[int], Iterator[Any]]:
    """Wrap an epoch's batches so the job's evaluation runs at every epoch boundary (before epochs 1, 2...),
    where the Trainer and the peers run theirs."""

    def epoch_batches(epoch: int) -> Iterator[Any]:
        if job.eval_each_epoch and epoch > 0:
            assert job.eval_data is not None
            evaluate(model, *job.eval_data.tensors)
        yield from batches_of_epoch(epoch)

    return epoch_batches


# ------------------------------------------------------------------------------------------- runners
def run_raw(job: Job, use_dataloader: bool) -> dict[str, Any]:
    from raw_loop import raw_loop, tensor_batches

    model = build_model(job)
    optimizer, scheduler = build_optimization(model, job)
    # The compiled module shares the model's parameters; the final loss is measured on the model itself.
    train_model = torch.compile(model) if job.compile else model
    if use_dataloader:
        loader = DataLoader(
            job.train_data,
            batch_size=job.batch_size,
            shuffle=True,
            num_workers=job.num_workers,
            generator=torch.Generator().manual_seed(SEED),
        )

        def batches(epoch: int) -> Iterable[Any]:
            return loader

    else:
        assert job.in_memory, "NOT_APPLICABLE lists the jobs without in-memory tensors (run_one skips them)"
        inputs, targets = job.train_data.tensors

        def batches(epoch: int) -> Iterable[Any]:
            order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(SEED + epoch))
            return tensor_batches(inputs, targets, job.batch_size, order)

    clock = StepClock()
    raw_loop(
        train_model,
        with_epoch_evaluation(model, job, batches),
        loss_fn=token_mean(job.loss_fn),
        optimizer=optimizer,
        scheduler=scheduler,
        max_epochs=job.max_epochs,
        max_steps=job.max_steps,
        max_grad_norm=job.max_grad_norm,
        log_every=job.log_every,
    )
    return clock.result(model, job)


def run_steadyfit(job: Job) -> dict[str, Any]:
    from steadyfit import TrainConfig, Trainer, accuracy

    model = build_model(job)
    with tempfile.TemporaryDirectory(prefix="bench-steadyfit-") as run_dir:
        config = TrainConfig(
            run_dir=run_dir,
            seed=SEED,
            max_steps=job.max_steps,
            max_epochs=job.max_epochs,
            batch_size=job.batch_size,
            eval_batch_size=256,
            optimizer="adamw",
            lr=job.lr,
            weight_decay=0.0,
            scheduler="linear",
            max_grad_norm=job.max_grad_norm,
            log_every=job.log_every,
            save_every=0,
            num_workers=job.num_workers,
            progress=False,
            device="cpu",
            compile=job.compile,
        )
        trainer = Trainer(
            model,
            config,
            train_data=job.train_data,
            eval_data=job.eval_data if job.eval_each_epoch else None,
            loss_fn=job.loss_fn,
            metrics={"accuracy": accuracy} if job.eval_each_epoch else None,
        )
        clock = StepClock()
        trainer.fit()
        result = clock.result(model, job)
    return result


def run_peer(runner: str, job: Job) -> dict[str, Any]:
    if runner == "hf":
        from peers import hf_runner as module
    elif runner == "lightning":
        from peers import lightning_runner as module
    else:
        from peers import accelerate_runner as module
    return module.run(job)


def run_one(runner: str, job: Job) -> dict[str, Any]:
    """Train ``job`` with ``runner`` in this process; see :meth:`StepClock.result`."""
    if (job.name, runner) in NOT_APPLICABLE:
        return {"skipped": NOT_APPLICABLE[(job.name, runner)]}
    if runner == "raw":
        return run_raw(job, use_dataloader=False)
    if runner == "raw_dataloader":
        return run_raw(job, use_dataloader=True)
    if runner == "steadyfit":
        return run_steadyfit(job)
    return run_peer(runner, job)


def is_installed(runner: str) -> bool:
    """Whether a runner's framework can be imported (looked up without importing it)."""
    modules = {
        "hf": ["transformers"],
        "lightning": ["lightning", "pytorch_lightning"],
        "accelerate": ["accelerate"],
    }.get(runner)
    if modules is None:
        return True
    return any(importlib.util.find_spec(name) is not None for name in modules)


# --------------------------------------------------------------------------------------- orchestration
@dataclass
class Measurements:
    """Every repetition of every (job, runner) pair."""

    seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    cpu_seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    losses: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    first_step_seconds: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    steps: dict[tuple[str, str], int] = field(default_factory=dict)
    tokens_per_step: dict[tuple[str, str], int] = field(default_factory=dict)
    skipped: dict[tuple[str, str], str] = field(default_factory=dict)
    failed: set[tuple[str, str]] = field(default_factory=set)

    def add(self, job: str, runner: str, result: dict[str, Any]) -> None:
        key = (job, runner)
        if "skipped" in result:
            self.skipped[key] = result["skipped"]
            if result.get("failed"):
                self.failed.add(key)
            return
        self.seconds.setdefault(key, []).append(result["seconds_per_step"])
        self.cpu_seconds.setdefault(key, []).append(result["cpu_seconds_per_step"])
        self.losses.setdefault(key, []).append(result["final_loss"])
        if "first_step_s" in result:  # logs written before it was measured lack it
            self.first_step_seconds.setdefault(key, []).append(result["first_step_s"])
        self.steps[key] = result["steps"]
        if "tokens_per_step" in result:
            self.tokens_per_step[key] = result["tokens_per_step"]


def run_worker(runners: list[str], jobs: list[str], smoke: bool, threads: int | None) -> None:
    """Child process: train each job with each runner and print one RESULT line per pair."""
    warnings.simplefilter("ignore")  # peers' advice (no GPU, no logger...) would drown the results
    sys.path.insert(0, str(BENCH_DIR))
    if threads is not None:
        torch.set_num_threads(threads)
    for name in jobs:
        for runner in runners:
            result = run_one(runner, make_job(name, smoke))
            print(RESULT_PREFIX + json.dumps({"job": name, "runner": runner, **result}), flush=True)


def spawn(runners: list[str], jobs: list[str], smoke: bool, threads: int | None) -> list[dict[str, Any]]:
    """Run a worker subprocess; return its RESULT rows, plus a ``failed`` row for each pair it did not
    report."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC_DIR), env.get("PYTHONPATH")]))
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", ",".join(runners)]
    command += ["--jobs", ",".join(jobs)]
    if smoke:
        command.append("--smoke")
    if threads is not None:
        command += ["--threads", str(threads)]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
    rows = [
        json.loads(line.removeprefix(RESULT_PREFIX))
        for line in proc.stdout.splitlines()
        if line.startswith(RESULT_PREFIX)
    ]
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        print(
            f"warning: {','.join(runners)} failed on {','.join(jobs)} (exit {proc.returncode}):\n{tail}",
            file=sys.stderr,
        )
        done = {(row["job"], row["runner"]) for row in rows}
        rows += [
            {"job": job, "runner": runner, "skipped": f"failed (exit {proc.returncode})", "failed": True}
            for job in jobs
            for runner in runners
            if (job, runner) not in done
        ]
    return rows


def measure(
    jobs: list[str], runners: list[str], reps: int, threads: int | None, log: Path | None = None
) -> Measurements:
    """Interleave repetitions: every (job, runner) once, then again, so drift hurts all runners alike.
    Each pair trains in a fresh subprocess: no runner inherits another's warm caches or imports. Every
    result row is appended to ``log`` (JSON lines) as it arrives, so an interrupted run keeps its data."""
    results = Measurements()
    for rep in range(reps):
        for job in jobs:
            for runner in runners:
                print(f"[rep {rep + 1}/{reps}] {job:8s} {runner}", file=sys.stderr, flush=True)
                if (job, runner) in NOT_APPLICABLE:
                    rows = [{"job": job, "runner": runner, "skipped": NOT_APPLICABLE[(job, runner)]}]
                else:
                    rows = spawn([runner], [job], smoke=False, threads=threads)
                for row in rows:
                    results.add(row["job"], row["runner"], row)
                    if log is not None:
                        with log.open("a", encoding="utf-8") as stream:
                            stream.write(json.dumps(row) + "\n")
    return results


def read_log(log: Path) -> Measurements:
    """Rebuild measurements from a ``--log`` file (for example of an interrupted run)."""
    results = Measurements()
    for line in log.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            results.add(row["job"], row["runner"], row)
    return results


def measure_smoke(jobs: list[str], runners: list[str], threads: int | None) -> Measurements:
    """One subprocess for every pair: CI checks that everything runs, not the timings."""
    results = Measurements()
    for row in spawn(runners, jobs, smoke=True, threads=threads):
        results.add(row["job"], row["runner"], row)
    return results


def summarise(results: Measurements, jobs: list[str], runners: list[str]) -> list[dict[str, Any]]:
    """One row per (job, runner): wall and CPU seconds per step (median, min, max), ratios to the raw loop
    and to the DataLoader loop, tokens per second (language-model jobs; None otherwise), final loss and
    whether it agrees with the raw loop's."""
    rows = []
    for job in jobs:
        present = [r for r in runners if (job, r) in results.seconds]
        wall = {r: statistics.median(results.seconds[(job, r)]) for r in present}
        cpu = {r: statistics.median(results.cpu_seconds[(job, r)]) for r in present}
        losses = {r: statistics.median(results.losses[(job, r)]) for r in present}
        reference_loss = losses.get("raw", losses.get("raw_dataloader"))
        for runner in runners:
            key = (job, runner)
            if key in results.skipped:
                rows.append({"job": job, "runner": runner, "skipped": results.skipped[key]})
                continue
            if runner not in present:
                continue
            loss = losses[runner]
            tokens_per_step = results.tokens_per_step.get(key)
            agrees = (
                reference_loss is None or abs(loss - reference_loss) <= LOSS_ATOL + LOSS_RTOL * reference_loss
            )
            rows.append(
                {
                    "job": job,
                    "runner": runner,
                    "reps": len(results.seconds[key]),
                    "steps": results.steps[key],
                    "median_s": wall[runner],
                    "min_s": min(results.seconds[key]),
                    "max_s": max(results.seconds[key]),
                    "vs_raw": _ratio(wall, runner, "raw"),
                    "vs_raw_dataloader": _ratio(wall, runner, "raw_dataloader"),
                    "cpu_median_s": cpu[runner],
                    "cpu_vs_raw": _ratio(cpu, runner, "raw"),
                    "cpu_vs_raw_dataloader": _ratio(cpu, runner, "raw_dataloader"),
                    "tokens_per_s": tokens_per_step / wall[runner] if tokens_per_step else None,
                    "final_loss": loss,
                    "loss_agrees": agrees,
                }
            )
    return rows


def _ratio(medians: dict[str, float], runner: str, reference: str) -> float | None:
    return medians[runner] / medians[reference] if reference in medians else None


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary as a markdown table (milliseconds per optimizer step, tokens per second of the median
    step where a job counts tokens; ratios of medians)."""

    def ratio(value: float | None) -> str:
        return "–" if value is None else f"{value:.2f}×"

    lines = [
        "| job | runner | wall ms/step (median) | min–max | vs raw | vs DataLoader loop "
        "| CPU ms/step | CPU vs raw | CPU vs DataLoader loop | final loss | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if "skipped" in row:
            lines.append(f"| {row['job']} | {row['runner']} | skipped: {row['skipped']} |" + " |" * 8)
            continue
        flag = "" if row["loss_agrees"] else " ⚠"
        tokens = "–" if row["tokens_per_s"] is None else f"{row['tokens_per_s']:,.0f}"
        lines.append(
            f"| {row['job']} | {row['runner']} | {1e3 * row['median_s']:.3f} | "
            f"{1e3 * row['min_s']:.3f}–{1e3 * row['max_s']:.3f} | {ratio(row['vs_raw'])} | "
            f"{ratio(row['vs_raw_dataloader'])} | {1e3 * row['cpu_median_s']:.3f} | "
            f"{ratio(row['cpu_vs_raw'])} | {ratio(row['cpu_vs_raw_dataloader'])} | "
            f"{row['final_loss']:.4f}{flag} | {tokens} |"
        )
    return "\n".join(lines)


def _parse_list(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        raise SystemExit(f"{flag}: unknown or empty {unknown or value!r}; choose from {', '.join(allowed)}")
    return items


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--jobs",
        default=None,
        help=f"comma-separated, from {', '.join(JOBS)} (default: all; with --smoke: all but "
        f"{', '.join(SLOW_TO_START_JOBS)})",
    )
    parser.add_argument(
        "--runners",
        default=None,
        help="comma-separated, from raw, raw_dataloader, steadyfit, hf, lightning, accelerate "
        "(default: all installed; with --smoke: the first three)",
    )
    parser.add_argument("--reps", type=int, default=3, help="interleaved repetitions (default 3)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results as JSON here")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny jobs, 1 repetition, for CI; no timing claims"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads in every runner (default: torch's; 1 with --smoke)",
    )
    parser.add_argument(
        "--log", type=Path, default=None, help="append every result row to this JSON-lines file as it arrives"
    )
    parser.add_argument(
        "--from-log", type=Path, default=None, help="print the table of a --log file instead of measuring"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.jobs is not None:
        jobs = _parse_list(args.jobs, JOBS, "--jobs")
    else:
        jobs = [job for job in JOBS if not (args.smoke and job in SLOW_TO_START_JOBS)]
    if args.worker is not None:
        run_worker(args.worker.split(","), jobs, args.smoke, args.threads)
        return 0
    if args.reps < 1:
        raise SystemExit("--reps: must be at least 1")
    if args.smoke and args.threads is None:
        args.threads = 1  # CI machines are often shared: one thread per runner avoids spin-wait contention
    default_runners = CORE_RUNNERS if args.smoke else CORE_RUNNERS + PEER_RUNNERS
    runners = (
        _parse_list(args.runners, CORE_RUNNERS + PEER_RUNNERS, "--runners")
        if args.runners
        else list(default_runners)
    )
    missing = [runner for runner in runners if not is_installed(runner)]
    for runner in missing:
        print(f"note: {runner} is not installed; skipped (pip install -e '.[bench]')", file=sys.stderr)
    runners = [runner for runner in runners if runner not in missing]

    if args.from_log is not None:
        results = read_log(args.from_log)
    elif args.smoke:
        results = measure_smoke(jobs, runners, args.threads)
    else:
        results = measure(jobs, runners, args.reps, args.threads, args.log)
    rows = summarise(results, jobs, runners)
    print(markdown_table(rows))
    for row in rows:
        if "skipped" not in row and not row["loss_agrees"]:
            print(
                f"warning: {row['job']}/{row['runner']} final loss {row['final_loss']:.4f} disagrees with "
                "the raw loop's: the comparison may not be like for like",
                file=sys.stderr,
            )
    if args.json is not None:
        report = {
            "smoke": args.smoke,
            "reps": 1 if args.smoke else args.reps,
            "torch": torch.__version__,
            "threads": args.threads or torch.get_num_threads(),
            "rows": rows,
            "samples": [
                {
                    "job": job,
                    "runner": runner,
                    "seconds_per_step": values,
                    "cpu_seconds_per_step": results.cpu_seconds[(job, runner)],
                    "first_step_s": results.first_step_seconds.get((job, runner), []),
                }
                for (job, runner), values in results.seconds.items()
            ],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    core_failures = sorted(f"{job}/{runner}" for job, runner in results.failed if runner in CORE_RUNNERS)
    if core_failures:
        print(f"error: core runners failed: {', '.join(core_failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
