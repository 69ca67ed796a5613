"""The pretransform identity: which VAE (architecture, weights, scale) made a set of latents.

pre_encode records it in its manifest's properties; train and probe build the same identity for their model
and refuse latents whose recorded identity differs. One rule for all three: every key must be equal, a key
the latents lack included (an SAT pre_encoded dataset carries none; train says so and goes on unchecked).
"""
from __future__ import annotations

from collections.abc import Mapping

from pipeline.models.weights import architecture_sha256

IDENTITY_KEYS = ("architecture_sha256", "weights_sha256", "scale")


def pretransform_identity(block_config: dict, scale: float, weights_sha256: str | None) -> dict:
    """The identity of a pretransform: its autoencoder block (`model.pretransform.config`, or an autoencoder
    config's `model`), its latent scale and the sha256 of its weights (`weights.weights_sha256`)."""
    return {"architecture_sha256": architecture_sha256(block_config), "weights_sha256": weights_sha256,
            "scale": scale}


def identity_differences(recorded: Mapping, mine: Mapping) -> list[str]:
    """The identity keys whose values differ between the latents' `recorded` properties and `mine`."""
    return [k for k in IDENTITY_KEYS if recorded.get(k) != mine[k]]
