"""`python -m pipeline.export` from a ledger, a checkpoint folder or a .safetensors (one 1-rank training run)."""
import json
import os
import re
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline import manifest
from pipeline.export import main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
import trainkit  # noqa: E402


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    ident = trainkit.write_vae(str(root / "vae.safetensors"))
    data = trainkit.write_latent_shards(str(root / "latents"), shards=1, per_shard=8, frames=16, properties=ident)
    config = trainkit.write_json(str(root / "model.json"), trainkit.tiny_dit_config())
    out = str(root / "out")
    argv = ["--ds_config", os.path.join(trainkit.REPO, "ds_configs", "zero2_cpu.json"), "--model-config", config,
            "--data", data, "--output", out, "--max-steps", "6", "--batch-size", "2", "--num-workers", "0",
            "--checkpoint-every", "3", "--wandb", "off", "--scratch-dir", str(root / "scratch"),
            "--val-data", data, "--val-every", "3"]
    procs = trainkit.launch(argv, world=1, log_dir=str(root / "logs"))
    assert trainkit.wait_all(procs, str(root / "logs")) == [0], trainkit.log_tail(str(root / "logs"))
    return {"root": root, "config": config, "ledger": os.path.join(out, "checkpoints", "manifest.json"), "out": out}


def _read(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        return load_file(path), f.metadata()


@pytest.mark.distributed
def test_ledger_and_folder_exports_equal_the_recorded_ema_file(run, tmp_path):
    ledger = manifest.read_ledger(run["ledger"])
    assert [c.step for c in ledger.checkpoints] == [3, 6]
    recorded = load_file(ledger.at_step(3).export_url)
    assert main(["--checkpoint", run["ledger"], "--step", "3", "--out", str(tmp_path / "a.safetensors")]) == 0
    assert main(["--checkpoint", ledger.at_step(3).checkpoint_url, "--out", str(tmp_path / "b.safetensors")]) == 0
    for name in ("a", "b"):
        tensors, meta = _read(str(tmp_path / f"{name}.safetensors"))
        assert tensors.keys() == recorded.keys() and all(torch.equal(tensors[k], recorded[k]) for k in recorded)
        assert json.loads(meta["model_config"]) == json.load(open(run["config"])) and meta["cantus_weights"] == "ema"


@pytest.mark.distributed
def test_no_ema_exports_the_raw_weights_in_the_same_layout(run, tmp_path):
    ema = load_file(manifest.read_ledger(run["ledger"]).at_step().export_url)
    assert main(["--checkpoint", run["ledger"], "--no-ema", "--out", str(tmp_path / "raw.safetensors")]) == 0
    raw, meta = _read(str(tmp_path / "raw.safetensors"))
    assert raw.keys() == ema.keys() and meta["cantus_weights"] == "raw"
    backbone = [k for k in raw if k.startswith("model.") and not torch.equal(raw[k], ema[k])]
    assert len(backbone) > 10  # the EMA (beta 0.9) lags the raw weights
    assert all(torch.equal(raw[k], ema[k]) for k in raw if k.startswith(("conditioner.", "pretransform.")))


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_a_file_without_config_needs_model_config_and_the_layout_is_checked(run, tmp_path, capsys):
    ema = load_file(manifest.read_ledger(run["ledger"]).at_step().export_url)
    bare = str(tmp_path / "bare.safetensors")
    save_file(ema, bare)
    assert main(["--checkpoint", bare, "--out", str(tmp_path / "x.safetensors")]) == 2
    assert re.search("no model config.*--model-config", _one_line_error(capsys))
    assert main(["--checkpoint", bare, "--model-config", run["config"], "--out", str(tmp_path / "x.safetensors")]) == 0
    save_file({k: v for k, v in ema.items() if not k.startswith("conditioner.")}, bare)
    out = ["--checkpoint", bare, "--model-config", run["config"], "--out", str(tmp_path / "y.safetensors")]
    assert main(out) == 2
    assert re.search(f"{bare}: the weights do not match the model config: [1-9][0-9]* missing", _one_line_error(capsys))
    with pytest.raises(ValueError, match="do not match the model config"):
        main([*out, "--debug"])  # --debug: the exception itself, with its traceback
    name = "model.model.to_timestep_embed.0.weight"
    save_file({**ema, name: torch.zeros(3, 3)}, bare)
    assert main(out) == 2
    assert f"1 of another shape (e.g. {name} is [3, 3], expected [" in _one_line_error(capsys)
    assert not os.path.exists(tmp_path / "y.safetensors")


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_export_or_config_is_one_line_naming_the_file(run, tmp_path, capsys, damage):
    good = manifest.read_ledger(run["ledger"]).at_step().export_url
    data = open(good, "rb").read()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:len(data) - 100] if damage == "truncated" else b"\x00garbage" * 100)
    assert main(["--checkpoint", str(bad), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert f"{bad}: not a readable .safetensors file" in _one_line_error(capsys)
    config = tmp_path / "model.json"
    config.write_text("{not json" if damage == "garbage" else json.dumps({"model_type": "diffusion_cond"}))
    assert main(["--checkpoint", good, "--model-config", str(config), "--out", str(tmp_path / "x.safetensors")]) == 2
    assert str(config) in _one_line_error(capsys)
    assert main(["--checkpoint", str(tmp_path / "nope"), "--no-ema", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "nope/ema.safetensors: no such file" in _one_line_error(capsys)
    assert not os.path.exists(tmp_path / "x.safetensors")


def test_an_export_changed_after_the_ledger_was_written_is_refused(run, tmp_path, capsys):
    led = str(tmp_path / "ckpts")
    shutil.copytree(os.path.dirname(run["ledger"]), led)
    ledger = manifest.read_ledger(run["ledger"])
    entry = ledger.at_step()
    copy = os.path.join(led, entry.tag, "ema.safetensors")
    tensors = load_file(copy)
    tensors[next(iter(tensors))] += 1
    save_file(tensors, copy)
    moved = manifest.Ledger(stage="train", args=ledger.args, input=ledger.input, properties=ledger.properties,
                            checkpoints=(manifest.CheckpointEntry(
                                step=entry.step, tag=entry.tag, checkpoint_url=os.path.join(led, entry.tag),
                                export_url=copy, export_sha256=entry.export_sha256, ema=True),))
    manifest.write_ledger(os.path.join(led, "manifest.json"), moved)
    assert main(["--checkpoint", os.path.join(led, "manifest.json"), "--out", str(tmp_path / "z.safetensors")]) == 2
    assert re.search("sha256 .* differs from the ledger", _one_line_error(capsys))


@pytest.mark.distributed
def test_validation_loss_is_logged_at_fixed_timesteps(run):
    rows = [json.loads(line) for line in open(os.path.join(run["out"], "metrics.jsonl"))]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [3, 6]
    assert all(len([k for k in r if k.startswith("val_loss_t")]) == 9 for r in val)
    assert val[0]["val_loss"] == pytest.approx(sum(val[0][f"val_loss_t{t / 10:.1f}"] for t in range(1, 10)) / 9)
    assert val[0]["val_loss"] != val[1]["val_loss"]
