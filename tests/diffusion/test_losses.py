"""Diffusion losses from training.loss_configs: values against hand computations, masks, validation."""
import math

import pytest
import torch

from pipeline.diffusion import DiffusionLoss, create_objective
from pipeline.config_training import parse_diffusion_losses

V = create_objective("v")


def _pair(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(3, 2, 6, generator=g), torch.randn(3, 2, 6, generator=g), torch.tensor([0.2, 0.5, 0.9])


def test_default_loss_is_sats_plain_mse():
    out, target, t = _pair()
    result = DiffusionLoss.from_config(None)(out, target, t, objective=V)
    assert torch.allclose(result.loss, ((out - target) ** 2).mean())
    assert list(result.terms) == ["mse_loss"]


def test_padding_mask_leaves_padded_frames_out_as_sats_masked_mean():
    out, target, t = _pair()
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[0, 4:] = False
    mask[2, 1:] = False
    result = DiffusionLoss.mse(mask_padding=True)(out, target, t, objective=V, padding_mask=mask)
    sat = ((out - target) ** 2)[mask[:, None, :].expand_as(out)].mean()  # SAT MSELoss: mse[mask].mean()
    assert torch.allclose(result.loss, sat)
    per_sample = torch.stack([((out[i] - target[i]) ** 2)[:, mask[i]].mean() for i in range(3)])
    assert torch.allclose(result.per_sample, per_sample)
    # Changing a padded frame changes nothing.
    out2 = out.clone()
    out2[2, :, 3] += 100.0
    assert torch.equal(DiffusionLoss.mse()(out2, target, t, objective=V, padding_mask=mask).loss, result.loss)


def test_l1_and_huber_terms_match_hand_formulas_and_are_weighted():
    out, target, t = _pair()
    loss = DiffusionLoss.from_config(parse_diffusion_losses({
        "l1": {"type": "l1", "weights": {"l1": 0.5}},
        "huber": {"type": "huber", "weights": {"huber": 2.0}, "config": {"delta": 0.3}},
    }))
    result = loss(out, target, t, objective=V)
    d = (out - target).abs()
    l1 = d.mean()
    huber = torch.where(d < 0.3, 0.5 * d ** 2, 0.3 * (d - 0.15)).mean()
    assert torch.allclose(result.terms["l1"], l1) and torch.allclose(result.terms["huber"], huber)
    assert torch.allclose(result.loss, 0.5 * l1 + 2.0 * huber)


def test_min_snr_weighting_for_v_is_min_snr_gamma_over_snr_plus_one():
    out, target, t = _pair()
    loss = DiffusionLoss.from_config(parse_diffusion_losses(
        {"mse": {"type": "mse", "config": {"timestep_weighting": "min_snr", "min_snr_gamma": 2.0}}}))
    snr = [math.cos(x * math.pi / 2) ** 2 / math.sin(x * math.pi / 2) ** 2 for x in t.tolist()]
    weights = torch.tensor([min(s, 2.0) / (s + 1) for s in snr])
    expected = (((out - target) ** 2) * weights[:, None, None]).mean()
    assert torch.allclose(loss(out, target, t, objective=V).loss, expected)


def test_min_snr_weighting_for_rectified_flow_scales_by_t_squared():
    out, target, t = _pair()
    loss = DiffusionLoss.from_config(parse_diffusion_losses({"mse": {"type": "mse",
                                                                     "config": {"timestep_weighting": "min_snr"}}}))
    snr = [((1 - x) / x) ** 2 for x in t.tolist()]
    weights = torch.tensor([min(s, 5.0) * x ** 2 for s, x in zip(snr, t.tolist())])
    expected = (((out - target) ** 2) * weights[:, None, None]).mean()
    assert torch.allclose(loss(out, target, t, objective=create_objective("rectified_flow")).loss, expected)


def test_padding_mask_for_step_follows_mask_padding_and_its_dropout():
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert DiffusionLoss.mse(mask_padding=False).padding_mask_for_step(mask) is None
    assert DiffusionLoss.mse(mask_padding=True).padding_mask_for_step(mask) is mask
    assert DiffusionLoss.mse(mask_padding=True, mask_padding_dropout=1.0).padding_mask_for_step(mask) is None
    half = DiffusionLoss.mse(mask_padding=True, mask_padding_dropout=0.25)
    g = torch.Generator().manual_seed(0)
    kept = [half.padding_mask_for_step(mask, g) is not None for _ in range(4000)]
    assert abs(sum(kept) / 4000 - 0.75) < 0.03
    g = torch.Generator().manual_seed(0)
    assert [half.padding_mask_for_step(mask, g) is not None for _ in range(4000)] == kept


@pytest.mark.parametrize("config, message", [
    ({"a": {"type": "mrstft"}}, r"loss_configs.a.type='mrstft': expected one of \['mse', 'l1', 'huber'\]"),
    ({"a": {"type": "mse", "weights": {"l1": 1.0}}}, r"loss_configs.a.weights=.*expected \{'mse': <number>\}"),
    ({"a": {"type": "mse", "config": {"delta": 0.1}}}, r"loss_configs.a.config: unknown keys \['delta'\]"),
    ({"a": {"type": "mse", "config": {"timestep_weighting": "snr"}}}, r"a.config.timestep_weighting='snr'"),
    ({"a": {"type": "mse", "config": {"min_snr_gamma": 3}}}, r"a.config.min_snr_gamma is set but"),
    ({"a": {"type": "huber", "config": {"delta": -1}}}, r"a.config.delta=-1: expected a number > 0"),
    ({"a": {"type": "l1", "scale": 2}}, r"loss_configs.a: unknown keys \['scale'\]"),
    ({}, r"loss_configs: expected at least one loss term"),
])
def test_invalid_loss_configs_are_errors_naming_the_key(config, message):
    with pytest.raises(ValueError, match=message):
        parse_diffusion_losses(config)


def test_mask_of_the_wrong_shape_is_an_error():
    out, target, t = _pair()
    with pytest.raises(ValueError, match=r"padding_mask \(3, 5\) must be \(B, T\)"):
        DiffusionLoss.mse()(out, target, t, objective=V, padding_mask=torch.ones(3, 5, dtype=torch.bool))
