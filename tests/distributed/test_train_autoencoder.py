"""A tiny VAE trains through `pipeline/train.py` on 2 ranks (ZeRO-2) and resumes with the same losses."""
import glob
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline import manifest

sys.path.insert(0, os.path.dirname(__file__))
import trainkit  # noqa: E402


def _run(root, data, config, out, max_steps, name):
    argv = ["--ds_config", os.path.join(trainkit.REPO, "ds_configs", "zero2_cpu.json"), "--model-config", config,
            "--data", data, "--output", out, "--max-steps", str(max_steps), "--batch-size", "2", "--num-workers", "0",
            "--checkpoint-every", "3", "--log-every", "1", "--wandb", "off", "--scratch-dir", str(root / f"scratch-{name}")]
    logs = str(root / f"logs-{name}-{max_steps}")
    procs = trainkit.launch(argv, log_dir=logs)
    assert trainkit.wait_all(procs, logs) == [0, 0], trainkit.log_tail(logs, 0) + trainkit.log_tail(logs, 1)


@pytest.mark.distributed
def test_a_tiny_vae_trains_on_two_ranks_and_resumes_with_the_same_losses(tmp_path):
    data = trainkit.write_audio_shards(str(tmp_path / "audio"), shards=1, per_shard=10, channels=1, samples=400,
                                       sample_rate=16000)
    config = trainkit.write_json(str(tmp_path / "vae.json"), trainkit.tiny_vae_training_config(warmup_steps=2))
    full, split = str(tmp_path / "full"), str(tmp_path / "split")
    shm_before = set(glob.glob("/dev/shm/deepspeed_*"))
    _run(tmp_path, data, config, full, 6, "full")
    # DeepSpeed's CPU shm all-reduce stays off: it left 69 MB per rank in /dev/shm on every run.
    assert set(glob.glob("/dev/shm/deepspeed_*")) == shm_before
    _run(tmp_path, data, config, split, 3, "split")
    _run(tmp_path, data, config, split, 6, "split")
    a, b = trainkit.losses(full), trainkit.losses(split)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    assert [a[s] for s in range(1, 7)] == [b[s] for s in range(1, 7)]  # ZeRO-2 resume is exact
    import json
    rows = [json.loads(line) for line in open(os.path.join(full, "metrics.jsonl"))]
    assert "adversarial" not in rows[1] and "adversarial" in rows[2]  # the GAN joins after warmup_steps=2
    ledger = manifest.read_ledger(os.path.join(split, "checkpoints", "manifest.json"))
    export = load_file(ledger.at_step(6).export_url)
    reference = load_file(manifest.read_ledger(os.path.join(full, "checkpoints", "manifest.json")).at_step(6).export_url)
    from pipeline.models.factory import create_model_from_config
    model = create_model_from_config(config)
    assert set(export) == set(model.state_dict())  # SAT's unwrapped autoencoder layout: encoder.*, decoder.*
    assert all(torch.equal(export[k], reference[k]) for k in export)
    model.load_state_dict(export, strict=True)
