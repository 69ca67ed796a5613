import numpy as np
import pytest

from pipeline.data.epoch_plan import EpochPlan, ShuffleKnobs


def _plans(counts, *, groups, ranks, batch, epoch=0, knobs=ShuffleKnobs()):
    return [EpochPlan(counts, seed=7, epoch=epoch, group=k, groups=groups, ranks_per_group=ranks, batch_size=batch,
                      knobs=knobs) for k in range(groups)]


def _shard_of(plan, items):
    return np.searchsorted(plan.starts, items, side="right") - 1


def test_equal_shards_go_whole_to_one_node_each_and_every_sample_is_served_once():
    counts = [10] * 12
    plans = _plans(counts, groups=3, ranks=2, batch=3)
    served = np.concatenate([p.order for p in plans])
    assert len(served) == len(set(served.tolist())) == (120 // 18) * 18  # only the remainder (12 < 18) is left out
    shards = [set(_shard_of(p, p.order).tolist()) for p in plans]
    assert all(len(s) == 4 for s in shards) and set.union(*shards) == set(range(12))
    assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])  # one node per shard


def test_uneven_shards_give_every_rank_the_same_batches_and_cut_few_shards():
    rng = np.random.default_rng(0)
    counts = rng.integers(3, 40, size=37).tolist()
    groups, ranks, batch = 3, 2, 4
    plans = _plans(counts, groups=groups, ranks=ranks, batch=batch)
    per_rank = {len(p.rank_items(j)) for p in plans for j in range(ranks)}
    steps = sum(counts) // (groups * ranks * batch)
    assert per_rank == {steps * batch}
    served = np.concatenate([p.order for p in plans])
    assert len(set(served.tolist())) == len(served) and sum(counts) - len(served) < groups * ranks * batch
    shards = [set(_shard_of(p, p.order).tolist()) for p in plans]
    shared = sum(1 for s in range(len(counts)) if sum(s in g for g in shards) > 1)
    assert shared <= groups - 1  # only shards cut at a node's quota are read by two nodes


def test_a_batch_mixes_the_shards_of_a_block_and_the_next_epoch_has_another_order():
    counts = [50] * 16
    knobs = ShuffleKnobs(block_shards=4, window=16)
    plan = _plans(counts, groups=1, ranks=2, batch=4, knobs=knobs)[0]
    steps = [set(_shard_of(plan, plan.order[i:i + 8]).tolist()) for i in range(0, len(plan.order), 8)]
    assert np.mean([len(s) for s in steps]) >= 3  # 8 samples from ~4 shards, not from one
    # the node's cache needs about one block of 4 shards at a time, not all 16
    assert plan.live_bytes_high_water([1] * 16, slack_steps=2) <= 9
    other = _plans(counts, groups=1, ranks=2, batch=4, knobs=knobs, epoch=1)[0]
    assert not np.array_equal(plan.order, other.order)


def test_bad_knobs_are_refused_by_name():
    with pytest.raises(ValueError, match="block_shards=0 must be >= 1"):
        ShuffleKnobs(block_shards=0)
