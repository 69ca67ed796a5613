"""The local-filesystem half of `pipeline.storage` (which says why each verb works as it does): atomic writes
through a hidden temp file, fsync and rename; conditional writes through exclusive hard links."""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import BinaryIO

from pipeline.storage_types import CHUNK, NotFoundError, ObjectInfo, StorageError

_TMP_SUFFIX = ".cantus-tmp"


def open_read(url: str) -> BinaryIO:
    with _local_errors(url):
        return open(_path(url), "rb")


def write(url: str, chunks: Iterator[bytes]) -> None:
    tmp = _local_temp(url, chunks)
    with _local_errors(url):
        os.replace(tmp, _path(url))
        _fsync_dir(os.path.dirname(_path(url)))


def put_conditional(url: str, data: bytes, if_match: str | None) -> str | None:
    tmp = _local_temp(url, iter([bytes(data)]))
    aside = None
    try:
        version = _local_version(os.stat(tmp))
        with _folder_turn(_path(url)):
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


@contextlib.contextmanager
def _folder_turn(path: str):
    """Conditional writes in one folder take turns (flock on the folder: no lock file is left behind). A
    replacement renames the old file aside before linking the new one in, and a put-if-absent must not win the
    name in that instant. Where the file system refuses the lock (some NFS), the writes go on without it."""
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def exists(url: str) -> bool:
    return os.path.isfile(_path(url))


def stat(url: str) -> ObjectInfo:
    with _local_errors(url):
        st = os.stat(_path(url))
    if not os.path.isfile(_path(url)):
        raise StorageError(f"{url}: is a directory, expected a file")
    return ObjectInfo(url, st.st_size, None, st.st_mtime, _local_version(st))


def read_versioned(url: str) -> tuple[bytes, ObjectInfo]:
    with _local_errors(url), open(_path(url), "rb") as f:
        st = os.fstat(f.fileno())
        return f.read(), ObjectInfo(url, st.st_size, None, st.st_mtime, _local_version(st))


def store_time(url: str) -> float:
    """The mtime of a fresh file beside ``url`` (on NFS the server sets it)."""
    tmp = _local_temp(url, iter([b""]))
    try:
        return os.stat(tmp).st_mtime
    finally:
        os.unlink(tmp)


def delete(url: str) -> None:
    with _local_errors(url), contextlib.suppress(FileNotFoundError):
        os.unlink(_path(url))


def delete_if_match(url: str, version: str) -> bool:
    aside = _local_aside(url, version)
    if aside is not None:
        os.unlink(aside)
    return aside is not None


def delete_tree(url: str) -> None:
    if os.path.isdir(_path(url)):
        with _local_errors(url):
            shutil.rmtree(_path(url))


def list_objects(url: str) -> list[ObjectInfo]:
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


def upload(local_path: str, url: str) -> None:
    with _local_errors(local_path), open(local_path, "rb") as f:
        write(url, iter(lambda: f.read(CHUNK), b""))


def check_source(local_path: str) -> None:
    """A missing or unreadable local file is our error, named as such (not the destination store's)."""
    with _local_errors(local_path):
        os.stat(local_path)


# ----------------------------------------------------------------------------------------- helpers


def _path(url: str) -> str:
    if "://" in url:
        raise StorageError(f"{url}: unsupported URL scheme (expected s3://bucket/key or a local path)")
    return url


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
