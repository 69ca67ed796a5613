"""One trainer per output: the train stage's rank 0 holds ``<out>/_lease.json`` while it runs.

- Taken with put-if-absent. It holds the SLURM job id and restart count, host, pid, a random token, and a
  beat counter that changes with every heartbeat (so every heartbeat is a new version; an S3 ETag is the
  MD5 of the body and would not change for the same bytes).
- Heartbeat: a background thread rewrites it every ``timeout / 5`` seconds (60 s by default), each time a
  conditional write on the version it wrote last (S3 ``If-Match``; locally the rename-aside check of
  `storage.put_conditional`). A thread, not the log steps: a checkpoint upload or a demo render can take
  longer than the timeout. A heartbeat that fails calls back, and the loop stops (exit 75): with a
  checkpoint when the write failed, without one when another trainer has taken the lease over.
- Stale: its last-modified time is older than ``timeout`` (``--lease-timeout``, default 300 s) on the
  store's own clock (`storage.store_time`: the S3 Date header; locally a fresh file's mtime), never this
  host's. A stale lease is taken over by a conditional write on the version that was judged stale, so of
  two successors exactly one wins. The same SLURM job after a requeue (same job id, higher restart count)
  takes its lease over at once.
- A clean exit deletes it (only if it is still the version this holder wrote).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import threading
import uuid
from typing import Callable

from pipeline import storage

logger = logging.getLogger(__name__)

NAME = "_lease.json"
FORMAT = "cantus-lease/1"
DEFAULT_TIMEOUT = 300.0
"""Seconds without a heartbeat after which a lease is stale (``--lease-timeout``): five heartbeats, and longer
than one heartbeat plus the default S3 stall limit (60 + 180 s), so an outage that storage rides out does
not make a live lease stale."""


class LeaseError(ValueError):
    """The output is held by another trainer, or its lease file cannot be read: exit 2, one line."""


class LeaseLost(storage.StorageError):
    """This holder's lease was taken over (or removed) by someone else."""


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Holder:
    job_id: str | None
    """SLURM_JOB_ID, or None outside SLURM."""
    restart_count: int
    """SLURM_RESTART_COUNT: 0 on the first run, one more after each requeue."""
    host: str
    pid: int
    token: str
    """Random, one per process: tells two holders with equal ids apart."""

    @classmethod
    def this_process(cls, job_id: str | None, restart_count: int) -> Holder:
        return cls(job_id=job_id, restart_count=restart_count, host=socket.gethostname(), pid=os.getpid(),
                   token=uuid.uuid4().hex)

    def describe(self) -> str:
        job = f"SLURM job {self.job_id} (restart {self.restart_count})" if self.job_id else "a trainer outside SLURM"
        return f"{job} on host {self.host}, pid {self.pid}"

    def requeue_of(self, other: Holder) -> bool:
        """True if this process is the same SLURM job as ``other``, started again after a requeue."""
        return self.job_id is not None and self.job_id == other.job_id and self.restart_count > other.restart_count

    def encode(self, beat: int) -> bytes:
        record = {"format": FORMAT, **dataclasses.asdict(self), "beat": beat,
                  "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        return (json.dumps(record, indent=1) + "\n").encode()

    @classmethod
    def decode(cls, data: bytes, url: str) -> Holder:
        try:
            record = json.loads(data)
            if record.get("format") != FORMAT:
                raise ValueError(f"format {record.get('format')!r}")
            holder = cls(job_id=record["job_id"], restart_count=int(record["restart_count"]), host=str(record["host"]),
                         pid=int(record["pid"]), token=str(record["token"]))
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise LeaseError(f"{url}: unreadable lease file ({type(e).__name__}: {e}; expected JSON of format {FORMAT} "
                             f"with job_id, restart_count, host, pid, token): if no trainer writes this output, "
                             f"delete it") from None
        return holder


class Lease:
    """A lease this process holds. `start_heartbeat` keeps it fresh; `release` gives it up."""

    def __init__(self, url: str, holder: Holder, version: str, timeout: float):
        self.url, self.holder, self.version, self.timeout = url, holder, version, timeout
        self.beat = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> None:
        """One heartbeat: rewrite the lease if it is still the version this holder wrote last."""
        version = storage.put_conditional(self.url, self.holder.encode(self.beat + 1), if_match=self.version)
        if version is None:
            raise LeaseLost(f"{self.url}: the lease is no longer ours (taken over or removed by another trainer)")
        self.version, self.beat = version, self.beat + 1

    def start_heartbeat(self, on_failure: Callable[[str, bool], None]) -> None:
        """Refresh every ``timeout / 5`` seconds in a daemon thread. On the first failure, stop beating and call
        ``on_failure(message, lost)``; ``lost`` says another trainer holds the output now."""

        def run() -> None:
            while not self._stop.wait(self.timeout / 5):
                try:
                    self.refresh()
                except LeaseLost as e:
                    on_failure(str(e), True)
                    return
                except (storage.StorageError, OSError) as e:
                    on_failure(f"{self.url}: heartbeat not written: {e}", False)
                    return

        self._thread = threading.Thread(target=run, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def stop_heartbeat(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def release(self) -> None:
        """Stop beating and delete the lease, if it is still ours."""
        self.stop_heartbeat()
        if storage.delete_if_match(self.url, self.version):
            logger.info("%s: released", self.url)
        else:
            logger.warning("%s: not released: it is no longer the lease this trainer wrote", self.url)


def lease_url(out: str) -> str:
    return storage.join(out, NAME)


def acquire(out: str, holder: Holder, timeout: float = DEFAULT_TIMEOUT) -> Lease:
    """Take the lease on output ``out``, or raise `LeaseError` naming the holder."""
    url = lease_url(out)
    for _ in range(10):  # each round settles one race with another trainer
        version = storage.put_conditional(url, holder.encode(0), if_match=None)
        if version is not None:
            logger.info("%s: taken by %s", url, holder.describe())
            return Lease(url, holder, version, timeout)
        try:
            data, info = storage.read_versioned(url)
        except storage.NotFoundError:
            continue  # released in between
        current = Holder.decode(data, url)
        if holder.requeue_of(current):
            why = f"this job's own lease, from before its requeue (restart {current.restart_count})"
        else:
            age = storage.store_time(url) - info.modified
            if age <= timeout:
                raise LeaseError(
                    f"{url}: output held by {current.describe()}, last heartbeat {max(age, 0):.0f} s ago: another "
                    f"trainer writes this output. Wait for it or stop it, or use another --output (a lease without "
                    f"a heartbeat for --lease-timeout={timeout:g} s is taken over)")
            why = f"stale: no heartbeat from {current.describe()} for {age:.0f} s (--lease-timeout {timeout:g} s)"
        version = storage.put_conditional(url, holder.encode(0), if_match=info.version)
        if version is not None:
            logger.warning("%s: taken over, %s", url, why)
            return Lease(url, holder, version, timeout)
    raise LeaseError(f"{url}: the lease kept changing while this trainer tried to take it; is another trainer "
                     f"starting on this output?")
