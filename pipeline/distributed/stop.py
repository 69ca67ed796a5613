"""Stop requests: SIGTERM (scancel, preemption) or SIGUSR1 (`sbatch --signal`) on any rank stops all ranks.

A signal reaches ranks at different times (or only one rank), so the handler only sets a flag; the
training loop calls `should_stop()` at the same steps on every rank, which all-reduces the flag (MAX) so
every rank leaves the loop at the same step and saves the same checkpoint together. Reading the reduced
flag is a host sync, so the diffusion loop asks at log steps only (every `--log-every` steps): a signal
takes effect at most that many steps late, which SLURM's `--signal=USR1@<seconds>` grace must cover.
"""
from __future__ import annotations

import logging
import signal

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_STOPPED = 75
"""EX_TEMPFAIL: stopped before --max-steps; SLURM's afterok must not release later stages, slurm/train.sh requeues."""


class StopFlag:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)):
        self.received: int | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum: int, frame) -> None:
        self.received = signum  # logging from a signal handler can deadlock; the loop logs it

    def should_stop(self, device: torch.device | str = "cpu") -> bool:
        """Collective: True on every rank when any rank got a signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
