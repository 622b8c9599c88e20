"""The resumed sampler yields exactly the rest of the uninterrupted sequence, for any shape of run."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from steadyfit.data import ResumableBatchSampler, epoch_permutation


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(1, 300),
    batch_size=st.integers(1, 40),
    accumulation=st.integers(1, 8),
    seed=st.integers(0, 2**31),
    epoch=st.integers(0, 50),
    stop_window=st.integers(0, 100),
)
def test_resumed_sampler_continues_the_uninterrupted_sequence(
    length, batch_size, accumulation, seed, epoch, stop_window
):
    full = list(ResumableBatchSampler(length, batch_size, seed=seed, epoch=epoch))
    # A checkpoint sits at an optimizer-step boundary: a whole number of windows into the epoch.
    start = min(stop_window * accumulation, len(full))
    resumed = list(ResumableBatchSampler(length, batch_size, seed=seed, epoch=epoch, start_batch=start))
    assert resumed == full[start:]
    assert sorted(index for batch in full for index in batch) == list(range(length))


@settings(max_examples=100, deadline=None)
@given(
    length=st.integers(1, 200),
    batch_size=st.integers(1, 16),
    world_size=st.integers(1, 4),
    seed=st.integers(0, 1000),
)
def test_ranks_together_see_what_one_rank_sees(length, batch_size, world_size, seed):
    """N ranks with batch B consume, step by step, the samples of one rank with batch N*B."""
    single = list(ResumableBatchSampler(length, batch_size * world_size, seed=seed, epoch=1))
    shards = [
        list(ResumableBatchSampler(length, batch_size, seed=seed, epoch=1, rank=r, world_size=world_size))
        for r in range(world_size)
    ]
    for step, batch in enumerate(single):
        together = [i for shard in shards for i in shard[step]]
        # an empty share gets a stand-in sample (weighted zero by the loop), so compare as sets
        assert set(together) == set(batch)


@given(length=st.integers(1, 500), seed=st.integers(0, 2**31), epoch=st.integers(0, 1000))
def test_order_depends_only_on_seed_and_epoch(length, seed, epoch):
    assert epoch_permutation(length, seed, epoch).tolist() == epoch_permutation(length, seed, epoch).tolist()
    assert sorted(epoch_permutation(length, seed, epoch).tolist()) == list(range(length))


@settings(max_examples=200, deadline=None)
@given(
    length=st.integers(1, 300),
    batch_size=st.integers(1, 40),
    world_size=st.integers(1, 4),
    rank_seed=st.integers(0, 3),
    start=st.integers(0, 20),
    stop=st.integers(0, 30),
)
def test_a_stopped_sampler_is_the_head_of_the_whole_one(
    length, batch_size, world_size, rank_seed, start, stop
):
    """``stop_batch`` (a limited evaluation) yields the batches before it and nothing else, on every rank."""
    rank = rank_seed % world_size
    shape = {"seed": 3, "epoch": 0, "shuffle": False, "rank": rank, "world_size": world_size}
    whole = list(ResumableBatchSampler(length, batch_size, **shape))
    stopped = ResumableBatchSampler(length, batch_size, start_batch=start, stop_batch=stop, **shape)
    assert list(stopped) == whole[start:stop]
    assert len(stopped) == len(whole[start:stop])
