"""Parameters with their EMA values swapped in (`ema_swapped_in`), the trained values put back bit for bit.

Under ZeRO-3 the EMA slice of each parameter (which is exactly this rank's partition, `pipeline.distributed.ema`)
is copied into the parameter's partition `ds_tensor`, so the normal ZeRO-3 all-gather of a forward pass assembles
EMA weights; parameters that are gathered at that moment (persistent small ones) get the full EMA value,
all-gathered from the partitions. Under ZeRO-0/1/2 every rank holds full parameters: the EMA fragments are
summed across ranks into full tensors (they are disjoint) and copied into the parameters. No second model copy
is built, so this works for models that only fit sharded. Used by the training demos.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from pipeline.distributed.ema import ShardedEMA


def _zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _available(p: torch.nn.Parameter) -> bool:
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status == ZeroParamStatus.AVAILABLE


def _gather_partitions(p: torch.nn.Parameter) -> torch.Tensor:
    """Collective: the full ZeRO-3 parameter assembled from every rank's `ds_tensor` (padded partitions)."""
    parts = [torch.empty_like(p.ds_tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, p.ds_tensor.data.contiguous())
    return torch.cat(parts)[:p.ds_numel].view(p.ds_shape)


def _full_ema(name: str, p: torch.nn.Parameter, slices: dict) -> torch.Tensor:
    """Collective (ZeRO-0/1/2): the parameter's full EMA value; each rank contributes its disjoint fragment."""
    full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
    if name in slices:
        start, shadow = slices[name]
        full[start:start + shadow.numel()] = shadow.to(full.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(full)
    return full.view(p.shape)


@contextlib.contextmanager
def ema_swapped_in(params: list[tuple[str, torch.nn.Parameter]], ema: ShardedEMA):
    """Collective: inside the block the (name, parameter) pairs `ema` averages hold their EMA values; on exit
    the trained values are back, bit for bit. Every rank must enter, with the same parameters."""
    slices = {s.name: (s.start, shadow) for s, shadow in zip(ema.slices, ema.ema.shadow)}
    saved_part: dict[str, torch.Tensor] = {}
    saved_full: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        try:
            for name, p in params:
                if _zero3(p):
                    if getattr(p, "ds_secondary_tensor", None) is not None:
                        raise ValueError("demos with EMA weights do not support ZeRO++ hierarchical partitioning "
                                         "(zero_hpz_partition_size > 1 in the ds_config): set it to 1")
                    if name in slices:
                        saved_part[name] = p.ds_tensor.data.clone()
                        shadow = slices[name][1]
                        p.ds_tensor.data[:shadow.numel()].copy_(shadow.to(p.ds_tensor.dtype))
                    if _available(p):  # gathered now (persistent): the forward will not gather it again
                        saved_full[name] = p.data.clone()
                        p.data.copy_(_gather_partitions(p))
                else:
                    saved_full[name] = p.data.clone()
                    p.data.copy_(_full_ema(name, p, slices).to(p.dtype))
            yield
        finally:
            for name, p in params:
                if name in saved_part:
                    p.ds_tensor.data.copy_(saved_part[name])
                if name in saved_full and not (_zero3(p) and not _available(p)):
                    p.data.copy_(saved_full[name])  # (a ZeRO-3 parameter released during the block lives
                    #                                   in its restored partition alone)
                elif _zero3(p) and _available(p):  # gathered (and kept) during the block: from the restored partitions
                    p.data.copy_(_gather_partitions(p))
