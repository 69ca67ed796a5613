"""The Oobleck audio autoencoder (Stable Audio Open's VAE) and `AudioAutoencoder`, with chunked encode/decode.

Module and parameter names follow SAT's `models/autoencoders.py`, so SAT checkpoints load with
`strict=True` (a standalone VAE file, or the `pretransform.model.*` part of a full SAO checkpoint, see
`weights.py`). Shapes are noted as (B, C, T): batch, channels, samples or latent frames.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from pipeline.config import AutoencoderConfig, ModuleConfig, PretransformConfig
from pipeline.config_json import ConfigError, MissingPackageError
from pipeline.arguments import check_arguments
from pipeline.models.blocks import ResidualUnit, WNConv1d, WNConvTranspose1d, activation
from pipeline.models.bottlenecks import Bottleneck, create_bottleneck
from pipeline.models.dac import DACDecoderWrapper, DACEncoderWrapper

# SAT's chunked-processing defaults, in latent frames (`AudioAutoencoder.encode_audio`).
CHUNK_SIZE = 128
CHUNK_OVERLAP = 32


class EncoderBlock(nn.Module):
    """Three residual units (dilations 1, 3, 9), activation, strided conv (kernel 2*stride) to out_channels."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, use_snake: bool):
        super().__init__()
        self.layers = nn.Sequential(
            *(ResidualUnit(in_channels, dilation, use_snake) for dilation in (1, 3, 9)),
            activation(use_snake, in_channels),
            WNConv1d(in_channels, out_channels, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T) -> (B, C_out, T / stride)
        return self.layers(x)


class DecoderBlock(nn.Module):
    """Activation, upsampling by `stride` (transposed conv, or nearest + conv), three residual units."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, use_snake: bool, use_nearest_upsample: bool):
        super().__init__()
        if use_nearest_upsample:
            upsample = nn.Sequential(
                nn.Upsample(scale_factor=stride, mode="nearest"),
                WNConv1d(in_channels, out_channels, kernel_size=2 * stride, bias=False, padding="same"))
        else:
            upsample = WNConvTranspose1d(in_channels, out_channels, kernel_size=2 * stride, stride=stride,
                                         padding=math.ceil(stride / 2))
        self.layers = nn.Sequential(
            activation(use_snake, in_channels),
            upsample,
            *(ResidualUnit(out_channels, dilation, use_snake) for dilation in (1, 3, 9)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C_in, T) -> (B, C_out, T * stride)
        return self.layers(x)


def _check_oobleck(c_mults: list, strides: list, antialias_activation: bool) -> None:
    if len(c_mults) != len(strides):
        raise ValueError(f"c_mults has {len(c_mults)} entries but strides has {len(strides)}: one stride per block")
    if antialias_activation:
        raise ValueError("antialias_activation=true needs the alias-free-torch package, which Cantus does not "
                         "include; set it to false")


class OobleckEncoder(nn.Module):
    """audio (B, in_channels, T) -> encoder output (B, latent_dim, T / prod(strides)). Arguments as SAT's."""

    def __init__(self, in_channels: int = 2, channels: int = 128, latent_dim: int = 32,
                 c_mults: list[int] = (1, 2, 4, 8), strides: list[int] = (2, 4, 8, 8),
                 use_snake: bool = False, antialias_activation: bool = False):
        super().__init__()
        _check_oobleck(list(c_mults), list(strides), antialias_activation)
        widths = [channels * m for m in [1, *c_mults]]
        self.layers = nn.Sequential(
            WNConv1d(in_channels, widths[0], kernel_size=7, padding=3),
            *(EncoderBlock(widths[i], widths[i + 1], strides[i], use_snake) for i in range(len(strides))),
            activation(use_snake, widths[-1]),
            WNConv1d(widths[-1], latent_dim, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class OobleckDecoder(nn.Module):
    """latents (B, latent_dim, T') -> audio (B, out_channels, T' * prod(strides)). Arguments as SAT's."""

    def __init__(self, out_channels: int = 2, channels: int = 128, latent_dim: int = 32,
                 c_mults: list[int] = (1, 2, 4, 8), strides: list[int] = (2, 4, 8, 8), use_snake: bool = False,
                 antialias_activation: bool = False, use_nearest_upsample: bool = False, final_tanh: bool = True):
        super().__init__()
        _check_oobleck(list(c_mults), list(strides), antialias_activation)
        widths = [channels * m for m in [1, *c_mults]]
        self.layers = nn.Sequential(
            WNConv1d(latent_dim, widths[-1], kernel_size=7, padding=3),
            *(DecoderBlock(widths[i], widths[i - 1], strides[i - 1], use_snake, use_nearest_upsample)
              for i in range(len(strides), 0, -1)),
            activation(use_snake, widths[0]),
            WNConv1d(widths[0], out_channels, kernel_size=7, padding=3, bias=False),
            nn.Tanh() if final_tanh else nn.Identity(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class AudioAutoencoder(nn.Module):
    """Encoder, optional bottleneck, decoder, and an optional inner pretransform (e.g. PQMF) around them."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, latent_dim: int, downsampling_ratio: int,
                 sample_rate: int, io_channels: int, bottleneck: Bottleneck | None = None,
                 pretransform: nn.Module | None = None, in_channels: int | None = None,
                 out_channels: int | None = None):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.bottleneck = bottleneck
        self.pretransform = pretransform
        self.latent_dim = latent_dim
        self.downsampling_ratio = downsampling_ratio
        self.sample_rate = sample_rate
        self.io_channels = io_channels
        self.in_channels = in_channels or io_channels
        self.out_channels = out_channels or io_channels

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute residual-unit activations in backward (SAT always does in training); off by default."""
        for module in self.modules():
            if isinstance(module, ResidualUnit):
                module.checkpointing = enabled

    def encode_pre_bottleneck(self, audio: torch.Tensor, chunked: bool = False, chunk_size: int = CHUNK_SIZE,
                              overlap: int = CHUNK_OVERLAP, iterate_batch: bool = False,
                              skip_pretransform: bool = False) -> torch.Tensor:
        """audio (B, C, T) -> encoder output (B, C_enc, T / ratio); for a VAE C_enc = 2 * latent_dim (mean, scale)."""
        def run(x: torch.Tensor) -> torch.Tensor:
            if self.pretransform is not None and not skip_pretransform:
                with torch.set_grad_enabled(self.pretransform.enable_grad and torch.is_grad_enabled()):
                    x = self.pretransform.encode(x)
            return self.encoder(x)

        if iterate_batch:
            return torch.cat([self.encode_pre_bottleneck(a[None], chunked=chunked, chunk_size=chunk_size,
                                                         overlap=overlap, skip_pretransform=skip_pretransform)
                              for a in audio])
        if not chunked:
            return run(audio)
        return _chunked(run, audio, chunk_size, overlap, scale_in=self.downsampling_ratio, scale_out=1)

    def encode(self, audio: torch.Tensor, skip_bottleneck: bool = False, return_info: bool = False,
               skip_pretransform: bool = False, iterate_batch: bool = False, chunked: bool = False,
               chunk_size: int = CHUNK_SIZE, overlap: int = CHUNK_OVERLAP,
               generator: torch.Generator | None = None) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """audio (B, C, T) -> latents (B, latent_dim, T / ratio), and with `return_info` also the info dict
        (`pre_bottleneck_latents`, `kl`, ...). The first four keywords and their defaults are SAT's.

        `chunked` does here what SAT's `encode_audio` does. Chunks are cut before the bottleneck, so a VAE
        draws its noise once over the whole clip: chunked and unchunked encodes with the same generator
        agree (SAT samples per chunk).
        """
        pre = self.encode_pre_bottleneck(audio, chunked=chunked, chunk_size=chunk_size, overlap=overlap,
                                         iterate_batch=iterate_batch, skip_pretransform=skip_pretransform)
        latents, info = pre, {"pre_bottleneck_latents": pre}
        if self.bottleneck is not None and not skip_bottleneck:
            latents, bottleneck_info = self.bottleneck.encode(pre, generator=generator)
            info |= bottleneck_info
        return (latents, info) if return_info else latents

    def decode(self, latents: torch.Tensor, skip_bottleneck: bool = False, iterate_batch: bool = False,
               chunked: bool = False, chunk_size: int = CHUNK_SIZE, overlap: int = CHUNK_OVERLAP) -> torch.Tensor:
        """latents (B, latent_dim, T') -> audio (B, C, T' * ratio). The first two keywords are SAT's."""
        def run(z: torch.Tensor) -> torch.Tensor:
            if self.bottleneck is not None and not skip_bottleneck:
                z = self.bottleneck.decode(z)
            x = self.decoder(z)
            if self.pretransform is not None:
                with torch.set_grad_enabled(self.pretransform.enable_grad and torch.is_grad_enabled()):
                    x = self.pretransform.decode(x)
            return x

        if iterate_batch:
            return torch.cat([self.decode(z[None], skip_bottleneck=skip_bottleneck, chunked=chunked,
                                          chunk_size=chunk_size, overlap=overlap) for z in latents])
        if not chunked:
            return run(latents)
        return _chunked(run, latents, chunk_size, overlap, scale_in=1, scale_out=self.downsampling_ratio)

    def encode_audio(self, audio: torch.Tensor, chunked: bool = False, overlap: int = CHUNK_OVERLAP,
                     chunk_size: int = CHUNK_SIZE, iterate_batch: bool = False,
                     generator: torch.Generator | None = None) -> torch.Tensor:
        """SAT's name and defaults for a (possibly chunked) encode: `encode(audio, chunked=...)`."""
        return self.encode(audio, iterate_batch=iterate_batch, chunked=chunked, chunk_size=chunk_size,
                           overlap=overlap, generator=generator)

    def decode_audio(self, latents: torch.Tensor, chunked: bool = False, overlap: int = CHUNK_OVERLAP,
                     chunk_size: int = CHUNK_SIZE, iterate_batch: bool = False) -> torch.Tensor:
        """SAT's name and defaults for a (possibly chunked) decode: `decode(latents, chunked=...)`."""
        return self.decode(latents, iterate_batch=iterate_batch, chunked=chunked, chunk_size=chunk_size,
                           overlap=overlap)


def _chunked(fn, x: torch.Tensor, chunk_size: int, overlap: int, scale_in: int, scale_out: int) -> torch.Tensor:
    """Apply `fn` to overlapping windows of `x` and stitch the outputs, as SAT's `encode_audio`/`decode_audio`.

    `chunk_size` and `overlap` count latent frames; one frame is `scale_in` input steps and `scale_out` output
    steps. Windows start every `chunk_size - overlap` frames; a last window is aligned to the end. Each
    window's output loses `overlap // 2` frames on every side that touches another window, so every kept frame
    saw at least that much context: with `overlap // 2` at least the receptive field (in frames) the result
    equals the unchunked one up to float rounding.
    """
    if overlap < 0 or chunk_size <= overlap:
        raise ValueError(f"chunked processing needs 0 <= overlap < chunk_size, got overlap={overlap}, "
                         f"chunk_size={chunk_size}")
    if x.shape[-1] % scale_in:
        raise ValueError(f"chunked encoding needs a length that is a multiple of the downsampling ratio "
                         f"{scale_in}, got {x.shape[-1]}; pad the audio first")
    frames = x.shape[-1] // scale_in
    if frames <= chunk_size:  # one window covers everything (SAT fails here with an unbound loop variable)
        return fn(x)
    hop = chunk_size - overlap
    starts = list(range(0, frames - chunk_size + 1, hop))
    if starts[-1] + chunk_size != frames:
        starts.append(frames - chunk_size)
    trim = overlap // 2
    out = None
    for i, start in enumerate(starts):
        y = fn(x[..., start * scale_in:(start + chunk_size) * scale_in])
        if out is None:
            out = y.new_zeros(*y.shape[:-1], frames * scale_out)
        keep_from = start + (trim if i > 0 else 0)
        keep_to = start + chunk_size - (trim if i < len(starts) - 1 else 0)
        out[..., keep_from * scale_out:keep_to * scale_out] = y[..., (keep_from - start) * scale_out:
                                                                (keep_to - start) * scale_out]
    return out


# ---------------------------------------------------------------------------------------------
# Factory: SAT `type` strings -> constructors.

ENCODERS = {"oobleck": OobleckEncoder, "dac": DACEncoderWrapper}
DECODERS = {"oobleck": OobleckDecoder, "dac": DACDecoderWrapper}
# SAT types that wrap a package Cantus does not ship: what they are and what builds them.
NEEDS_PACKAGE = {"seanet": "EnCodec's SEANet network (SAT wraps the `encodec` package)"}


def _build_module(registry: dict, spec: ModuleConfig, key_path: str) -> nn.Module:
    if spec.type in NEEDS_PACKAGE:
        raise MissingPackageError(f"{key_path}.type={spec.type!r} is {NEEDS_PACKAGE[spec.type]}; stable-audio-tools "
                                  f"with that package builds it, Cantus does not include it and builds "
                                  f"{sorted(registry)}")
    if spec.type not in registry:
        raise ConfigError(f"{key_path}.type={spec.type!r} is not supported; supported: {sorted(registry)}")
    cls = registry[spec.type]
    try:
        check_arguments(spec.config, f"{key_path}.config", repr(spec.type), [cls])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        module = cls(**spec.config)
    except ValueError as e:
        raise ConfigError(f"{key_path}.config: {e}") from None
    module.requires_grad_(spec.requires_grad)
    return module


def build_autoencoder(config: AutoencoderConfig, sample_rate: int, key_path: str = "model", *,
                      build_pretransform: Callable[[PretransformConfig, int, int], nn.Module]) -> AudioAutoencoder:
    """Build an `AudioAutoencoder` from a parsed SAT autoencoder block (a model section or a pretransform config).

    `build_pretransform` builds the block's inner pretransform (`pretransforms.create_pretransform_from_config`,
    passed in because a pretransform may itself be an autoencoder: this module does not import that one)."""

    encoder = _build_module(ENCODERS, config.encoder, f"{key_path}.encoder")
    decoder = _build_module(DECODERS, config.decoder, f"{key_path}.decoder")
    bottleneck = None
    if config.bottleneck is not None:
        b = config.bottleneck
        bottleneck = create_bottleneck(b.type, b.config, b.requires_grad, f"{key_path}.bottleneck")
    pretransform = None
    if config.pretransform is not None:
        pretransform = build_pretransform(config.pretransform, sample_rate, config.io_channels)
    return AudioAutoencoder(
        encoder=encoder, decoder=decoder, latent_dim=config.latent_dim, downsampling_ratio=config.downsampling_ratio, sample_rate=sample_rate,
        io_channels=config.io_channels, bottleneck=bottleneck, pretransform=pretransform,
        in_channels=config.in_channels, out_channels=config.out_channels)
