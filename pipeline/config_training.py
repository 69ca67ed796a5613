"""Typed ``training.optimizer_configs`` and ``training.loss_configs`` (SAT's layouts), parsed once with the
training block (`pipeline.config`); the optimizer and loss builders read these values, never the JSON::

    "optimizer_configs": {"<group>": {"optimizer": {"type": "AdamW", "config": {"lr": 5e-5}},
                                      "scheduler": {"type": "InverseLR", "config": {"inv_gamma": 1e6}}}}
    "loss_configs": {"<name>": {"type": "mse", "config": {...}, "weights": {"mse": 1.0}}}

Optimizer groups are ``diffusion``, or ``autoencoder`` and ``discriminator`` (SAT's). An optimizer ``type`` is a
``torch.optim`` class or a DeepSpeed name the train stage resolves (`DEEPSPEED_OPTIMIZERS`); a scheduler is
``InverseLR`` or a ``torch.optim.lr_scheduler`` class. Their ``config`` keys are checked here against the class's
signature. A diffusion model's loss terms are checked here too (`LossTerm`); an autoencoder's loss blocks keep
SAT's shape (`LossBlock`) and are checked by `pipeline.models.autoencoder_losses` when the losses are built.
Errors are ValueErrors naming the key path (`pipeline.config` makes them ConfigErrors).
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.arguments import check_arguments
from pipeline.config_json import show
from pipeline.diffusion.losses import LOSS_TYPES, TIMESTEP_WEIGHTINGS, LossTerm
from pipeline.diffusion.optim import DEEPSPEED_OPTIMIZERS, InverseLR

_frozen = dict(frozen=True, kw_only=True, slots=True)


@dataclass(**_frozen)
class TypedBlock:
    """An SAT ``{"type": <class name>, "config": {<constructor arguments>}}`` block."""
    type: str
    config: dict
    key: str
    """Its key path, for errors raised when it is built."""


@dataclass(**_frozen)
class OptimizerGroup:
    """``training.optimizer_configs.<group>``: an optimizer and an optional learning-rate scheduler."""
    optimizer: TypedBlock
    scheduler: TypedBlock | None = None


@dataclass(**_frozen)
class LossBlock:
    """One ``training.loss_configs`` entry of an autoencoder, in SAT's shape."""
    type: str | None
    """SAT's loss type (``mrstft``, ``l1``, ``kl``, ``encodec``, ...); None when the entry has none."""
    config: dict
    """Constructor arguments of the loss module."""
    weights: dict[str, float]
    """Term name -> weight."""
    decay: float = 1.0
    """SAT's per-step loss-weight decay (only 1.0, no decay, is supported)."""


def _object(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ValueError(f"{key}: expected an object, got {value!r}")
    return value


def _typed_block(value: Any, key: str) -> TypedBlock:
    if not isinstance(value, dict) or not isinstance(value.get("type"), str):
        raise ValueError(f"{key}: expected {{'type': <name>, 'config': {{...}}}}, got {value!r}")
    unknown = sorted(set(value) - {"type", "config"})
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown}; expected 'type' and 'config'")
    return TypedBlock(type=value["type"], config=dict(_object(value.get("config", {}), f"{key}.config")), key=key)


def _check_config(cls: type, block: TypedBlock, reserved: str) -> None:
    """The block's ``config`` against ``cls``'s signature (``reserved``: its first argument, given by the
    builder); a class that takes ``**kwargs`` accepts any key."""
    params = inspect.signature(cls).parameters.values()
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        check_arguments(block.config, f"{block.key}.config", cls.__name__, [cls.__init__], reserved=(reserved,))


def optimizer_class(block: TypedBlock) -> type | None:
    """The ``torch.optim`` class a block names; None for a DeepSpeed optimizer (the train stage resolves it)."""
    if block.type in DEEPSPEED_OPTIMIZERS:
        return None
    cls = getattr(torch.optim, block.type, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        known = sorted(n for n, c in vars(torch.optim).items()
                       if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer)
        raise ValueError(f"{block.key}.type={block.type!r} is not a torch.optim optimizer; expected one of "
                         f"{known + list(DEEPSPEED_OPTIMIZERS)}")
    return cls


def scheduler_class(block: TypedBlock) -> type:
    """``InverseLR`` or the ``torch.optim.lr_scheduler`` class a block names."""
    if block.type == "InverseLR":
        return InverseLR
    cls = getattr(torch.optim.lr_scheduler, block.type, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.lr_scheduler.LRScheduler)):
        raise ValueError(f"{block.key}.type={block.type!r} is neither 'InverseLR' nor a torch.optim.lr_scheduler class")
    return cls


def parse_optimizer_configs(value: Any, key: str = "training.optimizer_configs") -> dict[str, OptimizerGroup]:
    """``training.optimizer_configs`` -> {group: OptimizerGroup}, every type and config key checked."""
    groups = {}
    for group, section in _object(value, key).items():
        gkey = f"{key}.{group}"
        if not isinstance(section, dict) or "optimizer" not in section:
            raise ValueError(f"{gkey}: expected an object with 'optimizer' (and optionally 'scheduler'), "
                             f"got {section!r}")
        unknown = sorted(set(section) - {"optimizer", "scheduler"})
        if unknown:
            raise ValueError(f"{gkey}: unknown keys {unknown}; expected 'optimizer' and 'scheduler'")
        optimizer = _typed_block(section["optimizer"], f"{gkey}.optimizer")
        lr = optimizer.config.get("lr", 0.0)  # a string would otherwise fail inside the optimizer at step 1
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
            raise ValueError(f"{gkey}.optimizer.config.lr: expected a number >= 0, got {show(lr)}")
        cls = optimizer_class(optimizer)
        if cls is not None:
            _check_config(cls, optimizer, "params")
        scheduler = None
        if "scheduler" in section:
            scheduler = _typed_block(section["scheduler"], f"{gkey}.scheduler")
            _check_config(scheduler_class(scheduler), scheduler, "optimizer")
        groups[group] = OptimizerGroup(optimizer=optimizer, scheduler=scheduler)
    return groups


def _number(value: Any, key: str, minimum: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key}={value!r}: expected a number")
    if minimum is not None and not value > minimum:
        raise ValueError(f"{key}={value!r}: expected a number > {minimum}")
    return float(value)


def parse_loss_term(name: str, block: Any, key: str = "training.loss_configs") -> LossTerm:
    """One diffusion ``loss_configs`` entry (schema: `pipeline.diffusion.losses`), validated."""
    key = f"{key}.{name}"
    if not isinstance(block, dict):
        raise ValueError(f"{key}: expected an object with 'type', got {block!r}")
    unknown = sorted(set(block) - {"type", "weights", "config"})
    if unknown:
        raise ValueError(f"{key}: unknown keys {unknown}; expected 'type', 'weights', 'config'")
    kind = block.get("type")
    if kind not in LOSS_TYPES:
        raise ValueError(f"{key}.type={kind!r}: expected one of {list(LOSS_TYPES)}")
    weight = 1.0
    if "weights" in block:
        weights = block["weights"]
        if not isinstance(weights, dict) or set(weights) != {kind}:
            raise ValueError(f"{key}.weights={weights!r}: expected {{{kind!r}: <number>}}")
        weight = _number(weights[kind], f"{key}.weights.{kind}")
    config = _object(block.get("config", {}), f"{key}.config")
    allowed = {"timestep_weighting", "min_snr_gamma"} | ({"delta"} if kind == "huber" else set())
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise ValueError(f"{key}.config: unknown keys {unknown} for type {kind!r}; expected {sorted(allowed)}")
    weighting = config.get("timestep_weighting", "none")
    if weighting not in TIMESTEP_WEIGHTINGS:
        raise ValueError(f"{key}.config.timestep_weighting={weighting!r}: expected one of {list(TIMESTEP_WEIGHTINGS)}")
    if "min_snr_gamma" in config and weighting != "min_snr":
        raise ValueError(f"{key}.config.min_snr_gamma is set but timestep_weighting is {weighting!r}, not 'min_snr'")
    return LossTerm(
        name=name, type=kind, weight=weight,
        delta=_number(config.get("delta", 1.0), f"{key}.config.delta", minimum=0.0),
        timestep_weighting=weighting,
        min_snr_gamma=_number(config.get("min_snr_gamma", 5.0), f"{key}.config.min_snr_gamma", minimum=0.0))


def parse_diffusion_losses(value: Any, key: str = "training.loss_configs") -> tuple[LossTerm, ...]:
    """A diffusion model's ``loss_configs`` -> its loss terms (at least one)."""
    if not isinstance(value, dict):
        raise ValueError(f"{key}: expected an object of named terms, got {value!r}")
    if not value:
        raise ValueError(f"{key}: expected at least one loss term")
    return tuple(parse_loss_term(name, block, key) for name, block in value.items())


def parse_autoencoder_losses(value: Any, key: str = "training.loss_configs") -> dict[str, LossBlock]:
    """An autoencoder's ``loss_configs`` -> {name: LossBlock} (SAT's shape; what each name may hold is checked
    when the losses are built)."""
    blocks = {}
    for name, block in _object(value, key).items():
        bkey = f"{key}.{name}"
        block = _object(block, bkey)
        kind = block.get("type")
        if kind is not None and not isinstance(kind, str):
            raise ValueError(f"{bkey}.type: expected a string, got {show(kind)}")
        weights = _object(block.get("weights", {}), f"{bkey}.weights")
        blocks[name] = LossBlock(type=kind, config=dict(_object(block.get("config", {}), f"{bkey}.config")),
                                 weights={k: _number(v, f"{bkey}.weights.{k}") for k, v in weights.items()},
                                 decay=_number(block.get("decay", 1.0), f"{bkey}.decay"))
    return blocks
