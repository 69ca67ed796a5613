"""Benchmark one DiT training step (forward + backward) from an SAT model config.

    python bench/dit_step.py --config configs/x.json --batch-size 8 --dtype bf16 --device cuda
    python bench/dit_step.py --config tests/fixtures/sat_configs/external/stable_audio_open_1_0.reconstructed.json \
        --batch-size 4 --checkpointed-blocks 0 --dtype bf16 --device cuda

Only the backbone runs: conditioning tensors are random, shaped as the config's conditioners would
produce them (text encoders: `max_length` tokens; number/int: one token; injected ids:
--context-tokens), so the figure is the DiT's, not T5's or the VAE's. Prints a table: samples/s,
latent tokens/s, peak memory and, on CUDA, model FLOPs utilisation against a measured bf16 matmul
ceiling (not the datasheet number).
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_model_config  # noqa: E402
from pipeline.models import create_model_from_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TEXT_TYPES = ("t5", "hf_text", "clap_text")


def synthetic_conditioning(cfg, batch: int, context_tokens: int, device) -> dict:
    """{id: [tensor, mask]} for every routed id, shaped as its conditioner's output."""
    d, conditioning = cfg.model.diffusion, cfg.model.conditioning
    types = {c.id: c for c in conditioning.configs} if conditioning else {}
    width = conditioning.cond_dim if conditioning else d.config.get("cond_token_dim", 0)
    ids = set(d.cross_attention_cond_ids) | set(d.global_cond_ids) | set(d.prepend_cond_ids)
    cond = {}
    for cid in ids:
        c = types.get(cid)
        length = (c.config.get("max_length", 128) if c.type in TEXT_TYPES else 1) if c else context_tokens
        cond[cid] = [torch.randn(batch, length, width, device=device),
                     torch.ones(batch, length, dtype=torch.bool, device=device)]
    for cid in d.input_concat_ids:
        raise SystemExit(f"input_concat id {cid!r}: this benchmark does not synthesise input-concat conditioning")
    return cond


def model_flops_per_step(dit, batch: int, seq: int, context: int) -> float:
    """Forward + backward model FLOPs (3x forward; recomputation from checkpointing not counted)."""
    tr = dit.transformer
    dense = sum(p.numel() for n, p in dit.named_parameters() if p.dim() >= 2 and "layers." in n)
    dim, depth = tr.dim, tr.depth
    forward = 2 * dense * seq  # every block matmul sees every token (cross-attn K/V see the context:
    forward += 4 * seq * seq * dim * depth  # QK^T and AV of self-attention
    forward += 4 * seq * context * dim * depth  # and of cross-attention)
    return 3.0 * forward * batch


def matmul_ceiling(device) -> float:
    """Measured bf16 matmul throughput (FLOP/s) on this GPU: the MFU denominator."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", required=True, help="SAT model config (diffusion_cond with a dit backbone)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--checkpointed-blocks", type=int, default=None,
                   help="activation-checkpoint the first k blocks (default: the config's model.cantus.checkpointing)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="autocast dtype; weights stay fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--latent-frames", type=int, default=None, help="default: sample_size / pretransform ratio")
    p.add_argument("--context-tokens", type=int, default=128, help="tokens of an injected cross-attention id")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    cfg = load_model_config(args.config)
    if cfg.model.diffusion is None or cfg.model.diffusion.type != "dit":
        raise SystemExit(f"{args.config}: expected a config with a dit backbone")
    frames = args.latent_frames or cfg.sample_size // cfg.downsampling_ratio
    # The benchmark measures the DiT alone: no pretransform to build.
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, pretransform=None))
    model = create_model_from_config(cfg).to(device).train()
    dit = model.model.model
    if args.checkpointed_blocks is not None:
        dit.transformer.checkpointed_blocks = args.checkpointed_blocks
    batch = args.batch_size
    cond = synthetic_conditioning(cfg, batch, args.context_tokens, device)
    inputs = model.get_conditioning_inputs(cond)
    context = 0 if inputs["cross_attn_cond"] is None else inputs["cross_attn_cond"].shape[1]
    seq = frames // dit.patch_size + (1 if dit.global_cond_type == "prepend" else 0)
    x = torch.randn(batch, model.io_channels, frames, device=device)
    optimizer = torch.optim.AdamW(model.model.parameters(), lr=1e-5)
    autocast = torch.autocast(device.type, dtype=DTYPES[args.dtype], enabled=args.dtype != "fp32")

    def step():
        t = torch.rand(batch, device=device)
        with autocast:
            out = model.model(x, t, **inputs, cfg_dropout_prob=0.1)
            loss = (out.float() - x).square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps

    params = sum(p.numel() for p in dit.parameters())
    rows = [("config", args.config), ("device", str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                                                 if device.type == "cuda" else "")),
            ("DiT parameters", f"{params:,}"), ("dtype (autocast)", args.dtype),
            ("batch x tokens", f"{batch} x {seq} (+ {context} context)"),
            ("checkpointed blocks", f"{min(dit.transformer.checkpointed_blocks, dit.transformer.depth)}"
                                    f" / {dit.transformer.depth}"),
            ("step time", f"{seconds * 1000:.1f} ms"), ("samples/s", f"{batch / seconds:.2f}"),
            ("latent tokens/s", f"{batch * frames / seconds:,.0f}")]
    if device.type == "cuda":
        rows.append(("peak memory", f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"))
        achieved = model_flops_per_step(dit, batch, seq, context) / seconds
        ceiling = matmul_ceiling(device)
        rows += [("model TFLOP/s", f"{achieved / 1e12:.1f}"),
                 ("bf16 matmul ceiling", f"{ceiling / 1e12:.1f} TFLOP/s (measured, 8192^3)"),
                 ("MFU", f"{100 * achieved / ceiling:.1f} %")]
    else:
        rows.append(("peak memory (process RSS)",
                     f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
