"""Dance Diffusion U-Net (`DAU1d`): SAT 0.0.16 / sample-generator layout and outputs, conditioning, training."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.dance_unet import (DAU1DCondWrapper, DAU1DUncond, DiffusionAttnUnet1D,
                                        sample_generator_state_dict)
from pipeline.models.factory import create_model_from_config

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
DANCE_CONFIGS = sorted((FIXTURES / "sat_configs/model_configs/dance_diffusion").glob("*.json"))


def derived_param_count(io_channels=2, depth=14, n_attn_layers=6, channels=(128, 128, 256, 256) + (512,) * 10,
                        cond_dim=0, cond_noise_aug=False, kernel_size=5, conv_bias=True, use_snake=False) -> int:
    """Parameters of SAT 0.0.16's `DiffusionAttnUnet1D` (models/diffusion.py + models/blocks.py), counted by hand
    for the fixed cubic resampler (whose kernels are buffers, not parameters):
    - FourierFeatures(1, 16): a (8, 1) matrix;
    - ResConvBlock(i, m, o): conv i->m (k taps, bias), GroupNorm(1, m) (2m), activation (GELU: 0; Snake: m),
      conv m->o, then unless last GroupNorm(1, o) and activation; a bias-free 1x1 skip i->o when i != o;
    - SelfAttention1d(c): GroupNorm (2c), 1x1 qkv conv c->3c with bias, 1x1 out conv c->c with bias;
    - level i = depth..2 (c = channels[i-1], p = channels[i-2]; attention when i >= depth - n_attn_layers):
      ResConv(p,c,c), 2 x ResConv(c,c,c), ResConv(2c or c at the innermost level, c, c), ResConv(c,c,c),
      ResConv(c,c,p); attention after each: 5 x Attn(c) + Attn(p);
    - outer level: ResConv(io + cond_dim + 16 (32 with cond_noise_aug), c0, c0), 2 x ResConv(c0,c0,c0),
      ResConv(2 c0, c0, c0), ResConv(c0,c0,c0), ResConv(c0, c0, io, last)."""
    def conv(i, o):
        return i * o * kernel_size + (o if conv_bias else 0)

    def res(i, m, o, last=False):
        n = conv(i, m) + 2 * m + (m if use_snake else 0) + conv(m, o)
        n += 0 if last else 2 * o + (o if use_snake else 0)
        return n + (i * o if i != o else 0)

    def attn(c):
        return 2 * c + (c * 3 * c + 3 * c) + (c * c + c)

    total = 8
    for i in range(depth, 1, -1):
        c, p = channels[i - 1], channels[i - 2]
        total += res(p, c, c) + 2 * res(c, c, c) + res(c if i == depth else 2 * c, c, c) + res(c, c, c) + res(c, c, p)
        if n_attn_layers > 0 and i >= depth - n_attn_layers:
            total += 5 * attn(c) + attn(p)
    c = channels[0]
    embed = 32 if cond_noise_aug else 16
    return total + res(io_channels + cond_dim + embed, c, c) + 2 * res(c, c, c) + res(2 * c, c, c) + res(c, c, c) \
        + res(c, c, io_channels, last=True)


# 221,389,322 for the dance_diffusion configs (n_attn_layers 5, every other argument at its default).
DANCE_PARAMS = derived_param_count(n_attn_layers=5)


@pytest.mark.parametrize("path", DANCE_CONFIGS, ids=lambda p: p.stem)
def test_dance_diffusion_configs_build_on_meta_with_the_sat_0016_layout(path):
    layout = json.loads((FIXTURES / "unet1d/keys_dau.json").read_text())
    with torch.device("meta"):
        model = create_model_from_config(str(path))
    assert isinstance(model.model, DAU1DUncond)
    assert {k: list(v.shape) for k, v in model.model.state_dict().items()} == layout["keys"]
    params = sum(p.numel() for p in model.parameters())
    assert params == DANCE_PARAMS == layout["total_params"] == 221_389_322
    assert model.min_input_length == 2 ** 13


@pytest.mark.parametrize("kwargs", [
    dict(depth=5, n_attn_layers=2, channels=[8, 32, 32, 64, 64], cond_dim=3),
    dict(depth=4, n_attn_layers=0, channels=[8, 8, 16, 16], kernel_size=3, conv_bias=False, use_snake=True,
         cond_dim=2, cond_noise_aug=True),
])
def test_parameter_count_follows_the_derivation_for_other_settings(kwargs):
    with torch.device("meta"):
        model = DiffusionAttnUnet1D(io_channels=2, **kwargs)
    assert sum(p.numel() for p in model.parameters()) == derived_param_count(io_channels=2, **kwargs)


@pytest.fixture(scope="module")
def dau_ref():
    return load_file(str(FIXTURES / "unet1d/ref_dau.safetensors"))


def test_conditional_dau_matches_sat_0016_output(dau_ref):
    config = json.loads((FIXTURES / "unet1d/ref_dau.json").read_text())["dau_config"]
    model = DiffusionAttnUnet1D(**config)
    model.load_state_dict({k[len("sd_dau."):]: v for k, v in dau_ref.items() if k.startswith("sd_dau.")}, strict=True)
    with torch.no_grad():
        out = model(dau_ref["in.x"], dau_ref["in.t"], cond=dau_ref["in.cond"])  # cond at half length
    torch.testing.assert_close(out, dau_ref["out.dau_cond"], rtol=1e-4, atol=1e-5)


def test_sample_generator_checkpoint_loads_strictly_and_reproduces_its_output(dau_ref):
    checkpoint = {k[len("sg."):]: v for k, v in dau_ref.items() if k.startswith("sg.")}
    state = sample_generator_state_dict(checkpoint, use_ema=True)
    model = DAU1DUncond(io_channels=2, depth=3, n_attn_layers=0, channels=[8, 16, 16])
    model.load_state_dict({k[len("model."):]: v for k, v in state.items()}, strict=True)
    with torch.no_grad():
        out = model(dau_ref["in.x"], dau_ref["in.t"])
    torch.testing.assert_close(out, dau_ref["out.sg"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="no key starts with 'diffusion.'"):
        sample_generator_state_dict(state, use_ema=False)


def test_scaled_dance_config_keeps_the_key_structure_and_overfits_one_batch():
    """The dance_diffusion network with 1/16 of the widths: same 14 levels, same width changes, same
    attention levels, so the same keys; at its shortest length (3 x 2^13)."""
    with torch.device("meta"):
        full = DAU1DUncond(n_attn_layers=5)
    torch.manual_seed(0)
    model = DAU1DUncond(n_attn_layers=5, channels=[8, 8, 16, 16] + [32] * 10)
    assert set(model.state_dict()) == set(full.state_dict())
    x, t = torch.randn(1, 2, 3 * 2 ** 13), torch.rand(1)
    target = x  # the batch's mapping to learn: reproduce the input (the net starts near zero output)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    losses = []
    for _ in range(20):
        loss = ((model(x, t, cfg_dropout_prob=0.1) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::5]


def test_conditional_dau_uses_its_global_and_input_concat_conditioning():
    torch.manual_seed(0)
    # cond_dim = 1 input-concat channel + 3 global features, broadcast along time.
    model = DAU1DCondWrapper(io_channels=2, depth=3, n_attn_layers=1, channels=[32, 32, 32], cond_dim=4)
    x, t = torch.randn(1, 2, 16).expand(2, -1, -1), torch.full((2,), 0.5)
    glob = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    concat = torch.randn(1, 1, 8).expand(2, -1, -1)  # the same for both items, half length
    with torch.no_grad():
        out = model(x, t, global_cond=glob, input_concat_cond=concat)
        other_concat = model(x, t, global_cond=glob, input_concat_cond=-concat)
    assert (out[0] - out[1]).abs().max() > 1e-4  # only the global condition differs between the items
    assert (out - other_concat).abs().max() > 1e-4
    target = torch.randn(1, 2, 16) * torch.tensor([1.0, -1.0]).view(2, 1, 1)  # opposite targets, same input
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = ((model(x, t, global_cond=glob, input_concat_cond=concat) - target) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    floor = (target ** 2).mean().item()  # the best any model ignoring the global condition can do
    assert loss.item() < 0.5 * floor, (loss.item(), floor)


def test_dau_in_diffusion_cond_builds_from_the_factory_with_input_concat_and_global_ids():
    raw = {"model_type": "diffusion_cond", "sample_size": 48, "sample_rate": 16000,
           "model": {"io_channels": 2,
                     "conditioning": {"cond_dim": 3, "configs": [
                         {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 10}}]},
                     "diffusion": {"type": "DAU1d", "global_cond_ids": ["seconds_total"],
                                   "config": {"io_channels": 2, "depth": 3, "n_attn_layers": 0,
                                              "channels": [8, 16, 16], "cond_dim": 3}}},
           "training": {"learning_rate": 1e-4}}
    model = create_model_from_config(raw)
    assert isinstance(model.model, DAU1DCondWrapper) and model.min_input_length == 4
    cond = model.conditioner([{"seconds_total": 3.0}, {"seconds_total": 9.0}], "cpu")
    with torch.no_grad():
        out = model(torch.zeros(2, 2, 48), torch.full((2,), 0.5), cond)
    assert out.shape == (2, 2, 48) and (out[0] - out[1]).abs().max() > 1e-6


def test_lengths_that_do_not_divide_or_are_too_short_name_the_minimum_length():
    model = DiffusionAttnUnet1D(io_channels=2, depth=4, n_attn_layers=0, channels=[8, 8, 8, 8])
    for length in (30, 16):
        with pytest.raises(ValueError, match=r"multiple of 8 .* at least 24; the minimum length is 24"):
            model(torch.randn(1, 2, length), torch.rand(1))
    assert model(torch.randn(1, 2, 24), torch.rand(1)).shape == (1, 2, 24)


def test_conditioning_width_mismatch_names_cond_dim():
    model = DAU1DCondWrapper(io_channels=2, depth=3, n_attn_layers=0, channels=[8, 8, 8], cond_dim=4)
    with pytest.raises(ValueError, match="conditioning has 3 channels, the config's cond_dim is 4"):
        model(torch.randn(1, 2, 16), torch.rand(1), global_cond=torch.randn(1, 3))
    with pytest.raises(ValueError, match="cond_dim 4 but was given no conditioning"):
        model(torch.randn(1, 2, 16), torch.rand(1))
