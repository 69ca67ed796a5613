import itertools
import math
import os
import sys

import pytest
import torch

from pipeline import manifest
from pipeline.data.latents import CropSpec, LatentLoader, ShardDataset, ShardRef, collate, crop, shard_refs
from pipeline.data.posterior import sample_latents

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "distributed"))
import trainkit  # noqa: E402


def _dataset(url, tmp_path, frames=8, scale=1.0, seed=0):
    m = manifest.read_manifest(url)
    refs = shard_refs(m.outputs)
    spec = CropSpec(frames=frames, samples_per_frame=4, sample_rate=16, scale=scale)
    return ShardDataset(refs, spec, seed=seed, cache_dir=str(tmp_path / "cache"))


def _keys(batches):
    return [m["__key__"] for b in batches for m in b.metadata]


def test_one_shard_two_ranks_same_batch_count_and_no_sample_twice(tmp_path):
    url = trainkit.write_latent_shards(str(tmp_path / "lat"), shards=1, per_shard=11)
    ds = _dataset(url, tmp_path)
    loaders = [LatentLoader(ds, rank=r, world_size=2, batch_size=2, seed=5) for r in range(2)]
    assert [lo.batches_per_epoch for lo in loaders] == [2, 2]  # 11 // 4; the 3 left over wait for the next epoch
    epochs = [list(itertools.islice(iter(lo), 2)) for lo in loaders]
    served = _keys(epochs[0]) + _keys(epochs[1])
    assert len(served) == 8 and len(set(served)) == 8
    assert all(lo.state_dict()["epoch"] == 1 and lo.state_dict()["batch"] == 0 for lo in loaders)
    # the next epoch has another order
    nxt = list(itertools.islice(iter(loaders[0]), 2))
    assert _keys(nxt) != _keys(epochs[0][:2])


def test_resume_continues_with_the_same_batches(tmp_path):
    url = trainkit.write_latent_shards(str(tmp_path / "lat"), shards=3, per_shard=4)
    ds = _dataset(url, tmp_path)
    full = LatentLoader(ds, rank=1, world_size=2, batch_size=2, seed=1)
    ref = list(itertools.islice(iter(full), 7))  # 3 batches per epoch: crosses two epoch boundaries
    first = LatentLoader(ds, rank=1, world_size=2, batch_size=2, seed=1)
    _ = list(itertools.islice(iter(first), 4))
    resumed = LatentLoader(_dataset(url, tmp_path), rank=1, world_size=2, batch_size=2, seed=1, num_workers=2)
    resumed.load_state_dict(first.state_dict())
    rest = list(itertools.islice(iter(resumed), 3))
    assert _keys(rest) == _keys(ref[4:])
    for a, b in zip(rest, ref[4:]):
        assert torch.equal(sample_latents(a), sample_latents(b)) and torch.equal(a.padding_mask, b.padding_mask)


def test_load_refuses_a_changed_world_size(tmp_path):
    url = trainkit.write_latent_shards(str(tmp_path / "lat"), shards=1, per_shard=8)
    ds = _dataset(url, tmp_path)
    state = LatentLoader(ds, rank=0, world_size=2, batch_size=2, seed=1).state_dict()
    with pytest.raises(ValueError, match="world_size=2, this run has 1"):
        LatentLoader(ds, rank=0, world_size=1, batch_size=2, seed=1).load_state_dict(state)


def test_a_fresh_latent_is_drawn_each_epoch_and_scaled(tmp_path):
    url = trainkit.write_latent_shards(str(tmp_path / "lat"), shards=1, per_shard=2, frames=8)
    ds = _dataset(url, tmp_path, scale=2.0)
    a, b, c = (sample_latents(collate([ds[(epoch, 1, 0)]]))[0] for epoch in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    from pipeline.data.latents import _TarIndex
    from safetensors.torch import load
    _, members = _TarIndex(str(tmp_path / "lat" / "latents-0-0.tar")).read(1)
    t = load(members["latents.safetensors"])
    z = (a * 2.0 - t["mean"]) / t["std"]  # the noise, which must look standard normal
    assert abs(z.mean()) < 0.6 and 0.5 < z.std() < 1.6


def test_crop_moves_timing_and_masks_padding():
    x = torch.arange(20.0).repeat(2, 1)  # (C, T) whose values are the frame index
    meta = {"offset_seconds": 3.25, "seconds_start": 3, "seconds_total": 30}
    spec = CropSpec(frames=8, samples_per_frame=2048, sample_rate=44100)
    piece, mask, out = crop(x, 15, meta, spec, torch.Generator().manual_seed(3))
    offset = int(piece[0, 0])
    assert 0 <= offset <= 15 - 8 and torch.equal(piece[0], torch.arange(offset, offset + 8.0))
    assert out["offset_seconds"] == pytest.approx(3.25 + offset * 2048 / 44100)
    assert out["seconds_start"] == math.floor(out["offset_seconds"]) and out["seconds_total"] == 30
    assert mask.all()
    short, mask, out = crop(x[:, :5], 5, meta, spec, torch.Generator().manual_seed(3))
    assert short.shape == (2, 8) and mask.tolist() == [True] * 5 + [False] * 3 and (short[:, 5:] == 0).all()
    assert out["offset_seconds"] == 3.25


def test_shards_on_s3_are_read(store_url, tmp_path):
    url = trainkit.write_latent_shards(store_url, shards=2, per_shard=3)
    ds = _dataset(url, tmp_path)
    batches = list(itertools.islice(iter(LatentLoader(ds, rank=0, world_size=1, batch_size=3, seed=0)), 2))
    assert sample_latents(batches[0]).shape == (3, 4, 8) and len(set(_keys(batches))) == 6


def test_sat_pre_encoded_folders_are_read_with_their_padding_masks(tmp_path):
    import json

    import numpy as np

    from pipeline.data.latents import count_npy
    folder = tmp_path / "pre" / "0"
    folder.mkdir(parents=True)
    for i in range(3):
        np.save(folder / f"{i:03d}.npy", np.full((4, 10), float(i), dtype=np.float32))
        (folder / f"{i:03d}.json").write_text(json.dumps({"prompt": "p", "seconds_start": 0, "seconds_total": 5,
                                                          "padding_mask": [1] * 6 + [0] * 4}))
    assert count_npy(str(tmp_path / "pre")) == 3
    spec = CropSpec(frames=8, samples_per_frame=4, sample_rate=16, scale=2.0)
    ds = ShardDataset([ShardRef(str(tmp_path / "pre"), 3)], spec, seed=0, cache_dir=str(tmp_path / "c"))
    item = ds[(0, 2, 0)]
    x, mask, meta = item.x, item.mask, item.meta
    assert x.shape == (4, 8) and (x == 1.0).all()  # 2 / scale 2; frames past the data stay as encoded, masked
    assert mask.tolist() == [True] * 6 + [False] * 2 and "padding_mask" not in meta and meta["__key__"] == "0__002"


def test_a_samples_latent_is_the_same_whatever_the_batch_size_rank_count_and_worker_count(tmp_path):
    url = trainkit.write_latent_shards(str(tmp_path / "lat"), shards=3, per_shard=8, dtype=torch.float16)

    def latents(world, batch, workers):
        out = {}
        for r in range(world):
            lo = LatentLoader(_dataset(url, tmp_path), rank=r, world_size=world, batch_size=batch, seed=1,
                              num_workers=workers)
            for b in itertools.islice(iter(lo), lo.batches_per_epoch):
                out.update(zip(_keys([b]), sample_latents(b)))
        return out

    a, b, c = latents(1, 4, 0), latents(2, 3, 2), latents(3, 2, 1)
    common = set(a) & set(b) & set(c)
    assert len(common) >= 18  # each layout leaves out its own remainder
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in common)


def test_the_loader_ships_the_stored_posterior_and_the_step_draws_it(tmp_path):
    from safetensors.torch import load

    from pipeline.data.latents import STREAM_NOISE, _TarIndex, derived_seed
    url = trainkit.write_latent_shards(str(tmp_path / "lat"), shards=1, per_shard=2, frames=8, dtype=torch.float16)
    ds = _dataset(url, tmp_path, scale=2.0, seed=4)
    batch = collate([ds[(3, 1, 0)]])
    assert batch.latents is None and batch.mean.dtype == batch.std.dtype == torch.float16  # as stored
    stored = load(_TarIndex(str(tmp_path / "lat" / "latents-0-0.tar")).read(1)[1]["latents.safetensors"])
    assert torch.equal(batch.mean[0], stored["mean"]) and torch.equal(batch.std[0], stored["std"])
    noise = torch.randn(4, 8, generator=torch.Generator().manual_seed(derived_seed(4, 3, 1, STREAM_NOISE)))
    expected = (stored["mean"].float() + stored["std"].float() * noise) / 2.0
    assert torch.equal(sample_latents(batch)[0], expected)
