"""Fine-tuning Stable Audio Open: `configs/sao_finetune.json` from a checkpoint in SAO's key layout.

On the CPU: the config scaled down (same key structure, small widths, T5 replaced by a tiny random local
T5), random weights saved in SAO's layout as `.safetensors`, loaded with `--pretrained-ckpt`, two steps in
one plain process (no launcher) onto the S3 server, demos, an export that loads strictly. On a GPU: the same
at SAO's real size (skipped without CUDA).
"""
import copy
import json
import os
import re
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import manifest, storage
from pipeline.config import load_model_config
from pipeline.generate import generate
from pipeline.models.factory import create_model_from_config
from pipeline.models.weights import architecture_sha256, autoencoder_state_dict, weights_sha256
from pipeline.train import main
from pipeline.train_setup import load_pretrained

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
import trainkit  # noqa: E402

REPO = trainkit.REPO
SAO = os.path.join(REPO, "configs", "sao_finetune.json")


def sao_config() -> dict:
    with open(SAO) as f:
        return json.load(f)


def scaled_down(t5_folder: str) -> dict:
    """configs/sao_finetune.json with small widths and depths and a local T5; every key path kept."""
    c = copy.deepcopy(sao_config())
    c["sample_size"] = 64  # 16 latent frames
    vae = c["model"]["pretransform"]["config"]
    vae["encoder"]["config"].update(channels=4, c_mults=[1, 2], strides=[2, 2], latent_dim=8)
    vae["decoder"]["config"].update(channels=4, c_mults=[1, 2], strides=[2, 2], latent_dim=4)
    vae.update(latent_dim=4, downsampling_ratio=4)
    cond = c["model"]["conditioning"]
    cond["cond_dim"] = 32  # = the tiny T5's width, as 768 is t5-base's: no projection, as in SAO
    cond["configs"][0]["config"]["t5_model_name"] = t5_folder
    c["model"]["diffusion"]["config"].update(io_channels=4, embed_dim=64, depth=2, num_heads=2, cond_token_dim=32,
                                             global_cond_dim=64)
    c["model"]["io_channels"] = 4
    c["training"]["demo"].update(demo_every=2, demo_steps=2)
    return c


def _structure(keys) -> set[str]:
    return {re.sub(r"\.\d+\.", ".#.", re.sub(r"\.\d+\.", ".#.", k)) for k in keys}


@pytest.fixture(scope="module")
def sao_tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sao")
    t5 = trainkit.write_tiny_t5(str(root / "t5"))
    config = scaled_down(t5)
    torch.manual_seed(7)
    source = {k: v.contiguous() for k, v in create_model_from_config(config).state_dict().items()}
    checkpoint = str(root / "sao_random.safetensors")
    save_file(source, checkpoint)
    vae = autoencoder_state_dict(source)
    ident = {"architecture_sha256": architecture_sha256(config["model"]["pretransform"]["config"]),
             "weights_sha256": weights_sha256(vae), "weights_url": checkpoint, "scale": 1.0}
    data = trainkit.write_latent_shards(str(root / "latents"), shards=1, per_shard=6, frames=20, properties=ident)
    return {"root": root, "config": trainkit.write_json(str(root / "sao_tiny.json"), config), "raw": config,
            "checkpoint": checkpoint, "source": source, "data": data}


def test_the_scaled_down_config_has_sao_s_key_structure(sao_tiny):
    cfg = load_model_config(SAO)
    assert cfg.unknown_keys == () and cfg.model.cantus.attention_masks
    with torch.device("meta"):
        full = create_model_from_config(cfg).state_dict()
    assert len(full) == 745  # SAO's key count (DiT, conditioners, VAE)
    assert _structure(full) == _structure(sao_tiny["source"])


def _argv(sao_tiny, out, *extra):
    return ["--ds_config", os.path.join(REPO, "ds_configs", "zero2_cpu.json"), "--model-config", sao_tiny["config"],
            "--data", sao_tiny["data"], "--output", out, "--pretrained-ckpt", sao_tiny["checkpoint"],
            "--pretransform-ckpt", sao_tiny["checkpoint"], "--max-steps", "2", "--batch-size", "2",
            "--num-workers", "0", "--checkpoint-every", "2", "--log-every", "1", "--wandb", "off", *extra]


def test_a_partial_load_is_refused_with_every_key_unless_allow_partial(sao_tiny, tmp_path):
    bad = dict(sao_tiny["source"])
    del bad["model.model.postprocess_conv.weight"]
    bad["model.model.to_timestep_embed.0.weight"] = torch.zeros(3, 3)
    bad["model.model.extra_head.weight"] = torch.zeros(2)
    path = str(tmp_path / "bad.safetensors")
    save_file(bad, path)
    argv = _argv(sao_tiny, str(tmp_path / "out"), "--dry-run", "--pretrained-ckpt", path)
    with pytest.raises(ValueError) as refused:
        main(argv)
    message = str(refused.value)
    for key in ("model.model.postprocess_conv.weight", "model.model.to_timestep_embed.0.weight",
                "model.model.extra_head.weight", "--allow-partial"):
        assert key in message
    assert "1 missing, 1 of another shape, 1 unused" in message
    assert main([*argv, "--allow-partial"]) == 0
    # the real load: the report lists each key, the matching tensors are loaded, the others keep their init
    torch.manual_seed(8)
    model = create_model_from_config(sao_tiny["raw"])
    init = model.state_dict()["model.model.to_timestep_embed.0.weight"].clone()
    report = load_pretrained(model, path, True, report_url=str(tmp_path / "report.json"))
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert report["missing"] == ["model.model.postprocess_conv.weight"] and report["partial"]
    assert report["shape_mismatch"] == [{"key": "model.model.to_timestep_embed.0.weight", "model": list(init.shape),
                                         "checkpoint": [3, 3]}]
    assert report["unused"] == ["model.model.extra_head.weight"]
    state = model.state_dict()
    assert torch.equal(state["model.model.to_timestep_embed.0.weight"], init)
    key = "model.model.transformer.layers.1.cross_attn.to_kv.weight"
    assert torch.equal(state[key], sao_tiny["source"][key])


@pytest.mark.distributed
def test_finetune_from_an_sao_layout_checkpoint_on_one_process_and_s3(sao_tiny, s3_bucket):
    """No launcher, world size 1, ZeRO-2 (the EMA as fragments of the flat fp32 partition), S3 output."""
    out = f"s3://{s3_bucket}/sao-finetune"
    logs = str(sao_tiny["root"] / "logs")
    procs = trainkit.launch([*_argv(sao_tiny, out), "--scratch-dir", str(sao_tiny["root"] / "scratch")],
                            world=1, style="none", log_dir=logs)
    assert trainkit.wait_all(procs, logs) == [0], trainkit.log_tail(logs, 0)
    report = json.loads(storage.read_bytes(f"{out}/pretrained_load.json"))
    source = sao_tiny["source"]
    assert not report["partial"]
    assert report["loaded"] == len([k for k in source if not k.startswith("pretransform.")])
    # the export loads strictly and starts from the checkpoint (2 steps at lr 1e-5 in warm-up move little)
    entry = manifest.read_ledger(f"{out}/checkpoints/manifest.json").at_step(2)
    local = str(sao_tiny["root"] / "export.safetensors")
    storage.download(entry.export_url, local)
    export = load_file(local)
    model = create_model_from_config(sao_tiny["raw"])
    model.load_state_dict(export, strict=True)
    assert all(torch.equal(export[k], v) for k, v in source.items() if k.startswith("pretransform."))
    drift = max(float((export[k] - v).abs().max()) for k, v in source.items())
    assert 0 < drift < 1e-3
    # demos on S3: every link of the page exists, each clip equals generate() on the export
    demos = f"{out}/demos"
    links = trainkit.page_links(f"{demos}/index.html")
    assert len(links) == 4 * 2 * 2 and all(storage.exists(f"{demos}/{link}") for link in links)
    plan = sao_tiny["raw"]["training"]
    for i, cond in enumerate(plan["demo"]["demo_cond"]):
        for scale in plan["demo"]["demo_cfg_scales"]:
            got, info = trainkit.demo_audio(f"{demos}/step-2/demo-{i:02d}/cfg{scale:g}-seed{i}")
            assert info["sampler"] == "dpmpp-3m-sde"  # an SDE sampler: its per-step noise is the item's own too
            ref = generate(model, [cond], [i], steps=2, length=16, cfg_scale=scale, sampler="dpmpp-3m-sde").audio[0]
            assert got.shape == ref.shape == (2, 64)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.distributed
@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA: trains SAO at full size (1.06 B DiT parameters, bf16, ZeRO-2) for a few steps")
def test_gpu_smoke_finetunes_sao_at_full_size_from_a_random_sao_layout_checkpoint(tmp_path):
    """A random checkpoint in SAO's key layout (745 tensors), T5 replaced by a random t5-base-shaped encoder (its
    weights are not part of SAO's checkpoint), 3 steps on every visible GPU, demos, a strict export."""
    config = sao_config()
    config["model"]["conditioning"]["configs"][0]["config"]["t5_model_name"] = trainkit.write_tiny_t5(
        str(tmp_path / "t5"), d_model=768, layers=2, heads=12, d_kv=64, d_ff=3072)
    config["training"]["demo"].update(demo_every=3, demo_steps=4)
    config_path = trainkit.write_json(str(tmp_path / "sao.json"), config)
    torch.manual_seed(0)
    source = {k: v.contiguous() for k, v in create_model_from_config(config).state_dict().items()}
    assert len(source) == 745
    checkpoint = str(tmp_path / "sao_random.safetensors")
    save_file(source, checkpoint)
    vae = autoencoder_state_dict(source)
    ident = {"architecture_sha256": architecture_sha256(config["model"]["pretransform"]["config"]),
             "weights_sha256": weights_sha256(vae), "weights_url": checkpoint, "scale": 1.0}
    del source, vae
    world = torch.cuda.device_count()
    data = trainkit.write_latent_shards(str(tmp_path / "latents"), shards=1, per_shard=4 * world, channels=64,
                                        frames=1024, properties=ident, dtype=torch.float16)
    out = str(tmp_path / "out")
    argv = ["--ds_config", os.path.join(REPO, "ds_configs", "zero2.json"), "--model-config", config_path,
            "--data", data, "--output", out, "--pretrained-ckpt", checkpoint, "--max-steps", "3",
            "--batch-size", "1", "--num-workers", "1", "--checkpoint-every", "3", "--log-every", "1", "--wandb", "off"]
    logs = str(tmp_path / "logs")
    procs = trainkit.launch(argv, world=world, log_dir=logs, env={"DS_ACCELERATOR": "cuda"})
    assert trainkit.wait_all(procs, logs, timeout=3600) == [0] * world, trainkit.log_tail(logs, 0)
    entry = manifest.read_ledger(os.path.join(out, "checkpoints", "manifest.json")).at_step(3)
    with torch.device("meta"):
        model = create_model_from_config(config)
    missing, unexpected = model.load_state_dict(load_file(entry.export_url), strict=False, assign=True)
    assert not missing and not unexpected
    assert len(trainkit.page_links(os.path.join(out, "demos", "index.html"))) == 4 * 2 * 2
