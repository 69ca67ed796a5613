"""Processes a test started, directly or not: to check that a killed stage leaves none of its own running.

Not a test module; tests import it with tests/ on sys.path (conftest.py puts it there).
"""
from __future__ import annotations

import os
import time


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of ``pid``, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[1]), fields[0]


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (children, their children, ...), read from /proc. Take it before a
    kill: afterwards the orphans belong to PID 1."""
    parents = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            parents[int(name)] = st[0]
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def alive(pid: int) -> bool:
    st = _stat(pid)
    return st is not None and st[1] != "Z"  # a zombie has exited; only its entry waits to be reaped


def assert_all_exit(pids: list[int], timeout: float = 20.0) -> None:
    """Fail unless every process in ``pids`` has exited within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not left, f"still running {timeout:.0f} s after the kill: " + ", ".join(
        f"{p} ({open(f'/proc/{p}/cmdline').read().replace(chr(0), ' ')[:120]})" for p in left if alive(p))
