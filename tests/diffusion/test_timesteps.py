"""Timestep samplers follow their distributions (scipy KS tests, fixed seeds) and SAT's forms."""
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import expit, logit

from pipeline.diffusion import DistributionShift, create_distribution_shift, create_timestep_sampler

N = 20000
P_MIN = 1e-3


def _draw(name, options=None, n=N, seed=0):
    sampler = create_timestep_sampler(name, options)
    t = sampler(n, generator=torch.Generator().manual_seed(seed))
    assert t.shape == (n,) and t.dtype == torch.float32
    return t.double().numpy()


def test_uniform_is_scrambled_sobol_and_uniform_on_the_unit_interval():
    t = _draw("uniform")
    assert stats.kstest(t, "uniform").pvalue > P_MIN
    # Low discrepancy: 1024 Sobol points fill 1024 equal bins exactly once each.
    first = create_timestep_sampler("uniform")(1024, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.bincount((first * 1024).long(), minlength=1024), torch.ones(1024, dtype=torch.long))


def test_uniform_resumes_its_sequence_from_state_dict_and_repeats_from_a_seed():
    a = create_timestep_sampler("uniform")
    g = torch.Generator().manual_seed(7)
    first = a(5, generator=g)
    state = a.state_dict()
    rest = a(6)
    b = create_timestep_sampler("uniform")
    b.load_state_dict(state)
    assert torch.equal(b(6), rest)
    again = create_timestep_sampler("uniform")(5, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again, first)


def test_logit_normal_has_a_standard_normal_logit():
    t = _draw("logit_normal")
    assert stats.kstest(logit(t), "norm").pvalue > P_MIN


def test_trunc_logit_normal_matches_sats_flipped_left_truncated_distribution():
    t = _draw("trunc_logit_normal")
    assert t.min() >= 0 and t.max() <= 1
    left = 0.075
    tail = 1 - stats.norm.cdf(logit(left))

    def cdf(x):  # t = 1 - (s - left) / (1 - left), s logit-normal conditioned on s >= left
        s = left + (1 - left) * (1 - np.asarray(x))
        return (1 - stats.norm.cdf(logit(np.clip(s, 1e-300, 1)))) / tail
    assert stats.kstest(t, cdf).pvalue > P_MIN


def test_trunc_logit_normal_draws_sats_numbers_from_the_same_normal_draws():
    """SAT: u = Phi(z); s = sigmoid(Phi^-1(lo + (hi - lo) u)); t = 1 - (s - 0.075)/(1 - 0.075), hi = 1."""
    z = torch.randn(8, generator=torch.Generator().manual_seed(3)).double().numpy()
    lo = stats.norm.cdf(logit(0.075))
    s = expit(stats.norm.ppf(lo + (1 - lo) * stats.norm.cdf(z)))
    expected = 1 - (s - 0.075) / (1 - 0.075)
    t = create_timestep_sampler("trunc_logit_normal")(8, generator=torch.Generator().manual_seed(3))
    assert np.allclose(t.double().numpy(), expected, atol=2e-6)


@pytest.mark.parametrize("options, mean, std", [({}, -1.2, 2.0), ({"mean_logsnr": 0.5, "std_logsnr": 1.0}, 0.5, 1.0)])
def test_log_snr_has_a_normal_logsnr_with_the_configured_moments(options, mean, std):
    t = _draw("log_snr", options)
    assert t.min() >= 1e-4 and t.max() <= 1 - 1e-4
    inner = t[(t > 1e-4) & (t < 1 - 1e-4)]
    assert len(inner) > 0.99 * N
    # logSNR = -logit(t); the clamp only touches |logSNR| > 9.2, far in the tails.
    assert stats.kstest(-logit(inner), "norm", args=(mean, std)).pvalue > P_MIN


def test_unknown_sampler_and_option_are_errors_naming_the_key():
    with pytest.raises(ValueError, match=r"training.timestep_sampler='beta'.*'log_snr'"):
        create_timestep_sampler("beta")
    with pytest.raises(ValueError, match=r"training.timestep_sampler_options.mean_logsnr is not an option of.*'uniform'"):
        create_timestep_sampler("uniform", {"mean_logsnr": 1.0})
    with pytest.raises(ValueError, match=r"timestep_sampler_options.std_logsnr='x': expected a number"):
        create_timestep_sampler("log_snr", {"std_logsnr": "x"})


def test_distribution_shift_matches_sats_formula_in_float64():
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    for length in (100, 1000, 5000):
        shift = DistributionShift(base_shift=0.5, max_shift=1.15, max_length=4096, min_length=256)
        seq = min(max(length, 256), 4096)
        mu = -(0.5 + (1.15 - 0.5) * (seq - 256) / (4096 - 256))
        sat = 1 - math.exp(mu) / (math.exp(mu) + (1 / (1 - t) - 1))  # SAT's time_shift, sigma = 1
        assert torch.allclose(shift(t, length), sat, atol=1e-12)
    sine = DistributionShift(use_sine=True)(t, 1000)
    assert torch.allclose(sine, torch.sin(DistributionShift()(t, 1000) * math.pi / 2))


def test_distribution_shift_keeps_the_ends_and_moves_long_sequences_towards_noise():
    shift = DistributionShift()
    ends = shift(torch.tensor([0.0, 1.0]), 4096)
    assert ends.tolist() == [0.0, 1.0]
    t = torch.tensor([0.5])
    assert shift(t, 256) < shift(t, 1024) < shift(t, 4096)


def test_distribution_shift_options_are_validated():
    assert create_distribution_shift(None) is None
    assert create_distribution_shift({"base_shift": 0.3}).base_shift == 0.3
    with pytest.raises(ValueError, match=r"distribution_shift_options.shift is not known"):
        create_distribution_shift({"shift": 3.0})
