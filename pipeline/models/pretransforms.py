"""Pretransforms: the fixed audio <-> latent map a diffusion model works inside (SAT's `models/pretransforms.py`).

Interface (every type): `encode(audio (B, io_channels, T)) -> (B, encoded_channels, T / downsampling_ratio)`,
`decode` the reverse, attributes `downsampling_ratio`, `encoded_channels`, `io_channels`, `scale`, `chunked`,
`iterate_batch`, `model_half`, `enable_grad`. State-dict names are SAT's: an autoencoder pretransform holds
its model as `model`, so a full diffusion checkpoint has `pretransform.model.encoder.layers...`.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn

from pipeline.config import PretransformConfig
from pipeline.config_json import ConfigError, MissingPackageError
from pipeline.models.autoencoder import build_autoencoder
from pipeline.models.bottlenecks import VAEBottleneck, vae_mean_std


class Pretransform(nn.Module):
    def __init__(self, io_channels: int, encoded_channels: int, downsampling_ratio: int, scale: float = 1.0,
                 chunked: bool = False, iterate_batch: bool = False, model_half: bool = False,
                 enable_grad: bool = False):
        super().__init__()
        self.io_channels = io_channels
        self.encoded_channels = encoded_channels
        self.downsampling_ratio = downsampling_ratio
        self.scale = scale
        self.chunked = chunked
        self.iterate_batch = iterate_batch
        self.model_half = model_half
        self.enable_grad = enable_grad

    def encode(self, audio: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class AutoencoderPretransform(Pretransform):
    """A frozen `AudioAutoencoder`; latents are divided by `scale` on encode and multiplied back on decode."""

    def __init__(self, model: nn.Module, scale: float = 1.0, model_half: bool = False, iterate_batch: bool = False,
                 chunked: bool = False, enable_grad: bool = False):
        super().__init__(io_channels=model.io_channels, encoded_channels=model.latent_dim,
                         downsampling_ratio=model.downsampling_ratio, scale=scale, chunked=chunked,
                         iterate_batch=iterate_batch, model_half=model_half, enable_grad=enable_grad)
        self.model = model
        self.sample_rate = model.sample_rate
        if model_half:
            self.model.half()

    def _model_dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def encode(self, audio, generator: torch.Generator | None = None):
        latents = self.model.encode(audio.to(self._model_dtype()), iterate_batch=self.iterate_batch,
                                    chunked=self.chunked, generator=generator)
        return latents.to(audio.dtype) / self.scale

    def encode_mean_std(self, audio: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For a VAE: the latent mean and std (B, latent_dim, T'), **before** dividing by `scale` (pre_encode)."""
        if not isinstance(self.model.bottleneck, VAEBottleneck):
            raise ValueError(f"encode_mean_std needs a vae bottleneck; this autoencoder has "
                             f"{type(self.model.bottleneck).__name__}")
        pre = self.model.encode_pre_bottleneck(audio.to(self._model_dtype()), chunked=self.chunked,
                                               iterate_batch=self.iterate_batch)
        mean, std = vae_mean_std(pre.float())
        return mean.to(audio.dtype), std.to(audio.dtype)

    def decode(self, latents):
        audio = self.model.decode((latents * self.scale).to(self._model_dtype()), chunked=self.chunked,
                                  iterate_batch=self.iterate_batch)
        return audio.to(latents.dtype)


class PQMFPretransform(Pretransform):
    """Split each channel into `num_bands` sub-bands: (B, C, T) -> (B, C * bands, T / bands)."""

    def __init__(self, attenuation: float = 100, num_bands: int = 16, channels: int = 1):
        from pipeline.models.pqmf import PQMF  # scipy's filter design is only needed here

        super().__init__(io_channels=channels, encoded_channels=channels * num_bands, downsampling_ratio=num_bands)
        self.pqmf = PQMF(attenuation, num_bands)

    def encode(self, audio):
        return rearrange(self.pqmf(audio), "b c n t -> b (c n) t")

    def decode(self, latents):
        return self.pqmf.inverse(rearrange(latents, "b (c n) t -> b c n t", n=self.pqmf.num_bands))


class PatchedPretransform(Pretransform):
    """Fold `patch_size` consecutive samples into channels: (B, C, T) -> (B, C * patch, ceil(T / patch))."""

    def __init__(self, channels: int, patch_size: int, oversampling: int = 1):
        if oversampling != 1:
            raise ValueError(f"oversampling={oversampling}: SAT resamples with torchaudio, which Cantus does not "
                             "use; only oversampling=1 is supported")
        super().__init__(io_channels=channels, encoded_channels=channels * patch_size, downsampling_ratio=patch_size)
        self.patch_size = patch_size

    def encode(self, audio):
        audio = nn.functional.pad(audio, (0, -audio.shape[-1] % self.patch_size))
        return rearrange(audio, "b c (l h) -> b (c h) l", h=self.patch_size)

    def decode(self, latents):
        return rearrange(latents, "b (c h) l -> b c (l h)", h=self.patch_size)


# SAT types that wrap a package Cantus does not ship: what they are and what builds them.
NEEDS_PACKAGE = {"wavelet": "a wavelet transform (SAT wraps the `PyWavelets` package)",
                 "dac_pretrained": "a pretrained DAC codec (SAT wraps the `descript-audio-codec` package)",
                 "audiocraft_pretrained": "a pretrained AudioCraft codec (SAT wraps the `audiocraft` package)"}
SUPPORTED = ("autoencoder", "pqmf", "patched")


def create_pretransform_from_config(pretransform_config: PretransformConfig, sample_rate: int,
                                    audio_channels: int, key_path: str = "model.pretransform") -> Pretransform:
    """Build a pretransform from its parsed SAT block; it starts frozen and in eval mode, as in SAT."""
    c = pretransform_config
    if c.type in NEEDS_PACKAGE:
        raise MissingPackageError(f"{key_path}.type={c.type!r} is {NEEDS_PACKAGE[c.type]}; stable-audio-tools with "
                                  f"that package builds it, Cantus does not include it and builds {list(SUPPORTED)}")
    if c.type == "autoencoder":
        model = build_autoencoder(c.autoencoder, sample_rate, f"{key_path}.config",
                                  build_pretransform=create_pretransform_from_config)
        if model.io_channels != audio_channels:
            raise ConfigError(f"{key_path}.config.io_channels={model.io_channels} differs from the model's "
                              f"audio_channels={audio_channels}")
        pretransform = AutoencoderPretransform(model, scale=c.scale, model_half=c.model_half,
                                               iterate_batch=c.iterate_batch, chunked=c.chunked)
    elif c.type in ("pqmf", "patched"):
        cls = PQMFPretransform if c.type == "pqmf" else PatchedPretransform
        try:
            pretransform = cls(**c.config)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{key_path}.config: {e}") from None
    else:
        raise ConfigError(f"{key_path}.type={c.type!r} is not supported; supported: {list(SUPPORTED)}")
    pretransform.enable_grad = c.enable_grad
    return pretransform.eval().requires_grad_(c.enable_grad)
