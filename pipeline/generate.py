"""The one generation path: conditioning metadata + seeds -> latents -> audio.

Used by the render stage and by the train stage's demos (which call it on every rank under ZeRO-3, so
this module is pure model code: torch and `pipeline.models`/`pipeline.diffusion`, no DeepSpeed, no
storage, no environment).

Reproducibility: item ``i`` owns a CPU ``torch.Generator`` seeded with ``seeds[i]``. Its initial noise
is the first draw from that generator, and the SDE samplers (``dpmpp-2m-sde``, ``dpmpp-3m-sde``) draw
their per-step noise for item ``i`` from the same generator afterwards (the samplers take one generator
per batch item). Every random number an item sees therefore depends only on its own seed, never on its
batch or its place in it, and CPU generators give the same numbers on any machine and device. (SAT
seeds the global RNG once per batch, so its items change with the batch size.) What remains
batch-dependent is floating-point summation order inside kernels, which is at rounding level.

Classifier-free guidance runs inside the model call (SAT's wrapper: conditional and unconditional
passes batched by the backbone); the sampler only sees the guided ``model_fn(x, t)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pipeline.diffusion import Guidance, create_distribution_shift, create_objective, create_sampler
from pipeline.models.conditioning import Conditioning


@dataclasses.dataclass(frozen=True, slots=True)
class Generated:
    audio: torch.Tensor
    """(B, audio channels, samples) float32 in [-1, 1] on the CPU (decoded latents, clamped)."""
    latents: torch.Tensor
    """(B, latent channels, frames) float32 on the CPU: the sampler's output, before decoding."""
    sampler: str
    """The sampler actually used (the objective's default when none was asked for)."""


def default_sampler(model: nn.Module, name: str | None = None) -> str:
    """``name``, checked against the model's objective, or the objective's default (SAT's demo sampler:
    ``v-ddim`` for v, ``euler`` for rectified flow)."""
    return create_sampler(name, model.diffusion_objective).name


def latent_unit(model: nn.Module) -> int:
    """The backbone's minimum input length in latent frames: a generated length must be a multiple."""
    ratio = model.pretransform.downsampling_ratio if model.pretransform is not None else 1
    return max(1, model.min_input_length // ratio)


def generate(model: nn.Module, metadata: Sequence[Mapping[str, Any]], seeds: Sequence[int], *,
             steps: int, length: int, cfg_scale: float = 1.0, sampler: str | None = None,
             sampler_options: Mapping[str, Any] | None = None,
             negative_metadata: Sequence[Mapping[str, Any]] | None = None, scale_phi: float = 0.0,
             cfg_interval: tuple[float, float] = (0.0, 1.0), device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32, decode: bool = True, progress: bool = False) -> Generated:
    """Sample one batch: item ``i`` is conditioned on ``metadata[i]`` and seeded with ``seeds[i]``.

    ``model`` is the wrapper `pipeline.models.create_model_from_config` builds (conditioned, or
    unconditional with ``conditioner is None``; then ``metadata`` only sets the batch size and CFG is
    not used). ``length``: latent frames (a multiple of `latent_unit`). ``negative_metadata``: one per
    item (e.g. the item's metadata with ``prompt`` set to its negative prompt), replacing the null
    condition of CFG. ``sampler_options``: the shared sampler options (``sigma_min``, ``sigma_max``,
    ``rho``, ``sigma_schedule``, ...; not ``generator``, which is per item, see the module docstring).
    ``dtype``: the network's compute dtype under autocast when not float32; the sampler's state stays
    float32. The model's distribution shift (``model.diffusion.distribution_shift_options``), if any,
    shifts the sampler's time schedule, as in SAT's training demos.
    """
    batch = len(metadata)
    if batch == 0 or len(seeds) != batch:
        raise ValueError(f"generate: need one seed per metadata item, got {len(seeds)} seeds for {batch} items")
    if negative_metadata is not None and len(negative_metadata) != batch:
        raise ValueError(f"generate: need one negative metadata item per item, got {len(negative_metadata)} "
                         f"for {batch}")
    unit = latent_unit(model)
    if length < 1 or length % unit:
        raise ValueError(f"generate: length={length} latent frames must be a positive multiple of {unit} "
                         "(the backbone's patch size or U-Net downsampling)")
    options = dict(sampler_options or {})
    if "generator" in options:
        raise ValueError("generate: sampler_options must not set 'generator'; each item's generator is "
                         "seeded from its seed")
    chosen = create_sampler(sampler, model.diffusion_objective)
    device = torch.device(device) if device is not None else next(model.parameters()).device

    generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(model.io_channels, length, generator=g) for g in generators])
    noise = noise.to(device)  # (B, C, T) float32

    model_fn = _guided_model_fn(model, metadata, negative_metadata, cfg_scale, scale_phi, cfg_interval,
                                device, dtype)
    dist_shift = create_distribution_shift(getattr(model, "distribution_shift_options", None))
    if dist_shift is not None and "dist_shift" not in options:
        options["dist_shift"] = dist_shift
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            latents = chosen(model_fn, noise, steps, generator=generators, disable=not progress, **options)
            audio = _decode(model, latents) if decode else latents
    finally:
        model.train(was_training)
    audio = audio.float().clamp(-1.0, 1.0).cpu() if decode else audio.float().cpu()
    return Generated(audio=audio, latents=latents.float().cpu(), sampler=chosen.name)


def _autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _guided_model_fn(model, metadata, negative_metadata, cfg_scale, scale_phi, cfg_interval, device, dtype):
    """``model_fn(x, t)`` with the conditioning computed once and CFG applied inside the model call."""
    if getattr(model, "conditioner", None) is None:
        def uncond_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with _autocast(device, dtype):
                return model.predict(x, t, Conditioning(), Guidance()).float()
        return uncond_fn

    with torch.no_grad(), _autocast(device, dtype):
        cond_tensors = model.conditioner([dict(m) for m in metadata], device)
        negative_tensors = None
        if negative_metadata is not None:
            negative_tensors = model.conditioner([dict(m) for m in negative_metadata], device)
        cond = model.route(cond_tensors, negative_tensors)
    # Batched and rescaled as SAT's generation asks (its U-Net wrappers default both off); the CFG interval is
    # placed on the noise level of the model's objective.
    guidance = Guidance(scale=cfg_scale, batch=True, scale_phi=scale_phi, interval=tuple(cfg_interval),
                        sigma=create_objective(model.diffusion_objective).sigma)

    def cond_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with _autocast(device, dtype):
            return model.predict(x, t, cond, guidance).float()
    return cond_fn


def _decode(model: nn.Module, latents: torch.Tensor) -> torch.Tensor:
    # Decoded in the pretransform's own dtype, without autocast: the VAE costs little next to the
    # sampler's many network calls, and its weight-normed convolutions misbehave in bf16 (SAT #131).
    return latents if model.pretransform is None else model.pretransform.decode(latents)


def latent_length(seconds: float, sample_rate: int, downsampling_ratio: int, unit: int) -> int:
    """Latent frames for ``seconds`` of audio, rounded up to a multiple of ``unit``."""
    frames = math.ceil(seconds * sample_rate / downsampling_ratio)
    return max(unit, math.ceil(frames / unit) * unit)
