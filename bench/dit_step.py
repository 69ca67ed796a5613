"""Benchmark one DiT training step (forward + backward + AdamW) from an SAT model config: eager vs compiled
(`model.cantus.compile`, regional) and activation checkpointing on vs off, in one run, as ratios.

    python bench/dit_step.py --config configs/demo_dit.json --batch-size 4 --device cpu
    python bench/dit_step.py --config tests/fixtures/sat_configs/external/stable_audio_open_1_0.reconstructed.json \\
        --batch-size 16 --dtype bf16 --device cuda

Only the backbone runs: conditioning tensors are random, shaped as the config's conditioners would
produce them (text encoders: `max_length` tokens; number/int: one token; injected ids:
--context-tokens), so the figure is the DiT's, not T5's or the VAE's. The four variants run in
interleaved rounds (the median round counts), so a shared machine's load hits them alike. On CUDA the
table adds peak memory and model FLOPs utilisation against a measured bf16 matmul ceiling (not the
datasheet number). `bench/gpu_suite.py` reuses these pieces.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_model_config  # noqa: E402
from pipeline.models import create_model_from_config  # noqa: E402
from pipeline.models.compile import compile_blocks  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_TYPES = ("t5", "hf_text", "clap_text")


def synthetic_conditioning(cfg, batch: int, context_tokens: int, device) -> dict:
    """{id: [tensor, mask]} for every routed id, shaped as its conditioner's output."""
    d, conditioning = cfg.model.diffusion, cfg.model.conditioning
    types = {c.id: c for c in conditioning.configs} if conditioning else {}
    width = conditioning.cond_dim if conditioning else d.config.get("cond_token_dim", 0)
    ids = set(d.cross_attention_cond_ids) | set(d.global_cond_ids) | set(d.prepend_cond_ids)
    cond = {}
    for cid in sorted(ids):
        c = types.get(cid)
        length = (c.config.get("max_length", 128) if c.type in TEXT_TYPES else 1) if c else context_tokens
        cond[cid] = [torch.randn(batch, length, width, device=device),
                     torch.ones(batch, length, dtype=torch.bool, device=device)]
    for cid in d.input_concat_ids:
        raise SystemExit(f"input_concat id {cid!r}: this benchmark does not synthesise input-concat conditioning")
    return cond


@dataclasses.dataclass
class DiTBench:
    """A DiT backbone built from a config (no pretransform, no conditioner weights used) and its sizes."""
    cfg: object
    model: torch.nn.Module
    """The wrapper (`model.model` is the DiTWrapper the step calls)."""
    frames: int
    context_tokens: int

    @property
    def dit(self):
        return self.model.model.model

    def inputs(self, batch: int, device) -> tuple[torch.Tensor, dict]:
        """Latents (B, C, T) and the backbone's conditioning keyword arguments for a batch."""
        torch.manual_seed(batch)
        cond = synthetic_conditioning(self.cfg, batch, self.context_tokens, device)
        x = torch.randn(batch, self.model.io_channels, self.frames, device=device)
        return x, self.model.get_conditioning_inputs(cond)

    def tokens(self, inputs: dict) -> tuple[int, int]:
        """(sequence length through the blocks, cross-attention context length)."""
        seq = self.frames // self.dit.patch_size + (1 if self.dit.global_cond_type == "prepend" else 0)
        context = 0 if inputs.get("cross_attn_cond") is None else inputs["cross_attn_cond"].shape[1]
        return seq, context


def build_bench(config, device, *, latent_frames: int | None = None, context_tokens: int = 128,
                seed: int = 0) -> DiTBench:
    cfg = load_model_config(config)
    if cfg.model.diffusion is None or cfg.model.diffusion.type != "dit":
        raise SystemExit(f"{config}: expected a config with a dit backbone")
    frames = latent_frames or cfg.sample_size // cfg.downsampling_ratio
    # The benchmark measures the DiT alone: no pretransform to build, compile applied by the caller.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(
        cfg.model, pretransform=None, cantus=dataclasses.replace(cfg.model.cantus, compile=False)))
    torch.manual_seed(seed)
    with torch.device(device):
        model = create_model_from_config(cfg)
    return DiTBench(cfg=cfg, model=model.train(), frames=frames, context_tokens=context_tokens)


def compiled_copy(bench: DiTBench, **options) -> DiTBench:
    """The same weights with every transformer block compiled (regional, as `model.cantus.compile`)."""
    model = copy.deepcopy(bench.model)
    compile_blocks(model, **options)
    return dataclasses.replace(bench, model=model)


def train_step_fn(bench: DiTBench, batch: int, dtype: torch.dtype, device, *,
                  optimizer: torch.optim.Optimizer | None = None) -> Callable[[], torch.Tensor]:
    """One training step on fixed random inputs: forward under autocast, fp32 loss, backward, AdamW (fused on
    CUDA, as the train stage uses it). Returns the (device) loss; nothing is read back."""
    x, inputs = bench.inputs(batch, device)
    if optimizer is None:
        params = [p for p in bench.model.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True if torch.device(device).type == "cuda" else None)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    t = torch.rand(batch, device=device)

    def step() -> torch.Tensor:
        with autocast:
            out = bench.model.model(x, t, **inputs, cfg_dropout_prob=0.1)
        loss = (out.float() - x).square().mean()  # the loss in fp32, as the train stage computes it
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def cfg_call_fn(bench: DiTBench, batch: int, dtype: torch.dtype, device, cfg_scale: float = 7.0
                ) -> Callable[[], torch.Tensor]:
    """One guided sampling call (conditioned + unconditioned rows batched: 2 x batch rows), no grad."""
    x, inputs = bench.inputs(batch, device)
    t = torch.full((batch,), 0.5, device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)

    def call() -> torch.Tensor:
        with torch.no_grad(), autocast:
            return bench.model.model(x, t, **inputs, cfg_scale=cfg_scale)
    return call


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def seconds_per_call(fn: Callable, calls: int, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / calls


def model_flops_per_step(dit, batch: int, seq: int, context: int) -> float:
    """Forward + backward model FLOPs (3x forward; recomputation from checkpointing not counted)."""
    tr = dit.transformer
    dense = sum(p.numel() for n, p in dit.named_parameters() if p.dim() >= 2 and "layers." in n)
    dim, depth = tr.dim, tr.depth
    forward = 2 * dense * seq  # every block matmul sees every token (cross-attn K/V see the context:
    forward += 4 * seq * seq * dim * depth  # QK^T and AV of self-attention
    forward += 4 * seq * context * dim * depth  # and of cross-attention)
    return 3.0 * forward * batch


def matmul_ceiling(device, n: int = 8192, reps: int = 20) -> float:
    """Measured bf16 matmul throughput (FLOP/s) on this device: the MFU denominator."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    return 2 * n ** 3 / seconds_per_call(lambda: a @ b, reps, device)


def peak_gib(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2 ** 30


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    for r in [header, ["-" * w for w in widths], *rows]:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
    sys.stdout.flush()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="SAT model config (diffusion_cond with a dit backbone)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--checkpointed-blocks", type=int, default=None,
                   help="the 'on' setting: checkpoint the first k blocks (default: the config's, or every block)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32", help="autocast dtype; weights stay fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--latent-frames", type=int, default=None, help="default: sample_size / pretransform ratio")
    p.add_argument("--context-tokens", type=int, default=128, help="tokens of an injected cross-attention id")
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compiles)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median counts")
    p.add_argument("--no-compile", action="store_true", help="eager variants only")
    args = p.parse_args(argv)

    device, dtype, batch = torch.device(args.device), DTYPES[args.dtype], args.batch_size
    eager = build_bench(args.config, device, latent_frames=args.latent_frames, context_tokens=args.context_tokens)
    depth = eager.dit.transformer.depth
    on = args.checkpointed_blocks if args.checkpointed_blocks is not None else \
        (eager.dit.transformer.checkpointed_blocks or depth)
    benches = {"eager": eager} if args.no_compile else {"eager": eager, "compiled": compiled_copy(eager)}
    variants = [(mode, blocks) for mode in benches for blocks in (on, 0)]
    steps = {v: train_step_fn(benches[v[0]], batch, dtype, device) for v in variants}
    times: dict = {v: [] for v in variants}
    peaks: dict = {}
    for v in variants:
        benches[v[0]].dit.transformer.checkpointed_blocks = v[1]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        for _ in range(args.warmup):
            steps[v]()
        synchronize(device)
        print(f"warm-up {v[0]}, {v[1]} checkpointed blocks: {time.perf_counter() - start:.1f} s", flush=True)
        peaks[v] = peak_gib(device)
    for _ in range(args.rounds):
        for v in variants:
            benches[v[0]].dit.transformer.checkpointed_blocks = v[1]
            times[v].append(seconds_per_call(steps[v], args.steps, device))
    median = {v: statistics.median(times[v]) for v in variants}

    x, inputs = eager.inputs(batch, device)
    seq, context = eager.tokens(inputs)
    params = sum(q.numel() for q in eager.dit.parameters())
    print(f"\n{args.config}: DiT {params / 1e6:.2f} M parameters, batch {batch} x {seq} tokens (+ {context} context), "
          f"{args.dtype}, {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    ceiling = matmul_ceiling(device) if device.type == "cuda" else None
    flops = model_flops_per_step(eager.dit, batch, seq, context)
    rows = []
    for v in variants:
        row = [v[0], f"{v[1]} / {depth}", f"{median[v] * 1000:.1f}", f"{batch / median[v]:.2f}"]
        if device.type == "cuda":
            row += [f"{peaks[v]:.2f}", f"{100 * flops / median[v] / ceiling:.1f}"]
        rows.append(row)
    header = ["mode", "checkpointed blocks", "step ms (median)", "samples/s"]
    if device.type == "cuda":
        header += ["peak GiB", f"MFU % (ceiling {ceiling / 1e12:.0f} TFLOP/s)"]
    print_table("training step", header, rows)
    ratios = [[f"checkpointing off vs on ({mode})", f"{median[(mode, on)] / median[(mode, 0)]:.2f}x"] for mode in benches]
    if "compiled" in benches:
        ratios += [[f"compiled vs eager ({blocks} checkpointed)", f"{median[('eager', blocks)] / median[('compiled', blocks)]:.2f}x"]
                   for blocks in (on, 0)]
    print_table("speed-ups (time of the first / time of the second; > 1: faster)", ["comparison", "speed-up"], ratios)
    return 0


if __name__ == "__main__":
    sys.exit(main())
