"""The ways users launch: two torchrun agents as two "nodes" on loopback, and `torchrun -m steadyfit fit`.

(A user script calling Trainer.fit() under torchrun, the Trainer creating and destroying the process group,
is what every run of test_dist_faults.py is.)
"""

from __future__ import annotations

import json
import subprocess

import pytest
from dist_harness import (
    TIMEOUT_S,
    assert_close,
    environment,
    free_port,
    results,
    run_to_end,
    script,
    torchrun,
)
from dist_script import build_trainer

from helpers import final_weights, metric_rows

pytestmark = pytest.mark.slow


def test_two_agents_on_loopback_train_like_one_rank_with_the_doubled_batch(tmp_path):
    run_dir = tmp_path / "shared_run_dir"
    endpoint = f"--rdzv-endpoint=127.0.0.1:{free_port()}"
    agents = []
    for node_rank in (0, 1):
        rendezvous = (
            "--nnodes=2",
            f"--node-rank={node_rank}",
            "--rdzv-backend=c10d",
            endpoint,
            "--rdzv-id=two-nodes",
            # Both agents run on this host: say which one serves the rendezvous store.
            f"--rdzv-conf=is_host={int(node_rank == 0)}",
        )
        command = torchrun(*script((run_dir, {})), nproc=1, rendezvous=rendezvous)
        agents.append(
            subprocess.Popen(
                command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    outputs = []
    try:
        for agent in agents:
            outputs.append(agent.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for agent in agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()
    assert [agent.returncode for agent in agents] == [0, 0], "\n".join(outputs)
    assert sorted(rank for output in outputs for rank in results(output)) == [0, 1]

    trainer, _ = build_trainer(str(tmp_path / "one_rank"), {"batch_size": 8})
    trainer.fit()
    assert_close(final_weights(run_dir), final_weights(tmp_path / "one_rank"))


def test_the_command_line_runs_under_torchrun(tmp_path):
    run_dir = tmp_path / "digits"
    arguments = (
        "steadyfit",
        "fit",
        "digits",
        "max_steps=5",
        "log_every=1",
        f"run_dir={run_dir}",
        "progress=false",
    )
    output = run_to_end(torchrun("-m", *arguments))
    assert "steadyfit: done at step 5" in output
    train_steps = [row["step"] for row in metric_rows(run_dir) if row["kind"] == "train"]
    assert train_steps == [1, 2, 3, 4, 5]
    assert (run_dir / "final" / "model.safetensors").is_file()
    state = json.loads((run_dir / "checkpoints" / "step-00000005" / "state.json").read_text())["state"]
    assert state["identity"]["world_size"] == 2


def test_two_fits_in_one_torchrun_process(tmp_path):
    """A user script that fits twice: the second Trainer joins the group the first one created."""
    runs = script((tmp_path / "first", {"max_epochs": 1}), (tmp_path / "second", {"max_epochs": 1}))
    output = run_to_end(torchrun(runs[0], "--trainer-owns-group", *runs[1:]))
    assert [result["global_step"] for result in results(output)[0]] == [5, 5]


def threads_at_exit(output: str) -> dict[int, tuple[int, int]]:
    """Each rank's `threads RANK AT_START AT_EXIT` line."""
    lines = (line.split() for line in output.splitlines() if line.startswith("threads "))
    return {int(words[1]): (int(words[2]), int(words[3])) for words in lines}


@pytest.mark.parametrize(
    "runs",
    [
        # A user script: the Trainer creates the group and the trainer (its DDP model) lives until exit.
        ({"keep_trainer": 1},),
        # A script that creates the group for several runs and ends it with destroy_group().
        ({}, {"grad_accum_steps": 2}),
    ],
    ids=["trainer_owns_the_group", "script_owns_the_group"],
)
def test_the_group_and_its_threads_end_before_the_interpreter_finalizes(tmp_path, runs):
    """gloo's worker threads drop each collective's tensors after the caller's wait returned; a thread that
    needs the GIL for that once the interpreter finalizes aborts the process ("terminate called without
    an active exception", exit -6: a finished job reported failed). So the group must really end at exit,
    its threads joined, whoever still holds a reference to a finished run."""
    launch = script(*((tmp_path / f"run{i}", {"max_epochs": 1, **more}) for i, more in enumerate(runs)))
    output = run_to_end(torchrun(*launch))
    assert len(results(output)[0]) == len(runs)
    counts = threads_at_exit(output)
    assert sorted(counts) == [0, 1], output
    for at_start, at_exit in counts.values():
        assert at_exit == at_start, f"{at_exit - at_start} threads outlive the group:\n{output}"
