"""Stage 3, train: latent shards (or audio shards for an autoencoder) -> DeepSpeed checkpoints + exports + ledger.

    deepspeed pipeline/train.py --ds_config ds_configs/zero2.json --model-config CONFIG \\
        --data <latent manifest URL> --output URL [--max-steps N --batch-size B ...]

Also under torchrun, srun, or as one plain process. A run whose output's ledger lists a checkpoint resumes
from the newest one. Stopped by SIGTERM/SIGUSR1 before --max-steps, it saves at the next log step (within
--log-every steps: the ranks agree on the flag only there) and exits with code 75.

Between log steps the loop reads no value of a device tensor (no host sync of ours; see docs/architecture.md):
the loss is summed on the device and read at log steps, noise and t are drawn on the CPU and copied without
blocking.
"""
from __future__ import annotations

import os
import sys

if not __package__:
    # Run as a script (`deepspeed pipeline/train.py`), Python puts pipeline/ first on sys.path, so
    # `import pipeline` would fail and a module here could shadow a dependency: put the repo root first.
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import dataclasses
import logging
import time

import torch

from pipeline import lease, manifest, storage
from pipeline.cli import run_main
from pipeline.config import ModelConfig, load_model_config
from pipeline.data.latents import Batch, CropSpec, LatentLoader, ShardDataset, ShardRef, build_loader, shard_refs
from pipeline.data.posterior import sample_latents
from pipeline.diffusion.cfg import Guidance
from pipeline.diffusion.losses import DiffusionLoss
from pipeline.diffusion.objectives import create_objective
from pipeline.diffusion.optim import create_optimizer_and_scheduler
from pipeline.diffusion.timesteps import create_distribution_shift, create_timestep_sampler
from pipeline.distributed import env
from pipeline.distributed import engine as ds_setup
from pipeline.distributed.ema import ShardedEMA
from pipeline.distributed.stop import catch_early, release_early
from pipeline.models.conditioning import Conditioning
from pipeline.train_demos import DemoRenderer, ema_parameters, plan_demos
from pipeline.train_args import TrainArgs
from pipeline.train_run import MetricsWindow, TrainRun, run_leased, scratch_dir
from pipeline.train_setup import (check_pretransform, export_tensors_fn, load_pretrained, local_copy, log_plan,
                                  validation_losses)

logger = logging.getLogger("pipeline.train")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--ds_config", "--ds-config", dest="ds_config", required=True, help="DeepSpeed JSON (ds_configs/)")
    p.add_argument("--model-config", required=True, help="SAT model config JSON")
    p.add_argument("--data", required=True, help="latent manifest URL (pre_encode), or audio manifest (shard) "
                                                 "for model_type autoencoder")
    p.add_argument("--output", required=True, help="output URL (local path or s3://)")
    p.add_argument("--val-data", default=None, help="validation manifest URL (same kind as --data)")
    p.add_argument("--val-every", type=int, default=0, help="validation loss every N steps (0: never)")
    p.add_argument("--pretransform-ckpt", default=None, help="VAE weights; default: the manifest's weights_url")
    p.add_argument("--pretrained-ckpt", default=None, help="unwrapped SAT .safetensors/.ckpt to start from")
    p.add_argument("--allow-partial", action="store_true", help="with --pretrained-ckpt: load the tensors whose "
                                                                "name and shape match, count the rest")
    p.add_argument("--max-steps", type=int, required=True, help="optimizer steps to train in total")
    p.add_argument("--batch-size", type=int, default=None, help="micro batch per rank (else the ds_config's)")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers per rank")
    p.add_argument("--cache-gb", type=float, default=None, help="bound on each node's disk cache of S3 shards, shared "
                   "by its ranks (default: the shards the plan needs at once plus the prefetch depth; 0: stream "
                   "shards into memory, no disk)")
    p.add_argument("--max-reject-fraction", type=float, default=0.05, help="fail when more of a node's shards than "
                   "this fraction differ from their manifest entry (sha256, bytes, sample count)")
    p.add_argument("--seed", type=int, default=0, help="model randomness: rank r uses seed * world + r")
    p.add_argument("--data-seed", type=int, default=None, help="data order and crops (default: --seed)")
    p.add_argument("--checkpoint-every", type=int, default=1000, help="steps between checkpoints")
    p.add_argument("--keep-last", type=int, default=None, help="keep only the newest N checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="steps between metric lines; also how often the "
                                                             "ranks check for a stop signal")
    p.add_argument("--compile", action="store_true", help="torch.compile each transformer block (as "
                                                          "model.cantus.compile: true, without changing the config)")
    p.add_argument("--scratch-dir", default=None, help="local folder for staged checkpoints (default: "
                                                       "$TMPDIR/cantus-<output name>)")
    p.add_argument("--rendezvous-timeout", type=float, default=env.DEFAULT_RENDEZVOUS_TIMEOUT,
                   help="seconds every rank waits for all ranks at MASTER_ADDR:MASTER_PORT before it exits non-zero")
    p.add_argument("--collective-timeout", type=float, default=env.DEFAULT_COLLECTIVE_TIMEOUT,
                   help="seconds a collective waits for a lost or stuck peer before the rank fails")
    p.add_argument("--keep-scratch", action="store_true", help="keep the scratch folder after a finished run")
    p.add_argument("--lease-timeout", type=float, default=lease.DEFAULT_TIMEOUT,
                   help="seconds without a heartbeat after which another trainer's lease on --output is stale "
                        "and taken over (the heartbeat comes every timeout/5 s)")
    p.add_argument("--wandb", choices=("offline", "online", "off"), default="offline", help="Weights & Biases mode")
    p.add_argument("--dry-run", action="store_true", help="check config, data and plan on the CPU, then exit")
    p.add_argument("--debug", action="store_true", help="show tracebacks of user errors (else one line, exit 2)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def latent_shards(data: manifest.Manifest) -> list[ShardRef]:
    return shard_refs(data.outputs)


def read_data(url: str) -> tuple[manifest.Manifest, bool]:
    """The latent manifest, or a stand-in for an SAT `pre_encoded` dataset config; the flag says whether the
    data carries a pretransform identity (SAT's pre-encoded folders do not)."""
    if not (url.endswith(".json") and not url.endswith("manifest.json")):
        return manifest.read_manifest(url, stage="pre_encode"), True
    from pipeline.config_dataset import load_dataset_config
    from pipeline.data.latents import count_npy

    sat = load_dataset_config(url)
    if sat.dataset_type != "pre_encoded":
        raise ValueError(f"--data {url}: SAT dataset_type {sat.dataset_type!r} holds audio; shard and pre-encode it "
                         f"(python -m pipeline.shard, python -m pipeline.pre_encode) and pass the latent manifest")
    entries = tuple(manifest.entry("pre_encode", url=d.path, samples=count_npy(d.path), bytes=0, sha256="", seconds=0)
                    for d in sat.datasets)
    return manifest.Manifest(stage="pre_encode", args={}, input={"url": url, "sha256": ""}, outputs=entries), False


def main(argv: list[str] | None = None) -> int:
    args = TrainArgs.from_namespace(build_parser().parse_args(argv))
    catch_early()  # a stop signal before the loop starts is kept for it, not fatal
    try:
        return _train(args)
    finally:
        release_early()


def _train(args: TrainArgs) -> int:
    denv = env.detect(local_rank_arg=args.local_rank)
    env.init_logging(denv.rank)
    cfg = load_model_config(args.model_config)
    ds_config, layout = ds_setup.resolve_batch(ds_setup.read_ds_config(args.ds_config), args.ds_config,
                                               micro_batch=args.batch_size, world_size=denv.world_size,
                                               model_config_path=args.model_config)
    ds_setup.check_optimizer_source(ds_config, args.ds_config, model_config_path=args.model_config,
                                    model_has_optimizer=cfg.training.optimizer_configs is not None)
    if cfg.model_type == "autoencoder":
        from pipeline.train_autoencoder import train_autoencoder as train
    else:
        train = train_diffusion
    if args.dry_run:
        return train(args, cfg, ds_config, layout, denv)
    env.init_process_group(denv, rendezvous_timeout=args.rendezvous_timeout,
                           collective_timeout=args.collective_timeout)
    return run_leased(lambda: train(args, cfg, ds_config, layout, denv), args, denv)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without blocking the host: on CUDA the copy is queued from pinned memory (the
    caching host allocator keeps that buffer until the copy has run)."""
    if device.type != "cuda":
        return x.to(device)
    return x.pin_memory().to(device, non_blocking=True)


def train_diffusion(args: TrainArgs, cfg: ModelConfig, ds_config: dict, layout: ds_setup.BatchLayout, denv: env.DistEnv) -> int:
    if args.compile:  # the config's hash (checked on resume) stays that of the file
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(
            cfg.model, cantus=dataclasses.replace(cfg.model.cantus, compile=True)))
    data, has_identity = read_data(args.data)
    scratch = scratch_dir(args)
    torch.manual_seed(args.seed)  # the same initial weights on every rank and in every run of this seed
    model, vae_weights = check_pretransform(cfg, data, args, scratch, verify=has_identity)
    crop_frames = cfg.sample_size // cfg.downsampling_ratio
    log_plan(cfg, layout, ds_config, data, crop_frames, args.max_steps)
    demo_plan = plan_demos(cfg, model.diffusion_objective)
    pretrained = local_copy(args.pretrained_ckpt, scratch) if args.pretrained_ckpt else None
    if args.dry_run:
        load_pretrained(model, pretrained, args.allow_partial, load=False)
        return 0

    # model, optimizer, engine, EMA
    device = env.device_for(denv)
    torch.manual_seed(args.seed * denv.world_size + denv.rank)  # dropout, CFG dropout: per rank
    generator = torch.Generator().manual_seed(args.seed * denv.world_size + denv.rank)  # noise, t: per rank
    pretransform = model.pretransform
    model.pretransform = None  # frozen and unused by the step: kept out of the engine (and its ZeRO partitions)
    load_pretrained(model, pretrained, args.allow_partial,
                    report_url=storage.join(args.output, "pretrained_load.json") if denv.rank == 0 else None)
    optimizer, scheduler = create_optimizer_and_scheduler(
        cfg.training.optimizer_configs, cfg.training.learning_rate, [p for p in model.parameters() if p.requires_grad],
        fused=device.type == "cuda")
    engine = ds_setup.build_engine(model, ds_config, optimizer=optimizer, lr_scheduler=scheduler)
    model = engine.module  # the same network, now on the device (ZeRO-3: its parameters partitioned)
    ema = None
    if cfg.training.use_ema:  # SAT averages the backbone only (`diffusion.model`), not the conditioners
        c = cfg.training.cantus
        ema = ShardedEMA(ema_parameters(model), rank=denv.rank, world_size=denv.world_size, beta=c.ema_beta,
                         power=c.ema_power, update_every=c.ema_interval)

    # objective, loss, timesteps, data
    d = cfg.model.diffusion
    objective = create_objective(d.diffusion_objective)
    loss_fn = DiffusionLoss.from_config(cfg.training.loss_configs, cfg.training.mask_padding,
                                        cfg.training.mask_padding_dropout)
    timesteps = create_timestep_sampler(cfg.training.timestep_sampler, cfg.training.timestep_sampler_options)
    shift = create_distribution_shift(d.distribution_shift_options)
    spec = CropSpec(frames=crop_frames, samples_per_frame=cfg.downsampling_ratio, sample_rate=cfg.sample_rate,
                    scale=cfg.model.pretransform.scale if cfg.model.pretransform else 1.0)
    data_seed = args.seed if args.data_seed is None else args.data_seed
    os.makedirs(scratch, exist_ok=True)
    loader = build_loader(latent_shards(data), spec, args, denv, seed=data_seed, batch_size=layout.micro_batch,
                          cache_dir=os.path.join(scratch, "shards"))
    val_dataset = validation_dataset(args, data, spec, layout, denv, scratch, data_seed)

    # the run: resume, output files, W&B, demos
    run = TrainRun(args, cfg, ds_config, denv, scratch)
    resumed = run.resume(engine, generators={"main": generator}, ema=ema)
    if resumed is not None:
        loader.load_state_dict(resumed[0].client["data"])
        timesteps.load_state_dict(resumed[0].client["timesteps"])
    step = run.step
    run.start()
    export_tensors = export_tensors_fn(model, pretransform, vae_weights, ema is not None)
    model_dtype = ds_setup.precision(ds_config)
    demos = None
    if demo_plan is not None:  # on every rank: each renders its share (ZeRO-3 needs all of them anyway)
        demos = DemoRenderer(plan=demo_plan, module=model, ema=ema, out=args.output, device=device,
                             dtype=model_dtype, rank=denv.rank, world_size=denv.world_size, scratch=scratch,
                             wandb_run=run.wandb,
                             pretransform=pretransform.to(device) if pretransform is not None else None)

    def model_fn_for(batch: Batch, cfg_dropout_prob: float, mask: torch.Tensor | None):
        """The network with this batch's routed conditioning closed over: `model_fn(x_t, t)` as the objective
        calls it. The typed call (`predict`), made through the engine (see the wrapper's `forward`)."""
        cond = (model.route(model.conditioner(batch.metadata, device)) if model.conditioner is not None
                else Conditioning())
        guidance = Guidance(dropout_prob=cfg_dropout_prob)  # scale 1: training never guides

        def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            with torch.autocast(device.type, dtype=model_dtype, enabled=model_dtype != torch.float32):
                return engine(x_t.to(model_dtype), t, cond, guidance=guidance, mask=mask).float()
        return model_fn

    try:
        batches = iter(loader)
        window = MetricsWindow(device)
        while step < args.max_steps:
            # batch
            t0 = time.perf_counter()
            batch: Batch = next(batches).to(device)
            window.data_wait += time.perf_counter() - t0
            x = sample_latents(batch)  # VAE posteriors: drawn here, on the device
            # loss
            t = timesteps(x.shape[0], generator=generator)
            if shift is not None:
                t = shift(t, x.shape[-1])
            noise = to_device(torch.randn(x.shape, generator=generator), device)  # CPU draws: exact resumes
            t = to_device(t, device)
            mask = loss_fn.padding_mask_for_step(batch.padding_mask, generator)
            model_fn = model_fn_for(batch, cfg.training.cfg_dropout_prob, mask)
            out = objective.loss(model_fn, x, t, noise, loss_fn=loss_fn, padding_mask=mask)
            # backward, step
            boundary = engine.is_gradient_accumulation_boundary()  # this micro-batch ends an optimizer step
            engine.backward(out.loss)
            engine.step()
            window.add("loss", out.loss)  # summed on the device: no read here
            if not boundary:
                continue
            step = engine.global_steps
            run.tick(step)
            # EMA
            if ema is not None:
                ema.update()
            window.steps += 1
            # periodic work; the stop flag is all-reduced (a host sync) at log steps only
            log_step = step % args.log_every == 0 or step == args.max_steps
            stopped = log_step and run.should_stop(device)
            if log_step:
                record = {"step": step, **window.means(window.steps * layout.accumulation),
                          **window.rates(engine, layout, loader.epoch)}
                run.log(record, "step %d | loss %.4f | grad_norm %.3g | lr %.2e | %.1f samples/s | data_wait %.0f%%",
                        step, record["loss"], record["grad_norm"], record["lr"], record["samples_per_s"],
                        100 * record["data_wait"])
                window.reset()
            if val_dataset is not None and args.val_every and step % args.val_every == 0:
                val_loader = LatentLoader(val_dataset, rank=denv.rank, world_size=denv.world_size,
                                          batch_size=layout.micro_batch, seed=data_seed, num_workers=0)
                record = {"step": step, **validation_losses(val_loader, lambda b: model_fn_for(b, 0.0, None), objective,
                                                            loss_fn, module=model, device=device, seed=data_seed)}
                run.log(record, "step %d | val_loss %.4f", step, record["val_loss"])
            if demos is not None and step % demos.plan.every == 0:
                demos.render(step)
            if run.should_save(step, stopped):
                run.save(engine, step, client={"data": loader.state_dict(), "timesteps": timesteps.state_dict()},
                         generators={"main": generator}, ema=ema, export_tensors=export_tensors)
            if stopped:
                run.log_stop(step)
                break
    finally:
        run.close()
    return run.exit_code(step)


def validation_dataset(args: TrainArgs, data: manifest.Manifest, spec: CropSpec, layout: ds_setup.BatchLayout,
                       denv: env.DistEnv, scratch: str, data_seed: int) -> ShardDataset | None:
    """`--val-data`'s latents (whole clips from the start, held in memory), checked against `--data`."""
    if args.val_data is None:
        return None
    val = manifest.read_manifest(args.val_data, stage="pre_encode")
    if val.properties != data.properties:
        raise ValueError(f"--val-data {args.val_data} and --data {args.data} differ in properties (pretransform "
                         f"identity, channels, ...): pre-encode both with the same VAE")
    dataset = ShardDataset(latent_shards(val), dataclasses.replace(spec, random_crop=False), seed=data_seed,
                           cache_dir=os.path.join(scratch, "shards-val"), cache_bytes=0,  # small: in memory
                           max_reject_fraction=args.max_reject_fraction)
    if len(dataset) < layout.micro_batch * denv.world_size:
        raise ValueError(f"--val-data {args.val_data}: {len(dataset)} samples, fewer than one batch per rank "
                         f"(--batch-size {layout.micro_batch} x world size {denv.world_size})")
    return dataset


if __name__ == "__main__":
    sys.exit(run_main(main))
