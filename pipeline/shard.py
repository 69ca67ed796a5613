"""Stage 1 `shard`: raw audio files plus captions -> webdataset shards of ``<key>.flac`` + ``<key>.json``.

    python -m pipeline.shard [plan|run|commit] --input DIR_OR_URL --output URL [--captions FILE] ...

``plan`` lists the input once into ``<out>/_plan.json``; ``run`` processes task k's files (plan item i
belongs to task i % N) into ``<out>/shard-<k>-<n>.tar`` (validation files: ``<out>/val/...``) and then
writes its part file; ``commit`` merges the parts into ``<out>/manifest.json`` and ``<out>/val/manifest.json``.
With one task and no SLURM array, ``run`` plans and commits by itself.

Each source file is all or nothing: it is decoded, resampled (soxr HQ), set to ``--channels``, cut into
``--window-seconds`` windows, and its samples are written only if the whole file decoded. A file that
gives no sample, and every dropped window, is a line in ``rejects.jsonl`` with its reason. Memory is
bounded on any input: sources are decoded and resampled in blocks and each window is encoded as it
completes into an on-disk spool (`pipeline.data.spool`). Rejected as well: a header rate outside
[1, 384] kHz, a source longer than ``--max-seconds``, samples peaking above +6 dBFS (float audio on the
wrong scale), a file that runs out of memory, and the links and names `sources.discover` flags.

A sample's JSON holds the caption's other fields (one named like a computed field becomes
``meta_<name>``) and: ``prompt``; ``offset_seconds`` (exact start of the window in the source);
``seconds_start`` = floor(offset_seconds) and ``seconds_total`` = ceil(source seconds), as SAT computes
them; ``duration`` (seconds in this sample); ``source`` (URL) and ``source_path`` (relative to --input);
``source_duration``; ``original_sample_rate``, ``original_channels``; ``sample_rate``, ``channels``;
``window_index``. Keys are ``<16 hex of sha256(source_path)>-<window index>``.

Resume: a task whose part file exists is skipped. A task killed before its part file is redone from
the start; shard names and bytes are deterministic, so it overwrites its earlier shards with the same
content and nothing is duplicated or lost. A committed output is never rewritten: a re-run with the same
settings and task count is a no-op, any other is refused, and so is a run whose task count differs from
that of parts already written (`pipeline.stage_driver`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator

from pipeline import manifest as mf
from pipeline import stage_driver, storage
from pipeline.data import audio as audio_io
from pipeline.data import sources
from pipeline.data.shards import ShardWriter
from pipeline.data.spool import SampleSpool
from pipeline.stage_driver import Progress, Stage, StageError, check_reject_fraction
from pipeline.tasks import TaskSlot, task_slot

logger = logging.getLogger("pipeline.shard")

RESERVED = ("prompt", "offset_seconds", "seconds_start", "seconds_total", "duration", "source", "source_path",
            "source_duration", "original_sample_rate", "original_channels", "sample_rate", "channels",
            "window_index")
"""Sample JSON fields the stage computes; a metadata field with one of these names becomes ``meta_<name>``."""
OUTPUT_ARGS = ("input", "captions", "sample_rate", "channels", "window_seconds", "min_seconds", "silence_db",
               "val_fraction", "shard_size_mb", "max_seconds")
"""Arguments that change what is written; every task of one output must agree on them."""


# ------------------------------------------------------------------------------------- one source


def process_source(item: dict, args: argparse.Namespace) -> tuple[Iterable, list[dict], float]:
    """-> (samples ``(key, {"flac", "json"}, seconds)``, reject records, seconds of source audio).

    Memory stays bounded whatever the source's length: it is read from disk in blocks (an S3 source is
    downloaded to a temp file first) and each window is encoded as it completes into a `SampleSpool`.
    """
    def reject(reason: str, **extra) -> dict:
        return {"id": item["id"], "path": item["path"], "reason": reason, **extra}

    if "problem" in item:  # found at plan time: a dangling link, a link loop, a name that is not UTF-8
        return [], [reject(item["problem"])], 0.0
    try:
        caption = dict(item.get("caption") or {})
        if not caption and "sidecar" in item:
            caption = sources.read_sidecar(item["sidecar"])
        if not caption.get("prompt"):
            where = "--captions" if args.captions else "a .txt/.json sidecar"
            return [], [reject(f"no caption (none in {where})")], 0.0
        with _local_file(item["url"]) as path:
            return _source_samples(path, item, caption, args, reject)
    except (ValueError, storage.NotFoundError) as e:  # AudioError, CaptionError, vanished since plan
        return [], [reject(str(e))], 0.0
    except MemoryError:  # one file's failure, not the task's: the spool and blocks are freed by now
        return [], [reject("out of memory while decoding this file; set --max-seconds to reject long "
                           "sources, or --window-seconds")], 0.0


def _source_samples(path: str, item: dict, caption: dict, args: argparse.Namespace, reject) -> tuple:
    stream = audio_io.stream_windows(path, args.sample_rate, args.channels, args.window_seconds,
                                     args.max_seconds)
    spool, rejects, encoder = SampleSpool(), [], None
    try:
        for piece in stream.pieces():  # all or nothing: a decode error in the last block rejects the file
            encoder = encoder or audio_io.FlacEncoder(args.sample_rate, args.channels)
            encoder.write(piece.audio)
            if not piece.last:
                continue
            key = sources.sample_key(item["path"], piece.index)
            seconds, level = encoder.frames / args.sample_rate, encoder.level_dbfs
            if seconds < args.min_seconds:
                rejects.append(reject(f"window of {seconds:.3f} s < --min-seconds {args.min_seconds}", key=key))
            elif level < args.silence_db:
                rejects.append(reject(f"silent: {level:.1f} dBFS < --silence-db {args.silence_db}", key=key))
            else:
                offset = stream.offset_seconds(piece.index)
                spool.add(key, encoder.finish(), {"offset_seconds": offset, "seconds_start": math.floor(offset),
                                                  "duration": seconds, "window_index": piece.index}, seconds)
            encoder.discard()
            encoder = None
    except BaseException:
        spool.close()
        raise
    finally:
        if encoder is not None:
            encoder.discard()
    info, seconds_total = stream.info, stream.source_seconds
    if seconds_total < args.min_seconds:
        spool.close()
        return [], [reject(f"too short: {seconds_total:.3f} s < --min-seconds {args.min_seconds}")], 0.0
    if not spool:
        spool.close()
        silent = sum(r["reason"].startswith("silent") for r in rejects)
        rejects.append(reject(f"no sample left: {silent} silent and {len(rejects) - silent} too short "
                              "windows (see their records)"))
        return [], rejects, seconds_total
    meta = {(f"meta_{k}" if k in RESERVED else k): v for k, v in caption.items() if k != "prompt"}
    common = dict(meta, prompt=caption["prompt"], seconds_total=math.ceil(seconds_total), source=item["url"],
                  source_path=item["path"], source_duration=seconds_total, original_sample_rate=info.sample_rate,
                  original_channels=info.channels, sample_rate=args.sample_rate, channels=args.channels)
    return spool.samples(common), rejects, seconds_total


@contextlib.contextmanager
def _local_file(url: str) -> Iterator[str]:
    """A local path holding ``url``: itself, or an S3 object downloaded to a temp folder (soundfile
    seeks, and a download keeps memory flat however long the source is)."""
    if not storage.is_s3(url):
        storage.stat(url)  # NotFoundError for a file that vanished since plan
        yield url
        return
    with tempfile.TemporaryDirectory(prefix="cantus-source-") as tmp:
        path = os.path.join(tmp, "source")
        storage.download(url, path)
        yield path


# ------------------------------------------------------------------------------------- plan/run/commit


def plan_items(args: argparse.Namespace) -> list[dict]:
    """The input files with their captions (lists --input once; writes nothing)."""
    items, ignored = sources.discover(args.input, args.captions)
    if ignored:
        logger.warning("ignored %d non-audio files under %s: %s", sum(ignored.values()), args.input,
                       ", ".join(f"{n} x {ext}" for ext, n in ignored.most_common()))
    if not items:
        raise StageError(f"--input {args.input}: no audio files found (looked for extensions "
                         f"{', '.join(sorted(sources.AUDIO_EXTENSIONS)[:8])}, ...)")
    if args.captions:
        table = sources.read_captions(args.captions)
        used = set()
        for item in items:
            row = table.get(sources.caption_path(item["path"]))
            if row is not None:
                item["caption"] = row
                used.add(sources.caption_path(item["path"]))
        unused = sorted(set(table) - used)
        if unused:
            logger.warning("%d rows of %s name no file under --input (e.g. %s)", len(unused), args.captions,
                           ", ".join(unused[:3]))
    return sorted(items, key=lambda it: it["id"])


def run_task(args: argparse.Namespace, work: list[tuple[int, dict]], slot: TaskSlot,
             progress: Progress) -> tuple[list[dict], list[dict]]:
    """Shard this task's files into ``shard-<k>-<n>.tar`` (``val/`` for the validation split)."""
    k, max_bytes = slot.index, int(args.shard_size_mb * 1024 * 1024)
    rejects = []
    with ShardWriter(lambda i: storage.join(args.output, f"shard-{k:05d}-{i:05d}.tar"), max_bytes) as train, \
            ShardWriter(lambda i: storage.join(args.output, "val", f"shard-{k:05d}-{i:05d}.tar"), max_bytes) as val:
        for _, item in work:
            samples, bad, seconds = process_source(item, args)
            writer = val if sources.is_val(item["path"], args.val_fraction) else train
            count = 0
            for key, members, sample_seconds in samples:  # a generator: windows come off the spool one by one
                writer.add(key, members, sample_seconds)
                count += 1
            rejects += bad
            progress.update(samples=count, seconds=seconds)
    outputs = [dict(s.to_dict(), val=False) for s in train.shards] + [dict(s.to_dict(), val=True) for s in val.shards]
    return outputs, rejects


def commit(args: argparse.Namespace, stage: Stage, n: int) -> mf.Manifest:
    """Merge the parts into ``manifest.json`` (and ``val/manifest.json``)."""
    failed = check_reject_fraction(stage, n, args.max_reject_fraction, "input files")

    def split(entries: list[dict]) -> dict[str, list[dict]]:
        groups = {"": [e for e in entries if not e["val"]]}
        if args.val_fraction > 0:
            groups["val"] = [e for e in entries if e["val"]]
        return {g: [{k: v for k, v in e.items() if k != "val"} for e in es] for g, es in groups.items()}

    m = mf.commit(args.output, stage="shard", num_tasks=n, args=_output_args(args),
                  input=mf.input_ref(mf.plan_url(args.output)),
                  properties={"sample_rate": args.sample_rate, "channels": args.channels}, group=split)
    val = ""
    if args.val_fraction > 0:
        t = mf.read_manifest(storage.join(args.output, "val", "manifest.json")).totals
        val = f" (val/: {t.get('samples', 0)} samples, {t.get('seconds', 0.0):.1f} s)"
    logger.info("%d samples, %.1f s of audio, %d shards%s; %d of %d files gave no sample; %d reject records in %s",
                m.totals.get("samples", 0), m.totals.get("seconds", 0.0), m.totals["outputs"], val, failed,
                m.totals["items"], m.totals["rejects"], m.rejects)
    return m


def _output_args(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in OUTPUT_ARGS}


def build_stage(args: argparse.Namespace) -> Stage:
    stage = Stage(name="shard", output=args.output, settings=_output_args(args),
                  plan_items=lambda: plan_items(args),
                  run_task=lambda work, slot, progress: run_task(args, work, slot, progress),
                  commit=lambda n: commit(args, stage, n))
    return stage


def dry_run(args: argparse.Namespace) -> None:
    slot = task_slot(task_index=args.task_index, num_tasks=args.num_tasks)
    items = plan_items(args)
    mine = mf.items_for_task(items, slot.index, slot.count)
    captioned = sum(1 for it in items if "caption" in it or "sidecar" in it)
    logger.info("dry run: %d files (%.1f MB), %d with a caption or sidecar; task %d of %d owns %d", len(items),
                sum(it["size"] for it in items) / 1e6, captioned, slot.index, slot.count, len(mine))


# ------------------------------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.shard", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=("plan", "run", "commit"),
                   help="plan: list inputs into _plan.json; run: process this task's files (one task: "
                        "plan, run and commit); commit: merge the parts into the manifests")
    p.add_argument("--input", required=True, help="folder or s3:// prefix holding the audio files")
    p.add_argument("--output", required=True, help="output folder or s3:// prefix (one per dataset version)")
    p.add_argument("--captions", default=None,
                   help="metadata file (.jsonl, or .csv with a header) with 'path' (relative to --input) and "
                        "'prompt' ('caption' or 'text' also accepted); default: .txt/.json sidecars")
    p.add_argument("--sample-rate", type=int, default=44100, help="output sample rate in Hz")
    p.add_argument("--channels", type=int, default=2, choices=(1, 2), help="output channels")
    p.add_argument("--shard-size-mb", type=float, default=256, help="start a new tar beyond this size (MiB)")
    p.add_argument("--window-seconds", type=float, default=None,
                   help="cut sources into windows of this length (seconds); unset: one sample per file")
    p.add_argument("--min-seconds", type=float, default=1.0,
                   help="reject sources and windows shorter than this (seconds)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="reject sources longer than this (seconds); unset: no limit. Memory does not grow with "
                        "a source's length, except that without --window-seconds its one sample's FLAC "
                        "is held in memory while it goes into the tar")
    p.add_argument("--silence-db", type=float, default=-60.0,
                   help="reject windows whose RMS level is below this (dBFS; SAT uses -60)")
    p.add_argument("--max-reject-fraction", type=float, default=0.05,
                   help="fail if more than this fraction of input files gives no sample")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="share of source files (by hash of path) written to <output>/val/")
    p.add_argument("--task-index", type=int, default=None, help="this task k (default: from SLURM array/ranks, else 0)")
    p.add_argument("--num-tasks", type=int, default=None, help="number of tasks N (default: from SLURM, else 1)")
    p.add_argument("--dry-run", action="store_true", help="list inputs and print the plan; write nothing")
    p.add_argument("--debug", action="store_true", help="log at DEBUG level and show tracebacks")
    args = p.parse_args(argv)
    for name, low, high in (("val_fraction", 0, 1), ("max_reject_fraction", 0, 1)):
        if not low <= getattr(args, name) <= high:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be in [{low}, {high}]")
    if not audio_io.MIN_SAMPLE_RATE <= args.sample_rate <= audio_io.MAX_SAMPLE_RATE or args.shard_size_mb <= 0 \
            or args.min_seconds < 0 or any(v is not None and v <= 0 for v in (args.window_seconds, args.max_seconds)):
        p.error(f"--sample-rate must be in [{audio_io.MIN_SAMPLE_RATE}, {audio_io.MAX_SAMPLE_RATE}], "
                "--shard-size-mb, --window-seconds and --max-seconds > 0, --min-seconds >= 0")
    if not storage.is_s3(args.input):
        args.input = os.path.abspath(args.input)
        if not os.path.isdir(args.input):
            p.error(f"--input {args.input}: no such folder")
    if args.captions and not storage.is_s3(args.captions):
        args.captions = os.path.abspath(args.captions)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return stage_driver.main(args, build=lambda: build_stage(args), dry_run=lambda: dry_run(args))


if __name__ == "__main__":
    sys.exit(main())
