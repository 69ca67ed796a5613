"""Which samples each node and rank serves in an epoch, in what order: a pure function of the shards' sample
counts, the seed, the epoch and the layout, so every rank computes the same plan without talking to the others.

1. Shards to nodes. The shards are permuted (seed, epoch); each in turn goes whole to the node ("group") that
   holds the fewest samples so far. Every node then keeps exactly its quota `Q = steps x ranks_per_node x batch`
   samples (`steps = total // global_batch`): a node over quota hands the samples past `Q` (the tail of its
   last shard, in a seeded order within the shard) to a pool, and nodes under quota take from the pool in
   order; what remains in the pool (fewer than a global batch) is left out this epoch. So a shard is read by
   one node, except the few (at most `groups - 1`) shards cut at a quota boundary; with equal shard sizes
   and a shard count divisible by the node count none is.
2. Within a node, a block shuffle: the node's pieces (whole shards, or the part of a cut shard) are taken
   `block_shards` at a time and the samples of one block are permuted together, so the node's cache needs
   about one block at a time while a batch mixes `block_shards` shards.
3. Then a shuffle window: every sample moves by up to `window` positions (sort by position + window x
   uniform), as a streaming shuffle buffer of that many samples would, but as a pure function of the seed,
   which mixes across block boundaries and keeps resume exact.
4. Node position `p` belongs to node step `p // (ranks_per_node x batch)`; rank `j` of the node serves
   positions `j, j + R, j + 2R, ...`, so its batch `b` is its part of node step `b` and all ranks of a node
   need the same shards at the same time.
"""
from __future__ import annotations

import dataclasses
import functools
import heapq
from typing import Sequence

import numpy as np

STREAM_SHARDS, STREAM_CUT, STREAM_BLOCK, STREAM_WINDOW = 11, 12, 13, 14
"""Separate random streams of the plan; the sample streams (crop, noise) live in latents.py."""


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from non-negative integers (numpy's SeedSequence mixes them well)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, dtype=np.uint64)[0] >> 1)


def _rng(*parts: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(derived_seed(*parts)))


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ShuffleKnobs:
    block_shards: int = 8
    """Shards of a node whose samples are shuffled together (block shuffle). Larger mixes more shards per
    batch and needs a larger node cache (about two blocks of shards are live at a block boundary)."""
    window: int = 256
    """Samples: after the block shuffle a sample moves by up to this many positions (a shuffle window), which
    mixes the end of one block with the start of the next. 0 turns it off."""

    def __post_init__(self) -> None:
        if self.block_shards < 1:
            raise ValueError(f"block_shards={self.block_shards} must be >= 1")
        if self.window < 0:
            raise ValueError(f"window={self.window} must be >= 0")


@dataclasses.dataclass(frozen=True, slots=True)
class Piece:
    shard: int
    lo: int
    hi: int
    """Samples `lo:hi` of the shard's seeded per-epoch sample order (`shard_sample_order`)."""


def shard_sample_order(count: int, *, seed: int, epoch: int, shard: int) -> np.ndarray:
    """The order in which a shard's samples are cut between nodes this epoch (the cut shard's tail varies)."""
    return _rng(seed, epoch, STREAM_CUT, shard).permutation(count)


def assign_pieces(counts: Sequence[int], *, seed: int, epoch: int, groups: int, quota: int) -> list[list[Piece]]:
    """Step 1: each group's pieces, whole shards first (permuted order), then what it took from the pool."""
    perm = _rng(seed, epoch, STREAM_SHARDS).permutation(len(counts))
    heap = [(0, k) for k in range(groups)]
    owned: list[list[int]] = [[] for _ in range(groups)]
    for s in perm.tolist():  # whole shards to the least-loaded group (ties: the lowest group index)
        load, k = heapq.heappop(heap)
        owned[k].append(s)
        heapq.heappush(heap, (load + counts[s], k))
    pieces: list[list[Piece]] = [[] for _ in range(groups)]
    pool: list[Piece] = []
    for k in range(groups):
        kept = 0
        for s in owned[k]:
            take = min(counts[s], quota - kept)
            if take > 0:
                pieces[k].append(Piece(s, 0, take))
                kept += take
            if take < counts[s]:
                pool.append(Piece(s, max(take, 0), counts[s]))
    for k in range(groups):
        need = quota - sum(p.hi - p.lo for p in pieces[k])
        while need > 0:
            p = pool[0]
            take = min(p.hi - p.lo, need)
            pieces[k].append(Piece(p.shard, p.lo, p.lo + take))
            pool[0] = Piece(p.shard, p.lo + take, p.hi)
            if pool[0].lo == pool[0].hi:
                pool.pop(0)
            need -= take
    return pieces


class EpochPlan:
    """One epoch of one group (node): its order of global sample indices and each shard's span of node steps.

    `counts[s]` is shard `s`'s sample count (manifest order); sample `g` of the job is sample `g - starts[s]`
    of shard `s`, where `starts` is the running sum of counts."""

    def __init__(self, counts: Sequence[int], *, seed: int, epoch: int, group: int, groups: int,
                 ranks_per_group: int, batch_size: int, knobs: ShuffleKnobs = ShuffleKnobs()):
        self.counts = [int(c) for c in counts]
        self.starts = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        self.seed, self.epoch, self.group = seed, epoch, group
        self.ranks_per_group, self.batch_size, self.knobs = ranks_per_group, batch_size, knobs
        self.node_batch = ranks_per_group * batch_size
        self.steps = int(self.starts[-1]) // (groups * self.node_batch)
        self.quota = self.steps * self.node_batch
        self.pieces = assign_pieces(self.counts, seed=seed, epoch=epoch, groups=groups, quota=self.quota)[group]
        self.order = self._order()
        shard_of = np.searchsorted(self.starts, self.order, side="right") - 1
        step_of = np.arange(len(self.order)) // self.node_batch
        self.first_step: dict[int, int] = {}
        self.last_step: dict[int, int] = {}
        shards, first = np.unique(shard_of, return_index=True)
        last = len(shard_of) - 1 - np.unique(shard_of[::-1], return_index=True)[1]
        for s, f, l in zip(shards.tolist(), first.tolist(), last.tolist()):
            self.first_step[s], self.last_step[s] = int(step_of[f]), int(step_of[l])

    def _order(self) -> np.ndarray:
        blocks = []
        b = self.knobs.block_shards
        for i in range(0, len(self.pieces), b):
            ids = [self.starts[p.shard] + shard_sample_order(self.counts[p.shard], seed=self.seed, epoch=self.epoch,
                                                             shard=p.shard)[p.lo:p.hi] for p in self.pieces[i:i + b]]
            block = np.concatenate(ids)
            blocks.append(_rng(self.seed, self.epoch, STREAM_BLOCK, self.group, i // b).permutation(block))
        order = np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.int64)
        if self.knobs.window > 0 and len(order):
            keys = np.arange(len(order)) + self.knobs.window * _rng(self.seed, self.epoch, STREAM_WINDOW,
                                                                    self.group).random(len(order))
            order = order[np.argsort(keys, kind="stable")]
        return order.astype(np.int64)

    def rank_items(self, j: int) -> np.ndarray:
        """Rank `j` of the group: its samples in order, `steps x batch_size` of them."""
        return self.order[j::self.ranks_per_group]

    def shards_by_first_use(self) -> list[int]:
        return sorted(self.first_step, key=lambda s: (self.first_step[s], s))

    def live_bytes_high_water(self, sizes: Sequence[int], slack_steps: int) -> int:
        """The most bytes of shards that are live at once: shard `s` counts from `slack_steps` before its first
        step (prefetch, ranks a few steps apart) to its last step. The node cache must hold this much."""
        if not self.first_step:
            return 0
        delta = np.zeros(self.steps + slack_steps + 2, dtype=np.int64)
        for s, f in self.first_step.items():
            delta[max(f - slack_steps, 0)] += sizes[s]
            delta[self.last_step[s] + 1] -= sizes[s]
        return int(np.cumsum(delta).max())


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class PlanLayout:
    """Everything an `EpochPlan` depends on but the epoch; `plan(epoch)` is cached per process (compared by
    identity: hashing a long tuple of counts per sample would cost more than the plan)."""
    counts: tuple[int, ...]
    seed: int
    group: int
    groups: int
    ranks_per_group: int
    batch_size: int
    knobs: ShuffleKnobs

    def plan(self, epoch: int) -> EpochPlan:
        return _cached_plan(self, epoch)


@functools.lru_cache(maxsize=6)
def _cached_plan(layout: PlanLayout, epoch: int) -> EpochPlan:
    return EpochPlan(layout.counts, seed=layout.seed, epoch=epoch, group=layout.group, groups=layout.groups,
                     ranks_per_group=layout.ranks_per_group, batch_size=layout.batch_size, knobs=layout.knobs)
