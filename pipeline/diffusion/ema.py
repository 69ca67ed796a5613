"""Exponential moving average of parameters, with SAT's warm-up.

SAT wraps its diffusion model in ``ema_pytorch.EMA(beta=0.9999, power=3/4, update_every=1,
update_after_step=1)`` (``training/diffusion.py``; ema-pytorch 0.2.3, pinned in SAT's ``setup.py``,
``ema_pytorch/ema_pytorch.py`` ``EMA.update`` and ``get_current_decay``, with ``inv_gamma`` 1). We follow
that exactly. With ``s`` the number of earlier ``update()`` calls:

- calls with ``s % update_every != 0`` do nothing;
- while ``s <= update_after_step`` the shadow is a copy of the weights;
- otherwise ``shadow = lerp(shadow, weights, 1 - decay)`` with ``e = max(s - update_after_step - 1, 0)``
  and ``decay = 0 if e == 0 else min(beta, 1 - (1 + e) ** -power)`` (so, for SAT's settings, calls 0-2
  copy and call 3 uses decay 1 - 2**-0.75).

The shadow is fp32 whatever the weights' dtype, updated with ``torch._foreach_*`` ops. It works on any
list of tensors: the train stage passes the local shards under ZeRO-3 (the EMA of a shard is the shard
of the EMA, since the update is elementwise).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch


class EMA:
    """fp32 shadow copies of ``params`` and SAT's (ema-pytorch 0.2.3) decay warm-up."""

    def __init__(self, params: Sequence[torch.Tensor], beta: float = 0.9999, power: float = 0.75,
                 update_every: int = 1, update_after_step: int = 1) -> None:
        if not 0.0 < beta < 1.0:
            raise ValueError(f"training.cantus.ema_beta={beta}: expected a number in (0, 1)")
        if not power > 0:
            raise ValueError(f"training.cantus.ema_power={power}: expected > 0")
        if update_every < 1:
            raise ValueError(f"training.cantus.ema_interval={update_every}: expected an integer >= 1")
        self.beta, self.power = float(beta), float(power)
        self.update_every, self.update_after_step = int(update_every), int(update_after_step)
        self.step = 0
        """Number of ``update()`` calls so far."""
        with torch.no_grad():
            self.shadow = [p.detach().to(torch.float32, copy=True) for p in params]

    def decay(self, step: int) -> float:
        """The decay used by the ``update()`` call that finds ``step`` earlier calls (0 = copy)."""
        epoch = max(step - self.update_after_step - 1, 0)
        if epoch <= 0:
            return 0.0
        return min(self.beta, 1 - (1 + epoch) ** -self.power)

    @torch.no_grad()
    def update(self, params: Sequence[torch.Tensor]) -> None:
        """Call once per optimizer step, after it, with the same tensors (in the same order) as at init."""
        self._check(params)
        step, self.step = self.step, self.step + 1
        if step % self.update_every != 0:
            return
        current = [p.detach().to(torch.float32) for p in params]
        decay = self.decay(step)
        if decay == 0.0:
            torch._foreach_copy_(self.shadow, current)
        else:
            torch._foreach_lerp_(self.shadow, current, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, params: Sequence[torch.Tensor]) -> None:
        """Write the averaged weights into ``params`` (cast to their dtype), e.g. to export or demo."""
        self._check(params)
        torch._foreach_copy_([p.data for p in params], self.shadow)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "beta": self.beta, "power": self.power, "update_every": self.update_every,
                "update_after_step": self.update_after_step, "shadow": [s.clone() for s in self.shadow]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        if [tuple(s.shape) for s in shadow] != [tuple(s.shape) for s in self.shadow]:
            raise ValueError("EMA state does not match these parameters: shapes "
                             f"{[tuple(s.shape) for s in shadow][:4]}... vs {[tuple(s.shape) for s in self.shadow][:4]}...")
        with torch.no_grad():
            torch._foreach_copy_(self.shadow, [s.to(d.device, torch.float32) for s, d in zip(shadow, self.shadow)])
        self.step = int(state["step"])
        self.beta, self.power = float(state["beta"]), float(state["power"])
        self.update_every, self.update_after_step = int(state["update_every"]), int(state["update_after_step"])

    def _check(self, params: Sequence[torch.Tensor]) -> None:
        if len(params) != len(self.shadow) or any(p.shape != s.shape for p, s in zip(params, self.shadow)):
            raise ValueError(f"EMA was built for {len(self.shadow)} tensors; got {len(params)} with other shapes")
