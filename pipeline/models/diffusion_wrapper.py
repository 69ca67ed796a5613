"""Diffusion model wrappers: conditioning router and backbone adapters, with SAT's module nesting.

The conditioned model is `ConditionedDiffusionModelWrapper` with `.model` (the backbone adapter,
e.g. `DiTWrapper`, whose `.model` is the `DiffusionTransformer`), `.conditioner` (a
`MultiConditioner`) and `.pretransform`, so the state dict reads `model.model.transformer...`,
`conditioner.conditioners...`, `pretransform.model...` exactly as in SAT checkpoints.

Routing (`route`, a typed `Conditioning`; SAT's `get_conditioning_inputs` is its keyword dict): cross-attention
ids are concatenated along the sequence (a 2-D (B, C) tensor becomes one token), global ids along channels
(first element of each), prepend ids along the sequence, input-concat ids along channels (the backbone
resamples them to the input length).
Masks travel with their tokens. Every backbone adapter takes `predict(x, t, cond, guidance)` and keeps SAT's
keyword `forward` as a thin adapter onto it (see `pipeline/models/conditioning.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.diffusion.cfg import Guidance
from pipeline.backbones import CONDITIONED
from pipeline.models.conditioning import Conditioning
from pipeline.models.dit import DiffusionTransformer


class MissingConditioningError(KeyError):
    """A routed conditioning id has no tensor (no conditioner produced it and it was not injected)."""

    def __str__(self) -> str:  # KeyError would show the message in quotes
        return str(self.args[0])


def halve_parameters(module: nn.Module) -> None:
    """Multiply every parameter of `module` by 0.5 in place. SAT's wrappers (and Dance Diffusion's network)
    do this to their initial weights, a smaller-variance init; kept so that training from scratch starts
    where SAT's does."""
    with torch.no_grad():
        for param in module.parameters():
            param.mul_(0.5)


class DiTWrapper(nn.Module):
    """Adapter from the router's conditioning to the DiT's (SAT's `DiTWrapper`): every route."""

    accepts = CONDITIONED["dit"].accepts

    def __init__(self, model: DiffusionTransformer):
        super().__init__()
        self.model = model
        self.diffusion_objective = model.diffusion_objective
        self.min_input_length = model.patch_size

    def forward(self, x, t, cross_attn_cond=None, cross_attn_mask=None, negative_cross_attn_cond=None,
                negative_cross_attn_mask=None, input_concat_cond=None, negative_input_concat_cond=None,
                global_cond=None, negative_global_cond=None, prepend_cond=None, prepend_cond_mask=None,
                cfg_scale: float = 1.0, cfg_dropout_prob: float = 0.0, batch_cfg: bool = True,
                rescale_cfg: bool = False, scale_phi: float = 0.0, cfg_interval=(0.0, 1.0), mask=None):
        """SAT's keyword call, onto `predict`. `batch_cfg` must stay True (the DiT guides cond and uncond in one
        batched pass, as SAT asserts); `rescale_cfg` is accepted and unused, as in SAT: the DiT's rescale
        amount is `scale_phi` (0 turns it off)."""
        cond = Conditioning.from_sat(cross_attn_cond, cross_attn_mask, negative_cross_attn_cond,
                                     negative_cross_attn_mask, input_concat_cond, negative_input_concat_cond,
                                     global_cond, negative_global_cond, prepend_cond, prepend_cond_mask)
        guidance = Guidance(scale=cfg_scale, dropout_prob=cfg_dropout_prob, batch=batch_cfg, scale_phi=scale_phi,
                            interval=tuple(cfg_interval), sigma=self.model.objective.sigma)
        return self.predict(x, t, cond, guidance, mask=mask)

    def predict(self, x, t, cond: Conditioning, guidance: Guidance, mask=None):
        if not guidance.batch:
            raise ValueError("batch_cfg=False: the DiT guides cond and uncond in one batched pass only "
                             "(as SAT's DiTWrapper); pass batch_cfg=True or leave it out")
        return self.model.predict(x, t, cond, guidance, mask=mask)


class DiTUncondWrapper(nn.Module):
    """Unconditional DiT (SAT's `DiTUncondWrapper`, whose config names the io channels `in_channels`)."""

    def __init__(self, model: DiffusionTransformer):
        super().__init__()
        self.model = model
        self.io_channels = model.io_channels
        self.min_input_length = model.patch_size
        halve_parameters(self.model)  # SAT halves every initial weight of its unconditional models

    accepts = frozenset()

    def forward(self, x, t, mask=None, cfg_dropout_prob: float = 0.0, cfg_scale: float = 1.0):
        return self.model(x, t, mask=mask)

    def predict(self, x, t, cond: Conditioning, guidance: Guidance, mask=None):
        """No conditioning, so nothing to guide: the network's plain pass."""
        return self.model(x, t, mask=mask)


class DiffusionModelWrapper(nn.Module):
    """Unconditional diffusion model: `.model` backbone and optional `.pretransform`."""

    def __init__(self, model: nn.Module, io_channels: int, sample_size: int, sample_rate: int,
                 min_input_length: int, pretransform: nn.Module | None = None,
                 diffusion_objective: str = "v"):
        super().__init__()
        self.model = model
        self.pretransform = pretransform
        self.io_channels, self.sample_size, self.sample_rate = io_channels, sample_size, sample_rate
        self.min_input_length = min_input_length
        self.diffusion_objective = diffusion_objective
        self.conditioner = None

    def get_conditioning_inputs(self, conditioning_tensors=None, negative: bool = False) -> dict:
        return {}

    def route(self, conditioning_tensors=None, negative_tensors=None) -> Conditioning:
        return Conditioning()

    def predict(self, x, t, cond: Conditioning, guidance: Guidance, mask=None):
        return self.model.predict(x, t, cond, guidance, mask=mask)

    def forward(self, x, t, cond=None, **kwargs):
        """SAT's call (the backbone's keywords), or the typed call through DeepSpeed's engine (see
        `ConditionedDiffusionModelWrapper.forward`)."""
        if isinstance(cond, Conditioning):
            return self.predict(x, t, cond, **kwargs)
        return self.model(x, t, **kwargs)


class ConditionedDiffusionModelWrapper(nn.Module):
    def __init__(self, model: nn.Module, conditioner: nn.Module | None, io_channels: int, sample_rate: int,
                 min_input_length: int, diffusion_objective: str = "v",
                 distribution_shift_options: dict | None = None, pretransform: nn.Module | None = None,
                 cross_attn_cond_ids=(), global_cond_ids=(), input_concat_ids=(), prepend_cond_ids=()):
        super().__init__()
        self.model = model
        self.conditioner = conditioner
        self.pretransform = pretransform
        self.io_channels, self.sample_rate = io_channels, sample_rate
        self.min_input_length = min_input_length
        self.diffusion_objective = diffusion_objective
        self.distribution_shift_options = distribution_shift_options
        self.cross_attn_cond_ids = tuple(cross_attn_cond_ids)
        self.global_cond_ids = tuple(global_cond_ids)
        self.input_concat_ids = tuple(input_concat_ids)
        self.prepend_cond_ids = tuple(prepend_cond_ids)

    def _lookup(self, cond: dict, key: str, route: str):
        if key not in cond:
            raise MissingConditioningError(
                f"model.diffusion.{route} routes {key!r}, but the conditioning has no tensor for it (it has "
                f"{sorted(cond)}); add a conditioner with id {key!r}, list it in pre_encoded_keys, or inject "
                f"cond[{key!r}] = [tensor, mask]")
        return cond[key]

    def route(self, conditioning_tensors: dict, negative_tensors: dict | None = None) -> Conditioning:
        """{id: [tensor, mask]} (and a negative prompt's) -> the backbone's `Conditioning`."""
        cond = conditioning_tensors
        cross, cross_mask, global_cond, concat, prepend, prepend_mask = None, None, None, None, None, None
        if self.cross_attn_cond_ids:
            tokens, masks = [], []
            for key in self.cross_attn_cond_ids:
                emb, mask = self._lookup(cond, key, "cross_attention_cond_ids")
                if emb.dim() == 2:  # (B, C) -> one token
                    emb = emb.unsqueeze(1)
                    mask = None if mask is None else mask.unsqueeze(1)
                tokens.append(emb)
                # A pre-encoded tensor has no mask: all of its tokens are real.
                masks.append(torch.ones(emb.shape[:2], device=emb.device) if mask is None else mask)
            cross = torch.cat(tokens, dim=1)  # (B, S, C)
            cross_mask = torch.cat(masks, dim=1)  # (B, S); bool and float masks promote as in SAT
        if self.global_cond_ids:
            global_cond = torch.cat([self._lookup(cond, k, "global_cond_ids")[0] for k in self.global_cond_ids],
                                    dim=-1)
            if global_cond.dim() == 3:
                global_cond = global_cond.squeeze(1)  # (B, C)
        if self.input_concat_ids:
            concat = torch.cat([self._lookup(cond, k, "input_concat_ids")[0] for k in self.input_concat_ids],
                               dim=1)  # (B, C, T')
        if self.prepend_cond_ids:
            tokens, masks = [], []
            for key in self.prepend_cond_ids:
                emb, mask = self._lookup(cond, key, "prepend_cond_ids")
                tokens.append(emb)
                masks.append(torch.ones(emb.shape[:2], device=emb.device) if mask is None else mask)
            prepend = torch.cat(tokens, dim=1)
            prepend_mask = torch.cat(masks, dim=1)
        routed = Conditioning(cross_attn=cross, cross_attn_mask=cross_mask, global_cond=global_cond,
                              input_concat=concat, prepend=prepend, prepend_mask=prepend_mask)
        return routed if negative_tensors is None else routed.with_negative(self.route(negative_tensors))

    def get_conditioning_inputs(self, conditioning_tensors: dict, negative: bool = False) -> dict:
        """SAT's keyword dict of `route` (SAT's `get_conditioning_inputs`): the positive routes, or
        (``negative``) the negative_* arguments."""
        return self.route(conditioning_tensors).to_sat(negative)

    def predict(self, x: torch.Tensor, t: torch.Tensor, cond: Conditioning, guidance: Guidance,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """The typed call: routed conditioning and guidance settings."""
        return self.model.predict(x, t, cond, guidance, mask=mask)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond, **kwargs) -> torch.Tensor:
        """SAT's call: conditioning tensors ({id: [tensor, mask]}) and the backbone's SAT keywords (its own
        defaults). A routed `Conditioning` (with `guidance` and `mask`) is the typed call, `predict`: DeepSpeed's
        engine can only call `forward`, so the training loop reaches `predict` this way."""
        if isinstance(cond, Conditioning):
            return self.predict(x, t, cond, **kwargs)
        return self.model(x, t, **self.get_conditioning_inputs(cond), **kwargs)
