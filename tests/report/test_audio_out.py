"""Normalise and quantise once; FLAC files read back to the exact integer codes."""
from __future__ import annotations

import io

import numpy as np
import pytest
import soundfile
import torch

from pipeline.report.audio_out import flac_bytes, peak_normalize, quantize


def test_quantize_rounds_to_nearest_code_and_clamps():
    audio = torch.tensor([[0.0, 1.0, -1.0, 1.5, -2.0, 0.6 / 32767, 0.4 / 32767, -0.6 / 32767]])
    np.testing.assert_array_equal(quantize(audio, 16)[:, 0], [0, 32767, -32767, 32767, -32767, 1, 0, -1])
    codes24 = quantize(audio, 24)[:, 0] >> 8
    np.testing.assert_array_equal(codes24[:5], [0, 8388607, -8388607, 8388607, -8388607])


def test_peak_normalize_makes_the_loudest_sample_full_scale_and_leaves_silence_alone():
    audio = torch.tensor([[0.1, -0.25], [0.05, 0.2]])
    torch.testing.assert_close(peak_normalize(audio), audio / 0.25)
    silence = torch.zeros(2, 4)
    assert torch.equal(peak_normalize(silence), silence)


@pytest.mark.parametrize("bits", [16, 24])
def test_flac_round_trip_is_bit_exact(bits):
    audio = torch.rand(2, 3000, generator=torch.Generator().manual_seed(0)) * 1.6 - 0.8
    data = flac_bytes(audio, 16000, bits=bits, normalize=False)
    read, rate = soundfile.read(io.BytesIO(data), dtype="int32")
    info = soundfile.info(io.BytesIO(data))
    assert rate == 16000 and info.format == "FLAC" and info.subtype == f"PCM_{bits}" and info.channels == 2
    np.testing.assert_array_equal(read >> (32 - bits), quantize(audio, bits) >> (0 if bits == 16 else 8))


def test_flac_is_peak_normalised_by_default():
    audio = torch.tensor([[0.0, 0.25, -0.5]]).repeat(1, 100)
    read, _ = soundfile.read(io.BytesIO(flac_bytes(audio, 8000)), dtype="int16")
    assert np.abs(read).max() == 32767
