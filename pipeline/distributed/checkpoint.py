"""Checkpoint I/O: DeepSpeed checkpoints with our client state, the EMA shards, and the fp32 weights an export
takes (the export file itself: `pipeline.export_file`).

A checkpoint `<root>/<tag>/` holds DeepSpeed's files, one `rank-<r>.safetensors` per rank (step, data
position, RNG states, config sha256; DeepSpeed keeps its own client state only on rank 0 under ZeRO-1/2,
and every rank has its own RNG), one `ema-rank-<r>.safetensors` per rank (`pipeline.distributed.ema`),
`files.json` (every file of the checkpoint, so a resume downloads it without listing the store) and,
written last by rank 0, `ema.safetensors`: the model in SAT's unwrapped layout.

`save` and `load` run on every rank (a rank-0-only DeepSpeed save hangs). When the output is S3, each
rank writes into its own local staging folder and uploads exactly the files it wrote.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from pipeline import storage
from pipeline.distributed.ema import ShardedEMA
from pipeline.distributed.safe_load import weights_only_loads
from pipeline.models.weights import read_safetensors, safetensors_header

logger = logging.getLogger(__name__)

FORMAT = "cantus-train-state/1"
"""Safetensors metadata key holding the model config JSON (SAT's `model_config` as a string)."""


def tag_for(step: int) -> str:
    return f"step-{step:09d}"


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ResumeState:
    step: int
    """Optimizer steps done."""
    client: dict
    """This rank's JSON state given to `save` (loader position, timestep sampler, ...)."""
    config_sha256: str


def _rng_tensors(generators: dict[str, torch.Generator]) -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["rng.cuda"] = torch.cuda.get_rng_state()
    for name, g in generators.items():
        out[f"rng.gen.{name}"] = g.get_state()
    return out


def _set_rng(tensors: dict[str, torch.Tensor], generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available() and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    for name, g in generators.items():
        g.set_state(tensors[f"rng.gen.{name}"])


def save(engine, *, local_root: str, tag: str, rank: int, world_size: int, step: int, client: dict,
         config_sha256: str, generators: dict[str, torch.Generator], ema: ShardedEMA | None,
         extra: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Collective. Write this rank's part of checkpoint `tag` under `local_root`; return the files this rank
    wrote (relative to `local_root/tag`). `client`: this rank's JSON-able state; `extra`: more per-rank tensors (e.g. a discriminator's state)."""
    engine.save_checkpoint(local_root, tag=tag, client_state={"step": step, "config_sha256": config_sha256},
                           save_latest=False)
    folder = os.path.join(local_root, tag)
    meta = {"format": FORMAT, "step": str(step), "rank": str(rank), "world_size": str(world_size),
            "config_sha256": config_sha256, "client": json.dumps(client),
            "python_random": json.dumps(random.getstate()), "numpy_random": json.dumps(_np_state())}
    tensors = {**_rng_tensors(generators), **(extra or {})}
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(folder, f"rank-{rank:05d}.safetensors"),
              metadata=meta)
    if ema is not None:
        ema.save(os.path.join(folder, f"ema-rank-{rank:05d}.safetensors"))
    return _written_by(folder, rank)


def _np_state() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, gauss]


def _written_by(folder: str, rank: int) -> list[str]:
    """The files of this rank in a staging folder of its own (DeepSpeed names other ranks' files apart)."""
    found = []
    for base, _, names in os.walk(folder):
        found += [os.path.relpath(os.path.join(base, n), folder) for n in names]
    return sorted(found)


def publish(*, local_root: str, tag: str, remote_root: str | None, files: list[str]) -> list[str]:
    """Collective. Upload each rank's files (S3 output) and gather the list of all files of the checkpoint."""
    if remote_root is not None:
        for rel in files:
            storage.upload(os.path.join(local_root, tag, rel), storage.join(remote_root, tag, rel))
    gathered: list[list[str]] = [[] for _ in range(dist.get_world_size())] if dist.is_initialized() else [files]
    if dist.is_initialized():
        dist.all_gather_object(gathered, files)
    return sorted({f for part in gathered for f in part})


def fetch(remote_tag_url: str, local_folder: str) -> None:
    """Download a checkpoint folder listed by its `files.json` (no listing of the store)."""
    files = json.loads(storage.read_bytes(storage.join(remote_tag_url, "files.json")))
    for rel in files:
        storage.download(storage.join(remote_tag_url, rel), os.path.join(local_folder, rel))


def load(engine, *, local_root: str, tag: str, rank: int, world_size: int, config_sha256: str,
         generators: dict[str, torch.Generator], ema: ShardedEMA | None) -> tuple[ResumeState, dict[str, torch.Tensor]]:
    """Collective. Restore engine, EMA, RNGs; return the resume state and this rank's extra tensors."""
    folder = os.path.join(local_root, tag)
    path = os.path.join(folder, f"rank-{rank:05d}.safetensors")
    if not os.path.exists(path):
        raise ValueError(f"{folder}: no state for rank {rank}; this run has world size {world_size} and a resume "
                         f"needs the world size the checkpoint was saved with")
    _, meta = safetensors_header(path)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    if int(meta["world_size"]) != world_size:
        raise ValueError(f"{folder} was saved by {meta['world_size']} ranks, this run has {world_size}: "
                         f"resume with the same world size (the data order and ZeRO partitions depend on it)")
    if meta["config_sha256"] != config_sha256:
        raise ValueError(f"{folder} was trained with model config sha256 {meta['config_sha256'][:12]}..., this run's "
                         f"config has {config_sha256[:12]}...: resume with the same config or use a new --output")
    with weights_only_loads():  # DeepSpeed's own files: no unpickling with arbitrary globals
        load_path, _ = engine.load_checkpoint(local_root, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    if load_path is None:
        raise ValueError(f"{folder}: DeepSpeed could not load the checkpoint")
    tensors = read_safetensors(path)
    _set_rng(tensors, generators)
    random.setstate(_tuplify(json.loads(meta["python_random"])))
    name, keys, pos, has_gauss, gauss = json.loads(meta["numpy_random"])
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if ema is not None:
        ema_path = os.path.join(folder, f"ema-rank-{rank:05d}.safetensors")
        safetensors_header(ema_path)  # a truncated or garbage file: one line naming it
        ema.load(ema_path)
    extra = {k: v for k, v in tensors.items() if not k.startswith("rng.")}
    return ResumeState(step=int(meta["step"]), client=json.loads(meta["client"]), config_sha256=meta["config_sha256"]), extra


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, list) else x


def remove_local(local_root: str, tag: str) -> None:
    shutil.rmtree(os.path.join(local_root, tag), ignore_errors=False)


# ----------------------------------------------------------------------------------------- export


def full_fp32_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective. The module's full fp32 state dict on CPU, parameters taken from the optimizer's fp32
    master copy where DeepSpeed keeps one (ZeRO-1/2/3, bf16), gathered under ZeRO-3."""
    from deepspeed.utils import safe_get_full_fp32_param
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p) if p.requires_grad else None
        if full is None and hasattr(p, "ds_id"):  # a frozen parameter partitioned by ZeRO-3
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                full = p.detach().float().clone()
        elif full is None:
            full = p.detach().float()
        out[name] = full.detach().cpu().clone()
    for name, b in module.named_buffers():
        out[name] = (b.detach().float() if b.is_floating_point() else b.detach()).cpu().clone()
    return out


def zero_fp32_state_dict(folder: str, source: str) -> dict[str, torch.Tensor]:
    """fp32 weights consolidated from the ZeRO 1-3 partitions of the local checkpoint `folder` (`<root>/<tag>`);
    errors name `source` (the URL the user gave)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    parent, tag = os.path.split(folder.rstrip("/"))
    if not os.path.isdir(folder):
        raise ValueError(f"{source}: no such checkpoint folder")
    if not any(n.startswith(("zero_pp_rank_", "bf16_zero_pp_rank_")) for n in os.listdir(folder)):
        raise ValueError(f"{source}: --no-ema needs a ZeRO 1-3 checkpoint (this one has no ZeRO partitions); "
                         f"train with use_ema false to export raw weights at each checkpoint")
    with weights_only_loads():  # zero_to_fp32 would unpickle with arbitrary globals by itself
        try:
            state = get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag)
        except (KeyError, IndexError, AssertionError) as e:  # files that load but do not hold what DeepSpeed wrote
            raise ValueError(f"{source}: DeepSpeed cannot consolidate this checkpoint ({type(e).__name__}: {e}); "
                             f"its files are damaged or incomplete") from None
    return {k: v.float() for k, v in state.items()}
