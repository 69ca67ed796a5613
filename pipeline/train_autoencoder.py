"""Stage 3 for `model_type: autoencoder` (called by `pipeline/train.py`): audio shards -> a VAE.

The generator (the autoencoder) is the DeepSpeed engine: ZeRO, clipping, its optimizer and scheduler from
`training.optimizer_configs.autoencoder`. The discriminator is small and stays replicated: a plain torch
optimizer from `optimizer_configs.discriminator`, its gradients averaged over ranks by one all-reduce per
step, its weights and optimizer state saved in every rank's checkpoint file. Both step every batch (the two
losses share no graph); the adversarial terms join after `training.warmup_steps`.
"""
from __future__ import annotations

import logging
import os
import time

import torch

from pipeline import manifest
from pipeline.config import ModelConfig
from pipeline.data.latents import CropSpec, build_loader, shard_refs
from pipeline.diffusion.optim import create_optimizer_and_scheduler
from pipeline.distributed import checkpoint, collectives, env
from pipeline.distributed import engine as ds_setup
from pipeline.distributed.ema import ShardedEMA
from pipeline.models.autoencoder_losses import autoencoder_step_losses, create_autoencoder_losses
from pipeline.models.factory import create_model_from_config
from pipeline.train_args import TrainArgs
from pipeline.train_run import MetricsWindow, TrainRun, scratch_dir

logger = logging.getLogger("pipeline.train")


def _optimizer_tensors(prefix: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The discriminator's weights and optimizer state as flat named tensors (safetensors holds no nesting)."""
    out = {f"{prefix}.param.{k}": v.detach().cpu() for k, v in module.state_dict().items()}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            out[f"{prefix}.opt.{index}.{key}"] = torch.as_tensor(value).detach().cpu()
    return out


def _load_optimizer_tensors(prefix: str, tensors: dict[str, torch.Tensor], module: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    module.load_state_dict({k.removeprefix(f"{prefix}.param."): v for k, v in tensors.items()
                            if k.startswith(f"{prefix}.param.")})
    state: dict[int, dict] = {}
    for k, v in tensors.items():
        if k.startswith(f"{prefix}.opt."):
            index, key = k.removeprefix(f"{prefix}.opt.").split(".", 1)
            state.setdefault(int(index), {})[key] = v
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def train_autoencoder(args: TrainArgs, cfg: ModelConfig, ds_config: dict, layout: ds_setup.BatchLayout, denv: env.DistEnv) -> int:
    data = manifest.read_manifest(args.data, stage="shard")
    channels = data.properties.get("channels")
    if channels != cfg.audio_channels or data.properties.get("sample_rate") != cfg.sample_rate:
        raise ValueError(f"{args.data}: {channels} channel(s) at {data.properties.get('sample_rate')} Hz, but "
                         f"{args.model_config} has audio_channels={cfg.audio_channels}, sample_rate={cfg.sample_rate}")
    samples = sum(o["samples"] for o in data.outputs)
    logger.info("plan: autoencoder | global batch %d = micro %d x accumulation %d x world %d | %d audio samples "
                "(%.3g s) per example | %d examples, %d steps per epoch, %d steps planned", layout.global_batch,
                layout.micro_batch, layout.accumulation, layout.world_size, cfg.sample_size,
                cfg.sample_size / cfg.sample_rate, samples, samples // layout.global_batch, args.max_steps)
    if args.dry_run:
        return 0
    if layout.accumulation != 1:
        raise ValueError(f"{args.ds_config}: gradient_accumulation_steps must be 1 for autoencoders (the "
                         f"discriminator steps every batch)")

    device = env.device_for(denv)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = create_model_from_config(cfg)
    losses = create_autoencoder_losses(cfg.training.loss_configs, cfg.sample_rate, cfg.audio_channels).to(device)
    torch.manual_seed(args.seed * denv.world_size + denv.rank)
    generator = torch.Generator(device).manual_seed(args.seed * denv.world_size + denv.rank)
    opt_configs = cfg.training.optimizer_configs
    optimizer, scheduler = create_optimizer_and_scheduler(
        opt_configs, cfg.training.learning_rate, [p for p in model.parameters() if p.requires_grad],
        group="autoencoder")
    engine = ds_setup.build_engine(model, ds_config, optimizer=optimizer, lr_scheduler=scheduler)
    disc = losses.discriminator
    disc_opt = disc_sched = None
    if disc is not None:
        disc_opt, disc_sched = create_optimizer_and_scheduler(opt_configs, cfg.training.learning_rate,
                                                              list(disc.parameters()), group="discriminator")
    model = engine.module  # the same network, now on the device (ZeRO-3: its parameters partitioned)
    ema = None
    if cfg.training.use_ema:
        c = cfg.training.cantus
        ema = ShardedEMA([(n, p) for n, p in model.named_parameters() if p.requires_grad], rank=denv.rank,
                         world_size=denv.world_size, beta=c.ema_beta, power=c.ema_power, update_every=c.ema_interval)

    # data
    scratch = scratch_dir(args)
    os.makedirs(scratch, exist_ok=True)
    data_seed = args.seed if args.data_seed is None else args.data_seed
    spec = CropSpec(frames=cfg.sample_size, samples_per_frame=1, sample_rate=cfg.sample_rate)
    loader = build_loader(shard_refs(data.outputs), spec, args, denv, seed=data_seed, batch_size=layout.micro_batch,
                          cache_dir=os.path.join(scratch, "shards"))

    # the run: resume, output files, W&B
    run = TrainRun(args, cfg, ds_config, denv, scratch)
    resumed = run.resume(engine, generators={"main": generator}, ema=ema)
    if resumed is not None:
        state, extra = resumed
        loader.load_state_dict(state.client["data"])
        if disc is not None:
            _load_optimizer_tensors("disc", extra, disc, disc_opt, state.client["disc_param_groups"])
            if disc_sched is not None:
                disc_sched.load_state_dict(state.client["disc_scheduler"])
    step = run.step
    run.start()

    def export_tensors(ema_tensors: dict | None) -> dict | None:
        tensors = checkpoint.full_fp32_state_dict(model)  # collective
        return {**tensors, **(ema_tensors or {})} if denv.rank == 0 else None

    def save(at_step: int) -> None:
        client = {"data": loader.state_dict()}
        extra = {}
        if disc is not None:
            extra = _optimizer_tensors("disc", disc, disc_opt)
            client["disc_param_groups"] = disc_opt.state_dict()["param_groups"]
            client["disc_scheduler"] = disc_sched.state_dict() if disc_sched is not None else None
        run.save(engine, at_step, client=client, generators={"main": generator}, ema=ema,
                 export_tensors=export_tensors, extra=extra)

    try:
        batches = iter(loader)
        window = MetricsWindow(device)
        while step < args.max_steps:
            # batch
            t0 = time.perf_counter()
            reals = next(batches).to(device).latents  # (B, C, T) audio
            window.data_wait += time.perf_counter() - t0
            # losses
            out = autoencoder_step_losses(model, losses, reals, warmed_up=step >= cfg.training.warmup_steps,
                                          generator=generator)
            # generator: backward, step
            engine.backward(out.generator)
            engine.step()
            # discriminator: backward, average over ranks, step
            if out.discriminator is not None:
                disc_opt.zero_grad(set_to_none=True)
                out.discriminator.backward()
                collectives.average_gradients(disc)
                disc_opt.step()
                if disc_sched is not None:
                    disc_sched.step()
            step = engine.global_steps
            run.tick(step)
            # EMA
            if ema is not None:
                ema.update()
            window.steps += 1
            window.add("loss", out.generator)
            for k, v in out.terms.items():
                window.add(k, v)
            stopped = run.should_stop(device)
            # periodic work
            if step % args.log_every == 0 or stopped or step == args.max_steps:
                terms = sorted(k for k in window.sums if k != "loss")
                record = {"step": step, **window.means(window.steps), **window.rates(engine, layout, loader.epoch)}
                run.log(record, "step %d | loss %.4f | %s | lr %.2e | %.1f samples/s", step, record["loss"],
                        " ".join(f"{k} {record[k]:.4g}" for k in terms), record["lr"], record["samples_per_s"])
                window.reset()
            if run.should_save(step, stopped):
                save(step)
            if stopped:
                run.log_stop(step)
                break
    finally:
        run.close()
    return run.exit_code(step)
