"""Where the train loader gets a shard's bytes: in place (local files), a node's bounded disk cache (S3), or
memory (S3 with `--cache-gb 0`); every shard checked against its manifest entry as it arrives.

Node cache (one folder per node, shared by its ranks and their loader workers, coordinated by an `flock`):
- `e<epoch>-<shard>-<sha12>.tar`: a complete, verified copy (written as `.part-<pid>`, renamed when its
  sha256 and byte count match the manifest), and its tar index `<that>.idx.json` (`tar_index.py`), written
  by the downloading process before the rename, so no other rank or worker walks the tar again.
- `<that>.reserve`: a download in flight (`{pid, bytes}`); one of a dead process is dropped.
- `progress-<j>.json`: the next `(epoch, step)` rank `j` of the node will consume.
- `rejected-e<epoch>-<shard>.json`: a shard that failed its check, with expected and actual values.
Rules: shards are claimed in the node's first-use order (so the shard needed soonest always gets space
first, and a full cache cannot deadlock), a claim must fit in the byte budget (reserved + present), and a
shard is evicted once every rank of the node has consumed its last step. The loader checks at each epoch
that the plan's live set fits the budget (`EpochPlan.live_bytes_high_water`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import glob
import hashlib
import json
import logging
import os
import tarfile
import threading
import time
from typing import Callable, Iterator

from pipeline import storage
from pipeline.data import tar_index

logger = logging.getLogger(__name__)

_CHUNK = 1024 * 1024
POLL_SECONDS = 0.02
WAIT_POLL_SECONDS = 0.003
"""A reader that only waits for a fetcher (no claim, no lock) looks this often: a batch stalls for at most this."""
WAIT_SECONDS = 3600.0
"""A reader gives up on a shard nobody is downloading any more after this long (a node that lost a rank)."""


@dataclasses.dataclass(frozen=True, slots=True)
class ShardRef:
    url: str
    samples: int
    bytes: int = 0
    """Byte count from the manifest; 0: unknown (not checked)."""
    sha256: str = ""
    """Hex sha256 from the manifest; "": unknown (not checked, e.g. an SAT pre_encoded folder)."""


class ShardRejected(ValueError):
    """A shard whose bytes, sha256 or sample count differ from its manifest entry; `record` is the reject line."""

    def __init__(self, record: dict):
        self.record = record
        super().__init__(f"{record['shard']}: {record['check']} is {record['actual']}, the manifest says "
                         f"{record['expected']}")


def reject_record(ref: ShardRef, check: str, expected, actual) -> dict:
    return {"shard": ref.url, "check": check, "expected": expected, "actual": actual}


class Verifier:
    """sha256 and byte count of a shard as its chunks pass by (no second read)."""

    def __init__(self, ref: ShardRef):
        self.ref, self.hash, self.size = ref, hashlib.sha256(), 0

    def update(self, chunk: bytes) -> None:
        self.hash.update(chunk)
        self.size += len(chunk)

    def check(self) -> None:
        if self.ref.bytes and self.size != self.ref.bytes:
            raise ShardRejected(reject_record(self.ref, "bytes", self.ref.bytes, self.size))
        if self.ref.sha256 and self.hash.hexdigest() != self.ref.sha256:
            raise ShardRejected(reject_record(self.ref, "sha256", self.ref.sha256, self.hash.hexdigest()))


def read_verified(ref: ShardRef, sink: Callable[[bytes], None]) -> None:
    """Stream `ref.url` through storage into `sink`, checking it against its manifest entry at the end."""
    verifier = Verifier(ref)
    with storage.open_read(ref.url) as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            verifier.update(chunk)
            sink(chunk)
    verifier.check()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Schedule:
    """What the node needs when: for an epoch, its shards in first-use order with their first and last node
    step (from `EpochPlan`). Cached per process; the loader gives it to the cache and the dataset."""
    plan_for: Callable[[int], "object"]

    def shards(self, epoch: int) -> list[tuple[int, int, int]]:
        plan = self.plan_for(epoch)
        return [(s, plan.first_step[s], plan.last_step[s]) for s in plan.shards_by_first_use()]

    def last_step(self, epoch: int, shard: int) -> int:
        return self.plan_for(epoch).last_step[shard]


class NodeCache:
    """The node's bounded disk cache for S3 shards (see the module docstring)."""

    IDLE_SECONDS = 0.02
    """An idle fetcher's next look (a look takes the lock and lists the folder: ~0.3 ms)."""

    def __init__(self, folder: str, shards: list[ShardRef], *, budget_bytes: int | None, ranks_per_node: int):
        self.folder, self.shards, self.budget, self.ranks = folder, shards, budget_bytes, ranks_per_node
        os.makedirs(folder, exist_ok=True)
        self.schedule: Schedule | None = None
        self.fetcher = None
        """The rank's fetcher process (`fetcher.py`) while it runs: readers then wait for it instead of fetching,
        so loader workers never open S3 connections of their own, and raise its error."""

    # names
    def name(self, epoch: int, s: int) -> str:
        return os.path.join(self.folder, f"e{epoch}-{s:06d}-{self.shards[s].sha256[:12] or 'nohash'}.tar")

    def rejected_marker(self, epoch: int, s: int) -> str:
        return os.path.join(self.folder, f"rejected-e{epoch}-{s:06d}.json")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(os.path.join(self.folder, ".lock"), "a+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    # progress and eviction
    def write_progress(self, j: int, epoch: int, step: int) -> None:
        path = os.path.join(self.folder, f"progress-{j}.json")
        with open(path + ".tmp", "w") as f:
            json.dump({"epoch": epoch, "step": step}, f)
        os.replace(path + ".tmp", path)

    def _min_progress(self) -> tuple[int, int]:
        """The slowest rank's next (epoch, step); (-1, -1) while a rank has not started (nothing is evicted)."""
        found = []
        for j in range(self.ranks):
            try:
                with open(os.path.join(self.folder, f"progress-{j}.json")) as f:
                    p = json.load(f)
                found.append((p["epoch"], p["step"]))
            except (FileNotFoundError, json.JSONDecodeError):
                return (-1, -1)
        return min(found)

    def _entries(self) -> dict[tuple[int, int], str]:
        """(epoch, shard) -> "present" or "reserved", after dropping reservations of dead processes."""
        out = {}
        for path in glob.glob(os.path.join(self.folder, "e*-*.tar")) + glob.glob(os.path.join(self.folder, "e*-*.tar.reserve")):
            base = os.path.basename(path)
            epoch, s = int(base[1:base.index("-")]), int(base.split("-")[1])
            if path.endswith(".reserve"):
                if not _holder_alive(path):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path)
                    final = path[:-len(".reserve")]  # and what its download left: a part, an unpublished index
                    for part in glob.glob(final + ".part-*") + glob.glob(final + tar_index.SUFFIX + "*"):
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(part)
                    continue
                out.setdefault((epoch, s), "reserved")
            else:
                out[(epoch, s)] = "present"
        return out

    def _sweep(self) -> dict[tuple[int, int], str]:
        """Evict what every rank is done with, and copies this node's plan does not hold (another run's);
        return what stays."""
        progress = self._min_progress()
        entries = self._entries()
        for (epoch, s), state in list(entries.items()):
            last = self.schedule.plan_for(epoch).last_step.get(s)
            if state == "present" and (last is None or (epoch, last) < progress):
                self._evict(epoch, s)
                del entries[(epoch, s)]
        return entries

    def _make_room(self, entries: dict[tuple[int, int], str], before: tuple[int, int], need: int, used: int) -> int:
        """Claims go in first-use order, so a copy needed later than the shard we must fetch can only be left
        over from an earlier run that had run ahead (a resume): evict such copies, latest first, until `need`
        bytes fit. Returns the new usage."""
        later = sorted(((e, self.schedule.plan_for(e).first_step[s]), e, s) for (e, s), state in entries.items()
                       if state == "present" and (e, self.schedule.plan_for(e).first_step[s]) > before)
        while later and used + need > self.budget:
            _, e, s = later.pop()
            self._evict(e, s)
            del entries[(e, s)]
            used -= self.shards[s].bytes
        return used

    def _evict(self, epoch: int, s: int) -> None:
        os.unlink(self.name(epoch, s))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.name(epoch, s) + tar_index.SUFFIX)

    def usage(self) -> int:
        """Bytes present or reserved (the budget's measure)."""
        with self._locked():
            return sum(self.shards[s].bytes for _, s in self._entries())

    # claiming
    def _claim(self, position: tuple[int, int], upto: tuple[int, int] | None, depth: int | None
               ) -> tuple[int, int] | None:
        """Under the lock: reserve the first live shard, in node first-use order, that is neither present,
        reserved nor rejected, if it fits the budget. A reader at `position` passes `upto` (the epoch and first
        step of the shard it waits for): nothing later is claimed. The prefetcher passes `depth`: it stops when
        `depth` shards that start after `position` are already held."""
        with self._locked():
            entries = self._sweep()
            used = sum(self.shards[s].bytes for _, s in entries)
            progress = self._min_progress()
            live_from = progress if progress >= (0, 0) else position  # a rank not started yet: trust our own
            ahead = 0
            for epoch in range(live_from[0], max(position[0] + 1, upto[0] if upto else 0) + 1):
                for s, first, last in self.schedule.shards(epoch):
                    if (epoch, last) < live_from:
                        continue
                    if upto is not None and (epoch, first) > upto:
                        return None
                    held = (epoch, s) in entries or os.path.exists(self.rejected_marker(epoch, s))
                    if depth is not None and (epoch, first) > position:
                        ahead += held
                        if ahead >= depth:
                            return None
                    if held:
                        continue
                    if self.budget is not None and used + self.shards[s].bytes > self.budget:
                        used = self._make_room(entries, (epoch, first), self.shards[s].bytes, used)
                        if used + self.shards[s].bytes > self.budget:
                            return None
                    with open(self.name(epoch, s) + ".reserve", "w") as f:
                        json.dump({"pid": os.getpid(), "bytes": self.shards[s].bytes}, f)
                    return epoch, s
            return None

    def _download(self, epoch: int, s: int) -> None:
        final = self.name(epoch, s)
        part = f"{final}.part-{os.getpid()}-{threading.get_ident()}"
        rejected, complete = None, False
        try:
            with open(part, "wb") as f:
                read_verified(self.shards[s], f.write)
            members = index_of(self.shards[s], part)
            tar_index.write(final + tar_index.SUFFIX, members, size=os.path.getsize(part),
                            sha256=self.shards[s].sha256)
            complete = True
        except ShardRejected as e:
            rejected = e.record
        finally:
            # publishing and dropping the reservation under the lock: a claim that lists the folder in between
            # would otherwise see neither and fetch the shard again
            with self._locked():
                if complete:
                    os.replace(part, final)
                elif rejected is not None:
                    mark_rejected(self.folder, self.rejected_marker(epoch, s), rejected)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(part)
                os.unlink(final + ".reserve")

    def prefetch_once(self, position: tuple[int, int], depth: int) -> bool:
        """Download the next shard the node will need, unless `depth` shards beyond `position` are held; True
        if one was fetched."""
        claimed = self._claim(position, None, depth)
        if claimed is None:
            return False
        self._download(*claimed)
        return True

    def index(self, epoch: int, s: int) -> list[tar_index.Member]:
        """The members of a present copy, from the index its downloader wrote (a copy left by a version without
        indexes is walked here instead)."""
        final = self.name(epoch, s)
        members = tar_index.read(final + tar_index.SUFFIX, shard=self.shards[s].url, size=os.path.getsize(final),
                                 sha256=self.shards[s].sha256)
        return index_of(self.shards[s], final) if members is None else members

    def path(self, epoch: int, s: int, step: int) -> str:
        """The local copy of shard `s` for `epoch`, read at node step `step`: fetched (in first-use order, so
        maybe an earlier shard first) or awaited (always awaited while a fetcher runs)."""
        final, deadline = self.name(epoch, s), time.monotonic() + WAIT_SECONDS
        first = self.schedule.plan_for(epoch).first_step[s]
        while True:
            if os.path.exists(final):
                return final
            if os.path.exists(self.rejected_marker(epoch, s)):
                with open(self.rejected_marker(epoch, s)) as f:
                    raise ShardRejected(json.load(f))
            if self.fetcher is not None:
                self.fetcher.raise_error()
            claimed = None if self.fetcher is not None else self._claim((epoch, step), (epoch, first), None)
            if claimed is not None:
                self._download(*claimed)
                continue
            if time.monotonic() > deadline:
                raise storage.StorageError(f"{self.shards[s].url}: not in the node cache {self.folder} after "
                                           f"{WAIT_SECONDS:.0f} s (usage {self.usage()} of {self.budget} bytes)")
            time.sleep(POLL_SECONDS if self.fetcher is None else WAIT_POLL_SECONDS)


def _holder_alive(reserve_path: str) -> bool:
    try:
        with open(reserve_path) as f:
            pid = json.load(f)["pid"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return True  # being written, or just removed: not ours to judge
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class MemoryShards:
    """`--cache-gb 0`: each process streams the shards it needs into memory (verified on the way) and drops
    a shard once its reads have passed the shard's last step. Nothing is written to disk."""

    def __init__(self, shards: list[ShardRef]):
        self.shards = shards
        self.schedule: Schedule | None = None
        self.held: dict[tuple[int, int], bytes] = {}

    def data(self, epoch: int, s: int, step: int) -> bytes:
        for key in [k for k in self.held if (k[0], self.schedule.last_step(*k)) < (epoch, step)]:
            del self.held[key]
        if (epoch, s) not in self.held:
            chunks: list[bytes] = []
            read_verified(self.shards[s], chunks.append)
            self.held[(epoch, s)] = b"".join(chunks)
        return self.held[(epoch, s)]


def index_of(ref: ShardRef, source: "str | bytes | memoryview") -> list[tar_index.Member]:
    """Walk a verified shard's tar once (`tarfile`); a shard that is no tar is a reject."""
    try:
        return tar_index.build(source)
    except (tarfile.TarError, EOFError) as e:
        raise ShardRejected(reject_record(ref, "tar", "a readable tar", str(e) or type(e).__name__)) from None


def verify_local_once(ref: ShardRef, s: int, folder: str) -> list[tar_index.Member]:
    """A local shard is hashed when the node first opens it, and again only if its size or mtime changed; a
    marker in the node folder records the check, and the tar index written beside it, so the node's other
    processes skip both. Returns the shard's members."""
    st = os.stat(ref.url)
    if not (ref.sha256 or ref.bytes):
        return index_of(ref, ref.url)
    marker = os.path.join(folder, f"verified-{s:06d}-{ref.sha256[:12]}.json")
    index_path = marker[:-len(".json")] + tar_index.SUFFIX
    seen = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
        with open(marker) as f:
            if json.load(f) == seen:
                members = tar_index.read(index_path, shard=ref.url, size=st.st_size, sha256=ref.sha256)
                if members is not None:
                    return members
    read_verified(ref, lambda chunk: None)
    members = index_of(ref, ref.url)
    os.makedirs(folder, exist_ok=True)
    tar_index.write(index_path, members, size=st.st_size, sha256=ref.sha256)
    with open(marker + f".{os.getpid()}", "w") as f:
        json.dump(seen, f)
    os.replace(marker + f".{os.getpid()}", marker)
    return members


def mark_rejected(folder: str, marker: str, record: dict) -> None:
    """Write the reject marker once per node (a complete file linked into place, exclusive); its creator logs
    the reject and appends it to the node's `rejects.jsonl`."""
    tmp = f"{marker}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    try:
        os.link(tmp, marker)
    except FileExistsError:
        return
    finally:
        os.unlink(tmp)
    with open(os.path.join(folder, "rejects.jsonl"), "a") as f:
        f.write(json.dumps(record) + "\n")
    logger.warning("rejected shard: %s", ShardRejected(record))
