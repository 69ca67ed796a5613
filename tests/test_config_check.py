"""`python -m pipeline.config check` (pipeline/config_check.py): the summary, the meta-device build, exit codes."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import load_model_config
from pipeline.config_check import main
from test_config import MODEL_CONFIGS, SAO, _mutated  # tests/ is on sys.path (conftest)


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
    code = ("import resource, sys\nfrom pipeline.config_check import main\nrc = main(['check', sys.argv[1]])\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\nsys.exit(rc)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert re.fullmatch(r"error: .*huge\.json: the model has [0-9.e+]+ parameters \([0-9.e+]+ TiB of fp32 weights\), "
                        r"more than 1e\+12: it cannot be allocated; .*\n", proc.stderr)
    peak_kib = int(proc.stdout.split()[-1])
    assert peak_kib < 3 * 2**20  # under 3 GiB, for weights of more than 1e12 x 4 bytes
