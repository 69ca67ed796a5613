"""webdataset shards: write, roll over, read back (local and S3), refuse unsafe members."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
import webdataset as wds

from pipeline import storage
from pipeline.data.shards import ShardError, ShardWriter, check_key, iter_samples, read_json


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
