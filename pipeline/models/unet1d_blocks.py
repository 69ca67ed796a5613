"""Building blocks of the ADP 1-D U-Net (`adp_cfg_1d`, `adp_1d`, `adp_uncond_1d`).

The architecture is audio-diffusion-pytorch v0.0.94 (`UNet1d`/`UNetCFG1d`) as stable-audio-tools (SAT)
vendored and modified it in `stable_audio_tools/models/adp.py`. Attribute names follow SAT exactly, so a
state dict of SAT's (Stable Audio 1.0) loads with `strict=True`; that is why some names read oddly
(`attention.attention.to_out`, `to_scale_shift.to_scale_shift.1`).

Sections, in the order a sample meets them:
- convolutions with SAT's "same" padding: `SamePadConv1d`, `TrimmedConvTranspose1d`, `make_downsample`,
  `make_upsample`;
- resnet: `ConvBlock1d`, `MappingToScaleShift` (time/feature conditioning), `ResnetBlock1d`, `Patcher`,
  `Unpatcher`;
- attention: `MultiHeadAttention` (heads + output projection), `Attention` (norms, projections, the
  context mask), `TransformerBlock`, `Transformer1d`;
- time embedding: `LearnedPositionalEmbedding`, `TimePositionalEmbedding`;
- U-Net levels: `DownsampleBlock1d`, `BottleneckBlock1d`, `UpsampleBlock1d`.
"""

from __future__ import annotations

import math

import torch
from einops.layers.torch import Rearrange
from torch import nn
from torch.nn import functional as F

# ---------------------------------------------------------------------------------------------------------
# Convolutions
# ---------------------------------------------------------------------------------------------------------


class SamePadConv1d(nn.Conv1d):
    """A Conv1d that zero-pads so that the output has ceil(length / stride) frames (SAT's `adp.Conv1d`).

    The total padding is `effective_kernel - stride`, split with the extra sample on the left (SAT pads
    asymmetrically for odd totals), plus right padding so that the last window is full.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.stride[0]
        kernel = (self.kernel_size[0] - 1) * self.dilation[0] + 1
        padding_total = kernel - stride
        length = x.shape[-1]
        n_frames = math.ceil((length - kernel + padding_total) / stride + 1)
        extra = (n_frames - 1) * stride + (kernel - padding_total) - length
        right = padding_total // 2
        left = padding_total - right
        return super().forward(F.pad(x, (left, right + extra)))


class TrimmedConvTranspose1d(nn.ConvTranspose1d):
    """A ConvTranspose1d trimmed to exactly `length * stride` frames (SAT's `adp.ConvTranspose1d`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        padding_total = self.kernel_size[0] - self.stride[0]
        right = padding_total // 2
        left = padding_total - right
        return y[..., left : y.shape[-1] - right]


def make_downsample(in_channels: int, out_channels: int, factor: int, kernel_multiplier: int) -> nn.Module:
    """Strided convolution that divides the length by `factor` (kernel `factor * kernel_multiplier + 1`)."""
    if kernel_multiplier % 2 != 0:
        raise ValueError(
            f"kernel_multiplier_downsample must be even, got {kernel_multiplier}: the downsampling kernel "
            "factor * kernel_multiplier + 1 must be odd to stay centred"
        )
    return SamePadConv1d(in_channels, out_channels, kernel_size=factor * kernel_multiplier + 1, stride=factor)


def make_upsample(in_channels: int, out_channels: int, factor: int, use_nearest: bool) -> nn.Module:
    """Multiply the length by `factor`: a transposed conv, or nearest repeat + conv; a plain conv for 1."""
    if factor == 1:
        return SamePadConv1d(in_channels, out_channels, kernel_size=3)
    if use_nearest:
        return nn.Sequential(
            nn.Upsample(scale_factor=factor, mode="nearest"),
            SamePadConv1d(in_channels, out_channels, kernel_size=3),
        )
    return TrimmedConvTranspose1d(in_channels, out_channels, kernel_size=factor * 2, stride=factor)


# ---------------------------------------------------------------------------------------------------------
# Resnet blocks
# ---------------------------------------------------------------------------------------------------------


class ConvBlock1d(nn.Module):
    """GroupNorm -> optional FiLM (scale, shift) -> SiLU -> conv."""

    def __init__(self, in_channels: int, out_channels: int, *, num_groups: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.groupnorm = nn.GroupNorm(num_groups=num_groups, num_channels=in_channels)
        self.activation = nn.SiLU()
        self.project = SamePadConv1d(in_channels, out_channels, kernel_size=kernel_size)

    def forward(
        self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        x = self.groupnorm(x)
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return self.project(self.activation(x))


class MappingToScaleShift(nn.Module):
    """The conditioning vector (time + global features) -> per-channel (scale, shift) for FiLM."""

    def __init__(self, features: int, channels: int) -> None:
        super().__init__()
        self.to_scale_shift = nn.Sequential(nn.SiLU(), nn.Linear(features, channels * 2))

    def forward(self, mapping: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale, shift = self.to_scale_shift(mapping).unsqueeze(-1).chunk(2, dim=1)
        return scale, shift


class ResnetBlock1d(nn.Module):
    """Two conv blocks, the second modulated by the mapping vector, plus a (1x1-projected) residual."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_groups: int,
        context_mapping_features: int | None = None,
    ) -> None:
        super().__init__()
        self.use_mapping = context_mapping_features is not None
        self.block1 = ConvBlock1d(in_channels, out_channels, num_groups=num_groups)
        if self.use_mapping:
            self.to_scale_shift = MappingToScaleShift(context_mapping_features, out_channels)
        self.block2 = ConvBlock1d(out_channels, out_channels, num_groups=num_groups)
        self.to_out = (
            SamePadConv1d(in_channels, out_channels, kernel_size=1)
            if in_channels != out_channels
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor, mapping: torch.Tensor | None = None) -> torch.Tensor:
        h = self.block1(x)
        scale_shift = self.to_scale_shift(mapping) if self.use_mapping else None
        h = self.block2(h, scale_shift=scale_shift)
        return h + self.to_out(x)


def _check_patch_size(channels: int, patch_size: int) -> None:
    """The stems fold `patch_size` frames into (or out of) the first level's channels."""
    if channels % patch_size != 0:
        raise ValueError(f"channels * multipliers[0] = {channels} must be divisible by patch_size {patch_size}")


class Patcher(nn.Module):
    """Input stem: a resnet block, then `patch_size` consecutive frames folded into channels."""

    def __init__(
        self, in_channels: int, out_channels: int, patch_size: int, context_mapping_features: int | None
    ) -> None:
        super().__init__()
        _check_patch_size(out_channels, patch_size)
        self.patch_size = patch_size
        self.block = ResnetBlock1d(
            in_channels, out_channels // patch_size, num_groups=1, context_mapping_features=context_mapping_features
        )

    def forward(self, x: torch.Tensor, mapping: torch.Tensor | None) -> torch.Tensor:
        x = self.block(x, mapping)
        b, c, length = x.shape
        p = self.patch_size
        # "b c (l p) -> b (c p) l"
        return x.view(b, c, length // p, p).permute(0, 1, 3, 2).reshape(b, c * p, length // p)


class Unpatcher(nn.Module):
    """Output stem: channels unfolded back into `patch_size` frames, then a resnet block."""

    def __init__(
        self, in_channels: int, out_channels: int, patch_size: int, context_mapping_features: int | None
    ) -> None:
        super().__init__()
        _check_patch_size(in_channels, patch_size)
        self.patch_size = patch_size
        self.block = ResnetBlock1d(
            in_channels // patch_size, out_channels, num_groups=1, context_mapping_features=context_mapping_features
        )

    def forward(self, x: torch.Tensor, mapping: torch.Tensor | None) -> torch.Tensor:
        b, cp, length = x.shape
        p = self.patch_size
        # "b (c p) l -> b c (l p)"
        x = x.view(b, cp // p, p, length).permute(0, 1, 3, 2).reshape(b, cp // p, length * p)
        return self.block(x, mapping)


# ---------------------------------------------------------------------------------------------------------
# Attention
# ---------------------------------------------------------------------------------------------------------


def feed_forward(features: int, multiplier: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(features, features * multiplier), nn.GELU(), nn.Linear(features * multiplier, features)
    )


class MultiHeadAttention(nn.Module):
    """Split heads, scaled dot-product attention, merge heads, output projection (SAT's `AttentionBase`)."""

    def __init__(self, features: int, *, head_features: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.to_out = nn.Linear(head_features * num_heads, features)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        b, n, _ = q.shape
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        # Scale 1/sqrt(head_features), SDPA's default and SAT's. No mask here: see Attention.forward.
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class Attention(nn.Module):
    """Pre-norm attention: self-attention when `context_features` is None, else cross-attention."""

    def __init__(
        self, features: int, *, head_features: int, num_heads: int, context_features: int | None = None
    ) -> None:
        super().__init__()
        self.is_cross_attention = context_features is not None
        mid_features = head_features * num_heads
        context_features = features if context_features is None else context_features
        self.norm = nn.LayerNorm(features)
        # SAT creates this norm for self-attention too, where it is applied to the input itself.
        self.norm_context = nn.LayerNorm(context_features)
        self.to_q = nn.Linear(features, mid_features, bias=False)
        self.to_kv = nn.Linear(context_features, mid_features * 2, bias=False)
        self.attention = MultiHeadAttention(features, head_features=head_features, num_heads=num_heads)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if self.is_cross_attention and context is None:
            raise ValueError(
                "this U-Net has cross-attention (context_embedding_features is set) but no cross-attention "
                "conditioning was given: route a conditioner with cross_attention_cond_ids"
            )
        context = x if context is None else context
        x, context = self.norm(x), self.norm_context(context)
        q = self.to_q(x)
        k, v = self.to_kv(context).chunk(2, dim=-1)
        if context_mask is not None:
            # SAT masks padding tokens by zeroing their keys and values, not with -inf: a masked token
            # still takes softmax weight exp(0) but contributes nothing. Matched so that SAT checkpoints
            # (trained this way) behave as they did in SAT.
            mask = context_mask.unsqueeze(-1).to(k.dtype)
            k, v = k * mask, v * mask
        return self.attention(q, k, v)


class TransformerBlock(nn.Module):
    """Self-attention, optional cross-attention over the conditioning tokens, feed-forward; all residual."""

    def __init__(
        self,
        features: int,
        *,
        num_heads: int,
        head_features: int,
        multiplier: int,
        context_features: int | None = None,
    ) -> None:
        super().__init__()
        self.use_cross_attention = context_features is not None and context_features > 0
        self.attention = Attention(features, num_heads=num_heads, head_features=head_features)
        if self.use_cross_attention:
            self.cross_attention = Attention(
                features, num_heads=num_heads, head_features=head_features, context_features=context_features
            )
        self.feed_forward = feed_forward(features, multiplier)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.attention(x) + x
        if self.use_cross_attention:
            x = self.cross_attention(x, context=context, context_mask=context_mask) + x
        return self.feed_forward(x) + x


class Transformer1d(nn.Module):
    """GroupNorm + 1x1 conv in, transformer blocks over time, 1x1 conv out (channels-first outside)."""

    def __init__(
        self,
        num_layers: int,
        channels: int,
        *,
        num_heads: int,
        head_features: int,
        multiplier: int,
        context_features: int | None = None,
    ) -> None:
        super().__init__()
        self.to_in = nn.Sequential(
            nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True),
            SamePadConv1d(channels, channels, kernel_size=1),
            Rearrange("b c t -> b t c"),
        )
        self.blocks = nn.ModuleList(
            TransformerBlock(
                channels,
                num_heads=num_heads,
                head_features=head_features,
                multiplier=multiplier,
                context_features=context_features,
            )
            for _ in range(num_layers)
        )
        self.to_out = nn.Sequential(
            Rearrange("b t c -> b c t"),
            SamePadConv1d(channels, channels, kernel_size=1),
        )

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        x = self.to_in(x)
        for block in self.blocks:
            x = block(x, context=context, context_mask=context_mask)
        return self.to_out(x)


class AttentionSettings:
    """`attention_heads` / `attention_features` / `attention_multiplier` of the config, resolved per width."""

    def __init__(self, heads: int | None, features: int | None, multiplier: int | None) -> None:
        self.heads, self.features, self.multiplier = heads, features, multiplier

    def transformer(
        self, num_layers: int, channels: int, context_features: int | None, where: str
    ) -> Transformer1d:
        if (self.heads is None and self.features is None) or self.multiplier is None:
            raise ValueError(
                f"{where} has attention blocks (attentions > 0) but the config lacks attention_heads (or "
                "attention_features) and attention_multiplier"
            )
        if channels % 32 != 0:
            raise ValueError(
                f"{where}: attention runs on {channels} channels, which GroupNorm(32) cannot split: use "
                "channels * multipliers that are multiples of 32 where attentions > 0"
            )
        heads = self.heads if self.heads is not None else channels // self.features
        head_features = self.features if self.features is not None else channels // self.heads
        return Transformer1d(
            num_layers,
            channels,
            num_heads=heads,
            head_features=head_features,
            multiplier=self.multiplier,
            context_features=context_features,
        )


# ---------------------------------------------------------------------------------------------------------
# Time embedding
# ---------------------------------------------------------------------------------------------------------


class LearnedPositionalEmbedding(nn.Module):
    """Continuous t -> [t, sin(2 pi t w), cos(2 pi t w)] with learned frequencies w (dim + 1 features)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        if dim % 2 != 0:
            raise ValueError(f"the time embedding width (channels = {dim}) must be even")
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.unsqueeze(-1)
        freqs = x * self.weights.unsqueeze(0) * 2 * math.pi
        return torch.cat((x, freqs.sin(), freqs.cos()), dim=-1)


def TimePositionalEmbedding(dim: int, out_features: int) -> nn.Sequential:  # noqa: N802 (SAT's name)
    """Learned Fourier features of t followed by a linear layer (also SAT's `NumberEmbedder` core)."""
    return nn.Sequential(LearnedPositionalEmbedding(dim), nn.Linear(dim + 1, out_features))


# ---------------------------------------------------------------------------------------------------------
# U-Net levels
# ---------------------------------------------------------------------------------------------------------


class DownsampleBlock1d(nn.Module):
    """Downsample, (concat context channels), resnet blocks, optional transformer; returns x and skips."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        factor: int,
        num_groups: int,
        num_layers: int,
        kernel_multiplier: int,
        context_channels: int,
        num_transformer_blocks: int,
        attention: AttentionSettings,
        context_mapping_features: int | None,
        context_embedding_features: int | None,
        where: str,
    ) -> None:
        super().__init__()
        self.use_context = context_channels > 0
        self.downsample = make_downsample(in_channels, out_channels, factor, kernel_multiplier)
        self.blocks = nn.ModuleList(
            ResnetBlock1d(
                out_channels + context_channels if i == 0 else out_channels,
                out_channels,
                num_groups=num_groups,
                context_mapping_features=context_mapping_features,
            )
            for i in range(num_layers)
        )
        self.use_transformer = num_transformer_blocks > 0
        if self.use_transformer:
            self.transformer = attention.transformer(
                num_transformer_blocks, out_channels, context_embedding_features, where
            )

    def forward(
        self,
        x: torch.Tensor,
        *,
        mapping: torch.Tensor | None,
        channels: torch.Tensor | None,
        embedding: torch.Tensor | None,
        embedding_mask: torch.Tensor | None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.downsample(x)
        if self.use_context and channels is not None:
            x = torch.cat([x, channels], dim=1)
        skips = []
        for block in self.blocks:
            x = block(x, mapping)
            skips.append(x)
        if self.use_transformer:
            x = self.transformer(x, context=embedding, context_mask=embedding_mask)
            skips.append(x)
        return x, skips


class BottleneckBlock1d(nn.Module):
    """Resnet block, optional transformer, resnet block, at the lowest resolution."""

    def __init__(
        self,
        channels: int,
        *,
        num_groups: int,
        num_transformer_blocks: int,
        attention: AttentionSettings,
        context_mapping_features: int | None,
        context_embedding_features: int | None,
    ) -> None:
        super().__init__()
        self.pre_block = ResnetBlock1d(
            channels, channels, num_groups=num_groups, context_mapping_features=context_mapping_features
        )
        self.use_transformer = num_transformer_blocks > 0
        if self.use_transformer:
            self.transformer = attention.transformer(
                num_transformer_blocks, channels, context_embedding_features, "bottleneck"
            )
        self.post_block = ResnetBlock1d(
            channels, channels, num_groups=num_groups, context_mapping_features=context_mapping_features
        )

    def forward(
        self,
        x: torch.Tensor,
        *,
        mapping: torch.Tensor | None,
        embedding: torch.Tensor | None,
        embedding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = self.pre_block(x, mapping)
        if self.use_transformer:
            x = self.transformer(x, context=embedding, context_mask=embedding_mask)
        return self.post_block(x, mapping)


class UpsampleBlock1d(nn.Module):
    """Resnet blocks each fed one skip (scaled by 1/sqrt(2)), optional transformer, then upsample."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        factor: int,
        num_layers: int,
        num_groups: int,
        use_nearest: bool,
        skip_channels: int,
        use_skip_scale: bool,
        num_transformer_blocks: int,
        attention: AttentionSettings,
        context_mapping_features: int | None,
        context_embedding_features: int | None,
        where: str,
    ) -> None:
        super().__init__()
        self.skip_scale = 2**-0.5 if use_skip_scale else 1.0
        self.blocks = nn.ModuleList(
            ResnetBlock1d(
                in_channels + skip_channels,
                in_channels,
                num_groups=num_groups,
                context_mapping_features=context_mapping_features,
            )
            for _ in range(num_layers)
        )
        self.use_transformer = num_transformer_blocks > 0
        if self.use_transformer:
            self.transformer = attention.transformer(
                num_transformer_blocks, in_channels, context_embedding_features, where
            )
        self.upsample = make_upsample(in_channels, out_channels, factor, use_nearest)

    def forward(
        self,
        x: torch.Tensor,
        *,
        skips: list[torch.Tensor],
        mapping: torch.Tensor | None,
        embedding: torch.Tensor | None,
        embedding_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        for block in self.blocks:
            x = torch.cat([x, skips.pop() * self.skip_scale], dim=1)
            x = block(x, mapping)
        if self.use_transformer:
            x = self.transformer(x, context=embedding, context_mask=embedding_mask)
        return self.upsample(x)
