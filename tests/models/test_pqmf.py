"""PQMF filter bank and pretransform against SAT's recorded outputs (tests/fixtures/sat_ref/ref_pqmf.*)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import parse_pretransform
from pipeline.models.pqmf import PQMF
from pipeline.models.pretransforms import PQMFPretransform, create_pretransform_from_config

REF = Path(__file__).parents[1] / "fixtures" / "sat_ref"


@pytest.fixture(scope="module")
def ref():
    return load_file(REF / "ref_pqmf.safetensors")


@pytest.fixture(scope="module")
def pretransform(ref):
    config = parse_pretransform(json.loads((REF / "cfg_pqmf.json").read_text()))
    pre = create_pretransform_from_config(config, sample_rate=44100, audio_channels=1)
    pre.load_state_dict({k.removeprefix("sd."): v for k, v in ref.items() if k.startswith("sd.")}, strict=True)
    return pre


def test_designed_filters_equal_sats_buffers(ref):
    pqmf = PQMF(attenuation=100, num_bands=4)
    torch.testing.assert_close(pqmf.prototype, ref["sd.pqmf.prototype"], atol=1e-6, rtol=0)
    torch.testing.assert_close(pqmf.filter_bank, ref["sd.pqmf.filter_bank"], atol=1e-6, rtol=0)


def test_encode_and_decode_reproduce_sat(pretransform, ref):
    assert isinstance(pretransform, PQMFPretransform)
    assert (pretransform.downsampling_ratio, pretransform.encoded_channels) == (4, 4)
    encoded = pretransform.encode(ref["in.signal"])
    torch.testing.assert_close(encoded, ref["out.encode"], atol=1e-5, rtol=0)
    torch.testing.assert_close(pretransform.decode(ref["out.encode"]), ref["out.decode"], atol=1e-5, rtol=0)


def test_analysis_then_synthesis_nearly_reconstructs_a_tone():
    pqmf = PQMF(attenuation=100, num_bands=4)
    t = torch.arange(4096, dtype=torch.float32)
    x = torch.sin(2 * torch.pi * 440 / 16000 * t)[None, None]
    y = pqmf.inverse(pqmf(x))
    # A PQMF is near-perfect reconstruction up to a delay of (filter length - 1) samples.
    delay = min(range(256), key=lambda d: (y[..., d + 512:d + 3072] - x[..., 512:3072]).abs().mean().item())
    error = (y[..., delay + 512:delay + 3072] - x[..., 512:3072]).abs().max()
    assert error < 1e-2, f"reconstruction error {error:.2e} at delay {delay}"


def test_num_bands_must_be_a_power_of_two():
    with pytest.raises(ValueError, match="power of 2"):
        PQMF(attenuation=100, num_bands=6)
