"""webdataset shards: write, roll over, read back (local and S3), refuse unsafe members."""

from __future__ import annotations

import io
import json
import re
import tarfile

import pytest
import webdataset as wds

from pipeline import storage
from pipeline.data.shards import (ShardError, ShardWriter, VerifiedShard, check_key, check_shard, iter_samples,
                                  read_json, read_sample_json)


def samples(n: int, size: int = 3000):
    for i in range(n):
        yield f"key{i:03d}", {"flac": bytes([i % 256]) * size, "json": json.dumps({"i": i}).encode()}


def test_writer_rolls_over_by_size_and_reads_back_in_order(store_url):
    urls = lambda n: storage.join(store_url, f"shard-00000-{n:05d}.tar")  # noqa: E731
    with ShardWriter(urls, max_bytes=10_000) as writer:
        for key, members in samples(7):
            writer.add(key, members, seconds=1.25)
    shards = writer.shards
    assert [s.url for s in shards] == [urls(n) for n in range(len(shards))] and len(shards) == 4
    assert [s.samples for s in shards] == [2, 2, 2, 1]
    assert [s.seconds for s in shards] == [2.5, 2.5, 2.5, 1.25]
    got = []
    for s in shards:
        assert s.sha256 == storage.sha256_url(s.url) and s.bytes == storage.size(s.url)
        got += list(iter_samples(s.url))
    assert got == list(samples(7))
    assert read_json(got[3][1], "u", got[3][0]) == {"i": 3}
    # webdataset's own reader sees the same samples.
    if not storage.is_s3(store_url):
        keys = [s["__key__"] for s in wds.WebDataset([shards[0].url], shardshuffle=False)]
        assert keys == ["key000", "key001"]


def test_same_samples_give_identical_bytes(tmp_path):
    digests = []
    for run in range(2):
        with ShardWriter(lambda n, r=run: str(tmp_path / f"r{r}-{n}.tar"), 1 << 20) as w:
            for key, members in samples(3):
                w.add(key, members, 1.0)
        digests.append([s.sha256 for s in w.shards])
    assert digests[0] == digests[1]


def test_an_exception_inside_the_writer_leaves_no_shard(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with ShardWriter(lambda n: str(tmp_path / f"s-{n}.tar"), 1 << 20) as w:
            w.add("a", {"flac": b"x"})
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("key", ["a.b", "a/b", "", "with space", "../x"])
def test_keys_with_dots_slashes_or_spaces_are_refused(key):
    with pytest.raises(ValueError, match="sample key"):
        check_key(key)


def tar_with(tmp_path, build) -> str:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        build(tar)
    path = tmp_path / "evil.tar"
    path.write_bytes(buf.getvalue())
    return str(path)


def add_file(tar, name: str, data: bytes = b"{}") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("name", ["/etc/x.json", "../up.json", "a/../../b.json"])
def test_absolute_and_parent_member_paths_are_refused(tmp_path, name):
    url = tar_with(tmp_path, lambda tar: add_file(tar, name))
    with pytest.raises(ShardError, match="absolute or '..' path"):
        list(iter_samples(url))


def test_links_and_nameless_members_are_refused(tmp_path):
    def link(tar):
        info = tarfile.TarInfo("k.flac")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(ShardError, match="not a regular file"):
        list(iter_samples(tar_with(tmp_path, link)))
    with pytest.raises(ShardError, match="not named <key>.<ext>"):
        list(iter_samples(tar_with(tmp_path, lambda tar: add_file(tar, "noextension"))))


def test_truncated_tar_and_bad_json_are_shard_errors(tmp_path):
    with ShardWriter(lambda n: str(tmp_path / "ok.tar"), 1 << 20) as w:
        for key, members in samples(2, size=5000):
            w.add(key, members)
    cut = tmp_path / "cut.tar"
    cut.write_bytes((tmp_path / "ok.tar").read_bytes()[:4000])
    with pytest.raises(ShardError, match="not a readable tar"):
        list(iter_samples(str(cut)))
    with pytest.raises(ShardError, match="not valid JSON"):
        read_json({"json": b"{nope"}, "u", "k")
    with pytest.raises(ShardError, match="has no .json member"):
        read_json({"flac": b""}, "u", "k")


def test_verified_shard_streams_once_and_matches_its_entry(store_url):
    with ShardWriter(lambda n: storage.join(store_url, "s.tar"), 1 << 30) as w:
        for key, members in samples(5):
            w.add(key, members)
    entry = w.shards[0].to_dict()
    shard = VerifiedShard(entry)
    assert list(shard) == list(samples(5))
    assert shard.check.ok and shard.check.actual == {k: entry[k] for k in ("sha256", "bytes", "samples")}


@pytest.mark.parametrize("damage, expected", [
    ("cut_on_boundary", r"sha256 [0-9a-f]{64} \(manifest: [0-9a-f]{64}\); bytes \d+ \(manifest: \d+\); "
                        r"samples 2 \(manifest: 5\)$"),
    ("cut_inside", r"samples 1 \(manifest: 5\); not a readable tar \(unexpected end of data\)"),
    ("missing", r"missing \("),
])
def test_verified_shard_reports_a_damaged_shard_with_expected_and_actual_values(tmp_path, damage, expected):
    path = tmp_path / "s.tar"
    with ShardWriter(lambda n: str(path), 1 << 30) as w:
        for key, members in samples(5, size=5000):
            w.add(key, members)
    entry = w.shards[0].to_dict()
    data = path.read_bytes()
    offsets = [m.offset for m in tarfile.open(path).getmembers()]
    if damage == "cut_on_boundary":
        path.write_bytes(data[:offsets[4]])
    elif damage == "cut_inside":
        path.write_bytes(data[:offsets[3] - 1000])  # inside the data of key001.flac
    else:
        path.unlink()
    shard = VerifiedShard(entry)
    list(shard)
    assert not shard.check.ok
    assert re.fullmatch(f"{re.escape(str(path))} does not match its manifest entry: .*{expected}.*",
                        shard.check.reason())
    record = shard.check.reject()
    assert record["id"] == str(path) and record["expected"]["samples"] == 5


def test_check_shard_compares_what_a_reader_measured_in_its_own_way():
    entry = {"url": "u.tar", "sha256": "a" * 64, "bytes": 10, "samples": 2}
    assert check_shard(entry, sha256="a" * 64, bytes=10).ok  # samples not counted yet: not compared
    assert check_shard(entry, sha256="a" * 64, bytes=10, samples=3).differences() == ["samples 3 (manifest: 2)"]


def test_sample_json_with_bad_values_names_the_shard_key_and_field():
    assert read_sample_json({"json": b'{"offset_seconds": 1.5, "prompt": "x"}'}, "u", "k")["offset_seconds"] == 1.5
    for text, message in ((b'{"offset_seconds": "soon"}', "u: sample k.json: offset_seconds='soon', expected a finite"),
                          (b'{"seconds_total": -1}', "seconds_total=-1"), (b'{"seconds_start": NaN}', "seconds_start=nan"),
                          (b'{"seconds_start": true}', "seconds_start=True"), (b'{"prompt": 3}', "prompt=3, expected a string")):
        with pytest.raises(ShardError, match=re.escape(message)):
            read_sample_json({"json": text}, "u", "k")
