"""SAT's `dac` encoder and decoder types: the Descript Audio Codec's network (Kumar et al. 2023, "High-Fidelity
Audio Compression with Improved RVQGAN"), without its quantizer. Stable Audio 1.0's VAE is built from them.

Written here rather than imported: the `descript-audio-codec` package needs torchaudio (which pins an older
torch) and `descript-audiotools` (which pins `protobuf<3.20`). Module and parameter names are those of SAT's
`DACEncoderWrapper`/`DACDecoderWrapper` around DAC's `Encoder`/`Decoder` (`encoder.block.*`,
`encoder.proj_out`, `decoder.model.*`), so SAT checkpoints load with `strict=True`. As in SAT, weights keep
PyTorch's default initialisation (DAC's truncated-normal init belongs to its full codec class, not used).
Shapes are (B, C, T).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from pipeline.models.blocks import Snake1d, WNConv1d, WNConvTranspose1d

DILATIONS = (1, 3, 9)


class DACResidualUnit(nn.Module):
    """Snake -> dilated conv (kernel 7) -> Snake -> 1x1 conv, plus the input (DAC's `ResidualUnit`)."""

    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(dim),
            WNConv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation),
            Snake1d(dim),
            WNConv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T) -> (B, C, T)
        return x + self.block(x)


class DACEncoderBlock(nn.Module):
    """Residual units at dim / 2 (dilations 1, 3, 9), Snake, strided conv (kernel 2*stride) up to dim channels."""

    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            *(DACResidualUnit(dim // 2, d) for d in DILATIONS),
            Snake1d(dim // 2),
            WNConv1d(dim // 2, dim, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, dim / 2, T) -> (B, dim, T / stride)
        return self.block(x)


class DACDecoderBlock(nn.Module):
    """Snake, transposed conv (kernel 2*stride) from input_dim to output_dim, residual units (1, 3, 9)."""

    def __init__(self, input_dim: int, output_dim: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(input_dim),
            WNConvTranspose1d(input_dim, output_dim, kernel_size=2 * stride, stride=stride,
                              padding=math.ceil(stride / 2)),
            *(DACResidualUnit(output_dim, d) for d in DILATIONS),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, input_dim, T) -> (B, output_dim, T * stride)
        return self.block(x)


class DACEncoder(nn.Module):
    """DAC's `Encoder`: stem conv, one block per stride (doubling the width), Snake, conv to d_latent."""

    def __init__(self, in_channels: int, d_model: int, strides: Sequence[int], d_latent: int):
        super().__init__()
        widths = [d_model * 2 ** i for i in range(len(strides) + 1)]
        self.block = nn.Sequential(
            WNConv1d(in_channels, d_model, kernel_size=7, padding=3),
            *(DACEncoderBlock(widths[i + 1], stride) for i, stride in enumerate(strides)),
            Snake1d(widths[-1]),
            WNConv1d(widths[-1], d_latent, kernel_size=3, padding=1),
        )
        self.enc_dim = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DACDecoder(nn.Module):
    """DAC's `Decoder`: conv to `channels`, one block per rate (halving the width), Snake, conv, tanh."""

    def __init__(self, input_channel: int, channels: int, rates: Sequence[int], d_out: int = 1):
        super().__init__()
        widths = [channels // 2 ** i for i in range(len(rates) + 1)]
        self.model = nn.Sequential(
            WNConv1d(input_channel, channels, kernel_size=7, padding=3),
            *(DACDecoderBlock(widths[i], widths[i + 1], stride) for i, stride in enumerate(rates)),
            Snake1d(widths[-1]),
            WNConv1d(widths[-1], d_out, kernel_size=7, padding=3),
            nn.Tanh(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class DACEncoderWrapper(nn.Module):
    """SAT's `dac` encoder: audio (B, in_channels, T) -> (B, latent_dim, T / prod(strides)).

    The DAC encoder ends at its own width d_model * 2^len(strides); a plain 1x1 conv `proj_out` maps that to
    `latent_dim` (SAT's back-compatible choice; without latent_dim the encoder width is the output).
    `d_model` and `strides` default to DAC's `Encoder` defaults (SAT's wrapper requires both).
    """

    def __init__(self, in_channels: int = 1, latent_dim: int | None = None, d_model: int = 64,
                 strides: Sequence[int] = (2, 4, 8, 8)):
        super().__init__()
        out_dim = d_model * 2 ** len(strides)
        self.encoder = DACEncoder(in_channels, d_model, list(strides), d_latent=out_dim)
        self.latent_dim = latent_dim
        self.proj_out = nn.Conv1d(out_dim, latent_dim, kernel_size=1) if latent_dim is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_out(self.encoder(x))


class DACDecoderWrapper(nn.Module):
    """SAT's `dac` decoder: latents (B, latent_dim, T') -> audio (B, out_channels, T' * prod(rates)) in [-1, 1]."""

    def __init__(self, latent_dim: int, channels: int, rates: Sequence[int], out_channels: int = 1):
        super().__init__()
        self.decoder = DACDecoder(latent_dim, channels, list(rates), d_out=out_channels)
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x)
