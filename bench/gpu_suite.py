"""Every stage-3 speed goal in one command, one table each, most important first, each printed when measured.

    python bench/gpu_suite.py                 # one H100: SAO (configs/sao_finetune.json), bf16, < 9 min
    python bench/gpu_suite.py --smoke         # the same code paths, tiny configs, on the CPU

Tables: (1) the SAO DiT training step (samples/s, MFU against a measured bf16 matmul ceiling, peak GiB) for batch
{8, 16, 32} x checkpointed blocks {0, 12, 24} x {eager, compiled}; (2) one CFG sampling call at batch 8, eager
and compiled; (3) one ZeRO-2 and one ZeRO-3 fine-tuning step at batch 4 (single-rank DeepSpeed, the backbone
with synthetic conditioning) with peak memory; (4) SAO VAE encoding, seconds of audio per second (bf16);
(5) loader samples/s for SAO-size latents (mean+std and single-tensor shards); (6) checks that LayerNorm and the
loss run in fp32 under bf16 autocast.

Budget: --budget-s of wall time (default 510 s). Each cell is timed with a few iterations; a cell whose
predicted time would not leave the reserve of the tables after it is shown as "skipped (budget)", an
out-of-memory as "OOM": a run cut short still prints the tables measured so far. Goals (issue 18): >= 70
samples/s at batch 32 within 40 GiB, and a CFG call <= 55 ms.

--smoke uses a 2-block DiT, a tiny VAE and a few latents on the CPU, and compiles with the `aot_eager` backend
(dynamo and AOTAutograd as in a real run, no C++ code generation, so it takes seconds, not minutes).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import io
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import dit_step  # noqa: E402
from dit_step import (build_bench, cfg_call_fn, matmul_ceiling, model_flops_per_step, print_table,  # noqa: E402
                      seconds_per_call, synchronize, train_step_fn)

from pipeline.config import load_model_config  # noqa: E402
from pipeline.models.compile import compile_blocks  # noqa: E402

SAO_FINETUNE = ROOT / "configs" / "sao_finetune.json"
GOAL_SAMPLES_PER_S, GOAL_GIB, GOAL_CFG_MS = 70.0, 40.0, 55.0


@dataclasses.dataclass(frozen=True)
class Settings:
    config: str
    device: torch.device
    dtype: torch.dtype
    batches: tuple[int, ...]
    checkpointed: tuple[int, ...]
    steps: int
    warmup: int
    cfg_batch: int
    zero_batch: int
    ds_configs: tuple[str, str]
    vae_batch: int
    vae_window: int
    loader_samples: int
    loader_batch: int
    loader_workers: int
    compile_options: dict
    compile_seconds: float
    """Predicted first-compile time of the training step (budget only)."""


def full_settings() -> Settings:
    return Settings(config=str(SAO_FINETUNE), device=torch.device("cuda"), dtype=torch.bfloat16,
                    batches=(8, 16, 32), checkpointed=(0, 12, 24), steps=3, warmup=2, cfg_batch=8, zero_batch=4,
                    ds_configs=(str(ROOT / "ds_configs/zero2.json"), str(ROOT / "ds_configs/zero3.json")),
                    vae_batch=4, vae_window=2097152 // 4, loader_samples=256, loader_batch=32, loader_workers=8,
                    compile_options={}, compile_seconds=120.0)


def tiny_config(path: str) -> str:
    """A 2-block DiT over a 4x tiny VAE with timing conditioners, as JSON at `path`."""
    vae = {"encoder": {"type": "oobleck", "config": {"in_channels": 1, "channels": 4, "c_mults": [1, 2],
                                                      "strides": [2, 2], "latent_dim": 8}},
           "decoder": {"type": "oobleck", "config": {"out_channels": 1, "channels": 4, "c_mults": [1, 2],
                                                      "strides": [2, 2], "latent_dim": 4}},
           "bottleneck": {"type": "vae"}, "latent_dim": 4, "downsampling_ratio": 4, "io_channels": 1}
    config = {"model_type": "diffusion_cond", "sample_size": 64, "sample_rate": 16000, "audio_channels": 1,
              "model": {"pretransform": {"type": "autoencoder", "config": vae},
                        "conditioning": {"cond_dim": 32, "configs": [
                            {"id": "seconds_start", "type": "number", "config": {"min_val": 0, "max_val": 512}},
                            {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 512}}]},
                        "diffusion": {"type": "dit", "cross_attention_cond_ids": ["seconds_start", "seconds_total"],
                                      "global_cond_ids": ["seconds_start", "seconds_total"],
                                      "config": {"io_channels": 4, "embed_dim": 64, "depth": 2, "num_heads": 2,
                                                 "cond_token_dim": 32, "global_cond_dim": 64}},
                        "io_channels": 4}}
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def smoke_settings(tmp: str) -> Settings:
    return Settings(config=tiny_config(os.path.join(tmp, "tiny.json")), device=torch.device("cpu"),
                    dtype=torch.bfloat16, batches=(2,), checkpointed=(0, 2), steps=1, warmup=1, cfg_batch=2,
                    zero_batch=2, ds_configs=(str(ROOT / "ds_configs/zero2_cpu.json"),
                                              str(ROOT / "ds_configs/zero3_cpu.json")),
                    vae_batch=2, vae_window=1024, loader_samples=16, loader_batch=4, loader_workers=1,
                    compile_options={"backend": "aot_eager"}, compile_seconds=10.0)


class Budget:
    def __init__(self, seconds: float):
        self.start, self.seconds = time.perf_counter(), seconds

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, predicted: float, reserve: float = 0.0) -> bool:
        return predicted + reserve <= self.left()


RESERVE = {"train": 200.0, "cfg": 150.0, "zero": 60.0, "vae": 30.0, "loader": 5.0, "checks": 0.0}
"""Seconds kept for the tables after each one (full run); --smoke scales them down."""


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def reset_peak(device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)


# ------------------------------------------------------------------------------------------------------------
# (1) training step and (2) CFG call


def table_train_and_cfg(s: Settings, budget: Budget, reserve: dict) -> dict:
    """Eager cells, the eager CFG call, then the same model compiled in place: compiled cells (largest batch first,
    so the goal cell gets a static graph) and the compiled CFG call."""
    bench = build_bench(s.config, s.device)
    dit = bench.dit
    depth = dit.transformer.depth
    params = [p for p in bench.model.model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True if s.device.type == "cuda" else None)
    ceiling = matmul_ceiling(s.device) if s.device.type == "cuda" else None
    x, inputs = bench.inputs(1, s.device)
    seq, context = bench.tokens(inputs)
    per_sample = model_flops_per_step(dit, 1, seq, context)
    print(f"DiT {sum(p.numel() for p in dit.parameters()) / 1e9:.3f} B parameters, {seq} tokens + {context} context, "
          f"{per_sample / 1e12:.2f} TFLOP per training sample; bf16 matmul ceiling "
          + (f"{ceiling / 1e12:.1f} TFLOP/s (measured)" if ceiling else "n/a (CPU)"), flush=True)
    cells: dict = {}
    seconds_per_sample = [None]

    def predict(batch: int, first_compile: bool) -> float:
        per = seconds_per_sample[0] if seconds_per_sample[0] is not None else 0.05
        return (s.steps + s.warmup) * per * batch * 1.5 + (s.compile_seconds if first_compile else 0.0)

    def run_cell(mode: str, batch: int, blocks: int, first_compile: bool) -> None:
        key = (mode, batch, blocks)
        if not budget.allows(predict(batch, first_compile), reserve["train"]):
            cells[key] = "skipped (budget)"
            return
        dit.transformer.checkpointed_blocks = blocks
        step = None
        try:
            free_memory()
            reset_peak(s.device)
            step = train_step_fn(bench, batch, s.dtype, s.device, optimizer=optimizer)
            for _ in range(s.warmup):
                step()
            seconds = seconds_per_call(step, s.steps, s.device)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            cells[key] = "OOM"
        else:
            if mode == "eager" or seconds_per_sample[0] is None:
                seconds_per_sample[0] = seconds / batch
            peak = dit_step.peak_gib(s.device)
            cells[key] = {"samples_per_s": batch / seconds, "ms": seconds * 1000, "peak_gib": peak,
                          "mfu": per_sample * batch / seconds / ceiling if ceiling else None}
        finally:
            del step
            optimizer.zero_grad(set_to_none=True)
            free_memory()
        print(f"  {mode:8s} batch {batch:3d}, {blocks:2d} checkpointed: {show(cells[key])}", flush=True)

    cfg_cells = {}

    def run_cfg(mode: str, first_compile: bool) -> None:
        if not budget.allows(30.0 + (s.compile_seconds / 2 if first_compile else 0.0), reserve["cfg"]):
            cfg_cells[mode] = "skipped (budget)"
            return
        free_memory()
        bench.model.eval()
        call = cfg_call_fn(bench, s.cfg_batch, s.dtype, s.device, cfg_scale=7.0)
        for _ in range(3):
            call()
        cfg_cells[mode] = seconds_per_call(call, 10, s.device) * 1000
        bench.model.train()
        print(f"  CFG call {mode}: {cfg_cells[mode]:.1f} ms", flush=True)

    for batch in s.batches:
        for blocks in s.checkpointed:
            run_cell("eager", batch, blocks, False)
    run_cfg("eager", False)
    compile_blocks(bench.model, **s.compile_options)
    first = True
    for batch in sorted(s.batches, reverse=True):
        for blocks in s.checkpointed:
            run_cell("compiled", batch, blocks, first)
            first = False
    run_cfg("compiled", True)

    header = ["batch", "checkpointed blocks", "eager samples/s", "eager peak GiB", "eager MFU %",
              "compiled samples/s", "compiled peak GiB", "compiled MFU %"]
    rows = []
    for batch in s.batches:
        for blocks in s.checkpointed:
            row = [str(batch), f"{blocks} / {depth}"]
            for mode in ("eager", "compiled"):
                c = cells.get((mode, batch, blocks), "skipped (budget)")
                row += ([f"{c['samples_per_s']:.1f}", fmt(c["peak_gib"], ".1f"), fmt(c["mfu"], ".1%", 100)]
                        if isinstance(c, dict) else [c, "", ""])
            rows.append(row)
    print_table(f"(1) DiT training step, {Path(s.config).name}, {dtype_name(s.dtype)} autocast, fused AdamW, "
                f"{s.device}: goal >= {GOAL_SAMPLES_PER_S:g} samples/s at batch 32 within {GOAL_GIB:g} GiB",
                header, rows)
    print_table(f"(2) one CFG sampling call, batch {s.cfg_batch} ({2 * s.cfg_batch} rows), no grad: goal <= "
                f"{GOAL_CFG_MS:g} ms", ["mode", "ms"],
                [[m, f"{v:.1f}" if isinstance(v, float) else v] for m, v in cfg_cells.items()])
    del bench, optimizer
    free_memory()
    return {"train": cells, "cfg": cfg_cells}


def show(cell) -> str:
    if not isinstance(cell, dict):
        return cell
    return (f"{cell['samples_per_s']:.1f} samples/s, {cell['ms']:.0f} ms/step"
            + (f", {cell['peak_gib']:.1f} GiB" if cell["peak_gib"] is not None else "")
            + (f", MFU {100 * cell['mfu']:.1f}%" if cell["mfu"] is not None else ""))


def fmt(value, spec: str, scale: float = 1.0) -> str:
    if value is None:
        return "n/a"
    return format(value * scale, spec.replace("%", "f"))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------------------
# (3) ZeRO-2 and ZeRO-3 fine-tuning steps


def init_single_rank(device: torch.device) -> None:
    """A one-rank process group, as the train stage's launcher would give it."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def table_zero(s: Settings, budget: Budget, reserve: dict) -> None:
    from pipeline.distributed.engine import build_engine, precision, read_ds_config, resolve_batch

    init_single_rank(s.device)
    rows = []
    for path in s.ds_configs:
        ds, _ = resolve_batch(read_ds_config(path), path, micro_batch=s.zero_batch, world_size=1,
                              model_config_path=s.config)
        stage = ds.get("zero_optimization", {}).get("stage", 0)
        if not budget.allows(60.0, reserve["zero"]):
            rows.append([f"ZeRO-{stage}", Path(path).name, "skipped (budget)", "", ""])
            continue
        engine = None
        try:
            free_memory()
            reset_peak(s.device)
            bench = build_bench(s.config, s.device)
            module = bench.model.model
            params = [p for p in module.parameters() if p.requires_grad]
            fused = True if s.device.type == "cuda" else None
            engine = build_engine(module, ds, optimizer=torch.optim.AdamW(params, lr=1e-5, fused=fused))
            dtype = precision(ds)
            x, inputs = bench.inputs(s.zero_batch, s.device)
            t = torch.rand(s.zero_batch, device=s.device)

            def step():
                with torch.autocast(s.device.type, dtype=dtype, enabled=dtype != torch.float32):
                    out = engine(x.to(dtype), t, **inputs, cfg_dropout_prob=0.1).float()
                loss = (out - x).square().mean()
                engine.backward(loss)
                engine.step()

            step()
            seconds = seconds_per_call(step, 2, s.device)
            peak = dit_step.peak_gib(s.device)
            rows.append([f"ZeRO-{stage}", Path(path).name, f"{seconds * 1000:.0f}", f"{s.zero_batch / seconds:.1f}",
                         fmt(peak, ".1f")])
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            rows.append([f"ZeRO-{stage}", Path(path).name, "OOM", "", ""])
        finally:
            if engine is not None:
                engine.destroy()
            engine = bench = None
            free_memory()
        print(f"  {' | '.join(rows[-1])}", flush=True)
    print_table(f"(3) fine-tuning step of {Path(s.config).name}'s backbone, batch {s.zero_batch}, single-rank "
                f"DeepSpeed, synthetic conditioning", ["stage", "ds_config", "step ms", "samples/s", "peak GiB"], rows)


# ------------------------------------------------------------------------------------------------------------
# (4) VAE encoding


def table_vae(s: Settings, budget: Budget, reserve: dict) -> None:
    from pipeline.models.blocks import fold_weight_norm
    from pipeline.models.pretransforms import create_pretransform_from_config

    cfg = load_model_config(s.config)
    if not budget.allows(20.0, reserve["vae"]):
        print_table("(4) VAE encoding", ["batch x window", "s of audio per s"], [["", "skipped (budget)"]])
        return
    pretransform = create_pretransform_from_config(cfg.model.pretransform, cfg.sample_rate, cfg.audio_channels)
    fold_weight_norm(pretransform.model, inplace=True)
    pretransform.to(s.device, s.dtype).eval()
    audio = torch.randn(s.vae_batch, cfg.audio_channels, s.vae_window, device=s.device, dtype=s.dtype) * 0.1
    with torch.inference_mode():
        pretransform.encode_mean_std(audio)  # warm-up: kernel selection, allocations
        seconds = seconds_per_call(lambda: pretransform.encode_mean_std(audio), 3, s.device)
    audio_seconds = s.vae_batch * s.vae_window / cfg.sample_rate
    print_table(f"(4) VAE encoding ({Path(s.config).name}'s pretransform, random weights, weight norm folded, "
                f"{dtype_name(s.dtype)} weights)", ["batch x window", "s of audio per s", "ms per batch"],
                [[f"{s.vae_batch} x {s.vae_window}", f"{audio_seconds / seconds:.0f}", f"{seconds * 1000:.0f}"]])
    del pretransform, audio
    free_memory()


# ------------------------------------------------------------------------------------------------------------
# (5) loader


def write_latents(folder: str, *, samples: int, channels: int, frames: int, vae: bool) -> list:
    """Shards of random latents in pre_encode's layout (`mean`/`std` float16, or one `latents` tensor)."""
    import webdataset as wds
    from safetensors.torch import save as save_safetensors

    from pipeline.data.latents import ShardRef

    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    refs, per_shard = [], max(1, samples // 4)
    for s in range(0, samples, per_shard):
        path = os.path.join(folder, f"latents-0-{s // per_shard}.tar")
        n = min(per_shard, samples - s)
        with wds.TarWriter(path) as tar:
            for i in range(n):
                mean = torch.randn(channels, frames, generator=g).half()
                tensors = {"mean": mean, "std": (0.1 + torch.rand(channels, frames, generator=g)).half()} if vae \
                    else {"latents": mean}
                meta = {"prompt": "a prompt", "seconds_start": 0, "seconds_total": 30, "offset_seconds": 0.0,
                        "valid_frames": frames}
                tar.write({"__key__": f"s{s}i{i:04d}", "latents.safetensors": save_safetensors(tensors),
                           "json": json.dumps(meta).encode()})
        refs.append(ShardRef(path, n))
    return refs


def table_loader(s: Settings, budget: Budget, reserve: dict, tmp: str) -> None:
    from pipeline.data.latents import CropSpec, LatentLoader, ShardDataset

    cfg = load_model_config(s.config)
    frames = cfg.sample_size // cfg.downsampling_ratio
    channels = cfg.model.io_channels
    spec = CropSpec(frames=frames, samples_per_frame=cfg.downsampling_ratio, sample_rate=cfg.sample_rate)
    rows = []
    for vae in (True, False):
        name = "mean + std (float16)" if vae else "latents (float16)"
        if not budget.allows(15.0, reserve["loader"]):
            rows.append([name, "skipped (budget)", ""])
            continue
        refs = write_latents(os.path.join(tmp, f"latents-{int(vae)}"), samples=s.loader_samples, channels=channels,
                             frames=frames, vae=vae)
        dataset = ShardDataset(refs, spec, seed=0, cache_dir=os.path.join(tmp, "cache"))
        loader = LatentLoader(dataset, rank=0, world_size=1, batch_size=s.loader_batch, seed=0,
                              num_workers=s.loader_workers)
        batches = iter(loader)
        next(batches)  # workers started, shards indexed
        count = loader.batches_per_epoch * 2 - 1
        start = time.perf_counter()
        for _ in range(count):
            next(batches).to(s.device)
        synchronize(s.device)
        rate = count * s.loader_batch / (time.perf_counter() - start)
        del batches
        rows.append([name, f"{rate:.0f}", f"{channels} x {frames}"])
    print_table(f"(5) loader: {s.loader_samples} samples, batch {s.loader_batch}, {s.loader_workers} workers, "
                f"to {s.device}", ["shards", "samples/s", "latent shape"], rows)


# ------------------------------------------------------------------------------------------------------------
# (6) precision checks


class LayerNormDtypes(TorchDispatchMode):
    """Counts the input dtype of every layer norm that runs."""

    def __init__(self):
        super().__init__()
        self.dtypes = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.native_layer_norm, torch.ops.aten.layer_norm):
            self.dtypes[dtype_name(args[0].dtype)] += 1
        return func(*args, **(kwargs or {}))


def table_checks(s: Settings) -> bool:
    """LayerNorm inputs and the loss in float32 during a bf16-autocast training forward (SAT's numerics)."""
    from pipeline.diffusion.objectives import create_objective

    bench = build_bench(s.config, s.device)
    x, inputs = bench.inputs(1, s.device)
    objective = create_objective(bench.cfg.model.diffusion.diffusion_objective)

    def model_fn(x_t, t):  # as the train stage calls the network: autocast inside, the output back in fp32
        with torch.autocast(s.device.type, dtype=torch.bfloat16):
            return bench.model.model(x_t, t, **inputs).float()

    with LayerNormDtypes() as seen:
        out = objective.loss(model_fn, x, torch.rand(1, device=s.device), torch.randn_like(x))
    ln_ok = set(seen.dtypes) == {"float32"}
    loss_ok = out.loss.dtype == torch.float32
    print_table("(6) precision under bf16 autocast (SAT: LayerNorm and loss in fp32)", ["check", "seen", "result"],
                [["LayerNorm input dtype", dict(seen.dtypes), "ok" if ln_ok else "FAIL"],
                 ["training loss dtype", dtype_name(out.loss.dtype), "ok" if loss_ok else "FAIL"]])
    return ln_ok and loss_ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny configs on the CPU: the same code paths in seconds")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget (default: 510 s; smoke: 600 s, "
                                                                  "so that every cell runs)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-suite-") as tmp:
        s = smoke_settings(tmp) if args.smoke else full_settings()
        if s.device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --smoke on the CPU")
        budget = Budget(args.budget_s if args.budget_s is not None else (600.0 if args.smoke else 510.0))
        reserve = RESERVE if not args.smoke else {k: v / 20 for k, v in RESERVE.items()}
        device_name = torch.cuda.get_device_name(s.device) if s.device.type == "cuda" else "CPU"
        print(f"gpu_suite: {device_name}, torch {torch.__version__}, budget {budget.seconds:.0f} s"
              + (" (smoke: tiny configs, aot_eager compile)" if args.smoke else ""), flush=True)
        torch.backends.cuda.matmul.allow_tf32 = True
        table_train_and_cfg(s, budget, reserve)
        table_zero(s, budget, reserve)
        table_vae(s, budget, reserve)
        table_loader(s, budget, reserve, tmp)
        ok = table_checks(s)
    print(f"\ngpu_suite done in {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
