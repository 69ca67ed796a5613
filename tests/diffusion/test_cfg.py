"""Classifier-free guidance combination (the model wrapper's batched passes are tested in models/)."""
import pytest
import torch

from pipeline.diffusion import Guidance, RectifiedFlowObjective, VObjective, apply_cfg, guide


def _outs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 9, generator=g), torch.randn(2, 4, 9, generator=g)


def test_cfg_scale_one_is_exactly_the_conditional_prediction():
    cond, uncond = _outs()
    assert torch.equal(apply_cfg(cond, uncond, 1.0), cond)
    assert torch.equal(apply_cfg(cond, uncond, 1.0, scale_phi=0.7), cond)


def test_cfg_extrapolates_from_unconditional_towards_conditional():
    cond, uncond = _outs()
    assert torch.allclose(apply_cfg(cond, uncond, 3.0), uncond + 3.0 * (cond - uncond))
    assert torch.equal(apply_cfg(cond, uncond, 0.0), uncond)


def test_cfg_rescale_matches_the_std_over_channels_as_sat_does():
    cond, uncond = _outs()
    guided = uncond + (cond - uncond) * 3.0
    ratio = cond.double().std(dim=1, keepdim=True) / guided.double().std(dim=1, keepdim=True)
    expected = 0.5 * guided.double() * ratio + 0.5 * guided.double()
    assert torch.allclose(apply_cfg(cond, uncond, 3.0, scale_phi=0.5).double(), expected, atol=1e-6)
    full = apply_cfg(cond, uncond, 3.0, scale_phi=1.0)
    assert torch.allclose(full.std(dim=1), cond.std(dim=1), atol=1e-5)


def test_outside_the_cfg_interval_the_result_is_the_conditional_output_selected_on_the_device():
    cond, uncond = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    guided = apply_cfg(cond, uncond, 3.0)
    assert torch.equal(apply_cfg(cond, uncond, 3.0, interval=(0.2, 0.8), sigma=torch.tensor(0.5)), guided)
    assert torch.equal(apply_cfg(cond, uncond, 3.0, interval=(0.2, 0.8), sigma=torch.tensor(0.9)), cond)
    with pytest.raises(ValueError, match=r"cfg_interval=\(0.2, 0.8\) needs the noise level"):
        apply_cfg(cond, uncond, 3.0, interval=(0.2, 0.8))


def test_guide_places_the_interval_on_the_objectives_sigma_of_row_zero():
    cond, uncond = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    v = Guidance(scale=3.0, interval=(0.0, 0.9), sigma=VObjective().sigma)  # sin(0.8 * pi / 2) = 0.951
    rf = Guidance(scale=3.0, interval=(0.0, 0.9), sigma=RectifiedFlowObjective().sigma)
    t = torch.tensor([0.8, 0.1])
    assert torch.equal(guide(cond, uncond, v, t), cond)
    assert torch.equal(guide(cond, uncond, rf, t), apply_cfg(cond, uncond, 3.0))
