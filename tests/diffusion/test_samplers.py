"""Every sampler, driven by the exact denoiser of a 1-D Gaussian mixture, recovers the data; the
deterministic ones follow the probability-flow ODE that scipy integrates in float64.

The mixture's posterior is closed form: with x_t = a x + b eps and component k (w, mu, s),
x_t | k ~ N(a mu, a^2 s^2 + b^2), E[x | x_t, k] = mu + a s^2 / var (x_t - a mu),
E[eps | x_t, k] = b / var (x_t - a mu); the optimal network output is the objective's target of
those two expectations (targets are linear in data and noise).
"""
import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from pipeline.diffusion import (DistributionShift, create_objective, create_sampler, karras_sigmas,
                                linear_timesteps)
from pipeline.diffusion.samplers import SAMPLERS, v_denoiser

WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
MEANS = torch.tensor([-2.0, 1.0], dtype=torch.float64)
STDS = torch.tensor([0.5, 0.3], dtype=torch.float64)
DATA_MEAN = float((WEIGHTS * MEANS).sum())
DATA_STD = math.sqrt(float((WEIGHTS * (STDS ** 2 + MEANS ** 2)).sum()) - DATA_MEAN ** 2)


def mixture_cdf(x):
    return sum(float(w) * stats.norm.cdf(x, float(m), float(s)) for w, m, s in zip(WEIGHTS, MEANS, STDS))


def exact_model(objective_name):
    """``model_fn(x_t, t)``: the network output that minimises the objective's MSE, for x of shape (N, 1)."""
    objective = create_objective(objective_name)

    def model_fn(x_t, t):
        x = x_t.to(torch.float64)
        tt = t.to(torch.float64)
        a, b = (c[:, None] for c in objective.alpha_sigma(tt))  # (N, 1)
        var = a ** 2 * STDS ** 2 + b ** 2  # (N, K)
        resid = x - a * MEANS  # (N, K)
        log_p = torch.log(WEIGHTS) - 0.5 * torch.log(2 * math.pi * var) - resid ** 2 / (2 * var)
        resp = torch.softmax(log_p, dim=1)
        x0 = (resp * (MEANS + a * STDS ** 2 / var * resid)).sum(1, keepdim=True)
        eps = (resp * (b / var * resid)).sum(1, keepdim=True)
        return objective.target(x0, eps, tt).to(x_t.dtype)
    return model_fn


N = 20000
OPTIONS = {  # steps and schedule per sampler for the distribution test
    "v-ddim": dict(steps=50),
    "k-heun": dict(steps=25, sigma_min=0.01, sigma_max=100.0),
    "dpmpp-2m": dict(steps=50, sigma_min=0.01, sigma_max=100.0),
    "dpmpp-2m-sde": dict(steps=100, sigma_min=0.01, sigma_max=100.0),
    "dpmpp-3m-sde": dict(steps=100, sigma_min=0.01, sigma_max=100.0),
    "euler": dict(steps=200),
    "rk4": dict(steps=25),
    "dpmpp": dict(steps=100),
}
MEAN_TOL, STD_TOL, KS_TOL = 0.04, 0.04, 0.025
"""Sampling error alone: std(mean) = 1.42 / sqrt(20000) = 0.010; the KS distance of 20000 true draws
exceeds 0.012 with probability 1e-3. Measured KS: 0.005-0.013 for the v samplers and rk4, 0.020 (euler)
and 0.019 (dpmpp): SAT's RF schedule ends with one jump from t = 0.12 to 0, whatever the step count."""


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_sampler_with_exact_denoiser_recovers_mixture_mean_std_and_shape(name):
    sampler = SAMPLERS[name]
    options = dict(OPTIONS[name])
    steps = options.pop("steps")
    noise = torch.randn(N, 1, generator=torch.Generator().manual_seed(1))
    x = sampler(exact_model(sampler.objective), noise, steps, generator=torch.Generator().manual_seed(2), **options)
    assert x.shape == noise.shape and x.dtype == torch.float32
    samples = x[:, 0].double().numpy()
    assert abs(samples.mean() - DATA_MEAN) < MEAN_TOL
    assert abs(samples.std() - DATA_STD) < STD_TOL
    assert stats.kstest(samples, mixture_cdf).statistic < KS_TOL


def flow_ode_reference(objective_name, x_start, t_start):
    """Integrate the probability-flow ODE from t_start to 0 in float64 with scipy (DOP853, rtol 1e-11).

    v objective: x_t = cos(t pi/2) x + sin(t pi/2) eps gives dx_t/dt = (pi/2) v; rectified flow: dx_t/dt = v.
    """
    model_fn = exact_model(objective_name)
    factor = math.pi / 2 if objective_name == "v" else 1.0

    def rhs(t, y):
        x = torch.from_numpy(y)[:, None]
        return factor * model_fn(x, torch.full((len(y),), t, dtype=torch.float64))[:, 0].numpy()

    sol = integrate.solve_ivp(rhs, (t_start, 0.0), x_start[:, 0].numpy(), method="DOP853", rtol=1e-11, atol=1e-11)
    assert sol.success
    return torch.from_numpy(sol.y[:, -1])[:, None]


M = 512
DETERMINISTIC = {  # name: (order, steps n; the median |x - reference| at 2n steps must be below tol)
    "v-ddim": (1, 100, 1e-2),
    "euler": (1, 100, 1e-2),
    "k-heun": (2, 50, 2e-3),
    "dpmpp-2m": (2, 50, 2e-3),
    "dpmpp": (2, 100, 1e-3),
    "rk4": (4, 25, 1e-6),
}
"""Measured medians at 2n steps: v-ddim 3.4e-3, euler 2.8e-3, k-heun 5.2e-4, dpmpp-2m 6.9e-4,
dpmpp 1.4e-4, rk4 2.1e-8. The maximum is not used: samples near the boundary between the two modes
sit where the noise-to-data map is steep, so any step error flips a few of them."""


def _error_at(name, steps, noise):
    sampler = SAMPLERS[name]
    options, t_start, x_start = {}, 1.0, noise
    if sampler.objective == "v" and name != "v-ddim":
        sigma_max = 80.0
        options = dict(sigma_min=1e-3, sigma_max=sigma_max, sigma_schedule="karras")
        t_start = math.atan(sigma_max) * 2 / math.pi
        # k-samplers start from noise * sigma_max (variance-exploding units); in t units that is x * alpha.
        x_start = noise * sigma_max * math.cos(t_start * math.pi / 2)
    if sampler.objective == "rectified_flow":
        # SAT's RF schedule jumps from t = 0.12 to 0 whatever the step count; a linear one converges.
        options = dict(schedule=linear_timesteps(steps, dtype=torch.float64))
    reference = flow_ode_reference(sampler.objective, x_start, t_start)
    x = sampler(exact_model(sampler.objective), noise, steps, **options)
    assert x.dtype == torch.float64
    return (x - reference).abs().median().item()


@pytest.mark.parametrize("name", sorted(DETERMINISTIC))
def test_deterministic_sampler_converges_to_float64_flow_ode_reference_at_its_order(name):
    order, steps, tol = DETERMINISTIC[name]
    noise = torch.randn(M, 1, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    coarse, fine = _error_at(name, steps, noise), _error_at(name, 2 * steps, noise)
    assert fine < tol, f"{name}: median error {fine:.2e} at {2 * steps} steps"
    assert coarse / fine > 0.6 * 2 ** order, f"{name}: error ratio {coarse / fine:.2f} for order {order}"


def test_stochastic_samplers_repeat_with_the_same_generator_and_differ_with_another():
    noise = torch.randn(64, 1, generator=torch.Generator().manual_seed(0))
    for name in ("dpmpp-2m-sde", "dpmpp-3m-sde"):
        run = lambda seed: SAMPLERS[name](exact_model("v"), noise, 10, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(run(5), run(5))
        assert not torch.allclose(run(5), run(6))


def test_per_item_generators_make_an_item_independent_of_its_batch():
    noise = torch.randn(4, 1, generator=torch.Generator().manual_seed(0))
    model_fn = exact_model("v")
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(4)]
    full = SAMPLERS["dpmpp-3m-sde"](model_fn, noise, 10, generator=gens())
    part = SAMPLERS["dpmpp-3m-sde"](model_fn, noise[2:], 10, generator=gens()[2:])
    assert torch.allclose(full[2:], part, atol=1e-6)


def test_v_ddim_schedule_is_linear_in_t_from_sigma_max_and_shifted_when_asked():
    seen = []
    record = lambda x, t: seen.append(float(t[0])) or torch.zeros_like(x)
    SAMPLERS["v-ddim"](record, torch.zeros(2, 1, 8), 4)
    assert seen == pytest.approx([1.0, 0.75, 0.5, 0.25])
    seen.clear()
    SAMPLERS["v-ddim"](record, torch.zeros(2, 1, 8), 4, sigma_max=7.0)  # SAT clips sigma_max to 1
    assert seen == pytest.approx([1.0, 0.75, 0.5, 0.25])
    seen.clear()
    shift = DistributionShift(base_shift=0.5, max_shift=1.15, min_length=4, max_length=16)
    SAMPLERS["v-ddim"](record, torch.zeros(2, 1, 8), 4, dist_shift=shift)
    mu = 0.5 + 0.65 * (8 - 4) / 12
    expected = [t / (t + math.exp(-mu) * (1 - t)) for t in (1.0, 0.75, 0.5, 0.25)]
    assert seen == pytest.approx(expected, rel=1e-6)


def test_rf_samplers_visit_sats_logsnr_schedule():
    seen = []
    record = lambda x, t: seen.append(float(t[0])) or torch.zeros_like(x)
    SAMPLERS["euler"](record, torch.zeros(2, 1), 4)
    logsnr = np.linspace(-6, 2, 5)
    expected = [1.0] + list(1 / (1 + np.exp(logsnr[1:-1])))
    assert seen == pytest.approx(expected, rel=1e-6)


def test_k_samplers_call_the_v_model_at_t_of_each_karras_sigma():
    seen = []
    record = lambda x, t: seen.append(float(t[0])) or torch.zeros_like(x)
    SAMPLERS["dpmpp-2m"](record, torch.zeros(2, 1), 5, sigma_min=0.1, sigma_max=10.0, rho=7.0, sigma_schedule="karras")
    sigmas = karras_sigmas(5, 0.1, 10.0, 7.0)[:-1]
    assert seen == pytest.approx([math.atan(s) * 2 / math.pi for s in sigmas.tolist()], rel=1e-6)
    ramp = np.linspace(0, 1, 5)
    by_hand = (10.0 ** (1 / 7) + ramp * (0.1 ** (1 / 7) - 10.0 ** (1 / 7))) ** 7
    assert sigmas.numpy() == pytest.approx(by_hand, rel=1e-5)


def test_variation_starts_from_init_noised_to_the_init_noise_level():
    init = torch.full((3, 1), 0.5)
    noise = torch.randn(3, 1, generator=torch.Generator().manual_seed(0))
    first = {}

    def record(x, t):
        first.setdefault("x", x.clone())
        first.setdefault("t", float(t[0]))
        return torch.zeros_like(x)
    SAMPLERS["v-ddim"](record, noise, 4, init=init, init_noise_level=0.4)
    a, s = math.cos(0.4 * math.pi / 2), math.sin(0.4 * math.pi / 2)
    assert first["t"] == pytest.approx(0.4)
    assert torch.allclose(first["x"], a * init + s * noise)
    first.clear()
    SAMPLERS["euler"](record, noise, 4, init=init, init_noise_level=0.3)
    assert first["t"] == pytest.approx(0.3)
    assert torch.allclose(first["x"], 0.7 * init + 0.3 * noise)
    first.clear()
    SAMPLERS["k-heun"](record, noise, 4, init=init, init_noise_level=2.0, sigma_min=0.1)
    c_in = 1 / math.sqrt(2.0 ** 2 + 1)  # the v-model sees the VE state scaled by c_in
    assert first["t"] == pytest.approx(math.atan(2.0) * 2 / math.pi, rel=1e-6)
    assert torch.allclose(first["x"], (init + 2.0 * noise) * c_in, atol=1e-6)


def test_default_sampler_follows_the_objective_and_mismatches_are_errors():
    assert create_sampler(None, "v").name == "v-ddim"
    assert create_sampler(None, create_objective("rectified_flow")).name == "euler"
    with pytest.raises(ValueError, match=r"'euler' samples 'rectified_flow' models.*'v'.*v-ddim"):
        create_sampler("euler", "v")
    with pytest.raises(ValueError, match=r"sampler='k-lms' is not a known sampler; for objective 'v' use one of"):
        create_sampler("k-lms", "v")
    with pytest.raises(TypeError, match="unknown options"):
        SAMPLERS["v-ddim"](exact_model("v"), torch.zeros(1, 1), 2, sigma_mx=1.0)


def test_callback_sees_every_step_and_progress_bar_can_be_shown(capsys):
    steps = []
    x = SAMPLERS["rk4"](exact_model("rectified_flow"), torch.zeros(2, 1), 3, callback=lambda d: steps.append(d["i"]),
                        disable=False)
    assert steps == [0, 1, 2] and x.shape == (2, 1)
    assert "3/3" in capsys.readouterr().err


def test_linear_timesteps_match_torch_linspace():
    assert torch.equal(linear_timesteps(10, 1.0), torch.linspace(1, 0, 11))


def test_v_denoiser_is_the_v_objectives_data_estimate_in_variance_exploding_units():
    """k-diffusion VDenoiser: D(X, sigma) for X = x_t / alpha equals alpha x_t - sigma_t v at t = atan(sigma) 2/pi."""
    g = torch.Generator().manual_seed(0)
    x_t, v = torch.randn(3, 2, 5, generator=g, dtype=torch.float64), torch.randn(3, 2, 5, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.5, 0.97], dtype=torch.float64)
    sigma = torch.tan(t * math.pi / 2)
    seen = {}

    def model_fn(x, tt):
        seen["x"], seen["t"] = x, tt
        return v
    denoised = v_denoiser(model_fn)(x_t / torch.cos(t * math.pi / 2)[:, None, None], sigma)
    assert torch.allclose(seen["t"], t) and torch.allclose(seen["x"], x_t)
    assert torch.allclose(denoised, create_objective("v").denoised_from_output(x_t, t, v), atol=1e-12)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_a_sampling_loop_reads_no_value_of_the_device_tensors(name):
    """On the meta device every read of a tensor's value fails: the loop decides on CPU levels only, so on a
    GPU it never waits for the device (the network's t is built from the level on the device)."""
    noise = torch.randn(2, 3, 8).to("meta")
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    out = SAMPLERS[name](lambda x, t: torch.zeros_like(x), noise, 4, generator=generators)
    assert out.device.type == "meta" and out.shape == noise.shape
