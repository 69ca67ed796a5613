"""Pretransform interface: scale, attributes, SAT's `pretransform.model.*` layout, unsupported types."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.config import load_model_config, parse_pretransform
from pipeline.config_json import ConfigError, MissingPackageError
from pipeline.models.pretransforms import AutoencoderPretransform, create_pretransform_from_config

FIXTURES = Path(__file__).parents[1] / "fixtures"


def tiny_pretransform_block(scale: float = 1.0, **flags) -> dict:
    oobleck = {"channels": 4, "c_mults": [1, 2], "strides": [2, 4], "use_snake": True}
    return {"type": "autoencoder", "scale": scale, **flags,
            "config": {"encoder": {"type": "oobleck", "requires_grad": False,
                                   "config": {"in_channels": 1, "latent_dim": 6, **oobleck}},
                       "decoder": {"type": "oobleck", "config": {"out_channels": 1, "latent_dim": 3, **oobleck}},
                       "bottleneck": {"type": "vae"}, "latent_dim": 3, "downsampling_ratio": 8, "io_channels": 1}}


def build(block: dict, channels: int = 1):
    torch.manual_seed(0)
    return create_pretransform_from_config(parse_pretransform(block), sample_rate=16000, audio_channels=channels)


def test_autoencoder_pretransform_attributes_and_frozen_eval_state():
    pre = build(tiny_pretransform_block(scale=2.5, chunked=True, iterate_batch=True))
    assert isinstance(pre, AutoencoderPretransform)
    assert (pre.downsampling_ratio, pre.encoded_channels, pre.io_channels) == (8, 3, 1)
    assert (pre.scale, pre.chunked, pre.iterate_batch, pre.model_half) == (2.5, True, True, False)
    assert not pre.training and not any(p.requires_grad for p in pre.parameters())


def test_scale_divides_on_encode_and_multiplies_on_decode():
    pre = build(tiny_pretransform_block(scale=2.5))
    x = torch.randn(2, 1, 256)
    with torch.no_grad():
        latents = pre.encode(x, generator=torch.Generator().manual_seed(0))
        raw = pre.model.encode(x, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(latents, raw / 2.5)
        torch.testing.assert_close(pre.decode(latents), pre.model.decode(raw))
        mean, std = pre.encode_mean_std(x)  # unscaled, for pre_encode
        pre_bottleneck = pre.model.encode_pre_bottleneck(x)
        torch.testing.assert_close(mean, pre_bottleneck[:, :3])
        assert mean.shape == std.shape == (2, 3, 32) and (std > 0).all()


def test_model_half_runs_the_autoencoder_in_fp16_and_returns_the_input_dtype():
    pre = build(tiny_pretransform_block(model_half=True))
    assert next(pre.model.parameters()).dtype == torch.float16
    with torch.no_grad():
        latents = pre.encode(torch.randn(1, 1, 128))
        assert latents.dtype == torch.float32 and torch.isfinite(latents).all()
        assert pre.decode(latents).dtype == torch.float32


def test_patched_pretransform_round_trips():
    pre = build({"type": "patched", "config": {"channels": 2, "patch_size": 4}}, channels=2)
    x = torch.randn(2, 2, 32)
    z = pre.encode(x)
    assert z.shape == (2, 8, 8) and (pre.downsampling_ratio, pre.encoded_channels) == (4, 8)
    torch.testing.assert_close(pre.decode(z), x)


@pytest.mark.parametrize("kind, package", [("wavelet", "PyWavelets"), ("dac_pretrained", "descript-audio-codec"),
                                           ("audiocraft_pretrained", "audiocraft")])
def test_types_that_need_a_missing_package_name_it(kind, package):
    with pytest.raises(MissingPackageError, match=f"{kind}.*{package}"):
        build({"type": kind, "config": {}})


def test_io_channels_must_match_the_models_audio_channels():
    with pytest.raises(ConfigError, match="io_channels=1.*audio_channels=2"):
        build(tiny_pretransform_block(), channels=2)


def test_sao_pretransform_builds_on_meta_with_sats_full_model_keys():
    cfg = load_model_config(str(FIXTURES / "sat_configs" / "external" / "stable_audio_open_1_0.reconstructed.json"))
    holder = nn.Module()  # the diffusion wrapper holds it as `pretransform`, like SAT's
    with torch.device("meta"):
        holder.pretransform = create_pretransform_from_config(cfg.model.pretransform, cfg.sample_rate,
                                                              cfg.audio_channels)
    ref = json.loads((FIXTURES / "sat_ref" / "keys_sao.json").read_text())["keys"]
    expected = {k: v["shape"] for k, v in ref.items() if k.startswith("pretransform.")}
    assert {k: list(v.shape) for k, v in holder.state_dict().items()} == expected
    assert sum(p.numel() for p in holder.parameters()) == 156_112_514
    assert holder.pretransform.iterate_batch and holder.pretransform.downsampling_ratio == 2048
