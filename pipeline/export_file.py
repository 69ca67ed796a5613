"""The exported model file: one `.safetensors` in SAT's unwrapped layout, the model config JSON in its metadata.

Written by train (each checkpoint's `ema.safetensors`) and export; read by export, render and probe. SAT and
SAO checkpoints have the same layout and may carry no `model_config`. The embedded config is data: it is
parsed as JSON here and validated by `load_model_config`, never used to import anything.
"""
from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import save_file

from pipeline import storage
from pipeline.config_json import ConfigError
from pipeline.models.weights import read_safetensors, safetensors_header

MODEL_CONFIG_KEY = "model_config"
"""The metadata key that holds the model config JSON (SAT's `model_config` files, embedded)."""
_MAX_HEADER = 256 * 1024 * 1024


def write_export(path: str, tensors: dict[str, torch.Tensor], model_config: dict, *, ema: bool) -> None:
    """One safetensors file in SAT's unwrapped layout, the model config JSON under metadata `model_config`."""
    meta = {MODEL_CONFIG_KEY: json.dumps(model_config), "format": "pt", "cantus_weights": "ema" if ema else "raw"}
    save_file({k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}, path, metadata=meta)


def read_export(path: str) -> tuple[dict[str, torch.Tensor], dict | None, dict[str, str]]:
    """(tensors, model config or None, metadata) of an exported or SAT safetensors file (a local path)."""
    _, meta = safetensors_header(path)
    return read_safetensors(path), embedded_config(path, meta), meta


def embedded_config(source: str, meta: dict[str, str]) -> dict | None:
    """The model config a file's metadata carries, as a dict, or None when it carries none."""
    if MODEL_CONFIG_KEY not in meta:
        return None
    try:
        config = json.loads(meta[MODEL_CONFIG_KEY])
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: metadata {MODEL_CONFIG_KEY} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: metadata {MODEL_CONFIG_KEY} is not a JSON object")
    return config


def read_metadata(url: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file at a local path or S3 URL, reading only its header: 8 bytes
    of header length, then the JSON header (so planning a render downloads no weights)."""
    with storage.open_read(url) as f:
        head = _read_exact(f, 8, url)
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER:
            raise ConfigError(f"{url}: not a safetensors file (header length {length})")
        try:
            header = json.loads(_read_exact(f, length, url))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{url}: not a safetensors file (bad header: {e})") from None
    return dict(header.get("__metadata__") or {})


def _read_exact(f, n: int, url: str) -> bytes:
    data = b""
    while len(data) < n:
        chunk = f.read(n - len(data))
        if not chunk:
            raise ConfigError(f"{url}: file ends inside the safetensors header")
        data += chunk
    return data
