"""Pre-encode throughput: seconds of audio encoded per second of wall time.

Two measurements, one table:
- ``stage``: the whole stage (`python -m pipeline.pre_encode` in-process: read FLAC shards, window,
  encode, write latent shards) on synthetic shards with a small VAE (``--config``, default the demo VAE).
- ``encoder``: the pretransform alone on a batch already on the device, weight norm folded, in the
  requested dtype: with ``--sao`` the Stable Audio Open VAE (random weights), else ``--config``.

    python bench/pre_encode.py                       # CPU: demo VAE, fp32
    python bench/pre_encode.py --sao --dtype bf16 --device cuda --batch-size 16
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline import manifest as mf  # noqa: E402
from pipeline import pre_encode  # noqa: E402
from pipeline.config import PretransformConfig, load_model_config  # noqa: E402
from pipeline.data.audio import encode_flac  # noqa: E402
from pipeline.data.shards import ShardWriter  # noqa: E402
from pipeline.models.factory import create_autoencoder_from_config  # noqa: E402
from pipeline.models.blocks import fold_weight_norm  # noqa: E402
from pipeline.models.pretransforms import AutoencoderPretransform, create_pretransform_from_config  # noqa: E402

SAO = ROOT / "tests/fixtures/sat_configs/external/stable_audio_open_1_0.reconstructed.json"


def write_audio(out: Path, cfg, clips: int, seconds: float) -> None:
    rng = np.random.default_rng(0)
    n = int(seconds * cfg.sample_rate)
    t = np.arange(n) / cfg.sample_rate
    writer = ShardWriter(lambda k: str(out / f"shard-0-{k}.tar"), 256 << 20)
    with writer:
        for i in range(clips):
            tone = 0.2 * np.sin(2 * np.pi * (110 + 20 * i) * t) + 0.01 * rng.standard_normal(n)
            audio = np.repeat(tone[None].astype(np.float32), cfg.audio_channels, 0)
            md = {"prompt": f"tone {i}", "offset_seconds": 0.0, "seconds_start": 0, "seconds_total": int(seconds)}
            writer.add(f"clip{i}", {"flac": encode_flac(audio, cfg.sample_rate), "json": json.dumps(md).encode()},
                       seconds=seconds)
    m = mf.Manifest(stage="shard", args={}, input={"url": "bench", "sha256": "0"},
                    properties={"sample_rate": cfg.sample_rate, "channels": cfg.audio_channels},
                    outputs=tuple(s.to_dict() for s in writer.shards))
    mf.write_manifest(str(out / "manifest.json"), m)


def bench_stage(args) -> tuple[float, float]:
    cfg = load_model_config(args.config)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        torch.manual_seed(0)
        vae = create_autoencoder_from_config(cfg)
        save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp / "vae.safetensors"))
        write_audio(tmp / "audio", cfg, args.clips, args.seconds)
        start = time.perf_counter()
        rc = pre_encode.main(["--input", str(tmp / "audio/manifest.json"), "--model-config", args.config,
                              "--pretransform-ckpt", str(tmp / "vae.safetensors"), "--output", str(tmp / "lat"),
                              "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--device", args.device])
        wall = time.perf_counter() - start
        assert rc == 0, "pre_encode failed"
    return args.clips * args.seconds, wall


def bench_encoder(args) -> tuple[float, float, str]:
    if args.sao:
        block = load_model_config(str(SAO)).model.pretransform
        name = "SAO VAE (random weights)"
        pretransform = create_pretransform_from_config(block, 44100, 2)
        sample_rate, channels, size = 44100, 2, args.window or 2097152 // 4
    else:
        cfg = load_model_config(args.config)
        block = PretransformConfig(type="autoencoder", config=cfg.raw["model"], autoencoder=cfg.model.autoencoder)
        pretransform = create_pretransform_from_config(block, cfg.sample_rate, cfg.audio_channels)
        name = Path(args.config).name
        sample_rate, channels, size = cfg.sample_rate, cfg.audio_channels, args.window or cfg.sample_size
    fold_weight_norm(pretransform.model, inplace=True)
    dtype = pre_encode.DTYPES[args.dtype]
    pretransform.to(args.device, dtype).eval()
    assert isinstance(pretransform, AutoencoderPretransform)
    batch = torch.randn(args.batch_size, channels, size, device=args.device, dtype=dtype) * 0.1
    with torch.inference_mode():
        pretransform.encode_mean_std(batch)  # warm-up (kernel selection, allocations)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats):
            pretransform.encode_mean_std(batch)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
    wall = time.perf_counter() - start
    return args.repeats * args.batch_size * size / sample_rate, wall, name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/demo_vae.json"), help="autoencoder config (stage bench)")
    p.add_argument("--sao", action="store_true", help="encoder bench on the SAO VAE instead of --config")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=tuple(pre_encode.DTYPES))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--clips", type=int, default=32, help="clips in the stage bench")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each clip in the stage bench")
    p.add_argument("--window", type=int, default=None, help="samples per item in the encoder bench")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    if not args.sao:
        audio, wall = bench_stage(args)
        rows.append(("stage", Path(args.config).name, audio, wall))
    audio, wall, name = bench_encoder(args)
    rows.append(("encoder", name, audio, wall))
    print(f"device {args.device}, dtype {args.dtype}, batch {args.batch_size}, threads {torch.get_num_threads()}")
    print(f"{'what':<8} {'model':<28} {'audio s':>9} {'wall s':>8} {'x real time':>12}")
    for what, model, audio, wall in rows:
        print(f"{what:<8} {model:<28} {audio:>9.1f} {wall:>8.2f} {audio / wall:>12.1f}")


if __name__ == "__main__":
    main()
