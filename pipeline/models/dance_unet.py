"""Dance Diffusion U-Net (`DAU1d`): Harmonai's `DiffusionAttnUnet1D`.

A 14-level waveform U-Net: each level halves the length with a fixed cubic filter, runs three residual
conv blocks (with 1-D self-attention on the deepest `n_attn_layers` levels), recurses, and mirrors back up
with a cubic upsampler; the timestep enters as 16 Fourier features broadcast along time and concatenated
to the input channels.

Parameter names are those of stable-audio-tools (SAT) 0.0.16 and of Harmonai's sample-generator (the
published Dance Diffusion checkpoints): the nested `net.3.main.7.main.7...` layout comes from building the
levels as nested `nn.Sequential`s, kept here so those checkpoints load with `strict=True`. SAT after
0.0.16 cannot build this model (its `ResConvBlock` lost `use_snake`); this module does not depend on it.

`sample_generator_state_dict` converts a sample-generator training checkpoint's state dict to the
diffusion_uncond layout (`model.net...`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.diffusion.cfg import Guidance
from pipeline.models.blocks import Snake1d
from pipeline.backbones import CONDITIONED
from pipeline.models.conditioning import Conditioning
from pipeline.models.diffusion_wrapper import halve_parameters
from pipeline.models.unet1d import construct_checked

# Half-band resampling filters shared by sample-generator and SAT (`blocks._kernels`).
CUBIC_KERNEL = (
    -0.01171875, -0.03515625, 0.11328125, 0.43359375,
    0.43359375, 0.11328125, -0.03515625, -0.01171875,
)  # fmt: skip
TIMESTEP_FEATURES = 16


class ResConvBlock(nn.Module):
    """conv -> GroupNorm(1) -> GELU -> conv -> GroupNorm(1) -> GELU, plus a residual (1x1 conv if widths differ).

    The last block of the network ends at the second conv (no norm, no activation).
    """

    def __init__(
        self,
        c_in: int,
        c_mid: int,
        c_out: int,
        *,
        is_last: bool = False,
        kernel_size: int = 5,
        conv_bias: bool = True,
        use_snake: bool = False,
    ) -> None:
        super().__init__()

        def activation(channels: int) -> nn.Module:
            return Snake1d(channels) if use_snake else nn.GELU()

        pad = kernel_size // 2
        self.main = nn.Sequential(
            nn.Conv1d(c_in, c_mid, kernel_size, padding=pad, bias=conv_bias),
            nn.GroupNorm(1, c_mid),
            activation(c_mid),
            nn.Conv1d(c_mid, c_out, kernel_size, padding=pad, bias=conv_bias),
            nn.Identity() if is_last else nn.GroupNorm(1, c_out),
            nn.Identity() if is_last else activation(c_out),
        )
        self.skip = nn.Identity() if c_in == c_out else nn.Conv1d(c_in, c_out, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x) + self.skip(x)


class SelfAttention1d(nn.Module):
    """GroupNorm(1), fused 1x1 qkv projection, multi-head attention over time, 1x1 output, residual."""

    def __init__(self, c_in: int, n_head: int = 1) -> None:
        super().__init__()
        if n_head < 1 or c_in % n_head != 0:
            raise ValueError(
                f"DAU1d attention: {c_in} channels cannot be split into {n_head} heads (one per 32 channels): "
                "levels with attention (the deepest n_attn_layers + 1) need widths that are multiples of 32"
            )
        self.n_head = n_head
        self.norm = nn.GroupNorm(1, c_in)
        self.qkv_proj = nn.Conv1d(c_in, c_in * 3, 1)
        self.out_proj = nn.Conv1d(c_in, c_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, s = x.shape
        qkv = self.qkv_proj(self.norm(x)).view(n, self.n_head * 3, c // self.n_head, s).transpose(2, 3)
        q, k, v = qkv.chunk(3, dim=1)
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head dim), as the original
        return x + self.out_proj(y.transpose(2, 3).reshape(n, c, s))


class SkipBlock(nn.Module):
    """Runs `main` and concatenates its output with the block's input along channels (the U-Net skip)."""

    def __init__(self, *main: nn.Module) -> None:
        super().__init__()
        self.main = nn.Sequential(*main)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.main(x), x], dim=1)


class FourierFeatures(nn.Module):
    """t -> [cos(2 pi t W), sin(2 pi t W)] with a random (trained) frequency matrix W."""

    def __init__(self, in_features: int, out_features: int, std: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_features // 2, in_features) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * x @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


class CubicDownsample1d(nn.Module):
    """Halve the length: reflect-pad, filter each channel with the cubic kernel, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        kernel = torch.tensor(CUBIC_KERNEL)
        self.pad = kernel.shape[0] // 2 - 1
        self.register_buffer("kernel", kernel)  # persistent: it is in the published checkpoints

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad, self.pad), "reflect")
        weight = self.kernel.to(x.dtype).expand(x.shape[1], 1, -1)
        return F.conv1d(x, weight, stride=2, groups=x.shape[1])


class CubicUpsample1d(nn.Module):
    """Double the length: reflect-pad, transposed depthwise conv with twice the cubic kernel."""

    def __init__(self) -> None:
        super().__init__()
        kernel = torch.tensor(CUBIC_KERNEL) * 2
        self.pad = kernel.shape[0] // 2 - 1
        self.register_buffer("kernel", kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, ((self.pad + 1) // 2,) * 2, "reflect")
        weight = self.kernel.to(x.dtype).expand(x.shape[1], 1, -1)
        return F.conv_transpose1d(x, weight, stride=2, padding=self.pad * 2 + 1, groups=x.shape[1])


def learned_downsample(channels: int, factor: int) -> nn.Conv1d:
    """Strided conv dividing the length by `factor` (SAT's `Downsample1d_2`, kernel multiplier 2)."""
    return nn.Conv1d(channels, channels, kernel_size=factor * 2 + 1, stride=factor, padding=factor)


def learned_upsample(channels: int, factor: int) -> nn.Module:
    """Transposed conv multiplying the length by `factor`; a plain conv for factor 1 (`Upsample1d_2`)."""
    if factor == 1:
        return nn.Conv1d(channels, channels, kernel_size=3, padding=1)
    return nn.ConvTranspose1d(
        channels,
        channels,
        kernel_size=factor * 2,
        stride=factor,
        padding=factor // 2 + factor % 2,
        output_padding=factor % 2,
    )


def expand_to_planes(features: torch.Tensor, length: int) -> torch.Tensor:
    """(B, C) -> (B, C, length): a per-item vector repeated along time."""
    return features.unsqueeze(-1).expand(-1, -1, length)


class DiffusionAttnUnet1D(nn.Module):
    """The Dance Diffusion U-Net. `cond_dim` input-concat channels (0 for unconditional models)."""

    def __init__(
        self,
        io_channels: int = 2,
        depth: int = 14,
        n_attn_layers: int = 6,
        channels: Sequence[int] = (128, 128, 256, 256) + (512,) * 10,
        cond_dim: int = 0,
        cond_noise_aug: bool = False,
        kernel_size: int = 5,
        learned_resample: bool = False,
        strides: Sequence[int] = (2,) * 13,
        conv_bias: bool = True,
        use_snake: bool = False,
    ) -> None:
        super().__init__()
        if len(channels) < depth or len(strides) < depth - 1:
            raise ValueError(
                f"DAU1d config: depth {depth} needs {depth} channels and {depth - 1} strides, got "
                f"{len(channels)} channels and {len(strides)} strides"
            )
        strides = list(strides[: depth - 1])
        if not learned_resample and any(s != 2 for s in strides):
            # SAT raises for strides > 2 and crashes at run time for 1 (its fixed upsampler always doubles).
            raise ValueError(
                f"DAU1d config: strides {strides} need learned_resample: true; the fixed cubic resampler "
                "only halves and doubles (stride 2)"
            )
        self.io_channels = io_channels
        self.cond_dim = cond_dim
        self.cond_noise_aug = cond_noise_aug
        self.depth = depth
        self.learned_resample = learned_resample
        self.total_stride = math.prod(strides)
        if cond_noise_aug:
            self.rng = torch.quasirandom.SobolEngine(1, scramble=True)

        self.timestep_embed = FourierFeatures(1, TIMESTEP_FEATURES)

        def conv_block(c_in: int, c_mid: int, c_out: int, is_last: bool = False) -> ResConvBlock:
            return ResConvBlock(
                c_in, c_mid, c_out, is_last=is_last, kernel_size=kernel_size, conv_bias=conv_bias, use_snake=use_snake
            )

        def attention(c: int, enabled: bool) -> nn.Module:
            return SelfAttention1d(c, c // 32) if enabled else nn.Identity()

        # Built from the innermost level outwards; level i (2..depth) works at width channels[i-1].
        # sample-generator counts attention levels as `depth - n_attn_layers - 1` with `>=`; SAT as
        # `depth - n_attn_layers`: the same levels for SAT's n_attn_layers = sample-generator's + 1.
        first_attn_level = depth - n_attn_layers
        block: nn.Module = nn.Identity()
        for i in range(depth, 1, -1):
            c, c_prev, stride = channels[i - 1], channels[i - 2], strides[i - 2]
            attn = n_attn_layers > 0 and i >= first_attn_level
            block = SkipBlock(
                learned_downsample(c_prev, stride) if learned_resample else CubicDownsample1d(),
                conv_block(c_prev, c, c),
                attention(c, attn),
                conv_block(c, c, c),
                attention(c, attn),
                conv_block(c, c, c),
                attention(c, attn),
                block,
                conv_block(c if i == depth else c * 2, c, c),  # the innermost level has no skip to concat
                attention(c, attn),
                conv_block(c, c, c),
                attention(c, attn),
                conv_block(c, c, c_prev),
                attention(c_prev, attn),
                learned_upsample(c_prev, stride) if learned_resample else CubicUpsample1d(),
            )
        c = channels[0]
        embed_dim = TIMESTEP_FEATURES * (2 if cond_noise_aug else 1)
        self.net = nn.Sequential(
            conv_block(io_channels + cond_dim + embed_dim, c, c),
            conv_block(c, c, c),
            conv_block(c, c, c),
            block,
            conv_block(c * 2, c, c),
            conv_block(c, c, c),
            conv_block(c, c, io_channels, is_last=True),
        )
        halve_parameters(self.net)  # the original halves the network's initial weights (not the timestep features)

    @property
    def min_input_length(self) -> int:
        """Lengths must be multiples of this (SAT's `min_input_length`: the product of the strides)."""
        return self.total_stride

    @property
    def shortest_input_length(self) -> int:
        """The fixed cubic upsampler reflect-pads 2 frames, so the deepest level needs 3 frames."""
        return self.total_stride * (1 if self.learned_resample else 3)

    def check_length(self, length: int) -> None:
        if length % self.total_stride != 0 or length < self.shortest_input_length:
            raise ValueError(
                f"DAU1d input length {length} must be a multiple of {self.total_stride} (the product of the "
                f"strides of its {self.depth - 1} downsampling levels) and at least {self.shortest_input_length}; "
                f"the minimum length is {self.shortest_input_length}: use such a sample_size"
            )

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: torch.Tensor | None = None,
        cond_aug_scale: float | None = None,
    ) -> torch.Tensor:
        self.check_length(x.shape[2])
        inputs = [x, expand_to_planes(self.timestep_embed(t[:, None]), x.shape[2])]
        if (cond is None) != (self.cond_dim == 0):
            raise ValueError(
                f"DAU1d was built with cond_dim {self.cond_dim} but was given "
                f"{'no conditioning' if cond is None else f'{cond.shape[1]} conditioning channels'}: set "
                "cond_dim in the backbone config to the total input-concat + global conditioning channels"
            )
        if cond is not None:
            if cond.shape[1] != self.cond_dim:
                raise ValueError(
                    f"DAU1d conditioning has {cond.shape[1]} channels, the config's cond_dim is {self.cond_dim}"
                )
            if cond.shape[2] != x.shape[2]:
                cond = F.interpolate(cond, (x.shape[2],), mode="linear", align_corners=False)
            if self.cond_noise_aug:
                # Noise-level augmentation of the conditioning signal; the level is embedded with the same
                # Fourier features as the timestep. A Sobol draw in training, or a fixed level if given.
                if cond_aug_scale is None:
                    aug_level = self.rng.draw(cond.shape[0])[:, 0].to(cond)
                else:
                    aug_level = torch.full((cond.shape[0],), cond_aug_scale).to(cond)
                cond = cond + torch.randn_like(cond) * aug_level[:, None, None]
                inputs.append(expand_to_planes(self.timestep_embed(aug_level[:, None]), x.shape[2]))
            inputs.append(cond)
        return self.net(torch.cat(inputs, dim=1))


class DAU1DUncond(DiffusionAttnUnet1D):
    """`DAU1d` in diffusion_uncond. SAT uses the network itself as the backbone (keys `model.net...`), so this
    subclass only adapts the call: the training loop's CFG arguments have nothing to act on."""

    accepts = frozenset()

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        mask: torch.Tensor | None = None,
        cfg_dropout_prob: float = 0.0,
        cfg_scale: float = 1.0,
    ) -> torch.Tensor:
        return self.predict(x, t, Conditioning(), Guidance(), mask=mask)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: Guidance,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """The typed call, as every backbone wrapper's (no conditioning, nothing to guide)."""
        if mask is not None:
            raise ValueError("DAU1d has no padding mask: set training.mask_padding to false")
        return super().forward(x, t)


class DAU1DCondWrapper(nn.Module):
    """`DAU1d` in diffusion_cond: input-concat and global conditioning.

    SAT's wrapper takes input-concat only (and its factory has no `DAU1d` branch). Here global
    conditioning (B, C_g) is broadcast along time and concatenated after the input-concat channels, the way
    sample-generator fed its global latent (`latent_dim`): `cond_dim` in the config is the total, input-concat
    channels + global features, so the parameter layout is SAT's. Like SAT, no guidance (no null condition).
    """

    accepts = CONDITIONED["DAU1d"].accepts

    def __init__(self, **config) -> None:
        super().__init__()
        self.model = DiffusionAttnUnet1D(**config)
        self.min_input_length = self.model.min_input_length
        halve_parameters(self.model)  # SAT's wrapper halves again, on top of the network's own halving

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
        cond_aug_scale: float | None = None,
    ) -> torch.Tensor:
        """SAT's keyword call, onto `predict` (no guidance: the guidance settings are ignored)."""
        cond = Conditioning.from_sat(cross_attn_cond, cross_attn_mask, negative_cross_attn_cond,
                                     negative_cross_attn_mask, input_concat_cond, negative_input_concat_cond,
                                     global_cond, negative_global_cond, prepend_cond, prepend_cond_mask,
                                     cond_aug_scale=cond_aug_scale)
        cond.check_routes(self.accepts, "DAU1d")
        return self.predict(x, t, cond, Guidance(scale=cfg_scale, dropout_prob=cfg_dropout_prob), mask=mask)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: Guidance,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is not None:
            raise ValueError("DAU1d has no padding mask: set training.mask_padding to false")
        conds = []
        if cond.input_concat is not None:
            input_concat_cond = cond.input_concat
            if input_concat_cond.shape[2] != x.shape[2]:
                input_concat_cond = F.interpolate(
                    input_concat_cond, (x.shape[2],), mode="linear", align_corners=False
                )
            conds.append(input_concat_cond)
        if cond.global_cond is not None:
            conds.append(expand_to_planes(cond.global_cond.reshape(cond.global_cond.shape[0], -1), x.shape[2]))
        joined = torch.cat(conds, dim=1) if conds else None
        return self.model(x, t, cond=joined, cond_aug_scale=cond.cond_aug_scale)


def sample_generator_state_dict(
    state_dict: Mapping[str, torch.Tensor], use_ema: bool = True
) -> dict[str, torch.Tensor]:
    """A sample-generator checkpoint's `state_dict` (`diffusion.*`, `diffusion_ema.*`) in the diffusion_uncond
    layout (`model.*`, i.e. `model.net...`, `model.timestep_embed.weight`).

    Its `DiffusionAttnUnet1D(global_args, io_channels=2, n_attn_layers=4)` is our
    `DiffusionAttnUnet1D(io_channels=2, n_attn_layers=5)` (the attention levels are counted one apart).
    """
    prefix = "diffusion_ema." if use_ema else "diffusion."
    converted = {"model." + k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not converted:
        sample = sorted(state_dict)[:5]
        raise ValueError(
            f"no key starts with {prefix!r}: not a sample-generator checkpoint state dict (first keys: {sample})"
        )
    return converted


def build_dau_cond(diffusion, model_config) -> nn.Module:
    """Factory builder for `DAU1d` in diffusion_cond (absent from SAT's factory, listed in its docs)."""
    return construct_checked(
        DAU1DCondWrapper, diffusion.config, "model.diffusion.config", [DiffusionAttnUnet1D.__init__]
    )


def build_dau_uncond(diffusion, model_config) -> nn.Module:
    return construct_checked(DAU1DUncond, diffusion.config, "model.config", [DiffusionAttnUnet1D.__init__])
