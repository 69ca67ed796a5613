"""Objectives: noising, targets and their inverses against float64 closed forms and SAT's recorded values."""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.diffusion import DiffusionLoss, create_objective
from pipeline.diffusion.objectives import VObjective

REF = Path(__file__).parents[1] / "fixtures" / "sat_ref"


def _data(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 7, generator=g, dtype=dtype)
    noise = torch.randn(5, 3, 7, generator=g, dtype=dtype)
    t = torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=dtype)
    return x, noise, t


def test_v_objective_noise_and_target_match_float64_cosine_formulas():
    x, noise, t = _data()
    obj = create_objective("v")
    a = torch.cos(t.double() * math.pi / 2)[:, None, None]
    s = torch.sin(t.double() * math.pi / 2)[:, None, None]
    assert torch.allclose(obj.noise(x, t, noise).double(), a * x.double() + s * noise.double(), atol=1e-6)
    assert torch.allclose(obj.target(x, noise, t).double(), noise.double() * a - x.double() * s, atol=1e-6)


def test_rectified_flow_noise_and_target_match_float64_formulas():
    x, noise, t = _data()
    obj = create_objective("rectified_flow")
    tt = t.double()[:, None, None]
    assert torch.allclose(obj.noise(x, t, noise).double(), (1 - tt) * x.double() + tt * noise.double(), atol=1e-6)
    assert torch.equal(obj.target(x, noise, t), noise - x)


@pytest.mark.parametrize("name", ["v", "rectified_flow"])
def test_denoised_and_noise_from_the_true_target_give_back_data_and_noise(name):
    x, noise, t = _data(torch.float64)
    obj = create_objective(name)
    x_t, target = obj.noise(x, t, noise), obj.target(x, noise, t)
    assert torch.allclose(obj.denoised_from_output(x_t, t, target), x, atol=1e-12)
    assert torch.allclose(obj.noise_from_output(x_t, t, target), noise, atol=1e-12)


@pytest.mark.parametrize("name", ["v", "rectified_flow"])
def test_output_scale_is_how_an_output_error_moves_the_data_estimate(name):
    x, noise, t = _data(torch.float64)
    obj = create_objective(name)
    x_t, out = obj.noise(x, t, noise), obj.target(x, noise, t)
    moved = obj.denoised_from_output(x_t, t, out + 1.0) - obj.denoised_from_output(x_t, t, out)
    assert torch.allclose(moved, -obj.output_scale(t)[:, None, None].expand_as(moved), atol=1e-12)


def test_v_objective_reproduces_sat_alphas_sigmas_and_t_roundtrip():
    ref = load_file(REF / "ref_v_objective.safetensors")
    alpha, sigma = VObjective().alpha_sigma(ref["in.t"])
    assert alpha.dtype == torch.float32
    assert (alpha - ref["out.alphas"]).abs().max() <= 1e-7
    assert (sigma - ref["out.sigmas"]).abs().max() <= 1e-7
    t = VObjective.t_from_alpha_sigma(ref["out.alphas"], ref["out.sigmas"])
    assert (t - ref["out.t_roundtrip"]).abs().max() <= 1e-7


def test_coefficients_stay_float32_under_bfloat16_autocast():
    x, noise, t = _data()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        alpha, sigma = create_objective("v").alpha_sigma(t)
    assert alpha.dtype == torch.float32 and sigma.dtype == torch.float32


def test_loss_helper_scores_model_output_against_target_with_mse():
    x, noise, t = _data()
    obj = create_objective("v")
    seen = {}

    def model_fn(x_t, tt):
        seen["x_t"], seen["t"] = x_t, tt
        return torch.zeros_like(x_t)
    out = obj.loss(model_fn, x, t, noise)
    assert torch.allclose(seen["x_t"], obj.noise(x, t, noise)) and torch.equal(seen["t"], t)
    expected = obj.target(x, noise, t).pow(2).mean()
    assert torch.allclose(out.loss, expected) and torch.allclose(out.terms["mse_loss"], expected)
    assert torch.allclose(out.per_sample, obj.target(x, noise, t).pow(2).mean(dim=(1, 2)))
    explicit = obj.loss(model_fn, x, t, noise, loss_fn=DiffusionLoss.mse())
    assert torch.equal(explicit.loss, out.loss)


def test_unknown_objective_is_an_error_listing_the_known_ones():
    with pytest.raises(ValueError, match=r"'eps'.*\['rectified_flow', 'v'\]"):
        create_objective("eps")
