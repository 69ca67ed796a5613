"""`create_model_from_config`: a parsed SAT config (or its dict or path) -> the model, SAT's layout.

Backbones are looked up in two registries (conditioned and unconditional): SAT `type` string ->
builder(diffusion_config, model_config) -> backbone module exposing `min_input_length`. What config
validation needs to know of a backbone (its routes, its global width key, its own checks) is stated once in
`pipeline.backbones`, whose keys these registries match (tests/models/test_factory.py). `sample_size` is
checked against the built model's `min_input_length` (so on the meta device too), the one rule for it. Builders check the JSON `config` block against the constructor's signature,
so an unknown argument is an error naming it (SAT forwards it silently through **kwargs).
`model.cantus` options are passed as explicit arguments; they never live in the backbone block.
"""

from __future__ import annotations

import logging
from typing import Callable

from torch import nn

from pipeline.config import DiffusionConfig, ModelConfig, load_model_config
from pipeline.config_json import ConfigError
from pipeline.arguments import check_arguments
from pipeline.models.conditioners import create_multi_conditioner_from_conditioning_config
from pipeline.models.diffusion_wrapper import (ConditionedDiffusionModelWrapper, DiffusionModelWrapper,
                                               DiTUncondWrapper, DiTWrapper)
from pipeline.models.compile import compile_blocks
from pipeline.models.dance_unet import build_dau_cond, build_dau_uncond
from pipeline.models.dit import DiffusionTransformer
from pipeline.models.unet1d import build_adp_1d_cond, build_adp_1d_uncond, build_adp_cfg_1d

logger = logging.getLogger(__name__)

KEY = "model.diffusion.config"
_CANTUS_ARGS = ("attention_masks", "checkpointing", "attention_backend", "diffusion_objective")


def _checked(cls, config: dict, key_path: str, reserved=()) -> dict:
    try:
        check_arguments(config, key_path, cls.__name__, [cls.__init__], reserved=reserved, required=False)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return dict(config)


def _dit(config: dict, cfg: ModelConfig, key_path: str) -> DiffusionTransformer:
    c = cfg.model.cantus
    return DiffusionTransformer(**config, diffusion_objective=cfg.model.diffusion.diffusion_objective,
                                attention_masks=c.attention_masks, checkpointing=c.checkpointing,
                                attention_backend=c.attention_backend)


def build_dit_cond(d: DiffusionConfig, cfg: ModelConfig) -> nn.Module:
    return DiTWrapper(_dit(_checked(DiffusionTransformer, d.config, KEY, _CANTUS_ARGS), cfg, KEY))


def build_dit_uncond(d: DiffusionConfig, cfg: ModelConfig) -> nn.Module:
    # SAT's unconditional DiT names its io channels `in_channels`.
    key = "model.config"
    config = dict(d.config)
    if "in_channels" not in config:
        raise ConfigError(f"{key}.in_channels is required for an unconditional dit")
    config["io_channels"] = config.pop("in_channels")
    return DiTUncondWrapper(_dit(_checked(DiffusionTransformer, config, key, _CANTUS_ARGS), cfg, key))


COND_BACKBONES: dict[str, Callable[[DiffusionConfig, ModelConfig], nn.Module]] = {
    "dit": build_dit_cond,
    "adp_cfg_1d": build_adp_cfg_1d,
    "adp_1d": build_adp_1d_cond,
    "DAU1d": build_dau_cond,
}
UNCOND_BACKBONES: dict[str, Callable[[DiffusionConfig, ModelConfig], nn.Module]] = {
    "dit": build_dit_uncond,
    "adp_uncond_1d": build_adp_1d_uncond,
    "adp_1d": build_adp_1d_uncond,
    "DAU1d": build_dau_uncond,
}


def _backbone(registry: dict, d: DiffusionConfig, cfg: ModelConfig, key: str) -> nn.Module:
    if d.type not in registry:
        raise ConfigError(f"{key}={d.type!r} is not a supported backbone; supported: {sorted(registry)}")
    return registry[d.type](d, cfg)


def _pretransform(cfg: ModelConfig) -> nn.Module | None:
    if cfg.model.pretransform is None:
        return None
    from pipeline.models.pretransforms import create_pretransform_from_config
    return create_pretransform_from_config(cfg.model.pretransform, cfg.sample_rate, cfg.audio_channels)


def _parts(cfg: ModelConfig, registry: dict, key: str) -> tuple[nn.Module, nn.Module | None, int]:
    """The backbone, the pretransform and the model's minimum input length (pretransform ratio x backbone's),
    with `sample_size` checked against it before the conditioners are built."""
    backbone = _backbone(registry, cfg.model.diffusion, cfg, key)
    pretransform = _pretransform(cfg)
    ratio = 1 if pretransform is None else pretransform.downsampling_ratio
    unit = ratio * backbone.min_input_length
    if cfg.sample_size % unit:
        raise ConfigError(f"sample_size={cfg.sample_size} must be a multiple of the model's minimum input length "
                          f"{unit} (pretransform ratio {ratio} x backbone {backbone.min_input_length})")
    return backbone, pretransform, unit


def _diffusion_cond(cfg: ModelConfig) -> nn.Module:
    d = cfg.model.diffusion
    backbone, pretransform, min_length = _parts(cfg, COND_BACKBONES, "model.diffusion.type")
    conditioner = None
    if cfg.model.conditioning is not None:
        conditioner = create_multi_conditioner_from_conditioning_config(cfg.model.conditioning)
    return ConditionedDiffusionModelWrapper(
        backbone, conditioner, io_channels=cfg.model.io_channels, sample_rate=cfg.sample_rate,
        min_input_length=min_length, diffusion_objective=d.diffusion_objective,
        distribution_shift_options=d.distribution_shift_options, pretransform=pretransform,
        cross_attn_cond_ids=d.cross_attention_cond_ids, global_cond_ids=d.global_cond_ids,
        input_concat_ids=d.input_concat_ids, prepend_cond_ids=d.prepend_cond_ids)


def _diffusion_uncond(cfg: ModelConfig) -> nn.Module:
    backbone, pretransform, min_length = _parts(cfg, UNCOND_BACKBONES, "model.type")
    return DiffusionModelWrapper(backbone, io_channels=backbone.io_channels, sample_size=cfg.sample_size,
                                 sample_rate=cfg.sample_rate, min_input_length=min_length,
                                 pretransform=pretransform, diffusion_objective="v")


def create_autoencoder_from_config(cfg: "ModelConfig | dict | str") -> nn.Module:
    """Build the autoencoder of a `model_type: autoencoder` config (parsed, a dict, or a JSON path)."""
    from pipeline.models.autoencoder import build_autoencoder
    from pipeline.models.pretransforms import create_pretransform_from_config
    cfg = load_model_config(cfg)
    if cfg.model.autoencoder is None:
        raise ConfigError(f"{cfg.source}: model_type={cfg.model_type!r}; expected an autoencoder config")
    return build_autoencoder(cfg.model.autoencoder, cfg.sample_rate, build_pretransform=create_pretransform_from_config)


MODEL_TYPES: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "diffusion_cond": _diffusion_cond,
    "diffusion_uncond": _diffusion_uncond,
    "autoencoder": create_autoencoder_from_config,
}


def create_model_from_config(config: "ModelConfig | dict | str") -> nn.Module:
    """Build the model an SAT config describes (a parsed ModelConfig, its dict, or a JSON path).

    Works under `with torch.device("meta")`: no weights are read (text encoders load on first use)."""
    cfg = load_model_config(config)
    if cfg.model_type not in MODEL_TYPES:
        raise ConfigError(f"model_type={cfg.model_type!r} is not supported; supported: {sorted(MODEL_TYPES)}")
    model = MODEL_TYPES[cfg.model_type](cfg)
    if cfg.model.cantus.compile:  # from outside the model, as torchtitan applies it
        try:
            compile_blocks(model)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return model
