"""Stop requests: SIGTERM (scancel, preemption) or SIGUSR1 (`sbatch --signal`) on any rank stops all ranks,
and so does `request_stop()` (the lease heartbeat, from its thread).

A signal reaches ranks at different times (or only one rank), so the handler only sets a flag; the
training loop calls `should_stop()` at the same steps on every rank, which all-reduces the flag (MAX) so
every rank leaves the loop at the same step and saves the same checkpoint together (unless a request said
not to save: `may_save`, the output now belongs to another trainer). Reading the reduced flag is a host
sync, so the diffusion loop asks at log steps only (every `--log-every` steps): a signal takes effect at
most that many steps late, which SLURM's `--signal=USR1@<seconds>` grace must cover.
"""
from __future__ import annotations

import logging
import signal
import threading

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_STOPPED = 75
"""EX_TEMPFAIL: stopped before --max-steps; SLURM's afterok must not release later stages, slurm/train.sh requeues."""

_requests: list[tuple[str, bool]] = []
_lock = threading.Lock()


def request_stop(reason: str, *, save: bool = True) -> None:
    """Ask the training loop to stop at its next step, from any thread; ``save=False``: without a checkpoint."""
    with _lock:
        _requests.append((reason, save))


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
_early: list[int] = []
_original: dict[int, object] = {}


def catch_early(signals: tuple[int, ...] = STOP_SIGNALS) -> None:
    """From the first line of `main`: a stop signal during set-up (a DeepSpeed op build, a large checkpoint
    load: minutes) is remembered for the `StopFlag` that the loop creates later, instead of killing the
    process with no checkpoint and an exit code SLURM cannot requeue on."""
    for s in signals:
        _original.setdefault(s, signal.signal(s, lambda signum, frame: _early.append(signum)))


def release_early() -> None:
    """Put back what `catch_early` replaced when no `StopFlag` took it over (set-up failed, a dry run): a caller
    that goes on in this process (a test, a notebook) must not keep a handler that swallows SIGTERM, or the
    worker processes it forks later outlive their pool's terminate()."""
    for s, handler in _original.items():
        signal.signal(s, handler)
    _original.clear()
    _early.clear()


class StopFlag:
    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.received: int | None = _early[-1] if _early else None  # a signal during set-up counts
        _early.clear()
        self.may_save = True
        """False once any rank was asked to stop without a checkpoint."""
        self._previous = {}
        for s in signals:
            previous = signal.signal(s, self._handle)
            self._previous[s] = _original.pop(s, previous)  # restore() goes back to what was there first

    def _handle(self, signum: int, frame) -> None:
        self.received = signum  # logging from a signal handler can deadlock; the loop logs it

    @property
    def reason(self) -> str:
        with _lock:
            requested = [r for r, _ in _requests]
        return "; ".join(([f"signal {signal.Signals(self.received).name}"] if self.received else []) + requested)

    def should_stop(self, device: torch.device | str = "cpu") -> bool:
        """Collective: True on every rank when any rank got a signal or a request (2: one without a save)."""
        with _lock:
            level = max([2.0 if not save else 1.0 for _, save in _requests], default=0.0)
        level = max(level, 1.0 if self.received is not None else 0.0)
        flag = torch.tensor([level], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        level = flag.item()  # one host sync per call
        self.may_save = self.may_save and level < 2
        return level > 0

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        with _lock:
            _requests.clear()
