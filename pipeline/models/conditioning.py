"""The one value conditioning travels in, from the router to every backbone: `Conditioning`.

`ConditionedDiffusionModelWrapper.route` builds it from the conditioners' {id: [tensor, mask]}; every
conditioned backbone wrapper takes `predict(x, t, cond, guidance)` (`guidance` a
`pipeline.diffusion.cfg.Guidance`). Each wrapper's `accepts` (config key names) comes from the backbone
registry (`pipeline.backbones`), which config validation asks, so a wrong route is a config error at load.
The wrappers' SAT keyword `forward` builds the same two values from SAT's arguments.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from pipeline.backbones import ROUTES


@dataclass(frozen=True)
class Conditioning:
    """Routed conditioning of one batch (SAT's `get_conditioning_inputs`, typed).

    cross_attn (B, S, C) with cross_attn_mask (B, S); global_cond (B, C); input_concat (B, C, T'), resampled to
    the input length by the backbone; prepend (B, P, C) with prepend_mask (B, P). The negative_* fields replace
    the null condition of CFG (a negative prompt). cond_aug_scale: DAU1d's fixed conditioning-noise level."""

    cross_attn: torch.Tensor | None = None
    cross_attn_mask: torch.Tensor | None = None
    global_cond: torch.Tensor | None = None
    input_concat: torch.Tensor | None = None
    prepend: torch.Tensor | None = None
    prepend_mask: torch.Tensor | None = None
    negative_cross_attn: torch.Tensor | None = None
    negative_cross_attn_mask: torch.Tensor | None = None
    negative_global_cond: torch.Tensor | None = None
    negative_input_concat: torch.Tensor | None = None
    cond_aug_scale: float | None = None

    @classmethod
    def from_sat(cls, cross_attn_cond=None, cross_attn_mask=None, negative_cross_attn_cond=None,
                 negative_cross_attn_mask=None, input_concat_cond=None, negative_input_concat_cond=None,
                 global_cond=None, negative_global_cond=None, prepend_cond=None, prepend_cond_mask=None,
                 cond_aug_scale=None) -> "Conditioning":
        """From SAT's keyword names (the backbone wrappers' `forward` arguments)."""
        return cls(cross_attn=cross_attn_cond, cross_attn_mask=cross_attn_mask, global_cond=global_cond,
                   input_concat=input_concat_cond, prepend=prepend_cond, prepend_mask=prepend_cond_mask,
                   negative_cross_attn=negative_cross_attn_cond, negative_cross_attn_mask=negative_cross_attn_mask,
                   negative_global_cond=negative_global_cond, negative_input_concat=negative_input_concat_cond,
                   cond_aug_scale=cond_aug_scale)

    def to_sat(self, negative: bool = False) -> dict:
        """SAT's keyword dict: the positive routes, or (``negative``) this value's routes as SAT's negatives."""
        if negative:
            return {"negative_cross_attn_cond": self.cross_attn, "negative_cross_attn_mask": self.cross_attn_mask,
                    "negative_global_cond": self.global_cond, "negative_input_concat_cond": self.input_concat}
        return {"cross_attn_cond": self.cross_attn, "cross_attn_mask": self.cross_attn_mask,
                "global_cond": self.global_cond, "input_concat_cond": self.input_concat,
                "prepend_cond": self.prepend, "prepend_cond_mask": self.prepend_mask}

    def with_negative(self, negative: "Conditioning") -> "Conditioning":
        """This conditioning with ``negative``'s routes as its negatives (a negative prompt)."""
        return Conditioning(**{f.name: getattr(self, f.name) for f in fields(self)} | {
            "negative_cross_attn": negative.cross_attn, "negative_cross_attn_mask": negative.cross_attn_mask,
            "negative_global_cond": negative.global_cond, "negative_input_concat": negative.input_concat})

    def check_routes(self, accepts: frozenset[str], backbone: str) -> None:
        """For a direct keyword call (the router's routes are checked when the config loads): fail on a route the backbone
        has no input for, naming the config key that would route it."""
        given = [key for key, name in ROUTES.items() if getattr(self, name) is not None and key not in accepts]
        if given:
            raise ValueError(f"{backbone} takes no {', '.join(given)} conditioning; it accepts "
                             f"{sorted(accepts)}")
