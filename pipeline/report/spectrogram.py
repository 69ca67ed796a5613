"""Mel spectrograms of generated audio, as PNG images for the report page.

`torch.stft` with a periodic Hann window, power averaged over channels, projected on a triangular
mel filterbank (HTK mel scale, ``mel = 2595 log10(1 + f / 700)``, O'Shaughnessy 1987; triangles of
peak 1 between neighbouring centre frequencies, as in HTK's ``MelFB``), then decibels. The dB scale is
relative to a full-scale sine: magnitudes are divided by ``sum(window) / 2``, the STFT peak of a sine
of amplitude 1, so a 0 dBFS tone reads 0 dB in its bin. torchaudio is not used (no build for our torch).
"""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import torch



@dataclasses.dataclass(frozen=True, slots=True)
class SpectrogramOptions:
    n_mels: int = 128
    """Mel bands (rows of the plot)."""
    max_width: int = 800
    """Most STFT frames (columns of the plot): the hop grows with the clip so long clips stay readable."""
    window_seconds: float = 0.046
    """STFT window length; rounded up to a power of two in samples (2048 at 44.1 kHz)."""
    f_min: float = 0.0
    f_max: float | None = None
    """Highest band edge in Hz; None means the Nyquist frequency."""
    top_db: float = 80.0
    """Dynamic range shown: values below ``max - top_db`` get the colour map's darkest colour."""


def hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)


def mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, n_mels: int, sample_rate: int, f_min: float = 0.0,
                   f_max: float | None = None) -> torch.Tensor:
    """Triangular filters (n_mels, n_freqs) over the rfft bins ``k * sample_rate / n_fft``.

    Band ``m`` rises from centre ``m - 1`` to 1 at centre ``m`` and falls to 0 at centre ``m + 1``; the
    ``n_mels + 2`` centres are equally spaced in mel between ``f_min`` and ``f_max``.
    """
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"mel_filterbank: need 0 <= f_min={f_min} < f_max={f_max} <= sample_rate/2={sample_rate / 2}")
    bins = np.linspace(0.0, sample_rate / 2, n_freqs)  # (F,) Hz of each rfft bin
    centres = mel_to_hz(np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2))  # (M + 2,)
    lower, centre, upper = centres[:-2, None], centres[1:-1, None], centres[2:, None]  # (M, 1) each
    rising = (bins[None, :] - lower) / (centre - lower)
    falling = (upper - bins[None, :]) / (upper - centre)
    return torch.from_numpy(np.clip(np.minimum(rising, falling), 0.0, None)).float()  # (M, F)


def n_fft_for(sample_rate: int, window_seconds: float) -> int:
    return 1 << max(4, math.ceil(math.log2(sample_rate * window_seconds)))


def mel_spectrogram_db(audio: torch.Tensor, sample_rate: int,
                       options: SpectrogramOptions = SpectrogramOptions()) -> torch.Tensor:
    """Mel power in dB re a full-scale sine, (n_mels, frames), of ``audio`` (C, T) or (T,)."""
    audio = audio.detach().to("cpu", torch.float32)
    audio = audio[None] if audio.ndim == 1 else audio  # (C, T)
    if audio.ndim != 2 or audio.shape[1] == 0:
        raise ValueError(f"mel_spectrogram_db: expected audio of shape (channels, samples), got {tuple(audio.shape)}")
    n_fft = n_fft_for(sample_rate, options.window_seconds)
    if audio.shape[1] < n_fft:  # a clip shorter than one window still gets one column
        audio = torch.nn.functional.pad(audio, (0, n_fft - audio.shape[1]))
    hop = max(1, math.ceil(audio.shape[1] / max(1, options.max_width - 1)))  # frames = T // hop + 1
    hop = min(hop, n_fft)  # never skip samples between windows
    window = torch.hann_window(n_fft, periodic=True)
    # Reflect padding: zero padding would put a click (a broadband stripe) at both ends of every image.
    spec = torch.stft(audio, n_fft, hop_length=hop, window=window, center=True, pad_mode="reflect",
                      return_complex=True)  # (C, F, frames)
    power = (spec.abs() / (window.sum() / 2)).pow(2).mean(0)  # (F, frames), 1.0 = full-scale sine
    fb = mel_filterbank(n_fft // 2 + 1, options.n_mels, sample_rate, options.f_min, options.f_max)
    return 10.0 * torch.log10((fb @ power).clamp_min(1e-10))  # (M, frames)


FIGURE_PIXELS = (480, 220)
"""(width, height) of the spectrogram image: the plot, its time and frequency axes and the dB colour bar."""
_DPI = 100
_FREQ_TICKS_HZ = (50, 100, 200, 500, 1000, 2000, 4000, 8000, 16000)
"""Candidate frequency ticks in Hz (labelled ``500``, ``1k``, ...)."""


def _hz_label(hz: float) -> str:
    return f"{hz / 1000:g}k" if hz >= 1000 else f"{hz:g}"


def _frequency_ticks(f_min: float, f_max: float, min_gap: float) -> list[float]:
    """Tick frequencies in range, from the top down, dropping any closer than ``min_gap`` mel to the
    last one kept (low ticks crowd together on the mel scale)."""
    kept: list[float] = []
    for hz in sorted((hz for hz in _FREQ_TICKS_HZ if f_min <= hz <= f_max), reverse=True):
        if not kept or hz_to_mel(kept[-1]) - hz_to_mel(hz) >= min_gap:
            kept.append(hz)
    return kept[::-1]


def spectrogram_png(audio: torch.Tensor, sample_rate: int, options: SpectrogramOptions = SpectrogramOptions()) -> bytes:
    """PNG bytes of the mel spectrogram of ``audio`` (C, T) or (T,): time in seconds, frequency in Hz on
    the mel axis (low at the bottom), and a colour bar in dB re a full-scale sine over ``top_db``.

    Drawn with matplotlib's object API on the Agg canvas (no pyplot state, so threads and stages can
    draw at once); the image is always ``FIGURE_PIXELS`` so a page lays out before images load.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    db = mel_spectrogram_db(audio, sample_rate, options).numpy()  # (M, frames)
    samples = audio.shape[-1]
    f_max = sample_rate / 2 if options.f_max is None else options.f_max
    mel_lo, mel_hi = float(hz_to_mel(options.f_min)), float(hz_to_mel(f_max))
    top = float(db.max())
    fig = Figure(figsize=(FIGURE_PIXELS[0] / _DPI, FIGURE_PIXELS[1] / _DPI), dpi=_DPI)
    FigureCanvasAgg(fig)
    # Fixed margins instead of tight_layout: the same layout for every clip, and ~3x faster.
    ax = fig.add_axes((0.12, 0.2, 0.68, 0.74))
    bar = fig.add_axes((0.83, 0.2, 0.025, 0.74))
    image = ax.imshow(db, origin="lower", aspect="auto", cmap="magma", interpolation="nearest",
                      extent=(0.0, samples / sample_rate, mel_lo, mel_hi), vmin=top - options.top_db, vmax=top)
    ticks = _frequency_ticks(options.f_min, f_max, min_gap=(mel_hi - mel_lo) * 12 / (0.74 * FIGURE_PIXELS[1]))
    ax.set_yticks([float(hz_to_mel(hz)) for hz in ticks], [_hz_label(hz) for hz in ticks])
    ax.set_xlabel("time (s)", fontsize=8)
    ax.set_ylabel("frequency (Hz, mel scale)", fontsize=8)
    ax.tick_params(labelsize=7)
    colorbar = fig.colorbar(image, cax=bar)
    colorbar.set_label("dB", fontsize=8)
    colorbar.ax.tick_params(labelsize=7)
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=_DPI)
    return out.getvalue()
