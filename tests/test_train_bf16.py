"""The bf16 DeepSpeed configs (`ds_configs/zero2.json`, `zero3.json`, the README's stage-3 command) train on a
CPU machine: 2 ranks over gloo, 3 steps each.

DeepSpeed's bf16 casts the parameters but not the buffers, so the DiT's LayerNorm meets a bf16 `gamma` beside
its fp32 `beta` buffer, and CPU autocast does not lift layer_norm to fp32 as CUDA's does; LayerNorm computes in
fp32 with both cast, as CUDA autocast runs it (tests/models/test_transformer.py pins the numerics).
"""
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
import trainkit  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_bf16")
    ident = trainkit.write_vae(str(root / "vae.safetensors"))
    data = trainkit.write_latent_shards(str(root / "latents"), shards=1, per_shard=8, frames=24, valid_frames=20,
                                        properties=ident)
    config = trainkit.write_json(str(root / "model.json"), trainkit.tiny_dit_config())
    return {"root": root, "data": data, "config": config}


@pytest.mark.parametrize("ds_config", ["zero2.json", "zero3.json"])
def test_bf16_ds_config_trains_3_steps_on_2_cpu_ranks_without_a_traceback(setup, ds_config):
    name = ds_config.removesuffix(".json")
    out, logs = str(setup["root"] / name), str(setup["root"] / f"logs-{name}")
    argv = ["--ds_config", os.path.join(trainkit.REPO, "ds_configs", ds_config), "--model-config", setup["config"],
            "--data", setup["data"], "--output", out, "--max-steps", "3", "--batch-size", "2", "--num-workers", "1",
            "--log-every", "1", "--checkpoint-every", "3", "--wandb", "off",
            "--scratch-dir", str(setup["root"] / f"scratch-{name}")]
    codes = trainkit.wait_all(trainkit.launch(argv, log_dir=logs), logs)
    tails = trainkit.log_tail(logs, 0) + trainkit.log_tail(logs, 1)
    assert codes == [0, 0], tails
    assert "Traceback" not in tails
    assert "bf16" in trainkit.log_tail(logs, 0, n=100_000)  # the plan line names the precision it trained in
    losses = trainkit.losses(out)
    assert sorted(losses) == [1, 2, 3]
    assert all(math.isfinite(v) and v > 0 for v in losses.values())
