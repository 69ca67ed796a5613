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
  or `configure_s3`, credentials from boto3's standard chain; botocore does the retries with backoff.
- Errors are one `StorageError` line naming the URL and what was expected. Credentials never appear.
- `list_objects` exists for discovery of raw inputs and for deleting a tree; stages find work in
  manifests, never by listing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import mimetypes
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from typing import BinaryIO

PART_SIZE = 64 * 1024 * 1024
"""S3 multipart part size in bytes; a write larger than one part becomes a multipart upload."""
_CHUNK = 1024 * 1024
_TMP_SUFFIX = ".cantus-tmp"
_CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
_endpoint_url: str | None = None

Data = bytes | bytearray | memoryview | Iterable[bytes] | BinaryIO


class StorageError(RuntimeError):
    """One line: ``<url>: <what went wrong> (<what to check>)``."""


class NotFoundError(StorageError):
    """The object (or file) does not exist; its bucket or directory may."""


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    url: str
    size: int
    etag: str | None  # S3 ETag without quotes; None for local files


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
    bucket, key = _split(url)
    with _s3_errors(url):
        return _client().get_object(Bucket=bucket, Key=key)["Body"]


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
    bucket, key = _split(url)
    with _s3_errors(url):
        _s3_write(bucket, key, chunks)


def put_if_absent(url: str, data: bytes) -> bool:
    """Create the object only if nothing is there yet. True if written, False if it already existed
    (the existing object is left untouched)."""
    if not is_s3(url):
        tmp = _local_temp(url, _chunks(data))
        try:
            with _local_errors(url):
                os.link(tmp, _path(url))  # fails if the name exists: exclusive create of a complete file
                _fsync_dir(os.path.dirname(_path(url)))
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    from botocore.exceptions import ClientError
    bucket, key = _split(url)
    for _ in range(5):
        try:
            with _s3_errors(url, keep=(409, 412)):
                _client().put_object(Bucket=bucket, Key=key, Body=bytes(data), IfNoneMatch="*")
            return True
        except ClientError as e:
            if _status(e) == 412:  # Precondition Failed: the object exists
                return False
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
        return ObjectInfo(url, st.st_size, None)
    bucket, key = _split(url)
    with _s3_errors(url):
        head = _client().head_object(Bucket=bucket, Key=key)
    return ObjectInfo(url, head["ContentLength"], head["ETag"].strip('"'))


def delete(url: str) -> None:
    """Delete one object; deleting a missing one is not an error (so clean-ups can be retried)."""
    if not is_s3(url):
        with _local_errors(url), contextlib.suppress(FileNotFoundError):
            os.unlink(_path(url))
        return
    bucket, key = _split(url)
    with _s3_errors(url):
        _client().delete_object(Bucket=bucket, Key=key)


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
        with _s3_errors(url):
            _client().delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})


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
    found = []
    with _s3_errors(url):
        for page in _client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            found += [ObjectInfo(f"s3://{bucket}/{o['Key']}", o["Size"], o["ETag"].strip('"'))
                      for o in page.get("Contents", [])]
    return sorted(found, key=lambda o: o.url)


def upload(local_path: str, url: str) -> None:
    """Copy a local file to ``url`` atomically (parallel multipart on S3 for large files)."""
    if not is_s3(url):
        with _local_errors(local_path), open(local_path, "rb") as f:
            write(url, f)
        return
    from boto3.s3.transfer import TransferConfig
    bucket, key = _split(url)
    with _s3_errors(url):
        _client().upload_file(local_path, bucket, key, ExtraArgs={"ContentType": _content_type(key)}, Config=TransferConfig(
            multipart_threshold=PART_SIZE, multipart_chunksize=PART_SIZE))


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


# -------------------------------------------------------------------------------------------- S3


def _split(url: str, key_required: bool = True) -> tuple[str, str]:
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket or (key_required and not key):
        raise StorageError(f"{url}: expected s3://bucket/key")
    return bucket, key


@functools.lru_cache(maxsize=4)
def _client_for(pid: int, endpoint_url: str | None):
    import boto3
    from botocore.config import Config
    # A session per client: boto3's default session is not thread-safe, and a client must not cross
    # a fork (hence the pid in the cache key).
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint_url,
        config=Config(s3={"addressing_style": "path"}, signature_version="s3v4",
                      retries={"max_attempts": 8, "mode": "standard"},
                      connect_timeout=20, read_timeout=120))


def _client():
    return _client_for(os.getpid(), _endpoint_url)



mimetypes.add_type("audio/flac", ".flac")  # missing from some systems' tables


def _content_type(key: str) -> str:
    """S3 serves what it was told: a page, its audio and images must carry their types to open in a
    browser from a bucket (render's static site)."""
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


def _s3_write(bucket: str, key: str, chunks: Iterator[bytes]) -> None:
    client, buf, upload_id, parts = _client(), bytearray(), None, []
    kind = _content_type(key)
    try:
        for chunk in chunks:
            buf += chunk
            while len(buf) > PART_SIZE:  # ">" so a body of exactly one part stays a single PUT
                if upload_id is None:
                    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ContentType=kind)["UploadId"]
                part = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                          PartNumber=len(parts) + 1, Body=bytes(buf[:PART_SIZE]))
                parts.append({"PartNumber": len(parts) + 1, "ETag": part["ETag"]})
                del buf[:PART_SIZE]
        if upload_id is None:
            client.put_object(Bucket=bucket, Key=key, Body=bytes(buf), ContentType=kind)
            return
        if buf:
            part = client.upload_part(Bucket=bucket, Key=key, UploadId=upload_id,
                                      PartNumber=len(parts) + 1, Body=bytes(buf))
            parts.append({"PartNumber": len(parts) + 1, "ETag": part["ETag"]})
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id,
                                         MultipartUpload={"Parts": parts})
    except BaseException:
        if upload_id is not None:  # best effort: an unfinished upload is invisible but holds space
            with contextlib.suppress(Exception):
                client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        raise


def _status(error: BaseException | None) -> int | None:
    response = getattr(error, "response", None)
    return response.get("ResponseMetadata", {}).get("HTTPStatusCode") if response else None


@contextlib.contextmanager
def _s3_errors(url: str, keep: tuple[int, ...] = ()) -> Iterator[None]:
    """Turn botocore errors into one-line `StorageError`s; HTTP statuses in ``keep`` pass through."""
    from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError
    try:
        yield
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        status = _status(e)
        if status in keep:
            raise
        if code == "NoSuchBucket":
            raise StorageError(f"{url}: bucket {_split(url, False)[0]!r} does not exist") from e
        if code in ("NoSuchKey", "NotFound", "404") or status == 404:
            if code != "NoSuchKey" and not _bucket_exists(url):  # HEAD errors carry no code
                raise StorageError(f"{url}: bucket {_split(url, False)[0]!r} does not exist") from e
            raise NotFoundError(f"{url}: no such object") from e
        if status == 403 or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise StorageError(f"{url}: access denied ({_CREDENTIALS_HINT}, and the bucket policy)") from e
        message = e.response.get("Error", {}).get("Message", "")
        raise StorageError(f"{url}: S3 error {code or status}: {message}") from e
    except NoCredentialsError as e:
        raise StorageError(f"{url}: no AWS credentials found ({_CREDENTIALS_HINT})") from e
    except EndpointConnectionError as e:
        endpoint = _endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "(AWS default)")
        raise StorageError(f"{url}: cannot connect to the S3 endpoint {endpoint} (check AWS_ENDPOINT_URL)") from e
    except BotoCoreError as e:
        raise StorageError(f"{url}: {type(e).__name__}: {e}") from e


def _bucket_exists(url: str) -> bool:
    from botocore.exceptions import ClientError
    try:
        _client().head_bucket(Bucket=_split(url, False)[0])
        return True
    except ClientError as e:
        return _status(e) != 404
