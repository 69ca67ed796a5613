"""Diffusion core: objectives, timestep distributions, losses, schedules, samplers, CFG, EMA and
optimizers. Time convention everywhere: t in [0, 1], **t = 0 is data and t = 1 is pure noise**.

Model code: imports torch only (no DeepSpeed, storage or environment variables).

How a train step uses it (``cfg`` a ``pipeline.config.ModelConfig``; each factory runs once)::

    objective = create_objective(cfg.model.diffusion.diffusion_objective)
    timesteps = create_timestep_sampler(cfg.training.timestep_sampler, cfg.training.timestep_sampler_options)
    shift = create_distribution_shift(cfg.model.diffusion.distribution_shift_options)
    loss_fn = DiffusionLoss.from_config(cfg.training.loss_configs, cfg.training.mask_padding,
                                        cfg.training.mask_padding_dropout)
    ema = EMA(params, cfg.training.cantus.ema_beta, cfg.training.cantus.ema_power, cfg.training.cantus.ema_interval)

    t = timesteps(batch_size, generator=g).to(device)                         # (B,), t = 1 is noise
    t = shift(t, latents.shape[-1]) if shift is not None else t
    cond = model.route(model.conditioner(batch.metadata, device))              # a models.conditioning.Conditioning
    mask = loss_fn.padding_mask_for_step(batch.padding_mask, generator=g)     # None, or (B, T)
    out = objective.loss(lambda x_t, t: model.predict(x_t, t, cond, Guidance(dropout_prob=p), mask=mask),
                         latents, t, noise, loss_fn, padding_mask=mask)       # out.loss, out.terms, out.per_sample
    ...; ema.update(params)

and a demo or render: ``create_sampler(name_or_None, objective)(model_fn, noise, steps, generator=g, ...)``.
"""
from pipeline.diffusion.cfg import Guidance, apply_cfg, guide
from pipeline.diffusion.ema import EMA
from pipeline.diffusion.losses import DiffusionLoss, LossOutput, LossTerm
from pipeline.diffusion.objectives import (Objective, RectifiedFlowObjective, VObjective,
                                           create_objective)
from pipeline.diffusion.optim import (InverseLR, create_optimizer, create_optimizer_and_scheduler,
                                      create_scheduler)
from pipeline.diffusion.samplers import SAMPLERS, Sampler, create_sampler
from pipeline.diffusion.schedules import (karras_sigmas, linear_timesteps, polyexponential_sigmas,
                                          rf_logsnr_timesteps, sigma_to_t, t_to_sigma)
from pipeline.diffusion.timesteps import (DistributionShift, TimestepSampler, create_distribution_shift,
                                          create_timestep_sampler)

__all__ = [
    "EMA", "SAMPLERS", "DiffusionLoss", "DistributionShift", "Guidance", "InverseLR", "LossOutput", "LossTerm",
    "Objective", "RectifiedFlowObjective", "Sampler", "TimestepSampler", "VObjective", "apply_cfg", "guide",
    "create_distribution_shift", "create_objective", "create_optimizer", "create_optimizer_and_scheduler",
    "create_sampler", "create_scheduler", "create_timestep_sampler", "karras_sigmas", "linear_timesteps",
    "polyexponential_sigmas", "rf_logsnr_timesteps", "sigma_to_t", "t_to_sigma",
]
