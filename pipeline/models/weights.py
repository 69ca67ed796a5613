"""Reading SAT checkpoints and identifying an autoencoder by its architecture and weights.

A VAE comes either as a standalone file (keys `encoder.*`, `decoder.*`) or inside a full model checkpoint
(keys `pretransform.model.encoder.*`, beside `model.*` and `conditioner.*`; SAT issue #112 asks for the
split). `autoencoder_state_dict` takes either; `weights_sha256` and `architecture_sha256` make up the
pretransform identity that pre_encode writes and train checks (ARCHITECTURE.md, stage 2).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
from collections.abc import Mapping

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file

from pipeline.config import canonical_json

PRETRANSFORM_PREFIX = "pretransform.model."
ARCHITECTURE_KEYS = ("encoder", "decoder", "bottleneck", "latent_dim", "downsampling_ratio", "io_channels")


def load_state_dict(source: str | bytes, name: str | None = None) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` file or a `.ckpt` holding `{"state_dict": ...}` (path, or the file's bytes + name).

    `.ckpt` files are read with `torch.load(weights_only=True)`: a pickle that needs more than tensors and
    plain containers is refused rather than executed.
    """
    name = name or (source if isinstance(source, str) else "<bytes>")
    if name.endswith(".safetensors"):
        return load_safetensors_file(source) if isinstance(source, str) else load_safetensors_bytes(source)
    if not name.endswith((".ckpt", ".pt", ".pth")):
        raise ValueError(f"{name}: expected a .safetensors or .ckpt file")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        data = torch.load(source, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"{name}: cannot be read with torch.load(weights_only=True): {e}") from None
    if isinstance(data, Mapping) and "state_dict" in data:
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{name}: expected a state dict of tensors (or a dict with key 'state_dict')")
    return dict(data)


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries whose key starts with `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def autoencoder_state_dict(state_dict: Mapping[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """The autoencoder's weights from a standalone VAE state dict or from a full model's `pretransform.model.*`."""
    if any(k.startswith(PRETRANSFORM_PREFIX) for k in state_dict):
        return strip_prefix(state_dict, PRETRANSFORM_PREFIX)
    if any(k.startswith(("model.", "conditioner.", "diffusion.")) for k in state_dict):
        raise ValueError(f"{source}: a diffusion checkpoint without `{PRETRANSFORM_PREFIX}*` weights; "
                         "give the VAE file with --pretransform-ckpt")
    if not any(k.startswith(("encoder.", "decoder.")) for k in state_dict):
        sample = sorted(state_dict)[:3]
        raise ValueError(f"{source}: no autoencoder weights found (no `encoder.*`/`decoder.*` or "
                         f"`{PRETRANSFORM_PREFIX}*` keys; first keys {sample})")
    return dict(state_dict)


def weights_sha256(state_dict: Mapping[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, byte length, bytes) of every tensor, names sorted, `pretransform.model.` stripped.

    The same weights give the same hash whether they come from a standalone VAE file or from a full SAO
    checkpoint. A dict mixing `pretransform.model.*` keys with others is refused: select the autoencoder
    part first with `autoencoder_state_dict`, so a DiT's weights never leak into a VAE's identity.
    """
    prefixed = [k.startswith(PRETRANSFORM_PREFIX) for k in state_dict]
    if any(prefixed) and not all(prefixed):
        raise ValueError("weights_sha256: the state dict mixes `pretransform.model.*` keys with others; "
                         "select the autoencoder's weights with autoencoder_state_dict() first")
    tensors = {k.removeprefix(PRETRANSFORM_PREFIX): v for k, v in state_dict.items()}
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        data = tensor.view(torch.uint8).numpy().tobytes()  # a byte view works for bf16 too (numpy has no bf16)
        dtype = str(tensor.dtype).removeprefix("torch.")
        digest.update(f"{name}\n{dtype}\n{len(data)}\n".encode())
        digest.update(data)
    return digest.hexdigest()


def architecture_sha256(autoencoder_config: Mapping) -> str:
    """sha256 of canonical JSON of the autoencoder block's architecture keys, `requires_grad` left out.

    `autoencoder_config` is SAT's autoencoder `model` block, or a pretransform's `config` block; the two
    SAO config copies (one marks the encoder `requires_grad: false`) hash equal.
    """
    missing = [k for k in ("encoder", "decoder", "latent_dim", "downsampling_ratio", "io_channels")
               if k not in autoencoder_config]
    if missing:
        raise ValueError(f"architecture_sha256: not an autoencoder block, missing {missing}; pass the autoencoder "
                         "config's `model` block or a pretransform's `config` block")
    picked = {k: autoencoder_config[k] for k in ARCHITECTURE_KEYS if k in autoencoder_config}
    return hashlib.sha256(canonical_json(_without_requires_grad(picked)).encode()).hexdigest()


def _without_requires_grad(obj):
    if isinstance(obj, Mapping):
        return {k: _without_requires_grad(v) for k, v in obj.items() if k != "requires_grad"}
    if isinstance(obj, list):
        return [_without_requires_grad(v) for v in obj]
    return obj


def load_autoencoder_weights(model: torch.nn.Module, source: str | Mapping[str, torch.Tensor]) -> str:
    """Load a VAE's weights (file path or state dict, standalone or full model) strictly; return weights_sha256."""
    name = source if isinstance(source, str) else "state dict"
    state_dict = load_state_dict(source) if isinstance(source, str) else source
    weights = autoencoder_state_dict(state_dict, os.path.basename(name))
    model.load_state_dict(weights, strict=True)
    return weights_sha256(weights)
