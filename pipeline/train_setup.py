"""The diffusion trainer's model set-up and evaluation: the pretransform identity check, partial loads of
`--pretrained-ckpt`, the export's tensor set, the plan printed at start, the validation losses. The run's
shell (resume, output files, W&B, stop, lease, exit codes) is `pipeline/train_run.py`."""
from __future__ import annotations

import json
import logging
import os
from typing import Callable

import torch

from pipeline import manifest, storage
from pipeline.config import ModelConfig
from pipeline.data.posterior import sample_latents
from pipeline.distributed import collectives
from pipeline.distributed.checkpoint import full_fp32_state_dict
from pipeline.distributed.engine import BatchLayout, zero_stage
from pipeline.models.factory import create_model_from_config
from pipeline.models.weights import (PRETRANSFORM_PREFIX, autoencoder_state_dict, load_state_dict, load_strict,
                                     safetensors_header, weights_sha256)
from pipeline.pretransform_identity import identity_differences, pretransform_identity
from pipeline.train_args import TrainArgs

logger = logging.getLogger(__name__)


def local_copy(url: str, scratch: str) -> str:
    """A local path for a weights URL (S3 objects are downloaded once into `scratch`)."""
    return storage.local_path(url, os.path.join(scratch, "weights"))


def check_pretransform(cfg: ModelConfig, data: manifest.Manifest, args: TrainArgs, scratch: str, verify: bool = True
                       ) -> tuple[torch.nn.Module, dict[str, torch.Tensor] | None]:
    """Build the model and load its VAE from `--pretransform-ckpt` or the manifest's `weights_url`; refuse
    latents whose pretransform identity (architecture_sha256, weights_sha256, scale) differs. Returns the
    model and the VAE tensors as `pretransform.model.*`, unchanged from the file (for the export)."""
    props = data.properties
    wrapper = create_model_from_config(cfg)
    pre = cfg.model.pretransform
    if pre is None:
        return wrapper, None
    source = args.pretransform_ckpt or props.get("weights_url")
    if not source:
        raise ValueError(f"no VAE weights: {args.data} has no properties.weights_url and --pretransform-ckpt is not set")
    weights = autoencoder_state_dict(load_state_dict(local_copy(source, scratch)), source)
    mine = pretransform_identity(pre.config, pre.scale, weights_sha256(weights))
    if not verify:
        logger.warning("%s carries no pretransform identity (an SAT pre_encoded dataset): it cannot be checked that "
                       "it was encoded by %s", args.data, source)
    differ = identity_differences(props, mine) if verify else []
    if differ:
        detail = "; ".join(f"{k}: latents {str(props.get(k))[:16]} vs model {str(mine[k])[:16]}" for k in differ)
        raise ValueError(
            f"{args.data} was encoded by another pretransform than this model's ({detail}; model from "
            f"{args.model_config} model.pretransform and weights {source}). Train on latents pre-encoded with this "
            f"VAE, or give the --model-config/--pretransform-ckpt of the VAE that encoded them")
    if props.get("latent_channels") not in (None, cfg.model.io_channels):
        raise ValueError(f"{args.data}: latent_channels={props['latent_channels']} but {args.model_config} has "
                         f"model.io_channels={cfg.model.io_channels}")
    load_strict(wrapper.pretransform.model, weights, source, "the model config's pretransform")
    wrapper.pretransform.requires_grad_(False).eval()
    return wrapper, {PRETRANSFORM_PREFIX + k: v for k, v in weights.items()}


def _checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a checkpoint (a .safetensors header only: no tensor is read)."""
    if path.endswith(".safetensors"):
        return safetensors_header(path)[0]
    return {k: tuple(v.shape) for k, v in load_state_dict(path).items()}


def load_pretrained(wrapper: torch.nn.Module, path: str | None, allow_partial: bool, *, report_url: str | None = None,
                    load: bool = True) -> dict | None:
    """`--pretrained-ckpt`: an unwrapped SAT checkpoint's `model.*`/`conditioner.*` tensors (the VAE comes from
    the pretransform check; `pretransform.*` is ignored here). Strict unless `--allow-partial`, which loads the
    tensors that match in name and shape and leaves the rest at their initial values. The report (every key
    missing from the checkpoint, of another shape, or unused) is logged, written as JSON to `report_url` (also
    when the load is refused) and returned. `load=False` only checks (--dry-run reads no tensor)."""
    if path is None:
        return None
    theirs = {k: v for k, v in _checkpoint_shapes(path).items() if not k.startswith("pretransform.")}
    own = {k: tuple(v.shape) for k, v in wrapper.state_dict().items() if not k.startswith("pretransform.")}
    loaded = sorted(k for k in theirs if own.get(k) == theirs[k])
    report = {"checkpoint": path, "allow_partial": allow_partial, "loaded": len(loaded),
              "missing": sorted(set(own) - set(theirs)),
              "shape_mismatch": [{"key": k, "model": list(own[k]), "checkpoint": list(theirs[k])}
                                 for k in sorted(set(own) & set(theirs)) if own[k] != theirs[k]],
              "unused": sorted(set(theirs) - set(own))}
    report["partial"] = bool(report["missing"] or report["shape_mismatch"] or report["unused"])
    if report_url is not None:
        storage.write(report_url, (json.dumps(report, indent=1) + "\n").encode())
    lines = ([f"  missing from the checkpoint: {k}" for k in report["missing"]]
             + [f"  shape {m['checkpoint']} in the checkpoint, {m['model']} in the model: {m['key']}"
                for m in report["shape_mismatch"]]
             + [f"  not in the model (unused): {k}" for k in report["unused"]])
    where = f" (report {report_url})" if report_url else ""
    if report["partial"] and not allow_partial:
        shown = "\n".join(lines[:40]) + (f"\n  ... and {len(lines) - 40} more" if len(lines) > 40 else "")
        raise ValueError(f"--pretrained-ckpt {path} does not match the model: {len(report['missing'])} missing, "
                         f"{len(report['shape_mismatch'])} of another shape, {len(report['unused'])} unused{where}:\n"
                         f"{shown}\npass --allow-partial to load the {len(loaded)} tensors that match and keep "
                         f"the initial values of the rest")
    for line in lines:
        logger.warning("--pretrained-ckpt partial load:%s", line)
    if load:
        state = {k: v for k, v in load_state_dict(path).items() if k in set(loaded)}
        wrapper.load_state_dict(state, strict=False)
    logger.info("--pretrained-ckpt %s: %s %d tensors, %d left at init, %d of another shape, %d unused%s", path,
                "loaded" if load else "would load", len(loaded), len(report["missing"]),
                len(report["shape_mismatch"]), len(report["unused"]), where)
    return report


def export_tensors_fn(module: torch.nn.Module, pretransform: torch.nn.Module | None,
                      vae_weights: dict[str, torch.Tensor] | None, use_ema: bool
                      ) -> Callable[[dict | None], dict | None]:
    """The export's tensors in SAT's unwrapped layout: the engine module's fp32 weights (`model.*`,
    `conditioner.*`), the EMA's `model.*` over them when `use_ema`, and `pretransform.*` (the VAE file's own
    tensors). Collective (gathers ZeRO partitions); the dict is returned on rank 0 only."""

    def export(ema_tensors: dict | None) -> dict | None:
        tensors = full_fp32_state_dict(module)
        if collectives.rank() != 0:
            return None
        if use_ema:
            unknown = sorted(set(ema_tensors) - set(tensors))
            if unknown:
                raise ValueError(f"EMA tensors {unknown[:3]} are not parameters of the model")
            tensors.update(ema_tensors)
        if pretransform is not None:
            tensors.update({f"pretransform.{k}": v for k, v in pretransform.state_dict().items()})
            tensors.update(vae_weights or {})
        return tensors

    return export


def log_plan(cfg: ModelConfig, layout: BatchLayout, ds_config: dict, data: manifest.Manifest, frames: int,
             max_steps: int) -> None:
    samples = sum(o["samples"] for o in data.outputs)
    per_epoch = samples // layout.global_batch
    seconds = cfg.sample_size / cfg.sample_rate
    logger.info("plan: %s, ZeRO stage %d, %s | global batch %d = micro %d x accumulation %d x world %d | "
                "%.3g s of audio per sample (%d latent frames), %.3g s per step | %d samples, %d steps per "
                "epoch, %d steps planned (%.2f epochs)", cfg.model_type, zero_stage(ds_config),
                "bf16" if ds_config.get("bf16", {}).get("enabled") else "fp32", layout.global_batch,
                layout.micro_batch, layout.accumulation, layout.world_size, seconds, frames,
                seconds * layout.global_batch, samples, per_epoch, max_steps, max_steps / max(per_epoch, 1))


VALIDATION_T = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
"""SAT's validation timesteps: the loss at fixed noise levels is comparable between steps and runs."""


@torch.no_grad()
def validation_losses(loader, model_fn_for, objective, loss_fn, *, module: torch.nn.Module, device: torch.device,
                      seed: int) -> dict[str, float]:
    """Collective: one pass over the validation set (`loader` a fresh `LatentLoader`, the same number of batches
    on every rank), the loss at each of VALIDATION_T, averaged over ranks. `model_fn_for(batch)` returns the
    model function for a batch (conditioning closed over, no CFG dropout).

    Repeatable across runs and resumes: the latents come from the loader's seeded per-sample draws, the noise from
    a generator seeded with `seed` here, the model runs in eval mode, and the global RNG is forked and seeded, so
    validation neither reads nor moves the training RNG."""
    generator = torch.Generator().manual_seed(seed)
    sums = torch.zeros(len(VALIDATION_T), dtype=torch.float64)
    was_training = module.training
    module.eval()
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            batches = iter(loader)
            for _ in range(loader.batches_per_epoch):
                batch = next(batches).to(device)
                x = sample_latents(batch)
                model_fn = model_fn_for(batch)
                for i, value in enumerate(VALIDATION_T):
                    noise = torch.randn(x.shape, generator=generator).to(device)
                    t = torch.full((x.shape[0],), value, device=device)
                    sums[i] += float(objective.loss(model_fn, x, t, noise, loss_fn=loss_fn).loss)
    finally:
        module.train(was_training)
    sums = collectives.sum_over_ranks(sums.to(device))
    means = (sums.cpu() / (loader.batches_per_epoch * collectives.world_size())).tolist()
    return {"val_loss": sum(means) / len(means), **{f"val_loss_t{t:.1f}": m for t, m in zip(VALIDATION_T, means)}}
