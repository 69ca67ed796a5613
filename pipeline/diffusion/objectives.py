"""Diffusion objectives: how to noise data, what the network predicts, and how to undo it.

Time convention (all of ``pipeline.diffusion``): ``t`` is in [0, 1]; **t = 0 is data, t = 1 is pure
noise**. A noised sample is ``x_t = alpha(t) * x + sigma(t) * noise`` with ``noise ~ N(0, I)``.

- ``v`` (SAT's default; Salimans & Ho 2022, "Progressive Distillation", section 4): the cosine
  schedule ``alpha = cos(t*pi/2)``, ``sigma = sin(t*pi/2)``; the network predicts
  ``v = alpha * noise - sigma * x``. In Karras terms (k-diffusion's ``VDenoiser``) the noise level is
  ``sigma_k = sigma / alpha = tan(t*pi/2)``.
- ``rectified_flow`` (Liu et al. 2022; Lipman et al. 2022): ``x_t = (1 - t) * x + t * noise``; the
  network predicts the velocity ``noise - x`` (so ``dx_t/dt`` equals the target).

Each objective is one class with one interface; ``create_objective(name)`` turns the config string
into an object once. Coefficients are computed in float32 (float64 when ``t`` is float64), whatever
the autocast, so the schedule does not depend on the training precision.
"""
from __future__ import annotations

import abc
import math
from typing import Callable, ClassVar

import torch

from pipeline.diffusion.losses import DiffusionLoss, LossOutput

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``model_fn(x_t, t) -> output``: the network with its conditioning closed over; ``t`` is (B,)."""


def _coef_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def expand_like(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample ``t`` (B,) or a scalar to broadcast against ``x`` (B, ...)."""
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a scalar or have shape ({x.shape[0]},) to match x {tuple(x.shape)}, "
                         f"got {tuple(t.shape)}")
    return t.reshape(t.shape[0], *([1] * (x.ndim - 1)))


class Objective(abc.ABC):
    """One diffusion parameterisation. Subclasses define ``alpha_sigma``, ``target`` and the inverses."""

    name: ClassVar[str]
    default_sampler: ClassVar[str]
    """The sampler SAT's training demos use for this objective."""

    @abc.abstractmethod
    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha(t), sigma(t))`` with the shape of ``t``."""

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The noise level ``sigma(t)`` (what SAT's DiT places its CFG interval on)."""
        return self.alpha_sigma(t)[1]

    def noise(self, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """``x_t = alpha * x + sigma * noise``."""
        alpha, sigma = (expand_like(c, x) for c in self.alpha_sigma(t))
        return alpha * x + sigma * noise

    @abc.abstractmethod
    def target(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output for clean ``x`` noised with ``noise`` at ``t``."""

    @abc.abstractmethod
    def denoised_from_output(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The clean-data estimate implied by a network output."""

    @abc.abstractmethod
    def noise_from_output(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        """The noise estimate implied by a network output."""

    @abc.abstractmethod
    def output_scale(self, t: torch.Tensor) -> torch.Tensor:
        """``c(t)`` with ``denoised = a(t) * x_t - c(t) * output``: an output error of e is a data error of c*e."""

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio ``alpha**2 / sigma**2`` (inf at t = 0)."""
        alpha, sigma = self.alpha_sigma(t)
        return alpha ** 2 / sigma ** 2

    def loss(self, model_fn: ModelFn, x: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
             loss_fn: Callable[..., LossOutput] | None = None,
             padding_mask: torch.Tensor | None = None) -> LossOutput:
        """Noise ``x`` at ``t``, run ``model_fn`` and score it against the target.

        ``loss_fn`` is a ``pipeline.diffusion.losses.DiffusionLoss`` (plain MSE when None);
        ``padding_mask`` (B, T) is True on frames that hold data, or None to score every frame.
        """
        if loss_fn is None:
            loss_fn = DiffusionLoss.mse()
        x_t = self.noise(x, t, noise)
        output = model_fn(x_t, t)
        return loss_fn(output, self.target(x, noise, t), t, objective=self, padding_mask=padding_mask)


class VObjective(Objective):
    """v-prediction on the cosine schedule (SAT ``get_alphas_sigmas``)."""

    name = "v"
    default_sampler = "v-ddim"

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angle = t.to(_coef_dtype(t)) * math.pi / 2  # SAT's operation order
        return torch.cos(angle), torch.sin(angle)

    def target(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (expand_like(c, x) for c in self.alpha_sigma(t))
        return noise * alpha - x * sigma

    def denoised_from_output(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (expand_like(c, x_t) for c in self.alpha_sigma(t))
        return x_t * alpha - output * sigma

    def noise_from_output(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (expand_like(c, x_t) for c in self.alpha_sigma(t))
        return x_t * sigma + output * alpha

    def output_scale(self, t: torch.Tensor) -> torch.Tensor:
        return self.alpha_sigma(t)[1]

    @staticmethod
    def t_from_alpha_sigma(alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The inverse of ``alpha_sigma``: ``atan2(sigma, alpha) * 2 / pi`` (SAT ``alpha_sigma_to_t``)."""
        return torch.atan2(sigma, alpha) / math.pi * 2


class RectifiedFlowObjective(Objective):
    """Velocity prediction on the straight path ``x_t = (1 - t) x + t noise``."""

    name = "rectified_flow"
    default_sampler = "euler"

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        t = t.to(_coef_dtype(t))
        return 1 - t, t

    def target(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x

    def denoised_from_output(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return x_t - expand_like(t.to(_coef_dtype(t)), x_t) * output

    def noise_from_output(self, x_t: torch.Tensor, t: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        return x_t + expand_like(1 - t.to(_coef_dtype(t)), x_t) * output

    def output_scale(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(_coef_dtype(t))


OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (VObjective, RectifiedFlowObjective)}


def create_objective(name: str, key: str = "model.diffusion.diffusion_objective") -> Objective:
    """The objective called ``name``; an unknown name is an error listing the known ones."""
    if name not in OBJECTIVES:
        raise ValueError(f"{key}={name!r} is not a known diffusion objective; expected one of {sorted(OBJECTIVES)}")
    return OBJECTIVES[name]()
