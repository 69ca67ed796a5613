"""Generated audio to FLAC bytes: the one place that normalises and quantises.

SAT repeats "divide by the peak, clamp, multiply by 32767, cast to int16" a dozen times, and the cast
truncates toward zero. Here it is done once: optional peak normalisation, clamp to [-1, 1], round to
the nearest integer code, and write with soundfile (libsndfile) as 16- or 24-bit FLAC.
"""

from __future__ import annotations

import io

import numpy as np
import soundfile
import torch

BIT_DEPTHS = {16: ("PCM_16", np.int16), 24: ("PCM_24", np.int32)}


def peak_normalize(audio: torch.Tensor) -> torch.Tensor:
    """``audio / max|audio|`` (so the loudest sample is full scale); silence is returned unchanged."""
    peak = audio.abs().max()
    return audio / peak if peak > 0 else audio.clone()


def quantize(audio: torch.Tensor, bits: int = 16) -> np.ndarray:
    """(C, T) float in [-1, 1] -> (T, C) integer codes, rounded, clamped to ``±(2**(bits-1) - 1)``.

    24-bit codes are returned in an int32 array, as soundfile expects them for ``PCM_24`` (left-aligned:
    libsndfile keeps the top 24 bits, so the code is shifted up by 8).
    """
    if bits not in BIT_DEPTHS:
        raise ValueError(f"bits={bits}: expected one of {sorted(BIT_DEPTHS)}")
    if audio.ndim != 2:
        raise ValueError(f"quantize: expected audio of shape (channels, samples), got {tuple(audio.shape)}")
    full = 2 ** (bits - 1) - 1
    codes = torch.round(audio.detach().to("cpu", torch.float64).clamp(-1.0, 1.0) * full).to(torch.int64)
    codes = codes.T.contiguous().numpy()  # (T, C)
    return codes.astype(np.int16) if bits == 16 else (codes << 8).astype(np.int32)


def flac_bytes(audio: torch.Tensor, sample_rate: int, bits: int = 16, normalize: bool = True) -> bytes:
    """FLAC file bytes of ``audio`` (C, T) float; ``normalize`` peak-normalises first (SAT's demos do)."""
    audio = peak_normalize(audio) if normalize else audio
    buffer = io.BytesIO()
    soundfile.write(buffer, quantize(audio, bits), sample_rate, format="FLAC", subtype=BIT_DEPTHS[bits][0])
    return buffer.getvalue()
