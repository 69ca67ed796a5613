"""The types both storage backends share: the one-line errors and `ObjectInfo` (kept apart from
`pipeline.storage`, the facade, so that `storage_local` and `storage_s3` import them without a cycle)."""
from __future__ import annotations

import dataclasses

CHUNK = 1024 * 1024
"""Bytes per read when streaming."""


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
