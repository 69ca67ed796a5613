"""The S3 half of `pipeline.storage` (which says why each verb works as it does): boto3 clients per process,
our own logged retries until no progress for ``CANTUS_S3_STALL_SECONDS``, resumable GETs, multipart writes,
and botocore errors as one-line `StorageError`s."""
from __future__ import annotations

import contextlib
import email.utils
import functools
import io
import logging
import mimetypes
import os
import random
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, TypeVar

from pipeline.storage_types import CHUNK, NotFoundError, ObjectInfo, StorageError, StorageUnavailable

logger = logging.getLogger("pipeline.storage")
T = TypeVar("T")

_CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
_endpoint_url: str | None = None
STALL_SECONDS = 180.0
"""Default of ``CANTUS_S3_STALL_SECONDS``: an S3 request that makes no progress this long stops the stage."""


def configure(endpoint_url: str | None = None) -> None:
    global _endpoint_url
    _endpoint_url = endpoint_url
    reset()


def reset() -> None:
    _client_for.cache_clear()


# ----------------------------------------------------------------------------------------- verbs


def open_read(url: str) -> BinaryIO:
    return io.BufferedReader(_S3Reader(url), buffer_size=CHUNK)


def put_conditional(url: str, data: bytes, if_match: str | None) -> str | None:
    bucket, key = _split(url)
    condition = {"IfNoneMatch": "*"} if if_match is None else {"IfMatch": f'"{if_match}"'}
    for _ in range(5):
        try:
            response = _s3(url, "PutObject", lambda: client().put_object(
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


def stat(url: str) -> ObjectInfo:
    bucket, key = _split(url)
    head = _s3(url, "HeadObject", lambda: client().head_object(Bucket=bucket, Key=key))
    etag = head["ETag"].strip('"')
    return ObjectInfo(url, head["ContentLength"], etag, head["LastModified"].timestamp(), etag)


def read_versioned(url: str) -> tuple[bytes, ObjectInfo]:
    bucket, key = _split(url)
    got = _s3(url, "GetObject", lambda: client().get_object(Bucket=bucket, Key=key))
    with _s3_errors(url):
        data = got["Body"].read()
    etag = got["ETag"].strip('"')
    return data, ObjectInfo(url, len(data), etag, got["LastModified"].timestamp(), etag)


def store_time(url: str) -> float:
    """The ``Date`` header of a HEAD request (1 s resolution)."""
    bucket, key = _split(url)
    try:
        head = _s3(url, "HeadObject", lambda: client().head_object(Bucket=bucket, Key=key), keep=(404,))
    except _client_error() as e:
        head = e.response
    date = head.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if not date:
        raise StorageError(f"{url}: the S3 endpoint sent no Date header; cannot tell the store's time")
    return email.utils.parsedate_to_datetime(date).timestamp()


def delete(url: str) -> None:
    bucket, key = _split(url)
    _s3(url, "DeleteObject", lambda: client().delete_object(Bucket=bucket, Key=key))


def delete_if_match(url: str, version: str) -> bool:
    bucket, key = _split(url)
    try:
        _s3(url, "DeleteObject", lambda: client().delete_object(Bucket=bucket, Key=key, IfMatch=f'"{version}"'),
            keep=(404, 412))
        return True
    except _client_error() as e:
        if _status(e) == 404 and _code(e) != "NoSuchKey":
            with _s3_errors(url):
                raise  # no such bucket
        return False


def delete_tree(url: str) -> None:
    bucket, _ = _split(url)
    keys = [_split(o.url)[1] for o in list_objects(url)]
    for i in range(0, len(keys), 1000):
        batch = {"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True}
        _s3(url, "DeleteObjects", lambda: client().delete_objects(Bucket=bucket, Delete=batch))


def list_objects(url: str) -> list[ObjectInfo]:
    bucket, prefix = _split(url, key_required=False)
    prefix = prefix.rstrip("/") + "/" if prefix.strip("/") else ""

    def listing() -> list[ObjectInfo]:
        return [ObjectInfo(f"s3://{bucket}/{o['Key']}", o["Size"], o["ETag"].strip('"'))
                for page in client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                for o in page.get("Contents", [])]
    return sorted(_s3(url, "ListObjectsV2", listing), key=lambda o: o.url)


def upload(local_path: str, url: str, part_size: int) -> None:
    """Parallel multipart upload (boto3's transfer manager) above ``part_size`` bytes."""
    from boto3.s3.transfer import TransferConfig
    bucket, key = _split(url)
    config = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size)
    _s3(url, "upload", lambda: client().upload_file(
        local_path, bucket, key, ExtraArgs={"ContentType": _content_type(key)}, Config=config))


# ----------------------------------------------------------------------------------------- helpers


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


def client():
    """This process's boto3 S3 client (tests and benches create buckets with it)."""
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
                    got = client().get_object(Bucket=self.bucket, Key=self.key, **condition, **ranged)
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


def write(url: str, chunks: Iterator[bytes], part_size: int) -> None:
    """One PUT, or a multipart upload (parts of ``part_size`` bytes) that becomes visible only when completed."""
    bucket, key = _split(url)
    buf, upload_id, parts = bytearray(), None, []
    kind = _content_type(key)

    def put_part(body: bytes) -> None:
        number = len(parts) + 1
        part = _s3(url, f"UploadPart {number}", lambda: client().upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body))
        parts.append({"PartNumber": number, "ETag": part["ETag"]})

    try:
        for chunk in chunks:
            buf += chunk
            while len(buf) > part_size:  # ">" so a body of exactly one part stays a single PUT
                if upload_id is None:
                    upload_id = _s3(url, "CreateMultipartUpload", lambda: client().create_multipart_upload(
                        Bucket=bucket, Key=key, ContentType=kind))["UploadId"]
                put_part(bytes(buf[:part_size]))
                del buf[:part_size]
        if upload_id is None:
            body = bytes(buf)
            _s3(url, "PutObject", lambda: client().put_object(Bucket=bucket, Key=key, Body=body, ContentType=kind))
            return
        if buf:
            put_part(bytes(buf))
        _s3(url, "CompleteMultipartUpload", lambda: client().complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}))
    except BaseException:
        if upload_id is not None:  # best effort, no retries: an unfinished upload is invisible but holds space
            with contextlib.suppress(Exception):
                client().abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
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
        _s3(url, "HeadBucket", lambda: client().head_bucket(Bucket=_split(url, False)[0]), keep=(404,))
        return True
    except _client_error() as e:
        return _status(e) != 404
