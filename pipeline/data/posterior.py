"""The VAE posterior draw of a batch, on the model's device: `(mean + std * noise) / scale`.

The loader ships `mean` and `std` as stored (fp16 or fp32) with one noise seed per sample: drawing 64 x 1024
normals per SAO sample on a loader core made mean+std shards the slowest format. Each sample's noise comes from its own
generator on the batch's device, seeded with that sample's seed, so a sample's latent does not depend on
batch size, rank count, worker count or resume (on one device type and torch version: CPU and CUDA
generators give different numbers for one seed). The seeds are Python ints: drawing reads no device tensor.
"""
from __future__ import annotations

import torch

from pipeline.data.latents import Batch

_generators: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    if device not in _generators:
        _generators[device] = torch.Generator(device)
    return _generators[device]


def sample_latents(batch: Batch) -> torch.Tensor:
    """(B, C, T) float32 latents on the batch's device: the loader's own for single-tensor shards or audio,
    else a fresh draw from each sample's posterior (zero where the frames are padding, as mean and std are)."""
    if batch.mean is None:
        return batch.latents
    mean, std = batch.mean.float(), batch.std.float()
    generator = _generator(mean.device)
    noise = torch.empty_like(mean)
    for i, seed in enumerate(batch.noise_seeds):
        generator.manual_seed(seed)
        noise[i] = torch.randn(mean.shape[1:], generator=generator, device=mean.device)
    return (mean + std * noise) / batch.scale
