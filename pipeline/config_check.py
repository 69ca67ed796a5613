"""`python -m pipeline.config check CONFIG.json` (also `python -m pipeline.config_check`): validate a model or
dataset config, print a summary, and build the model on the meta device to count its parameters.

Kept apart from `pipeline.config` because it builds models, and the models import the config layer.
"""
from __future__ import annotations

import argparse
import logging
import sys

from pipeline.backbones import ROUTES
from pipeline.config import ModelConfig, load_model_config
from pipeline.config_dataset import load_dataset_config
from pipeline.config_json import ConfigError, MissingPackageError, read_json

MAX_PARAMETERS = 10**12
"""`check` refuses models above this many parameters (4 TB of fp32 weights) without allocating them."""


def summarize(cfg: ModelConfig) -> list[str]:
    m = cfg.model
    lines = [f"model_type   {cfg.model_type}", f"sample_rate  {cfg.sample_rate} Hz, {cfg.audio_channels} channel(s)",
             f"sample_size  {cfg.sample_size} samples ({cfg.sample_size / cfg.sample_rate:.2f} s)"]
    if m.autoencoder is not None:
        a = m.autoencoder
        lines.append(f"autoencoder  {a.encoder.type}/{a.decoder.type}, bottleneck "
                     f"{a.bottleneck.type if a.bottleneck else 'none'}, {a.latent_dim} latent channels, "
                     f"ratio {a.downsampling_ratio} ({cfg.sample_rate / a.downsampling_ratio:.2f} latent frames/s)")
    if m.diffusion is not None:
        d = m.diffusion
        lines.append(f"backbone     {d.type}, objective {d.diffusion_objective}, io_channels {m.io_channels}")
        pre = m.pretransform
        lines.append(f"pretransform {pre.type + f' (scale {pre.scale})' if pre else 'none'}; latent rate "
                     f"{cfg.latent_rate:.2f} frames/s, {cfg.sample_size // cfg.downsampling_ratio} frames per sample")
        types = {c.id: c.type for c in m.conditioning.configs} if m.conditioning else {}
        pre_enc = set(m.conditioning.pre_encoded_keys) if m.conditioning else set()
        lines.append("routing")
        for route in ROUTES:
            ids = getattr(d, route)
            shown = ", ".join(f"{i} ({types.get(i, 'pre-encoded' if i in pre_enc else 'injected')})" for i in ids)
            lines.append(f"  {route:<26}{shown or '-'}")
    if cfg.unknown_keys:
        lines.append(f"unknown keys {', '.join(cfg.unknown_keys)}")
    return lines


def _build_on_meta(cfg: ModelConfig) -> str | None:
    """Build the model on the meta device (no weights, no downloads), count its parameters and the bytes
    their fp32 weights take; refuse a model that could not be allocated (over MAX_PARAMETERS)."""
    try:  # imported here: `--no-build` and dataset checks need no torch
        from pipeline.models import create_model_from_config
    except ImportError:
        return None
    import torch
    try:
        with torch.device("meta"):
            model = create_model_from_config(cfg)
    except MissingPackageError:
        raise
    except ValueError as e:  # a constructor's check, naming the key path: add the file
        raise ConfigError(f"{cfg.source}: {e}") from None
    total = sum(p.numel() for p in model.parameters())
    if total > MAX_PARAMETERS:
        raise ConfigError(f"{cfg.source}: the model has {total:.3g} parameters ({4 * total / 2**40:.3g} TiB of fp32 "
                          f"weights), more than {MAX_PARAMETERS:.0e}: it cannot be allocated; check the widths "
                          f"and depths in model.diffusion.config / model.pretransform.config")
    return f"parameters   {total:,} (built on the meta device), fp32 weights {_bytes(4 * total)}"


def _bytes(n: int) -> str:
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit} ({n:,} bytes)"
    return f"{n} bytes"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.config", description="validate an SAT config",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a model or dataset config and print a summary")
    check.add_argument("config", help="path of an SAT model config or dataset config (JSON)")
    check.add_argument("--no-build", action="store_true", help="skip building the model on the meta device")
    check.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    try:
        raw = read_json(args.config)
        if "dataset_type" in raw:
            ds = load_dataset_config(args.config)
            lines = [f"dataset_type {ds.dataset_type}, random_crop {ds.random_crop}"]
            lines += [f"  {s.id}: {s.path or s.s3_path}" for s in ds.datasets]
        else:
            cfg = load_model_config(args.config)
            lines = summarize(cfg)
            if not args.no_build:
                try:
                    built = _build_on_meta(cfg)
                except MissingPackageError as e:
                    built = f"parameters   not counted: the config is valid, but {e}"
                if built:
                    lines.append(built)
    except (ConfigError, ValueError, TypeError, ImportError) as e:
        if args.debug:
            raise
        sys.stderr.write(f"error: {e}\n")
        return 2
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
