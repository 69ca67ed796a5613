"""Sampling schedules: the noise levels a sampler visits, from noisy to clean, always float32 or
float64 (never the model's autocast dtype).

Two units appear. ``t`` in [0, 1] (t = 1 is noise) for the v-DDIM and rectified-flow samplers, and the
Karras noise level ``sigma`` in [0, inf) for the k-diffusion-style samplers on a v-model, where
``sigma = tan(t*pi/2)`` (k-diffusion ``VDenoiser.t_to_sigma``). Every schedule ends at exactly 0.
"""
from __future__ import annotations

import math

import torch

from pipeline.diffusion.timesteps import DistributionShift


def sigma_to_t(sigma: torch.Tensor) -> torch.Tensor:
    """Karras sigma -> v-objective t: ``atan(sigma) * 2 / pi``."""
    return sigma.atan() * (2 / math.pi)


def t_to_sigma(t: torch.Tensor) -> torch.Tensor:
    """v-objective t -> Karras sigma: ``tan(t * pi / 2)``."""
    return (t * (math.pi / 2)).tan()


def linear_timesteps(steps: int, t_max: float = 1.0, dist_shift: DistributionShift | None = None,
                     length: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``linspace(t_max, 0, steps + 1)``, optionally shifted for a sequence of ``length`` frames.

    SAT's v-DDIM (``sample``) and its training demos' Euler sampler use this schedule.
    """
    _check_steps(steps)
    t = torch.linspace(t_max, 0, steps + 1, dtype=dtype)
    if dist_shift is not None:
        if length is None:
            raise ValueError("linear_timesteps: a distribution shift needs the sequence length")
        t = dist_shift(t, length)
    return t


def rf_logsnr_timesteps(steps: int, t_max: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SAT ``sample_rf``'s schedule: logSNR linear from ``log((1 - t_max) / t_max)`` (-6 at t_max = 1) to 2,
    ``t = sigmoid(-logSNR)``, with the ends pinned to ``t_max`` and 0."""
    _check_steps(steps)
    logsnr_max = math.log((1 - t_max) / t_max + 1e-6) if t_max < 1 else -6.0
    t = torch.sigmoid(-torch.linspace(logsnr_max, 2, steps + 1, dtype=dtype))
    t[0], t[-1] = t_max, 0.0
    return t


def polyexponential_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Polynomial in log sigma (k-diffusion ``get_sigmas_polyexponential``; rho = 1 is log-linear), then 0.

    ``sigma_i = exp(ramp_i**rho * (log sigma_max - log sigma_min) + log sigma_min)``, ramp 1 -> 0.
    This is the schedule SAT's ``sample_k`` uses for every k-diffusion sampler.
    """
    _check_sigmas(steps, sigma_min, sigma_max, rho)
    ramp = torch.linspace(1, 0, steps, dtype=dtype) ** rho
    sigmas = torch.exp(ramp * (math.log(sigma_max) - math.log(sigma_min)) + math.log(sigma_min))
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Karras et al. (2022) eq. 5 (k-diffusion ``get_sigmas_karras``), then 0.

    ``sigma_i = (sigma_max**(1/rho) + i/(n-1) * (sigma_min**(1/rho) - sigma_max**(1/rho)))**rho``.
    """
    _check_sigmas(steps, sigma_min, sigma_max, rho)
    ramp = torch.linspace(0, 1, steps, dtype=dtype)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (max_inv + ramp * (min_inv - max_inv)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


SIGMA_SCHEDULES = {"polyexponential": polyexponential_sigmas, "karras": karras_sigmas}


def _check_steps(steps: int) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r}: expected an integer >= 1")


def _check_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float) -> None:
    _check_steps(steps)
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min={sigma_min} and sigma_max={sigma_max}: expected 0 < sigma_min < sigma_max")
    if not rho > 0:
        raise ValueError(f"rho={rho}: expected > 0")
