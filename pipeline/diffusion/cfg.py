"""Classifier-free guidance (Ho & Salimans 2022) as a pure function of two network outputs.

The model wrapper (``pipeline.models``) runs the conditional and unconditional passes (batched, with
SAT's null conditioning) and combines them here; samplers only ever see the guided ``model_fn``.
"""
from __future__ import annotations

import torch


def apply_cfg(cond_output: torch.Tensor, uncond_output: torch.Tensor, cfg_scale: float,
              scale_phi: float = 0.0) -> torch.Tensor:
    """``uncond + (cond - uncond) * cfg_scale``, optionally rescaled (SAT ``DiffusionTransformer.forward``).

    ``scale_phi`` > 0 is CFG rescale (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample
    Steps are Flawed", eq. 15-16) as SAT writes it: the guided output is scaled so its std over dim 1
    (channels) matches the conditional output's, and mixed with the plain guided output by ``scale_phi``.
    At ``cfg_scale`` 1 the result is exactly ``cond_output``.
    """
    if cfg_scale == 1.0:
        return cond_output
    guided = uncond_output + (cond_output - uncond_output) * cfg_scale
    if scale_phi == 0.0:
        return guided
    rescaled = guided * (cond_output.std(dim=1, keepdim=True) / guided.std(dim=1, keepdim=True))
    return scale_phi * rescaled + (1 - scale_phi) * guided
