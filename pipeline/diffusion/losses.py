"""Diffusion training losses from ``training.loss_configs`` (SAT documents this key and ignores it
for diffusion; we honour it), with padding masks.

Schema (SAT's autoencoder ``loss_configs`` shape, one entry per term; the total is the weighted sum)::

    "loss_configs": {
        "<term name>": {
            "type": "mse" | "l1" | "huber",          # required
            "weights": {"<type>": 1.0},              # optional; one key, equal to "type"; default 1.0
            "config": {                              # optional
                "delta": 1.0,                        # huber only: quadratic below delta, linear above
                "timestep_weighting": "none",        # "none" | "min_snr"
                "min_snr_gamma": 5.0                 # min_snr only
            }
        }
    }

The block is parsed and checked with the training block (`pipeline.config_training.parse_diffusion_losses`).
Absent (the default) means SAT's loss: one plain MSE term named ``mse_loss``. ``min_snr`` is
Min-SNR-gamma (Hang et al. 2023): the data-space error is weighted by ``min(SNR(t), gamma)``;
expressed on the network output that is ``min(SNR, gamma) * c(t)**2``, with ``c(t)`` the objective's
``output_scale`` (for ``v``: ``min(SNR, gamma) / (SNR + 1)``).

Padding (``training.mask_padding``, ``mask_padding_dropout``): frames whose ``padding_mask`` (B, T) is
False are left out of every term; the mean runs over the kept elements of the whole batch, as SAT's
``MSELoss`` does (``mse[mask].mean()``). With probability ``mask_padding_dropout`` a batch is scored
without its mask, so the model also learns to produce the silence that padding holds (SAT draws this
per batch with Python's ``random``; we draw it from the caller's generator).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # objectives imports this module (Objective.loss defaults to plain MSE)
    from pipeline.diffusion.objectives import Objective

LOSS_TYPES = ("mse", "l1", "huber")
TIMESTEP_WEIGHTINGS = ("none", "min_snr")
_KEY = "training.loss_configs"


@dataclass(frozen=True)
class LossOutput:
    """What ``Objective.loss`` returns: the scalar to backpropagate and what to log."""

    loss: torch.Tensor
    """Scalar: the weighted sum of the loss terms."""
    terms: dict[str, torch.Tensor]
    """Each term's scalar value before its weight, by term name."""
    per_sample: torch.Tensor
    """(B,) unweighted mean squared error per sample (masked frames left out), for bucketing by t."""


@dataclass(frozen=True, kw_only=True)
class LossTerm:
    name: str
    """The term's key in ``loss_configs``; logged as ``loss/<name>``."""
    type: str
    """``mse``, ``l1`` or ``huber``."""
    weight: float = 1.0
    delta: float = 1.0
    """Huber threshold (huber only)."""
    timestep_weighting: str = "none"
    min_snr_gamma: float = 5.0

    def elementwise(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.type == "mse":
            return F.mse_loss(output, target, reduction="none")
        if self.type == "l1":
            return F.l1_loss(output, target, reduction="none")
        return F.huber_loss(output, target, reduction="none", delta=self.delta)

    def timestep_weight(self, t: torch.Tensor, objective: Objective) -> torch.Tensor | None:
        """Per-sample weight (B,), or None for unweighted."""
        if self.timestep_weighting == "none":
            return None
        snr = objective.snr(t).clamp(max=self.min_snr_gamma)
        return snr * objective.output_scale(t) ** 2


class DiffusionLoss:
    """The weighted sum of loss terms, with padding masks and per-timestep weights."""

    def __init__(self, terms: tuple[LossTerm, ...], mask_padding: bool = False,
                 mask_padding_dropout: float = 0.0) -> None:
        if not terms:
            raise ValueError(f"{_KEY}: expected at least one loss term")
        if not 0.0 <= mask_padding_dropout <= 1.0:
            raise ValueError(f"training.mask_padding_dropout={mask_padding_dropout}: expected a number in [0, 1]")
        self.terms = terms
        self.mask_padding = mask_padding
        self.mask_padding_dropout = mask_padding_dropout

    @classmethod
    def mse(cls, mask_padding: bool = False, mask_padding_dropout: float = 0.0) -> "DiffusionLoss":
        """SAT's diffusion loss: one MSE term named ``mse_loss``."""
        return cls((LossTerm(name="mse_loss", type="mse"),), mask_padding, mask_padding_dropout)

    @classmethod
    def from_config(cls, terms: tuple[LossTerm, ...] | None, mask_padding: bool = False,
                    mask_padding_dropout: float = 0.0) -> "DiffusionLoss":
        """From ``training.loss_configs`` as `pipeline.config_training.parse_diffusion_losses` parsed it (None gives
        SAT's plain MSE)."""
        if terms is None:
            return cls.mse(mask_padding, mask_padding_dropout)
        return cls(tuple(terms), mask_padding, mask_padding_dropout)

    def padding_mask_for_step(self, padding_mask: torch.Tensor | None,
                              generator: torch.Generator | None = None) -> torch.Tensor | None:
        """The mask to use this step: None unless ``mask_padding``; dropped with ``mask_padding_dropout``.

        The train stage calls this once per batch and passes the result both to the model and to
        ``__call__``, as SAT does.
        """
        if not self.mask_padding or padding_mask is None:
            return None
        keep = self.mask_padding_dropout == 0.0 or \
            float(torch.rand((), generator=generator)) >= self.mask_padding_dropout
        return padding_mask if keep else None

    def __call__(self, output: torch.Tensor, target: torch.Tensor, t: torch.Tensor, *, objective: Objective,
                 padding_mask: torch.Tensor | None = None) -> LossOutput:
        """Score ``output`` against ``target`` (both (B, C, T)); ``padding_mask`` (B, T), True = data."""
        if output.shape != target.shape:
            raise ValueError(f"output {tuple(output.shape)} and target {tuple(target.shape)} differ in shape")
        if padding_mask is None:
            keep = torch.ones(output.shape[0], *([1] * (output.ndim - 1)), dtype=output.dtype, device=output.device)
        else:
            if padding_mask.shape != (output.shape[0], output.shape[-1]):
                raise ValueError(f"padding_mask {tuple(padding_mask.shape)} must be (B, T) = "
                                 f"{(output.shape[0], output.shape[-1])}")
            keep = padding_mask[:, None, :].to(output.dtype)
        keep = keep.expand_as(output)
        count = keep.sum().clamp(min=1)
        terms: dict[str, torch.Tensor] = {}
        total = output.new_zeros(())
        for term in self.terms:
            elementwise = term.elementwise(output, target)
            weight = term.timestep_weight(t, objective)
            if weight is not None:
                elementwise = elementwise * weight.reshape(-1, *[1] * (elementwise.ndim - 1)).to(elementwise.dtype)
            value = (elementwise * keep).sum() / count
            terms[term.name] = value.detach()
            total = total + term.weight * value
        squared = F.mse_loss(output, target, reduction="none").detach() * keep
        per_sample = squared.flatten(1).sum(1) / keep.flatten(1).sum(1).clamp(min=1)
        return LossOutput(loss=total, terms=terms, per_sample=per_sample)
