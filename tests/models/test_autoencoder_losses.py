"""Autoencoder losses: MRSTFT against numpy float64, A-weighting against the standard curve, the GAN step,
and a tiny VAE whose losses fall over a few dozen steps on synthesized notes."""

import json
from pathlib import Path

import numpy as np
import pytest
import scipy.signal
import torch

from pipeline.config_json import ConfigError
from pipeline.config_training import parse_autoencoder_losses
from pipeline.models.factory import create_autoencoder_from_config
from pipeline.models.autoencoder_losses import (MultiResolutionSTFTLoss, SpectralLoss, a_weighting_fir,
                                                autoencoder_step_losses, create_autoencoder_losses,
                                                feature_matching, hinge_discriminator_loss)

AUTOENCODERS = Path(__file__).parents[1] / "fixtures" / "sat_configs" / "model_configs" / "autoencoders"
RESOLUTIONS = dict(fft_sizes=[256, 64, 32], hop_sizes=[64, 16, 8], win_lengths=[256, 48, 32])


def numpy_mrstft(x: np.ndarray, y: np.ndarray, taps: np.ndarray | None, eps: float = 1e-8) -> float:
    """auraloss's MRSTFT written out in float64: per (item, channel) signal, Hann STFT centred with reflect
    padding; loss = mean over resolutions of mean(SC) + mean |log|X| - log|Y||."""
    x, y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if taps is not None:  # correlation with the FIR taps, 'same' length (torch's conv1d)
        x = np.stack([np.correlate(np.pad(s, len(taps) // 2), taps, "valid") for s in x])
        y = np.stack([np.correlate(np.pad(s, len(taps) // 2), taps, "valid") for s in y])
    total = 0.0
    for n_fft, hop, win in zip(*RESOLUTIONS.values()):
        window = np.zeros(n_fft)
        start = (n_fft - win) // 2
        window[start:start + win] = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)  # periodic Hann

        def mag(s):
            padded = np.pad(s, n_fft // 2, mode="reflect")
            frames = np.stack([padded[i:i + n_fft] for i in range(0, len(padded) - n_fft + 1, hop)])
            spec = np.fft.rfft(frames * window, axis=-1)
            return np.sqrt(np.maximum(spec.real ** 2 + spec.imag ** 2, eps))

        xm, ym = np.stack([mag(s) for s in x]), np.stack([mag(s) for s in y])
        sc = np.linalg.norm(ym - xm, axis=(1, 2)) / np.linalg.norm(ym, axis=(1, 2))
        total += sc.mean() + np.abs(np.log(xm) - np.log(ym)).mean()
    return total / len(RESOLUTIONS["fft_sizes"])


@pytest.mark.parametrize("perceptual", [False, True])
def test_mrstft_matches_a_float64_numpy_computation(perceptual):
    rng = np.random.default_rng(0)
    y = rng.standard_normal((2, 1, 1000)) * 0.3
    x = y + rng.standard_normal(y.shape) * 0.1
    loss = MultiResolutionSTFTLoss(**RESOLUTIONS, perceptual_weighting=perceptual, sample_rate=16000)
    got = loss(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)).item()
    expected = numpy_mrstft(x, y, a_weighting_fir(16000) if perceptual else None)
    assert got == pytest.approx(expected, rel=1e-5)
    assert loss(torch.tensor(y, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)).item() < 1e-6


def test_stereo_loss_is_sum_and_difference_plus_half_left_and_right():
    x, y = torch.randn(2, 2, 600), torch.randn(2, 2, 600)
    stereo = SpectralLoss(channels=2, **RESOLUTIONS)
    mono = MultiResolutionSTFTLoss(**RESOLUTIONS)
    expected = ((mono(x.sum(1, keepdim=True), y.sum(1, keepdim=True)) + mono(x[:, :1] - x[:, 1:], y[:, :1] - y[:, 1:])) / 2
                + (mono(x[:, :1], y[:, :1]) + mono(x[:, 1:], y[:, 1:])) / 2)
    torch.testing.assert_close(stereo(x, y), expected)


def test_a_weighting_fir_follows_the_standard_curve():
    freqs, response = scipy.signal.freqz(a_weighting_fir(44100), worN=[100.0, 1000.0, 4000.0], fs=44100)
    gain_db = 20 * np.log10(np.abs(response))
    # IEC 61672 A-weighting: -19.1 dB at 100 Hz, 0 dB at 1 kHz, +1.0 dB at 4 kHz (101 taps blur 100 Hz).
    assert gain_db[1] == pytest.approx(0.0, abs=0.3)
    assert gain_db[2] == pytest.approx(1.0, abs=0.3)
    assert gain_db[0] == pytest.approx(-19.1, abs=2.5)


def test_hinge_and_feature_matching_closed_forms():
    real, fake = torch.tensor([0.5, 2.0]), torch.tensor([-2.0, 0.0])
    # relu(1 - real) = [0.5, 0], relu(1 + fake) = [0, 1]
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.25 + 0.5)
    fm = feature_matching([torch.zeros(3), torch.ones(2)], [torch.ones(3), torch.ones(2) * 3])
    assert fm.item() == pytest.approx((1 + 2) / 2)


def test_sat_autoencoder_loss_configs_build_and_unsupported_ones_are_named():
    for path in sorted(AUTOENCODERS.glob("*.json")):
        cfg = json.loads(path.read_text())
        losses = create_autoencoder_losses(parse_autoencoder_losses(cfg["training"]["loss_configs"]), cfg["sample_rate"],
                                           cfg["audio_channels"])
        assert losses.discriminator is not None and losses.weights.adversarial == 0.1, path.name
    sa2 = json.loads((AUTOENCODERS / "stable_audio_2_0_vae.json").read_text())["training"]["loss_configs"]
    assert create_autoencoder_losses(parse_autoencoder_losses(sa2), 44100, 2).weights.kl == 1e-4
    with pytest.raises(ConfigError, match="mrmel"):
        create_autoencoder_losses(parse_autoencoder_losses({**sa2, "mrmel": {}}), 44100, 2)
    with pytest.raises(ConfigError, match="discriminator.type='oobleck'"):
        create_autoencoder_losses(parse_autoencoder_losses({**sa2, "discriminator": {"type": "oobleck"}}), 44100, 2)
    with pytest.raises(ConfigError, match=r"spectral\.config.*fft_size"):
        spectral = {"type": "mrstft", "config": {"fft_size": 3}}
        create_autoencoder_losses(parse_autoencoder_losses({**sa2, "spectral": spectral}), 44100, 2)


TINY_LOSSES = {
    "discriminator": {"type": "encodec", "config": {"filters": 4, "n_ffts": [256, 128, 64], "hop_lengths": [64, 32, 16],
                                                    "win_lengths": [256, 128, 64], "stride": [1, 2]},
                      "weights": {"adversarial": 0.1, "feature_matching": 5.0}},
    "spectral": {"type": "mrstft", "config": {"fft_sizes": [512, 256, 128, 64, 32], "hop_sizes": [128, 64, 32, 16, 8],
                                              "win_lengths": [512, 256, 128, 64, 32], "perceptual_weighting": True},
                 "weights": {"mrstft": 1.0}},
    "time": {"type": "l1", "weights": {"l1": 0.1}},
    "bottleneck": {"type": "kl", "weights": {"kl": 1e-4}},
}


def tiny_vae():
    oobleck = {"channels": 8, "c_mults": [1, 2], "strides": [2, 4], "use_snake": True}
    return create_autoencoder_from_config({
        "model_type": "autoencoder", "sample_size": 2048, "sample_rate": 16000, "audio_channels": 1,
        "model": {"encoder": {"type": "oobleck", "config": {"in_channels": 1, "latent_dim": 16, **oobleck}},
                  "decoder": {"type": "oobleck", "config": {"out_channels": 1, "latent_dim": 8, "final_tanh": False,
                                                            **oobleck}},
                  "bottleneck": {"type": "vae"}, "latent_dim": 8, "downsampling_ratio": 8, "io_channels": 1}})


def synthesized_notes(count: int, samples: int, sample_rate: int = 16000, seed: int = 0) -> torch.Tensor:
    """Clips of 1-3 overlapping harmonic notes with attack-decay envelopes, about -15 dBFS."""
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / sample_rate
    clips = np.zeros((count, 1, samples))
    for clip in clips:
        for _ in range(rng.integers(1, 4)):
            f0 = 110 * 2 ** (rng.integers(0, 36) / 12)
            onset = rng.uniform(0, 0.6) * t[-1]
            env = np.where(t >= onset, np.exp(-(t - onset) * rng.uniform(2, 8)) * (1 - np.exp(-(t - onset) * 200)), 0)
            tone = sum(np.sin(2 * np.pi * f0 * k * t) / k ** 1.5 for k in range(1, 6) if f0 * k < sample_rate / 2)
            clip[0] += env * tone
        clip *= 0.18 / (np.sqrt((clip ** 2).mean()) + 1e-9)
    return torch.tensor(clips, dtype=torch.float32)


def test_generator_and_discriminator_steps_touch_only_their_own_module():
    torch.manual_seed(0)
    vae, losses = tiny_vae(), create_autoencoder_losses(parse_autoencoder_losses(TINY_LOSSES), 16000, 1)
    out = autoencoder_step_losses(vae, losses, synthesized_notes(2, 1024), warmed_up=True)
    out.generator.backward()
    assert all(p.grad is not None for p in vae.parameters())
    assert all(p.grad is None for p in losses.discriminator.parameters())
    vae.zero_grad(set_to_none=True)
    out.discriminator.backward()
    assert all(p.grad is None for p in vae.parameters())
    assert all(p.grad is not None for p in losses.discriminator.parameters())
    assert set(out.terms) == {"mrstft", "l1", "kl", "discriminator", "adversarial", "feature_matching"}


def test_before_warmup_the_generator_has_no_adversarial_terms():
    torch.manual_seed(0)
    vae, losses = tiny_vae(), create_autoencoder_losses(parse_autoencoder_losses(TINY_LOSSES), 16000, 1)
    out = autoencoder_step_losses(vae, losses, synthesized_notes(2, 1024), warmed_up=False)
    assert "adversarial" not in out.terms and out.discriminator is not None  # warmup_mode "adv": D still trains
    w = losses.weights
    expected = w.mrstft * out.terms["mrstft"] + w.l1 * out.terms["l1"] + w.kl * out.terms["kl"]
    assert out.generator.item() == pytest.approx(expected, rel=1e-5)


def test_losses_fall_when_a_tiny_vae_trains_a_few_dozen_steps():
    torch.manual_seed(0)
    vae, losses = tiny_vae(), create_autoencoder_losses(parse_autoencoder_losses(TINY_LOSSES), 16000, 1)
    clips = synthesized_notes(8, 2048)
    opt_g = torch.optim.AdamW(vae.parameters(), lr=3e-3, betas=(0.8, 0.99))
    opt_d = torch.optim.AdamW(losses.discriminator.parameters(), lr=3e-3, betas=(0.8, 0.99))
    history = []
    for step in range(40):
        batch = clips[torch.randperm(8, generator=torch.Generator().manual_seed(step))[:4]]
        out = autoencoder_step_losses(vae, losses, batch, warmed_up=step >= 10,
                                      generator=torch.Generator().manual_seed(step))
        opt_g.zero_grad()
        out.generator.backward()
        opt_g.step()
        opt_d.zero_grad()
        out.discriminator.backward()
        opt_d.step()
        history.append(out.terms)
    first, last = history[:5], history[-5:]
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "mrstft") < 0.8 * mean(first, "mrstft")
    assert mean(last, "discriminator") < mean(first, "discriminator") - 0.02
