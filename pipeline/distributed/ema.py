"""An EMA of the weights that follows the engine's parameter layout.

Each rank keeps, in fp32, only the slice of each parameter that its optimizer owns, and updates it from
that optimizer's fp32 master copy: under ZeRO-3 the rank's partition (`safe_get_local_fp32_param`), under
ZeRO-1/2 the fragment of the flat fp32 partition linked to the parameter (`_hp_mapping`), and without
ZeRO (stage 0, fp32) the whole parameter on rank 0. So the EMA costs 4 bytes per parameter per job,
not per rank, and needs no collective. Each rank saves its slices in its own file; `consolidate`
stitches the files of all ranks into full tensors (at export, in any process, without
torch.distributed).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Callable, Iterable

import torch
from safetensors.torch import load_file, safe_open, save_file

from pipeline.diffusion.ema import EMA

FORMAT = "cantus-ema-shard/1"


@dataclasses.dataclass(slots=True)
class _Slice:
    name: str
    start: int
    """Offset of this slice in the flattened parameter."""
    shape: tuple[int, ...]
    """Shape of the whole parameter."""
    source: Callable[[], torch.Tensor]
    """Returns the current fp32 values of the slice (flat)."""


def _slice_of(name: str, p: torch.nn.Parameter, rank: int) -> _Slice | None:
    if hasattr(p, "ds_id"):  # ZeRO-3: this rank holds elements [rank * n, rank * n + n) of the flat param
        from deepspeed.utils import safe_get_local_fp32_param

        n = p.partition_numel()
        start = rank * n
        valid = max(0, min(n, p.ds_numel - start))
        if valid == 0:
            return None
        source = lambda: safe_get_local_fp32_param(p).flatten()[:valid]  # noqa: E731  (padding cut off)
        shape = tuple(p.ds_shape)
    elif getattr(p, "_hp_mapping", None) is not None:  # ZeRO-1/2: a fragment of the flat fp32 partition
        address = p._hp_mapping.lp_fragment_address
        start = address.start
        source = lambda: p._hp_mapping.get_hp_fragment().flatten()  # noqa: E731
        shape = tuple(p.shape)
    elif hasattr(p, "_hp_mapping"):  # ZeRO-1/2, but another rank owns this parameter
        return None
    elif rank == 0:  # no ZeRO optimizer: the module's own (fp32) weights, replicated; rank 0 keeps them
        start = 0
        source = lambda: p.detach().float().flatten()  # noqa: E731
        shape = tuple(p.shape)
    else:
        return None
    return _Slice(name=name, start=start, shape=shape, source=source)


class ShardedEMA:
    """`update()` after each optimizer step on every rank; `save`/`load` per rank; `consolidate` the files.
    The averaging itself (SAT's decay warm-up) is `pipeline.diffusion.ema.EMA`, run on this rank's slices:
    the EMA of a slice is the slice of the EMA, since the update is elementwise."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], *, rank: int, world_size: int,
                 beta: float, power: float, update_every: int):
        self.rank = rank
        self.world_size = world_size
        self.slices = [s for name, p in named_params if (s := _slice_of(name, p, rank)) is not None]
        self.ema = EMA([s.source() for s in self.slices], beta=beta, power=power, update_every=update_every)

    def update(self) -> None:
        if self.slices:
            self.ema.update([s.source() for s in self.slices])
        else:  # this rank owns no slice (stage 0 on rank > 0): only count, as the others do
            self.ema.step += 1

    def _layout(self) -> dict:
        return {s.name: {"start": s.start, "shape": list(s.shape)} for s in self.slices}

    def save(self, path: str) -> None:
        meta = {"format": FORMAT, "rank": str(self.rank), "world_size": str(self.world_size),
                "updates": str(self.ema.step), "layout": json.dumps(self._layout())}
        save_file({s.name: t.detach().cpu().contiguous() for s, t in zip(self.slices, self.ema.shadow)}, path,
                  metadata=meta)

    def load(self, path: str) -> None:
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path}: not an EMA shard (format {meta.get('format')!r}, expected {FORMAT!r})")
        if int(meta["world_size"]) != self.world_size or int(meta["rank"]) != self.rank:
            raise ValueError(f"{path}: EMA shard of rank {meta['rank']}/{meta['world_size']}, this is rank "
                             f"{self.rank}/{self.world_size}: resume with the world size the checkpoint was saved with")
        if json.loads(meta["layout"]) != self._layout():
            raise ValueError(f"{path}: EMA layout differs from this engine's (another model or ZeRO stage?)")
        tensors = load_file(path)
        with torch.no_grad():
            for s, shadow in zip(self.slices, self.ema.shadow):
                shadow.copy_(tensors[s.name].to(shadow.device))
        self.ema.step = int(meta["updates"])


def consolidate(paths: list[str]) -> dict[str, torch.Tensor]:
    """Full fp32 tensors from the per-rank EMA files of one checkpoint; every element must be covered once."""
    flat: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    covered: dict[str, int] = {}
    if not paths:
        raise ValueError("no EMA shard file given")
    worlds = set()
    for path in paths:
        with safe_open(path, "pt") as f:
            meta = f.metadata()
            worlds.add(int(meta["world_size"]))
            for name, where in json.loads(meta["layout"]).items():
                shapes[name] = tuple(where["shape"])
                part = f.get_tensor(name).flatten()
                full = flat.setdefault(name, torch.zeros(math.prod(shapes[name]), dtype=torch.float32))
                full[where["start"]:where["start"] + part.numel()] = part
                covered[name] = covered.get(name, 0) + part.numel()
    if len(worlds) != 1 or len(paths) != worlds.pop():
        raise ValueError(f"EMA shards {paths}: expected one file per rank of a single run")
    for name, full in flat.items():
        if covered[name] != full.numel():
            raise ValueError(f"EMA tensor {name}: the shards cover {covered[name]} of {full.numel()} elements")
    return {name: full.reshape(shapes[name]) for name, full in flat.items()}
