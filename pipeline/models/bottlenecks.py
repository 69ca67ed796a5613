"""Autoencoder bottlenecks: what happens between the encoder's output and the latent.

SAT's `models/bottleneck.py` types `vae`, `tanh` and `l2_norm` are here. The quantising ones need
packages Cantus does not ship (vector-quantize-pytorch, descript-audio-codec) and raise an error that
names the package; `wasserstein`, `fsq` and `dithered_fsq` are not ported.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config_json import ConfigError, MissingPackageError

# SAT's std floor: std = softplus(scale) + 1e-4, so a latent never collapses to a point.
VAE_STD_FLOOR = 1e-4


class Bottleneck(nn.Module):
    """encode: encoder output (B, C_enc, T) -> latents (B, C, T) and an info dict of losses; decode: inverse."""

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


def vae_mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the encoder output (B, 2C, T) into the latent mean (B, C, T) and std (B, C, T)."""
    mean, scale = x.chunk(2, dim=1)
    return mean, F.softplus(scale) + VAE_STD_FLOOR


def vae_kl(mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(0, 1)) * 2, summed over channels and averaged over batch and time (SAT's scale)."""
    var = std * std
    return (mean * mean + var - var.log() - 1).sum(1).mean()


class VAEBottleneck(Bottleneck):
    """Gaussian latents: the encoder emits mean and a raw scale; encode always samples, as SAT does."""

    def encode(self, x, generator=None):
        mean, std = vae_mean_std(x)  # (B, C, T) each
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise, {"kl": vae_kl(mean, std)}


class TanhBottleneck(Bottleneck):
    """Soft-clip the latents to (-scale, scale)."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def encode(self, x, generator=None):
        return torch.tanh(x / self.scale) * self.scale, {}


class L2Bottleneck(Bottleneck):
    """Unit-norm latents along channels, on encode and again on decode (as SAT)."""

    def encode(self, x, generator=None):
        return F.normalize(x, dim=1), {}

    def decode(self, z):
        return F.normalize(z, dim=1)


BOTTLENECKS: dict[str, type[Bottleneck]] = {"vae": VAEBottleneck, "tanh": TanhBottleneck, "l2_norm": L2Bottleneck}

# SAT types that wrap a package Cantus does not ship: what they are and what builds them.
NEEDS_PACKAGE = {
    "rvq": "a residual vector quantizer (SAT wraps the `vector-quantize-pytorch` package)",
    "rvq_vae": "a residual vector quantizer (SAT wraps the `vector-quantize-pytorch` package)",
    "dac_rvq": "DAC's residual vector quantizer (SAT wraps the `descript-audio-codec` package)",
    "dac_rvq_vae": "DAC's residual vector quantizer (SAT wraps the `descript-audio-codec` package)",
}
_NOT_PORTED = ("wasserstein", "fsq", "dithered_fsq")


def create_bottleneck(kind: str, config: Mapping, requires_grad: bool = True,
                      key_path: str = "model.bottleneck") -> Bottleneck:
    """Build a bottleneck from an SAT `{type, config, requires_grad}` block's parts."""
    if kind in NEEDS_PACKAGE:
        raise MissingPackageError(f"{key_path}.type={kind!r} is {NEEDS_PACKAGE[kind]}; stable-audio-tools with "
                                  f"that package builds it, Cantus does not include it and builds {sorted(BOTTLENECKS)}")
    if kind in _NOT_PORTED or kind not in BOTTLENECKS:
        raise ConfigError(f"{key_path}.type={kind!r} is not supported; supported: {sorted(BOTTLENECKS)}")
    cls = BOTTLENECKS[kind]
    accepted = {"tanh": ("scale",)}.get(kind, ())
    unknown = sorted(set(config) - set(accepted))
    if unknown:
        raise ConfigError(f"{key_path}.config: unknown argument(s) {unknown} for bottleneck {kind!r}; "
                          f"accepted: {list(accepted)}")
    bottleneck = cls(**config)
    bottleneck.requires_grad_(requires_grad)
    return bottleneck
