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
import re
from collections.abc import Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file as load_safetensors_file

from pipeline.config_json import canonical_json

PRETRANSFORM_PREFIX = "pretransform.model."
ARCHITECTURE_KEYS = ("encoder", "decoder", "bottleneck", "latent_dim", "downsampling_ratio", "io_channels")


def load_state_dict(source: str | bytes, name: str | None = None) -> dict[str, torch.Tensor]:
    """Read a `.safetensors` file or a `.ckpt`/`.pt` holding `{"state_dict": ...}` (path, or the file's bytes + name).

    `.ckpt` files come from storage, so they are untrusted: they are read with `torch.load(weights_only=True)`
    and no extra allowed class, so a pickle that needs more than tensors and plain containers is refused
    rather than executed. A file that cannot be read is a ValueError naming it.
    """
    name = name or (source if isinstance(source, str) else "<bytes>")
    if name.endswith(".safetensors"):
        return read_safetensors(source, name)
    if not name.endswith((".ckpt", ".pt", ".pth")):
        raise ValueError(f"{name}: expected a .safetensors or .ckpt file")
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    try:
        data = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{name}: no such file") from None
    except Exception as e:  # noqa: BLE001 - unpickling_error keeps what is not a file fault
        raise unpickling_error(name, e) from None
    if isinstance(data, Mapping) and "state_dict" in data:
        data = data["state_dict"]
    if not isinstance(data, Mapping) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{name}: expected a state dict of tensors (or a dict with key 'state_dict')")
    return dict(data)


def unpickling_error(name: str, error: BaseException) -> BaseException:
    """The one-line ValueError for a pickle that weights-only loading refused or could not read (other errors
    are returned unchanged). Torch's own text advises turning weights-only loading off, which would run the
    file's code: that advice is not passed on."""
    if isinstance(error, pickle.UnpicklingError):
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f"it asks for the Python object `{found.group(1)}`" if found else "its pickle is not one torch writes"
        return ValueError(f"{name}: refused to load: {what}; Cantus unpickles only tensors, plain containers and a "
                          f"few known DeepSpeed classes (a damaged file, or one not written by Cantus/torch.save "
                          f"of weights: convert it to .safetensors)")
    if isinstance(error, (RuntimeError, EOFError)):
        first = str(error).strip().split(". ")[0].splitlines()[0] if str(error).strip() else type(error).__name__
        return ValueError(f"{name}: not a readable torch checkpoint (truncated or damaged?): {first[:160]}")
    return error


def read_safetensors(source: str | bytes, name: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` (path or bytes); a truncated or garbage file is a ValueError naming it."""
    name = name or (source if isinstance(source, str) else "<bytes>")
    try:
        return load_safetensors_file(source) if isinstance(source, str) else load_safetensors_bytes(source)
    except FileNotFoundError:
        raise ValueError(f"{name}: no such file") from None
    except SafetensorError as e:
        raise ValueError(f"{name}: not a readable .safetensors file (truncated or damaged?): {e}") from None


def safetensors_header(path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """(tensor name -> shape, metadata) of a `.safetensors` file, reading its header only."""
    try:
        with safe_open(path, "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, dict(f.metadata() or {})
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable .safetensors file (truncated or damaged?): {e}") from None


def check_layout(expected: Mapping[str, tuple[int, ...]], tensors: Mapping[str, "torch.Tensor | tuple"],
                 source: str, what: str = "the model") -> None:
    """One line naming `source` when the tensor names or shapes differ from `expected` (name -> shape)."""
    shapes = {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in tensors.items()}
    missing, extra = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    other = sorted(k for k in set(expected) & set(shapes) if shapes[k] != tuple(expected[k]))
    if missing or extra or other:
        parts = [f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "",
                 f"{len(extra)} unexpected (e.g. {extra[:3]})" if extra else "",
                 f"{len(other)} of another shape (e.g. {other[0]} is {list(shapes[other[0]])}, expected "
                 f"{list(expected[other[0]])})" if other else ""]
        raise ValueError(f"{source}: the weights do not match {what}: {', '.join(p for p in parts if p)}")


def load_strict(module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: str, what: str = "the model"
                ) -> None:
    """`module.load_state_dict(tensors, strict=True)`, names and shapes checked first (one line naming `source`)."""
    check_layout({k: tuple(v.shape) for k, v in module.state_dict().items()}, tensors, source, what)
    module.load_state_dict(tensors, strict=True)


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
    load_strict(model, weights, name, "the model config's autoencoder")
    return weights_sha256(weights)
