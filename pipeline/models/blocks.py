"""Building blocks of the Oobleck and DAC autoencoders: Snake activations, weight-normalised convolutions,
residual units.

Parameter names follow stable-audio-tools (SAT) so that its checkpoints load with `strict=True`:
a weight-normalised convolution stores `weight_g` (the norm, shape (dim0, 1, ...)) and `weight_v` (the
direction), exactly the names of the old `torch.nn.utils.weight_norm` that SAT uses.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F


class SnakeBeta(nn.Module):
    """Snake activation with separate frequency and magnitude: x + 1/beta * sin^2(alpha * x).

    BigVGAN (Lee et al. 2023) with log-scale parameters, as SAT's `blocks.SnakeBeta`: `alpha` and `beta`
    are stored as logarithms, initialised to 0 (so alpha = beta = 1 at the start).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, T)
        alpha = self.alpha.exp()[None, :, None]
        inv_beta = (1.0 / (self.beta.exp() + 1e-9))[None, :, None]  # SAT's 1e-9 guard; a (C,) reciprocal, not a (B, C, T) division
        s = torch.sin(alpha * x)
        return torch.addcmul(x, s * s, inv_beta)


class Snake1d(nn.Module):
    """Snake activation x + sin^2(alpha x) / alpha with a learned per-channel alpha (DAC's `Snake1d`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, C, T)
        return x + (self.alpha + 1e-9).reciprocal() * torch.sin(self.alpha * x).pow(2)


def _norm_except_dim0(v: torch.Tensor) -> torch.Tensor:
    """L2 norm over every dimension but the first, kept as (dim0, 1, ...), like `torch.norm_except_dim(v, 2, 0)`."""
    return torch.linalg.vector_norm(v, dim=tuple(range(1, v.dim())), keepdim=True)


class _WeightNormMixin:
    """Replaces a convolution's `weight` with `weight_g * weight_v / ||weight_v||` (norm over all dims but 0).

    Written out instead of `torch.nn.utils.weight_norm` (deprecated, and its fused kernel has no bf16 CPU/GPU
    path, SAT issue #131): the names and shapes are the same, and `fold_weight_norm` turns it into a plain
    convolution for inference.
    """

    def _init_weight_norm(self) -> None:
        weight = self.weight
        del self.weight  # the effective weight becomes a function of g and v
        self.weight_g = nn.Parameter(_norm_except_dim0(weight.detach()).clone())
        self.weight_v = nn.Parameter(weight.detach().clone())

    def normalised_weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / _norm_except_dim0(self.weight_v))


class WNConv1d(_WeightNormMixin, nn.Conv1d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalised_weight(), self.bias)


class WNConvTranspose1d(_WeightNormMixin, nn.ConvTranspose1d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.normalised_weight(), self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)


class WNConv2d(_WeightNormMixin, nn.Conv2d):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._init_weight_norm()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.normalised_weight(), self.bias)


_PLAIN_CONV = {WNConv1d: nn.Conv1d, WNConvTranspose1d: nn.ConvTranspose1d, WNConv2d: nn.Conv2d}
_CONV_ARGS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
              "padding_mode")


def _folded(conv: _WeightNormMixin) -> nn.Module:
    plain_cls = _PLAIN_CONV[type(conv)]
    kwargs = {name: getattr(conv, name) for name in _CONV_ARGS}
    if plain_cls is nn.ConvTranspose1d:
        kwargs["output_padding"] = conv.output_padding
    plain = plain_cls(bias=conv.bias is not None, device="meta", **kwargs)
    plain.weight = nn.Parameter(conv.normalised_weight().detach().clone(), requires_grad=conv.weight_v.requires_grad)
    if conv.bias is not None:
        plain.bias = nn.Parameter(conv.bias.detach().clone(), requires_grad=conv.bias.requires_grad)
    return plain.train(conv.training)


def fold_weight_norm(module: nn.Module, inplace: bool = False) -> nn.Module:
    """Return `module` with every weight-normalised convolution replaced by a plain one of equal weight.

    For inference: the folded model computes the same function without recomputing the norm each call and
    casts to bf16/fp16 like any convolution. Its state dict has `weight` instead of `weight_g`/`weight_v`,
    so keep the unfolded model (or its file) when weights must be saved in SAT's layout.
    """
    if not inplace:
        module = copy.deepcopy(module)
    if type(module) in _PLAIN_CONV:
        return _folded(module)
    for name, child in list(module.named_modules()):
        if type(child) in _PLAIN_CONV:
            parent_name, _, attr = name.rpartition(".")
            parent = module.get_submodule(parent_name) if parent_name else module
            setattr(parent, attr, _folded(child))
    return module


class ResidualUnit(nn.Module):
    """act -> dilated conv (kernel 7) -> act -> 1x1 conv, plus the input. SAT's `autoencoders.ResidualUnit`."""

    def __init__(self, channels: int, dilation: int, use_snake: bool):
        super().__init__()
        self.layers = nn.Sequential(
            activation(use_snake, channels),
            WNConv1d(channels, channels, kernel_size=7, dilation=dilation, padding=3 * dilation),
            activation(use_snake, channels),
            WNConv1d(channels, channels, kernel_size=1),
        )
        self.checkpointing = False  # recompute activations in backward (SAT always does in training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, C, T)
        if self.checkpointing and self.training:
            return x + torch.utils.checkpoint.checkpoint(self.layers, x, use_reentrant=False)
        return x + self.layers(x)


def activation(use_snake: bool, channels: int) -> nn.Module:
    """SAT's `get_activation("snake" if use_snake else "elu")`; SnakeBeta has parameters, ELU none."""
    return SnakeBeta(channels) if use_snake else nn.ELU()
