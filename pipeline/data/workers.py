"""DataLoader workers that die with the stage that started them.

A stage killed with SIGKILL runs no clean-up, and a worker blocked in a read or a decode never reaches
torch's own parent check: it is reparented to PID 1 and lives on. `die_with_parent(os.getpid())` as a
DataLoader's ``worker_init_fn`` asks the kernel to SIGKILL the worker when its parent goes
(``PR_SET_PDEATHSIG``), then checks that the parent has not already gone in between.

The kernel ties the signal to the thread that forked the worker: iterate a DataLoader from the main thread
(every stage does), or its workers die when that thread ends.
"""
from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
from typing import Callable

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _set_parent_death_signal(parent_pid: int, worker_id: int) -> None:
    if not sys.platform.startswith("linux"):
        return  # no prctl: torch's own parent check is what is left
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent_pid:  # the parent died before the line above: no signal will come
        os._exit(1)


def die_with_parent(parent_pid: int) -> Callable[[int], None]:
    """A ``worker_init_fn``: the worker is killed when ``parent_pid`` (the stage, ``os.getpid()`` where the
    DataLoader is built) exits, however it exits."""
    return functools.partial(_set_parent_death_signal, parent_pid)
