"""Diffusion Transformer (DiT) with stable-audio-tools' arguments and state-dict names.

x (B, C, T) and t (B,) in, the model output (B, C, T) out. Timestep features (Fourier, 256) go
through a 2-layer MLP and are added to the projected global conditioning; with
`global_cond_type="prepend"` (SAO) that sum becomes one prepended token, with `"adaLN"` it modulates
every block. Classifier-free guidance runs conditioned and unconditioned rows in one batched forward
(`predict`, combined by `pipeline.diffusion.cfg.apply_cfg`; SAT's keyword `forward` adapts onto it), the
network itself is `_forward`.

Where we differ from SAT (both off by default, so an SAT config behaves exactly as in SAT):
- `attention_masks=True` honours the input padding `mask` and the positive cross-attention mask;
  SAT ignores the first and sets the second to None.
- `checkpointed_blocks` limits activation checkpointing to the first k blocks (SAT: all).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from pipeline.diffusion.cfg import Guidance, guide
from pipeline.diffusion.objectives import create_objective
from pipeline.models.conditioning import Conditioning
from pipeline.models.transformer import ContinuousTransformer

TRANSFORMER_TYPES = ("continuous_transformer", "x-transformers")
GLOBAL_COND_TYPES = ("prepend", "adaLN")
TIMESTEP_COND_TYPES = ("global", "input_concat")
TIMESTEP_FEATURES = 256


class FourierFeatures(nn.Module):
    """Random Fourier features of the timestep: [cos(2 pi t W), sin(2 pi t W)] (SAT's blocks.py)."""

    def __init__(self, in_features: int, out_features: int, std: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn([out_features // 2, in_features]) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * x @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


def _mlp(dim_in: int, dim_out: int, bias: bool) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_out, bias=bias), nn.SiLU(), nn.Linear(dim_out, dim_out, bias=bias))


class DiffusionTransformer(nn.Module):
    def __init__(self, io_channels: int = 32, patch_size: int = 1, embed_dim: int = 768,
                 cond_token_dim: int = 0, project_cond_tokens: bool = True, global_cond_dim: int = 0,
                 project_global_cond: bool = True, input_concat_dim: int = 0, prepend_cond_dim: int = 0,
                 depth: int = 12, num_heads: int = 8, transformer_type: str = "continuous_transformer",
                 global_cond_type: str = "prepend", timestep_cond_type: str = "global",
                 timestep_embed_dim: int | None = None, diffusion_objective: str = "v",
                 # ContinuousTransformer options SAT forwards through **kwargs, named here:
                 rotary_pos_emb: bool = True, zero_init_branch_outputs: bool = True,
                 final_cross_attn_ix: int = -1, num_memory_tokens: int = 0,
                 use_sinusoidal_emb: bool = False, use_abs_pos_emb: bool = False,
                 abs_pos_emb_max_length: int = 10000, layer_scale: bool = False,
                 attn_kwargs: dict | None = None, ff_kwargs: dict | None = None,
                 norm_kwargs: dict | None = None,
                 *, attention_masks: bool = False, checkpointing: bool | int = True,
                 attention_backend: str = "auto"):
        super().__init__()
        for name, value, choices in (("transformer_type", transformer_type, TRANSFORMER_TYPES),
                                     ("global_cond_type", global_cond_type, GLOBAL_COND_TYPES),
                                     ("timestep_cond_type", timestep_cond_type, TIMESTEP_COND_TYPES)):
            if value not in choices:
                raise ValueError(f"model.diffusion.config.{name}={value!r}; expected one of {choices}")
        self.io_channels, self.patch_size, self.cond_token_dim = io_channels, patch_size, cond_token_dim
        self.transformer_type, self.global_cond_type = transformer_type, global_cond_type
        self.timestep_cond_type, self.diffusion_objective = timestep_cond_type, diffusion_objective
        self.attention_masks = attention_masks
        # The objective's noise level places the CFG interval (a plain object: nothing in the state dict).
        self.objective = create_objective(diffusion_objective, "model.diffusion.diffusion_objective")

        self.timestep_features = FourierFeatures(1, TIMESTEP_FEATURES)
        if timestep_cond_type == "global":
            timestep_embed_dim = embed_dim
        elif timestep_embed_dim is None:
            raise ValueError("model.diffusion.config.timestep_embed_dim is required when timestep_cond_type "
                             "is 'input_concat'")
        else:
            input_concat_dim += timestep_embed_dim
        self.to_timestep_embed = _mlp(TIMESTEP_FEATURES, timestep_embed_dim, bias=True)

        cond_embed_dim = 0
        if cond_token_dim > 0:
            cond_embed_dim = embed_dim if project_cond_tokens else cond_token_dim
            self.to_cond_embed = nn.Sequential(nn.Linear(cond_token_dim, cond_embed_dim, bias=False), nn.SiLU(),
                                               nn.Linear(cond_embed_dim, cond_embed_dim, bias=False))
        if global_cond_dim > 0:
            global_embed_dim = embed_dim if project_global_cond else global_cond_dim
            self.to_global_embed = nn.Sequential(nn.Linear(global_cond_dim, global_embed_dim, bias=False),
                                                 nn.SiLU(), nn.Linear(global_embed_dim, global_embed_dim, bias=False))
        if prepend_cond_dim > 0:
            self.to_prepend_embed = nn.Sequential(nn.Linear(prepend_cond_dim, embed_dim, bias=False), nn.SiLU(),
                                                  nn.Linear(embed_dim, embed_dim, bias=False))
        self.input_concat_dim = input_concat_dim
        dim_in = io_channels + input_concat_dim

        if transformer_type == "continuous_transformer":
            if checkpointing is True:
                blocks = depth
            else:
                blocks = min(int(checkpointing), depth)  # False -> 0
            self.transformer = ContinuousTransformer(
                dim=embed_dim, depth=depth, dim_heads=embed_dim // num_heads, dim_in=dim_in * patch_size,
                dim_out=io_channels * patch_size, cross_attend=cond_token_dim > 0, cond_token_dim=cond_embed_dim,
                global_cond_dim=embed_dim if global_cond_type == "adaLN" else None,
                rotary_pos_emb=rotary_pos_emb, zero_init_branch_outputs=zero_init_branch_outputs,
                final_cross_attn_ix=final_cross_attn_ix, num_memory_tokens=num_memory_tokens,
                use_sinusoidal_emb=use_sinusoidal_emb, use_abs_pos_emb=use_abs_pos_emb,
                abs_pos_emb_max_length=abs_pos_emb_max_length, layer_scale=layer_scale,
                attn_kwargs=attn_kwargs, ff_kwargs=ff_kwargs, norm_kwargs=norm_kwargs,
                checkpointed_blocks=blocks, attention_backend=attention_backend)
        else:
            if global_cond_type == "adaLN":
                raise ValueError("model.diffusion.config.global_cond_type='adaLN' needs "
                                 "transformer_type='continuous_transformer'")
            try:
                from x_transformers import ContinuousTransformerWrapper, Encoder
            except ImportError as e:
                raise ImportError("model.diffusion.config.transformer_type='x-transformers' needs the "
                                  "x-transformers package (pip install x-transformers)") from e
            # The settings of SAT's x-transformers branch (<= 0.0.18), in x-transformers 2.x spelling
            # (the context width is `cross_attn_dim_context`; no absolute positions).
            self.transformer = ContinuousTransformerWrapper(
                dim_in=dim_in * patch_size, dim_out=io_channels * patch_size, max_seq_len=0,
                use_abs_pos_emb=False,
                attn_layers=Encoder(dim=embed_dim, depth=depth, heads=num_heads, attn_flash=True,
                                    cross_attend=cond_token_dim > 0,
                                    cross_attn_dim_context=None if cond_embed_dim == 0 else cond_embed_dim,
                                    zero_init_branch_output=True, rotary_pos_emb=True, ff_swish=True,
                                    ff_glu=True))

        # Zero-initialised 1x1 residual convolutions: identity at init.
        self.preprocess_conv = nn.Conv1d(dim_in, dim_in, 1, bias=False)
        nn.init.zeros_(self.preprocess_conv.weight)
        self.postprocess_conv = nn.Conv1d(io_channels, io_channels, 1, bias=False)
        nn.init.zeros_(self.postprocess_conv.weight)

    def _forward(self, x, t, mask=None, cross_attn_cond=None, cross_attn_cond_mask=None,
                 input_concat_cond=None, global_embed=None, prepend_cond=None, prepend_cond_mask=None):
        """One pass of the network. x (B, C, T), t (B,), masks bool (True = real token)."""
        if cross_attn_cond is not None:
            cross_attn_cond = self.to_cond_embed(cross_attn_cond)  # (B, S, Dc)
        if global_embed is not None:
            global_embed = self.to_global_embed(global_embed)  # (B, D)
        prepend_inputs, prepend_mask = None, None
        if prepend_cond is not None:
            prepend_inputs, prepend_mask = self.to_prepend_embed(prepend_cond), prepend_cond_mask  # (B, P, D)
        if input_concat_cond is not None:
            if input_concat_cond.shape[2] != x.shape[2]:
                input_concat_cond = F.interpolate(input_concat_cond, (x.shape[2],), mode="nearest")
            x = torch.cat([x, input_concat_cond], dim=1)  # (B, C + Ci, T)

        timestep_embed = self.to_timestep_embed(self.timestep_features(t[:, None]))  # (B, D)
        if self.timestep_cond_type == "global":
            global_embed = timestep_embed if global_embed is None else global_embed + timestep_embed
        else:
            x = torch.cat([x, timestep_embed.unsqueeze(2).expand(-1, -1, x.shape[2])], dim=1)

        if self.global_cond_type == "prepend" and global_embed is not None:
            ones = torch.ones((x.shape[0], 1), device=x.device, dtype=torch.bool)
            if prepend_inputs is None:
                prepend_inputs, prepend_mask = global_embed.unsqueeze(1), ones
            else:
                prepend_inputs = torch.cat([prepend_inputs, global_embed.unsqueeze(1)], dim=1)
                if prepend_mask is not None:
                    prepend_mask = torch.cat([prepend_mask, ones], dim=1)
        prepend_length = 0 if prepend_inputs is None else prepend_inputs.shape[1]

        x = self.preprocess_conv(x) + x
        x = rearrange(x, "b c t -> b t c")
        if self.patch_size > 1:
            x = rearrange(x, "b (t p) c -> b t (c p)", p=self.patch_size)  # (B, T/p, C p)

        if not self.attention_masks:  # SAT: masks are not used by the transformer
            mask, cross_attn_cond_mask, prepend_mask = None, None, None
        elif mask is not None and self.patch_size > 1:  # a patch is real if any of its frames is
            mask = rearrange(mask, "b (t p) -> b t p", p=self.patch_size).any(dim=-1)

        if self.transformer_type == "continuous_transformer":
            output = self.transformer(
                x, prepend_embeds=prepend_inputs, context=cross_attn_cond,
                global_cond=global_embed if self.global_cond_type == "adaLN" else None,
                key_mask=mask, prepend_mask=prepend_mask, context_mask=cross_attn_cond_mask)
        else:
            output = self.transformer(x, prepend_embeds=prepend_inputs, context=cross_attn_cond,
                                      context_mask=cross_attn_cond_mask, mask=mask, prepend_mask=prepend_mask)

        output = rearrange(output, "b t c -> b c t")[:, :, prepend_length:]
        if self.patch_size > 1:
            output = rearrange(output, "b (c p) t -> b c (t p)", p=self.patch_size)
        return self.postprocess_conv(output) + output

    def forward(self, x, t, cross_attn_cond=None, cross_attn_cond_mask=None, negative_cross_attn_cond=None,
                negative_cross_attn_mask=None, input_concat_cond=None, global_embed=None,
                negative_global_embed=None, prepend_cond=None, prepend_cond_mask=None,
                cfg_scale: float = 1.0, cfg_dropout_prob: float = 0.0, cfg_interval=(0.0, 1.0),
                scale_phi: float = 0.0, mask=None):
        """SAT's keyword call, onto `predict`; the CFG interval is placed on this model's objective's sigma.

        negative_global_embed is accepted and ignored, as in SAT (global conditioning is duplicated)."""
        cond = Conditioning(cross_attn=cross_attn_cond, cross_attn_mask=cross_attn_cond_mask,
                            global_cond=global_embed, input_concat=input_concat_cond, prepend=prepend_cond,
                            prepend_mask=prepend_cond_mask, negative_cross_attn=negative_cross_attn_cond,
                            negative_cross_attn_mask=negative_cross_attn_mask)
        guidance = Guidance(scale=cfg_scale, dropout_prob=cfg_dropout_prob, batch=True, scale_phi=scale_phi,
                            interval=tuple(cfg_interval), sigma=self.objective.sigma)
        return self.predict(x, t, cond, guidance, mask=mask)

    def predict(self, x, t, cond: Conditioning, guidance: Guidance, mask=None):
        """CFG dropout (training), batched CFG (sampling) or a plain pass. Negative global and input-concat
        conditioning are not used, as in SAT (the unconditioned rows see the same)."""
        dtype = next(self.parameters()).dtype
        x, t = x.to(dtype), t.to(dtype)
        cross_attn_cond, negative_cross_attn_cond, input_concat_cond, global_embed, prepend_cond = (
            None if v is None else v.to(dtype)
            for v in (cond.cross_attn, cond.negative_cross_attn, cond.input_concat, cond.global_cond, cond.prepend))
        cross_attn_cond_mask, prepend_cond_mask, mask = (
            None if m is None else m.bool() for m in (cond.cross_attn_mask, cond.prepend_mask, mask))
        negative_cross_attn_mask = cond.negative_cross_attn_mask

        if guidance.dropout_prob > 0.0 and guidance.scale == 1.0:
            cross_attn_cond = _drop_rows(cross_attn_cond, guidance.dropout_prob)
            prepend_cond = _drop_rows(prepend_cond, guidance.dropout_prob)

        guided = guidance.scale != 1.0 and (cross_attn_cond is not None or prepend_cond is not None)
        if not guided:
            return self._forward(x, t, mask=mask, cross_attn_cond=cross_attn_cond,
                                 cross_attn_cond_mask=cross_attn_cond_mask, input_concat_cond=input_concat_cond,
                                 global_embed=global_embed, prepend_cond=prepend_cond,
                                 prepend_cond_mask=prepend_cond_mask)

        batch_cond, batch_cond_mask = None, None
        if cross_attn_cond is not None:
            uncond, uncond_mask = torch.zeros_like(cross_attn_cond), cross_attn_cond_mask
            if negative_cross_attn_cond is not None:
                uncond = negative_cross_attn_cond
                if negative_cross_attn_mask is not None:
                    neg_mask = negative_cross_attn_mask.bool()
                    uncond = torch.where(neg_mask.unsqueeze(2), uncond, torch.zeros_like(uncond))
                    uncond_mask = neg_mask
            batch_cond = torch.cat([cross_attn_cond, uncond], dim=0)
            if self.attention_masks and (cross_attn_cond_mask is not None or uncond_mask is not None):
                batch_cond_mask = torch.cat([_ones_like_tokens(cross_attn_cond_mask, cross_attn_cond),
                                             _ones_like_tokens(uncond_mask, uncond)], dim=0)
        batch_prepend, batch_prepend_mask = None, None
        if prepend_cond is not None:
            batch_prepend = torch.cat([prepend_cond, torch.zeros_like(prepend_cond)], dim=0)
            if prepend_cond_mask is not None:
                batch_prepend_mask = torch.cat([prepend_cond_mask, prepend_cond_mask], dim=0)

        def twice(v):
            return None if v is None else torch.cat([v, v], dim=0)

        batch_output = self._forward(
            twice(x), twice(t), mask=twice(mask), cross_attn_cond=batch_cond, cross_attn_cond_mask=batch_cond_mask,
            input_concat_cond=twice(input_concat_cond), global_embed=twice(global_embed),
            prepend_cond=batch_prepend, prepend_cond_mask=batch_prepend_mask)
        cond_output, uncond_output = batch_output.chunk(2, dim=0)
        # Outside the CFG interval SAT returns the conditioned output (decided on row 0's noise level); the
        # unconditioned rows are computed even there (SAT skips them), so the choice stays on the device.
        return guide(cond_output, uncond_output, guidance, t)


def _drop_rows(cond: torch.Tensor | None, prob: float) -> torch.Tensor | None:
    """Replace each sample's conditioning by the null (zeros) with probability `prob`."""
    if cond is None:
        return None
    drop = torch.bernoulli(torch.full((cond.shape[0], 1, 1), prob, device=cond.device)).bool()
    return torch.where(drop, torch.zeros_like(cond), cond)


def _ones_like_tokens(mask: torch.Tensor | None, tokens: torch.Tensor) -> torch.Tensor:
    if mask is not None:
        return mask.bool()
    return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
