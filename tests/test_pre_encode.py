"""Stage 2 end to end on a tiny VAE: formats, exact metadata, identity, resume after SIGKILL."""
import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load as load_st
from safetensors.torch import save_file

from pipeline import manifest as mf
from pipeline import storage
from pipeline.config import load_model_config
from pipeline.data.audio import decode, encode_flac
from pipeline.data.shards import ShardWriter, iter_samples
from pipeline.models.autoencoder import create_autoencoder_from_config
from pipeline.models.pretransforms import AutoencoderPretransform
from pipeline.models.blocks import fold_weight_norm
from pipeline.pre_encode import main

import proctree  # tests/proctree.py

ROOT = Path(__file__).resolve().parents[1]
SR = 16000
TINY_VAE = {
    "model_type": "autoencoder", "sample_size": 512, "sample_rate": SR, "audio_channels": 1,
    "model": {
        "encoder": {"type": "oobleck", "config": {"in_channels": 1, "channels": 4, "c_mults": [1, 2],
                                                  "strides": [2, 4], "latent_dim": 8, "use_snake": True}},
        "decoder": {"type": "oobleck", "config": {"out_channels": 1, "channels": 4, "c_mults": [1, 2],
                                                  "strides": [2, 4], "latent_dim": 4, "use_snake": True}},
        "bottleneck": {"type": "vae"}, "latent_dim": 4, "downsampling_ratio": 8, "io_channels": 1,
    },
}


def tone(seconds, freq, seed):
    t = np.arange(int(seconds * SR)) / SR
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)[None]


def make_audio_manifest(out_url, clips_per_shard, shards):
    """Stage 1's format written directly: shards of `<key>.flac` + `<key>.json`, and its manifest."""
    entries, lengths = [], {}
    for s in range(shards):
        writer = ShardWriter(lambda n, s=s: storage.join(out_url, f"shard-{s}-{n}.tar"), 1 << 30)
        with writer:
            for c in range(clips_per_shard):
                key = f"clip{s}x{c}"
                seconds = [0.01, 0.032, 0.1][c % 3]  # shorter than, equal to and longer than a window
                audio = tone(seconds, 220 + 40 * c, seed=s * 100 + c)
                flac = encode_flac(audio, SR)
                lengths[key] = decode(flac)[0]  # what the stage will read back
                md = {"prompt": f"tone {c}", "offset_seconds": 1.5, "seconds_start": 1,
                      "seconds_total": 3, "source": f"mem://{key}"}
                writer.add(key, {"flac": flac, "json": json.dumps(md).encode()},
                           seconds=seconds)
        entries += [i.to_dict() for i in writer.shards]
    m = mf.Manifest(stage="shard", args={}, input={"url": "test", "sha256": "0"},
                    properties={"sample_rate": SR, "channels": 1}, outputs=tuple(entries))
    mf.write_manifest(storage.join(out_url, "manifest.json"), m)
    return lengths


def window_count(audio):
    return max(1, math.ceil(audio.shape[-1] / 512))


@pytest.fixture
def vae_files(tmp_path):
    config = tmp_path / "vae.json"
    config.write_text(json.dumps(TINY_VAE))
    torch.manual_seed(0)
    model = create_autoencoder_from_config(TINY_VAE)
    ckpt = tmp_path / "vae.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    return config, ckpt, model


def read_latents(manifest_url):
    out = {}
    for e in mf.read_manifest(manifest_url, stage="pre_encode").outputs:
        for key, members in iter_samples(e["url"]):
            assert key not in out, f"{key} twice"
            out[key] = (load_st(members["latents.safetensors"]), json.loads(members["json"]))
    return out


def test_latents_match_a_direct_encoder_call_with_exact_metadata(store_url, tmp_path, vae_files):
    config, ckpt, model = vae_files
    audio_url, out_url = storage.join(store_url, "audio"), storage.join(store_url, "latents")
    clips = make_audio_manifest(audio_url, clips_per_shard=3, shards=2)
    assert main(["--input", storage.join(audio_url, "manifest.json"), "--model-config", str(config),
                 "--pretransform-ckpt", str(ckpt), "--output", out_url, "--batch-size", "2",
                 "--sample-size", "512"]) == 0
    man = mf.read_manifest(storage.join(out_url, "manifest.json"), stage="pre_encode")
    props = man.properties
    assert props["latent_channels"] == 4 and props["downsampling_ratio"] == 8 and props["dtype"] == "fp32"
    assert man.input == mf.input_ref(storage.join(audio_url, "manifest.json"))
    latents = read_latents(storage.join(out_url, "manifest.json"))
    assert len(latents) == sum(map(window_count, clips.values())) == man.totals["samples"]

    pre = AutoencoderPretransform(model)  # weight norm unfolded: the folding is checked too
    for key, audio in clips.items():
        windows = window_count(audio)
        for j in range(windows):
            name = key if windows == 1 else f"{key}_w{j}"
            tensors, md = latents[name]
            valid = min(512, audio.shape[-1] - 512 * j)
            assert md["valid_frames"] == math.ceil(valid / 8)
            assert md["offset_seconds"] == pytest.approx(1.5 + 512 * j / SR)
            assert md["seconds_start"] == math.floor(md["offset_seconds"]) and md["seconds_total"] == 3
            window = np.zeros((1, 512), np.float32)
            window[:, :valid] = audio[:, 512 * j:512 * j + valid]
            mean, std = pre.encode_mean_std(torch.from_numpy(window)[None])
            torch.testing.assert_close(tensors["mean"], mean[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(tensors["std"], std[0], rtol=1e-5, atol=1e-6)


def test_rerun_after_sigkill_gives_every_sample_once(tmp_path, vae_files):
    config, ckpt, _ = vae_files
    audio_url, out_url = str(tmp_path / "audio"), str(tmp_path / "latents")
    clips = make_audio_manifest(audio_url, clips_per_shard=6, shards=8)
    cmd = [sys.executable, "-m", "pipeline.pre_encode", "--input", f"{audio_url}/manifest.json", "--model-config",
           str(config), "--pretransform-ckpt", str(ckpt), "--output", out_url, "--batch-size", "1"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    run = []  # the stage's DataLoader worker: kill while one runs
    while not ((Path(out_url) / "_items" / "1.json").exists() and (run := proctree.descendants(proc.pid))) \
            and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert run, "no DataLoader worker was running at the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proctree.assert_all_exit(run)  # no process of the killed run is left
    assert not (Path(out_url) / "manifest.json").exists(), "killed too late: the run had finished"
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    latents = read_latents(f"{out_url}/manifest.json")
    assert len(latents) == sum(map(window_count, clips.values()))


def test_weights_hash_is_the_same_for_a_standalone_vae_and_a_full_checkpoint(tmp_path, vae_files):
    from pipeline.pre_encode import build_parser, load_encoder
    config, ckpt, model = vae_files
    full = tmp_path / "full.safetensors"
    state = {f"pretransform.model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    state["model.some.weight"] = torch.zeros(3)
    save_file(state, str(full))
    props = [load_encoder(build_parser().parse_args(["--input", "x", "--model-config", str(config),
                                                      "--pretransform-ckpt", str(path), "--output", "y"])).properties
             for path in (ckpt, full)]
    assert props[0]["weights_sha256"] == props[1]["weights_sha256"] is not None
    assert props[0]["architecture_sha256"] == props[1]["architecture_sha256"]


def test_bf16_encode_and_sat_layout(tmp_path, vae_files):
    config, ckpt, _ = vae_files
    audio_url, out_url = str(tmp_path / "audio"), str(tmp_path / "latents")
    clips = make_audio_manifest(audio_url, clips_per_shard=3, shards=1)
    assert main(["--input", f"{audio_url}/manifest.json", "--model-config", str(config), "--pretransform-ckpt",
                 str(ckpt), "--output", out_url, "--dtype", "bf16", "--format", "sat"]) == 0
    man = mf.read_manifest(f"{out_url}/manifest.json")
    assert man.properties["dtype"] == "fp16"
    latents = read_latents(f"{out_url}/manifest.json")
    assert all(t["mean"].dtype == torch.float16 and torch.isfinite(t["mean"]).all() for t, _ in latents.values())
    npys = sorted((Path(out_url) / "sat").glob("*.npy"))
    assert len(npys) == len(latents) == sum(map(window_count, clips.values()))
    md = json.loads(npys[0].with_suffix(".json").read_text())
    assert np.load(npys[0]).shape == (4, 64) and len(md["padding_mask"]) == 64
    assert sum(md["padding_mask"]) == md["valid_frames"]


def test_decoding_in_worker_processes_gives_the_same_samples(tmp_path, vae_files):
    """Workers interleave their windows (a fixed order for a fixed count), so compare per key."""
    config, ckpt, _ = vae_files
    audio_url = str(tmp_path / "audio")
    make_audio_manifest(audio_url, clips_per_shard=5, shards=1)
    results = []
    for workers in ("0", "2"):
        out = str(tmp_path / f"latents{workers}")
        assert main(["--input", f"{audio_url}/manifest.json", "--model-config", str(config), "--pretransform-ckpt",
                     str(ckpt), "--output", out, "--num-workers", workers, "--batch-size", "3"]) == 0
        results.append(read_latents(f"{out}/manifest.json"))
    inline, workers = results
    assert sorted(inline) == sorted(workers)
    for key, (tensors, md) in inline.items():
        assert workers[key][1] == md
        torch.testing.assert_close(workers[key][0]["mean"], tensors["mean"], rtol=1e-5, atol=1e-6)
