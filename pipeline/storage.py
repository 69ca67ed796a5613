"""URLs: local paths and ``s3://bucket/key``, behind a few verbs.

Every location in Cantus is a ``str`` URL (a ``pathlib.Path`` would turn ``s3://b`` into ``s3:/b``).
Anything that does not start with ``s3://`` is a local path. Nothing outside this module knows which
backend it talks to.

Choices, and why:
- Writes are atomic. Locally: a temp file in the same directory, fsync, rename (a reader never sees a
  half-written file; the temp name is hidden from `list_objects`). On S3: one PUT, or a multipart
  upload that becomes visible only when completed (a killed writer leaves no object).
- `put_if_absent` is the one primitive behind write-once manifests: S3 ``If-None-Match: *``, locally an
  exclusive hard link of a complete temp file. Some S3-compatible stores ignore the header and silently
  overwrite, so a stage calls `check_put_if_absent` once before relying on it.
- boto3 is imported lazily (local runs need no S3 stack); the endpoint comes from ``AWS_ENDPOINT_URL``
  or `configure_s3`, credentials from boto3's standard chain.
- Retries are ours, not botocore's (whose retries are silent): every S3 request that fails for a reason
  that may pass (a timeout, a refused or dropped connection, HTTP 5xx, throttling) is retried with
  backoff and logged at WARNING with its URL and attempt. One that makes no progress for
  ``CANTUS_S3_STALL_SECONDS`` (default 180) stops with `StorageUnavailable` naming the URL. Socket
  timeouts are a third of that (at most 60 s read, 10 s connect): they fire only when no byte moves, so a
  large upload that keeps moving is never cut. A GET body that breaks mid-stream resumes with a ranged GET
  of the same ETag.
- Errors are one `StorageError` line naming the URL and what was expected. Credentials never appear.
  `StorageUnavailable` (a temporary failure: retrying later may succeed; train exits 75 on it so SLURM
  requeues) is a `StorageError`; every other `StorageError` is permanent (access denied, no such bucket).
- Conditional writes for the train lease: `put_conditional` (S3 ``If-None-Match``/``If-Match``; locally a
  link or a rename aside, checked, then a link) and `delete_if_match`; `stat` carries the store's
  last-modified time and a version, `store_time` the store's own clock.
- `list_objects` exists for discovery of raw inputs and for deleting a tree; stages find work in
  manifests, never by listing.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from pipeline import storage_local as local
from pipeline import storage_s3 as s3
from pipeline.storage_s3 import STALL_SECONDS, stall_seconds
from pipeline.storage_s3 import client as _client  # noqa: F401 (tests and benches create buckets with it)
from pipeline.storage_types import CHUNK, NotFoundError, ObjectInfo, StorageError, StorageUnavailable

__all__ = ["PART_SIZE", "STALL_SECONDS", "Data", "NotFoundError", "ObjectInfo", "StorageError", "StorageUnavailable",
           "check_put_if_absent", "configure_s3", "delete", "delete_if_match", "delete_tree", "download", "exists",
           "is_s3", "join", "list_objects", "local_path", "open_read", "put_conditional", "put_if_absent",
           "read_bytes", "read_versioned", "reset", "sha256_url", "size", "stall_seconds", "stat", "store_time",
           "upload", "write"]

PART_SIZE = 64 * 1024 * 1024
"""S3 multipart part size in bytes; a write larger than one part becomes a multipart upload."""

Data = bytes | bytearray | memoryview | Iterable[bytes] | BinaryIO


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def join(url: str, *parts: str) -> str:
    """``join("s3://b/out", "val", "manifest.json") == "s3://b/out/val/manifest.json"``."""
    if "://" in url and not is_s3(url):
        raise StorageError(f"{url}: unsupported URL scheme (expected s3://bucket/key or a local path)")
    return "/".join([url.rstrip("/") if url.rstrip("/") else "/"] + [p.strip("/") for p in parts if p])


def configure_s3(endpoint_url: str | None = None) -> None:
    """Use this S3 endpoint instead of ``AWS_ENDPOINT_URL`` (e.g. from a ``--s3-endpoint`` flag)."""
    s3.configure(endpoint_url)


def reset() -> None:
    """Forget cached S3 clients, so changed credentials or endpoint in ``os.environ`` take effect."""
    s3.reset()


# ----------------------------------------------------------------------------------------- verbs


def _backend(url: str):
    return s3 if is_s3(url) else local


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def open_read(url: str) -> BinaryIO:
    """A binary stream to read from; use it as a context manager."""
    return _backend(url).open_read(url)


def write(url: str, data: Data) -> None:
    """Write atomically, replacing any existing object. ``data``: bytes, an iterable of byte chunks
    (streamed, so any size fits in memory) or a binary file object."""
    if is_s3(url):
        s3.write(url, _chunks(data), PART_SIZE)
    else:
        local.write(url, _chunks(data))


def put_if_absent(url: str, data: bytes) -> bool:
    """Create the object only if nothing is there yet. True if written, False if it already existed
    (the existing object is left untouched)."""
    return put_conditional(url, data, if_match=None) is not None


def put_conditional(url: str, data: bytes, *, if_match: str | None) -> str | None:
    """Write ``data`` only if nothing is at ``url`` (``if_match=None``) or if the object there is still the
    version ``if_match`` (an `ObjectInfo.version`). Returns the new version, or None when the condition
    failed (nothing was written).

    S3: ``If-None-Match: *`` / ``If-Match: <ETag>``, decided by the store. Locally: an exclusive hard link of a
    complete temp file; for ``if_match``, the current file is first renamed aside (a rename of one name
    succeeds once), checked, and linked back if it was another version. While it is aside the name is free
    for a microsecond: a concurrent put-if-absent may win it, and then this call fails."""
    return _backend(url).put_conditional(url, data, if_match)


def check_put_if_absent(url: str) -> None:
    """Probe once that the store under ``url`` refuses to overwrite on ``If-None-Match: *``."""
    probe = join(url, f"_probe-put-if-absent-{uuid.uuid4().hex}")
    try:
        if not put_if_absent(probe, b"first"):
            raise StorageError(f"{probe}: probe object unexpectedly exists")
        second = put_if_absent(probe, b"second")
        if second or read_bytes(probe) != b"first":
            raise StorageError(
                f"{url}: the store does not honour 'If-None-Match: *' (a conditional PUT overwrote the "
                "probe object); write-once manifests are unsafe here, use a store that supports it"
            )
    finally:
        delete(probe)


def exists(url: str) -> bool:
    """True if an object (S3) or a file (local) is at ``url``. A missing bucket is an error."""
    if not is_s3(url):
        return local.exists(url)
    try:
        stat(url)
        return True
    except NotFoundError:
        return False


def size(url: str) -> int:
    return stat(url).size


def stat(url: str) -> ObjectInfo:
    return _backend(url).stat(url)


def read_versioned(url: str) -> tuple[bytes, ObjectInfo]:
    """A small object's bytes and the `stat` of exactly that version (one GET on S3)."""
    return _backend(url).read_versioned(url)


def store_time(url: str) -> float:
    """Now, on the clock of the store that holds ``url`` (seconds since the epoch), to compare with
    `ObjectInfo.modified` without trusting this host's clock. S3: the ``Date`` header of a HEAD request (1 s
    resolution). Locally: the mtime of a fresh file beside ``url`` (on NFS the server sets it)."""
    return _backend(url).store_time(url)


def delete(url: str) -> None:
    """Delete one object; deleting a missing one is not an error (so clean-ups can be retried)."""
    _backend(url).delete(url)


def delete_if_match(url: str, version: str) -> bool:
    """Delete the object only if it is still ``version``; True if deleted. S3: ``If-Match`` on DELETE;
    locally the rename-aside check of `put_conditional`."""
    return _backend(url).delete_if_match(url, version)


def delete_tree(url: str) -> None:
    """Delete every object under ``url/`` (e.g. an old checkpoint folder)."""
    _backend(url).delete_tree(url)


def list_objects(url: str) -> list[ObjectInfo]:
    """Every object under the "directory" ``url/``, recursively, sorted by URL. For discovery of raw
    inputs only: stages find their work in manifests."""
    return _backend(url).list_objects(url)


def upload(local_path: str, url: str) -> None:
    """Copy a local file to ``url`` atomically (parallel multipart on S3 for large files)."""
    if not is_s3(url):
        local.upload(local_path, url)
        return
    local.check_source(local_path)  # a missing source is our error, not the store's
    s3.upload(local_path, url, PART_SIZE)


def download(url: str, local_path: str) -> None:
    """Copy ``url`` to a local file; the file appears complete or not at all."""
    with open_read(url) as f:
        write(local_path, f)


def local_path(url: str, folder: str) -> str:
    """A local path holding ``url``'s bytes: the path itself for a local URL, else a copy downloaded once
    into ``folder`` (for readers that need a file: safetensors, torch, tar random access)."""
    if not is_s3(url):
        return url
    path = os.path.join(folder, url.removeprefix("s3://").replace("/", "__"))
    if not os.path.exists(path):  # download() is atomic: a file that exists is complete
        download(url, path)
    return path


def sha256_url(url: str) -> str:
    """Hex sha256 of an object's bytes, streamed."""
    h = hashlib.sha256()
    with open_read(url) as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _chunks(data: Data) -> Iterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return iter([bytes(data)])
    if hasattr(data, "read"):
        return iter(lambda: data.read(CHUNK), b"")
    return iter(data)
