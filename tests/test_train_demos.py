"""Training demos and validation: both ranks render under ZeRO-3, the page links every file, a demo equals
`generate()` on the exported EMA model, validation losses repeat across a resume.

Two DeepSpeed launches (2 ranks, ZeRO-3 with `stage3_param_persistence_threshold: 0`, so parameters really
are partitioned): 4 steps with demos, validation and checkpoints every 2 steps; then a resume from the step-2
checkpoint (copied into a second output) to step 4. The rest runs in-process without DeepSpeed.
"""
import glob
import json
import os
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from pipeline import manifest
from pipeline.config import load_model_config
from pipeline.config_json import ConfigError
from pipeline.generate import generate
from pipeline.models.factory import create_model_from_config
from pipeline.train_demos import DemoRenderer, ema_parameters, ema_weights, plan_demos

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
import trainkit  # noqa: E402
from trainkit import demo_audio, page_links  # noqa: E402

REPO = trainkit.REPO
DEMO_COND = [{"prompt": "slow", "seconds_start": 0, "seconds_total": 10},
             {"prompt": "fast", "seconds_start": 5, "seconds_total": 200},
             {"prompt": "odd one", "seconds_start": 30, "seconds_total": 60}]
"""Three demos on two ranks: rank 0 renders demos 0 and 2, rank 1 demo 1."""
CFG_SCALES = [1.0, 4.0]


def demo_config() -> dict:
    return trainkit.with_demos(trainkit.tiny_dit_config(), every=2, steps=3, cond=DEMO_COND, cfg_scales=CFG_SCALES,
                               seed=5)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("demos")
    ident = trainkit.write_vae(str(root / "vae.safetensors"))
    data = trainkit.write_latent_shards(str(root / "latents"), shards=1, per_shard=12, frames=24, valid_frames=20,
                                        properties=ident)
    val = trainkit.write_latent_shards(str(root / "val"), shards=1, per_shard=4, frames=16, seed=1, properties=ident)
    config = trainkit.write_json(str(root / "model.json"), demo_config())
    return {"root": root, "data": data, "val": val, "config": config}


def _launch(setup, out: str, name: str, max_steps: int, ds_config: str) -> None:
    argv = ["--ds_config", ds_config, "--model-config", setup["config"],
            "--data", setup["data"], "--val-data", setup["val"], "--val-every", "2", "--output", out,
            "--max-steps", str(max_steps), "--batch-size", "2", "--num-workers", "0", "--log-every", "1",
            "--checkpoint-every", "2", "--wandb", "off", "--scratch-dir", str(setup["root"] / f"scratch-{name}")]
    logs = str(setup["root"] / f"logs-{name}")
    codes = trainkit.wait_all(trainkit.launch(argv, log_dir=logs), logs)
    assert codes == [0, 0], trainkit.log_tail(logs, 0) + trainkit.log_tail(logs, 1)


@pytest.fixture(scope="module")
def runs(setup):
    """`first`: steps 1-4. `resumed`: a copy of first's step-2 checkpoint, resumed to step 4 with every parameter
    persistent (gathered for good after its first use), the other ZeRO-3 layout the EMA swap must handle."""
    zero3 = os.path.join(REPO, "ds_configs", "zero3_cpu.json")
    persistent = json.load(open(zero3))
    persistent["zero_optimization"]["stage3_param_persistence_threshold"] = 10 ** 9
    first = str(setup["root"] / "first")
    _launch(setup, first, "first", 4, zero3)
    resumed = str(setup["root"] / "resumed")
    ledger = manifest.read_ledger(os.path.join(first, "checkpoints", "manifest.json"))
    entry = ledger.at_step(2)
    shutil.copytree(entry.checkpoint_url, os.path.join(resumed, "checkpoints", entry.tag))
    moved = manifest.CheckpointEntry(step=2, tag=entry.tag, checkpoint_url=os.path.join(resumed, "checkpoints", entry.tag),
                                     export_url=os.path.join(resumed, "checkpoints", entry.tag, "ema.safetensors"),
                                     export_sha256=entry.export_sha256, ema=True)
    header = {k: getattr(ledger, k) for k in ("args", "input", "properties")}
    manifest.write_ledger(os.path.join(resumed, "checkpoints", "manifest.json"),
                          manifest.Ledger(stage="train", **header).add(moved))
    _launch(setup, resumed, "resumed", 4, trainkit.write_json(str(setup["root"] / "persistent.json"), persistent))
    return {"first": first, "resumed": resumed}


def _metrics(out: str) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.distributed
def test_both_ranks_render_demos_under_zero3_and_the_page_links_every_file(runs):
    demos = os.path.join(runs["first"], "demos")
    links = page_links(os.path.join(demos, "index.html"))
    # every step so far x demo x CFG, audio and spectrogram each
    assert len(links) == 2 * len(DEMO_COND) * len(CFG_SCALES) * 2
    for link in links:
        assert os.path.isfile(os.path.join(demos, link)), link
    ranks = {}
    for link in links:
        if link.endswith(".json") or not link.endswith(".flac"):
            continue
        info = json.loads(open(os.path.join(demos, link[:-len(".flac")] + ".json")).read())
        ranks[(info["step"], info["prompt_id"], info["cfg"])] = info["rank"]
        assert info["weights"] == "ema" and info["sampler"] == "v-ddim" and info["steps"] == 3
    assert sorted({s for s, _, _ in ranks}) == [2, 4]
    assert {r for r in ranks.values()} == {0, 1}
    assert all(r == int(pid[-2:]) % 2 for (_, pid, _), r in ranks.items())  # demo i on rank i % world
    index = json.loads(open(os.path.join(demos, "index.json")).read())
    assert [s["step"] for s in index["steps"]] == [2, 4]


@pytest.mark.distributed
def test_demos_equal_generate_on_the_exported_ema_model(setup, runs):
    """What makes render and train demos agree: the same generate(), the same EMA weights, seed demo_seed + i."""
    cfg = load_model_config(setup["config"])
    ledger = manifest.read_ledger(os.path.join(runs["first"], "checkpoints", "manifest.json"))
    for step in (2, 4):
        model = create_model_from_config(cfg)
        model.load_state_dict(load_file(ledger.at_step(step).export_url), strict=True)
        for i, cond in enumerate(DEMO_COND):
            for scale in CFG_SCALES:
                got, info = demo_audio(os.path.join(runs["first"], "demos", f"step-{step}", f"demo-{i:02d}",
                                                    f"cfg{scale:g}-seed{5 + i}"))
                assert info["seed"] == 5 + i
                ref = generate(model, [cond], [5 + i], steps=3, length=16, cfg_scale=scale, sampler="v-ddim").audio[0]
                assert got.shape == ref.shape == (1, 64)
                assert ref.abs().max() > 1e-3
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


@pytest.mark.distributed
def test_validation_losses_demos_and_training_are_identical_across_a_resume(runs):
    first = {r["step"]: r for r in _metrics(runs["first"]) if "val_loss" in r}
    resumed = {r["step"]: r for r in _metrics(runs["resumed"]) if "val_loss" in r}
    assert sorted(first) == [2, 4] and sorted(resumed) == [4]
    keys = [k for k in first[4] if k.startswith("val_loss")]
    assert len(keys) == 10  # the mean and t = 0.1 .. 0.9
    for k in keys:  # ZeRO-3 resumes to ~1e-7 in the weights; the noise and latents are the same draws
        assert resumed[4][k] == pytest.approx(first[4][k], abs=1e-6), k
    assert first[2]["val_loss"] != first[4]["val_loss"]  # it measures the model
    train_first = {r["step"]: r["loss"] for r in _metrics(runs["first"]) if "loss" in r}
    train_resumed = {r["step"]: r["loss"] for r in _metrics(runs["resumed"]) if "loss" in r}
    # first rendered demos at step 2 before training step 3, resumed did not: the trained weights came back
    for step in (3, 4):
        assert train_resumed[step] == pytest.approx(train_first[step], abs=1e-5)
    for i in range(len(DEMO_COND)):
        stem = f"step-4/demo-{i:02d}/cfg4-seed{5 + i}"
        a, _ = demo_audio(os.path.join(runs["first"], "demos", stem))
        b, _ = demo_audio(os.path.join(runs["resumed"], "demos", stem))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    index = json.loads(open(os.path.join(runs["resumed"], "demos", "index.json")).read())
    assert [s["step"] for s in index["steps"]] == [4]


# ------------------------------------------------------------------------------------ in-process, no DeepSpeed


def test_validation_neither_reads_nor_moves_the_training_rng(setup):
    from pipeline.data.latents import CropSpec, LatentLoader, ShardDataset, ShardRef
    from pipeline.diffusion.losses import DiffusionLoss
    from pipeline.diffusion.objectives import create_objective
    from pipeline.train_setup import validation_losses

    cfg = load_model_config(setup["config"])
    torch.manual_seed(0)
    model = create_model_from_config(cfg)
    model.pretransform = None
    val = manifest.read_manifest(setup["val"], stage="pre_encode")
    spec = CropSpec(frames=16, samples_per_frame=4, sample_rate=16000, random_crop=False)
    dataset = ShardDataset([ShardRef(o["url"], o["samples"]) for o in val.outputs], spec, seed=3,
                           cache_dir=str(setup["root"] / "val-cache"))

    def run():
        loader = LatentLoader(dataset, rank=0, world_size=1, batch_size=2, seed=3, num_workers=0)
        fn_for = lambda b: (lambda x, t: model(x, t, model.conditioner(b.metadata, "cpu")))  # noqa: E731
        return validation_losses(loader, fn_for, create_objective("v"), DiffusionLoss.from_config(None, False, 0.0),
                                 module=model, device=torch.device("cpu"), seed=3)

    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = run()
    assert torch.equal(torch.get_rng_state(), before)  # training RNG untouched
    torch.rand(1000)  # the training RNG moves on
    assert run() == a and model.training
    assert len(a) == 10 and all(v > 0 for v in a.values())


def _trained_model_and_ema(config: dict):
    from pipeline.distributed.ema import ShardedEMA

    torch.manual_seed(0)
    model = create_model_from_config(load_model_config(config))
    ema = ShardedEMA(ema_parameters(model), rank=0, world_size=1, beta=0.9, power=0.75, update_every=1)
    with torch.no_grad():
        for _ in range(5):  # "optimizer steps": the EMA copies the weights for 3 updates (SAT), then trails them
            for _, p in ema_parameters(model):
                p.add_(0.05 * torch.randn_like(p))
            ema.update()
    return model, ema


def test_ema_weights_are_swapped_in_and_the_trained_weights_come_back_bit_for_bit():
    model, ema = _trained_model_and_ema(demo_config())
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    shadow = {s.name: t for s, t in zip(ema.slices, ema.ema.shadow)}
    with ema_weights(model, ema):
        state = model.state_dict()
        for name, _ in ema_parameters(model):
            assert torch.equal(state[name].flatten(), shadow[name])
        assert not torch.equal(state["model.model.transformer.layers.0.self_attn.to_qkv.weight"],
                               trained["model.model.transformer.layers.0.self_attn.to_qkv.weight"])
        averaged = {name for name, _ in ema_parameters(model)}
        others = [k for k in state if k not in averaged]
        assert any(k.startswith("conditioner.") for k in others)  # the conditioners are not averaged (SAT)
        assert all(torch.equal(state[k], trained[k]) for k in others)
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())


def test_an_unconditional_model_renders_num_demos_samples_at_cfg_1(tmp_path):
    """One process, no torch.distributed: the renderer's world-size-1 path, and SAT's flat uncond layout."""
    tiny = trainkit.tiny_dit_config()
    config = {"model_type": "diffusion_uncond", "sample_size": 64, "sample_rate": 16000, "audio_channels": 1,
              "model": {"type": "dit", "pretransform": tiny["model"]["pretransform"],
                        "config": {"in_channels": 4, "embed_dim": 64, "depth": 1, "num_heads": 2}},
              "training": {"demo": {"demo_every": 1, "demo_steps": 2, "num_demos": 3}, "cantus": {"ema_beta": 0.9}}}
    cfg = load_model_config(config)
    model, ema = _trained_model_and_ema(config)
    plan = plan_demos(cfg, model.diffusion_objective)
    assert plan.cfg_scales == (1.0,) and [it.seed for it in plan.items] == [0, 1, 2]
    pretransform, model.pretransform = model.pretransform, None
    import wandb
    run = wandb.init(mode="offline", dir=str(tmp_path), project="cantus-test")
    demos = DemoRenderer(plan=plan, module=model, pretransform=pretransform, ema=ema, out=str(tmp_path),
                         device=torch.device("cpu"), dtype=torch.float32, scratch=str(tmp_path / "scratch"),
                         wandb_run=run)
    demos.render(7)
    run.finish()
    media = str(tmp_path / "wandb" / "offline-run-*" / "files" / "media")
    assert len(glob.glob(media + "/audio/demo/demo-0*/cfg1_*.flac")) == 3  # logged to W&B: audio and spectrogram
    assert len(glob.glob(media + "/images/demo/demo-0*/cfg1/mel_*.png")) == 3
    assert model.pretransform is None  # detached again
    links = page_links(str(tmp_path / "demos" / "index.html"))
    assert len(links) == 6 and all((tmp_path / "demos" / link).is_file() for link in links)
    got, info = demo_audio(str(tmp_path / "demos" / "step-7" / "demo-01" / "cfg1-seed1"))
    model.pretransform = pretransform
    with ema_weights(model, ema):
        ref = generate(model, [{}], [1], steps=2, length=16, sampler="v-ddim").audio[0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert info["prompt"] is None and "unconditional sample 1" in (tmp_path / "demos" / "index.html").read_text()


def test_a_conditioned_model_without_demo_cond_is_refused():
    config = demo_config()
    config["training"]["demo"] = {"demo_every": 2, "num_demos": 2}
    with pytest.raises(ConfigError, match="training.demo.demo_cond is empty"):
        plan_demos(load_model_config(config), "v")
    config["training"]["demo"] = {"demo_every": 2, "demo_cond": DEMO_COND}
    config["training"]["cantus"]["demo_sampler"] = "euler"
    with pytest.raises(ValueError, match="training.cantus.demo_sampler='euler'.*rectified_flow"):
        plan_demos(load_model_config(config), "v")
