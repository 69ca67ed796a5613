"""`--cache-gb 0` with prefetch: one fetch per shard per rank, shared by the rank's loader workers, in memory.

The rank's main process maps a pool of `slots` shared anonymous pages before its fetcher processes and loader
workers fork (so all see the same pages; nothing is written to disk and nothing outlives the processes), and
the fetchers (`fetcher.py`) fill it: shards in the rank's first-use order (`Schedule`), each verified against
its manifest entry as it arrives and indexed once (`tar_index.py`). A worker that needs a shard waits for its
slot, reads the index from it and copies out the members of its samples. A slot is freed once the main
process has received the batch of the shard's last step: every worker has built its batches up to there, and
no batch a worker builds later is earlier.

Memory: `slots x slot_bytes`; the pages of the largest shard in each slot are committed when the pool is
mapped (`_populate`), the index room only as it is written. `slots` is the most shards the rank's plan has
live at once with its workers running ahead (`needed_slots`, about two blocks), plus `prefetch_shards`;
`slot_bytes` is the largest shard in the manifest plus room for its index; a pool over half the node's memory
is refused before it is mapped, naming the largest shard (the manifest's sizes are untrusted). Readers never take a lock (a
process killed while holding one would stop them all): each slot's header is written last, and a reader
checks it again after copying.

Layout: per slot, a header (`state`, epoch, shard, data bytes, index bytes, record bytes) and its bytes: the
shard, then its index JSON (or a reject record for a rejected shard).
"""
from __future__ import annotations

import contextlib
import json
import mmap
import multiprocessing
import os
import struct
import time
from typing import Sequence

from pipeline import storage
from pipeline.data import tar_index
from pipeline.data.shard_cache import (WAIT_POLL_SECONDS, WAIT_SECONDS, Schedule, ShardRef, ShardRejected, Verifier,
                                       index_of, reject_record)

FREE, FILLING, READY, REJECTED = 0, 1, 2, 3
_SLOT = struct.Struct("<iqqqqq")  # state, epoch, shard, data bytes, index bytes, record bytes
_SLOT_HEADER = 64
_MADV_POPULATE_WRITE = 23  # <linux/mman.h>; Python's mmap module does not name it
_READ_CHUNK = 1024 * 1024


def _pages(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


def slot_bytes_for(shards: Sequence[ShardRef]) -> int:
    """The largest shard plus room for its index (an index entry is smaller than the 512-byte tar header of
    its member, so half the shard, at least 64 KiB, is ample)."""
    largest = max(s.bytes for s in shards)
    return largest + max(largest // 2, 64 * 1024)


def needed_slots(schedule: Schedule, epoch: int, lookahead: int) -> int:
    """The most shards live at once over epochs `epoch` and `epoch + 1` laid end to end, a shard counting from
    `lookahead` steps before its first step (workers build batches ahead of the main process) to its last."""
    spans = []
    offset = 0
    for e in (epoch, epoch + 1):
        plan = schedule.plan_for(e)
        spans += [(offset + first, offset + last) for _, first, last in schedule.shards(e)]
        offset += plan.steps
    events = sorted([(max(f - lookahead, 0), 1) for f, _ in spans] + [(last + 1, -1) for _, last in spans],
                    key=lambda ev: (ev[0], ev[1]))
    live = most = 0
    for _, d in events:
        live += d
        most = max(most, live)
    return most


class MemoryPool:
    """A rank's shards in memory, fetched once and read by all its loader workers (see the module docstring)."""

    IDLE_SECONDS = 0.005
    """An idle fetcher's next look (a look reads the slot headers: ~5 us)."""

    MAX_MEMORY_FRACTION = 0.5
    """Of the node's physical memory, the most one rank's pool may map (the manifest's `bytes` sizes it)."""

    def __init__(self, shards: list[ShardRef], *, slots: int, slot_bytes: int):
        self.shards, self.slots, self.slot_bytes = shards, slots, slot_bytes
        self.stride = _pages(_SLOT_HEADER + slot_bytes)
        self._check_fits(slots * self.stride)
        self.mem = mmap.mmap(-1, slots * self.stride)  # MAP_SHARED | MAP_ANONYMOUS
        self._populate(largest=max(s.bytes for s in shards))
        self.schedule: Schedule | None = None
        self.fetcher = None
        """The rank's fetchers (`fetcher.py`), set before the workers fork: a waiting reader raises their death."""
        self._lock = multiprocessing.get_context("fork").Lock()  # the fetchers' only; readers take none

    def _check_fits(self, need: int) -> None:
        """The manifest is untrusted: one shard it says is huge must fail here, naming it, not in the kernel."""
        node = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if need > node * self.MAX_MEMORY_FRACTION:
            largest = max(self.shards, key=lambda s: s.bytes)
            raise ValueError(f"{largest.url}: the manifest gives this shard {largest.bytes} bytes; --cache-gb 0 would "
                             f"hold {self.slots} shards of that size in memory ({need / 2**30:.1f} GiB), more than "
                             f"{self.MAX_MEMORY_FRACTION:.0%} of this node's {node / 2**30:.1f} GiB: write smaller "
                             f"shards or give --cache-gb a disk budget")

    def _populate(self, largest: int) -> None:
        """Commit the pages each slot's shard will use now (Linux >= 5.14), not on first touch: the first
        round of fetches is not slowed by page faults (~9 ms per 12 MB shard), and a rank short of memory
        fails at its start rather than mid-epoch. Elsewhere the pages come as they are written."""
        for i in range(self.slots):
            with contextlib.suppress(OSError, ValueError):
                self.mem.madvise(_MADV_POPULATE_WRITE, i * self.stride, _pages(_SLOT_HEADER + largest))

    # headers
    def _slot(self, i: int) -> tuple[int, int, int, int, int, int]:
        at = i * self.stride
        return _SLOT.unpack_from(self.mem, at)

    def _set_slot(self, i: int, state: int, epoch: int = -1, s: int = -1, data: int = 0, index: int = 0,
                  record: int = 0) -> None:
        _SLOT.pack_into(self.mem, i * self.stride, state, epoch, s, data, index, record)

    # the fetchers: fetch ahead, free what is done
    def prefetch_once(self, position: tuple[int, int], extra: int) -> bool:
        """Free the slots of shards the rank is past, then fetch the next shard in first-use order (this epoch
        and the next) into a free slot, at most `extra` shards beyond those live at `position`; True if one
        was fetched. Called by the fetcher processes."""
        with self._lock:
            held, free = self._sweep(position)
            target = self._next_to_fetch(position, held, extra) if free else None
            if target is None:
                return False
            slot = free[0]
            self._set_slot(slot, FILLING, *target)
        self._fill(slot, *target)  # an error: the fetcher records it, and every waiting reader raises it
        return True

    def _sweep(self, position: tuple[int, int]) -> tuple[dict[tuple[int, int], int], list[int]]:
        """Free the slots of shards the rank is past; the held shards ({(epoch, shard): slot}) and the free slots."""
        held, free = {}, []
        for i in range(self.slots):
            state, e, s, *_ = self._slot(i)
            if state in (READY, REJECTED) and (e, self.schedule.last_step(e, s)) < position:
                self._set_slot(i, FREE)
                state = FREE
            if state == FREE:
                free.append(i)
            else:
                held[(e, s)] = i
        return held, free

    def _next_to_fetch(self, position: tuple[int, int], held: dict, extra: int) -> tuple[int, int] | None:
        """The first (epoch, shard) in first-use order not held yet, unless more than `extra` shards start
        after `position` before it."""
        ahead = 0
        for e in (position[0], position[0] + 1):
            for s, first, last in self.schedule.shards(e):
                if (e, last) < position:
                    continue
                if (e, first) > position:
                    ahead += 1
                    if ahead > extra:
                        return None
                if (e, s) not in held:
                    return e, s
        return None

    def _fill(self, slot: int, epoch: int, s: int) -> None:
        ref = self.shards[s]
        at = slot * self.stride + _SLOT_HEADER
        verifier, size, view = Verifier(ref), 0, memoryview(self.mem)
        try:
            with storage.open_read(ref.url) as f:  # read straight into the slot, hashed there
                while True:
                    room = min(_READ_CHUNK, self.slot_bytes - size)
                    n = f.readinto(view[at + size: at + size + room]) if room else len(f.read(1))
                    if not n:
                        break
                    if not room:  # it cannot be the shard of the manifest: a reject, like any byte count
                        raise ShardRejected(reject_record(ref, "bytes", ref.bytes, f"more than {self.slot_bytes}"))
                    verifier.update(view[at + size: at + size + n])
                    size += n
            verifier.check()
            members = index_of(ref, view[at: at + size])
        except ShardRejected as e:
            record = json.dumps(e.record).encode()[: self.slot_bytes]
            self.mem[at: at + len(record)] = record
            self._set_slot(slot, REJECTED, epoch, s, record=len(record))
            return
        index = tar_index.encode(members, size=size, sha256=ref.sha256)
        if size + len(index) > self.slot_bytes:
            raise storage.StorageError(f"{ref.url}: its tar index ({len(index)} bytes) does not fit the memory pool's "
                                       f"slot of {self.slot_bytes} bytes")
        self.mem[at + size: at + size + len(index)] = index
        self._set_slot(slot, READY, epoch, s, data=size, index=len(index))

    # readers (loader workers, or the main process with 0 workers)
    def open(self, epoch: int, s: int) -> "PoolShard":
        """Wait for shard `s` of `epoch`; its checked members and a reader of its bytes."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            for i in range(self.slots):
                state, e, shard, data, index, record = self._slot(i)
                if (e, shard) != (epoch, s) or state not in (READY, REJECTED):
                    continue
                at = i * self.stride + _SLOT_HEADER
                if state == REJECTED:
                    raise ShardRejected(json.loads(self.mem[at: at + record]))
                members = tar_index.decode(self.mem[at + data: at + data + index], shard=self.shards[s].url,
                                           where="in the memory pool", size=data, sha256=self.shards[s].sha256)
                return PoolShard(self, i, epoch, s, members)
            if self.fetcher is not None:  # its error, "stopped" or "died": nobody will fill the slot
                self.fetcher.raise_error()
            if time.monotonic() > deadline:
                raise storage.StorageError(f"{self.shards[s].url}: not in this rank's memory pool after "
                                           f"{WAIT_SECONDS:.0f} s")
            time.sleep(WAIT_POLL_SECONDS)


class PoolShard:
    """A shard's bytes in its slot, sliced like `bytes`; each read checks that the slot still holds it."""

    def __init__(self, pool: MemoryPool, slot: int, epoch: int, s: int, members: list[tar_index.Member]):
        self.pool, self.slot, self.key, self.members = pool, slot, (epoch, s), members
        self.at = slot * pool.stride + _SLOT_HEADER

    def __getitem__(self, part: slice) -> bytes:
        data = self.pool.mem[self.at + part.start: self.at + part.stop]
        state, e, s, *_ = self.pool._slot(self.slot)
        if state != READY or (e, s) != self.key:
            raise RuntimeError(f"{self.pool.shards[self.key[1]].url}: its memory pool slot was reused while a "
                               f"worker read it (epoch {self.key[0]})")
        return data
