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
import os
import re
import tarfile
import tempfile
from collections.abc import Callable, Iterator

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
    truncated tar.
    """
    key, members = None, {}
    with storage.open_read(url) as f:
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
