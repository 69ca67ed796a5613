"""Pseudo-quadrature mirror filter bank (PQMF): split audio into `num_bands` critically sampled sub-bands.

Same design and polyphase layout as SAT's `models/pqmf.py` (buffers `filter_bank` and `prototype`, so
SAT's state dict loads): a Kaiser-window lowpass prototype whose cutoff minimises the near-perfect-
reconstruction objective of Lin & Vaidyanathan (IEEE TSP 1998), cosine-modulated into `num_bands`
filters. SAT imports `scipy.signal.kaiser` and `firwin(nyq=...)`, both gone from current SciPy; here the
same filter comes from `firwin(fs=2*pi)`.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from einops import rearrange
from scipy.optimize import fmin
from scipy.signal import firwin, kaiserord
from torch import nn
from torch.nn import functional as F


def _kaiser_lowpass(cutoff: float, attenuation: float) -> np.ndarray:
    """Odd-length Kaiser lowpass with angular cutoff `cutoff` (radians per sample) and stopband `attenuation` dB."""
    length, beta = kaiserord(attenuation, cutoff / np.pi)
    length = 2 * (length // 2) + 1
    return firwin(length, cutoff, window=("kaiser", beta), scale=False, fs=2 * np.pi)


def _reconstruction_error(cutoff: float, attenuation: float, num_bands: int) -> float:
    """Largest off-centre tap of h * h[::-1] decimated by 2M: zero for a perfect-reconstruction prototype."""
    h = _kaiser_lowpass(cutoff, attenuation)
    autocorr = np.convolve(h, h[::-1], "full")
    return float(np.max(np.abs(autocorr[autocorr.shape[-1] // 2::2 * num_bands][1:])))


def design_prototype(attenuation: float, num_bands: int) -> torch.Tensor:
    cutoff = fmin(lambda c: _reconstruction_error(c[0], attenuation, num_bands), 1 / num_bands, disp=0)[0]
    return torch.tensor(_kaiser_lowpass(cutoff, attenuation), dtype=torch.float32)


def modulated_filter_bank(prototype: torch.Tensor, num_bands: int) -> torch.Tensor:
    """(num_bands, L): h_k[n] = 2 h[n] cos((2k+1) pi / (2M) n + (-1)^k pi / 4), n centred on 0."""
    k = torch.arange(num_bands).reshape(-1, 1)
    half = prototype.shape[-1] // 2
    n = torch.arange(-half, half + 1)
    phase = (-1) ** k * np.pi / 4
    return 2 * prototype * torch.cos((2 * k + 1) * np.pi / (2 * num_bands) * n + phase)


def _pad_to_power_of_two(x: torch.Tensor) -> torch.Tensor:
    total = 2 ** math.ceil(math.log2(x.shape[-1])) - x.shape[-1]
    return F.pad(x, (total // 2, total - total // 2))


def _alias_cancellation(x: torch.Tensor) -> torch.Tensor:
    """Negate every even time step of every odd band: (..., bands, T)."""
    sign = torch.ones_like(x)
    sign[..., 1::2, ::2] = -1
    return x * sign


class PQMF(nn.Module):
    def __init__(self, attenuation: float, num_bands: int):
        super().__init__()
        if num_bands < 1 or num_bands & (num_bands - 1):
            raise ValueError(f"num_bands={num_bands}: must be a power of 2")
        prototype = design_prototype(attenuation, num_bands)
        self.register_buffer("filter_bank", _pad_to_power_of_two(modulated_filter_bank(prototype, num_bands)))
        self.register_buffer("prototype", prototype)
        self.num_bands = num_bands

    def forward(self, signal: torch.Tensor) -> torch.Tensor:
        """(B, C, T) -> (B, C, bands, ceil(T / bands)); T is zero-padded to a multiple of bands."""
        channels = signal.shape[1]
        signal = F.pad(signal, (0, -signal.shape[-1] % self.num_bands))
        phases = rearrange(signal, "b c (t n) -> (b c) n t", n=self.num_bands)
        kernel = rearrange(self.filter_bank, "k (t n) -> k n t", n=self.num_bands)  # polyphase components
        bands = F.conv1d(phases, kernel, padding=kernel.shape[-1] // 2)[..., :-1]
        return _alias_cancellation(rearrange(bands, "(b c) k t -> b c k t", c=channels))

    def inverse(self, bands: torch.Tensor) -> torch.Tensor:
        """(B, C, bands, T') -> (B, C, T' * bands)."""
        channels = bands.shape[1]
        bands = rearrange(_alias_cancellation(bands), "b c k t -> (b c) k t")
        kernel = rearrange(self.filter_bank.flip(-1), "k (t n) -> n k t", n=self.num_bands)
        phases = F.conv1d(bands, kernel, padding=kernel.shape[-1] // 2 + 1)[..., :-1] * self.num_bands
        signal = rearrange(phases.flip(1), "(b c) n t -> b c (t n)", c=channels)
        # The synthesis convolution is padded one polyphase step wider than needed on each side.
        return signal[..., 2 * self.num_bands:]
