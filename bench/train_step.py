"""Benchmark the train stage's step under DeepSpeed: forward, backward, ZeRO step, EMA update.

    torchrun --nproc_per_node 2 bench/train_step.py --config configs/demo_dit.json --ds_config ds_configs/zero2.json
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 bench/train_step.py \\
        --config configs/demo_dit.json --ds_config ds_configs/zero3_cpu.json --batch-size 2

Unlike `bench/dit_step.py` (the backbone alone, one device), this runs the engine as `pipeline/train.py`
does, so the figures include ZeRO's communication and the sharded EMA. Latents and conditioning are
synthetic (shaped as the config's conditioners would produce them). Rank 0 prints one line per phase:
median ms per step, samples/s over all ranks, and peak memory.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dit_step import synthetic_conditioning  # noqa: E402

from pipeline.config import load_model_config  # noqa: E402
from pipeline.diffusion.objectives import create_objective  # noqa: E402
from pipeline.diffusion.optim import create_optimizer_and_scheduler  # noqa: E402
from pipeline.distributed import engine as ds_setup  # noqa: E402
from pipeline.distributed import env  # noqa: E402
from pipeline.distributed.ema import ShardedEMA  # noqa: E402
from pipeline.models.factory import create_model_from_config  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="SAT model config (diffusion_cond or diffusion_uncond)")
    p.add_argument("--ds_config", "--ds-config", dest="ds_config", required=True, help="DeepSpeed JSON")
    p.add_argument("--batch-size", type=int, default=4, help="micro batch per rank")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--context-tokens", type=int, default=128, help="tokens of an injected cross-attention id")
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    denv = env.detect(local_rank_arg=args.local_rank)
    env.init_logging(denv.rank)
    cfg = load_model_config(args.config)
    ds_config, layout = ds_setup.resolve_batch(ds_setup.read_ds_config(args.ds_config), args.ds_config,
                                               micro_batch=args.batch_size, world_size=denv.world_size,
                                               model_config_path=args.config)
    env.init_process_group(denv)
    device = env.device_for(denv)
    torch.manual_seed(0)
    wrapper = create_model_from_config(cfg)
    wrapper.pretransform = None
    optimizer, scheduler = create_optimizer_and_scheduler(cfg.training.optimizer_configs, cfg.training.learning_rate or 1e-4,
                                                          [q for q in wrapper.parameters() if q.requires_grad])
    engine = ds_setup.build_engine(wrapper, ds_config, optimizer=optimizer, lr_scheduler=scheduler)
    ema = ShardedEMA([(n, q) for n, q in engine.module.named_parameters() if n.startswith("model.")],
                     rank=denv.rank, world_size=denv.world_size, beta=0.9999, power=0.75, update_every=1)
    dtype = ds_setup.precision(ds_config)
    objective = create_objective(cfg.model.diffusion.diffusion_objective)
    frames = cfg.sample_size // cfg.downsampling_ratio
    x = torch.randn(args.batch_size, cfg.model.io_channels, frames, device=device)
    cond = synthetic_conditioning(cfg, args.batch_size, args.context_tokens, device) if cfg.model.conditioning else None

    def model_fn(x_t, t):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return engine(x_t.to(dtype), t, cond).float()

    step_ms, ema_ms = [], []
    for i in range(args.warmup + args.steps):
        _sync(device)
        start = time.perf_counter()
        loss = objective.loss(model_fn, x, torch.rand(args.batch_size, device=device), torch.randn_like(x)).loss
        engine.backward(loss)
        engine.step()
        _sync(device)
        mid = time.perf_counter()
        ema.update()
        _sync(device)
        end = time.perf_counter()
        if i >= args.warmup:
            step_ms.append(1000 * (mid - start))
            ema_ms.append(1000 * (end - mid))
    if denv.rank == 0:
        step, upd = statistics.median(step_ms), statistics.median(ema_ms)
        memory = (f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB CUDA" if device.type == "cuda"
                  else f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS")
        params = sum(q.ds_numel if hasattr(q, "ds_numel") else q.numel() for q in engine.module.parameters())
        sys.stdout.write(
            f"{os.path.basename(args.config)} | {os.path.basename(args.ds_config)} (ZeRO {ds_setup.zero_stage(ds_config)}, "
            f"{str(dtype).removeprefix('torch.')}) | world {denv.world_size} | micro batch {args.batch_size} | "
            f"{params / 1e6:.1f} M params, {frames} latent frames\n"
            f"  step (fwd+bwd+optimizer) {step:8.1f} ms median | EMA update {upd:6.2f} ms | "
            f"{layout.global_batch / ((step + upd) / 1000):8.1f} samples/s | peak {memory}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
