"""The train loader: samples of latent (or audio) shards, in a seeded global order, split across ranks.

Contract (ARCHITECTURE.md "Data loading"): every rank yields the same number of batches per epoch, even
with one shard; within an epoch no sample is served twice; only the remainder that does not fill a global
batch is left out; the position is part of the checkpoint and a resume continues the epoch.

How: sample `g` of the job is the `i`-th sample of shard `s` in manifest order (the manifest gives each
shard's sample count). Each epoch permutes all `g` with a generator seeded by (seed, epoch), keeps
`floor(n / global_batch) * global_batch` of them, and gives rank `r` the items `r::world`; its batch `b`
is items `[b * batch, (b + 1) * batch)` of that list. Samples are read by random access from shards cached
locally. Everything random about a sample (the VAE noise, the crop) comes from a generator seeded by
(seed, epoch, g), so a sample does not depend on worker, rank or resume.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import tarfile
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from pipeline import storage
from pipeline.data.workers import die_with_parent

logger = logging.getLogger(__name__)

STATE_VERSION = 1


@dataclasses.dataclass(frozen=True, slots=True)
class ShardRef:
    url: str
    samples: int


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CropSpec:
    frames: int
    """Frames per training example: latent frames (`sample_size // downsampling_ratio`) or audio samples."""
    samples_per_frame: int
    """Audio samples per frame: the pretransform's downsampling ratio, 1 for audio shards."""
    sample_rate: int
    """Audio sample rate (Hz); with `samples_per_frame` it converts a crop offset to seconds."""
    scale: float = 1.0
    """Latents are divided by this (`pretransform.scale`), as SAT does for pre-encoded data."""
    random_crop: bool = True
    """False: always the first `frames` (validation)."""


@dataclasses.dataclass(slots=True)
class Batch:
    latents: torch.Tensor
    """(B, C, T) float32: scaled latents, or audio for an autoencoder."""
    padding_mask: torch.Tensor
    """(B, T) bool, True where a frame holds data."""
    metadata: list[dict]
    """Per sample: the shard JSON with `offset_seconds`/`seconds_start` moved by the crop, `__key__`, `__url__`."""

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.latents.to(device, non_blocking=True), self.padding_mask.to(device, non_blocking=True),
                     self.metadata)


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def epoch_order(total: int, *, seed: int, epoch: int, global_batch: int) -> torch.Tensor:
    """The sample indices served in `epoch`, in order; a whole number of global batches."""
    g = torch.Generator().manual_seed(derived_seed(seed, epoch))
    order = torch.randperm(total, generator=g)
    return order[: (total // global_batch) * global_batch]


def crop(x: torch.Tensor, valid: int, meta: dict, spec: CropSpec, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Cut `spec.frames` frames out of `x` (C, T) whose first `valid` frames hold data; pad with zeros when
    shorter. The offset stays inside the data (as SAT's pre-encoded random crop), and `offset_seconds` /
    `seconds_start` move with it, so the timing conditioning describes the cropped audio (SAT does not
    update it: its PR #219)."""
    valid = min(valid, x.shape[-1])
    room = max(0, valid - spec.frames)
    offset = int(torch.randint(0, room + 1, (), generator=generator)) if spec.random_crop else 0
    piece = x[:, offset: offset + spec.frames]
    kept = min(spec.frames, valid - offset)
    if piece.shape[-1] < spec.frames:
        piece = torch.nn.functional.pad(piece, (0, spec.frames - piece.shape[-1]))
    mask = torch.arange(spec.frames) < kept
    meta = dict(meta)
    offset_seconds = float(meta.get("offset_seconds", meta.get("seconds_start", 0))) + \
        offset * spec.samples_per_frame / spec.sample_rate
    meta["offset_seconds"] = offset_seconds
    meta["seconds_start"] = math.floor(offset_seconds)
    return piece, mask, meta


class _TarIndex:
    """Random access into a local tar: key -> {ext: (data offset, size)}, keys in file order."""

    def __init__(self, path: str):
        self.path = path
        self.members: dict[str, dict[str, tuple[int, int]]] = {}
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                base = info.name.rsplit("/", 1)[-1]
                key, _, ext = base.partition(".")
                self.members.setdefault(key, {})[ext] = (info.offset_data, info.size)
        self.keys = list(self.members)

    def read(self, index: int) -> tuple[str, dict[str, bytes]]:
        key = self.keys[index]
        out = {}
        with open(self.path, "rb") as f:
            for ext, (offset, size) in self.members[key].items():
                f.seek(offset)
                out[ext] = f.read(size)
        return key, out


class _NpyDirIndex:
    """SAT's `pre_encoded` layout: `<name>.npy` latents (C, T) with a sibling `<name>.json`, under a folder."""

    def __init__(self, folder: str):
        self.paths = sorted(os.path.join(base, n) for base, _, names in os.walk(folder) for n in names
                            if n.endswith(".npy"))
        self.keys = [os.path.relpath(p, folder)[:-4].replace(os.sep, "__") for p in self.paths]

    def read(self, index: int) -> tuple[str, dict[str, bytes]]:
        path = self.paths[index]
        with open(path, "rb") as f, open(path[:-4] + ".json", "rb") as g:
            return self.keys[index], {"npy": f.read(), "json": g.read()}


def count_npy(folder: str) -> int:
    return len(_NpyDirIndex(folder).paths)


class ShardDataset(torch.utils.data.Dataset):
    """Map-style: item `(epoch, g)` -> one cropped sample. Latent shards (`<key>.latents.safetensors`) or
    audio shards (`<key>.flac`), each with `<key>.json`."""

    def __init__(self, shards: list[ShardRef], spec: CropSpec, *, seed: int, cache_dir: str):
        if not shards:
            raise ValueError("no shard to read: the manifest lists no output")
        self.shards = shards
        self.spec = spec
        self.seed = seed
        self.cache_dir = cache_dir
        self.starts = np.cumsum([0] + [s.samples for s in shards])
        self._indices: dict[int, _TarIndex] = {}

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _index(self, s: int) -> "_TarIndex | _NpyDirIndex":
        """Built on first use, in each loader worker (each has its own copy of the dataset)."""
        if s not in self._indices:
            url = self.shards[s].url
            self._indices[s] = _NpyDirIndex(url) if os.path.isdir(url) else _TarIndex(self._local(url))
            if len(self._indices[s].keys) != self.shards[s].samples:
                raise ValueError(f"{url}: holds {len(self._indices[s].keys)} samples, the manifest "
                                 f"says {self.shards[s].samples}")
        return self._indices[s]

    def _local(self, url: str) -> str:
        return storage.local_path(url, self.cache_dir)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, dict]:
        epoch, g = item
        s = int(np.searchsorted(self.starts, g, side="right") - 1)
        url = self.shards[s].url
        key, members = self._index(s).read(g - int(self.starts[s]))
        meta = json.loads(members["json"])
        generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch, g))
        if "latents.safetensors" in members:
            x, valid = self._latents(members["latents.safetensors"], meta, generator, url, key)
        elif "npy" in members:  # SAT pre_encoded: one latent, already sampled; its padding mask in the JSON
            x = torch.from_numpy(np.load(io.BytesIO(members["npy"]))).float() / self.spec.scale
            valid = int(sum(meta["padding_mask"])) if "padding_mask" in meta else x.shape[-1]
            meta = {k: v for k, v in meta.items() if k != "padding_mask"}
        elif "flac" in members:
            x, valid = self._audio(members["flac"], url, key)
        else:
            raise ValueError(f"{url}: sample {key} has neither .latents.safetensors nor .flac (has {sorted(members)})")
        x, mask, meta = crop(x, valid, meta, self.spec, generator)
        meta["__key__"], meta["__url__"] = key, url
        return x, mask, meta

    def _latents(self, data: bytes, meta: dict, generator: torch.Generator, url: str, key: str) -> tuple[torch.Tensor, int]:
        tensors = load_safetensors(data)
        if "mean" in tensors:  # a VAE bottleneck: draw a fresh latent each time the sample is served
            mean, std = tensors["mean"].float(), tensors["std"].float()
            x = mean + std * torch.randn(mean.shape, generator=generator)
        elif "latents" in tensors:
            x = tensors["latents"].float()
        else:
            raise ValueError(f"{url}: sample {key}.latents.safetensors holds {sorted(tensors)}, expected mean+std or latents")
        return x / self.spec.scale, int(meta.get("valid_frames", x.shape[-1]))

    def _audio(self, data: bytes, url: str, key: str) -> tuple[torch.Tensor, int]:
        from pipeline.data.audio import decode

        audio, sr = decode(data)
        if sr != self.spec.sample_rate:
            raise ValueError(f"{url}: sample {key}.flac is {sr} Hz, the model config's sample_rate is {self.spec.sample_rate}")
        return torch.from_numpy(np.ascontiguousarray(audio)).float(), audio.shape[-1]


def collate(items: list[tuple[torch.Tensor, torch.Tensor, dict]]) -> Batch:
    return Batch(torch.stack([x for x, _, _ in items]), torch.stack([m for _, m, _ in items]), [d for _, _, d in items])


class _RankBatches(torch.utils.data.Sampler):
    """Lists of `(epoch, g)` for one rank, from a position on, epoch after epoch."""

    def __init__(self, loader: "LatentLoader", epoch: int, batch: int):
        self.loader, self.epoch, self.batch = loader, epoch, batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, start = self.epoch, self.batch
        while True:
            mine = self.loader.rank_order(epoch)
            for b in range(start, self.loader.batches_per_epoch):
                yield [(epoch, int(g)) for g in mine[b * self.loader.batch_size: (b + 1) * self.loader.batch_size]]
            epoch, start = epoch + 1, 0


class LatentLoader:
    """Iterate for batches (endlessly, epoch after epoch); `state_dict()` after a step is the position of the
    next batch."""

    def __init__(self, dataset: ShardDataset, *, rank: int, world_size: int, batch_size: int, seed: int,
                 num_workers: int = 0):
        self.dataset = dataset
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = len(dataset) // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(dataset)} samples do not fill one global batch of {self.global_batch} "
                             f"(--batch-size {batch_size} x {world_size} ranks): lower --batch-size or add data")
        self.epoch = 0
        self.batch = 0

    def rank_order(self, epoch: int) -> torch.Tensor:
        return epoch_order(len(self.dataset), seed=self.seed, epoch=epoch, global_batch=self.global_batch)[self.rank::self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_RankBatches(self, self.epoch, self.batch), collate_fn=collate,
            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=False,
            worker_init_fn=die_with_parent(os.getpid()),
            # its own generator: creating the iterator draws a seed, which must not move the global RNG that
            # the model's randomness (CFG dropout) uses, or a resumed run would differ from an uninterrupted one
            generator=torch.Generator().manual_seed(self.seed))
        for batch in loader:
            self.batch += 1
            if self.batch == self.batches_per_epoch:
                self.epoch, self.batch = self.epoch + 1, 0
            yield batch

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self.batch, "world_size": self.world_size,
                "batch_size": self.batch_size, "seed": self.seed, "samples": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, this code reads {STATE_VERSION}")
        for key, mine in (("world_size", self.world_size), ("batch_size", self.batch_size), ("seed", self.seed),
                          ("samples", len(self.dataset))):
            if state[key] != mine:
                raise ValueError(f"cannot resume the data position: the checkpoint has {key}={state[key]}, this run "
                                 f"has {mine}; resume with the same world size, --batch-size, --seed and data")
        self.epoch, self.batch = state["epoch"], state["batch"]
