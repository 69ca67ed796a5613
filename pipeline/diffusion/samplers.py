"""Samplers: from noise to data with a trained network, one signature for all.

Time convention: t in [0, 1], t = 1 is noise (see ``objectives``). Every sampler is called as::

    sampler(model_fn, noise, steps, *, sigma_min=None, sigma_max=None, rho=None, sigma_schedule=None,
            schedule=None, init=None, init_noise_level=None, dist_shift=None,
            generator=None, callback=None, disable=True) -> x0

``model_fn(x, t) -> output`` is the network in its own parameterisation (v or velocity), with ``t``
of shape (B,) in x's dtype; classifier-free guidance lives inside it (the caller closes over the
conditioning and ``cfg_scale``; see ``cfg.apply_cfg``). Samplers never look inside the network.

Samplers by objective (SAT's names; SAT ``inference/sampling.py``):

- ``v``: ``v-ddim`` (SAT ``sample`` with eta 0: DDIM, Song et al. 2021, eq. 12, on
  ``t = linspace(min(sigma_max, 1), 0, steps + 1)``), and on a Karras sigma schedule with the v-model
  wrapped as a denoiser (k-diffusion ``VDenoiser``: ``c_in = 1/sqrt(sigma^2+1)``,
  ``c_out = -sigma/sqrt(sigma^2+1)``, ``c_skip = 1/(sigma^2+1)``, ``t = atan(sigma)*2/pi``):
  ``k-heun`` (Karras et al. 2022, Algorithm 2, no churn), ``dpmpp-2m`` (Lu et al. 2022b,
  DPM-Solver++(2M)), ``dpmpp-2m-sde`` (its SDE variant, midpoint, eta 1) and ``dpmpp-3m-sde``
  (k-diffusion's third-order multistep SDE variant). ``sigma_min``/``sigma_max``/``rho`` shape the
  schedule (``sigma_schedule``: ``polyexponential``, SAT's choice, or ``karras``; defaults 0.01, 100,
  rho 1 / 7 as SAT's ``sample_k``); they are ignored by the t-samplers, whose start is
  ``min(sigma_max, 1)`` in t.
- ``rectified_flow``: ``euler``, ``rk4`` and ``dpmpp`` (DPM-Solver++(2M) in the flow's
  logSNR = log((1-t)/t)), on SAT ``sample_rf``'s logSNR-linear schedule from t_max to 0.

``schedule`` overrides the default schedule with explicit levels in the sampler's unit (t, or Karras
sigma for the k-samplers), ending at 0. ``dist_shift`` (a ``DistributionShift``) shifts every
t-schedule for a sequence of ``x.shape[-1]`` frames (SAT applies it in its training demos; its
``generate`` path drops it for RF ``euler``/``dpmpp`` but applies it for ``rk4``, which we treat as an
inconsistency); sigma schedules are set explicitly and are never shifted, as in SAT.

Variations (``init``, SAT's init audio): the sampler starts at ``init_noise_level`` instead of
``sigma_max``, from ``init`` noised to that level: ``init + noise * sigma`` (k-samplers),
``alpha * init + sigma * noise`` (v-ddim), ``(1 - t) * init + t * noise`` (RF). Without ``init`` the
start is ``noise * sigma_0`` for the k-samplers and ``noise`` for the others (as in SAT).

The SDE samplers draw their noise from ``generator``: one ``torch.Generator``, or a sequence of B
generators (one per item, so an item's sample does not depend on its batch). k-diffusion draws this
noise from a Brownian tree (torchsde); independent Gaussian increments have the same distribution.
``callback`` receives k-diffusion's dict (``x``, ``i``, ``sigma``/``t``, ``denoised``) every step;
``disable=False`` shows a tqdm bar.

Schedules stay on the CPU whatever the device of ``x``: their 0-d levels enter device arithmetic as scalars,
and the loops' decisions (``sigma_next == 0``, a finite logSNR) read CPU values, so a sampling step reads
nothing back from the GPU (the network's ``t`` is built on the device from the level).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import trange

from pipeline.diffusion.objectives import OBJECTIVES, ModelFn, Objective, VObjective
from pipeline.diffusion.schedules import (SIGMA_SCHEDULES, linear_timesteps, rf_logsnr_timesteps,
                                          sigma_to_t)
from pipeline.diffusion.timesteps import DistributionShift

Generators = torch.Generator | Sequence[torch.Generator] | None
Callback = Callable[[dict[str, Any]], None] | None

_V = VObjective()


def randn_like(x: torch.Tensor, generator: Generators) -> torch.Tensor:
    """Standard normal noise shaped like ``x`` from one generator or one per batch item."""
    if generator is None:
        return torch.randn_like(x)
    if isinstance(generator, torch.Generator):
        return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)
    if len(generator) != x.shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {x.shape[0]}")
    return torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device, dtype=x.dtype)
                        for g in generator]).to(x.device)


def _batch(x: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """A scalar noise level as a (B,) tensor in x's dtype, as the network expects it."""
    return x.new_ones(x.shape[0]) * level.to(x.dtype)


def _t_start(sigma_max: float | None, init_noise_level: float | None, init: torch.Tensor | None) -> float:
    level = init_noise_level if init is not None else sigma_max
    return 1.0 if level is None else min(float(level), 1.0)


def _t_schedule(schedule, steps, t_max, dist_shift, x, make) -> torch.Tensor:
    if schedule is not None:
        return _check_schedule(schedule)
    t = make(steps, t_max, dtype=_schedule_dtype(x))
    if dist_shift is not None:
        t = dist_shift(t, x.shape[-1])
    return t


def _schedule_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_schedule(schedule: torch.Tensor) -> torch.Tensor:
    if schedule.ndim != 1 or len(schedule) < 2 or float(schedule[-1]) != 0.0:
        raise ValueError(f"schedule must be a 1-D tensor of >= 2 decreasing levels ending at 0, got {schedule}")
    if not bool((schedule[1:] < schedule[:-1]).all()):
        raise ValueError(f"schedule must decrease strictly, got {schedule}")
    return schedule


# ----------------------------------------------------------------------------------------------
# v objective: DDIM in t


def sample_v_ddim(model_fn: ModelFn, noise: torch.Tensor, steps: int, *, sigma_max: float | None = None,
                  schedule: torch.Tensor | None = None, init: torch.Tensor | None = None,
                  init_noise_level: float | None = None, dist_shift: DistributionShift | None = None,
                  callback: Callback = None, disable: bool = True) -> torch.Tensor:
    """Deterministic DDIM (eta 0) for a v-model; SAT ``sample_k(sampler_type="v-ddim")``."""
    t_max = _t_start(sigma_max, init_noise_level, init)
    t = _t_schedule(schedule, steps, t_max, dist_shift, noise, linear_timesteps)
    alphas, sigmas = _V.alpha_sigma(t)
    x = noise if init is None else init * alphas[0].to(noise.dtype) + noise * sigmas[0].to(noise.dtype)
    for i in trange(len(t) - 1, disable=disable):
        v = model_fn(x, _batch(x, t[i]))
        denoised = x * alphas[i] - v * sigmas[i]
        eps = x * sigmas[i] + v * alphas[i]
        x = denoised * alphas[i + 1] + eps * sigmas[i + 1]
        if callback is not None:
            callback({"x": x, "i": i, "t": t[i], "sigma": sigmas[i], "denoised": denoised})
    return x.to(noise.dtype)


# ----------------------------------------------------------------------------------------------
# v objective: k-diffusion samplers on Karras sigmas


def v_denoiser(model_fn: ModelFn) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A v-model as a Karras denoiser ``D(x, sigma)`` (k-diffusion ``VDenoiser``, sigma_data = 1)."""
    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        c_in = 1 / (s ** 2 + 1) ** 0.5
        c_out = -s / (s ** 2 + 1) ** 0.5
        c_skip = 1 / (s ** 2 + 1)
        return model_fn(x * c_in, sigma_to_t(sigma)) * c_out + x * c_skip
    return denoise


def _karras_setup(model_fn, noise, steps, sigma_min, sigma_max, rho, sigma_schedule, schedule,
                  init, init_noise_level):
    if schedule is not None:
        sigmas = _check_schedule(schedule)
    else:
        if init is not None and init_noise_level is not None:
            sigma_max = init_noise_level
        kind = sigma_schedule or "polyexponential"
        if kind not in SIGMA_SCHEDULES:
            raise ValueError(f"sigma_schedule={kind!r}: expected one of {sorted(SIGMA_SCHEDULES)}")
        options = {} if rho is None else {"rho": rho}
        sigmas = SIGMA_SCHEDULES[kind](steps, 0.01 if sigma_min is None else sigma_min,
                                       100.0 if sigma_max is None else sigma_max,
                                       dtype=_schedule_dtype(noise), **options)
    sigmas = sigmas.cpu()  # levels stay on the CPU: the loop's `if` on them reads no device value (no sync)
    x = noise * sigmas[0].to(noise.dtype)
    if init is not None:
        x = init + x
    return v_denoiser(model_fn), sigmas, x


def sample_k_heun(model_fn: ModelFn, noise: torch.Tensor, steps: int, *, sigma_min=None, sigma_max=None,
                  rho=None, sigma_schedule=None, schedule=None, init=None, init_noise_level=None,
                  callback: Callback = None, disable: bool = True) -> torch.Tensor:
    """Heun's second-order method, Algorithm 2 of Karras et al. (2022) without churn (k-diffusion ``sample_heun``)."""
    denoise, sigmas, x = _karras_setup(model_fn, noise, steps, sigma_min, sigma_max, rho, sigma_schedule,
                                       schedule, init, init_noise_level)
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, _batch(x, sigmas[i]))
        d = (x - denoised) / sigmas[i]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt  # Euler on the last step: the derivative at sigma 0 is undefined
        else:
            x_2 = x + d * dt
            d_2 = (x_2 - denoise(x_2, _batch(x, sigmas[i + 1]))) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


def _dpmpp_multistep(denoise, sigmas: torch.Tensor, x: torch.Tensor, update, callback: Callback,
                     disable: bool) -> torch.Tensor:
    """The loop the DPM-Solver++ multistep samplers share: denoise at ``sigmas[i]``, report, then
    ``x = update(x, denoised, h, sigma, sigma_next, history)`` with ``h = log(sigma / sigma_next)`` and
    ``history`` the earlier steps' ``(denoised, h)``, newest first (at most two). The step to sigma 0
    returns the denoised estimate."""
    history: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = denoise(x, _batch(x, sigmas[i]))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = sigmas[i].log() - sigmas[i + 1].log()
        x = update(x, denoised, h, sigmas[i], sigmas[i + 1], history)
        history = [(denoised, h), *history[:1]]
    return x


def sample_dpmpp_2m(model_fn: ModelFn, noise: torch.Tensor, steps: int, *, sigma_min=None, sigma_max=None,
                    rho=None, sigma_schedule=None, schedule=None, init=None, init_noise_level=None,
                    callback: Callback = None, disable: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2 of Lu et al. (2022b), in lambda = -log sigma (k-diffusion ``sample_dpmpp_2m``)."""
    denoise, sigmas, x = _karras_setup(model_fn, noise, steps, sigma_min, sigma_max, rho, sigma_schedule,
                                       schedule, init, init_noise_level)

    def update(x, denoised, h, sigma, sigma_next, history):
        if not history:
            estimate = denoised
        else:
            old_denoised, h_last = history[0]
            r = h_last / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        return (sigma_next / sigma) * x - (-h).expm1() * estimate

    return _dpmpp_multistep(denoise, sigmas, x, update, callback, disable)


def sample_dpmpp_2m_sde(model_fn: ModelFn, noise: torch.Tensor, steps: int, *, sigma_min=None,
                        sigma_max=None, rho=None, sigma_schedule=None, schedule=None, init=None,
                        init_noise_level=None, generator: Generators = None, callback: Callback = None,
                        disable: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) SDE, midpoint form, eta = 1 (k-diffusion ``sample_dpmpp_2m_sde``)."""
    denoise, sigmas, x = _karras_setup(model_fn, noise, steps, sigma_min, sigma_max, rho, sigma_schedule,
                                       schedule, init, init_noise_level)

    def update(x, denoised, h, sigma, sigma_next, history):
        # eta = 1: the deterministic part decays with 2h, and the rest of the variance is fresh noise.
        x = sigma_next / sigma * (-h).exp() * x + (-2 * h).expm1().neg() * denoised
        if history:
            old_denoised, h_last = history[0]
            x = x + 0.5 * (-2 * h).expm1().neg() * (h / h_last) * (denoised - old_denoised)
        return x + randn_like(x, generator) * sigma_next * (-2 * h).expm1().neg().sqrt()

    return _dpmpp_multistep(denoise, sigmas, x, update, callback, disable)


def sample_dpmpp_3m_sde(model_fn: ModelFn, noise: torch.Tensor, steps: int, *, sigma_min=None,
                        sigma_max=None, rho=None, sigma_schedule=None, schedule=None, init=None,
                        init_noise_level=None, generator: Generators = None, callback: Callback = None,
                        disable: bool = True) -> torch.Tensor:
    """DPM-Solver++(3M) SDE, eta = 1 (k-diffusion ``sample_dpmpp_3m_sde``): a third-order multistep
    correction from the last three denoised estimates, then fresh noise."""
    denoise, sigmas, x = _karras_setup(model_fn, noise, steps, sigma_min, sigma_max, rho, sigma_schedule,
                                       schedule, init, init_noise_level)

    def update(x, denoised, h, sigma, sigma_next, history):
        h_eta = 2 * h  # h * (eta + 1)
        x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
        phi_2 = (-h_eta).expm1() / h_eta + 1
        if len(history) == 2:
            (denoised_1, h_1), (denoised_2, h_2) = history
            r0, r1 = h_1 / h, h_2 / h
            d1_0 = (denoised - denoised_1) / r0
            d1_1 = (denoised_1 - denoised_2) / r1
            d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            x = x + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
        elif history:
            denoised_1, h_1 = history[0]
            x = x + phi_2 * (denoised - denoised_1) / (h_1 / h)
        return x + randn_like(x, generator) * sigma_next * (-2 * h).expm1().neg().sqrt()

    return _dpmpp_multistep(denoise, sigmas, x, update, callback, disable)


# ----------------------------------------------------------------------------------------------
# rectified flow: ODE solvers in t


def _rf_setup(noise, steps, sigma_max, schedule, init, init_noise_level, dist_shift):
    t_max = _t_start(sigma_max, init_noise_level, init)
    t = _t_schedule(schedule, steps, t_max, dist_shift, noise, rf_logsnr_timesteps).cpu()  # as _karras_setup
    x = noise if init is None else init * (1 - t[0]).to(noise.dtype) + noise * t[0].to(noise.dtype)
    return t, x


def sample_euler(model_fn: ModelFn, noise: torch.Tensor, steps: int, *, sigma_max=None, schedule=None,
                 init=None, init_noise_level=None, dist_shift=None, callback: Callback = None,
                 disable: bool = True) -> torch.Tensor:
    """Euler steps of the flow ODE ``dx/dt = v`` (SAT ``sample_discrete_euler``)."""
    t, x = _rf_setup(noise, steps, sigma_max, schedule, init, init_noise_level, dist_shift)
    for i in trange(len(t) - 1, disable=disable):
        v = model_fn(x, _batch(x, t[i]))
        x = x + (t[i + 1] - t[i]) * v
        if callback is not None:
            callback({"x": x, "i": i, "t": t[i], "sigma": t[i], "denoised": x - t[i + 1] * v})
    return x


def sample_rk4(model_fn: ModelFn, noise: torch.Tensor, steps: int, *, sigma_max=None, schedule=None,
               init=None, init_noise_level=None, dist_shift=None, callback: Callback = None,
               disable: bool = True) -> torch.Tensor:
    """Classical 4th-order Runge-Kutta on the flow ODE (SAT ``sample_rk4``)."""
    t, x = _rf_setup(noise, steps, sigma_max, schedule, init, init_noise_level, dist_shift)
    for i in trange(len(t) - 1, disable=disable):
        dt, mid = t[i + 1] - t[i], (t[i] + t[i + 1]) / 2
        k1 = model_fn(x, _batch(x, t[i]))
        k2 = model_fn(x + dt / 2 * k1, _batch(x, mid))
        k3 = model_fn(x + dt / 2 * k2, _batch(x, mid))
        k4 = model_fn(x + dt * k3, _batch(x, t[i + 1]))
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        if callback is not None:
            callback({"x": x, "i": i, "t": t[i], "sigma": t[i], "denoised": x - t[i + 1] * k4})
    return x


def sample_flow_dpmpp(model_fn: ModelFn, noise: torch.Tensor, steps: int, *, sigma_max=None, schedule=None,
                      init=None, init_noise_level=None, dist_shift=None, callback: Callback = None,
                      disable: bool = True) -> torch.Tensor:
    """DPM-Solver++(2M) for a flow model, in lambda = log((1 - t) / t) (SAT ``sample_flow_dpmpp``).

    At t = 1 lambda is -inf, so the first step and the step to t = 0 are first order, as in SAT.
    """
    t, x = _rf_setup(noise, steps, sigma_max, schedule, init, init_noise_level, dist_shift)
    lam = ((1 - t) / t).log()  # -inf at t = 1, +inf at t = 0
    old_denoised = None
    for i in trange(len(t) - 1, disable=disable):
        denoised = x - t[i] * model_fn(x, _batch(x, t[i]))
        if callback is not None:
            callback({"x": x, "i": i, "t": t[i], "sigma": t[i], "denoised": denoised})
        if t[i + 1] == 0:
            x = denoised
            continue
        h = lam[i + 1] - lam[i]
        estimate = denoised
        if old_denoised is not None and torch.isfinite(lam[i - 1]):
            r = (lam[i] - lam[i - 1]) / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
        x = (t[i + 1] / t[i]) * x - (1 - t[i + 1]) * (-h).expm1() * estimate
        old_denoised = denoised
    return x


# ----------------------------------------------------------------------------------------------
# factory


@dataclass(frozen=True)
class Sampler:
    """A named sampler bound to its objective; call it with the shared signature (module docstring)."""

    name: str
    objective: str
    stochastic: bool
    fn: Callable[..., torch.Tensor]

    def __call__(self, model_fn: ModelFn, noise: torch.Tensor, steps: int, **options: Any) -> torch.Tensor:
        unknown = sorted(set(options) - set(SAMPLER_OPTIONS))
        if unknown:
            raise TypeError(f"sampler {self.name!r}: unknown options {unknown}; the options are {list(SAMPLER_OPTIONS)}")
        # Options another family uses (sigma_min for a t-sampler, say) are ignored, as SAT does.
        accepted = inspect.signature(self.fn).parameters
        with torch.no_grad():
            return self.fn(model_fn, noise, steps, **{k: v for k, v in options.items() if k in accepted})


SAMPLER_OPTIONS = ("sigma_min", "sigma_max", "rho", "sigma_schedule", "schedule", "init", "init_noise_level",
                   "dist_shift", "generator", "callback", "disable")


SAMPLERS: dict[str, Sampler] = {s.name: s for s in (
    Sampler("v-ddim", "v", False, sample_v_ddim),
    Sampler("k-heun", "v", False, sample_k_heun),
    Sampler("dpmpp-2m", "v", False, sample_dpmpp_2m),
    Sampler("dpmpp-2m-sde", "v", True, sample_dpmpp_2m_sde),
    Sampler("dpmpp-3m-sde", "v", True, sample_dpmpp_3m_sde),
    Sampler("euler", "rectified_flow", False, sample_euler),
    Sampler("rk4", "rectified_flow", False, sample_rk4),
    Sampler("dpmpp", "rectified_flow", False, sample_flow_dpmpp),
)}


def create_sampler(name: str | None, objective: Objective | str, key: str = "sampler") -> Sampler:
    """The sampler ``name`` for ``objective`` (None: the objective's default, SAT's demo sampler).

    A name that does not exist, or belongs to the other objective, is an error listing the valid ones.
    """
    objective_name = objective if isinstance(objective, str) else objective.name
    if objective_name not in OBJECTIVES:
        raise ValueError(f"objective {objective_name!r} is not known; expected one of {sorted(OBJECTIVES)}")
    fitting = [n for n, s in SAMPLERS.items() if s.objective == objective_name]
    if name is None:
        name = OBJECTIVES[objective_name].default_sampler
    if name not in SAMPLERS:
        raise ValueError(f"{key}={name!r} is not a known sampler; for objective {objective_name!r} use one of {fitting}")
    if SAMPLERS[name].objective != objective_name:
        raise ValueError(f"{key}={name!r} samples {SAMPLERS[name].objective!r} models, but this model's objective "
                         f"is {objective_name!r}; use one of {fitting}")
    return SAMPLERS[name]
