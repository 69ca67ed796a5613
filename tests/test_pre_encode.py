"""Stage 2 end to end on a tiny VAE: formats, exact metadata, identity, resume after SIGKILL."""
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
from pipeline.data.audio import decode, encode_flac
from pipeline.data.shards import ShardWriter, iter_samples
from pipeline.models.factory import create_autoencoder_from_config
from pipeline.models.pretransforms import AutoencoderPretransform
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


def encode(audio_url, out_url, config, ckpt, *extra):
    return main(["--input", storage.join(audio_url, "manifest.json"), "--model-config", str(config),
                 "--pretransform-ckpt", str(ckpt), "--output", out_url, *extra])


def cut_on_a_member_boundary(url: str, keep_samples: int) -> None:
    """Rewrite the tar at ``url`` without its samples after the first ``keep_samples``, cut exactly
    where the next member's header starts (so the tar reader sees a clean end)."""
    import io
    import tarfile
    data = storage.read_bytes(url)
    members = tarfile.open(fileobj=io.BytesIO(data)).getmembers()
    storage.write(url, data[:members[2 * keep_samples].offset])


def edit_manifest(url: str, edit) -> None:
    d = json.loads(storage.read_bytes(url))
    edit(d)
    storage.write(url, json.dumps(d).encode())


def test_a_shard_cut_on_a_member_boundary_fails_the_stage_naming_it_and_nothing_is_committed(
        store_url, vae_files, capsys):
    config, ckpt, _ = vae_files
    audio_url, out_url = storage.join(store_url, "audio"), storage.join(store_url, "latents")
    make_audio_manifest(audio_url, clips_per_shard=5, shards=2)
    entry = mf.read_manifest(storage.join(audio_url, "manifest.json")).outputs[1]
    cut_on_a_member_boundary(entry["url"], keep_samples=2)
    assert encode(audio_url, out_url, config, ckpt) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "1 of 2 input shards gave no sample (50.0% > --max-reject-fraction 0.05)" in err
    assert f"{entry['url']} does not match its manifest entry" in err and "samples 2 (manifest: 5)" in err
    assert f"(manifest: {entry['bytes']})" in err
    assert not storage.exists(storage.join(out_url, "manifest.json"))
    (record,) = [json.loads(line) for line in storage.read_bytes(storage.join(out_url, "rejects.jsonl")).splitlines()]
    assert record["id"] == entry["url"] and record["expected"]["samples"] == 5 and record["actual"]["samples"] == 2
    assert record["actual"]["bytes"] == storage.size(entry["url"]) < entry["bytes"]
    assert record["actual"]["sha256"] == storage.sha256_url(entry["url"]) != entry["sha256"]
    assert not storage.exists(storage.join(out_url, "latents-00000-000001.tar")), "no latents from the cut shard"


def test_a_manifest_entry_with_a_wrong_sha256_fails_the_stage_unless_rejects_are_allowed(tmp_path, vae_files, capsys):
    config, ckpt, _ = vae_files
    audio_url = str(tmp_path / "audio")
    clips = make_audio_manifest(audio_url, clips_per_shard=3, shards=2)
    first = mf.read_manifest(storage.join(audio_url, "manifest.json")).outputs[0]
    edit_manifest(storage.join(audio_url, "manifest.json"), lambda d: d["outputs"][0].update(sha256="f" * 64))
    strict = str(tmp_path / "strict")
    assert encode(audio_url, strict, config, ckpt, "--format", "sat") == 2
    err = capsys.readouterr().err
    assert f"{first['url']} does not match its manifest entry: sha256 {first['sha256']} (manifest: {'f' * 64})" in err
    assert not (Path(strict) / "manifest.json").exists()
    sat = {p.stem for p in (Path(strict) / "sat").glob("*.npy")}
    assert sat and all(k.startswith("clip1") for k in sat), "SAT files only from the shard that matched"

    lenient = str(tmp_path / "lenient")
    assert encode(audio_url, lenient, config, ckpt, "--max-reject-fraction", "0.5") == 0
    m = mf.read_manifest(storage.join(lenient, "manifest.json"))
    assert m.totals["rejects"] == 1 and m.totals["items"] == 2
    assert sorted(read_latents(storage.join(lenient, "manifest.json"))) == \
        sorted(f"{k}_w{j}" if window_count(a) > 1 else k for k, a in clips.items() if k.startswith("clip1")
               for j in range(window_count(a)))


def test_a_sample_with_a_bad_json_value_is_one_reject_naming_the_shard_and_the_key(tmp_path, vae_files, caplog):
    config, ckpt, _ = vae_files
    audio_url, out_url = str(tmp_path / "audio"), str(tmp_path / "latents")
    shard_url = storage.join(audio_url, "shard-0-0.tar")
    with ShardWriter(lambda n: shard_url, 1 << 30) as writer:
        for c, offset in enumerate((0.0, "soon", 2.0)):
            md = {"prompt": f"tone {c}", "offset_seconds": offset, "seconds_start": 0, "seconds_total": 3}
            writer.add(f"clip{c}", {"flac": encode_flac(tone(0.01, 220, c), SR), "json": json.dumps(md).encode()})
    m = mf.Manifest(stage="shard", args={}, input={"url": "test", "sha256": "0"},
                    properties={"sample_rate": SR, "channels": 1}, outputs=tuple(s.to_dict() for s in writer.shards))
    mf.write_manifest(storage.join(audio_url, "manifest.json"), m)
    assert encode(audio_url, out_url, config, ckpt) == 0
    assert sorted(read_latents(storage.join(out_url, "manifest.json"))) == ["clip0", "clip2"]
    reason = f"{shard_url}: sample clip1.json: offset_seconds='soon', expected a finite number >= 0"
    (record,) = [json.loads(line) for line in storage.read_bytes(storage.join(out_url, "rejects.jsonl")).splitlines()]
    assert record == {"id": shard_url, "key": "clip1", "reason": reason}
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [reason]


def test_a_committed_latent_output_is_never_rewritten(tmp_path, vae_files, capsys):
    config, ckpt, _ = vae_files
    audio_url, out_url = str(tmp_path / "audio"), str(tmp_path / "latents")
    make_audio_manifest(audio_url, clips_per_shard=2, shards=3)
    assert encode(audio_url, out_url, config, ckpt, "plan") == 0
    for k in (0, 1):
        assert encode(audio_url, out_url, config, ckpt, "--task-index", str(k), "--num-tasks", "2") == 0
    assert encode(audio_url, out_url, config, ckpt, "commit", "--num-tasks", "2") == 0
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(out_url).rglob("*") if p.is_file()}
    capsys.readouterr()
    assert encode(audio_url, out_url, config, ckpt, "--task-index", "0", "--num-tasks", "3") == 2
    assert "is committed with other task count (2 there, 3 now)" in capsys.readouterr().err
    assert encode(audio_url, out_url, config, ckpt, "commit", "--num-tasks", "2", "--sample-size", "1024") == 2
    assert "sample_size: None there, 1024 now" in capsys.readouterr().err
    for step in (["--task-index", "1", "--num-tasks", "2"], ["commit", "--task-index", "0", "--num-tasks", "2"]):
        assert encode(audio_url, out_url, config, ckpt, *step, "--device", "cpu", "--batch-size", "3") == 0
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in Path(out_url).rglob("*") if p.is_file()}
    assert after == files
