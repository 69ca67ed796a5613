"""Classifier-free guidance (Ho & Salimans 2022): the guidance settings and the one function that combines.

Every backbone that guides (the DiT, `adp_cfg_1d`) runs its conditional and unconditional passes (each with
its own null conditioning: zeros for the DiT, a learned embedding for the U-Net) and combines them with
`apply_cfg`; samplers only ever see the guided ``model_fn``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

SigmaFn = Callable[[torch.Tensor], torch.Tensor]
"""``sigma(t)``: the objective's noise level at ``t`` (`Objective.sigma`), used to place the CFG interval."""


@dataclass(frozen=True)
class Guidance:
    """How one network call guides (SAT's keyword arguments, typed).

    ``scale``: CFG scale (1 = no guidance). ``dropout_prob``: training-time CFG dropout. ``batch``: run the
    conditional and unconditional rows in one batched pass. ``scale_phi``: the CFG-rescale amount (0 = off;
    SAT's U-Net wrappers apply their ``scale_phi`` only with ``rescale_cfg``, the adapters fold that in).
    ``interval``: guide only where ``sigma(t)`` lies in it (DiT only); ``sigma``: the objective's noise level,
    needed when ``interval`` is not (0, 1)."""

    scale: float = 1.0
    dropout_prob: float = 0.0
    batch: bool = True
    scale_phi: float = 0.0
    interval: tuple[float, float] = (0.0, 1.0)
    sigma: SigmaFn | None = None

    @property
    def everywhere(self) -> bool:
        """True when the interval holds every noise level (SAT's default)."""
        return self.interval[0] <= 0.0 and self.interval[1] >= 1.0


def apply_cfg(cond_output: torch.Tensor, uncond_output: torch.Tensor, cfg_scale: float,
              scale_phi: float = 0.0, interval: tuple[float, float] = (0.0, 1.0),
              sigma: torch.Tensor | None = None) -> torch.Tensor:
    """``uncond + (cond - uncond) * cfg_scale``, optionally rescaled, optionally only inside an interval.

    ``scale_phi`` > 0 is CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", eq. 15-16) as SAT writes it: the guided output is scaled so its std over dim 1
    (channels) matches the conditional output's, and mixed with the plain guided output by ``scale_phi``.
    At ``cfg_scale`` 1 the result is exactly ``cond_output``.

    ``interval`` (SAT's DiT ``cfg_interval``): where the noise level ``sigma`` (a 0-d tensor, SAT takes row 0's)
    is outside it, the result is ``cond_output``. Selected on the device (``torch.where``), not with an ``if``
    on a tensor: no host sync per call and no graph break under ``torch.compile``.
    """
    if cfg_scale == 1.0:
        return cond_output
    guided = uncond_output + (cond_output - uncond_output) * cfg_scale
    if scale_phi != 0.0:
        rescaled = guided * (cond_output.std(dim=1, keepdim=True) / guided.std(dim=1, keepdim=True))
        guided = scale_phi * rescaled + (1 - scale_phi) * guided
    if interval[0] <= 0.0 and interval[1] >= 1.0:
        return guided
    if sigma is None:
        raise ValueError(f"cfg_interval={tuple(interval)} needs the noise level sigma(t) to decide where to guide")
    inside = (sigma >= interval[0]) & (sigma <= interval[1])
    return torch.where(inside, guided, cond_output)


def guide(cond_output: torch.Tensor, uncond_output: torch.Tensor, guidance: Guidance,
          t: torch.Tensor) -> torch.Tensor:
    """`apply_cfg` with a `Guidance`; the interval is decided on row 0's noise level, as in SAT."""
    sigma = None if guidance.everywhere or guidance.sigma is None else guidance.sigma(t[0])
    return apply_cfg(cond_output, uncond_output, guidance.scale, guidance.scale_phi, guidance.interval, sigma)
