"""Oobleck autoencoder: SAT's layout, closed-form blocks, chunked processing, weight-norm folding."""

import json
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from pipeline.config import load_model_config
from pipeline.config_json import ConfigError, MissingPackageError
from pipeline.models.factory import create_autoencoder_from_config
from pipeline.models.blocks import SnakeBeta, WNConv1d, WNConvTranspose1d, fold_weight_norm
from pipeline.models.bottlenecks import VAE_STD_FLOOR, VAEBottleneck, create_bottleneck, vae_mean_std

FIXTURES = Path(__file__).parents[1] / "fixtures"
AUTOENCODERS = FIXTURES / "sat_configs" / "model_configs" / "autoencoders"


def tiny_vae_config(**decoder_extra) -> dict:
    """8x downsampling, 4 latent channels: small enough to run anything on a CPU in milliseconds."""
    oobleck = {"channels": 4, "c_mults": [1, 2], "strides": [2, 4], "use_snake": True}
    return {"model_type": "autoencoder", "sample_size": 2048, "sample_rate": 16000, "audio_channels": 2,
            "model": {"encoder": {"type": "oobleck", "config": {"in_channels": 2, "latent_dim": 8, **oobleck}},
                      "decoder": {"type": "oobleck", "config": {"out_channels": 2, "latent_dim": 4, "final_tanh": False,
                                                                **oobleck, **decoder_extra}},
                      "bottleneck": {"type": "vae"}, "latent_dim": 4, "downsampling_ratio": 8, "io_channels": 2}}


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return create_autoencoder_from_config(tiny_vae_config()).eval()


def test_sao_vae_builds_on_meta_with_sats_keys_and_shapes():
    with torch.device("meta"):
        model = create_autoencoder_from_config(str(AUTOENCODERS / "stable_audio_2_0_vae.json"))
    ref = json.loads((FIXTURES / "sat_ref" / "keys_sa2_vae.json").read_text())
    state = model.state_dict()
    assert set(state) == set(ref["keys"])
    assert {k: list(v.shape) for k, v in state.items()} == {k: v["shape"] for k, v in ref["keys"].items()}
    assert sum(p.numel() for p in model.parameters()) == ref["total_params"] == 156_112_514


def test_a_sat_config_whose_part_wraps_a_missing_package_says_what_and_which_package():
    cfg = load_model_config(str(AUTOENCODERS / "encodec_musicgen_rvq.json"))
    assert cfg.model.autoencoder is not None
    with pytest.raises(MissingPackageError, match=r"model\.encoder\.type='seanet' is EnCodec's SEANet.*`encodec`"), \
            torch.device("meta"):
        create_autoencoder_from_config(cfg)


@pytest.mark.parametrize("kind, package", [("rvq", "vector-quantize-pytorch"), ("dac_rvq", "descript-audio-codec")])
def test_bottlenecks_that_wrap_a_missing_package_name_it(kind, package):
    with pytest.raises(MissingPackageError, match=f"model.bottleneck.type='{kind}'.*`{package}`"):
        create_bottleneck(kind, {})


def test_the_mono_dac_vae_config_builds_with_its_latent_widths():
    with torch.device("meta"):
        model = create_autoencoder_from_config(load_model_config(str(AUTOENCODERS / "dac_2048_32_vae.json")))
    state = model.state_dict()
    assert state["encoder.encoder.block.0.weight_v"].shape == (128, 1, 7)  # mono input
    assert state["encoder.proj_out.weight"].shape == (64, 2048, 1)  # mean and scale of 32 latents
    assert state["decoder.decoder.model.0.weight_v"].shape == (1536, 32, 7)


def test_unknown_encoder_argument_names_the_key_path():
    config = tiny_vae_config()
    config["model"]["encoder"]["config"]["chanels"] = 4
    with pytest.raises(ConfigError, match=r"model\.encoder\.config.*chanels"):
        create_autoencoder_from_config(config)


def test_shapes_follow_the_downsampling_ratio(vae):
    x = torch.randn(3, 2, 256)
    latents, info = vae.encode(x, return_info=True)
    assert latents.shape == (3, 4, 32) and info["pre_bottleneck_latents"].shape == (3, 8, 32)
    assert vae.decode(latents).shape == (3, 2, 256)


def test_nearest_upsample_decoder_has_sats_layout():
    model = create_autoencoder_from_config(tiny_vae_config(use_nearest_upsample=True))
    keys = set(model.decoder.state_dict())
    assert "layers.1.layers.1.1.weight_v" in keys and "layers.1.layers.1.1.bias" not in keys
    assert model.decode(torch.randn(1, 4, 5)).shape == (1, 2, 40)


def test_snake_beta_matches_its_formula_in_float64():
    snake = SnakeBeta(3).double()
    with torch.no_grad():
        snake.alpha.copy_(torch.tensor([0.0, 0.5, -1.0]))
        snake.beta.copy_(torch.tensor([0.3, -0.2, 0.0]))
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    a, b = snake.alpha.exp()[:, None], snake.beta.exp()[:, None]
    # SAT divides by beta + 1e-9.
    torch.testing.assert_close(snake(x), x + torch.sin(a * x) ** 2 / (b + 1e-9), atol=1e-12, rtol=1e-9)


def test_weight_norm_conv_matches_g_times_unit_direction():
    conv = WNConv1d(3, 5, kernel_size=4).double()
    with torch.no_grad():
        conv.weight_g.mul_(torch.rand_like(conv.weight_g) + 0.5)
    v, g = conv.weight_v, conv.weight_g
    weight = g * v / v.flatten(1).norm(dim=1)[:, None, None]
    x = torch.randn(2, 3, 11, dtype=torch.float64)
    torch.testing.assert_close(conv(x), F.conv1d(x, weight, conv.bias))
    assert g.shape == (5, 1, 1) and WNConvTranspose1d(6, 3, kernel_size=4).weight_g.shape == (6, 1, 1)


def test_vae_bottleneck_std_kl_and_sampling():
    x = torch.randn(2, 6, 9, dtype=torch.float64)
    mean, std = vae_mean_std(x)
    torch.testing.assert_close(std, torch.log1p(torch.exp(x[:, 3:])) + VAE_STD_FLOOR)
    first, info = VAEBottleneck().encode(x, generator=torch.Generator().manual_seed(1))
    again, _ = VAEBottleneck().encode(x, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    torch.testing.assert_close(first, mean + std * noise)
    assert torch.equal(first, again)
    kl = (mean ** 2 + std ** 2 - torch.log(std ** 2) - 1).sum(1).mean()
    torch.testing.assert_close(info["kl"], kl)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_chunked_encode_and_decode_equal_unchunked(vae):
    # 300 latent frames in windows of 96 with overlap 48: 5 windows, the last aligned to the end. Each kept
    # frame has >= 24 frames of context per side, more than this model's receptive field (~17 frames).
    x = torch.randn(2, 2, 300 * 8)
    with torch.no_grad():
        whole = vae.encode_pre_bottleneck(x)
        chunked = vae.encode_pre_bottleneck(x, chunked=True, chunk_size=96, overlap=48)
        assert _relative_error(chunked, whole) < 1e-4
        sampled_whole = vae.encode(x, generator=torch.Generator().manual_seed(3))
        sampled_chunked = vae.encode(x, chunked=True, chunk_size=96, overlap=48,
                                     generator=torch.Generator().manual_seed(3))
        assert _relative_error(sampled_chunked, sampled_whole) < 1e-4
        audio = vae.decode(sampled_whole)
        audio_chunked = vae.decode(sampled_whole, chunked=True, chunk_size=96, overlap=48)
        assert _relative_error(audio_chunked, audio) < 1e-4
        # Without overlap the seams show: the check above can fail.
        assert _relative_error(vae.decode(sampled_whole, chunked=True, chunk_size=96, overlap=0), audio) > 1e-3


def test_chunked_input_shorter_than_a_window_is_encoded_whole(vae):
    x = torch.randn(1, 2, 64)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode_pre_bottleneck(x, chunked=True), vae.encode_pre_bottleneck(x))


def test_iterate_batch_equals_batched(vae):
    x = torch.randn(3, 2, 128)
    with torch.no_grad():
        torch.testing.assert_close(vae.encode_pre_bottleneck(x, iterate_batch=True), vae.encode_pre_bottleneck(x),
                                   atol=1e-6, rtol=1e-5)


def test_folded_weight_norm_equals_the_original(vae):
    folded = fold_weight_norm(vae)
    assert not any(k.endswith(("weight_g", "weight_v")) for k in folded.state_dict())
    assert any(k.endswith("weight_g") for k in vae.state_dict())  # the original is left as it was
    x = torch.randn(2, 2, 512)
    with torch.no_grad():
        torch.testing.assert_close(folded.encode_pre_bottleneck(x), vae.encode_pre_bottleneck(x), atol=1e-6, rtol=0)
        z = torch.randn(2, 4, 64)
        torch.testing.assert_close(folded.decode(z), vae.decode(z), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_folded_model_runs_in_half_precision(vae, dtype):
    folded = fold_weight_norm(vae).to(dtype)
    x = torch.randn(1, 2, 512)
    with torch.no_grad():
        reference = vae.encode_pre_bottleneck(x)
        low = folded.encode_pre_bottleneck(x.to(dtype))
        assert low.dtype == dtype and torch.isfinite(low).all()
        assert _relative_error(low.float(), reference) < 5e-2
        assert torch.isfinite(folded.decode(low[:, :4])).all()


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = create_autoencoder_from_config(tiny_vae_config()).train()
    x = torch.randn(1, 2, 128)

    def grads():
        model.zero_grad()
        model.decode(model.encode_pre_bottleneck(x)[:, :4]).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.set_gradient_checkpointing(True)
    for a, b in zip(plain, grads()):
        torch.testing.assert_close(a, b)
