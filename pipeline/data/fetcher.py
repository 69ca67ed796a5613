"""A rank's shard fetchers: child processes that fetch shards ahead of the rank's position, into the node cache
or the rank's memory pool.

Why processes and not threads: downloading (boto3), checking (sha256, CRC) and copying hold the GIL often
enough that a fetch thread slows every torch call of the rank's main process (each one gives the GIL up and
must win it back), and two fetch threads share one core's worth of Python. The children are forked before the
loader's workers, and die with the rank (`PR_SET_PDEATHSIG`). They read the rank's position from a small shared
mapping the rank writes after each batch; the first error is written there too, and the rank (and any reader
waiting for a shard) raises it.
"""
from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import struct
import time
from typing import Callable

from pipeline import storage
from pipeline.data.workers import die_with_parent

_POSITION = struct.Struct("<qq")  # at 0, written by the rank: its next (epoch, step)
_FLAG = struct.Struct("<i")  # at 16 the rank's stop flag, at 20 the first error's length (written by a fetcher)
_STOP_AT, _ERROR_LENGTH_AT, _ERROR_AT = 16, 20, 24
_ERROR_BYTES = 4096


class Fetcher:
    """`step(position)` runs in the child: it fetches at most one shard and says whether it did (a source's
    `prefetch_once`; when it did not, the child looks again after `idle_seconds`). The first error is kept in
    shared memory, where the rank and every reader waiting on a shard find it (`raise_error`)."""

    def __init__(self, step: Callable[[tuple[int, int]], bool], *, processes: int, position: tuple[int, int],
                 idle_seconds: float):
        self.mem = mmap.mmap(-1, _ERROR_AT + _ERROR_BYTES)
        self.set_position(position)
        context = multiprocessing.get_context("fork")
        self._error_lock = context.Lock()
        parent = os.getpid()
        self.processes = [context.Process(target=self._run, args=(step, parent, idle_seconds),
                                          name=f"shard-fetcher-{i}", daemon=True) for i in range(processes)]
        for p in self.processes:
            p.start()
        self.pids = [p.pid for p in self.processes]

    def set_position(self, position: tuple[int, int]) -> None:
        """The rank's next (epoch, step): the fetcher frees what is before it and fetches what follows."""
        _POSITION.pack_into(self.mem, 0, *position)

    def _position(self) -> tuple[int, int]:
        return _POSITION.unpack_from(self.mem, 0)

    def _stopped(self) -> bool:
        return bool(_FLAG.unpack_from(self.mem, _STOP_AT)[0])

    def error(self) -> str | None:
        n = _FLAG.unpack_from(self.mem, _ERROR_LENGTH_AT)[0]
        return self.mem[_ERROR_AT:_ERROR_AT + n].decode(errors="replace") if n else None

    def _set_error(self, message: str) -> None:
        data = message.encode()[:_ERROR_BYTES]
        self.mem[_ERROR_AT:_ERROR_AT + len(data)] = data
        _FLAG.pack_into(self.mem, _ERROR_LENGTH_AT, len(data))  # published after the message

    def _run(self, step, parent: int, idle_seconds: float) -> None:
        die_with_parent(parent)(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the rank's to handle; it stops us
        try:
            while not self._stopped() and self.error() is None:
                if not step(self._position()):
                    time.sleep(idle_seconds)  # nothing to fetch until the rank moves on
        except Exception as e:  # noqa: BLE001 - handed to the rank, raised at its next batch
            with self._error_lock:
                if self.error() is None:
                    self._set_error(str(e) or type(e).__name__)

    def raise_error(self) -> None:
        """Raise the fetchers' error, "stopped" once the rank stopped them, or "died" when one is gone without
        a word (the OOM killer): for the rank and for readers waiting on them."""
        message = self.error()
        if message is not None:
            raise storage.StorageError(message)
        if self._stopped():
            raise storage.StorageError("the loader's shard fetcher was stopped")
        for pid in self.pids:
            if not _running(pid):
                raise storage.StorageError(f"the loader's shard fetcher (process {pid}) died; out of memory?")

    def stop(self, grace: float = 0.1) -> None:
        """Ask the fetchers to finish; a fetch still running after `grace` seconds is cut short (SIGKILL): the
        node cache drops the reservation of a dead process, and a memory pool goes with its loader."""
        _FLAG.pack_into(self.mem, _STOP_AT, 1)
        deadline = time.monotonic() + grace
        for p in self.processes:
            p.join(timeout=max(deadline - time.monotonic(), 0))
            if p.is_alive():
                p.kill()
                p.join()


def _running(pid: int) -> bool:
    """Alive and not a zombie (a dead child its parent has not reaped yet still answers signals)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
