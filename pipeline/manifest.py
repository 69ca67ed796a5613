"""Manifests: the hand-off between stages (ARCHITECTURE.md "Manifests").

A stage reads one input manifest and writes one output manifest, last, with put-if-absent. Writing the
same content again is a no-op ("same" ignores the volatile fields: ``created`` and any key containing
``timing`` or named ``seconds_elapsed``); different content over an existing manifest is an error.

Work is planned once and split deterministically::

    plan = write_plan(out, [{"id": url, "url": url, "size": n}, ...])   # <out>/_plan.json, write-once
    mine = items_for_task(plan, slot.index, slot.count)                 # i % N == k
    ...                                                                 # process, write outputs
    write_part(out, Part(task=k, num_tasks=N, items=(ids done...), outputs=(entries...),
                         rejects=({"id": ..., "reason": ...}, ...)))    # <out>/_parts/part-k-of-N.json
    commit(out, stage="shard", num_tasks=N, args=..., input=..., properties=...)  # <out>/manifest.json

Plan items are dicts with a unique string ``id`` (for input files, their URL) plus their identity
(``url``, ``size`` or ``etag``, ...). A part's ``items`` lists the ids the task finished, whatever came of
them; its ``rejects`` are records ``{"id": <plan item id>, "reason": ..., ...}`` at any granularity (a
whole file or one window of it). Commit requires every planned id to be finished by exactly one task,
or rejected.

The train stage writes a `Ledger` instead, rewritten after each complete checkpoint.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime
import functools
import hashlib
import importlib.metadata
import json
import math
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from typing import Any

from pipeline import storage
from pipeline.config_json import canonical_json

FORMAT = "cantus.manifest/1"
STAGES = ("shard", "pre_encode", "train", "render")
_NUMBER = (int, float)
_SHARD_ENTRY = {"url": str, "samples": int, "bytes": int, "sha256": str, "seconds": _NUMBER}
ENTRY_FIELDS: dict[str, dict[str, Any]] = {
    "shard": _SHARD_ENTRY,
    "pre_encode": _SHARD_ENTRY,
    "render": {"audio": str, "image": str, "json": str, "checkpoint": str, "prompt_id": str,
               "cfg": _NUMBER, "seed": int},
}
"""Required fields (and types) of one output entry, per stage. Extra fields are allowed."""


class ManifestError(ValueError):
    """A manifest, plan or part is missing, corrupt, inconsistent or conflicts with what exists."""


# ---------------------------------------------------------------------------------------- helpers


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def input_ref(url: str) -> dict:
    """``{"url", "sha256"}`` of an input manifest (or plan), for a manifest's ``input`` field."""
    return {"url": url, "sha256": storage.sha256_url(url)}


@functools.cache
def code_version() -> str:
    """The package version, plus ``+g<sha>`` when the code runs from a git checkout."""
    try:
        version = importlib.metadata.version("cantus")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True,
                             timeout=10, cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version}+g{sha}" if sha else version


def entry(stage: str, **fields: Any) -> dict:
    """One output entry, checked: ``entry("shard", url=..., samples=..., bytes=..., sha256=..., seconds=...)``
    or ``entry("render", audio=..., image=..., json=..., checkpoint=..., prompt_id=..., cfg=..., seed=...)``."""
    _check_entry(stage, fields, f"{stage} entry")
    return fields


def same_content(a: Any, b: Any) -> bool:
    """Equal once volatile fields (``created``, ``*timing*``, ``seconds_elapsed``) are dropped."""
    return _stable(a) == _stable(b)


def _stable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _stable(v) for k, v in obj.items()
                if not (k == "created" or "timing" in k or k == "seconds_elapsed")}
    if isinstance(obj, (list, tuple)):
        return [_stable(v) for v in obj]
    return obj


def _check_entry(stage: str, e: Any, where: str) -> None:
    if stage not in ENTRY_FIELDS:
        raise ManifestError(f"{where}: stage {stage!r} has no output entries (known: {sorted(ENTRY_FIELDS)})")
    if not isinstance(e, dict):
        raise ManifestError(f"{where}: expected an object, got {type(e).__name__}")
    for name, kind in ENTRY_FIELDS[stage].items():
        if name not in e:
            raise ManifestError(f"{where}: missing field {name!r} (a {stage} entry needs "
                                f"{', '.join(ENTRY_FIELDS[stage])})")
        if not isinstance(e[name], kind) or isinstance(e[name], bool):
            raise ManifestError(f"{where}.{name}={e[name]!r}: expected {getattr(kind, '__name__', 'a number')}")


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True, ensure_ascii=False, allow_nan=False) + "\n").encode()


def _read_json(url: str, what: str) -> Any:
    try:
        data = storage.read_bytes(url)
    except storage.NotFoundError:
        raise ManifestError(f"{url}: no {what} here (has the step that writes it finished?)") from None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ManifestError(f"{url}: {what} is not valid JSON ({e}); the file is partial or corrupt") from None


def _write_once(url: str, obj: Any, what: str) -> bool:
    """Put-if-absent; True if written, False if identical content was already there."""
    if storage.put_if_absent(url, _dumps(obj)):
        return True
    existing = _read_json(url, what)
    if same_content(existing, obj):
        return False
    differ = ["(whole file)"]
    if isinstance(existing, dict):
        differ = sorted(k for k in set(existing) | set(obj) if not same_content(existing.get(k), obj.get(k)))
    raise ManifestError(f"{url}: a different {what} already exists (fields that differ: {', '.join(differ)}); "
                        "write to a new --output, or delete the old one if it is really obsolete")


# -------------------------------------------------------------------------------------- manifests


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class _Header:
    stage: str
    """One of STAGES."""
    args: dict
    """The stage's resolved command-line arguments."""
    input: dict
    """``{"url", "sha256"}`` of the input manifest (of ``_plan.json`` for shard); see `input_ref`."""
    properties: dict = dataclasses.field(default_factory=dict)
    """Stage-specific facts later stages check (sample rate, pretransform identity, ...)."""
    totals: dict = dataclasses.field(default_factory=dict)
    rejects: str | None = None
    """URL of rejects.jsonl."""
    code_version: str = dataclasses.field(default_factory=code_version)
    created: str = dataclasses.field(default_factory=_now)
    """UTC ISO time; volatile."""
    format: str = FORMAT

    def __post_init__(self) -> None:
        if self.format != FORMAT:
            raise ManifestError(f"format={self.format!r}: this code reads {FORMAT!r}")
        if self.stage not in STAGES:
            raise ManifestError(f"stage={self.stage!r}: expected one of {STAGES}")
        if not isinstance(self.input, dict) or not {"url", "sha256"} <= set(self.input):
            raise ManifestError(f"input={self.input!r}: expected {{'url': ..., 'sha256': ...}}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Manifest(_Header):
    """The output manifest of shard, pre_encode and render."""
    outputs: tuple[dict, ...] = ()
    """Output entries, typed by stage (ENTRY_FIELDS)."""

    def __post_init__(self) -> None:
        _Header.__post_init__(self)
        if self.stage == "train":
            raise ManifestError("stage 'train' writes a Ledger, not a Manifest")
        object.__setattr__(self, "outputs", tuple(self.outputs))
        for i, e in enumerate(self.outputs):
            _check_entry(self.stage, e, f"outputs[{i}]")


def _from_dict(cls: type, d: Any, url: str, what: str):
    if not isinstance(d, dict):
        raise ManifestError(f"{url}: expected a JSON object, got {type(d).__name__}")
    if d.get("format") != FORMAT:
        raise ManifestError(f"{url}: format={d.get('format')!r}, expected {FORMAT!r} (written by another version?)")
    names = {f.name for f in dataclasses.fields(cls)}
    required = {f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing, unknown = sorted(required - set(d)), sorted(set(d) - names)
    if missing or unknown:
        raise ManifestError(f"{url}: {what} missing fields {missing}, unknown fields {unknown}")
    try:
        return cls(**d)
    except (ManifestError, TypeError) as e:
        raise ManifestError(f"{url}: {e}") from None


def read_manifest(url: str, stage: str | None = None) -> Manifest:
    """Read and validate a manifest; ``stage`` (if given) must match. Refused, naming the URL: a
    negative or non-finite count, a malformed sha256, an output listed twice, totals that disagree
    with the outputs, and a manifest that holds no sample (see `check_outputs`)."""
    m = _from_dict(Manifest, _read_json(url, "manifest"), url, "manifest")
    if stage is not None and m.stage != stage:
        raise ManifestError(f"{url}: a {m.stage!r} manifest, expected the output of {stage!r}")
    check_outputs(m, url)
    return m


_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COUNTS = ("samples", "bytes", "seconds")


def check_outputs(m: Manifest, url: str) -> None:
    """What a reader may rely on beyond the field types: counts >= 0 and finite, a hex sha256 per shard,
    each output (shard URL, rendered audio URL) listed once, ``totals`` equal to the outputs' sums, and
    at least one sample (a render: at least one output). Raises `ManifestError` naming ``url``."""
    seen: dict[str, int] = {}
    key = "url" if m.stage in ("shard", "pre_encode") else "audio"
    for i, e in enumerate(m.outputs):
        for name in _COUNTS:
            value = e.get(name)
            if isinstance(value, _NUMBER) and not (math.isfinite(value) and value >= 0):
                raise ManifestError(f"{url}: outputs[{i}].{name}={value!r}: expected a finite number >= 0")
        if key == "url" and not _SHA256.match(e["sha256"]):
            raise ManifestError(f"{url}: outputs[{i}].sha256={e['sha256']!r}: expected 64 lowercase hex digits")
        if e[key] in seen:
            raise ManifestError(f"{url}: outputs[{i}].{key}={e[key]!r} is listed twice (also outputs[{seen[e[key]]}])")
        seen[e[key]] = i
    sums = _totals(list(m.outputs))
    for name in ("outputs", "samples", "bytes"):
        if name in m.totals and name in sums and m.totals[name] != sums[name]:
            raise ManifestError(f"{url}: totals.{name}={m.totals[name]!r}, but the outputs hold {sums[name]}")
    if not m.outputs or sums.get("samples", 1) == 0:
        raise ManifestError(f"{url}: holds no sample ({len(m.outputs)} outputs, {sums.get('samples', 0)} samples); "
                            "a stage never commits an empty output")


def write_manifest(url: str, manifest: Manifest) -> bool:
    """Write-once: True if written, False if the same content was already there; raises on different."""
    return _write_once(url, manifest.to_dict(), "manifest")


# ----------------------------------------------------------------------------------- plan and parts


def plan_url(out_url: str) -> str:
    return storage.join(out_url, "_plan.json")


def write_plan(out_url: str, items: Iterable[dict]) -> list[dict]:
    """Write ``<out>/_plan.json`` once (re-planning the same items is a no-op); return the items sorted
    by ``id``. Each item is a dict with a unique string ``id`` and its identity (url, size/etag)."""
    items = sorted(items, key=lambda it: str(it.get("id")) if isinstance(it, dict) else "")
    _check_plan(items, out_url)
    _write_once(plan_url(out_url), {"format": FORMAT, "items": items}, "plan")
    return items


def read_plan(out_url: str) -> list[dict]:
    d = _read_json(plan_url(out_url), "plan")
    if not isinstance(d, dict) or d.get("format") != FORMAT or not isinstance(d.get("items"), list):
        raise ManifestError(f"{plan_url(out_url)}: expected {{'format': {FORMAT!r}, 'items': [...]}}")
    _check_plan(d["items"], out_url)
    return d["items"]


def _check_plan(items: list, out_url: str) -> None:
    ids = collections.Counter()
    for i, it in enumerate(items):
        if not isinstance(it, dict) or not isinstance(it.get("id"), str):
            raise ManifestError(f"{plan_url(out_url)}: item {i} = {it!r} needs a string 'id'")
        ids[it["id"]] += 1
    duplicated = [k for k, c in ids.items() if c > 1]
    if duplicated:
        raise ManifestError(f"{plan_url(out_url)}: item ids must be unique, repeated: {_few(duplicated)}")


def items_for_task(plan: list[dict], k: int, n: int) -> list[dict]:
    """Task ``k`` of ``n`` owns the items ``i`` with ``i % n == k``."""
    return [it for i, it in enumerate(plan) if i % n == k]


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Part:
    """What task ``task`` of ``num_tasks`` finished: written after its outputs, before commit."""
    task: int
    num_tasks: int
    items: tuple[str, ...]
    """Ids of the plan items this task finished (whatever came of them)."""
    outputs: tuple[dict, ...]
    """Output entries (see `entry`), in order."""
    rejects: tuple[dict, ...] = ()
    """Reject records ``{"id": <plan item id>, "reason": str, ...}``."""

    def __post_init__(self) -> None:
        for name in ("items", "outputs", "rejects"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for r in self.rejects:
            if not isinstance(r, dict) or not isinstance(r.get("id"), str) or "reason" not in r:
                raise ManifestError(f"part {self.task}: reject {r!r} needs a string 'id' and a 'reason'")


def part_url(out_url: str, k: int, n: int) -> str:
    return storage.join(out_url, "_parts", f"part-{k}-of-{n}.json")


def write_part(out_url: str, part: Part) -> bool:
    """Write-once, like a manifest: a re-run that did the same work is a no-op."""
    return _write_once(part_url(out_url, part.task, part.num_tasks), dataclasses.asdict(part), "part")


def read_part(out_url: str, k: int, n: int) -> Part | None:
    """Task ``k`` of ``n``'s part, or None if it has not finished (a re-run skips a finished task)."""
    url = part_url(out_url, k, n)
    if not storage.exists(url):
        return None
    d = _read_json(url, "part")
    try:
        part = Part(**d)
    except (TypeError, ManifestError) as e:
        raise ManifestError(f"{url}: not a valid part file ({e})") from None
    if (part.task, part.num_tasks) != (k, n):
        raise ManifestError(f"{url}: says task {part.task} of {part.num_tasks}, expected {k} of {n}")
    return part


_PART_NAME = re.compile(r"/part-(\d+)-of-(\d+)\.json$")


def part_task_counts(out_url: str) -> dict[int, list[str]]:
    """``{N: [part URLs]}`` for the part files under ``<out>/_parts/``. A listing, but only to check that
    the parts there belong to one task count (`pipeline.stage_driver`); work is found in the plan."""
    counts: dict[int, list[str]] = {}
    for obj in storage.list_objects(storage.join(out_url, "_parts")):
        match = _PART_NAME.search(obj.url)
        if match:
            counts.setdefault(int(match[2]), []).append(obj.url)
    return counts


def _few(ids: list, n: int = 10) -> str:
    return ", ".join(map(str, ids[:n])) + (f", ... ({len(ids)} in all)" if len(ids) > n else "")


def commit(out_url: str, *, stage: str, num_tasks: int, args: dict, input: dict, properties: dict,
           group: Callable[[list[dict]], dict[str, list[dict]]] | None = None) -> Manifest:
    """Merge the ``num_tasks`` parts, check that every planned item was finished by exactly one task or
    rejected, then write ``<out>/rejects.jsonl`` and the manifests, all write-once.

    ``group`` maps all output entries to ``{sub_dir: entries}``; each group becomes
    ``<out>/<sub_dir>/manifest.json`` (``""`` is ``<out>/manifest.json``, written last because its
    appearance means "done"). Default: everything in the main manifest. The shard stage passes e.g.
    ``lambda es: {"": [e for e in es if not e["val"]], "val": [e for e in es if e["val"]]}``.
    Returns the main manifest. Totals per manifest: ``outputs`` and the sums of ``samples``, ``bytes``,
    ``seconds`` where entries have them; the main one adds ``items`` (planned), ``rejects`` and
    ``tasks`` (``num_tasks``: a re-run with another task count is refused, see `pipeline.stage_driver`).
    A manifest that would hold no sample, or that a reader would refuse (`check_outputs`), is not written.
    """
    plan = read_plan(out_url)
    parts = [read_part(out_url, k, num_tasks) for k in range(num_tasks)]
    absent = [k for k, p in enumerate(parts) if p is None]
    if absent:
        raise ManifestError(f"{out_url}: {len(absent)} of {num_tasks} tasks have not finished (no "
                            f"{part_url(out_url, absent[0], num_tasks)}, ...): tasks {_few(absent)}; "
                            "re-run them (--task-index K --num-tasks N), then commit again")
    owner = {it["id"]: i % num_tasks for i, it in enumerate(plan)}
    done = collections.Counter(i for p in parts for i in p.items)
    rejected = {r["id"] for p in parts for r in p.rejects}
    unknown = sorted((set(done) | rejected) - set(owner))
    stray = sorted(f"{i} (task {p.task}, owner {owner[i]})" for p in parts for i in p.items
                   if i in owner and owner[i] != p.task)
    duplicated = sorted(i for i, c in done.items() if c > 1)
    missing = [i for i in owner if i not in done and i not in rejected]
    problems = [f"{len(x)} {what}: {_few(x)}" for x, what in (
        (unknown, "items not in the plan"), (stray, "items finished by a task that does not own them"),
        (duplicated, "items finished twice"), (missing, "planned items neither finished nor rejected"))
        if x]
    if missing:
        problems.append(f"tasks owning missing items: {_few(sorted({owner[i] for i in missing}))}")
    if problems:
        raise ManifestError(f"{out_url}: cannot commit: " + "; ".join(problems))

    outputs = [e for p in parts for e in p.outputs]
    rejects = [r for p in parts for r in p.rejects]
    rejects_url = storage.join(out_url, "rejects.jsonl")
    _write_once_bytes(rejects_url, "".join(canonical_json(r) + "\n" for r in rejects).encode())
    groups = group(outputs) if group else {"": outputs}
    if "" not in groups or sum(map(len, groups.values())) != len(outputs):
        raise ManifestError(f"commit group function returned {sorted(groups)} with "
                            f"{sum(map(len, groups.values()))} entries for {len(outputs)} outputs; it "
                            "must return a '' (main) group and place every entry exactly once")
    manifests = {}
    for sub in sorted(groups, key=lambda s: s == ""):  # main manifest last
        totals = _totals(groups[sub])
        if sub == "":
            totals.update(items=len(plan), rejects=len(rejects), tasks=num_tasks)
        url = storage.join(out_url, sub, "manifest.json")
        manifests[url] = Manifest(stage=stage, args=args, input=input, properties=properties, totals=totals,
                                  rejects=rejects_url, outputs=tuple(groups[sub]))
        try:  # what a reader refuses is never written; checked for every group before the first is
            check_outputs(manifests[url], url)
        except ManifestError as e:
            raise ManifestError(f"cannot commit: {e} (reasons of the rejected items in {rejects_url})") from None
    for url, m in manifests.items():
        write_manifest(url, m)
    return m


def _totals(entries: list[dict]) -> dict:
    totals: dict[str, Any] = {"outputs": len(entries)}
    for name in ("samples", "bytes", "seconds"):
        if entries and all(name in e for e in entries):
            totals[name] = sum(e[name] for e in entries)
    return totals


def _write_once_bytes(url: str, data: bytes) -> None:
    if not storage.put_if_absent(url, data) and storage.read_bytes(url) != data:
        raise ManifestError(f"{url}: already exists with different content (a commit of other work?)")


# ----------------------------------------------------------------------------------------- ledger


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class CheckpointEntry:
    step: int
    tag: str
    checkpoint_url: str
    """The DeepSpeed checkpoint folder <out>/checkpoints/<tag>."""
    export_url: str
    """The exported .safetensors (EMA weights when ``ema``, else the raw weights)."""
    export_sha256: str
    ema: bool


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class Ledger(_Header):
    """``<out>/checkpoints/manifest.json``: complete checkpoints only, rewritten after each one."""
    checkpoints: tuple[CheckpointEntry, ...] = ()
    """Sorted by step."""

    def __post_init__(self) -> None:
        _Header.__post_init__(self)
        if self.stage != "train":
            raise ManifestError(f"a ledger has stage 'train', got {self.stage!r}")
        if "model_config_sha256" not in self.properties:
            raise ManifestError("ledger properties need 'model_config_sha256'")
        cps = tuple(c if isinstance(c, CheckpointEntry) else CheckpointEntry(**c) for c in self.checkpoints)
        object.__setattr__(self, "checkpoints", tuple(sorted(cps, key=lambda c: c.step)))

    def add(self, checkpoint: CheckpointEntry) -> Ledger:
        """A new ledger with ``checkpoint`` added (replacing an entry with the same tag or step)."""
        kept = [c for c in self.checkpoints if c.tag != checkpoint.tag and c.step != checkpoint.step]
        return dataclasses.replace(self, checkpoints=(*kept, checkpoint))

    def keep_last(self, n: int) -> tuple[Ledger, list[CheckpointEntry]]:
        """(ledger with the newest ``n`` checkpoints, removed entries). Write the new ledger first, then
        delete the removed checkpoints' files, so the ledger never lists a deleted checkpoint."""
        if n < 1:
            raise ValueError(f"--keep-last={n}: must be >= 1")
        cut = max(len(self.checkpoints) - n, 0)
        return dataclasses.replace(self, checkpoints=self.checkpoints[cut:]), list(self.checkpoints[:cut])

    def at_step(self, step: int | None = None) -> CheckpointEntry:
        """The checkpoint at ``step``, or the newest one when ``step`` is None."""
        if not self.checkpoints:
            raise ManifestError("the ledger lists no checkpoint yet")
        if step is None:
            return self.checkpoints[-1]
        for c in self.checkpoints:
            if c.step == step:
                return c
        raise ManifestError(f"no checkpoint at step {step}; the ledger has steps "
                            f"{[c.step for c in self.checkpoints]}")


def write_ledger(url: str, ledger: Ledger) -> None:
    """Atomic overwrite (temp + rename, or one PUT)."""
    storage.write(url, _dumps(ledger.to_dict()))


def read_ledger(url: str) -> Ledger:
    return _from_dict(Ledger, _read_json(url, "checkpoint ledger"), url, "ledger")
