"""Mel filterbank against the HTK formula; dB scale and image orientation against pure tones."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.report.spectrogram import (FIGURE_PIXELS, SpectrogramOptions, hz_to_mel, mel_filterbank,
                                         mel_spectrogram_db, mel_to_hz, spectrogram_png)
from renderkit import decode_png

SR = 8000


def tone(freq: float, amplitude: float = 1.0, seconds: float = 1.0) -> torch.Tensor:
    t = torch.arange(int(SR * seconds), dtype=torch.float64) / SR
    return (amplitude * torch.sin(2 * math.pi * freq * t)).float()


def test_mel_scale_is_htk():
    assert hz_to_mel(1000.0) == pytest.approx(2595 * math.log10(1 + 1000 / 700))
    assert hz_to_mel(1000.0) == pytest.approx(1000.0, abs=0.1)  # the scale's anchor
    np.testing.assert_allclose(mel_to_hz(hz_to_mel(np.array([0.0, 440.0, 3999.0]))), [0.0, 440.0, 3999.0])


def test_filterbank_triangles_peak_at_their_centres_and_cross_at_half():
    n_mels, n_freqs = 10, 8001  # 0.5 Hz per bin over 0..4000 Hz
    fb = mel_filterbank(n_freqs, n_mels, SR).double().numpy()
    bins = np.linspace(0, SR / 2, n_freqs)
    centres = mel_to_hz(np.linspace(0, hz_to_mel(SR / 2), n_mels + 2))
    assert fb.shape == (n_mels, n_freqs) and fb.min() >= 0 and fb.max() <= 1
    for m in range(n_mels):
        assert abs(bins[fb[m].argmax()] - centres[m + 1]) <= 0.5
        assert fb[m].max() == pytest.approx(1.0, abs=2e-3)
        # Between two centres the rising and falling edges are linear in Hz: 0.5 at the midpoint.
        mid = (centres[m + 1] + centres[m + 2]) / 2
        assert np.interp(mid, bins, fb[m]) == pytest.approx(0.5, abs=1e-3)
        assert fb[m][(bins < centres[m]) | (bins > centres[m + 2])].max(initial=0) == 0


def test_full_scale_tone_reads_near_zero_db_in_its_band_and_scales_by_20_db_per_decade():
    options = SpectrogramOptions(n_mels=40)
    loud = mel_spectrogram_db(tone(1000.0), SR, options)
    quiet = mel_spectrogram_db(tone(1000.0, 0.1), SR, options)
    frames = slice(2, -2)  # away from the zero-padded edges
    peak_band = int(loud[:, frames].mean(1).argmax())
    centres = mel_to_hz(np.linspace(0, hz_to_mel(SR / 2), 42))[1:-1]
    assert peak_band == int(np.abs(centres - 1000.0).argmin())
    assert 0.0 <= float(loud[peak_band, frames].mean()) <= 2.0  # Hann main lobe adds < 2 dB
    torch.testing.assert_close(loud[peak_band, frames] - quiet[peak_band, frames],
                               torch.full_like(loud[peak_band, frames], 20.0), rtol=0, atol=1e-3)


def test_stereo_is_the_mean_power_of_its_channels():
    options = SpectrogramOptions(n_mels=16)
    both = mel_spectrogram_db(torch.stack([tone(500.0), torch.zeros(SR)]), SR, options)
    mono = mel_spectrogram_db(tone(500.0), SR, options)
    audible = mono[:, 2:-2] > -60  # below that the 1e-10 power floor hides the difference
    assert audible.sum() > 100
    torch.testing.assert_close(both[:, 2:-2][audible], mono[:, 2:-2][audible] - 10 * math.log10(2),
                               rtol=0, atol=1e-3)


def plot_column(image: np.ndarray) -> np.ndarray:
    """Brightness down one column in the middle of the plot area (inside the axes of spectrogram_png)."""
    height, width, _ = image.shape
    top, bottom = int(height * 0.08), int(height * 0.78)  # the axes span 0.2..0.94 of the height
    return image.astype(int).sum(2)[top:bottom, int(width * 0.45)]


def test_image_is_a_plot_with_axes_low_frequencies_at_the_bottom():
    options = SpectrogramOptions(n_mels=32, max_width=100)
    for freq, bottom in ((200.0, True), (3500.0, False)):
        image = decode_png(spectrogram_png(tone(freq), SR, options))
        assert image.shape == (FIGURE_PIXELS[1], FIGURE_PIXELS[0], 3)
        column = plot_column(image)
        brightest = int(column.argmax()) / len(column)  # 0 = top of the plot
        assert (brightest > 0.6) == bottom and (brightest < 0.3) == (not bottom), (freq, brightest)
        # Axis labels and ticks are drawn in black on the white margin left of the plot.
        margin = image[:, : int(FIGURE_PIXELS[0] * 0.1)].astype(int).sum(2)
        assert (margin < 200).sum() > 50 and (margin > 700).mean() > 0.5


def test_short_and_silent_clips_still_give_an_image():
    image = decode_png(spectrogram_png(torch.zeros(1, 100), SR, SpectrogramOptions(n_mels=8)))
    assert image.shape == (FIGURE_PIXELS[1], FIGURE_PIXELS[0], 3)
    column = plot_column(image)
    assert (column == column[0]).all()  # silence: one colour over the whole plot
