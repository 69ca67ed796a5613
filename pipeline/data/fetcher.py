"""A rank's shard fetcher: a child process whose threads fetch shards ahead of the rank's position, into the
node cache or the rank's memory pool.

Why a process and not threads of the rank: downloading, hashing and copying hold the GIL often enough that a
fetch thread slows every torch call of the rank's main process (each one gives the GIL up and must win it
back), which on busy cores cost a third of the loader's rate. The child is forked before the loader's workers
and fetch threads exist, and dies with the rank (`PR_SET_PDEATHSIG`). It reads the rank's position from a small
shared mapping the rank writes after each batch; its first error is written there too, and the rank raises it
at its next batch.
"""
from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import struct
import threading
from typing import Callable

from pipeline import storage
from pipeline.data.workers import die_with_parent

_STATE = struct.Struct("<qqii")  # epoch, step, stop flag, error length
_ERROR_BYTES = 4096


class Fetcher:
    """`step(position)` runs in the child: it fetches at most one shard and says whether it did (a source's
    `prefetch_once`); `on_error(message)` also runs there, once, on the first error (the memory pool wakes its
    waiting readers with it)."""

    def __init__(self, step: Callable[[tuple[int, int]], bool], *, threads: int, position: tuple[int, int],
                 on_error: Callable[[str], None] = lambda message: None):
        self.mem = mmap.mmap(-1, _STATE.size + _ERROR_BYTES)
        self.set_position(position)
        parent = os.getpid()
        self.process = multiprocessing.get_context("fork").Process(
            target=self._run, args=(step, threads, parent, on_error), name="shard-fetcher", daemon=True)
        self.process.start()

    def set_position(self, position: tuple[int, int]) -> None:
        """The rank's next (epoch, step): the fetcher frees what is before it and fetches what follows."""
        _, _, stop, n = _STATE.unpack_from(self.mem, 0)
        _STATE.pack_into(self.mem, 0, position[0], position[1], stop, n)

    def _position(self) -> tuple[int, int]:
        epoch, step, _, _ = _STATE.unpack_from(self.mem, 0)
        return epoch, step

    def _stopped(self) -> bool:
        return bool(_STATE.unpack_from(self.mem, 0)[2])

    def error(self) -> str | None:
        n = _STATE.unpack_from(self.mem, 0)[3]
        return self.mem[_STATE.size:_STATE.size + n].decode() if n else None

    def _set_error(self, message: str) -> None:
        data = message.encode()[:_ERROR_BYTES]
        self.mem[_STATE.size:_STATE.size + len(data)] = data
        epoch, step, stop, _ = _STATE.unpack_from(self.mem, 0)
        _STATE.pack_into(self.mem, 0, epoch, step, stop, len(data))

    def _run(self, step, threads: int, parent: int, on_error) -> None:
        die_with_parent(parent)(0)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the rank's to handle; it stops us
        storage.reset()  # never share the rank's pooled S3 connections across the fork
        lock = threading.Lock()

        def loop() -> None:
            try:
                while not self._stopped() and self.error() is None:
                    if not step(self._position()):
                        threading.Event().wait(0.02)
            except Exception as e:  # noqa: BLE001 - handed to the rank, raised at its next batch
                with lock:
                    if self.error() is None:
                        message = str(e) or type(e).__name__
                        self._set_error(message)
                        on_error(message)

        workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()

    def raise_error(self) -> None:
        message = self.error()
        if message is not None:
            raise storage.StorageError(message)

    def stop(self, grace: float = 0.1) -> None:
        """Ask the threads to finish; a fetch still running after `grace` seconds is cut short (SIGKILL): the
        node cache drops the reservation of a dead process, and a memory pool goes with its loader."""
        epoch, step, _, n = _STATE.unpack_from(self.mem, 0)
        _STATE.pack_into(self.mem, 0, epoch, step, 1, n)
        self.process.join(timeout=grace)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
