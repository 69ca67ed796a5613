"""The memory pool of `--cache-gb 0`: sized from the plan, refusing what cannot be the manifest's shard."""
import itertools
import os
import sys

import pytest

from pipeline import manifest, storage
from pipeline.data.epoch_plan import PlanLayout, ShuffleKnobs
from pipeline.data.latents import CropSpec, LatentLoader, ShardDataset, shard_refs
from pipeline.data.memory_pool import needed_slots
from pipeline.data.shard_cache import Schedule

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "distributed"))
import trainkit  # noqa: E402


@pytest.mark.parametrize("lookahead", [0, 2, 6])
def test_the_pool_is_sized_to_the_most_shards_live_at_once_across_an_epoch_boundary(lookahead):
    layout = PlanLayout(counts=(5, 9, 3, 7, 6, 11, 4, 8), seed=1, group=0, groups=1, ranks_per_group=1,
                        batch_size=3, knobs=ShuffleKnobs(block_shards=3, window=4))
    schedule = Schedule(plan_for=layout.plan)
    spans, offset = [], 0
    for e in (2, 3):  # both epochs laid end to end, each shard from `lookahead` steps before its first use
        spans += [(max(offset + first - lookahead, 0), offset + last) for _, first, last in schedule.shards(e)]
        offset += layout.plan(e).steps
    brute = max(sum(lo <= step <= hi for lo, hi in spans) for step in range(offset))
    assert needed_slots(schedule, 2, lookahead) == brute


def test_a_shard_far_larger_than_its_manifest_entry_is_rejected_before_it_overflows_the_pool(s3_bucket, tmp_path):
    url = trainkit.write_latent_shards(f"s3://{s3_bucket}/grown", shards=2, per_shard=4)
    target = manifest.read_manifest(url).outputs[1]
    storage.write(target["url"], storage.read_bytes(target["url"]) * 8)  # past the slot (1.5x + 64 KiB)
    ds = ShardDataset(shard_refs(manifest.read_manifest(url).outputs), CropSpec(frames=8, samples_per_frame=4,
                                                                                sample_rate=16),
                      seed=3, cache_dir=str(tmp_path), cache_bytes=0)
    lo = LatentLoader(ds, rank=0, world_size=1, batch_size=2, seed=3, knobs=ShuffleKnobs(block_shards=2, window=0))
    with pytest.raises(ValueError, match=rf"{target['url']}: bytes is more than \d+, the manifest says "
                                         rf"{target['bytes']}.*exceed --max-reject-fraction"):
        list(itertools.islice(iter(lo), 4))


def test_a_manifest_that_claims_a_huge_shard_is_refused_by_name_before_any_memory_is_mapped(s3_bucket, tmp_path):
    """The manifest is untrusted and its `bytes` sizes the pool: a claimed petabyte is one error naming the shard,
    not a failed or overcommitted map of slots x 1 PB."""
    import dataclasses
    url = trainkit.write_latent_shards(f"s3://{s3_bucket}/claims", shards=2, per_shard=4)
    refs = shard_refs(manifest.read_manifest(url).outputs)
    refs[1] = dataclasses.replace(refs[1], bytes=2**50)
    ds = ShardDataset(refs, CropSpec(frames=8, samples_per_frame=4, sample_rate=16), seed=3,
                      cache_dir=str(tmp_path), cache_bytes=0)
    lo = LatentLoader(ds, rank=0, world_size=1, batch_size=2, seed=3, knobs=ShuffleKnobs(block_shards=2, window=0))
    with pytest.raises(ValueError, match=rf"{refs[1].url}: the manifest gives this shard {2**50} bytes; --cache-gb 0 "
                                         rf"would hold \d+ shards of that size in memory \(\d+\.\d GiB\), more than "
                                         rf"50% of this node's"):
        next(iter(lo))
    healthy = LatentLoader(ShardDataset(shard_refs(manifest.read_manifest(url).outputs), ds.spec, seed=3,
                                        cache_dir=str(tmp_path / "again"), cache_bytes=0),
                           rank=0, world_size=1, batch_size=2, seed=3, knobs=ShuffleKnobs(block_shards=2, window=0))
    assert len(list(itertools.islice(iter(healthy), 4))) == 4
