"""Test helpers for the train stage: tiny latent and audio shards with their manifests.

Not a test module (no `test_` prefix); the train tests import it with tests/distributed on sys.path.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import save as save_safetensors

from pipeline import manifest, storage


def write_latent_shards(out_url: str, *, shards: int, per_shard: int | list[int], channels: int = 4, frames: int = 12,
                        valid_frames: int | None = None, vae: bool = True, seed: int = 0,
                        properties: dict | None = None, dtype=torch.float32) -> str:
    """`latents-0-<n>.tar` shards of random latents (`mean`/`std` when `vae`, else `latents`), each sample's
    JSON with prompt and timing; then the pre_encode manifest. Returns the manifest URL. `per_shard` may list
    a count per shard."""
    import webdataset as wds

    g = torch.Generator().manual_seed(seed)
    outputs = []
    counts = per_shard if isinstance(per_shard, list) else [per_shard] * shards
    for s in range(shards):
        buf = io.BytesIO()
        with wds.TarWriter(buf) as tar:
            for i in range(counts[s]):
                key = f"s{s:02d}i{i:03d}"
                mean = torch.randn(channels, frames, generator=g).to(dtype)
                tensors = {"mean": mean, "std": (0.1 + torch.rand(channels, frames, generator=g)).to(dtype)} \
                    if vae else {"latents": mean}
                meta = {"prompt": f"prompt {key}", "seconds_start": 3, "offset_seconds": 3.25, "seconds_total": 30,
                        "valid_frames": frames if valid_frames is None else valid_frames}
                tar.write({"__key__": key, "latents.safetensors": save_safetensors(tensors),
                           "json": json.dumps(meta).encode()})
        data = buf.getvalue()
        url = storage.join(out_url, f"latents-0-{s}.tar")
        storage.write(url, data)
        outputs.append(manifest.entry("pre_encode", url=url, samples=counts[s], bytes=len(data),
                                      sha256=hashlib.sha256(data).hexdigest(), seconds=float(counts[s])))
    props = {"architecture_sha256": "a" * 64, "weights_sha256": "b" * 64, "scale": 1.0, "weights_url": "",
             "latent_channels": channels, "downsampling_ratio": 4, "dtype": str(dtype).removeprefix("torch."),
             **(properties or {})}
    m = manifest.Manifest(stage="pre_encode", args={}, input={"url": "test", "sha256": "0" * 64},
                          properties=props, outputs=tuple(outputs))
    url = storage.join(out_url, "manifest.json")
    manifest.write_manifest(url, m)
    return url


def write_audio_shards(out_url: str, *, shards: int, per_shard: int, channels: int, samples: int,
                       sample_rate: int, seed: int = 0) -> str:
    """`shard-0-<n>.tar` with `<key>.flac` (a few sines plus noise) and `<key>.json`; the shard manifest."""
    import soundfile as sf
    import webdataset as wds

    rng = np.random.default_rng(seed)
    outputs = []
    for s in range(shards):
        buf = io.BytesIO()
        with wds.TarWriter(buf) as tar:
            for i in range(per_shard):
                t = np.arange(samples) / sample_rate
                f0 = rng.uniform(100, 1000)
                audio = 0.3 * np.sin(2 * np.pi * f0 * t)[None].repeat(channels, 0) + 0.01 * rng.standard_normal((channels, samples))
                flac = io.BytesIO()
                sf.write(flac, audio.T.astype(np.float32), sample_rate, format="FLAC", subtype="PCM_16")
                meta = {"prompt": f"sine {f0:.0f} Hz", "seconds_start": 0, "offset_seconds": 0.0, "seconds_total": 1}
                tar.write({"__key__": f"a{s:02d}i{i:03d}", "flac": flac.getvalue(), "json": json.dumps(meta).encode()})
        data = buf.getvalue()
        url = storage.join(out_url, f"shard-0-{s}.tar")
        storage.write(url, data)
        outputs.append(manifest.entry("shard", url=url, samples=per_shard, bytes=len(data),
                                      sha256=hashlib.sha256(data).hexdigest(), seconds=samples / sample_rate * per_shard))
    m = manifest.Manifest(stage="shard", args={}, input={"url": "test", "sha256": "0" * 64},
                          properties={"sample_rate": sample_rate, "channels": channels}, outputs=tuple(outputs))
    url = storage.join(out_url, "manifest.json")
    manifest.write_manifest(url, m)
    return url


TINY_VAE = {
    "encoder": {"type": "oobleck", "requires_grad": False,
                "config": {"in_channels": 1, "channels": 4, "c_mults": [1, 2], "strides": [2, 2], "latent_dim": 8}},
    "decoder": {"type": "oobleck", "config": {"out_channels": 1, "channels": 4, "c_mults": [1, 2], "strides": [2, 2],
                                              "latent_dim": 4}},
    "bottleneck": {"type": "vae"}, "latent_dim": 4, "downsampling_ratio": 4, "io_channels": 1}


def tiny_dit_config(*, scale: float = 1.0, use_ema: bool = True, lr: float = 1e-3) -> dict:
    """A diffusion_cond DiT (2 blocks, width 64) on a 4x VAE at 16 kHz mono, timing conditioners only;
    sample_size 64 = 16 latent frames."""
    return {
        "model_type": "diffusion_cond", "sample_size": 64, "sample_rate": 16000, "audio_channels": 1,
        "model": {
            "pretransform": {"type": "autoencoder", "scale": scale, "config": TINY_VAE},
            "conditioning": {"configs": [
                {"id": "seconds_start", "type": "number", "config": {"min_val": 0, "max_val": 512}},
                {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 512}}], "cond_dim": 32},
            "diffusion": {"cross_attention_cond_ids": ["seconds_start", "seconds_total"],
                          "global_cond_ids": ["seconds_start", "seconds_total"], "type": "dit",
                          "config": {"io_channels": 4, "embed_dim": 64, "depth": 2, "num_heads": 2, "cond_token_dim": 32,
                                     "global_cond_dim": 64, "project_cond_tokens": False,
                                     "transformer_type": "continuous_transformer"}},
            "io_channels": 4},
        "training": {"use_ema": use_ema, "cfg_dropout_prob": 0.1,
                     "optimizer_configs": {"diffusion": {"optimizer": {"type": "AdamW", "config": {"lr": lr}}}},
                     "cantus": {"ema_beta": 0.9, "ema_power": 0.75}}}


def write_vae(path: str, seed: int = 0) -> dict:
    """A seeded tiny VAE's weights (standalone layout `encoder.*`/`decoder.*`); returns its identity."""
    from safetensors.torch import save_file

    from pipeline.config import load_model_config
    from pipeline.models.factory import create_model_from_config
    from pipeline.models.weights import architecture_sha256, weights_sha256

    torch.manual_seed(seed)
    model = create_model_from_config(load_model_config(tiny_dit_config())).pretransform.model
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, path)
    return {"architecture_sha256": architecture_sha256(TINY_VAE), "weights_sha256": weights_sha256(sd),
            "weights_url": path, "scale": 1.0}


def write_json(path: str, obj: dict) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return path


def train_env(**extra: str) -> dict:
    env = dict(os.environ)
    env.update({"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
                "TORCH_EXTENSIONS_DIR": os.path.join(REPO, ".cache", "torch_extensions"),
                "PYTHONPATH": REPO, "WANDB_MODE": "disabled", **extra})
    return env


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], *, world: int = 2, style: str = "torchrun", log_dir: str, env: dict | None = None):
    """Start `world` ranks of `python pipeline/train.py argv` the way a launcher would: `torchrun` variables
    (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*) or SLURM's (SLURM_PROCID/NTASKS/LOCALID, MASTER_ADDR given as an
    srun batch script would), or `none`: one plain process without any launcher variable. Returns the Popen
    objects, rank order; each rank logs to log_dir/rank-<r>.log."""
    import subprocess

    port = free_port()
    procs = []
    os.makedirs(log_dir, exist_ok=True)
    for r in range(world):
        if style == "torchrun":
            extra = {"RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(world),
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        elif style == "none":
            assert world == 1, "style none is one plain process"
            extra = {}
        else:
            extra = {"SLURM_PROCID": str(r), "SLURM_NTASKS": str(world), "SLURM_LOCALID": str(r),
                     "SLURM_NTASKS_PER_NODE": str(world), "SLURM_JOB_NODELIST": "localhost",
                     "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        full = train_env(**extra, **(env or {}))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if style != "torchrun" else ():
            full.pop(k, None)
        if style == "none":
            for k in [k for k in full if k.startswith(("SLURM_", "MASTER_", "LOCAL_"))]:
                full.pop(k)
        log = open(os.path.join(log_dir, f"rank-{r}.log"), "w")
        procs.append(subprocess.Popen([sys.executable, os.path.join(REPO, "pipeline", "train.py"), *argv],
                                      env=full, stdout=log, stderr=subprocess.STDOUT, cwd=REPO))
    return procs


def wait_all(procs, log_dir: str, timeout: float = 600) -> list[int]:
    """Exit codes, rank order. Past `timeout` seconds in all, every rank still running is killed (a rank
    that died leaves its peers waiting at a collective) and the test fails with rank 0's log."""
    import subprocess
    import time

    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(deadline - time.monotonic(), 1)) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        raise AssertionError(f"ranks still running after {timeout:.0f} s, killed; rank 0's log:\n"
                             + log_tail(log_dir, 0)) from None


def log_tail(log_dir: str, rank: int = 0, n: int = 3000) -> str:
    with open(os.path.join(log_dir, f"rank-{rank}.log")) as f:
        return f.read()[-n:]


def losses(out: str) -> dict[int, float]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def autoencoder_training(warmup_steps: int = 2) -> dict:
    """A `training` block for a tiny VAE on clips of a few hundred samples: AdamW for both networks, STFT
    losses at 64 and 32 bins, KL, and a small EnCodec-style discriminator that joins after `warmup_steps`."""
    stft = {"fft_sizes": [64, 32], "hop_sizes": [16, 8], "win_lengths": [64, 32]}
    opt = {"optimizer": {"type": "AdamW", "config": {"lr": 1e-3, "betas": [0.8, 0.99]}}}
    return {"warmup_steps": warmup_steps, "use_ema": True, "cantus": {"ema_beta": 0.9},
            "optimizer_configs": {"autoencoder": opt, "discriminator": opt},
            "loss_configs": {
                "discriminator": {"type": "encodec", "config": {
                    "filters": 4, "n_ffts": [64, 32], "hop_lengths": [16, 8], "win_lengths": [64, 32]},
                    "weights": {"adversarial": 0.1, "feature_matching": 1.0}},
                "spectral": {"type": "mrstft", "config": stft, "weights": {"mrstft": 1.0}},
                "bottleneck": {"type": "kl", "weights": {"kl": 1e-4}}}}


def tiny_vae_training_config(warmup_steps: int = 2) -> dict:
    """TINY_VAE as a `model_type: autoencoder` config at 16 kHz mono, sample_size 256, trained as
    `autoencoder_training` says."""
    return {"model_type": "autoencoder", "sample_size": 256, "sample_rate": 16000, "audio_channels": 1,
            "model": TINY_VAE, "training": autoencoder_training(warmup_steps)}


def with_demos(config: dict, *, every: int, steps: int, cond: list[dict], cfg_scales: list[float],
               seed: int = 0, sampler: str | None = None) -> dict:
    """`config` with a `training.demo` block and the demo seed/sampler in `training.cantus`."""
    out = json.loads(json.dumps(config))
    out["training"]["demo"] = {"demo_every": every, "demo_steps": steps, "num_demos": len(cond),
                               "demo_cond": cond, "demo_cfg_scales": cfg_scales}
    out["training"].setdefault("cantus", {}).update({"demo_seed": seed, "demo_sampler": sampler})
    return out


T5_WORDS = ("amen", "break", "bpm", "orchestral", "symphony", "classical", "music", "chill", "hip-hop", "beat",
            "pop", "song", "about", "love", "and", "loss", "a", "prompt")


def write_tiny_t5(folder: str, *, d_model: int = 32, layers: int = 1, heads: int = 4, d_kv: int = 8,
                  d_ff: int = 64, words: tuple[str, ...] | list[str] = T5_WORDS) -> str:
    """A random T5 encoder (seed 0) with a word-level tokenizer over `words`, saved as a transformers folder
    (no download): what a `t5` conditioner's `t5_model_name` may point at on an offline node."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(vocab), d_model=d_model, d_kv=d_kv, d_ff=d_ff, num_layers=layers,
                      num_heads=heads)
    T5EncoderModel(config).eval().save_pretrained(folder)
    return folder


def page_links(page_url: str) -> list[str]:
    """Every href and src of an HTML page (local path or S3 URL)."""
    import html.parser

    class Links(html.parser.HTMLParser):
        def __init__(self):
            super().__init__()
            self.links = []

        def handle_starttag(self, tag, attrs):
            self.links += [v for k, v in attrs if k in ("href", "src")]

    parser = Links()
    parser.feed(storage.read_bytes(page_url).decode())
    return parser.links


def demo_audio(stem_url: str) -> tuple[torch.Tensor, dict]:
    """A demo clip's audio as the model produced it (the 24-bit FLAC is peak-normalised; its JSON has the
    peak) and the JSON."""
    import soundfile

    info = json.loads(storage.read_bytes(stem_url + ".json"))
    audio, rate = soundfile.read(io.BytesIO(storage.read_bytes(stem_url + ".flac")), dtype="float64", always_2d=True)
    assert rate == info["sample_rate"] and info["bits"] == 24
    return torch.from_numpy(audio.T).float() * info["peak"], info
