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

import contextlib
import dataclasses
import email.utils
import functools
import hashlib
import io
import logging
import mimetypes
import os
import random
import shutil
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import BinaryIO, TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")

PART_SIZE = 64 * 1024 * 1024
"""S3 multipart part size in bytes; a write larger than one part becomes a multipart upload."""
_CHUNK = 1024 * 1024
_TMP_SUFFIX = ".cantus-tmp"
_CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
_endpoint_url: str | None = None
STALL_SECONDS = 180.0
"""Default of ``CANTUS_S3_STALL_SECONDS``: an S3 request that makes no progress this long stops the stage."""

Data = bytes | bytearray | memoryview | Iterable[bytes] | BinaryIO


class StorageError(RuntimeError):
    """One line: ``<url>: <what went wrong> (<what to check>)``."""


class NotFoundError(StorageError):
    """The object (or file) does not exist; its bucket or directory may."""


class StorageUnavailable(StorageError):
    """A temporary failure (timeout, connection refused or dropped, HTTP 5xx, throttling, no progress for
    ``CANTUS_S3_STALL_SECONDS``): the same request may succeed later. Every other `StorageError` is permanent."""

    def __init__(self, message: str, quiet: float = 0.0):
        super().__init__(message)
        self.quiet = quiet
        """Seconds without progress that the failure itself stands for (a socket timeout's length)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    url: str
    size: int
    etag: str | None  # S3 ETag without quotes; None for local files
    modified: float | None = None
    """Last-modified time on the store's clock, seconds since the epoch (set by `stat`, not by listings)."""
    version: str | None = None
    """What `put_conditional(if_match=...)` compares: the S3 ETag, locally inode, mtime and size."""


def is_s3(url: str) -> bool:
    return url.startswith("s3://")


def join(url: str, *parts: str) -> str:
    """``join("s3://b/out", "val", "manifest.json") == "s3://b/out/val/manifest.json"``."""
    if "://" in url and not is_s3(url):
        raise StorageError(f"{url}: unsupported URL scheme (expected s3://bucket/key or a local path)")
    return "/".join([url.rstrip("/") if url.rstrip("/") else "/"] + [p.strip("/") for p in parts if p])


def configure_s3(endpoint_url: str | None = None) -> None:
    """Use this S3 endpoint instead of ``AWS_ENDPOINT_URL`` (e.g. from a ``--s3-endpoint`` flag)."""
    global _endpoint_url
    _endpoint_url = endpoint_url
    reset()


def reset() -> None:
    """Forget cached S3 clients, so changed credentials or endpoint in ``os.environ`` take effect."""
    _client_for.cache_clear()


# ----------------------------------------------------------------------------------------- verbs


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def open_read(url: str) -> BinaryIO:
    """A binary stream to read from; use it as a context manager."""
    if not is_s3(url):
        with _local_errors(url):
            return open(_path(url), "rb")
    return io.BufferedReader(_S3Reader(url), buffer_size=_CHUNK)


def write(url: str, data: Data) -> None:
    """Write atomically, replacing any existing object. ``data``: bytes, an iterable of byte chunks
    (streamed, so any size fits in memory) or a binary file object."""
    chunks = _chunks(data)
    if not is_s3(url):
        tmp = _local_temp(url, chunks)
        with _local_errors(url):
            os.replace(tmp, _path(url))
            _fsync_dir(os.path.dirname(_path(url)))
        return
    _s3_write(url, chunks)


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
    if not is_s3(url):
        return _local_put_conditional(url, data, if_match)
    bucket, key = _split(url)
    condition = {"IfNoneMatch": "*"} if if_match is None else {"IfMatch": f'"{if_match}"'}
    for _ in range(5):
        try:
            response = _s3(url, "PutObject", lambda: _client().put_object(
                Bucket=bucket, Key=key, Body=bytes(data), ContentType=_content_type(key), **condition),
                keep=(404, 409, 412))
            return response["ETag"].strip('"')
        except _client_error() as e:
            if _status(e) == 412 or _code(e) == "NoSuchKey":  # the object exists / is another version / is gone
                return None
            if _status(e) == 404:
                with _s3_errors(url):
                    raise  # no such bucket
            # 409: a concurrent conditional write is in flight; AWS says retry.
    raise StorageError(f"{url}: conditional PUT kept conflicting (HTTP 409) after 5 attempts")


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
        return os.path.isfile(_path(url))
    try:
        stat(url)
        return True
    except NotFoundError:
        return False


def size(url: str) -> int:
    return stat(url).size


def stat(url: str) -> ObjectInfo:
    if not is_s3(url):
        with _local_errors(url):
            st = os.stat(_path(url))
        if not os.path.isfile(_path(url)):
            raise StorageError(f"{url}: is a directory, expected a file")
        return ObjectInfo(url, st.st_size, None, st.st_mtime, _local_version(st))
    bucket, key = _split(url)
    head = _s3(url, "HeadObject", lambda: _client().head_object(Bucket=bucket, Key=key))
    etag = head["ETag"].strip('"')
    return ObjectInfo(url, head["ContentLength"], etag, head["LastModified"].timestamp(), etag)


def read_versioned(url: str) -> tuple[bytes, ObjectInfo]:
    """A small object's bytes and the `stat` of exactly that version (one GET on S3)."""
    if not is_s3(url):
        with _local_errors(url), open(_path(url), "rb") as f:
            st = os.fstat(f.fileno())
            return f.read(), ObjectInfo(url, st.st_size, None, st.st_mtime, _local_version(st))
    bucket, key = _split(url)
    got = _s3(url, "GetObject", lambda: _client().get_object(Bucket=bucket, Key=key))
    with _s3_errors(url):
        data = got["Body"].read()
    etag = got["ETag"].strip('"')
    return data, ObjectInfo(url, len(data), etag, got["LastModified"].timestamp(), etag)


def store_time(url: str) -> float:
    """Now, on the clock of the store that holds ``url`` (seconds since the epoch), to compare with
    `ObjectInfo.modified` without trusting this host's clock. S3: the ``Date`` header of a HEAD request (1 s
    resolution). Locally: the mtime of a fresh file beside ``url`` (on NFS the server sets it)."""
    if not is_s3(url):
        tmp = _local_temp(url, iter([b""]))
        try:
            return os.stat(tmp).st_mtime
        finally:
            os.unlink(tmp)
    bucket, key = _split(url)
    try:
        head = _s3(url, "HeadObject", lambda: _client().head_object(Bucket=bucket, Key=key), keep=(404,))
    except _client_error() as e:
        head = e.response
    date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        raise StorageError(f"{url}: the S3 endpoint sent no Date header; cannot tell the store's time")
    return email.utils.parsedate_to_datetime(date).timestamp()


def delete(url: str) -> None:
    """Delete one object; deleting a missing one is not an error (so clean-ups can be retried)."""
    if not is_s3(url):
        with _local_errors(url), contextlib.suppress(FileNotFoundError):
            os.unlink(_path(url))
        return
    bucket, key = _split(url)
    _s3(url, "DeleteObject", lambda: _client().delete_object(Bucket=bucket, Key=key))


def delete_if_match(url: str, version: str) -> bool:
    """Delete the object only if it is still ``version``; True if deleted. S3: ``If-Match`` on DELETE;
    locally the rename-aside check of `put_conditional`."""
    if not is_s3(url):
        aside = _local_aside(url, version)
        if aside is not None:
            os.unlink(aside)
        return aside is not None
    bucket, key = _split(url)
    try:
        _s3(url, "DeleteObject", lambda: _client().delete_object(Bucket=bucket, Key=key, IfMatch=f'"{version}"'),
            keep=(404, 412))
        return True
    except _client_error() as e:
        if _status(e) == 404 and _code(e) != "NoSuchKey":
            with _s3_errors(url):
                raise  # no such bucket
        return False


def delete_tree(url: str) -> None:
    """Delete every object under ``url/`` (e.g. an old checkpoint folder)."""
    if not is_s3(url):
        if os.path.isdir(_path(url)):
            with _local_errors(url):
                shutil.rmtree(_path(url))
        return
    bucket, _ = _split(url)
    keys = [_split(o.url)[1] for o in list_objects(url)]
    for i in range(0, len(keys), 1000):
        batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
        _s3(url, "DeleteObjects", lambda: _client().delete_objects(Bucket=bucket, Delete=batch))


def list_objects(url: str) -> list[ObjectInfo]:
    """Every object under the "directory" ``url/``, recursively, sorted by URL. For discovery of raw
    inputs only: stages find their work in manifests."""
    if not is_s3(url):
        root = _path(url)
        if not os.path.isdir(root):
            return []
        found = []
        for dirpath, _, files in os.walk(root):
            for name in files:
                if not name.endswith(_TMP_SUFFIX):
                    path = os.path.join(dirpath, name)
                    found.append(ObjectInfo(path, os.path.getsize(path), None))
        return sorted(found, key=lambda o: o.url)
    bucket, prefix = _split(url, key_required=False)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""

    def listing() -> list[ObjectInfo]:
        return [ObjectInfo(f"s3://{bucket}/{o['Key']}", o["Size"], o["ETag"].strip('"'))
                for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", [])]
    return sorted(_s3(url, "ListObjectsV2", listing), key=lambda o: o.url)


def upload(local_path: str, url: str) -> None:
    """Copy a local file to ``url`` atomically (parallel multipart on S3 for large files)."""
    if not is_s3(url):
        with _local_errors(local_path), open(local_path, "rb") as f:
            write(url, f)
        return
    from boto3.s3.transfer import TransferConfig
    bucket, key = _split(url)
    with _local_errors(local_path):
        os.stat(local_path)  # a missing source is our error, not the store's
    config = TransferConfig(multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE)
    _s3(url, "upload", lambda: _client().upload_file(
        local_path, bucket, key, ExtraArgs={"ContentType": _content_type(key)}, Config=config))


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
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------- local


def _path(url: str) -> str:
    if "://" in url:
        raise StorageError(f"{url}: unsupported URL scheme (expected s3://bucket/key or a local path)")
    return url


def _chunks(data: Data) -> Iterator[bytes]:
    if isinstance(data, (bytes, bytearray, memoryview)):
        return iter([bytes(data)])
    if hasattr(data, "read"):
        return iter(lambda: data.read(_CHUNK), b"")
    return iter(data)


def _local_temp(url: str, chunks: Iterator[bytes]) -> str:
    """Write ``chunks`` to a hidden temp file beside ``url``, fsynced; return its path."""
    path = _path(url)
    parent, name = os.path.split(os.path.abspath(path))
    with _local_errors(url):
        os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:12]}{_TMP_SUFFIX}")
    try:
        with _local_errors(url):
            # os.open with 0o666 lets the umask decide permissions (mkstemp would force 0600).
            with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as f:
                for chunk in chunks:
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def _fsync_dir(path: str) -> None:
    """Make a rename or link durable: the directory entry itself must reach the disk."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _local_errors(url: str) -> Iterator[None]:
    try:
        yield
    except FileExistsError:
        raise
    except FileNotFoundError as e:
        raise NotFoundError(f"{url}: no such file or directory") from e
    except PermissionError as e:
        raise StorageError(f"{url}: permission denied") from e
    except IsADirectoryError as e:
        raise StorageError(f"{url}: is a directory, expected a file") from e
    except OSError as e:
        raise StorageError(f"{url}: {e.strerror or e}") from e


def _local_version(st: os.stat_result) -> str:
    """A local file's version: every write makes a new inode (temp + rename), and the mtime tells a reused
    inode number apart."""
    return f"{st.st_dev}-{st.st_ino}-{st.st_mtime_ns}-{st.st_size}"


def _local_aside(url: str, version: str) -> str | None:
    """Rename the file at ``url`` to a hidden name if it is ``version``; return that name, or None (the file
    is absent or another version, which is put back under ``url`` unless a new file took the name)."""
    path = _path(url)
    parent, name = os.path.split(os.path.abspath(path))
    aside = os.path.join(parent, f".{name}.{uuid.uuid4().hex[:12]}.aside{_TMP_SUFFIX}")
    try:
        with _local_errors(url):
            os.rename(path, aside)  # of several concurrent renames of one name, exactly one succeeds
    except NotFoundError:
        return None
    if _local_version(os.stat(aside)) == version:
        return aside
    with contextlib.suppress(FileExistsError):
        os.link(aside, path)  # the same inode back: its version is unchanged
    os.unlink(aside)
    return None


def _local_put_conditional(url: str, data: bytes, if_match: str | None) -> str | None:
    tmp = _local_temp(url, _chunks(data))
    aside = None
    try:
        version = _local_version(os.stat(tmp))
        if if_match is not None:
            aside = _local_aside(url, if_match)
            if aside is None:
                return None
        try:
            with _local_errors(url):
                os.link(tmp, _path(url))  # fails if the name exists: exclusive create of a complete file
                _fsync_dir(os.path.dirname(_path(url)))
        except FileExistsError:
            return None
        return version
    finally:
        os.unlink(tmp)
        if aside is not None:
            os.unlink(aside)


# -------------------------------------------------------------------------------------------- S3


def _split(url: str, key_required: bool = True) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or (key_required and not key):
        raise StorageError(f"{url}: expected s3://bucket/key")
    return bucket, key


def stall_seconds() -> float:
    """``CANTUS_S3_STALL_SECONDS``: how long an S3 request may make no progress before the stage stops."""
    raw = os.environ.get("CANTUS_S3_STALL_SECONDS", "").strip()
    try:
        value = float(raw) if raw else STALL_SECONDS
    except ValueError:
        value = -1.0
    if not value > 0:
        raise StorageError(f"CANTUS_S3_STALL_SECONDS={raw!r}: expected a positive number of seconds")
    return value


def _timeouts(stall: float) -> tuple[float, float]:
    """(connect, read) socket timeouts: a third of the stall limit, so a dead endpoint is retried (and
    logged) a few times before the stage stops; at most 10 s / 60 s. They fire only when no byte moves."""
    return min(10.0, stall / 3), min(60.0, stall / 3)


@functools.lru_cache(maxsize=4)
def _client_for(pid: int, endpoint_url: str | None, stall: float):
    import boto3
    from botocore.config import Config
    # A session per client: boto3's default session is not thread-safe, and a client must not cross
    # a fork (hence the pid in the cache key). One attempt per call: `_s3` retries, and logs each retry.
    connect, read = _timeouts(stall)
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url,
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                      retries={"total_max_attempts": 1, "mode": "standard"},
                      connect_timeout=connect, read_timeout=read))


def _client():
    return _client_for(os.getpid(), _endpoint_url, stall_seconds())


def _client_error() -> type[Exception]:
    from botocore.exceptions import ClientError
    return ClientError


class _Retry:
    """The retry policy of one S3 operation: transient failures are retried with jittered exponential
    backoff (0.5 s doubling, at most 20 s), each logged at WARNING with the URL and attempt, until no progress
    was made for the stall limit; then `StorageUnavailable`. `progress()` restarts the clock."""

    def __init__(self, url: str, what: str):
        self.url, self.what = url, what
        self.stall = stall_seconds()
        self.attempt = 0
        self.quiet_since: float | None = None

    def progress(self) -> None:
        self.attempt, self.quiet_since = 0, None

    def failed(self, error: StorageUnavailable) -> None:
        """Sleep before the next attempt, or raise once the stall limit has passed."""
        now = time.monotonic()
        if self.quiet_since is None:
            self.quiet_since = now - error.quiet  # a timeout means no byte moved for its whole length
        self.attempt += 1
        quiet = now - self.quiet_since
        reason = str(error).removeprefix(f"{self.url}: ")
        if quiet >= self.stall:
            raise StorageUnavailable(
                f"{self.url}: no progress for {quiet:.0f} s ({self.what}: {reason}); stopped by "
                f"CANTUS_S3_STALL_SECONDS={self.stall:g}") from error
        delay = min(0.5 * 2 ** (self.attempt - 1) * random.uniform(0.5, 1.0), 20.0, self.stall - quiet)
        logger.warning("%s: %s attempt %d failed (%s); retrying in %.1f s (stops after %g s without progress)",
                       self.url, self.what, self.attempt, reason, delay, self.stall)
        time.sleep(delay)


def _endpoint() -> str:
    return _endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "(AWS default)")


def _s3(url: str, what: str, call: Callable[[], T], keep: tuple[int, ...] = ()) -> T:
    """``call()`` (one S3 request) with `_Retry`; errors become one-line `StorageError`s, except ClientErrors
    with an HTTP status in ``keep``, which the caller handles."""
    retry = _Retry(url, what)
    while True:
        try:
            with _s3_errors(url, keep):
                return call()
        except StorageUnavailable as e:
            retry.failed(e)


class _S3Reader(io.RawIOBase):
    """A GET's body that survives a dropped or stalled connection: it GETs again from the byte it stopped
    at (``Range``), with ``If-Match`` on the first response's ETag so the bytes come from one version."""

    def __init__(self, url: str):
        self.url = url
        self.bucket, self.key = _split(url)
        self.pos, self.etag, self.body = 0, None, None
        self._get(_Retry(url, "GetObject"))

    def _get(self, retry: _Retry) -> None:
        condition = {"IfMatch": f'"{self.etag}"'} if self.etag else {}
        ranged = {"Range": f"bytes={self.pos}-"} if self.pos else {}
        while True:
            try:
                with _s3_errors(self.url, keep=(412, 416)):
                    got = _client().get_object(Bucket=self.bucket, Key=self.key, **condition, **ranged)
                break
            except StorageUnavailable as e:
                retry.failed(e)
            except _client_error() as e:
                if _status(e) == 412:
                    raise StorageError(f"{self.url}: the object changed while it was being read") from e
                self.body = io.BytesIO()  # 416: the range starts at the end, nothing is left
                return
        self.etag = self.etag or got["ETag"].strip('"')
        self.body = got["Body"]

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        retry = _Retry(self.url, "GetObject (reading the body)")
        while True:
            try:
                with _s3_errors(self.url):
                    data = self.body.read(len(buffer))
                break
            except StorageUnavailable as e:
                retry.failed(e)
                self._get(retry)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)

    def close(self) -> None:
        if self.body is not None:
            self.body.close()
        super().close()


mimetypes.add_type("audio/flac", ".flac")  # missing from some systems' tables


def _content_type(key: str) -> str:
    """S3 serves what it was told: a page, its audio and images must carry their types to open in a
    browser from a bucket (render's static site)."""
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


def _s3_write(url: str, chunks: Iterator[bytes]) -> None:
    bucket, key = _split(url)
    buf, upload_id, parts = bytearray(), None, []
    kind = _content_type(key)

    def put_part(body: bytes) -> None:
        number = len(parts) + 1
        part = _s3(url, f"UploadPart {number}", lambda: _client().upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body))
        parts.append({"PartNumber": number, "ETag": part["ETag"]})

    try:
        for chunk in chunks:
            buf += chunk
            while len(buf) > PART_SIZE:  # ">" so a body of exactly one part stays a single PUT
                if upload_id is None:
                    upload_id = _s3(url, "CreateMultipartUpload", lambda: _client().create_multipart_upload(
                        Bucket=bucket, Key=key, ContentType=kind))["UploadId"]
                put_part(bytes(buf[:PART_SIZE]))
                del buf[:PART_SIZE]
        if upload_id is None:
            body = bytes(buf)
            _s3(url, "PutObject", lambda: _client().put_object(Bucket=bucket, Key=key, Body=body, ContentType=kind))
            return
        if buf:
            put_part(bytes(buf))
        _s3(url, "CompleteMultipartUpload", lambda: _client().complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}))
    except BaseException:
        if upload_id is not None:  # best effort, no retries: an unfinished upload is invisible but holds space
            with contextlib.suppress(Exception):
                _client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def _code(error: BaseException) -> str:
    return getattr(error, "response", {}).get("Error", {}).get("Code", "")


def _status(error: BaseException | None) -> int | None:
    response = getattr(error, "response", None)
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if response else None


_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeoutException",
                    "InternalError", "ServiceUnavailable", "RequestLimitExceeded", "PriorRequestNotComplete"}
"""S3 error codes that may pass with time (besides any HTTP 5xx and 429), as botocore's standard retry mode has them."""


@contextlib.contextmanager
def _s3_errors(url: str, keep: tuple[int, ...] = ()) -> Iterator[None]:
    """Turn botocore errors into one-line `StorageError`s (`StorageUnavailable` when they may pass); HTTP
    statuses in ``keep`` pass through as ClientErrors."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError, ConnectTimeoutError,
                                     EndpointConnectionError, HTTPClientError, IncompleteReadError,
                                     NoCredentialsError, ReadTimeoutError)
    try:
        yield
    except S3UploadFailedError as e:  # boto3's upload_file wraps the ClientError of a part in this
        with _s3_errors(url, keep):
            raise (e.__context__ if isinstance(e.__context__, ClientError) else StorageError(f"{url}: {e}")) from e
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        status = _status(e)
        message = e.response.get("Error", {}).get("Message", "")
        if status in keep:
            raise
        if (status or 0) >= 500 or status == 429 or code in _TRANSIENT_CODES:
            raise StorageUnavailable(f"{url}: S3 error {code or status}: {message}") from e
        if code == "NoSuchBucket":
            raise StorageError(f"{url}: bucket {_split(url, False)[0]!r} does not exist") from e
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            if code != "NoSuchKey" and not _bucket_exists(url):  # HEAD errors carry no code
                raise StorageError(f"{url}: bucket {_split(url, False)[0]!r} does not exist") from e
            raise NotFoundError(f"{url}: no such object") from e
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"{url}: access denied ({_CREDENTIALS_HINT}, and the bucket policy)") from e
        raise StorageError(f"{url}: S3 error {code or status}: {message}") from e
    except NoCredentialsError as e:
        raise StorageError(f"{url}: no AWS credentials found ({_CREDENTIALS_HINT})") from e
    except EndpointConnectionError as e:
        raise StorageUnavailable(f"{url}: cannot connect to the S3 endpoint {_endpoint()} (check "
                                 f"AWS_ENDPOINT_URL)") from e
    except (ConnectTimeoutError, ReadTimeoutError) as e:
        connect, read = _timeouts(stall_seconds())
        quiet = connect if isinstance(e, ConnectTimeoutError) else read
        raise StorageUnavailable(f"{url}: no answer from the S3 endpoint {_endpoint()} for {quiet:g} s",
                                 quiet=quiet) from e
    except (ConnectionError, HTTPClientError, IncompleteReadError) as e:
        raise StorageUnavailable(f"{url}: connection to the S3 endpoint {_endpoint()} failed "
                                 f"({type(e).__name__})") from e
    except BotoCoreError as e:
        raise StorageError(f"{url}: {type(e).__name__}: {e}") from e


def _bucket_exists(url: str) -> bool:
    try:
        _s3(url, "HeadBucket", lambda: _client().head_bucket(Bucket=_split(url, False)[0]), keep=(404,))
        return True
    except _client_error() as e:
        return _status(e) != 404
