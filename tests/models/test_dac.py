"""SAT's `dac` encoder/decoder types (Stable Audio 1.0's VAE), written in Cantus: shapes, blocks, config errors.

The full-size key layouts against SAT's are in test_sat_reference.py.
"""

import math

import pytest
import torch

from pipeline.config_json import ConfigError
from pipeline.models.factory import create_autoencoder_from_config
from pipeline.models.blocks import Snake1d
from pipeline.models.dac import DACEncoderWrapper, DACResidualUnit


def tiny_dac_vae_config(**decoder) -> dict:
    """Stereo, 8x downsampling (strides 2, 4), 4 latent channels."""
    return {"model_type": "autoencoder", "sample_size": 64, "sample_rate": 16000, "audio_channels": 2,
            "model": {"encoder": {"type": "dac", "config": {"in_channels": 2, "latent_dim": 8, "d_model": 4,
                                                            "strides": [2, 4]}},
                      "decoder": {"type": "dac", "config": {"out_channels": 2, "latent_dim": 4, "channels": 16,
                                                            "rates": [4, 2], **decoder}},
                      "bottleneck": {"type": "vae"}, "latent_dim": 4, "downsampling_ratio": 8, "io_channels": 2}}


def test_tiny_dac_vae_encodes_and_decodes_with_the_ratios_shapes():
    torch.manual_seed(0)
    vae = create_autoencoder_from_config(tiny_dac_vae_config())
    x = torch.randn(3, 2, 64)
    with torch.no_grad():
        latents, info = vae.encode(x, return_info=True, generator=torch.Generator().manual_seed(0))
        audio = vae.decode(latents)
    assert info["pre_bottleneck_latents"].shape == (3, 8, 8)  # mean and scale of 4 latent channels
    assert latents.shape == (3, 4, 8)
    assert audio.shape == (3, 2, 64)
    assert audio.abs().max() <= 1.0  # DAC's decoder ends in tanh
    assert torch.isfinite(audio).all()


def test_encoder_without_latent_dim_outputs_its_own_width():
    encoder = DACEncoderWrapper(in_channels=1, d_model=4, strides=[2, 2, 2])
    assert isinstance(encoder.proj_out, torch.nn.Identity)
    assert encoder(torch.randn(1, 1, 32)).shape == (1, 4 * 2 ** 3, 4)


def test_snake_is_x_plus_sin_squared_over_alpha():
    snake = Snake1d(2)
    with torch.no_grad():
        snake.alpha.copy_(torch.tensor([[[1.0], [2.0]]]))
    x = torch.full((1, 2, 1), 0.5)
    expected = torch.tensor([0.5 + math.sin(0.5) ** 2, 0.5 + math.sin(1.0) ** 2 / 2]).view(1, 2, 1)
    torch.testing.assert_close(snake(x), expected)


def test_residual_unit_adds_its_branch_to_the_input():
    unit = DACResidualUnit(3, dilation=9)
    x = torch.randn(2, 3, 40)
    with torch.no_grad():
        branch = unit.block(x)
        torch.testing.assert_close(unit(x), x + branch)
        unit.block[3].weight_g.zero_()
        unit.block[3].bias.zero_()
        torch.testing.assert_close(unit(x), x)  # a zero last conv leaves the input unchanged


def test_a_missing_decoder_argument_names_the_key_path():
    config = tiny_dac_vae_config()
    del config["model"]["decoder"]["config"]["rates"]
    with pytest.raises(ConfigError, match=r"model\.decoder\.config: 'dac' needs \['rates'\]"):
        create_autoencoder_from_config(config)
