"""What config validation knows of each diffusion backbone, stated once: the conditioning routes it accepts
and needs, the config key that holds its global-conditioning width, and its own config checks.

`pipeline.config` asks this registry when it loads a config (a wrong route or width is a config error at
load); `pipeline.models.factory` pairs each type with its builder (the built module gives the minimum input
length), and the backbone wrappers take their `accepts`/`requires` from here. Plain data: no torch, no models.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

ROUTES = {"cross_attention_cond_ids": "cross_attn", "global_cond_ids": "global_cond",
          "input_concat_ids": "input_concat", "prepend_cond_ids": "prepend"}
"""The config keys (model.diffusion.*) that route conditioner ids, and the `Conditioning` field each fills."""


def _check_dit(config: dict, key: str) -> str | None:
    """The DiT's shape arguments are positive integers and its heads divide its width (SAT's defaults 768/8)."""
    for name in ("embed_dim", "num_heads", "depth", "patch_size", "io_channels"):
        value = config.get(name)
        if name in config and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            return f"{key}.{name}: expected a positive integer, got {_show(value)}"
    embed, heads = config.get("embed_dim", 768), config.get("num_heads", 8)
    if embed % heads:
        return f"{key}.num_heads={heads} must divide embed_dim={embed}"
    return None


@dataclass(frozen=True)
class Backbone:
    accepts: frozenset[str] = frozenset()
    """The routes (ROUTES keys) it has an input for."""
    requires: frozenset[str] = frozenset()
    """The routes that must not be empty."""
    global_width: tuple[str, int | None] | None = None
    """(config key, its default): the input width that must equal the summed width of the global conditioners."""
    check: Callable[[dict, str], str | None] | None = None
    """Its own checks of its ``config`` block (an error line, or None)."""


_UNET_ROUTES = frozenset({"global_cond_ids", "input_concat_ids"})
CONDITIONED = {
    "dit": Backbone(accepts=frozenset(ROUTES), global_width=("global_cond_dim", 0), check=_check_dit),
    "adp_cfg_1d": Backbone(accepts=_UNET_ROUTES | {"cross_attention_cond_ids"},
                           requires=frozenset({"cross_attention_cond_ids"}), global_width=("context_features", None)),
    "adp_1d": Backbone(accepts=_UNET_ROUTES, global_width=("context_features", None)),
    "DAU1d": Backbone(accepts=_UNET_ROUTES),
}
"""``diffusion_cond`` backbones (``model.diffusion.type``)."""
UNCONDITIONAL = {"dit": Backbone(check=_check_dit), "adp_uncond_1d": Backbone(), "adp_1d": Backbone(),
                 "DAU1d": Backbone()}
"""``diffusion_uncond`` backbones (``model.type``)."""


def backbone(model_type: str, name: str) -> Backbone | None:
    """The facts of backbone ``name`` for ``model_type``; None for a type the registry does not list (the
    factory then refuses it, listing the supported ones)."""
    return (CONDITIONED if model_type == "diffusion_cond" else UNCONDITIONAL).get(name)


def route_error(name: str, accepts: frozenset[str], routed: dict[str, tuple], required=frozenset(),
                key: str = "model.diffusion") -> str | None:
    """The error line for the first route in ``routed`` ({config key: ids}) that backbone ``name`` does not
    accept (or a required one left empty), else None."""
    for route, ids in routed.items():
        if ids and route not in accepts:
            return (f"{key}.{route}={list(ids)}: the {name!r} backbone has no such input; route these ids "
                    f"through {' or '.join(k for k in ROUTES if k in accepts)}")
    for route in sorted(required):
        if not routed.get(route):
            return f"{key}.{route} is empty: the {name!r} backbone needs at least one id routed there"
    return None


def _show(value) -> str:
    import json
    return json.dumps(value)
