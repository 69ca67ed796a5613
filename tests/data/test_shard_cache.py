"""The train loader streaming shards: each node reads its own shards once per epoch, through a bounded node
cache (or memory), checked against the manifest. Ranks run in threads of this process (num_workers=0), so
every read goes through `storage.open_read`, which the tests count; tests that count reads turn the prefetch
threads off, since those fetch the next epoch's shards too."""
import collections
import glob
import itertools
import os
import re
import sys
import threading

import pytest
import torch

from pipeline import manifest, storage
from pipeline.data.epoch_plan import ShuffleKnobs
from pipeline.data.latents import CropSpec, LatentLoader, ShardDataset, shard_refs
from pipeline.data.posterior import sample_latents

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "distributed"))
import trainkit  # noqa: E402

SPEC = CropSpec(frames=8, samples_per_frame=4, sample_rate=16)
KNOBS = ShuffleKnobs(block_shards=2, window=0)


@pytest.fixture
def reads(monkeypatch):
    """URL -> how many times the storage layer opened it for reading."""
    counts = collections.Counter()
    lock = threading.Lock()
    real = storage.open_read

    def counting(url):
        with lock:
            counts[url] += 1
        return real(url)

    monkeypatch.setattr(storage, "open_read", counting)
    return counts


def _dataset(url, cache, **kw):
    return ShardDataset(shard_refs(manifest.read_manifest(url).outputs), SPEC, seed=3, cache_dir=cache, **kw)


def _epoch(loaders, steps):
    """Run the ranks side by side (one thread each, as the processes of a node would) for `steps` batches."""
    out = [None] * len(loaders)

    def run(i):
        batches = iter(loaders[i])
        out[i] = list(itertools.islice(batches, steps))
        batches.close()  # stops the rank's prefetch threads, as the end of a process would

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(loaders))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert all(o is not None for o in out), "a rank did not finish"
    return out


def _keys(batches):
    return [m["__key__"] for b in batches for m in b.metadata]


def test_two_nodes_read_disjoint_shards_once_and_serve_every_sample_once(s3_bucket, tmp_path, reads):
    url = trainkit.write_latent_shards(f"s3://{s3_bucket}/two-nodes", shards=8, per_shard=6)
    shards = [o["url"] for o in manifest.read_manifest(url).outputs]
    reads.clear()
    loaders = [LatentLoader(_dataset(url, str(tmp_path / f"node{r}")), rank=r, world_size=2, batch_size=4, seed=3,
                            num_nodes=2, knobs=KNOBS, fetchers=0) for r in range(2)]
    assert loaders[0].batches_per_epoch == 6  # 48 samples, global batch 8
    batches = _epoch(loaders, 6)
    served = _keys(batches[0]) + _keys(batches[1])
    assert len(served) == len(set(served)) == 48
    assert {u: reads[u] for u in shards} == {u: 1 for u in shards}  # every shard downloaded once, by one node
    by_node = [{m["__url__"] for b in batches[r] for m in b.metadata} for r in range(2)]
    assert not by_node[0] & by_node[1] and len(by_node[0]) == len(by_node[1]) == 4


def test_ranks_of_one_node_share_its_cache_and_uneven_shards_give_equal_batches(s3_bucket, tmp_path, reads):
    counts = [5, 9, 3, 7, 6, 11, 4]
    url = trainkit.write_latent_shards(f"s3://{s3_bucket}/one-node", shards=7, per_shard=counts)
    shards = [o["url"] for o in manifest.read_manifest(url).outputs]
    reads.clear()
    cache = str(tmp_path / "node")
    loaders = [LatentLoader(_dataset(url, cache), rank=r, world_size=2, batch_size=3, seed=3, knobs=KNOBS,
                            fetchers=0) for r in range(2)]
    assert [lo.batches_per_epoch for lo in loaders] == [7, 7]  # 45 // 6
    batches = _epoch(loaders, 7)
    served = _keys(batches[0]) + _keys(batches[1])
    assert len(served) == len(set(served)) == 42  # only 3 (< one global batch) left out
    assert all(reads[u] == 1 for u in shards)  # the node downloaded each shard once for both ranks
    assert all(lo.state_dict()["epoch"] == 1 for lo in loaders)
    # the epoch is done with every shard: the cache is empty again once both ranks moved on
    _epoch(loaders, 1)
    assert not [p for p in glob.glob(os.path.join(cache, "*", "e0-*.tar"))]


def test_the_cache_stays_within_cache_gb_and_a_resume_reproduces_the_batches(s3_bucket, tmp_path, reads):
    url = trainkit.write_latent_shards(f"s3://{s3_bucket}/bounded", shards=8, per_shard=8)
    sizes = [o["bytes"] for o in manifest.read_manifest(url).outputs]
    budget = int(4.5 * max(sizes))  # two blocks of two shards, not the 8 shards of an epoch
    cache = str(tmp_path / "node")

    def loaders(**kw):
        return [LatentLoader(_dataset(url, cache, cache_bytes=budget), rank=r, world_size=2, batch_size=2, seed=3,
                             knobs=KNOBS, prefetch_shards=2, **kw) for r in range(2)]

    high, stop = [0], threading.Event()

    def size(path):  # a copy may be renamed or evicted between the listing and the stat
        try:
            return os.path.getsize(path)
        except FileNotFoundError:
            return 0

    def watch():  # the bytes on disk, every millisecond: finished copies and downloads in flight
        while not stop.is_set():
            files = glob.glob(os.path.join(cache, "*", "e*-*.tar*"))
            high[0] = max(high[0], sum(size(f) for f in files if not f.endswith(".reserve")))
            stop.wait(0.001)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        full = _epoch(loaders(), 20)  # 16 batches per epoch: into the second epoch
    finally:
        stop.set()
        watcher.join()
    assert 0 < high[0] <= budget
    first = loaders()
    _epoch(first, 7)
    resumed = loaders(num_workers=1)
    for lo, old in zip(resumed, first):
        lo.load_state_dict(old.state_dict())
    rest = _epoch(resumed, 13)
    for r in range(2):
        assert _keys(rest[r]) == _keys(full[r][7:])
        assert all(torch.equal(sample_latents(a), sample_latents(b)) for a, b in zip(rest[r], full[r][7:]))


def test_a_cache_too_small_for_the_plan_is_refused_in_one_line(s3_bucket, tmp_path):
    url = trainkit.write_latent_shards(f"s3://{s3_bucket}/small", shards=4, per_shard=8)
    size = manifest.read_manifest(url).outputs[0]["bytes"]
    lo = LatentLoader(_dataset(url, str(tmp_path), cache_bytes=size), rank=0, world_size=1, batch_size=2, seed=3,
                      knobs=KNOBS)
    with pytest.raises(ValueError, match=r"--cache-gb .* cannot hold the shards this node needs at once in epoch 0"):
        next(iter(lo))


def test_cache_gb_0_streams_into_memory_and_writes_no_shard_to_disk(s3_bucket, tmp_path, reads):
    url = trainkit.write_latent_shards(f"s3://{s3_bucket}/memory", shards=4, per_shard=6)
    shards = [o["url"] for o in manifest.read_manifest(url).outputs]
    reads.clear()
    loaders = [LatentLoader(_dataset(url, str(tmp_path), cache_bytes=0), rank=r, world_size=2, batch_size=3, seed=3,
                            knobs=KNOBS, fetchers=0) for r in range(2)]
    batches = _epoch(loaders, 4)
    served = _keys(batches[0]) + _keys(batches[1])
    assert len(served) == len(set(served)) == 24
    assert all(reads[u] == 1 for u in shards)  # each rank streams its own shards, once
    assert not glob.glob(os.path.join(str(tmp_path), "**", "*.tar*"), recursive=True)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_shard_that_changes_on_the_store_between_epochs_is_refused(where, s3_bucket, tmp_path):
    base = str(tmp_path / "store") if where == "local" else f"s3://{s3_bucket}/changed"
    url = trainkit.write_latent_shards(base, shards=2, per_shard=4)
    # no prefetch threads: they could fetch (and check) epoch 1's copy before the change
    lo = LatentLoader(_dataset(url, str(tmp_path / "cache")), rank=0, world_size=1, batch_size=2, seed=3, knobs=KNOBS,
                      fetchers=0)
    batches = iter(lo)
    assert len(list(itertools.islice(batches, 4))) == 4  # epoch 0 reads fine
    target = manifest.read_manifest(url).outputs[1]
    data = bytearray(storage.read_bytes(target["url"]))
    data[700] ^= 0xFF  # same size, other bytes
    storage.write(target["url"], bytes(data))
    if where == "local":
        os.utime(target["url"], ns=(1, 1))  # a copy tool may keep the time; the size and time are what is watched
    with pytest.raises(ValueError, match=rf"{target['url']}: sha256 is [0-9a-f]{{64}}, the manifest says "
                                         rf"{target['sha256']}.*exceed --max-reject-fraction 0.0"):
        list(itertools.islice(batches, 4))


def test_a_rejected_shard_under_the_fraction_is_recorded_and_its_samples_replaced(tmp_path):
    url = trainkit.write_latent_shards(str(tmp_path / "store"), shards=4, per_shard=4)
    target = manifest.read_manifest(url).outputs[2]["url"]
    data = bytearray(open(target, "rb").read())
    data[700] ^= 0xFF
    open(target, "wb").write(bytes(data))
    ds = _dataset(url, str(tmp_path / "cache"), max_reject_fraction=0.5)
    batches = list(itertools.islice(iter(LatentLoader(ds, rank=0, world_size=1, batch_size=4, seed=3, knobs=KNOBS)), 4))
    keys = _keys(batches)
    assert len(keys) == 16 and not any(k.startswith("s02") for k in keys)
    records = glob.glob(str(tmp_path / "cache" / "*" / "rejects.jsonl"))
    assert len(records) == 1 and '"check": "sha256"' in open(records[0]).read()


def test_sample_counts_are_checked_when_a_shard_is_indexed_and_bad_json_names_shard_and_key(tmp_path):
    import hashlib
    import io
    import json

    import webdataset as wds
    url = trainkit.write_latent_shards(str(tmp_path / "store"), shards=1, per_shard=4)
    m = manifest.read_manifest(url)
    wrong = manifest.Manifest(stage="pre_encode", args={}, input=m.input, properties=m.properties,
                              outputs=(manifest.entry("pre_encode", **{**m.outputs[0], "samples": 5}),))
    manifest.write_manifest(str(tmp_path / "wrong.json"), wrong)
    ds = _dataset(str(tmp_path / "wrong.json"), str(tmp_path / "c1"))
    with pytest.raises(ValueError, match=r"latents-0-0.tar: samples is 4, the manifest says 5"):
        ds[(0, 0, 0)]
    buf = io.BytesIO()
    with wds.TarWriter(buf) as tar:
        tar.write({"__key__": "k1", "latents.safetensors": _latent_bytes(),
                   "json": json.dumps({"seconds_start": "ten"}).encode()})
    path = str(tmp_path / "bad.tar")
    open(path, "wb").write(buf.getvalue())
    bad = manifest.Manifest(stage="pre_encode", args={}, input=m.input, properties=m.properties,
                            outputs=(manifest.entry("pre_encode", url=path, samples=1, bytes=len(buf.getvalue()),
                                                    sha256=hashlib.sha256(buf.getvalue()).hexdigest(), seconds=1.0),))
    manifest.write_manifest(str(tmp_path / "bad.json"), bad)
    with pytest.raises(ValueError, match=r"bad.tar: sample k1.json seconds_start='ten', expected a finite number"):
        _dataset(str(tmp_path / "bad.json"), str(tmp_path / "c2"))[(0, 0, 0)]


def _latent_bytes():
    from safetensors.torch import save
    return save({"latents": torch.zeros(4, 8)})


@pytest.fixture
def workers_must_not_fetch_or_walk_tars(monkeypatch):
    """Loader workers (forked: they inherit these patches) fail their batch if they open a shard on the store or
    walk a tar with `tarfile`; the fetcher processes and the rank itself may."""
    import tarfile

    def guard(real, what):
        def guarded(*args, **kwargs):
            if torch.utils.data.get_worker_info() is not None:
                raise AssertionError(f"a loader worker {what}")
            return real(*args, **kwargs)
        return guarded

    monkeypatch.setattr(storage, "open_read", guard(storage.open_read, "read a shard from the store"))
    monkeypatch.setattr(tarfile, "open", guard(tarfile.open, "walked a tar with tarfile"))


@pytest.mark.parametrize("cache_gb", [None, 0], ids=["node cache", "memory"])
def test_workers_read_shards_through_the_index_written_once_and_batches_match_the_unprefetched_run(
        cache_gb, s3_bucket, tmp_path, workers_must_not_fetch_or_walk_tars):
    url = trainkit.write_latent_shards(f"s3://{s3_bucket}/indexed-{cache_gb}", shards=6, per_shard=5)
    cache_bytes = None if cache_gb is None else 0
    plain = LatentLoader(_dataset(url, str(tmp_path / "plain"), cache_bytes=cache_bytes), rank=0, world_size=1,
                         batch_size=4, seed=3, knobs=KNOBS, fetchers=0)
    expected = _epoch([plain], 10)[0]  # 7 batches an epoch: into the second
    lo = LatentLoader(_dataset(url, str(tmp_path / "fetched"), cache_bytes=cache_bytes), rank=0, world_size=1,
                      batch_size=4, seed=3, knobs=KNOBS, num_workers=2, fetchers=2, prefetch_shards=2)
    indexed, got = [], []
    for batch in itertools.islice(iter(lo), 10):
        got.append(batch)
        copies = glob.glob(str(tmp_path / "fetched" / "*" / "e*-*.tar"))
        indexed += [os.path.exists(c + ".idx.json") for c in copies]
    assert _keys(got) == _keys(expected)
    assert all(torch.equal(sample_latents(a), sample_latents(b)) for a, b in zip(got, expected))
    if cache_gb is None:  # every published copy came with its index
        assert indexed and all(indexed)
    else:
        assert not glob.glob(str(tmp_path / "fetched" / "**" / "*.tar*"), recursive=True)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_shard_the_fetcher_cannot_read_stops_the_memory_loader_with_one_error_naming_it(
        num_workers, s3_bucket, tmp_path):
    url = trainkit.write_latent_shards(f"s3://{s3_bucket}/gone-{num_workers}", shards=4, per_shard=4)
    gone = manifest.read_manifest(url).outputs[2]["url"]
    storage.delete(gone)
    lo = LatentLoader(_dataset(url, str(tmp_path), cache_bytes=0), rank=0, world_size=1, batch_size=2, seed=3,
                      knobs=KNOBS, num_workers=num_workers)
    with pytest.raises(storage.StorageError, match=gone):
        list(itertools.islice(iter(lo), 8))


@pytest.mark.parametrize("member, why", [
    (["../escape.json", 0, 10], r"member name '\.\./escape\.json' is empty, absolute or holds '\.\.'"),
    (["s00i000.json", 10, 10 ** 9], r"member 's00i000\.json' at offset 10 of 1000000000 bytes lies outside"),
], ids=["dot-dot name", "offset past the end"])
def test_a_crafted_tar_index_is_refused_with_one_error_naming_the_shard(member, why, tmp_path):
    import json
    url = trainkit.write_latent_shards(str(tmp_path / "store"), shards=1, per_shard=4)
    _dataset(url, str(tmp_path / "cache"))[(0, 0, 0)]  # verifies the local shard and writes its index, once
    [index] = glob.glob(str(tmp_path / "cache" / "*.idx.json"))
    doc = json.load(open(index))
    doc["members"][0] = member
    json.dump(doc, open(index, "w"))
    fresh = _dataset(url, str(tmp_path / "cache"))  # another process of the node: it reads the index
    shard = manifest.read_manifest(url).outputs[0]["url"]
    with pytest.raises(ValueError, match=rf"^{re.escape(shard)}: tar index {re.escape(index)} is refused: {why}"):
        fresh[(0, 1, 0)]


@pytest.mark.parametrize("cache_gb", [None, 0], ids=["node cache", "memory"])
def test_a_fetcher_killed_without_a_word_stops_the_loader_with_one_error(cache_gb, s3_bucket, tmp_path):
    import signal
    url = trainkit.write_latent_shards(f"s3://{s3_bucket}/killed-{cache_gb}", shards=4, per_shard=4)
    ds = _dataset(url, str(tmp_path), cache_bytes=None if cache_gb is None else 0)
    batches = iter(LatentLoader(ds, rank=0, world_size=1, batch_size=2, seed=3, knobs=KNOBS, prefetch_shards=1))
    next(batches)
    for pid in ds.source.fetcher.pids:  # the fetchers this loader started (the OOM killer's way)
        os.kill(pid, signal.SIGKILL)
    with pytest.raises(storage.StorageError, match=r"shard fetcher \(process \d+\) died"):
        list(itertools.islice(batches, 40))  # 5 epochs: shards the dead fetchers never brought
