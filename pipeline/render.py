"""Stage 4 `render`: checkpoints x prompts x CFG scales x seeds -> audio, spectrograms and a listening page.

    python -m pipeline.render [plan|run|commit] --checkpoints <ledger URL | .safetensors ...> \\
        --prompts prompts.jsonl --output URL [--checkpoint-steps 2000,4000 --cfg-scales 3,6,9 --seeds 0,1
        --steps N --sampler NAME --seconds S --batch-size B --dtype fp32|bf16|fp16 --model-config FILE]

Outputs ``<out>/<checkpoint>/<prompt-id>/cfg<scale>-seed<s>.{flac,png,json}``, ``<out>/index.html``
(prompts as rows, checkpoints x CFG as columns) and ``<out>/manifest.json``.

The plan lists one work item per (checkpoint, prompt, CFG, seed), with everything needed to produce
it (metadata, sampler, steps, length, the checkpoint's identity); task ``k`` of ``N`` owns items
``i % N == k``, loads each of its checkpoints once and batches its items. An item is done when its JSON
(written last) exists, so a killed task resumes where it stopped. Because `pipeline.generate` seeds
each item's own generator, an item's audio does not depend on the batch size or the split. Plan, run
and commit go through `pipeline.stage_driver`: a committed output is never rewritten.

Defaults come from each checkpoint's config: steps from ``training.demo.demo_steps``, CFG scales from
``training.demo.demo_cfg_scales``, the sampler from ``training.cantus.demo_sampler`` or the objective's
default, the length from ``sample_size``. A checkpoint without ``model_config`` metadata (an SAT or
SAO file) needs ``--model-config``. Each line of the prompts file is conditioner metadata (``prompt``,
``seconds_start``, ``seconds_total``, ...) plus an optional ``id`` (default ``p000``, ``p001``, ... by
line) and ``negative_prompt`` (the item's metadata with that prompt replaces CFG's null condition).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import torch

from pipeline import manifest as mf
from pipeline import stage_driver, storage
from pipeline.config import ModelConfig
from pipeline.config_json import ConfigError
from pipeline.generate import generate
from pipeline.models import create_model_from_config
from pipeline.render_plan import (Checkpoint, load_checkpoint_config, load_checkpoint_weights, plan_items, read_prompts,
                                  resolve_checkpoints)
from pipeline.report.clips import clip_files
from pipeline.render_refs import write_references
from pipeline.report.page import Clip, Reference, prompt_header, render_page
from pipeline.stage_driver import Progress, Stage
from pipeline.tasks import task_slot

logger = logging.getLogger("pipeline.render")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------- plan


def build_plan(args) -> tuple[list[dict], dict[str, ModelConfig]]:
    """The work items (not yet written) and the model config of each checkpoint, by name."""
    checkpoints = resolve_checkpoints(args.checkpoints, args.checkpoint_steps)
    prompts = read_prompts(args.prompts)
    configs = {c.name: load_checkpoint_config(c, args.model_config) for c in checkpoints}
    items = plan_items(checkpoints, configs, prompts, cfg_scales=args.cfg_scales, seeds=args.seeds,
                       steps=args.steps, sampler=args.sampler, seconds=args.seconds)
    return items, configs


# ------------------------------------------------------------------------------------------------ run


def run_task(args, work: list[tuple[int, dict]], slot, progress: Progress) -> tuple[list[dict], list[dict]]:
    """Render this task's items not rendered yet (an item is done when its JSON, written last, exists)."""
    mine = [it for _, it in work]
    pending = [it for it in mine if not storage.exists(_url(args.output, it, ".json"))]
    logger.info("task %d of %d: %d items, %d already rendered", slot.index, slot.count, len(mine),
                len(mine) - len(pending))
    progress.update(items=len(mine) - len(pending))
    by_checkpoint: dict[str, list[dict]] = {}
    for item in pending:
        by_checkpoint.setdefault(item["checkpoint"], []).append(item)
    for name, items in by_checkpoint.items():
        checkpoint = Checkpoint(name=name, url=items[0]["checkpoint_url"], step=items[0]["step"],
                                identity=items[0]["checkpoint_identity"])
        cfg = load_checkpoint_config(checkpoint, args.model_config)
        if cfg.sha256 != items[0]["model_config_sha256"]:
            raise ConfigError(f"{checkpoint.url}: model config sha256 {cfg.sha256[:12]} differs from the plan's "
                              f"{items[0]['model_config_sha256'][:12]}; render into a new --output")
        t0 = time.time()
        model = load_model(checkpoint, cfg, args.device)
        load_seconds = time.time() - t0
        for batch in _batches(items, args.batch_size):
            render_batch(args, model, batch, load_seconds)
            progress.update(items=len(batch), samples=len(batch), seconds=sum(it["seconds"] for it in batch))
        del model
    outputs = [mf.entry("render", audio=_url(args.output, it, ".flac"), image=_url(args.output, it, ".png"),
                        json=_url(args.output, it, ".json"), checkpoint=it["checkpoint"],
                        prompt_id=it["prompt_id"], cfg=it["cfg"], seed=it["seed"], seconds=it["seconds"])
               for it in mine]
    return outputs, []


def _url(out: str, item: dict, ext: str) -> str:
    return storage.join(out, item["id"] + ext)


def _batches(items: list[dict], size: int) -> list[list[dict]]:
    """Items that can share a sampler call (same settings; all or none with a negative prompt), in
    chunks of ``size``."""
    groups: dict[tuple, list[dict]] = {}
    for it in items:
        key = (it["sampler"], it["steps"], it["length"], it["cfg"], it["negative_metadata"] is None)
        groups.setdefault(key, []).append(it)
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def load_model(checkpoint: Checkpoint, cfg: ModelConfig, device: str) -> torch.nn.Module:
    """The model with the checkpoint's weights (strict: every key must match), on ``device``, in eval mode."""
    if "size" in checkpoint.identity:  # a file given by URL: it must still be the file that was planned
        info = storage.stat(checkpoint.url)
        if {"size": info.size, "etag": info.etag} != checkpoint.identity:
            raise ConfigError(f"{checkpoint.url}: changed since the plan (size/etag {info.size}/{info.etag}, "
                              f"planned {checkpoint.identity}); render into a new --output")
    model, _ = load_checkpoint_weights(checkpoint, cfg)
    return model.to(device).eval()


def render_batch(args, model: torch.nn.Module, batch: list[dict], load_seconds: float) -> None:
    first = batch[0]
    t0 = time.time()
    negative = None if first["negative_metadata"] is None else [it["negative_metadata"] for it in batch]
    out = generate(model, [it["metadata"] for it in batch], [it["seed"] for it in batch], steps=first["steps"],
                   length=first["length"], cfg_scale=first["cfg"], sampler=first["sampler"],
                   negative_metadata=negative, device=args.device, dtype=DTYPES[args.dtype])
    seconds = time.time() - t0
    for item, audio in zip(batch, out.audio):
        info = {key: item[key] for key in ("prompt_id", "metadata", "negative_metadata", "seed", "cfg", "sampler",
                                           "steps", "length", "seconds", "sample_rate", "checkpoint",
                                           "checkpoint_url", "step", "model_config_sha256")}
        info["prompt"] = item["metadata"].get("prompt")
        info["timings"] = {"generate_seconds_per_item": seconds / len(batch), "batch_size": len(batch),
                           "checkpoint_load_seconds": load_seconds, "device": str(args.device),
                           "dtype": args.dtype}
        for ext, data in clip_files(audio, item["sample_rate"], info).items():  # JSON last
            storage.write(_url(args.output, item, ext), data)


# --------------------------------------------------------------------------------------------- commit


def page_html(items: list[dict], references: list[Reference] = ()) -> str:
    clips = []
    for it in sorted(items, key=lambda it: (it["order"], it["cfg"], it["seed"])):
        meta = it["metadata"]
        text = prompt_header(meta, it["prompt_id"], it["seconds"])
        if it["negative_metadata"] is not None:
            text += f" | negative: {it['negative_metadata'].get('prompt', '')}"
        clips.append(Clip(column=it["checkpoint"], prompt_id=it["prompt_id"], prompt=text, cfg_scale=it["cfg"],
                          seed=it["seed"], audio_href=it["id"] + ".flac", image_href=it["id"] + ".png",
                          details=f"{it['sampler']}, {it['steps']} steps, {it['seconds']:.2f} s"))
    settings = sorted({(it["sampler"], it["steps"], it["seconds"]) for it in items})
    notes = [f"{len(items)} clips: " + "; ".join(f"{s} sampler, {n} steps, {sec:.2f} s" for s, n, sec in settings)]
    return render_page("Cantus render", clips, notes, references)


def reference_clips(args, items: list[dict]) -> list[Reference]:
    """``--reference``: each prompt's nearest real clips, through the first checkpoint's VAE."""
    first = items[0]
    checkpoint = Checkpoint(name=first["checkpoint"], url=first["checkpoint_url"], step=first["step"],
                            identity=first["checkpoint_identity"])
    cfg = load_checkpoint_config(checkpoint, args.model_config)
    prompts = {}
    for it in sorted(items, key=lambda it: it["order"]):
        prompts.setdefault(it["prompt_id"], it["metadata"])
    return write_references(args.output, prompts, args.reference, args.references_per_prompt,
                            load_model(checkpoint, cfg, args.device), cfg, args.device)


def commit(args, num_tasks: int) -> mf.Manifest:
    items = mf.read_plan(args.output)
    parts = [mf.read_part(args.output, k, num_tasks) for k in range(num_tasks)]
    if all(parts) and {i for p in parts for i in p.items} == {it["id"] for it in items}:
        # The page goes before the manifest, whose appearance means the stage is complete.
        references = reference_clips(args, items) if args.reference else []
        storage.write(storage.join(args.output, "index.html"), page_html(items, references).encode())
    checkpoints = {it["checkpoint"]: {"url": it["checkpoint_url"], "step": it["step"],
                                      "identity": it["checkpoint_identity"],
                                      "model_config_sha256": it["model_config_sha256"]} for it in items}
    properties = {"checkpoints": checkpoints, "page": storage.join(args.output, "index.html"),
                  "cfg_scales": sorted({it["cfg"] for it in items}), "seeds": sorted({it["seed"] for it in items}),
                  "prompt_ids": sorted({it["prompt_id"] for it in items})}
    return mf.commit(args.output, stage="render", num_tasks=num_tasks, args=_args_dict(args),
                     input=mf.input_ref(mf.plan_url(args.output)), properties=properties)


def _args_dict(args) -> dict:
    return {k: v for k, v in vars(args).items()
            if k not in ("debug", "command", "task_index", "num_tasks", "device", "batch_size", "dry_run")}


# ------------------------------------------------------------------------------------------------ CLI


def _numbers(kind):
    def parse(text: str):
        try:
            values = [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated {kind.__name__} values") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.render", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=("plan", "run", "commit"),
                   help="plan the work, run one task (one task alone also plans and commits), or commit the parts")
    p.add_argument("--checkpoints", nargs="+", required=True,
                   help="a checkpoint ledger URL (<train out>/checkpoints/manifest.json) or .safetensors files")
    p.add_argument("--checkpoint-steps", type=_numbers(int), default=None,
                   help="with a ledger: the steps to render, e.g. 2000,4000 (default: every checkpoint listed)")
    p.add_argument("--prompts", required=True, help="JSON lines: conditioner metadata, optional id and negative_prompt")
    p.add_argument("--output", required=True, help="output URL (local path or s3://bucket/prefix)")
    p.add_argument("--model-config", default=None, help="model config for checkpoints without model_config metadata")
    p.add_argument("--cfg-scales", type=_numbers(float), default=None,
                   help="CFG scales, e.g. 3,6,9 (default: training.demo.demo_cfg_scales)")
    p.add_argument("--seeds", type=_numbers(int), default=[0], help="noise seeds, e.g. 0,1")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: training.demo.demo_steps)")
    p.add_argument("--sampler", default=None, help="SAT sampler name (default: the demo sampler of the objective)")
    p.add_argument("--seconds", type=float, default=None, help="length of each clip (default: sample_size)")
    p.add_argument("--reference", default=None, help="folder (or URL) of real clips with metadata.jsonl (path, "
                                                     "labels, prompt): each prompt's nearest ones go on the page")
    p.add_argument("--references-per-prompt", type=int, default=2, help="real clips shown per prompt")
    p.add_argument("--batch-size", type=int, default=8, help="items sampled at once")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="compute dtype of the network (autocast)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--task-index", type=int, default=None, help="this task (default: SLURM array / ranks)")
    p.add_argument("--num-tasks", type=int, default=None, help="number of tasks (default: SLURM array / ranks; commit needs it when N > 1)")
    p.add_argument("--dry-run", action="store_true", help="check checkpoints, configs and prompts, print the plan, exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def dry_run(args) -> None:
    slot = task_slot(task_index=args.task_index, num_tasks=args.num_tasks)
    items, configs = build_plan(args)
    for name, cfg in configs.items():
        with torch.device("meta"):
            model = create_model_from_config(cfg)
        logger.info("dry run: checkpoint %s: %s, %.1f M parameters", name, cfg.model_type,
                    sum(p.numel() for p in model.parameters()) / 1e6)
    mine = mf.items_for_task(sorted(items, key=lambda it: it["id"]), slot.index, slot.count)
    logger.info("dry run: %d items (%d checkpoints x %d prompts x CFG x seeds), %d for task %d of %d",
                len(items), len(configs), len({it["prompt_id"] for it in items}), len(mine), slot.index, slot.count)


def build_stage(args) -> Stage:
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size={args.batch_size}: expected at least 1")
    return Stage(name="render", output=args.output, settings=_args_dict(args),
                 plan_items=lambda: build_plan(args)[0],
                 run_task=lambda work, slot, progress: run_task(args, work, slot, progress),
                 commit=lambda n: commit(args, n))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return stage_driver.main(args, build=lambda: build_stage(args), dry_run=lambda: dry_run(args))


if __name__ == "__main__":
    sys.exit(main())
