"""The train loader: samples of latent (or audio) shards, each node reading its own shards once per epoch.

Contract (ARCHITECTURE.md "Data loading"): every rank yields the same number of batches per epoch, even
with one shard; within an epoch no sample is served twice; only the remainder that does not fill a global
batch is left out; the position is part of the checkpoint and a resume continues the epoch.

How: `epoch_plan.py` splits each epoch's shards across nodes and orders each node's samples (block shuffle
plus a shuffle window); rank `j` of a node serves every `R`-th of them. `shard_cache.py` brings the shards:
in place when local, through the node's bounded disk cache from S3 (prefetched ahead by each rank's fetcher
processes, `fetcher.py`, evicted once every rank of the node is past them), or into memory with
`cache_bytes=0` (`memory_pool.py`: each rank is its own group; its fetchers bring each shard once, ahead,
into memory its loader workers share). Each shard's tar is walked once, by the process that fetches or
first verifies it (`tar_index.py`); workers read the index. Sample `g` of the job is the `i`-th
sample of shard `s` in manifest order. Everything random about a sample comes from seeds derived from
(seed, epoch, g, stream): the crop here, the VAE noise on the model's device (`posterior.py`), so a sample
does not depend on batch size, worker, rank count or resume.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import multiprocessing
import os
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load as load_safetensors

from pipeline import storage
from pipeline.data import tar_index
from pipeline.data.workers import die_with_parent
from pipeline.data.epoch_plan import PlanLayout, ShuffleKnobs, derived_seed
from pipeline.data.fetcher import Fetcher
from pipeline.data.memory_pool import MemoryPool, needed_slots, slot_bytes_for
from pipeline.data.shard_cache import (MemoryShards, NodeCache, Schedule, ShardRef, ShardRejected, index_of,
                                       mark_rejected, reject_record, verify_local_once)

__all__ = ["Batch", "CropSpec", "LatentLoader", "ShardDataset", "ShardRef", "ShuffleKnobs", "crop", "derived_seed"]

logger = logging.getLogger(__name__)

STATE_VERSION = 2
STREAM_CROP, STREAM_NOISE = 1, 2
"""A sample's random streams: seeds are derived_seed(seed, epoch, g, stream)."""
def slack_steps(num_workers: int) -> int:
    """Node steps a shard counts as live before its first use when checking --cache-gb: loader workers run up
    to 2 batches each ahead of their rank (torch's prefetch_factor), and ranks are a step or two apart."""
    return 2 + 2 * num_workers


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
    latents: torch.Tensor | None
    """(B, C, T) float32: scaled latents, or audio for an autoencoder; None for VAE posteriors until
    `posterior.sample_latents` draws them on the device."""
    padding_mask: torch.Tensor
    """(B, T) bool, True where a frame holds data."""
    metadata: list[dict]
    """Per sample: the shard JSON with `offset_seconds`/`seconds_start` moved by the crop, `__key__`, `__url__`."""
    mean: torch.Tensor | None = None
    """(B, C, T) VAE posterior means as stored (fp16 or fp32), unscaled, zero past the data."""
    std: torch.Tensor | None = None
    """(B, C, T) VAE posterior stds as stored, zero past the data."""
    noise_seeds: list[int] | None = None
    """Per sample: the seed of its posterior noise (derived_seed(seed, epoch, g, STREAM_NOISE))."""
    scale: float = 1.0
    """The drawn latents are divided by this."""

    def to(self, device: torch.device | str) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return Batch(move(self.latents), move(self.padding_mask), self.metadata, move(self.mean), move(self.std),
                     self.noise_seeds, self.scale)


@dataclasses.dataclass(slots=True)
class Item:
    x: torch.Tensor
    """(C, T) latents or audio, or the posterior mean as stored."""
    std: torch.Tensor | None
    """(C, T) the posterior std as stored; None for single latents and audio."""
    mask: torch.Tensor
    meta: dict
    noise_seed: int
    scale: float


REJECTED = None
"""What the dataset returns for a sample of a rejected shard (under --max-reject-fraction); see `collate`."""


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
    """Random access into a tar (a local file, or its bytes: `bytes` or a memory pool slot): key -> {ext: (data
    offset, size)}, from the shard's tar index (`members`); without one, the tar is walked here."""

    def __init__(self, path: str | None = None, data=None, members: list[tuple[str, int, int]] | None = None):
        self.path, self.data = path, data
        if members is None:
            members = tar_index.build(path if data is None else bytes(data))
        self.members: dict[str, dict[str, tuple[int, int]]] = {}
        for name, offset, size in members:
            base = name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            self.members.setdefault(key, {})[ext] = (offset, size)
        self.keys = list(self.members)

    def read(self, index: int) -> tuple[str, dict[str, bytes]]:
        key = self.keys[index]
        if self.data is not None:
            return key, {ext: self.data[o: o + n] for ext, (o, n) in self.members[key].items()}
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
    """Map-style: item `(epoch, g, node step)` -> one cropped sample. Latent shards (`<key>.latents.safetensors`)
    or audio shards (`<key>.flac`), each with `<key>.json`.

    `cache_dir` is the node's folder (cache, reject records); `cache_bytes` bounds the node's disk cache of S3
    shards (None: the plan's live shards plus the prefetch depth; 0: no disk, shards stream into memory)."""

    def __init__(self, shards: list[ShardRef], spec: CropSpec, *, seed: int, cache_dir: str,
                 cache_bytes: int | None = None, max_reject_fraction: float = 0.0):
        if not shards:
            raise ValueError("no shard to read: the manifest lists no output")
        self.shards, self.spec, self.seed, self.cache_dir = shards, spec, seed, cache_dir
        self.cache_bytes, self.max_reject_fraction = cache_bytes, max_reject_fraction
        self.starts = np.cumsum([0] + [s.samples for s in shards])
        self.remote = any(storage.is_s3(s.url) for s in shards)
        self.source: NodeCache | MemoryPool | MemoryShards | None = None
        self.layout: PlanLayout | None = None
        self.node_dir = cache_dir
        self._indices: dict[tuple[int, int], _TarIndex | _NpyDirIndex] = {}

    @property
    def in_memory(self) -> bool:
        return self.remote and self.cache_bytes == 0

    def __len__(self) -> int:
        return int(self.starts[-1])

    def bind(self, layout: PlanLayout, pool_slots: int = 0) -> None:
        """Called by the loader before reading (and before its workers fork): the plan tells the cache what is
        needed when. In memory mode, `pool_slots` > 0 maps a memory pool of that many shards that the loader's
        fetchers fill; 0 leaves each process to stream the shards it reads itself, on demand."""
        self.layout = layout
        self._indices.clear()
        # one folder per group, so two "nodes" on one host (tests, or an unknown layout) never share one
        self.node_dir = os.path.join(self.cache_dir, f"group-{layout.group}-of-{layout.groups}")
        os.makedirs(self.node_dir, exist_ok=True)
        if not self.remote:
            self.source = None
        elif self.in_memory and pool_slots:
            self.source = MemoryPool(self.shards, slots=pool_slots, slot_bytes=slot_bytes_for(self.shards))
        elif self.in_memory:
            self.source = MemoryShards(self.shards)
        else:
            self.source = NodeCache(self.node_dir, self.shards, budget_bytes=self.cache_bytes,
                                    ranks_per_node=layout.ranks_per_group)
        if self.source is not None:
            self.source.schedule = Schedule(plan_for=layout.plan)

    def _index(self, epoch: int, s: int, step: int) -> "_TarIndex | _NpyDirIndex":
        """Opened on first use in each process (each loader worker has its own copy of the dataset)."""
        key = (epoch, s)
        if key not in self._indices:
            ref = self.shards[s]
            marker = os.path.join(self.node_dir, f"rejected-e{epoch}-{s:06d}.json")
            if os.path.exists(marker):  # known bad this epoch: do not fetch or hash it again
                with open(marker) as f:
                    raise ShardRejected(json.load(f))
            if self.layout is not None:  # forget the shards this process is done with
                for old in [k for k in self._indices if (k[0], self.layout.plan(k[0]).last_step[k[1]]) < (epoch, step)]:
                    del self._indices[old]
            if self.remote and self.source is None:
                raise RuntimeError("ShardDataset.bind() comes before reading S3 shards (LatentLoader does it)")
            if os.path.isdir(ref.url):
                index = _NpyDirIndex(ref.url)
            elif isinstance(self.source, MemoryPool):
                shard = self.source.open(epoch, s)
                index = _TarIndex(data=shard, members=shard.members)
            elif isinstance(self.source, MemoryShards):
                data = self.source.data(epoch, s, step)
                index = _TarIndex(data=data, members=index_of(ref, data))
            elif isinstance(self.source, NodeCache):
                path = self.source.path(epoch, s, step)
                index = _TarIndex(path, members=self.source.index(epoch, s))
            else:
                index = _TarIndex(ref.url, members=verify_local_once(ref, s, self.node_dir))
            if len(index.keys) != ref.samples:
                raise ShardRejected(reject_record(ref, "samples", ref.samples, len(index.keys)))
            self._indices[key] = index
        return self._indices[key]

    def _reject(self, error: ShardRejected, epoch: int, s: int) -> None:
        """Record the reject for the node; fail when the node's rejected shards exceed the allowed fraction of
        its share of the shards."""
        os.makedirs(self.node_dir, exist_ok=True)
        mark_rejected(self.node_dir, os.path.join(self.node_dir, f"rejected-e{epoch}-{s:06d}.json"), error.record)
        rejected = {name.split("-")[2] for name in os.listdir(self.node_dir) if name.startswith("rejected-e")
                    and name.endswith(".json")}
        share = len(self.shards) / (self.layout.groups if self.layout else 1)
        if len(rejected) > self.max_reject_fraction * share:
            raise ValueError(f"{error}; {len(rejected)} rejected shard(s) on this node exceed --max-reject-fraction "
                             f"{self.max_reject_fraction} of its {share:.0f} shards "
                             f"(records in {os.path.join(self.node_dir, 'rejects.jsonl')})") from None

    def __getitem__(self, item: tuple[int, int, int]) -> Item | None:
        epoch, g, step = item
        s = int(np.searchsorted(self.starts, g, side="right") - 1)
        ref = self.shards[s]
        try:
            key, members = self._index(epoch, s, step).read(g - int(self.starts[s]))
        except ShardRejected as e:
            self._reject(e, epoch, s)
            return REJECTED
        meta = _sample_json(members, ref.url, key)
        crop_seed = derived_seed(self.seed, epoch, g, STREAM_CROP)
        generator = torch.Generator().manual_seed(crop_seed)
        posterior, std = False, None
        if "latents.safetensors" in members:
            x, std, valid = self._latents(members["latents.safetensors"], meta, ref.url, key)
            posterior = std is not None
        elif "npy" in members:  # SAT pre_encoded: one latent, already sampled; its padding mask in the JSON
            x = torch.from_numpy(np.load(io.BytesIO(members["npy"]), allow_pickle=False)).float() / self.spec.scale
            valid = int(sum(meta["padding_mask"])) if "padding_mask" in meta else x.shape[-1]
            meta = {k: v for k, v in meta.items() if k != "padding_mask"}
        elif "flac" in members:
            x, valid = self._audio(members["flac"], ref.url, key)
        else:
            raise ValueError(f"{ref.url}: sample {key} has neither .latents.safetensors nor .flac (has {sorted(members)})")
        x, mask, meta = crop(x, valid, meta, self.spec, generator)
        if posterior:  # the same crop (the same seed draws the same offset)
            std = crop(std, valid, meta, self.spec, torch.Generator().manual_seed(crop_seed))[0]
        meta["__key__"], meta["__url__"] = key, ref.url
        return Item(x, std, mask, meta, derived_seed(self.seed, epoch, g, STREAM_NOISE), self.spec.scale)

    def _latents(self, data: bytes, meta: dict, url: str, key: str) -> tuple[torch.Tensor, torch.Tensor | None, int]:
        """(x, std, valid frames): a VAE posterior ships mean and std as stored (the noise is drawn on the
        model's device); one `latents` tensor is scaled here and has no std."""
        tensors = load_safetensors(data)
        if "mean" in tensors and "std" in tensors and tensors["mean"].shape == tensors["std"].shape:
            x, std = tensors["mean"], tensors["std"]
        elif "latents" in tensors:
            x, std = tensors["latents"].float() / self.spec.scale, None
        else:
            raise ValueError(f"{url}: sample {key}.latents.safetensors holds {sorted(tensors)}, expected mean+std "
                             f"of one shape or latents")
        return x, std, int(meta.get("valid_frames", x.shape[-1]))

    def _audio(self, data: bytes, url: str, key: str) -> tuple[torch.Tensor, int]:
        from pipeline.data.audio import decode

        audio, sr = decode(data)
        if sr != self.spec.sample_rate:
            raise ValueError(f"{url}: sample {key}.flac is {sr} Hz, the model config's sample_rate is {self.spec.sample_rate}")
        return torch.from_numpy(np.ascontiguousarray(audio)).float(), audio.shape[-1]


def _sample_json(members: dict[str, bytes], url: str, key: str) -> dict:
    """The sample's JSON, with the fields the loader reads checked: one line naming shard and key otherwise."""
    try:
        meta = json.loads(members["json"])
    except KeyError:
        raise ValueError(f"{url}: sample {key} has no .json") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{url}: sample {key}.json is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{url}: sample {key}.json holds {type(meta).__name__}, expected an object")
    for name in ("offset_seconds", "seconds_start", "seconds_total"):
        value = meta.get(name, 0)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{url}: sample {key}.json {name}={value!r}, expected a finite number")
    valid = meta.get("valid_frames", 0)
    if isinstance(valid, bool) or not isinstance(valid, int) or valid < 0:
        raise ValueError(f"{url}: sample {key}.json valid_frames={valid!r}, expected an integer >= 0")
    return meta


def collate(items: list[Item | None]) -> Batch:
    """Stack a batch. A sample of a rejected shard (None) is replaced by a good sample of the same batch, so
    every rank still yields its batch; the reject itself is recorded and limited by --max-reject-fraction."""
    good = [i for i in items if i is not None]
    if not good:
        raise ValueError("every sample of a batch comes from rejected shards (see the node's rejects.jsonl)")
    items = [i if i is not None else good[n % len(good)] for n, i in enumerate(items)]
    if len({i.std is None for i in items}) > 1:
        raise ValueError("a batch mixes VAE posteriors (mean+std) and single latents: one manifest holds one kind")
    x, mask, meta = torch.stack([i.x for i in items]), torch.stack([i.mask for i in items]), [i.meta for i in items]
    if items[0].std is None:
        return Batch(x, mask, meta)
    return Batch(None, mask, meta, mean=x, std=torch.stack([i.std for i in items]),
                 noise_seeds=[i.noise_seed for i in items], scale=items[0].scale)


def shard_refs(outputs) -> list[ShardRef]:
    """The shards of a manifest's `outputs`, with what each is checked against."""
    return [ShardRef(o["url"], o["samples"], o["bytes"], o["sha256"]) for o in outputs]


def cache_bytes(cache_gb: float | None) -> int | None:
    """`--cache-gb` in bytes (None: no bound beyond the plan's live shards and the prefetch depth)."""
    if cache_gb is not None and cache_gb < 0:
        raise ValueError(f"--cache-gb {cache_gb} must be >= 0 (0: stream into memory, no disk cache)")
    return None if cache_gb is None else int(cache_gb * 1e9)


def build_loader(shards: list[ShardRef], spec: CropSpec, args, denv, *, seed: int, batch_size: int,
                 cache_dir: str) -> "LatentLoader":
    """The train stages' loader from their flags (`--cache-gb`, `--max-reject-fraction`, `--num-workers`) and
    the launcher's layout (`denv`: rank, world_size, num_nodes, node_rank, local_rank)."""
    dataset = ShardDataset(shards, spec, seed=seed, cache_dir=cache_dir, cache_bytes=cache_bytes(args.cache_gb),
                           max_reject_fraction=args.max_reject_fraction)
    return LatentLoader(dataset, rank=denv.rank, world_size=denv.world_size, batch_size=batch_size, seed=seed,
                        num_workers=args.num_workers, num_nodes=denv.num_nodes, node_rank=denv.node_rank,
                        local_rank=denv.local_rank)


class _RankBatches(torch.utils.data.Sampler):
    """Lists of `(epoch, g, node step)` for one rank, from a position on, epoch after epoch."""

    def __init__(self, loader: "LatentLoader", epoch: int, batch: int):
        self.loader, self.epoch, self.batch = loader, epoch, batch

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        epoch, start, b = self.epoch, self.batch, self.loader.batch_size
        while True:
            mine = self.loader.rank_order(epoch)
            for step in range(start, self.loader.batches_per_epoch):
                yield [(epoch, int(g), step) for g in mine[step * b: (step + 1) * b]]
            epoch, start = epoch + 1, 0


class LatentLoader:
    """Iterate for batches (endlessly, epoch after epoch); `state_dict()` after a step is the position of the
    next batch. `num_nodes`/`node_rank`/`local_rank` place the rank (default: one node); the ranks of a node
    share its cache. `prefetch_shards` shards beyond the current step are fetched by `fetchers` processes of
    the rank (`fetcher.py`), into the node cache or, with `cache_bytes=0`, into the rank's memory pool (0
    fetchers: each reader fetches what it needs itself, on demand; in memory mode each process streams the
    shards it reads)."""

    def __init__(self, dataset: ShardDataset, *, rank: int, world_size: int, batch_size: int, seed: int,
                 num_workers: int = 0, num_nodes: int = 1, node_rank: int | None = None, local_rank: int | None = None,
                 knobs: ShuffleKnobs = ShuffleKnobs(), prefetch_shards: int = 4, fetchers: int = 2):
        if num_nodes < 1 or world_size % num_nodes:
            raise ValueError(f"world size {world_size} is not a whole number of ranks on each of {num_nodes} nodes")
        self.dataset = dataset
        self.rank, self.world_size, self.batch_size, self.num_nodes = rank, world_size, batch_size, num_nodes
        self.seed, self.num_workers, self.knobs = seed, num_workers, knobs
        self.prefetch_shards, self.fetchers = prefetch_shards, fetchers
        per_node = world_size // num_nodes
        if dataset.in_memory:  # nothing is shared between the ranks of a node: each rank is its own group
            group, groups, self.local, ranks = rank, world_size, 0, 1
        else:
            group = rank // per_node if node_rank is None else node_rank
            self.local = rank % per_node if local_rank is None else local_rank
            groups, ranks = num_nodes, per_node
        self.global_batch = batch_size * world_size
        self.batches_per_epoch = len(dataset) // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"{len(dataset)} samples do not fill one global batch of {self.global_batch} "
                             f"(--batch-size {batch_size} x {world_size} ranks): lower --batch-size or add data")
        self.layout = PlanLayout(counts=tuple(s.samples for s in dataset.shards), seed=seed, group=group,
                                 groups=groups, ranks_per_group=ranks, batch_size=batch_size, knobs=knobs)
        self.epoch = 0
        self.batch = 0
        self._checked: set[int] = set()

    def rank_order(self, epoch: int) -> np.ndarray:
        plan = self.layout.plan(epoch)
        self._check_budget(epoch)
        return plan.rank_items(self.local)

    def _check_budget(self, epoch: int) -> None:
        budget = self.dataset.cache_bytes
        if epoch in self._checked or not self.dataset.remote or not budget:
            return
        sizes = [s.bytes for s in self.dataset.shards]
        need = self.layout.plan(epoch).live_bytes_high_water(sizes, slack_steps(self.num_workers))
        if need > budget:
            raise ValueError(f"--cache-gb {budget / 1e9:.3g} cannot hold the shards this node needs at once in "
                             f"epoch {epoch} ({need / 1e9:.3g} GB with block_shards={self.knobs.block_shards}): "
                             f"raise --cache-gb, or use --cache-gb 0 to stream into memory")
        self._checked.add(epoch)

    def _pool_slots(self) -> int:
        """Shards the rank's memory pool holds (0: no pool): what its plan has live at once, with the workers
        running ahead, plus the prefetch depth. A pool needs every shard's size, and workers forked (not
        spawned) after it is mapped."""
        ds = self.dataset
        if not (ds.in_memory and self.fetchers > 0 and all(s.bytes > 0 for s in ds.shards)):
            return 0
        if self.num_workers and multiprocessing.get_start_method() != "fork":
            return 0
        schedule = Schedule(plan_for=self.layout.plan)
        return needed_slots(schedule, self.epoch, slack_steps(self.num_workers)) + max(self.prefetch_shards, 1)

    def __iter__(self) -> Iterator[Batch]:
        slots = self._pool_slots()
        self.dataset.bind(self.layout, pool_slots=slots)
        self._check_budget(self.epoch)
        source = self.dataset.source if isinstance(self.dataset.source, (NodeCache, MemoryPool)) else None
        if isinstance(source, NodeCache):
            source.write_progress(self.local, self.epoch, self.batch)
        checked = [-1]

        def step(position: tuple[int, int]) -> bool:  # runs in the fetcher processes
            if isinstance(source, MemoryPool) and position[0] != checked[0]:
                need = needed_slots(source.schedule, position[0], slack_steps(self.num_workers))
                if need > slots:
                    raise ValueError(f"the memory pool of {slots} shards cannot hold the {need} shards this rank "
                                     f"needs at once in epoch {position[0]} (it was sized for the epochs where "
                                     f"this run started): resume from the last checkpoint, which sizes it again")
                checked[0] = position[0]
            return source.prefetch_once(position, self.prefetch_shards)

        fetcher = None
        if source is not None and self.fetchers > 0:
            fetcher = Fetcher(step, processes=self.fetchers, position=(self.epoch, self.batch),
                              idle_seconds=source.IDLE_SECONDS)
        if source is not None:
            source.fetcher = fetcher  # before the workers fork: they copy it
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=_RankBatches(self, self.epoch, self.batch), collate_fn=collate,
            num_workers=self.num_workers, pin_memory=torch.cuda.is_available(), persistent_workers=False,
            worker_init_fn=die_with_parent(os.getpid()),
            # its own generator: creating the iterator draws a seed, which must not move the global RNG that
            # the model's randomness (CFG dropout) uses, or a resumed run would differ from an uninterrupted one
            generator=torch.Generator().manual_seed(self.seed))
        # held here, so that on close the workers are stopped after the pool lets its waiting readers go
        batches = iter(loader)
        try:
            for batch in batches:
                if fetcher is not None:
                    fetcher.raise_error()
                self.batch += 1
                if self.batch == self.batches_per_epoch:
                    self.epoch, self.batch = self.epoch + 1, 0
                if isinstance(source, NodeCache):
                    source.write_progress(self.local, self.epoch, self.batch)
                if fetcher is not None:
                    fetcher.set_position((self.epoch, self.batch))
                yield batch
        finally:
            if fetcher is not None:
                fetcher.stop()  # readers waiting for it raise "stopped" and let the workers go
            del batches
            if source is not None:
                source.fetcher = None

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "epoch": self.epoch, "batch": self.batch, "world_size": self.world_size,
                "groups": self.layout.groups, "batch_size": self.batch_size, "seed": self.seed,
                "samples": len(self.dataset), "block_shards": self.knobs.block_shards, "window": self.knobs.window}

    def load_state_dict(self, state: dict) -> None:
        version = state.get("version")
        if version not in (1, STATE_VERSION):
            raise ValueError(f"loader state version {version!r}, this code reads 1 and {STATE_VERSION}")
        mine = {"world_size": self.world_size, "batch_size": self.batch_size, "seed": self.seed,
                "samples": len(self.dataset)}
        if version == STATE_VERSION:
            mine.update(groups=self.layout.groups, block_shards=self.knobs.block_shards, window=self.knobs.window)
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(f"cannot resume the data position: the checkpoint has {key}={state[key]}, this run "
                                 f"has {value}; resume with the same world size, nodes, --batch-size, --seed, "
                                 f"--cache-gb 0 or not, and data")
        if version == 1:
            logger.warning("loader state of version 1 (a global sample order): epoch %d continues at batch %d in "
                           "the shard-aware order, so this epoch may repeat or skip some samples",
                           state["epoch"], state["batch"])
        self.epoch, self.batch = state["epoch"], state["batch"]
