"""``plan | run | commit`` for the stages whose work is split into tasks: shard, pre_encode, render.

ARCHITECTURE.md "Manifests". What the three stages do alike lives here, once:

- **Steps.** ``plan`` lists the work into ``<out>/_plan.json`` and the settings into ``<out>/_args.json``
  (both write-once). ``run`` is task k of N (`pipeline.tasks`): it processes the plan items
  ``i % N == k`` and writes ``<out>/_parts/part-k-of-N.json``; with N == 1 it also plans first and
  commits last. ``commit`` merges N parts into the manifest, N from ``--num-tasks`` (a commit job is
  not one of the tasks: ``--task-index`` is ignored), else from the SLURM array and launcher.
- **A committed output is never rewritten.** ``run``, ``commit`` (and ``plan``) on an output whose
  manifest exists are a no-op when the settings, the plan and the task count are the ones it was
  committed with, and refused (one line, exit 2) when anything differs. ``run`` also refuses when
  part files of another task count exist (their shard names would collide with this run's), and every
  step refuses settings other than the ones in ``<out>/_args.json``.
- **One log format** and one progress line (`Progress`).

A stage supplies a `Stage`: its settings and three callables (compute the plan items, run one task's
items, merge the parts). It keeps its own CLI and calls `main`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from collections.abc import Callable

from pipeline import manifest as mf
from pipeline import storage
from pipeline.cli import USER_ERRORS, report_error
from pipeline.config_json import canonical_json
from pipeline.tasks import TaskSlot, task_count, task_slot

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class StageError(ValueError):
    """A condition that stops a stage and that the user can act on: one line, exit code 2."""


Work = list[tuple[int, dict]]
"""This task's plan items with their index in the plan: ``[(i, item), ...]`` for ``i % N == k``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Stage:
    name: str
    """``shard``, ``pre_encode`` or ``render``: the manifest's stage and the logger's name."""
    output: str
    """The output URL."""
    settings: dict
    """The arguments that decide the output (JSON values): ``<out>/_args.json`` and the manifest's ``args``.
    Leave out what may change between a task and its re-run (device, workers, batch size, task layout)."""
    plan_items: Callable[[], list[dict]]
    """List the work (reads inputs, writes nothing): plan items with a unique string ``id``."""
    run_task: Callable[[Work, TaskSlot, Progress], tuple[list[dict], list[dict]]]
    """Process this task's items (write their outputs); -> (output entries, reject records)."""
    commit: Callable[[int], mf.Manifest]
    """Merge the N parts into the manifest(s) (`pipeline.manifest.commit` with the stage's properties)."""

    @property
    def logger(self) -> logging.Logger:
        return logging.getLogger(f"pipeline.{self.name}")

    @property
    def manifest_url(self) -> str:
        return storage.join(self.output, "manifest.json")


def main(args: argparse.Namespace, build: Callable[[], Stage], dry_run: Callable[[], None]) -> int:
    """A stage's ``main`` after parsing: log setup, then ``dry_run()`` or the step in ``args.command``;
    a user error is one line and exit code 2 (`pipeline.cli`)."""
    init_logging(args.debug)
    try:
        if args.dry_run:
            dry_run()
            return 0
        drive(build(), args.command, task_index=args.task_index, num_tasks=args.num_tasks)
    except USER_ERRORS as e:
        return report_error(e, args.debug)
    return 0


def init_logging(debug: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format=LOG_FORMAT, datefmt="%H:%M:%S")


def drive(stage: Stage, command: str, *, task_index: int | None = None, num_tasks: int | None = None,
          env=None) -> mf.Manifest | None:
    """Run one step; -> the manifest when this step committed (or found it committed), else None."""
    log = stage.logger
    if command == "commit":
        slot = TaskSlot(0, task_count(env, num_tasks))
    elif command in ("plan", "run"):
        slot = task_slot(env, task_index=task_index, num_tasks=num_tasks)
    else:
        raise StageError(f"unknown step {command!r}: expected plan, run or commit")
    planning = command == "plan" or (command == "run" and slot.count == 1)
    log.info("%s %s | %s | -> %s", stage.name, command,
             "plan" if command == "plan" else f"task {slot.index} of {slot.count}" if command == "run"
             else f"{slot.count} tasks", stage.output)
    log.info("settings: %s", canonical_json(stage.settings))
    storage.check_put_if_absent(stage.output)
    items = stage.plan_items() if planning else None
    committed = committed_manifest(stage, None if command == "plan" else slot.count, items)
    if committed is not None:
        log.info("%s is committed with these settings, plan and task count: nothing to do", stage.manifest_url)
        log.info("manifest: %s", stage.manifest_url)
        return committed
    check_settings(stage)
    if planning:
        items = mf.write_plan(stage.output, items)
        log.info("planned %d items -> %s", len(items), mf.plan_url(stage.output))
        if command == "plan":
            return None
    else:
        items = mf.read_plan(stage.output)
    refuse_other_task_counts(stage, slot.count)
    if command == "run":
        run(stage, items, slot)
        if slot.count > 1:
            return None
    m = stage.commit(slot.count)
    log.info("committed | %s", " | ".join(f"{k} {_number(v)}" for k, v in m.totals.items()))
    log.info("manifest: %s", stage.manifest_url)
    return m


def run(stage: Stage, items: list[dict], slot: TaskSlot) -> None:
    """Task k of N: skipped when its part exists, else its items are processed and its part written."""
    log, out = stage.logger, stage.output
    if mf.read_part(out, slot.index, slot.count) is not None:
        log.info("task %d of %d already finished (%s): skipped", slot.index, slot.count,
                 mf.part_url(out, slot.index, slot.count))
        return
    work = [(i, it) for i, it in enumerate(items) if i % slot.count == slot.index]
    # pre_encode's items are shards with sample counts: its ETA follows samples, not whole shards.
    progress = Progress(log, f"{stage.name} task {slot.index}/{slot.count}", len(work),
                        total_samples=sum(it.get("samples", 0) for _, it in work) or None)
    outputs, rejects = stage.run_task(work, slot, progress)
    mf.write_part(out, mf.Part(task=slot.index, num_tasks=slot.count, items=tuple(it["id"] for _, it in work),
                               outputs=tuple(outputs), rejects=tuple(rejects)))
    progress.close(f"{len(outputs)} outputs, {len(rejects)} reject records")


# ------------------------------------------------------------------------------ what was there before


def committed_manifest(stage: Stage, num_tasks: int | None, items: list[dict] | None) -> mf.Manifest | None:
    """The committed manifest when this step would produce exactly it (settings, plan ``items`` when
    given, task count when given), None when there is none; `StageError` naming every difference."""
    if not storage.exists(stage.manifest_url):
        return None
    m = mf.read_manifest(stage.manifest_url, stage=stage.name)
    differ = [f"settings ({c})" for c in [_changes(m.args, stage.settings)] if c]
    if items is not None:
        planned = mf.read_plan(stage.output)
        now = sorted(items, key=lambda it: it["id"])
        if not mf.same_content(planned, now):
            differ.append(f"plan ({len(planned)} items there, {len(now)} now"
                          f"{', other items' if len(planned) == len(now) else ''})")
    if num_tasks is not None:
        recorded = _committed_tasks(m, stage.output, num_tasks)
        if recorded != num_tasks:
            differ.append(f"task count ({recorded if recorded else 'another'} there, {num_tasks} now)")
    if differ:
        raise StageError(f"{stage.manifest_url} is committed with other {'; '.join(differ)}; a committed output "
                         "is never rewritten: repeat the committed run exactly, or write to a new --output")
    return m


def _committed_tasks(m: mf.Manifest, out: str, num_tasks: int) -> int | None:
    recorded = m.totals.get("tasks")
    if recorded is None:  # committed before the count was recorded: its parts tell
        complete = all(storage.exists(mf.part_url(out, k, num_tasks)) for k in range(num_tasks))
        recorded = num_tasks if complete else None
    return recorded


def check_settings(stage: Stage) -> None:
    """Every step and task of one output runs with the same settings (``<out>/_args.json``, write-once)."""
    url = storage.join(stage.output, "_args.json")
    if storage.put_if_absent(url, canonical_json(stage.settings).encode()):
        return
    try:
        have = json.loads(storage.read_bytes(url))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{url}: not valid JSON ({e}); the output's settings are unknown: use a new --output") from None
    changes = _changes(have, stage.settings)
    if changes:
        raise StageError(f"{stage.output} was planned with other settings ({changes}); use a new --output")


def refuse_other_task_counts(stage: Stage, num_tasks: int) -> None:
    """Parts of another task count mean other tasks wrote this output (with colliding shard names)."""
    other = {n: urls for n, urls in mf.part_task_counts(stage.output).items() if n != num_tasks}
    if other:
        n, urls = min(other.items())
        raise StageError(f"{stage.output}: {len(urls)} part files of a run with {n} tasks exist (e.g. {urls[0]}); "
                         f"this step has {num_tasks}: run it with {n} tasks (--num-tasks, or the array size), "
                         "or write to a new --output")


def _changes(have, want) -> str:
    if not isinstance(have, dict):
        return f"{have!r} there"
    differ = sorted(k for k in set(have) | set(want) if not mf.same_content(have.get(k), want.get(k)))
    return ", ".join(f"{k}: {have.get(k)!r} there, {want.get(k)!r} now" for k in differ)


# ------------------------------------------------------------------------------------------- rejects


def check_reject_fraction(stage: Stage, num_tasks: int, max_fraction: float, what: str) -> int:
    """The rule every stage applies before it commits: more than ``max_fraction`` of the planned items
    with a whole-item reject record (one without a ``key``: the item gave no sample) stops the stage,
    after writing ``rejects.jsonl`` so the reasons can be read. -> the number of such items."""
    plan = mf.read_plan(stage.output)
    parts = [mf.read_part(stage.output, k, num_tasks) for k in range(num_tasks)]
    if not all(parts):
        return 0  # the commit names the tasks that have not finished
    rejects = [r for p in parts for r in p.rejects]
    failed = [r for r in rejects if "key" not in r]
    if plan and len(failed) > max_fraction * len(plan):
        url = storage.join(stage.output, "rejects.jsonl")
        storage.write(url, "".join(canonical_json(r) + "\n" for r in rejects).encode())
        raise StageError(f"{len(failed)} of {len(plan)} {what} gave no sample ({len(failed) / len(plan):.1%} > "
                         f"--max-reject-fraction {max_fraction}); first: {failed[0]['reason']}; reasons in {url}")
    return len(failed)


# ------------------------------------------------------------------------------------------ progress


class Progress:
    """Items done, samples, seconds of audio, rate and ETA: a tqdm bar on a terminal, else (SLURM logs)
    one line every few seconds, the same for every stage:

        shard task 0/2 | items 3/10 | samples 12 | audio 48.0 s | 0.6 items/s | 9.6x realtime | eta 12 s
    """

    def __init__(self, log: logging.Logger, label: str, total: int, every: float = 5.0,
                 total_samples: int | None = None):
        self.log, self.label, self.total, self.every = log, label, total, every
        self.total_samples = total_samples
        self.items, self.samples, self.seconds = 0, 0, 0.0
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=label, unit="item", dynamic_ncols=True)

    def update(self, items: int = 1, samples: int = 0, seconds: float = 0.0) -> None:
        """``items`` plan items finished, giving ``samples`` samples of ``seconds`` of audio."""
        self.items += items
        self.samples += samples
        self.seconds += seconds
        now = time.monotonic()
        if self.bar is not None:
            self.bar.update(items)
            self.bar.set_postfix_str(f"{self.samples} samples, {self.seconds:.0f} s audio", refresh=False)
        elif now - self.last >= self.every:
            self.last = now
            self.log.info("%s", self.line())

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        done, total = ((self.samples, self.total_samples) if self.total_samples else (self.items, self.total))
        eta = elapsed / done * (total - done) if done else float("nan")
        return (f"{self.label} | items {self.items}/{self.total} | samples {self.samples} | audio "
                f"{self.seconds:.1f} s | {self.items / elapsed:.2f} items/s | {self.seconds / elapsed:.1f}x "
                f"realtime | eta {eta:.0f} s")

    def close(self, summary: str) -> None:
        if self.bar is not None:
            self.bar.close()
        self.log.info("%s | %s", self.line(), summary)


def _number(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)
