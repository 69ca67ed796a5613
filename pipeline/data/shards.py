"""webdataset tar shards: write samples ``<key>.<ext>``, read them back safely, through `pipeline.storage`.

A sample is a key plus a dict ``{ext: bytes}`` (``{"flac": ..., "json": ...}``). Keys hold no dots
(webdataset splits the key from the extension at the first dot of the member name) and no slashes.

Writing goes to a local temp file first and is uploaded whole, so a shard URL either holds a complete
tar or nothing. Tar headers carry ``mtime=0`` and fixed owner names, so the same samples give the same
bytes (and sha256) on every run: a re-run that rewrites a shard produces an identical object.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import Any, BinaryIO

import webdataset as wds

from pipeline import storage

_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_EXT = re.compile(r"^[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)*$")


class ShardError(ValueError):
    """A shard that cannot be read as a webdataset tar (names the URL and the member)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ShardInfo:
    """One written shard, as a manifest lists it."""
    url: str
    samples: int
    bytes: int
    sha256: str
    seconds: float
    """Seconds of audio in the shard (sum over samples)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_key(key: str) -> str:
    if not _KEY.match(key):
        raise ValueError(f"sample key {key!r} must match {_KEY.pattern} (no dots, slashes or spaces)")
    return key


class ShardWriter:
    """Write samples into tars of at most about ``max_bytes``, named by ``url_for(n)`` for n = 0, 1, ...

    A new tar starts when adding a sample would push the current one past ``max_bytes`` (a single
    sample larger than that still gets a tar of its own). `close` returns the `ShardInfo` of each tar
    in order. Use as a context manager: an exception discards the unfinished temp file.
    """

    def __init__(self, url_for: Callable[[int], str], max_bytes: int, tmp_dir: str | None = None):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes={max_bytes} must be positive")
        self._url_for, self._max_bytes, self._tmp_dir = url_for, max_bytes, tmp_dir
        self._written: list[ShardInfo] = []
        self._tar: wds.TarWriter | None = None
        self._file = None
        self._samples, self._seconds, self._bytes = 0, 0.0, 0

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._discard()

    def add(self, key: str, members: dict[str, bytes], seconds: float = 0.0) -> None:
        check_key(key)
        for ext in members:
            if not _EXT.match(ext):
                raise ValueError(f"sample {key}: extension {ext!r} must match {_EXT.pattern}")
        # 512-byte tar header per member plus padding to 512 bytes.
        size = sum(512 + -(-len(v) // 512) * 512 for v in members.values())
        if self._tar is not None and self._samples and self._bytes + size > self._max_bytes:
            self._finish()
        if self._tar is None:
            self._start()
        self._tar.write({"__key__": key, **members})
        self._samples += 1
        self._seconds += seconds
        self._bytes += size

    @property
    def shards(self) -> list[ShardInfo]:
        """Shards finished so far."""
        return list(self._written)

    def close(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._finish()
        return list(self._written)

    def _start(self) -> None:
        self._file = tempfile.NamedTemporaryFile(prefix="cantus-shard-", suffix=".tar", dir=self._tmp_dir,
                                                 delete=False)
        # encoder=False: members are bytes already; mtime=0 and fixed names make the tar reproducible.
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=0, user="cantus", group="cantus")
        self._samples, self._seconds, self._bytes = 0, 0.0, 0

    def _finish(self) -> None:
        self._tar.close()
        self._file.close()
        path, url = self._file.name, self._url_for(len(self._written))
        try:
            digest = _sha256_file(path)
            storage.upload(path, url)
            self._written.append(ShardInfo(url, self._samples, os.path.getsize(path), digest,
                                           round(self._seconds, 6)))
        finally:
            os.unlink(path)
            self._tar = self._file = None

    def _discard(self) -> None:
        if self._file is not None:
            try:
                self._tar.close()  # flushes into the temp file, which goes anyway
                self._file.close()
            finally:
                os.unlink(self._file.name)
                self._tar = self._file = None


def iter_samples(url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {ext: bytes})`` for each sample of the tar at ``url``, streamed.

    Members of one sample must be adjacent (as `ShardWriter` writes them). Raises `ShardError` for an
    absolute or ``..`` member path, a link or device entry, a name without an extension, or a
    truncated tar. A tar cut on a member boundary ends early without an error: read shards that a
    manifest lists with `VerifiedShard`, which compares them with their entry.
    """
    with storage.open_read(url) as f:
        yield from _iter_tar(f, url)


def _iter_tar(f: BinaryIO, url: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    key, members = None, {}
    try:
        with tarfile.open(fileobj=f, mode="r|") as tar:
            for info in tar:
                member_key, ext = _split_member(url, info)
                if member_key is None:
                    continue
                if member_key != key:
                    if key is not None:
                        yield key, members
                    key, members = member_key, {}
                if ext in members:
                    raise ShardError(f"{url}: member {info.name!r} appears twice")
                members[ext] = tar.extractfile(info).read()
    except tarfile.TarError as e:
        raise ShardError(f"{url}: not a readable tar ({e})") from e
    if key is not None:
        yield key, members


# ------------------------------------------------------------------------ checking against a manifest


class HashingReader:
    """A read-only stream that hashes (sha256) and counts the bytes as they pass: a check costs no
    second read. `drain` reads what the consumer left (a tar reader stops at the end-of-archive marker)."""

    def __init__(self, f: BinaryIO):
        self._f, self._hash, self.bytes = f, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self._f.read() if size is None or size < 0 else self._f.read(size)
        self._hash.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@dataclasses.dataclass(frozen=True, slots=True)
class ShardCheck:
    """A shard as read, against its manifest entry. ``expected`` and ``actual`` hold ``sha256``,
    ``bytes`` and ``samples`` (an ``actual`` value of None was not measured and is not compared)."""
    url: str
    expected: dict
    actual: dict
    error: str | None = None
    """Why the shard could not be read to its end (a broken or missing tar), if it could not."""

    @property
    def ok(self) -> bool:
        return self.error is None and not self.differences()

    def differences(self) -> list[str]:
        return [f"{name} {self.actual[name]} (manifest: {self.expected[name]})" for name in ("sha256", "bytes", "samples")
                if self.actual.get(name) is not None and self.actual[name] != self.expected.get(name)]

    def reason(self) -> str:
        """One line naming the shard and each expected and actual value that differ."""
        what = self.differences() + ([self.error] if self.error else [])
        return f"{self.url} does not match its manifest entry: {'; '.join(what)}"

    def reject(self) -> dict:
        """A reject record for the whole shard (``id`` = its URL, as in a plan)."""
        return {"id": self.url, "reason": self.reason(), "expected": self.expected, "actual": self.actual}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def check_shard(entry: Mapping[str, Any], *, sha256: str | None, bytes: int | None, samples: int | None = None,
                error: str | None = None) -> ShardCheck:
    """Compare what was measured on a shard with its manifest ``entry`` (``url``, ``sha256``, ``bytes``,
    ``samples``). For readers that measure in their own way (a download into a cache that counts
    samples later); `VerifiedShard` measures while it streams."""
    expected = {name: entry.get(name) for name in ("sha256", "bytes", "samples")}
    return ShardCheck(str(entry["url"]), expected, {"sha256": sha256, "bytes": bytes, "samples": samples}, error)


class VerifiedShard:
    """The samples of one shard a manifest lists, checked against its entry in the same read:

        shard = VerifiedShard(entry)               # a manifest entry: url, sha256, bytes, samples
        for key, members in shard:                 # streamed once, hashed as it is read
            ...
        if not shard.check.ok:                     # set once the last sample has been yielded
            rejects.append(shard.check.reject())

    A tar that breaks off (cut on a member boundary, truncated inside a member, missing) is not an
    exception here: the iteration ends, and `check` holds the error and the measured values. The
    samples yielded before a failed check came from a shard that is not the one the manifest lists:
    discard what was made of them. Other storage errors propagate (a retry may succeed).
    """

    def __init__(self, entry: Mapping[str, Any]):
        self.entry = entry
        self.check: ShardCheck | None = None

    def __iter__(self) -> Iterator[tuple[str, dict[str, bytes]]]:
        url = str(self.entry["url"])
        try:
            f = storage.open_read(url)
        except storage.NotFoundError as e:
            self.check = check_shard(self.entry, sha256=None, bytes=None, error=f"missing ({e})")
            return
        count, error = 0, None
        with f:
            reader = HashingReader(f)
            try:
                for key, members in _iter_tar(reader, url):
                    count += 1
                    yield key, members
            except ShardError as e:
                error = str(e).removeprefix(f"{url}: ")
            reader.drain()
        self.check = check_shard(self.entry, sha256=reader.hexdigest(), bytes=reader.bytes, samples=count,
                                 error=error)


def read_json(members: dict[str, bytes], url: str, key: str) -> dict:
    """The sample's ``json`` member as a dict; `ShardError` naming the sample when it is bad."""
    if "json" not in members:
        raise ShardError(f"{url}: sample {key} has no .json member (has {sorted(members)})")
    try:
        meta = json.loads(members["json"])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ShardError(f"{url}: sample {key}.json is not valid JSON ({e})") from e
    if not isinstance(meta, dict):
        raise ShardError(f"{url}: sample {key}.json must hold an object, found {type(meta).__name__}")
    return meta


SAMPLE_NUMBERS = ("offset_seconds", "seconds_start", "seconds_total")
"""Sample JSON fields that later stages compute with: finite numbers >= 0 where present."""


def read_sample_json(members: dict[str, bytes], url: str, key: str) -> dict:
    """`read_json`, plus the values later stages compute with: `SAMPLE_NUMBERS` finite and >= 0, a
    ``prompt`` (where present) a string. `ShardError` naming the shard, the sample key and the field."""
    meta = read_json(members, url, key)
    for name in SAMPLE_NUMBERS:
        value = meta.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ShardError(f"{url}: sample {key}.json: {name}={value!r}, expected a finite number >= 0")
    if not isinstance(meta.get("prompt", ""), str):
        raise ShardError(f"{url}: sample {key}.json: prompt={meta['prompt']!r}, expected a string")
    return meta


def _split_member(url: str, info: tarfile.TarInfo) -> tuple[str | None, str]:
    name = info.name
    if info.isdir():
        return None, ""
    if not info.isfile():
        raise ShardError(f"{url}: member {name!r} is not a regular file (links and devices are refused)")
    if name.startswith("/") or ".." in name.split("/") or "\\" in name:
        raise ShardError(f"{url}: member {name!r} has an absolute or '..' path")
    # webdataset's rule: the key is everything before the first dot of the base name.
    head, slash, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not stem or not dot or not ext:
        raise ShardError(f"{url}: member {name!r} is not named <key>.<ext>")
    return head + slash + stem, ext


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
