"""Stage 2 `pre_encode`: audio shards -> latent shards through the VAE pretransform.

    python -m pipeline.pre_encode [plan|run|commit] --input <audio manifest URL> --model-config CONFIG \\
        --pretransform-ckpt CKPT --output URL [--scale S --sample-size N --batch-size B --dtype bf16|fp16|fp32]

A task owns whole input shards (plan item i belongs to task i % N). Input shard i becomes
``<out>/latents-<task>-<i>.tar`` with ``<key>.latents.safetensors`` and ``<key>.json``. For a VAE
bottleneck the safetensors hold ``mean`` and ``std`` (C, T) **before** dividing by the pretransform's
scale (training samples a fresh latent each epoch), else one tensor ``latents``; stored in fp32 when
encoding in fp32, else fp16. Clips longer than ``sample_size`` are cut into windows at latent-aligned
offsets (each window a sample, ``offset_seconds`` moved, ``seconds_start`` its floor), shorter ones
padded; ``valid_frames`` counts the latent frames that hold audio.

Each input shard is checked against its manifest entry (sha256, bytes, samples) while it streams, in
the same read: a shard that does not match (cut short, changed, missing) gives no sample and one reject
record with the expected and actual values; more than ``--max-reject-fraction`` of the input shards
rejected stops the stage before it commits. A sample whose JSON holds bad values is a reject naming the
shard and the sample key.

Resume: after its latent shard is written, each input shard gets ``_items/<i>.json`` (its entries
and rejects); a re-run skips those, so a killed task finishes without repeating or dropping a sample.
Plan, run and commit go through `pipeline.stage_driver`: a committed output is never rewritten.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import math
import os
import sys
import tempfile

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from pipeline import manifest as mf
from pipeline import stage_driver, storage
from pipeline.config import PretransformConfig, load_model_config
from pipeline.config_json import ConfigError
from pipeline.data import audio as audio_io
from pipeline.data.shards import ShardCheck, ShardWriter, VerifiedShard, read_sample_json
from pipeline.data.workers import die_with_parent
from pipeline.models.blocks import fold_weight_norm
from pipeline.models.pretransforms import AutoencoderPretransform, create_pretransform_from_config
from pipeline.models.weights import load_autoencoder_weights
from pipeline.pretransform_identity import pretransform_identity
from pipeline.stage_driver import Progress, Stage, check_reject_fraction

logger = logging.getLogger("pipeline.pre_encode")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True, slots=True)
class Encoder:
    """The frozen pretransform plus the identity the manifest records."""
    pretransform: AutoencoderPretransform
    properties: dict
    sample_rate: int
    channels: int


def load_encoder(args) -> Encoder:
    cfg = load_model_config(args.model_config)
    if cfg.model_type == "autoencoder":
        # SAT's pre_encode.py takes an autoencoder config; the scale then comes from --scale.
        raw_block, auto = cfg.raw["model"], cfg.model.autoencoder
        block = PretransformConfig(type="autoencoder", config=raw_block, scale=args.scale or 1.0, autoencoder=auto)
    else:
        block = cfg.model.pretransform
        if block is None or block.autoencoder is None:
            raise ConfigError(f"{args.model_config}: model.pretransform: pre_encode needs an autoencoder "
                              "pretransform (or pass an autoencoder config)")
        if args.scale is not None:
            block = dataclasses.replace(block, scale=args.scale)
        raw_block = block.config
    pretransform = create_pretransform_from_config(block, cfg.sample_rate, cfg.audio_channels)
    weights_url = resolve_weights_url(args.pretransform_ckpt)
    if args.dry_run:
        weights_sha = None
    else:
        with tempfile.TemporaryDirectory(prefix="cantus-vae-") as tmp:  # an S3 VAE is downloaded here
            weights_sha = load_autoencoder_weights(pretransform.model, storage.local_path(weights_url, tmp))
    fold_weight_norm(pretransform.model, inplace=True)  # bf16/fp16 work on plain convolutions (SAT #131)
    dtype = DTYPES[args.dtype]
    pretransform.to(device=args.device, dtype=dtype).eval().requires_grad_(False)
    auto = block.autoencoder
    properties = {
        **pretransform_identity(raw_block, block.scale, weights_sha), "weights_url": weights_url, "latent_channels": auto.latent_dim,
        "downsampling_ratio": auto.downsampling_ratio, "bottleneck": auto.bottleneck.type if auto.bottleneck else None,
        "dtype": "fp32" if dtype == torch.float32 else "fp16", "sample_rate": cfg.sample_rate,
        "channels": cfg.audio_channels, "sample_size": args.sample_size or cfg.sample_size,
    }
    return Encoder(pretransform, properties, cfg.sample_rate, cfg.audio_channels)


def resolve_weights_url(url: str) -> str:
    """A VAE train run's ledger (``<out>/checkpoints/manifest.json``) stands for its newest export."""
    if url.endswith("manifest.json"):
        return mf.read_ledger(url).at_step().export_url
    return url


# ----------------------------------------------------------------------------- one input shard


def windows_of(audio: np.ndarray, meta: dict, sample_size: int, ratio: int, sample_rate: int):
    """Cut (C, T) audio into ``sample_size`` windows at latent-aligned offsets; pad the last one.

    Yields (suffix, window (C, sample_size), metadata with offset/seconds_start/valid_frames).
    """
    length = audio.shape[-1]
    count = max(1, math.ceil(length / sample_size))
    for j in range(count):
        start = j * sample_size  # a multiple of sample_size, hence of the downsampling ratio
        piece = audio[:, start:start + sample_size]
        valid = piece.shape[-1]
        if valid < sample_size:
            piece = np.pad(piece, ((0, 0), (0, sample_size - valid)))
        offset = float(meta.get("offset_seconds", 0.0)) + start / sample_rate
        md = dict(meta, offset_seconds=offset, seconds_start=math.floor(offset),
                  valid_frames=math.ceil(valid / ratio), latent_frames=sample_size // ratio,
                  window_index=j, window_samples=valid)
        yield ("" if count == 1 else f"_w{j}"), piece, md


class ShardWindows(torch.utils.data.IterableDataset):
    """The windows of one audio shard, decoded in DataLoader workers while the device encodes.

    Worker w of W takes the samples i with i % W == w; the DataLoader interleaves the workers in a fixed
    order, so a shard's output does not depend on timing. Yields ``(key, window (C, T) tensor, metadata)``,
    ``(key, None, reason)`` for a sample that cannot be used, and last ``(None, None, check)``: the
    shard as this worker streamed it against its manifest entry (`ShardCheck.to_dict`).
    """

    def __init__(self, entry: dict, sample_rate: int, channels: int, sample_size: int, ratio: int):
        super().__init__()
        self.entry, self.sample_rate, self.channels = entry, sample_rate, channels
        self.sample_size, self.ratio = sample_size, ratio

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        url, shard = self.entry["url"], VerifiedShard(self.entry)
        for i, (key, members) in enumerate(shard):
            if i % workers != worker:
                continue
            try:
                meta = read_sample_json(members, url, key)
                if "flac" not in members:
                    raise ValueError(f"{url}: sample {key}: no .flac member")
                audio, sr = audio_io.decode(members["flac"])
                if sr != self.sample_rate:
                    raise ValueError(f"{url}: sample {key}: sample rate {sr} Hz, the model expects "
                                     f"{self.sample_rate} Hz (re-shard with --sample-rate {self.sample_rate})")
                audio = audio_io.set_channels(audio, self.channels)
            except ValueError as e:
                yield key, None, str(e)
                continue
            for suffix, piece, md in windows_of(audio, meta, self.sample_size, self.ratio, self.sample_rate):
                yield key + suffix, torch.from_numpy(np.ascontiguousarray(piece)), md
        yield None, None, shard.check.to_dict()


class _NotTheListedShard(Exception):
    def __init__(self, check: ShardCheck):
        super().__init__(check.reason())
        self.check = check


def encode_shard(enc: Encoder, item: dict, out_url: str, args,
                 on_batch=lambda samples, seconds: None) -> tuple[list[dict], list[dict]]:
    """Encode every sample of one audio shard into one latent shard; return (entries, rejects).
    ``on_batch(samples, seconds of audio)`` follows the work batch by batch (progress).

    The shard is checked against its manifest entry (``item``: url, sha256, bytes, samples) as it streams;
    when it does not match, nothing is written for it and the one reject record says why."""
    props, url = enc.properties, item["url"]
    rejects, pending, sat, checks = [], [], [], []
    writer = ShardWriter(lambda n: out_url if n == 0 else out_url.replace(".tar", f"-{n}.tar"), 1 << 40)
    windows = ShardWindows(item, enc.sample_rate, enc.channels, props["sample_size"], props["downsampling_ratio"])
    loader = torch.utils.data.DataLoader(windows, batch_size=None, num_workers=args.num_workers,
                                         pin_memory=str(args.device).startswith("cuda"),
                                         worker_init_fn=die_with_parent(os.getpid()))

    def flush():
        batch = torch.stack([p[1] for p in pending]).to(args.device, DTYPES[args.dtype], non_blocking=True)
        with torch.inference_mode():
            tensors = _encode(enc, batch)
        for (key, _, md), stored in zip(pending, (dict(zip(tensors, t)) for t in zip(*tensors.values()))):
            stored = {k: v.cpu() for k, v in stored.items()}
            body = save_safetensors({k: v.to(torch.float32 if props["dtype"] == "fp32" else torch.float16)
                                     .contiguous() for k, v in stored.items()})
            writer.add(key, {"latents.safetensors": body, "json": json.dumps(md, sort_keys=True).encode()},
                       seconds=md["window_samples"] / enc.sample_rate)
            if args.format == "sat":
                sat.append((key, stored, md))
        on_batch(len(pending), sum(md["window_samples"] for _, _, md in pending) / enc.sample_rate)
        pending.clear()

    try:
        with writer:  # an exception discards the unfinished latent shard
            for key, window, md in loader:
                if key is None:
                    checks.append(ShardCheck(**md))
                elif window is None:
                    logger.warning("%s", md)
                    rejects.append({"id": url, "key": key, "reason": md})
                else:
                    pending.append((key, window, md))
                    if len(pending) == args.batch_size:
                        flush()
            bad = [c for c in checks if not c.ok]
            if bad:
                raise _NotTheListedShard(bad[0])
            if pending:
                flush()
    except _NotTheListedShard as e:
        logger.warning("%s", e.check.reason())
        return [], [e.check.reject()]
    for key, stored, md in sat:  # only for a shard that matched its entry
        write_sat_sample(args.output, key, stored, md)
    return [s.to_dict() for s in writer.shards], rejects


def write_sat_sample(out_url: str, key: str, stored: dict, md: dict) -> None:
    """SAT's ``pre_encoded`` layout: ``<out>/sat/<key>.npy`` (one latent, unscaled, as SAT's pre_encode.py
    writes it) and ``<key>.json`` with the metadata and a per-frame ``padding_mask``."""
    if "mean" in stored:
        # One fixed draw per sample (seeded by its key), so a re-run writes the same bytes.
        gen = torch.Generator().manual_seed(int(mf.sha256_bytes(key.encode())[:8], 16))
        noise = torch.randn(stored["mean"].shape, generator=gen)
        latent = stored["mean"].float().cpu() + stored["std"].float().cpu() * noise
    else:
        latent = stored["latents"].float().cpu()
    buf = io.BytesIO()
    np.save(buf, latent.numpy())
    storage.write(storage.join(out_url, "sat", f"{key}.npy"), buf.getvalue())
    frames = md["latent_frames"]
    sat_md = dict(md, padding_mask=[1] * md["valid_frames"] + [0] * (frames - md["valid_frames"]))
    storage.write(storage.join(out_url, "sat", f"{key}.json"), json.dumps(sat_md).encode())


def _encode(enc: Encoder, batch: torch.Tensor) -> dict[str, torch.Tensor]:
    """mean/std before scaling for a VAE bottleneck (see module docstring), else the latents."""
    if enc.properties["bottleneck"] == "vae":
        mean, std = enc.pretransform.encode_mean_std(batch)
        return {"mean": mean, "std": std}
    return {"latents": enc.pretransform.encode(batch) * enc.pretransform.scale}


# ----------------------------------------------------------------------------- plan, run, commit


def read_source(args) -> mf.Manifest:
    return mf.read_manifest(args.input, stage="shard")


def plan_items(args) -> list[dict]:
    """One item per input shard, with the identity it is checked against while it streams."""
    return [{"id": e["url"], "url": e["url"], "sha256": e["sha256"], "bytes": e["bytes"], "samples": e["samples"]}
            for e in read_source(args).outputs]


def run_task(args, work: list[tuple[int, dict]], slot, progress: Progress) -> tuple[list[dict], list[dict]]:
    enc = load_encoder(args)
    source = read_source(args)
    if source.properties.get("sample_rate") not in (None, enc.sample_rate):
        raise ConfigError(f"{args.input}: audio at {source.properties['sample_rate']} Hz, but "
                          f"{args.model_config} expects {enc.sample_rate} Hz")
    outputs, rejects = [], []
    for i, item in work:
        marker = storage.join(args.output, "_items", f"{i}.json")
        if storage.exists(marker):  # finished by an earlier run: its samples count at once
            record = json.loads(storage.read_bytes(marker))
            progress.update(items=0, samples=sum(e["samples"] for e in record["outputs"]),
                            seconds=sum(e["seconds"] for e in record["outputs"]))
        else:  # progress batch by batch
            out_url = storage.join(args.output, f"latents-{slot.index:05d}-{i:06d}.tar")
            entries, bad = encode_shard(enc, item, out_url, args, on_batch=lambda samples, seconds:
                                        progress.update(items=0, samples=samples, seconds=seconds))
            record = {"outputs": entries, "rejects": bad}
            storage.write(marker, json.dumps(record).encode())
        outputs += record["outputs"]
        rejects += record["rejects"]
        progress.update()
    return outputs, rejects


def commit(args, stage: Stage, n: int) -> mf.Manifest:
    check_reject_fraction(stage, n, args.max_reject_fraction, "input shards")
    enc = load_encoder(args)
    return mf.commit(args.output, stage="pre_encode", num_tasks=n, args=_args_dict(args),
                     input=mf.input_ref(args.input), properties=enc.properties)


def _args_dict(args) -> dict:
    # Only what decides the output; the device, workers, batch size and task layout may change between
    # a crash and its re-run (and a SLURM chain plans and commits on the CPU).
    return {k: v for k, v in vars(args).items()
            if k not in ("debug", "command", "task_index", "num_tasks", "num_workers", "device", "batch_size",
                         "dry_run", "max_reject_fraction")}


def build_stage(args) -> Stage:
    check_sizes(args)
    stage = Stage(name="pre_encode", output=args.output, settings=_args_dict(args),
                  plan_items=lambda: plan_items(args),
                  run_task=lambda work, slot, progress: run_task(args, work, slot, progress),
                  commit=lambda n: commit(args, stage, n))
    return stage


def dry_run(args) -> None:
    check_sizes(args)
    enc = load_encoder(args)
    source = read_source(args)
    logger.info("dry run: %d input shards, %d samples, properties %s", len(source.outputs),
                source.totals.get("samples", 0), json.dumps(enc.properties))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m pipeline.pre_encode", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", nargs="?", default="run", choices=("plan", "run", "commit"),
                   help="plan the work, run one task, or commit the parts into the manifest")
    p.add_argument("--input", required=True, help="URL of the audio manifest (stage 1's manifest.json)")
    p.add_argument("--model-config", required=True, help="diffusion config with a pretransform, or an autoencoder config")
    p.add_argument("--pretransform-ckpt", required=True, help="VAE weights: standalone, a full model checkpoint, or a VAE train ledger (newest export)")
    p.add_argument("--output", required=True, help="output URL (local path or s3://bucket/prefix)")
    p.add_argument("--scale", type=float, default=None,
                   help="pretransform scale (default: the diffusion config's, 1 for an autoencoder config)")
    p.add_argument("--sample-size", type=int, default=None, help="window length in samples (default: the config's)")
    p.add_argument("--batch-size", type=int, default=8, help="windows encoded at once")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="compute dtype of the encoder")
    p.add_argument("--num-workers", type=int, default=1,
                   help="DataLoader processes decoding audio while the device encodes (0: decode inline)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")
    p.add_argument("--format", choices=("cantus", "sat"), default="cantus",
                   help="sat also writes SAT's pre_encoded layout (.npy + .json per sample)")
    p.add_argument("--max-reject-fraction", type=float, default=0.05,
                   help="fail if more than this fraction of input shards gives no sample (e.g. a shard that "
                        "does not match its manifest entry)")
    p.add_argument("--task-index", type=int, default=None, help="this task (default: SLURM array / ranks)")
    p.add_argument("--num-tasks", type=int, default=None, help="number of tasks (default: SLURM array / ranks)")
    p.add_argument("--dry-run", action="store_true", help="check config and input, print the plan, exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return stage_driver.main(args, build=lambda: build_stage(args), dry_run=lambda: dry_run(args))


def check_sizes(args) -> None:
    """--sample-size must be a positive whole number of latent frames; --max-reject-fraction a fraction."""
    if not 0 <= args.max_reject_fraction <= 1:
        raise ConfigError(f"--max-reject-fraction={args.max_reject_fraction}: expected a fraction in [0, 1]")
    if args.sample_size is None:
        return
    if args.sample_size <= 0:
        raise ConfigError(f"--sample-size={args.sample_size}: expected a positive number of samples")
    cfg = load_model_config(args.model_config)
    ratio = (cfg.model.autoencoder or cfg.model.pretransform.autoencoder).downsampling_ratio
    if args.sample_size % ratio:
        raise ConfigError(f"--sample-size={args.sample_size} must be a multiple of the downsampling ratio {ratio}")


if __name__ == "__main__":
    sys.exit(main())
