"""The ADP 1-D U-Net backbones: `adp_cfg_1d`, `adp_1d` (conditional) and `adp_uncond_1d`/`adp_1d` (unconditional).

`UNet1d` is audio-diffusion-pytorch v0.0.94's U-Net as stable-audio-tools (SAT) uses it; `UNetCFG1d` adds
cross-attention over conditioning tokens with classifier-free guidance whose "null" condition is a learned
`FixedEmbedding` (one vector per token position), not zeros. The three wrappers at the bottom are what the
model factory builds from a config's `type`; they take the JSON `config` block as keyword arguments and
hold the U-Net as `.model`, so parameter names are SAT's (`model.model.downsamples.0...` in a full model).

Conditioning, per the router's names:
- `cross_attn_cond` (B, M, context_embedding_features) + `cross_attn_mask` (B, M): cross-attention tokens
  (`adp_cfg_1d` only; M <= context_embedding_max_length);
- `global_cond` (B, context_features): added to the time embedding before the mapping MLP (FiLM);
- `input_concat_cond` (B, context_channels[0], L): concatenated to the input channels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.diffusion.cfg import Guidance, apply_cfg
from pipeline.arguments import check_arguments
from pipeline.backbones import CONDITIONED
from pipeline.models.conditioning import Conditioning
from pipeline.models.diffusion_wrapper import halve_parameters
from pipeline.models.unet1d_blocks import (
    AttentionSettings,
    BottleneckBlock1d,
    DownsampleBlock1d,
    Patcher,
    TimePositionalEmbedding,
    Unpatcher,
    UpsampleBlock1d,
)


class UNet1d(nn.Module):
    """The U-Net: stem, `len(factors)` downsampling levels with skips, bottleneck, mirrored upsampling."""

    def __init__(
        self,
        in_channels: int,
        channels: int,
        multipliers: Sequence[int],
        factors: Sequence[int],
        num_blocks: Sequence[int],
        attentions: Sequence[int],
        patch_size: int = 1,
        resnet_groups: int = 8,
        use_context_time: bool = True,
        kernel_multiplier_downsample: int = 2,
        use_nearest_upsample: bool = False,
        use_skip_scale: bool = True,
        use_stft: bool = False,
        use_stft_context: bool = False,
        out_channels: int | None = None,
        context_features: int | None = None,
        context_features_multiplier: int = 4,
        context_channels: Sequence[int] | None = None,
        context_embedding_features: int | None = None,
        attention_heads: int | None = None,
        attention_features: int | None = None,
        attention_multiplier: int | None = None,
    ) -> None:
        super().__init__()
        num_levels = len(multipliers) - 1
        if len(factors) != num_levels or len(num_blocks) != num_levels or len(attentions) < num_levels:
            raise ValueError(
                f"U-Net config: multipliers has {len(multipliers)} entries, so factors and num_blocks need "
                f"{num_levels} and attentions at least {num_levels} (the last one is the bottleneck's); got "
                f"factors {list(factors)}, num_blocks {list(num_blocks)}, attentions {list(attentions)}"
            )
        if use_stft or use_stft_context:
            raise ValueError(
                "U-Net config: use_stft / use_stft_context are not supported (no SAT config uses them); "
                "remove them or set them to false"
            )
        out_channels = in_channels if out_channels is None else out_channels
        context_channels = list(context_channels or [])
        if len(context_channels) > num_levels + 1:
            raise ValueError(
                f"U-Net config: context_channels has {len(context_channels)} entries, at most "
                f"{num_levels + 1} (one per resolution) are allowed"
            )
        context_channels += [0] * (num_levels + 1 - len(context_channels))
        self.context_channels = context_channels
        self.factors = list(factors)
        self.patch_size = patch_size
        # Lengths must divide evenly all the way down: each level's transposed conv restores exactly
        # `factor` times its input, so a rounded-up downsampled length would not match its skip.
        self.min_input_length = patch_size * math.prod(factors)

        self.use_context_time = use_context_time
        self.use_context_features = context_features is not None
        context_mapping_features = None
        if use_context_time or self.use_context_features:
            context_mapping_features = channels * context_features_multiplier
            self.to_mapping = nn.Sequential(
                nn.Linear(context_mapping_features, context_mapping_features),
                nn.GELU(),
                nn.Linear(context_mapping_features, context_mapping_features),
                nn.GELU(),
            )
        if use_context_time:
            self.to_time = nn.Sequential(
                TimePositionalEmbedding(dim=channels, out_features=context_mapping_features), nn.GELU()
            )
        if self.use_context_features:
            self.to_features = nn.Sequential(nn.Linear(context_features, context_mapping_features), nn.GELU())

        attention = AttentionSettings(attention_heads, attention_features, attention_multiplier)
        widths = [channels * m for m in multipliers]
        self.to_in = Patcher(in_channels + context_channels[0], widths[0], patch_size, context_mapping_features)
        self.downsamples = nn.ModuleList(
            DownsampleBlock1d(
                widths[i],
                widths[i + 1],
                factor=factors[i],
                num_groups=resnet_groups,
                num_layers=num_blocks[i],
                kernel_multiplier=kernel_multiplier_downsample,
                context_channels=context_channels[i + 1],
                num_transformer_blocks=attentions[i],
                attention=attention,
                context_mapping_features=context_mapping_features,
                context_embedding_features=context_embedding_features,
                where=f"downsamples.{i}",
            )
            for i in range(num_levels)
        )
        self.bottleneck = BottleneckBlock1d(
            widths[-1],
            num_groups=resnet_groups,
            num_transformer_blocks=attentions[-1],
            attention=attention,
            context_mapping_features=context_mapping_features,
            context_embedding_features=context_embedding_features,
        )
        # Level i's upsampling block consumes level i's skips: one per resnet block, one more for the
        # transformer output when the level has attention.
        self.upsamples = nn.ModuleList(
            UpsampleBlock1d(
                widths[i + 1],
                widths[i],
                factor=factors[i],
                num_layers=num_blocks[i] + (1 if attentions[i] else 0),
                num_groups=resnet_groups,
                use_nearest=use_nearest_upsample,
                skip_channels=widths[i + 1],
                use_skip_scale=use_skip_scale,
                num_transformer_blocks=attentions[i],
                attention=attention,
                context_mapping_features=context_mapping_features,
                context_embedding_features=context_embedding_features,
                where=f"upsamples.{num_levels - 1 - i}",
            )
            for i in reversed(range(num_levels))
        )
        self.to_out = Unpatcher(widths[0], out_channels, patch_size, context_mapping_features)

    def check_length(self, length: int) -> None:
        if length % self.min_input_length != 0:
            raise ValueError(
                f"U-Net input length {length} is not a multiple of {self.min_input_length} (patch_size "
                f"{self.patch_size} x factors {self.factors}); the minimum length is {self.min_input_length}: "
                f"use a sample_size (in latent frames: sample_size / the pretransform's downsampling ratio) "
                f"that is a multiple of {self.min_input_length}"
            )

    def get_mapping(self, time: torch.Tensor | None, features: torch.Tensor | None) -> torch.Tensor | None:
        """Sum of the time embedding and the global-feature embedding, through the mapping MLP."""
        if features is not None and not self.use_context_features:
            raise ValueError(
                "global conditioning was given but this U-Net's config has no context_features: set "
                "context_features to the global condition's width, or remove global_cond_ids"
            )
        items = []
        if self.use_context_time:
            if time is None:
                raise ValueError("this U-Net has use_context_time set (the default) but no time was given")
            items.append(self.to_time(time))
        if self.use_context_features:
            if features is None:
                raise ValueError("this U-Net has context_features set but no global conditioning was given")
            items.append(self.to_features(features))
        if not items:
            return None
        return self.to_mapping(torch.stack(items).sum(dim=0))

    def forward(
        self,
        x: torch.Tensor,
        time: torch.Tensor | None = None,
        *,
        features: torch.Tensor | None = None,
        channels_list: Sequence[torch.Tensor] | None = None,
        embedding: torch.Tensor | None = None,
        embedding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        self.check_length(x.shape[-1])
        context = self._context_channels(channels_list)
        if context[0] is not None:
            x = torch.cat([x, context[0]], dim=1)
        mapping = self.get_mapping(time, features)
        x = self.to_in(x, mapping)
        skips_list = [x]
        for i, downsample in enumerate(self.downsamples):
            x, skips = downsample(
                x, mapping=mapping, channels=context[i + 1], embedding=embedding, embedding_mask=embedding_mask
            )
            skips_list.append(skips)
        x = self.bottleneck(x, mapping=mapping, embedding=embedding, embedding_mask=embedding_mask)
        for upsample in self.upsamples:
            x = upsample(
                x, skips=skips_list.pop(), mapping=mapping, embedding=embedding, embedding_mask=embedding_mask
            )
        x = x + skips_list.pop()
        return self.to_out(x, mapping)

    def _context_channels(self, channels_list: Sequence[torch.Tensor] | None) -> list[torch.Tensor | None]:
        """Per resolution, the input-concat tensor (channels_list holds one per nonzero context_channels)."""
        wanted = [i for i, c in enumerate(self.context_channels) if c > 0]
        given = list(channels_list or [])
        if len(given) != len(wanted):
            raise ValueError(
                f"input-concat conditioning: the U-Net's context_channels {self.context_channels} expects "
                f"{len(wanted)} tensor(s), got {len(given)}: set context_channels to [channels of the "
                "input_concat_ids conditioners] in the backbone config, or remove input_concat_ids"
            )
        context: list[torch.Tensor | None] = [None] * len(self.context_channels)
        for layer, tensor in zip(wanted, given):
            if tensor.shape[1] != self.context_channels[layer]:
                raise ValueError(
                    f"input-concat conditioning at resolution {layer} has {tensor.shape[1]} channels, the "
                    f"config's context_channels[{layer}] is {self.context_channels[layer]}"
                )
            context[layer] = tensor
        return context


class FixedEmbedding(nn.Module):
    """One learned vector per token position: the CFG null condition for `max_length` tokens."""

    def __init__(self, max_length: int, features: int) -> None:
        super().__init__()
        self.max_length = max_length
        self.embedding = nn.Embedding(max_length, features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length = x.shape[:2]
        if length > self.max_length:
            raise ValueError(
                f"{length} cross-attention tokens exceed context_embedding_max_length {self.max_length}: "
                "raise context_embedding_max_length in the backbone config (a new model) or send fewer tokens"
            )
        positions = torch.arange(length, device=x.device)
        return self.embedding(positions).unsqueeze(0).expand(batch, -1, -1)


class UNetCFG1d(UNet1d):
    """UNet1d with cross-attention conditioning and classifier-free guidance against `fixed_embedding`."""

    def __init__(
        self,
        context_embedding_max_length: int,
        context_embedding_features: int,
        use_xattn_time: bool = False,
        **unet_kwargs,
    ) -> None:
        super().__init__(context_embedding_features=context_embedding_features, **unet_kwargs)
        self.use_xattn_time = use_xattn_time
        if use_xattn_time:
            # The time embedding becomes one more cross-attention token.
            self.to_time_embedding = nn.Sequential(
                TimePositionalEmbedding(dim=unet_kwargs["channels"], out_features=context_embedding_features),
                nn.GELU(),
            )
            context_embedding_max_length += 1
        self.fixed_embedding = FixedEmbedding(context_embedding_max_length, context_embedding_features)

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        time: torch.Tensor,
        *,
        embedding: torch.Tensor,
        embedding_mask: torch.Tensor | None = None,
        embedding_scale: float = 1.0,
        embedding_mask_proba: float = 0.0,
        batch_cfg: bool = False,
        rescale_cfg: bool = False,
        scale_phi: float = 0.4,
        negative_embedding: torch.Tensor | None = None,
        negative_embedding_mask: torch.Tensor | None = None,
        features: torch.Tensor | None = None,
        channels_list: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        if embedding is None:
            raise ValueError(
                "adp_cfg_1d needs cross-attention conditioning: route at least one conditioner through "
                "cross_attention_cond_ids"
            )
        b = embedding.shape[0]
        if self.use_xattn_time:
            time_token = self.to_time_embedding(time).unsqueeze(1)
            embedding, embedding_mask = _append_token(embedding, embedding_mask, time_token)
            if negative_embedding is not None:
                # SAT fix: SAT appends the time token to the positive tokens only, so a negative prompt
                # with use_xattn_time fails on a length mismatch with the null embedding.
                negative_embedding, negative_embedding_mask = _append_token(
                    negative_embedding, negative_embedding_mask, time_token
                )

        fixed_embedding = self.fixed_embedding(embedding)

        if embedding_mask_proba > 0.0:
            # CFG dropout during training: whole items swap their tokens for the null embedding. As in
            # SAT the mask is left unchanged.
            drop = torch.rand((b, 1, 1), device=embedding.device) < embedding_mask_proba
            embedding = torch.where(drop, fixed_embedding, embedding)

        def run(x_, time_, embedding_, mask_, features_, channels_list_):
            return UNet1d.forward(
                self,
                x_,
                time_,
                features=features_,
                channels_list=channels_list_,
                embedding=embedding_,
                embedding_mask=mask_,
            )

        if embedding_scale == 1.0:
            return run(x, time, embedding, embedding_mask, features, channels_list)

        if batch_cfg:
            if negative_embedding is not None:
                if negative_embedding_mask is not None:
                    # Masked negative tokens take the null embedding's value at their position.
                    keep = negative_embedding_mask.to(torch.bool).unsqueeze(2)
                    negative_embedding = torch.where(keep, negative_embedding, fixed_embedding)
                null_embedding = negative_embedding
            else:
                null_embedding = fixed_embedding
            # SAT uses the positive mask for both halves (also for a negative prompt): kept for parity.
            batch_mask = None if embedding_mask is None else torch.cat([embedding_mask, embedding_mask])
            batch_features = None if features is None else torch.cat([features, features])
            batch_channels = None if channels_list is None else [torch.cat([c, c]) for c in channels_list]
            batch_out = run(
                torch.cat([x, x]),
                torch.cat([time, time]),
                torch.cat([embedding, null_embedding]),
                batch_mask,
                batch_features,
                batch_channels,
            )
            out, out_null = batch_out.chunk(2, dim=0)
        else:
            # SAT's unbatched path ignores the negative embedding and guides against the null embedding.
            out = run(x, time, embedding, embedding_mask, features, channels_list)
            out_null = run(x, time, fixed_embedding, embedding_mask, features, channels_list)

        return apply_cfg(out, out_null, embedding_scale, scale_phi if rescale_cfg else 0.0)


def _append_token(
    tokens: torch.Tensor, mask: torch.Tensor | None, token: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Append one always-valid token (B, 1, D) to tokens (B, M, D) and to their mask (B, M)."""
    if mask is not None:
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), device=mask.device, dtype=mask.dtype)], dim=1)
    return torch.cat([tokens, token], dim=1), mask


def _reject_unsupported(backbone: str, guidance: Guidance, mask: torch.Tensor | None) -> None:
    """What a U-Net cannot honour beyond the routes (those are checked when the model is built)."""
    if not guidance.everywhere:
        raise ValueError(
            f"{backbone} applies guidance at every step; cfg_interval {guidance.interval} needs the dit backbone"
        )
    if mask is not None:
        raise ValueError(f"{backbone} has no padding mask: set training.mask_padding to false for U-Net models")


def _channels_list(input_concat_cond: torch.Tensor | None) -> list[torch.Tensor] | None:
    return None if input_concat_cond is None else [input_concat_cond]


def _sat_guidance(cfg_scale, cfg_dropout_prob, batch_cfg, rescale_cfg, scale_phi, cfg_interval) -> Guidance:
    """SAT's U-Net wrapper keywords as a `Guidance`: `scale_phi` counts only with `rescale_cfg`."""
    return Guidance(scale=cfg_scale, dropout_prob=cfg_dropout_prob, batch=batch_cfg,
                    scale_phi=scale_phi if rescale_cfg else 0.0, interval=tuple(cfg_interval))


class UNetCFG1DWrapper(nn.Module):
    """`adp_cfg_1d`: cross-attention + global + input-concat conditioning, CFG inside the backbone.

    Guidance runs over the cross-attention tokens only: as in SAT, the unconditional half sees the same
    global and input-concat conditioning, so negative global and input-concat conditioning are not used."""

    accepts, requires = CONDITIONED["adp_cfg_1d"].accepts, CONDITIONED["adp_cfg_1d"].requires

    def __init__(self, **config) -> None:
        super().__init__()
        self.model = UNetCFG1d(**config)
        self.min_input_length = self.model.min_input_length
        halve_parameters(self.model)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cross_attn_cond: torch.Tensor | None = None,
        cross_attn_mask: torch.Tensor | None = None,
        input_concat_cond: torch.Tensor | None = None,
        global_cond: torch.Tensor | None = None,
        cfg_scale: float = 1.0,
        cfg_dropout_prob: float = 0.0,
        batch_cfg: bool = False,
        rescale_cfg: bool = False,
        scale_phi: float = 0.4,
        negative_cross_attn_cond: torch.Tensor | None = None,
        negative_cross_attn_mask: torch.Tensor | None = None,
        negative_global_cond: torch.Tensor | None = None,
        negative_input_concat_cond: torch.Tensor | None = None,
        prepend_cond: torch.Tensor | None = None,
        prepend_cond_mask: torch.Tensor | None = None,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """SAT's keyword call, onto `predict`. `batch_cfg` and `rescale_cfg` default to False as in SAT's
        wrapper (SAT's generation, and ours, pass True for both); the rescale amount is `scale_phi` (SAT's
        0.4), used only with `rescale_cfg`."""
        cond = Conditioning.from_sat(cross_attn_cond, cross_attn_mask, negative_cross_attn_cond,
                                     negative_cross_attn_mask, input_concat_cond, negative_input_concat_cond,
                                     global_cond, negative_global_cond, prepend_cond, prepend_cond_mask)
        cond.check_routes(self.accepts, "adp_cfg_1d")
        guidance = _sat_guidance(cfg_scale, cfg_dropout_prob, batch_cfg, rescale_cfg, scale_phi, cfg_interval)
        return self.predict(x, t, cond, guidance, mask=mask)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: Guidance,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        _reject_unsupported("adp_cfg_1d", guidance, mask)
        return self.model(
            x,
            t,
            embedding=cond.cross_attn,
            embedding_mask=cond.cross_attn_mask,
            features=cond.global_cond,
            channels_list=_channels_list(cond.input_concat),
            embedding_scale=guidance.scale,
            embedding_mask_proba=guidance.dropout_prob,
            batch_cfg=guidance.batch,
            rescale_cfg=guidance.scale_phi != 0.0,
            scale_phi=guidance.scale_phi,
            negative_embedding=cond.negative_cross_attn,
            negative_embedding_mask=cond.negative_cross_attn_mask,
        )


class UNet1DCondWrapper(nn.Module):
    """`adp_1d` in diffusion_cond: global + input-concat conditioning, no cross-attention.

    Like SAT, it has no guidance: the guidance settings have nothing to act on (there is no null condition)
    and are ignored."""

    accepts = CONDITIONED["adp_1d"].accepts

    def __init__(self, **config) -> None:
        super().__init__()
        self.model = UNet1d(**config)
        self.min_input_length = self.model.min_input_length
        halve_parameters(self.model)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cross_attn_cond: torch.Tensor | None = None,
        cross_attn_mask: torch.Tensor | None = None,
        input_concat_cond: torch.Tensor | None = None,
        global_cond: torch.Tensor | None = None,
        cfg_scale: float = 1.0,
        cfg_dropout_prob: float = 0.0,
        batch_cfg: bool = False,
        rescale_cfg: bool = False,
        scale_phi: float = 0.4,
        negative_cross_attn_cond: torch.Tensor | None = None,
        negative_cross_attn_mask: torch.Tensor | None = None,
        negative_global_cond: torch.Tensor | None = None,
        negative_input_concat_cond: torch.Tensor | None = None,
        prepend_cond: torch.Tensor | None = None,
        prepend_cond_mask: torch.Tensor | None = None,
        cfg_interval: tuple[float, float] = (0.0, 1.0),
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """SAT's keyword call, onto `predict`."""
        cond = Conditioning.from_sat(cross_attn_cond, cross_attn_mask, negative_cross_attn_cond,
                                     negative_cross_attn_mask, input_concat_cond, negative_input_concat_cond,
                                     global_cond, negative_global_cond, prepend_cond, prepend_cond_mask)
        cond.check_routes(self.accepts, "adp_1d")
        guidance = _sat_guidance(cfg_scale, cfg_dropout_prob, batch_cfg, rescale_cfg, scale_phi, cfg_interval)
        return self.predict(x, t, cond, guidance, mask=mask)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: Guidance,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        _reject_unsupported("adp_1d", guidance, mask)
        input_concat_cond = cond.input_concat
        if input_concat_cond is not None and input_concat_cond.shape[2] != x.shape[2]:
            # SAT resizes input-concat conditioning to the input's length (nearest) for this backbone.
            input_concat_cond = F.interpolate(input_concat_cond, (x.shape[2],), mode="nearest")
        return self.model(x, t, features=cond.global_cond, channels_list=_channels_list(input_concat_cond))


class UNet1DUncondWrapper(nn.Module):
    """`adp_uncond_1d` (SAT's name) and `adp_1d` (the docs' name) in diffusion_uncond."""

    accepts = frozenset()

    def __init__(self, in_channels: int, **config) -> None:
        super().__init__()
        self.model = UNet1d(in_channels=in_channels, **config)
        self.io_channels = in_channels
        self.min_input_length = self.model.min_input_length
        halve_parameters(self.model)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        mask: torch.Tensor | None = None,
        cfg_dropout_prob: float = 0.0,
        cfg_scale: float = 1.0,
    ) -> torch.Tensor:
        """The CFG arguments are accepted (the training loop sends them) and have nothing to act on."""
        return self.predict(x, t, Conditioning(), Guidance(), mask=mask)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: Guidance,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        _reject_unsupported("adp_uncond_1d", guidance, mask)
        return self.model(x, t)


# ---------------------------------------------------------------------------------------------------------
# Factory builders: builder(diffusion_config, model_config) -> backbone, registered in models/factory.py.
# ---------------------------------------------------------------------------------------------------------


def construct_checked(cls: type, config: dict, key_path: str, accepted: Sequence) -> nn.Module:
    """`cls(**config)` after `check_arguments` against `accepted` (callables whose signatures together make
    up what `cls` takes)."""
    from pipeline.config_json import ConfigError  # imported here: model code stays usable without the config layer

    try:
        check_arguments(config, key_path, cls.__name__, accepted)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return cls(**config)


def build_adp_cfg_1d(diffusion, model_config) -> nn.Module:
    return construct_checked(
        UNetCFG1DWrapper, diffusion.config, "model.diffusion.config", [UNetCFG1d.__init__, UNet1d.__init__]
    )


def build_adp_1d_cond(diffusion, model_config) -> nn.Module:
    return construct_checked(UNet1DCondWrapper, diffusion.config, "model.diffusion.config", [UNet1d.__init__])


def build_adp_1d_uncond(diffusion, model_config) -> nn.Module:
    return construct_checked(UNet1DUncondWrapper, diffusion.config, "model.config", [UNet1d.__init__])
