"""Training timestep distributions (``training.timestep_sampler``) and the resolution shift.

Time convention: t in [0, 1], t = 0 is data, t = 1 is pure noise (see ``objectives``).

Samplers, with SAT's names and forms (SAT ``training/diffusion.py`` ``training_step`` and
``inference/sampling.py``):

- ``uniform``: a scrambled 1-D Sobol sequence (``torch.quasirandom.SobolEngine(1, scramble=True)``),
  SAT's default; low-discrepancy, so a batch covers [0, 1) evenly.
- ``logit_normal``: ``sigmoid(N(0, 1))`` (Esser et al. 2024, SD3, section 3.1).
- ``trunc_logit_normal``: SAT's ``truncated_logistic_normal_rescaled`` flipped: a logit-normal variable
  ``s`` conditioned on ``s >= 0.075`` (inverse-CDF sampling), rescaled to ``(s - 0.075) / 0.925`` and
  returned as ``t = 1 - that``; so t piles up towards 1 and never exceeds 1.
- ``log_snr``: ``logSNR ~ N(mean_logsnr, std_logsnr)`` (options, defaults -1.2 and 2.0),
  ``t = sigmoid(-logSNR)`` clamped to [1e-4, 1 - 1e-4].

Every draw takes a ``generator`` so a rank's draws repeat from its seed. The Sobol engine is
seeded once, from the first generator it is given, and its position is part of ``state_dict``.
"""
from __future__ import annotations

import abc
import math
from typing import Any, ClassVar

import torch

_OPTIONS_KEY = "training.timestep_sampler_options"


class TimestepSampler(abc.ABC):
    """Draws training timesteps t in [0, 1] (t = 1 is noise), float32, shape (batch_size,)."""

    name: ClassVar[str]

    @abc.abstractmethod
    def __call__(self, batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``batch_size`` timesteps (on the CPU; the caller moves them)."""

    def state_dict(self) -> dict[str, Any]:
        """State to resume the same sequence; stateless samplers return {}."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"timestep sampler {self.name!r} has no state, got keys {sorted(state)}")


class UniformSobol(TimestepSampler):
    """Scrambled Sobol points in [0, 1) (SAT's ``uniform``)."""

    name = "uniform"

    def __init__(self) -> None:
        self._seed: int | None = None
        self._engine: torch.quasirandom.SobolEngine | None = None

    def _start(self, seed: int, skip: int = 0) -> None:
        self._seed = seed
        self._engine = torch.quasirandom.SobolEngine(1, scramble=True, seed=seed)
        if skip:
            self._engine.fast_forward(skip)

    def __call__(self, batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        if self._engine is None:
            # The scramble is the only randomness: take its seed from the caller's generator once.
            self._start(int(torch.randint(0, 2 ** 62, (), generator=generator)))
        return self._engine.draw(batch_size, dtype=torch.float32)[:, 0]

    def state_dict(self) -> dict[str, Any]:
        if self._engine is None:
            return {"seed": None, "num_generated": 0}
        return {"seed": self._seed, "num_generated": int(self._engine.num_generated)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"seed", "num_generated"}:
            raise ValueError(f"uniform timestep sampler state needs keys ['num_generated', 'seed'], got {sorted(state)}")
        if state["seed"] is None:
            self._seed, self._engine = None, None
        else:
            self._start(int(state["seed"]), int(state["num_generated"]))


class LogitNormal(TimestepSampler):
    """``sigmoid(z)``, ``z ~ N(0, 1)``."""

    name = "logit_normal"

    def __call__(self, batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.sigmoid(torch.randn(batch_size, generator=generator))


class TruncLogitNormal(TimestepSampler):
    """SAT's flipped, left-truncated logit-normal (truncation at ``LEFT_TRUNC`` = 0.075)."""

    name = "trunc_logit_normal"
    LEFT_TRUNC: ClassVar[float] = 0.075

    def __call__(self, batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        normal = torch.distributions.Normal(0.0, 1.0)
        # Uniform quantiles drawn as Phi(z), as SAT does, so one generator state gives SAT's numbers.
        u = normal.cdf(torch.randn(batch_size, generator=generator))
        lower = normal.cdf(torch.logit(torch.tensor(self.LEFT_TRUNC)))
        s = torch.sigmoid(normal.icdf(lower + (1 - lower) * u))  # logit-normal, conditioned on s >= 0.075
        return 1 - (s - self.LEFT_TRUNC) / (1 - self.LEFT_TRUNC)


class LogSNR(TimestepSampler):
    """``t = sigmoid(-logSNR)``, ``logSNR ~ N(mean_logsnr, std_logsnr**2)``, clamped to [1e-4, 1 - 1e-4]."""

    name = "log_snr"

    def __init__(self, mean_logsnr: float = -1.2, std_logsnr: float = 2.0) -> None:
        if not std_logsnr > 0:
            raise ValueError(f"{_OPTIONS_KEY}.std_logsnr={std_logsnr} must be > 0")
        self.mean_logsnr = float(mean_logsnr)
        self.std_logsnr = float(std_logsnr)

    def __call__(self, batch_size: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        logsnr = torch.randn(batch_size, generator=generator) * self.std_logsnr + self.mean_logsnr
        return torch.sigmoid(-logsnr).clamp(1e-4, 1 - 1e-4)


TIMESTEP_SAMPLERS: dict[str, type[TimestepSampler]] = {
    cls.name: cls for cls in (UniformSobol, LogitNormal, TruncLogitNormal, LogSNR)}
_OPTIONS: dict[str, tuple[str, ...]] = {"log_snr": ("mean_logsnr", "std_logsnr")}


def create_timestep_sampler(name: str, options: dict[str, Any] | None = None) -> TimestepSampler:
    """The sampler ``training.timestep_sampler`` names, built from ``training.timestep_sampler_options``."""
    if name not in TIMESTEP_SAMPLERS:
        raise ValueError(f"training.timestep_sampler={name!r} is not known; expected one of {sorted(TIMESTEP_SAMPLERS)}")
    options = dict(options or {})
    allowed = _OPTIONS.get(name, ())
    for key, value in options.items():
        if key not in allowed:
            raise ValueError(f"{_OPTIONS_KEY}.{key} is not an option of timestep_sampler {name!r}; "
                             f"its options are {list(allowed)}")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{_OPTIONS_KEY}.{key}={value!r}: expected a number")
    return TIMESTEP_SAMPLERS[name](**options)


class DistributionShift:
    """Resolution-dependent timestep shift (SD3 section 5.3.2 / Flux; SAT ``DistributionShift``).

    For a sequence of ``length`` frames (clamped to [min_length, max_length]),
    ``mu = base_shift + (max_shift - base_shift) * (length - min_length) / (max_length - min_length)`` and
    ``shift(t) = t / (t + exp(-mu) * (1 - t))`` (SAT writes it ``1 - e^-mu / (e^-mu + (1/(1-t) - 1))``,
    the same map, which divides by zero at t = 1), then ``sin(shift * pi/2)`` when ``use_sine``.
    Longer sequences move t towards 1 (more noise). Arguments and defaults are SAT's, given as
    ``model.diffusion.distribution_shift_options``.
    """

    def __init__(self, base_shift: float = 0.5, max_shift: float = 1.15, max_length: int = 4096,
                 min_length: int = 256, use_sine: bool = False) -> None:
        if not max_length > min_length:
            raise ValueError(f"model.diffusion.distribution_shift_options: max_length={max_length} must exceed "
                             f"min_length={min_length}")
        self.base_shift, self.max_shift = float(base_shift), float(max_shift)
        self.max_length, self.min_length = int(max_length), int(min_length)
        self.use_sine = bool(use_sine)

    def mu(self, length: int) -> float:
        length = min(max(length, self.min_length), self.max_length)
        frac = (length - self.min_length) / (self.max_length - self.min_length)
        return self.base_shift + (self.max_shift - self.base_shift) * frac

    def __call__(self, t: torch.Tensor, length: int) -> torch.Tensor:
        scale = math.exp(-self.mu(length))
        shifted = t / (t + scale * (1 - t))
        if self.use_sine:
            shifted = torch.sin(shifted * (math.pi / 2))
        return shifted


def create_distribution_shift(options: dict[str, Any] | None) -> DistributionShift | None:
    """``DistributionShift`` from ``model.diffusion.distribution_shift_options`` (None when absent)."""
    if options is None:
        return None
    known = ("base_shift", "max_shift", "max_length", "min_length", "use_sine")
    for key in options:
        if key not in known:
            raise ValueError(f"model.diffusion.distribution_shift_options.{key} is not known; expected {list(known)}")
    return DistributionShift(**options)
