"""The train stage's outputs: `<out>/config.json`, `<out>/checkpoints/<tag>/`, the ledger, `metrics.jsonl`.

`RunOutputs` knows the URLs and the local staging folder. The checkpoint sequence (all ranks, then rank 0):
save every rank's part, upload (S3), consolidate the export, write `<tag>/ema.safetensors`, copy the metrics
file, rewrite the ledger, delete what `--keep-last` dropped. The ledger never lists an incomplete checkpoint, and
the stored metrics file holds every step the ledger lists (a resume keeps those lines and redoes the rest).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil

import torch
import torch.distributed as dist

from pipeline import manifest, storage
from pipeline.distributed import checkpoint
from pipeline.distributed.ema import ShardedEMA, consolidate
from pipeline.export_file import write_export

logger = logging.getLogger(__name__)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class RunOutputs:
    out: str
    """The run's output URL (`--output`)."""
    scratch: str
    """Local folder of this rank for staged checkpoint files (S3 output) and temporary exports."""
    rank: int
    world_size: int

    @property
    def checkpoints(self) -> str:
        return storage.join(self.out, "checkpoints")

    @property
    def ledger(self) -> str:
        return storage.join(self.checkpoints, "manifest.json")

    @property
    def staged(self) -> bool:
        """DeepSpeed writes local files; an S3 output gets them uploaded."""
        return storage.is_s3(self.out)

    @property
    def local_root(self) -> str:
        """Where DeepSpeed writes and reads checkpoints on this rank."""
        return os.path.join(self.scratch, f"rank-{self.rank:05d}", "checkpoints") if self.staged else self.checkpoints

    @property
    def metrics_local(self) -> str:
        """metrics.jsonl is appended locally (S3 has no append) and copied to `<out>` at each checkpoint."""
        return os.path.join(self.scratch, "metrics.jsonl") if self.staged else storage.join(self.out, "metrics.jsonl")

    def log_metrics(self, record: dict) -> None:
        os.makedirs(os.path.dirname(self.metrics_local), exist_ok=True)
        with open(self.metrics_local, "a") as f:
            f.write(json.dumps(record) + "\n")

    def restart_metrics(self, step: int) -> None:
        """Rank 0 at start: keep the lines of steps <= `step` (those after the resumed checkpoint are redone)."""
        url = storage.join(self.out, "metrics.jsonl")
        lines = storage.read_bytes(url).decode().splitlines() if storage.exists(url) else []
        kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
        os.makedirs(os.path.dirname(self.metrics_local) or ".", exist_ok=True)
        with open(self.metrics_local, "w") as f:
            f.writelines(line + "\n" for line in kept)

    def sync_metrics(self) -> None:
        if self.staged and os.path.exists(self.metrics_local):
            storage.upload(self.metrics_local, storage.join(self.out, "metrics.jsonl"))

    def read_ledger(self) -> manifest.Ledger | None:
        return manifest.read_ledger(self.ledger) if storage.exists(self.ledger) else None

    def write_config(self, config_json: dict, sha256: str, extra: dict) -> None:
        """`<out>/config.json` (rank 0); refuses an output that holds a run of another config."""
        url = storage.join(self.out, "config.json")
        if storage.exists(url):
            old = json.loads(storage.read_bytes(url))
            if old.get("sha256") != sha256:
                raise ValueError(f"{url} holds a run with model config sha256 {str(old.get('sha256'))[:12]}..., this "
                                 f"config has {sha256[:12]}...: use another --output")
        storage.write(url, json.dumps({"sha256": sha256, "model_config": config_json, **extra}, indent=2).encode())

    def fetch(self, entry: manifest.CheckpointEntry) -> None:
        """Bring a checkpoint to this rank's staging folder (S3 output; each rank its own copy)."""
        if self.staged:
            checkpoint.fetch(entry.checkpoint_url, os.path.join(self.local_root, entry.tag))


def save_and_publish(outputs: RunOutputs, engine, *, step: int, client: dict, config_sha256: str,
                     generators: dict[str, torch.Generator], ema: ShardedEMA | None,
                     export_tensors, model_config: dict, ledger_header: dict, keep_last: int | None,
                     extra: dict[str, torch.Tensor] | None = None) -> manifest.CheckpointEntry:
    """Collective: one complete checkpoint at `step`, then the ledger. `export_tensors(ema_tensors | None)` is
    called on every rank (it may gather parameters) and returns the SAT-layout tensors on rank 0."""
    tag = checkpoint.tag_for(step)
    files = checkpoint.save(engine, local_root=outputs.local_root, tag=tag, rank=outputs.rank,
                            world_size=outputs.world_size, step=step, client=client, config_sha256=config_sha256,
                            generators=generators, ema=ema, extra=extra)
    tag_url = storage.join(outputs.checkpoints, tag)
    all_files = checkpoint.publish(local_root=outputs.local_root, tag=tag,
                                   remote_root=outputs.checkpoints if outputs.staged else None, files=files)
    _barrier()  # every rank's files are written (and uploaded) before rank 0 reads the EMA shards
    ema_tensors = _consolidated_ema(outputs, tag, tag_url) if ema is not None and outputs.rank == 0 else None
    tensors = export_tensors(ema_tensors)
    entry = None
    if outputs.rank == 0:
        export_url = storage.join(tag_url, "ema.safetensors")
        tmp = os.path.join(outputs.scratch, f"export-{tag}.safetensors")
        os.makedirs(outputs.scratch, exist_ok=True)
        write_export(tmp, tensors, model_config, ema=ema is not None)
        storage.write(storage.join(tag_url, "files.json"), json.dumps(all_files + ["ema.safetensors"]).encode())
        storage.upload(tmp, export_url)
        entry = manifest.CheckpointEntry(step=step, tag=tag, checkpoint_url=tag_url, export_url=export_url,
                                         export_sha256=storage.sha256_url(export_url), ema=ema is not None)
        os.remove(tmp)
        ledger = outputs.read_ledger() or manifest.Ledger(stage="train", **ledger_header)
        ledger = ledger.add(entry)
        removed: list[manifest.CheckpointEntry] = []
        if keep_last is not None:
            ledger, removed = ledger.keep_last(keep_last)
        # before the ledger: a rank killed after it (a peer fails at the barrier below) loses no metrics line
        outputs.sync_metrics()
        manifest.write_ledger(outputs.ledger, ledger)  # first the ledger, then the files it no longer lists
        for old in removed:
            storage.delete_tree(old.checkpoint_url)
        logger.info("checkpoint %s: %s (ledger %s)", tag, export_url, outputs.ledger)
    if outputs.staged:
        shutil.rmtree(os.path.join(outputs.local_root, tag))
    _barrier()
    return entry


def _consolidated_ema(outputs: RunOutputs, tag: str, tag_url: str) -> dict[str, torch.Tensor]:
    paths = []
    for r in range(outputs.world_size):
        name = f"ema-rank-{r:05d}.safetensors"
        if outputs.staged:
            path = os.path.join(outputs.scratch, "ema-consolidate", name)
            storage.download(storage.join(tag_url, name), path)
        else:
            path = os.path.join(outputs.local_root, tag, name)
        paths.append(path)
    return consolidate(paths)
