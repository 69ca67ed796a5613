"""Losses for training an autoencoder: multi-resolution STFT, time-domain L1/L2, KL, and a multi-scale STFT GAN.

`autoencoder_step_losses` computes, from one batch, the generator loss (backward into the autoencoder)
and the discriminator loss (backward into the discriminator only), so the train stage drives both with its
own optimizers. The loss layout is SAT's `training.loss_configs` (`training/autoencoders.py`):

- `spectral` (`mrstft`): auraloss's multi-resolution STFT loss; for stereo, SAT's sum-and-difference loss plus
  the left and right channels at half weight.
- `time` (`l1`/`l2`), `bottleneck` (`kl`, default weight 1e-6 as SAT),
- `discriminator` (`encodec`): EnCodec's multi-scale STFT discriminator with hinge losses and feature
  matching, weighted `adversarial` and `feature_matching`; both are zero before `warmup_steps`.

Two departures from SAT, both bugs there: the discriminator sees the decoded audio detached (SAT's
discriminator loss also back-propagates into the autoencoder, issue #55), and the generator's adversarial and
feature-matching terms run the discriminator with detached parameters, so they leave no gradient on it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import scipy.signal
import torch
from torch import nn
from torch.nn import functional as F

from pipeline.config_json import ConfigError
from pipeline.config_training import LossBlock
from pipeline.models.blocks import WNConv2d

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Spectral losses (auraloss semantics)


def a_weighting_fir(sample_rate: int, num_taps: int = 101) -> np.ndarray:
    """FIR approximation of the IEC 61672 A-weighting curve, as auraloss's `FIRFilter("aw")`.

    The analog A-weighting filter (poles at 20.6, 107.7, 737.9 and 12194 Hz, +2.0 dB so that 1 kHz is 0 dB)
    is discretised with the bilinear transform, and a linear-phase FIR is least-squares fitted to its
    magnitude response on 512 frequencies.
    """
    f1, f2, f3, f4, gain_1khz_db = 20.598997, 107.65265, 737.86223, 12194.217, 1.9997
    numerator = [(2 * np.pi * f4) ** 2 * 10 ** (gain_1khz_db / 20), 0, 0, 0, 0]
    denominator = np.polymul([1, 4 * np.pi * f4, (2 * np.pi * f4) ** 2], [1, 4 * np.pi * f1, (2 * np.pi * f1) ** 2])
    denominator = np.polymul(np.polymul(denominator, [1, 2 * np.pi * f3]), [1, 2 * np.pi * f2])
    b, a = scipy.signal.bilinear(numerator, denominator, fs=sample_rate)
    freqs, response = scipy.signal.freqz(b, a, worN=512, fs=sample_rate)
    return scipy.signal.firls(num_taps, freqs, np.abs(response), fs=sample_rate)


class MultiResolutionSTFTLoss(nn.Module):
    """Mean over resolutions of w_sc * spectral convergence + w_log_mag * L1(log |X|, log |Y|) (+ w_lin_mag * L1).

    Yamamoto et al. 2019 / auraloss: |X| = sqrt(max(re^2 + im^2, eps)) of a centred, reflect-padded Hann
    STFT; spectral convergence ||Y - X||_F / ||Y||_F per (item, channel), averaged. With
    `perceptual_weighting` both signals are first A-weighted by a 101-tap FIR.
    """

    def __init__(self, fft_sizes: list[int], hop_sizes: list[int], win_lengths: list[int], w_sc: float = 1.0,
                 w_log_mag: float = 1.0, w_lin_mag: float = 0.0, perceptual_weighting: bool = False,
                 sample_rate: int | None = None, eps: float = 1e-8, window: str = "hann_window"):
        super().__init__()
        if not len(fft_sizes) == len(hop_sizes) == len(win_lengths):
            raise ValueError(f"fft_sizes, hop_sizes and win_lengths need equal lengths, got "
                             f"{len(fft_sizes)}, {len(hop_sizes)}, {len(win_lengths)}")
        if window != "hann_window":
            raise ValueError(f"window={window!r}: only 'hann_window' is supported")
        self.resolutions = list(zip(fft_sizes, hop_sizes, win_lengths))
        self.w_sc, self.w_log_mag, self.w_lin_mag, self.eps = w_sc, w_log_mag, w_lin_mag, eps
        taps = None
        if perceptual_weighting:
            if sample_rate is None:
                raise ValueError("perceptual_weighting needs the sample rate")
            taps = torch.tensor(a_weighting_fir(sample_rate), dtype=torch.float32).view(1, 1, -1)
        self.register_buffer("prefilter", taps, persistent=False)  # (1, 1, taps) or None

    def magnitude(self, x: torch.Tensor, n_fft: int, hop: int, win: int) -> torch.Tensor:
        window = torch.hann_window(win, device=x.device, dtype=x.dtype)
        spec = torch.stft(x, n_fft, hop, win, window, return_complex=True)  # (N, n_fft // 2 + 1, frames)
        return (spec.real.square() + spec.imag.square()).clamp(min=self.eps).sqrt()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x: decoded, y: target, both (B, C, T); returns a scalar."""
        x, y = x.reshape(-1, 1, x.shape[-1]), y.reshape(-1, 1, y.shape[-1])  # channels become items
        if self.prefilter is not None:
            pad = self.prefilter.shape[-1] // 2
            x, y = F.conv1d(x, self.prefilter, padding=pad), F.conv1d(y, self.prefilter, padding=pad)
        x, y = x[:, 0], y[:, 0]
        total = x.new_zeros(())
        for n_fft, hop, win in self.resolutions:
            x_mag, y_mag = self.magnitude(x, n_fft, hop, win), self.magnitude(y, n_fft, hop, win)
            if self.w_sc:
                sc = torch.linalg.norm(y_mag - x_mag, dim=(-2, -1)) / torch.linalg.norm(y_mag, dim=(-2, -1))
                total = total + self.w_sc * sc.mean()
            if self.w_log_mag:
                total = total + self.w_log_mag * F.l1_loss(x_mag.log(), y_mag.log())
            if self.w_lin_mag:
                total = total + self.w_lin_mag * F.l1_loss(x_mag, y_mag)
        return total / len(self.resolutions)


class SpectralLoss(nn.Module):
    """SAT's reconstruction loss: mono -> MRSTFT; stereo -> (MRSTFT(L+R) + MRSTFT(L-R)) / 2 + (MRSTFT(L) + MRSTFT(R)) / 2."""

    def __init__(self, channels: int, **stft_config):
        super().__init__()
        self.stereo = channels == 2
        self.mrstft = MultiResolutionSTFTLoss(**stft_config)

    def forward(self, decoded: torch.Tensor, reals: torch.Tensor) -> torch.Tensor:
        if not self.stereo:
            return self.mrstft(decoded, reals)
        sum_diff = (self.mrstft(decoded.sum(1, keepdim=True), reals.sum(1, keepdim=True))
                    + self.mrstft(decoded[:, :1] - decoded[:, 1:], reals[:, :1] - reals[:, 1:])) / 2
        left_right = self.mrstft(decoded[:, :1], reals[:, :1]) + self.mrstft(decoded[:, 1:], reals[:, 1:])
        return sum_diff + left_right / 2


# ---------------------------------------------------------------------------------------------
# EnCodec's multi-scale STFT discriminator (Défossez et al. 2022), as in SAT's `models/encodec.py`


class STFTDiscriminator(nn.Module):
    """Complex STFT (real and imaginary parts as channels) -> 2-D convs -> logits; returns (logits, features)."""

    def __init__(self, filters: int, in_channels: int, n_fft: int, hop_length: int, win_length: int,
                 max_filters: int = 1024, filters_scale: int = 1, kernel_size: tuple[int, int] = (3, 9),
                 dilations: tuple[int, ...] = (1, 2, 4), stride: tuple[int, int] = (1, 1), normalized: bool = True):
        super().__init__()
        self.n_fft, self.hop_length, self.win_length, self.normalized = n_fft, hop_length, win_length, normalized
        k_time, k_freq = kernel_size
        self.convs = nn.ModuleList([WNConv2d(2 * in_channels, filters, kernel_size,
                                             padding=((k_time - 1) // 2, (k_freq - 1) // 2))])
        width = min(filters_scale * filters, max_filters)
        for i, dilation in enumerate(dilations):
            out = min(filters_scale ** (i + 1) * filters, max_filters)
            self.convs.append(WNConv2d(width, out, kernel_size, stride=stride, dilation=(dilation, 1),
                                       padding=((k_time - 1) * dilation // 2, (k_freq - 1) // 2)))
            width = out
        out = min(filters_scale ** (len(dilations) + 1) * filters, max_filters)
        self.convs.append(WNConv2d(width, out, (k_time, k_time), padding=((k_time - 1) // 2, (k_time - 1) // 2)))
        self.conv_post = WNConv2d(out, 1, (k_time, k_time), padding=((k_time - 1) // 2, (k_time - 1) // 2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:  # x: (B, C, T)
        window = torch.hann_window(self.win_length, device=x.device, dtype=x.dtype)
        spec = torch.stft(x.reshape(-1, x.shape[-1]), self.n_fft, self.hop_length, self.win_length, window,
                          center=False, return_complex=True)  # (B*C, F, frames)
        if self.normalized:  # torchaudio's Spectrogram(normalized=True): divide by the window's L2 norm
            spec = spec / window.square().sum().sqrt()
        spec = spec.reshape(x.shape[0], -1, *spec.shape[-2:])  # (B, C, F, frames)
        z = torch.cat([spec.real, spec.imag], dim=1).transpose(-1, -2)  # (B, 2C, frames, F)
        features = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), 0.2)
            features.append(z)
        return self.conv_post(z), features


class MultiScaleSTFTDiscriminator(nn.Module):
    """One `STFTDiscriminator` per (n_fft, hop, window) scale; arguments as SAT's `encodec` discriminator config."""

    def __init__(self, filters: int, in_channels: int, n_ffts: list[int], hop_lengths: list[int],
                 win_lengths: list[int], max_filters: int = 1024, filters_scale: int = 1,
                 kernel_size: tuple[int, int] = (3, 9), dilations: tuple[int, ...] = (1, 2, 4),
                 stride: tuple[int, int] = (1, 1), normalized: bool = True):
        super().__init__()
        if not len(n_ffts) == len(hop_lengths) == len(win_lengths):
            raise ValueError("n_ffts, hop_lengths and win_lengths need equal lengths")
        self.discriminators = nn.ModuleList([
            STFTDiscriminator(filters, in_channels, n_fft, hop, win, max_filters, filters_scale, tuple(kernel_size),
                              tuple(dilations), tuple(stride), normalized)
            for n_fft, hop, win in zip(n_ffts, hop_lengths, win_lengths)])

    def forward(self, x: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        return [d(x) for d in self.discriminators]


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def feature_matching(real_features: list[torch.Tensor], fake_features: list[torch.Tensor]) -> torch.Tensor:
    """Mean over layers of the mean absolute difference of feature maps."""
    return sum((r - f).abs().mean() for r, f in zip(real_features, fake_features)) / len(real_features)


# ---------------------------------------------------------------------------------------------
# SAT's `training.loss_configs` -> loss objects, and the per-batch loss computation

# SAT's defaults when `loss_configs` is absent (`AutoencoderTrainingWrapper.__init__`).
_SCALES = [2048, 1024, 512, 256, 128, 64, 32]
DEFAULT_LOSS_CONFIGS = {
    "discriminator": LossBlock(type="encodec",
                               config={"n_ffts": _SCALES, "hop_lengths": [s // 4 for s in _SCALES],
                                       "win_lengths": _SCALES, "filters": 32},
                               weights={"adversarial": 0.1, "feature_matching": 5.0}),
    "spectral": LossBlock(type="mrstft",
                          config={"fft_sizes": _SCALES, "hop_sizes": [s // 4 for s in _SCALES], "win_lengths": _SCALES,
                                  "perceptual_weighting": True},
                          weights={"mrstft": 1.0}),
    "time": LossBlock(type="l1", config={}, weights={"l1": 0.0}),
}
_DEFAULT_KL_WEIGHT = 1e-6  # SAT's fallback when loss_configs.bottleneck.weights.kl is missing


@dataclass(frozen=True, kw_only=True, slots=True)
class LossWeights:
    mrstft: float = 1.0
    l1: float = 0.0
    l2: float = 0.0
    kl: float = _DEFAULT_KL_WEIGHT
    adversarial: float = 0.0
    feature_matching: float = 0.0


class AutoencoderLosses(nn.Module):
    """The spectral loss, the discriminator (a trained module, or None) and the weights of every term."""

    def __init__(self, spectral: SpectralLoss, discriminator: MultiScaleSTFTDiscriminator | None,
                 weights: LossWeights, warmup_mode: str = "adv"):
        super().__init__()
        if warmup_mode not in ("adv", "full"):
            raise ValueError(f"warmup_mode={warmup_mode!r}: expected 'adv' or 'full'")
        self.spectral = spectral
        self.discriminator = discriminator
        self.weights = weights
        self.warmup_mode = warmup_mode  # "adv": the discriminator trains during warm-up; "full": it waits too


def _weights(block: LossBlock, allowed: tuple[str, ...], key_path: str) -> dict[str, float]:
    unknown = sorted(set(block.weights) - set(allowed))
    if unknown:
        raise ConfigError(f"{key_path}.weights: unknown weight(s) {unknown}; expected {list(allowed)}")
    if block.decay != 1.0:
        raise ConfigError(f"{key_path}.decay={block.decay}: loss-weight decay is not supported; remove it")
    return dict(block.weights)


def _construct(cls, kwargs: Mapping, key_path: str, **extra):
    try:
        return cls(**kwargs, **extra)
    except TypeError as e:  # an unknown or missing constructor argument
        raise ConfigError(f"{key_path}: {e}") from None
    except ValueError as e:
        raise ConfigError(f"{key_path}: {e}") from None


def create_autoencoder_losses(loss_configs: Mapping[str, LossBlock] | None, sample_rate: int, channels: int,
                              warmup_mode: str = "adv", key_path: str = "training.loss_configs") -> AutoencoderLosses:
    """Build the losses from SAT's `training.loss_configs`, as `pipeline.config_training.parse_autoencoder_losses`
    parsed it (None: SAT's defaults)."""
    configs = DEFAULT_LOSS_CONFIGS if loss_configs is None else loss_configs
    unsupported = sorted(set(configs) & {"mrmel", "hubert"})
    if unsupported:
        raise ConfigError(f"{key_path}: loss(es) {unsupported} are not supported; supported: "
                          "spectral (mrstft), time (l1, l2), bottleneck (kl), discriminator (encodec)")
    unknown = sorted(set(configs) - {"spectral", "time", "bottleneck", "discriminator"})
    if unknown:
        logger.warning("%s: unknown loss config keys (ignored, as SAT does): %s", key_path, unknown)
    if "spectral" not in configs:
        raise ConfigError(f"{key_path}.spectral is required (SAT reads it unconditionally)")
    spectral_block = configs["spectral"]
    if spectral_block.type not in (None, "mrstft"):
        raise ConfigError(f"{key_path}.spectral.type={spectral_block.type!r}: only 'mrstft' is supported")
    weights = _weights(spectral_block, ("mrstft",), f"{key_path}.spectral")
    spectral = _construct(SpectralLoss, spectral_block.config, f"{key_path}.spectral.config",
                          channels=channels, sample_rate=sample_rate)
    if "time" in configs:
        weights |= _weights(configs["time"], ("l1", "l2"), f"{key_path}.time")
    if "bottleneck" in configs:
        weights |= _weights(configs["bottleneck"], ("kl",), f"{key_path}.bottleneck")
    discriminator = None
    if "discriminator" in configs:
        block = configs["discriminator"]
        if block.type != "encodec":
            raise ConfigError(f"{key_path}.discriminator.type={block.type!r}: only 'encodec' is supported")
        weights |= _weights(block, ("adversarial", "feature_matching"), f"{key_path}.discriminator")
        discriminator = _construct(MultiScaleSTFTDiscriminator, block.config,
                                   f"{key_path}.discriminator.config", in_channels=channels)
    return AutoencoderLosses(spectral, discriminator, LossWeights(**weights), warmup_mode)


@dataclass
class AutoencoderStepLosses:
    generator: torch.Tensor
    """Weighted generator loss: backward into the autoencoder."""
    discriminator: torch.Tensor | None
    """Discriminator hinge loss: backward into the discriminator only; None without a discriminator (or in
    warm-up with warmup_mode "full")."""
    terms: dict[str, float]
    """Unweighted terms for logging: mrstft, l1, l2, kl, adversarial, feature_matching, discriminator."""
    decoded: torch.Tensor
    """The reconstruction (B, C, T), detached."""
    latents: torch.Tensor
    """The bottleneck's latents (B, latent_dim, T'), detached."""


def autoencoder_step_losses(autoencoder: nn.Module, losses: AutoencoderLosses, reals: torch.Tensor,
                            warmed_up: bool = True, generator: torch.Generator | None = None) -> AutoencoderStepLosses:
    """Encode and decode `reals` (B, C, T) once and return the generator's and the discriminator's losses.

    `warmed_up` is `step >= training.warmup_steps`: before it the adversarial and feature-matching terms are
    off. SAT alternates (discriminator step on odd global steps, generator on even); a caller may do the
    same or step both optimizers every batch, since the two losses share no graph.
    """
    latents, info = autoencoder.encode(reals, return_info=True, generator=generator)
    decoded = autoencoder.decode(latents)
    length = min(decoded.shape[-1], reals.shape[-1])  # odd strides make the decoder's output one sample short
    decoded, reals = decoded[..., :length], reals[..., :length]
    w = losses.weights
    terms = {"mrstft": losses.spectral(decoded, reals)}
    if w.l1:
        terms["l1"] = F.l1_loss(decoded, reals)
    if w.l2:
        terms["l2"] = F.mse_loss(decoded, reals)
    if "kl" in info:
        terms["kl"] = info["kl"]
    total = sum(getattr(w, name) * value for name, value in terms.items())

    disc_loss = None
    disc = losses.discriminator
    if disc is not None:
        real_out = disc(reals)
        if warmed_up or losses.warmup_mode == "adv":
            fake_out = disc(decoded.detach())
            disc_loss = sum(hinge_discriminator_loss(r[0], f[0]) for r, f in zip(real_out, fake_out)) / len(real_out)
            terms["discriminator"] = disc_loss
        if warmed_up:
            # Detached parameters: gradients reach the decoder through the discriminator, not its weights.
            frozen = {name: t.detach() for name, t in [*disc.named_parameters(), *disc.named_buffers()]}
            fake_out = torch.func.functional_call(disc, frozen, (decoded,))
            terms["adversarial"] = sum(-f[0].mean() for f in fake_out) / len(fake_out)
            terms["feature_matching"] = sum(feature_matching([t.detach() for t in r[1]], f[1])
                                            for r, f in zip(real_out, fake_out)) / len(fake_out)
            total = total + w.adversarial * terms["adversarial"] + w.feature_matching * terms["feature_matching"]
    return AutoencoderStepLosses(generator=total, discriminator=disc_loss,
                                 terms={k: float(v.detach()) for k, v in terms.items()},
                                 decoded=decoded.detach(), latents=latents.detach())
