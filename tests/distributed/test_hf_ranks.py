"""Guarantees 1, 6 and 8 for a Hugging Face model's own loss: a tiny GPT-2 with ``loss_fn=None`` on ragged
rows, 2 ranks (real torchrun, gloo) with per-rank batch 2 equal 1 rank with batch 4, both accumulating 2
micro-batches, in the weights and in eval_loss. Each rank holds a different token count, so a loss
normalised per rank, or weighted by samples, would differ."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from dist_harness import assert_close, results, run_to_end, torchrun
from hf_dist_script import build_trainer

from helpers import final_weights

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).with_name("hf_dist_script.py")


def test_the_models_own_loss_on_two_ranks_equals_one_rank(tmp_path):
    two_ranks = tmp_path / "two_ranks"
    output = run_to_end(torchrun(str(SCRIPT), str(two_ranks), "batch_size=2", "grad_accum_steps=2"))
    by_rank = results(output)
    assert sorted(by_rank) == [0, 1], output

    one_rank = tmp_path / "one_rank"
    expected = build_trainer(str(one_rank), {"batch_size": 4, "grad_accum_steps": 2}).fit()
    assert_close(final_weights(two_ranks), final_weights(one_rank))
    for (result,) in by_rank.values():
        assert result["global_step"] == expected.global_step
        assert result["metrics"]["eval_loss"] == pytest.approx(expected.metrics["eval_loss"], rel=1e-6)
