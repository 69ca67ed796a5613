"""The collectives the stages call outside DeepSpeed: metric means, gradient averages, sums, barriers.

Every stage run under a launcher has a process group (`env.init_process_group` creates a one-rank group for a
single process too). Each function here also works without one, as the world of one process it then is: the
train stage's `--dry-run` and the in-process tests of validation and demos run without a group.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """In place: the element-wise sum of `tensor` over all ranks (returned for chaining)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def mean_over_ranks(value: float, device: torch.device) -> float:
    """The mean of one float over all ranks (float64 on the CPU, float32 on an accelerator)."""
    if not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


def average_gradients(module: torch.nn.Module) -> None:
    """Replace each gradient of `module` by its mean over ranks, in one all-reduce of the flattened gradients
    (for a small replicated module trained beside the engine, e.g. the autoencoder's discriminator)."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if world_size() == 1 or not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset: offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_from_main(value):
    """Rank 0's `value` (any picklable object from our own ranks) on every rank."""
    if world_size() == 1:
        return value
    shared = [value]
    dist.broadcast_object_list(shared, src=0)
    return shared[0]
