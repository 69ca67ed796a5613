"""Optimizers and learning-rate schedules from ``training.optimizer_configs`` (SAT's layout, parsed and checked
with the training block by `pipeline.config_training`)::

    "optimizer_configs": {"diffusion": {
        "optimizer": {"type": "AdamW", "config": {"lr": 5e-5, "betas": [0.9, 0.999], "weight_decay": 1e-3}},
        "scheduler": {"type": "InverseLR", "config": {"inv_gamma": 1000000, "power": 0.5, "warmup": 0.99}}}}

``type`` is any ``torch.optim`` optimizer, or a name the caller supplies in ``extra_optimizers``:
DeepSpeed's ``FusedAdam`` and ``DeepSpeedCPUAdam`` are resolved that way by the train stage, so this
module never imports DeepSpeed (model code must not); asked for them without a lookup it says so.
Schedulers are ``InverseLR`` or any ``torch.optim.lr_scheduler`` class, stepped once per optimizer
step. Without ``optimizer_configs``, ``training.learning_rate`` gives SAT's fallback: Adam at that
constant rate. With both, ``optimizer_configs`` wins and a warning says so (as in SAT).

``fused=True`` (the train stage passes it on CUDA) gives torch's ``Adam``/``AdamW`` their fused kernel (one
launch for all parameters instead of a few per tensor; the same update up to rounding) unless the block's
``config`` sets ``fused`` or ``foreach`` itself. Torch's fused AdamW was chosen over DeepSpeed's ``FusedAdam``
without a GPU measurement (bench/gpu_suite.py times a step with it); ``FusedAdam`` stays available by name.
"""
from __future__ import annotations

import logging
from typing import Iterable, Mapping

import torch

logger = logging.getLogger(__name__)

DEEPSPEED_OPTIMIZERS = ("FusedAdam", "DeepSpeedCPUAdam")
FUSED_OPTIMIZERS = ("Adam", "AdamW")
"""torch.optim classes that take ``fused=True``."""


class InverseLR(torch.optim.lr_scheduler.LRScheduler):
    """Inverse decay with an exponential warm-up (SAT ``training/utils.py``; from k-diffusion).

    After ``k`` calls of ``step()``: ``lr = (1 - warmup**(k + 1)) * max(final_lr, base_lr * (1 + k / inv_gamma)**-power)``.
    ``inv_gamma`` is the number of steps for the rate to decay to ``(1/2)**power`` of ``base_lr``;
    ``warmup`` in [0, 1) sets the warm-up's time scale (0.99: about 100 steps; 0 disables it).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, inv_gamma: float = 1.0, power: float = 1.0,
                 warmup: float = 0.0, final_lr: float = 0.0, last_epoch: int = -1) -> None:
        if not 0.0 <= warmup < 1.0:
            raise ValueError(f"InverseLR warmup={warmup}: expected 0 <= warmup < 1")
        if not inv_gamma > 0:
            raise ValueError(f"InverseLR inv_gamma={inv_gamma}: expected > 0")
        self.inv_gamma, self.power, self.warmup, self.final_lr = inv_gamma, power, warmup, final_lr
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return self._get_closed_form_lr()

    def _get_closed_form_lr(self) -> list[float]:
        k = self.last_epoch
        warmup = 1 - self.warmup ** (k + 1)
        decay = (1 + k / self.inv_gamma) ** -self.power
        return [warmup * max(self.final_lr, base_lr * decay) for base_lr in self.base_lrs]


def create_optimizer(block, params: Iterable[torch.Tensor] | Iterable[dict],
                     extra_optimizers: Mapping[str, type] | None = None, fused: bool = False) -> torch.optim.Optimizer:
    """An optimizer from one parsed ``{"type", "config"}`` block (a `pipeline.config_training.TypedBlock`, its
    type and config keys checked when the config was parsed; ``fused``: module docstring)."""
    name, config = block.type, dict(block.config)
    extra = dict(extra_optimizers or {})
    if name in extra:
        cls = extra[name]
    elif name in DEEPSPEED_OPTIMIZERS:
        raise ValueError(f"{block.key}.type={name!r} is a DeepSpeed optimizer; the caller must supply it "
                         f"(extra_optimizers={{'{name}': deepspeed.ops...}}), or use a torch.optim name such as 'AdamW'")
    else:
        cls = getattr(torch.optim, name)
    if fused and name not in extra and name in FUSED_OPTIMIZERS and not {"fused", "foreach"} & set(config):
        config = {**config, "fused": True}
    return cls(params, **config)


def create_scheduler(block, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """A scheduler from one parsed block: ``InverseLR`` or a ``torch.optim.lr_scheduler`` name."""
    cls = InverseLR if block.type == "InverseLR" else getattr(torch.optim.lr_scheduler, block.type)
    return cls(optimizer, **block.config)


def create_optimizer_and_scheduler(
        optimizer_configs: Mapping | None, learning_rate: float | None, params: Iterable[torch.Tensor],
        group: str = "diffusion", extra_optimizers: Mapping[str, type] | None = None, fused: bool = False,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
    """The optimizer (and scheduler, if configured) of ``training.optimizer_configs.<group>``
    (``optimizer_configs``: {group: `pipeline.config_training.OptimizerGroup`}, as the config parsed it).

    ``group`` is ``diffusion`` for diffusion models (``autoencoder``/``discriminator`` for autoencoders);
    ``fused``: use torch's fused Adam/AdamW kernel (module docstring).
    """
    if optimizer_configs is None:
        if learning_rate is None:
            raise ValueError("training: set either learning_rate or optimizer_configs")
        return torch.optim.Adam(params, lr=learning_rate, fused=fused or None), None
    if learning_rate is not None:
        logger.warning("training.learning_rate=%s is ignored: training.optimizer_configs is set (as in SAT)",
                       learning_rate)
    if group not in optimizer_configs:
        raise ValueError(f"training.optimizer_configs.{group}: expected an object with 'optimizer' (and optionally "
                         f"'scheduler'); optimizer_configs has {sorted(optimizer_configs)}")
    section = optimizer_configs[group]
    optimizer = create_optimizer(section.optimizer, params, extra_optimizers, fused=fused)
    scheduler = create_scheduler(section.scheduler, optimizer) if section.scheduler is not None else None
    return optimizer, scheduler
