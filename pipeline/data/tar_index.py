"""A shard's tar index: its members' names, data offsets and sizes, computed once with `tarfile` by the process
that fetches (or first verifies) the shard, and read by every rank and loader worker of the node instead of
walking the tar headers again (Python's `tarfile` costs ~0.1-1 ms per member, per process, on busy cores).

Stored as JSON: beside a cached shard (`<shard>.idx.json`, written before the shard is published, so a
published shard has its index), in the node folder for a local shard, or after the shard's bytes in the
memory pool (`memory_pool.py`). An index is read as untrusted input: version, byte count and sha256 must match
the shard, every member must lie inside the shard, and a name that is absolute or holds `..` is refused.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

VERSION = 1
SUFFIX = ".idx.json"

Member = tuple[str, int, int]
"""(name in the tar, offset of its data, size of its data)."""


class IndexRefused(ValueError):
    """A tar index that does not describe its shard: one line naming the shard, the index and the fault."""


def build(source: str | bytes | memoryview) -> list[Member]:
    """The regular-file members of a tar (a path, or its bytes), in tar order."""
    fileobj = None if isinstance(source, str) else io.BufferedReader(_View(memoryview(source)))
    with tarfile.open(source if fileobj is None else None, "r:", fileobj=fileobj) as tar:
        return [(info.name, info.offset_data, info.size) for info in tar if info.isfile()]


class _View(io.RawIOBase):
    """Bytes in memory as a seekable file, without copying them (`tarfile` reads only the headers)."""

    def __init__(self, view: memoryview):
        self.view, self.pos = view.cast("B"), 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), len(self.view) - self.pos))
        buffer[:n] = self.view[self.pos:self.pos + n]
        self.pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: len(self.view)}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos


def encode(members: list[Member], *, size: int, sha256: str) -> bytes:
    return json.dumps({"version": VERSION, "bytes": size, "sha256": sha256,
                       "members": [list(m) for m in members]}, separators=(",", ":")).encode()


def write(path: str, members: list[Member], *, size: int, sha256: str) -> None:
    """Written whole, then renamed into place: a reader sees the complete index or none."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(encode(members, size=size, sha256=sha256))
    os.replace(tmp, path)


def decode(data: bytes, *, shard: str, where: str, size: int, sha256: str = "") -> list[Member]:
    """The members of an index for a shard of `size` bytes (and `sha256`, when known), checked."""
    def refuse(why: str) -> IndexRefused:
        return IndexRefused(f"{shard}: tar index {where} is refused: {why}")

    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise refuse(f"not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("version") != VERSION:
        raise refuse(f"expected an object of version {VERSION}")
    if doc.get("bytes") != size:
        raise refuse(f"it describes {doc.get('bytes')!r} bytes, the shard has {size}")
    if sha256 and doc.get("sha256") != sha256:
        raise refuse(f"it describes sha256 {doc.get('sha256')!r}, the shard's is {sha256}")
    members = doc.get("members")
    if not isinstance(members, list):
        raise refuse("no members list")
    out = []
    for m in members:
        if not (isinstance(m, list) and len(m) == 3 and isinstance(m[0], str)
                and all(isinstance(v, int) and not isinstance(v, bool) for v in m[1:])):
            raise refuse(f"member {m!r} is not [name, offset, size]")
        name, offset, n = m
        if not name or name.startswith("/") or ".." in name.split("/") or "\0" in name:
            raise refuse(f"member name {name!r} is empty, absolute or holds '..'")
        if offset < 0 or n < 0 or offset + n > size:
            raise refuse(f"member {name!r} at offset {offset} of {n} bytes lies outside the shard's {size} bytes")
        out.append((name, offset, n))
    return out


def read(path: str, *, shard: str, size: int, sha256: str = "") -> list[Member] | None:
    """The checked members of the index file `path`; None when there is none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return decode(data, shard=shard, where=path, size=size, sha256=sha256)
