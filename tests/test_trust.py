"""No code from data: a hostile file read from storage never runs code, and each refusal is one line, exit 2.

Every hostile file is built here, at run time. A pickle whose unpickling creates a marker file is put, in turn,
under each name DeepSpeed writes in a real checkpoint folder and read by train resume and by export (with and
without --no-ema), and given as `.ckpt`/`.pt` to every option that takes one. A safetensors whose embedded
model_config names a module of the working directory as hf_text `model_path` is given to render, probe, export
and --pretrained-ckpt. No marker may appear.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from pipeline import export

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
import trainkit  # noqa: E402

REPO = trainkit.REPO
TAG = "step-000000002"
HOSTILE_MODULE = "cantus_hostile_encoder"


class WritesMarker:
    """Unpickling this object opens (creates) `path`: a stand-in for any code a pickle can run."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_pickle(path: str, marker: str) -> None:
    torch.save({"module": {"w": torch.ones(2)}, "optimizer_state_dict": WritesMarker(marker)}, path)


def one_error_line(text: str) -> str:
    """The only `error: ` line of a stage's output (stderr or a rank log); no traceback."""
    lines = [line for line in text.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("trust")
    ident = trainkit.write_vae(str(root / "vae.safetensors"))
    data = trainkit.write_latent_shards(str(root / "latents"), shards=1, per_shard=8, frames=16, properties=ident)
    config = trainkit.write_json(str(root / "model.json"), trainkit.tiny_dit_config())
    return {"root": root, "data": data, "config": config, "vae": str(root / "vae.safetensors")}


def _train_argv(setup, out, zero: int, max_steps: int, *extra) -> list[str]:
    return ["--ds_config", os.path.join(REPO, "ds_configs", f"zero{zero}_cpu.json"), "--model-config", setup["config"],
            "--data", setup["data"], "--output", str(out), "--max-steps", str(max_steps), "--batch-size", "2",
            "--num-workers", "0", "--checkpoint-every", "2", "--wandb", "off", *extra]


def _train(setup, argv, logs: str, style: str = "torchrun", env: dict | None = None) -> tuple[int, str]:
    procs = trainkit.launch(argv, world=1, style=style, log_dir=logs, env=env)
    code = trainkit.wait_all(procs, logs)[0]
    with open(os.path.join(logs, "rank-0.log")) as f:
        return code, f.read()


@pytest.fixture(scope="module")
def trained(setup):
    """One real checkpoint (step 2) under ZeRO-2 and under ZeRO-3, one rank each."""
    outs = {}
    for zero in (2, 3):
        out = setup["root"] / f"zero{zero}"
        code, log = _train(setup, _train_argv(setup, out, zero, 2, "--scratch-dir", str(setup["root"] / f"s{zero}")),
                           str(setup["root"] / f"logs-{zero}"))
        assert code == 0, log[-3000:]
        outs[zero] = out
    return outs


@pytest.mark.distributed
def test_the_planted_names_are_every_pickle_deepspeed_wrote(trained):
    pickles = {z: sorted(n for n in os.listdir(out / "checkpoints" / TAG) if n.endswith(".pt"))
               for z, out in trained.items()}
    assert pickles == {2: ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"],
                       3: ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"]}


@pytest.mark.distributed
@pytest.mark.parametrize("zero, name", [(2, "mp_rank_00_model_states.pt"), (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                        (3, "zero_pp_rank_0_mp_rank_00_model_states.pt"),
                                        (3, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_a_pickle_planted_in_a_checkpoint_never_runs_on_resume_or_export(setup, trained, tmp_path, capsys, zero, name):
    out = tmp_path / "out"
    shutil.copytree(trained[zero], out)
    folder = out / "checkpoints" / TAG
    marker = str(tmp_path / "marker")
    plant_pickle(str(folder / name), marker)
    refusal = f"{folder / name}: refused to load: it asks for the Python object `io.open`"

    assert export.main(["--checkpoint", str(folder), "--out", str(tmp_path / "ema.safetensors")]) == 0  # reads no pickle
    capsys.readouterr()
    assert export.main(["--checkpoint", str(folder), "--no-ema", "--out", str(tmp_path / "raw.safetensors")]) == 2
    assert refusal in one_error_line(capsys.readouterr().err)

    code, log = _train(setup, _train_argv(setup, out, zero, 4, "--scratch-dir", str(tmp_path / "scratch")),
                       str(tmp_path / "logs"))
    assert code == 2 and refusal in one_error_line(log)
    assert not os.path.exists(marker) and not os.path.exists(tmp_path / "raw.safetensors")


BF16_SCRIPT = """
import sys
import torch
import deepspeed
from pipeline.distributed import checkpoint
from pipeline.export import _raw_weights

mode, root = sys.argv[1], sys.argv[2]
deepspeed.init_distributed("gloo")
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
ds = {"train_batch_size": 1, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
state = dict(local_root=root, tag="step-000000002", rank=0, world_size=1, config_sha256="x", generators={}, ema=None)
if mode == "save":
    for _ in range(2):
        engine.backward(engine(torch.randn(1, 8, dtype=torch.bfloat16)).float().square().sum())
        engine.step()
    checkpoint.save(engine, step=2, client={}, **state)
    save = {k: v.float() for k, v in engine.module.state_dict().items()}
    torch.save(save, root + "/reference.pt")
    sys.exit(0)
try:
    checkpoint.load(engine, **state)
    raw = _raw_weights(root + "/step-000000002", root)
except ValueError as e:
    print(f"error: {e}")
    sys.exit(2)
ref = torch.load(root + "/reference.pt", weights_only=True)
assert all(torch.equal(engine.module.state_dict()[k].float(), ref[k]) for k in ref)
assert all(torch.allclose(raw[k], ref[k], rtol=1e-2, atol=1e-2) for k in ref)  # fp32 master vs bf16 weights
print("restored")
"""


@pytest.mark.distributed
def test_bf16_optimizer_states_load_with_the_allowlist_and_a_planted_one_never_runs(tmp_path):
    """Our tiny DiT does not train in bf16 on CPU, so a two-layer DeepSpeed engine (ZeRO-2, bf16) writes the
    `bf16_zero_pp_rank_*` files through our checkpoint.save; load and export go through our code."""
    env = trainkit.train_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(trainkit.free_port()))

    def run(mode: str, root) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", BF16_SCRIPT, mode, str(root)], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)

    root = tmp_path / "ckpt"
    saved = run("save", root)
    assert saved.returncode == 0, saved.stderr[-3000:]
    names = sorted(n for n in os.listdir(root / TAG) if n.endswith(".pt"))
    assert names == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"]
    hostile = tmp_path / "hostile"
    shutil.copytree(root, hostile)
    clean = run("load", root)
    assert clean.returncode == 0 and clean.stdout.splitlines()[-1] == "restored", clean.stderr[-3000:]
    marker = str(tmp_path / "marker")
    plant_pickle(str(hostile / TAG / names[0]), marker)
    refused = run("load", hostile)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert f"{hostile / TAG / names[0]}: refused to load: it asks for the Python object `io.open`" in \
        one_error_line(refused.stdout)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("ext", [".ckpt", ".pt"])
def test_a_hostile_pickle_given_to_an_option_never_runs(setup, tmp_path, ext):
    marker = str(tmp_path / "marker")
    hostile = str(tmp_path / f"hostile{ext}")
    plant_pickle(hostile, marker)
    base = _train_argv(setup, tmp_path / "out", 2, 2, "--dry-run", "--scratch-dir", str(tmp_path / "scratch"))
    for option in ("--pretransform-ckpt", "--pretrained-ckpt"):
        code, log = _train(setup, [*base, option, hostile], str(tmp_path / f"logs{option}"), style="none")
        assert code == 2 and f"{hostile}: refused to load" in one_error_line(log), option
    audio = trainkit.write_audio_shards(str(tmp_path / "audio"), shards=1, per_shard=2, channels=1, samples=256,
                                        sample_rate=16000)
    proc = subprocess.run([sys.executable, "-m", "pipeline.pre_encode", "run", "--input", audio, "--model-config",
                           setup["config"], "--pretransform-ckpt", hostile, "--output", str(tmp_path / "latents"),
                           "--num-workers", "0"], env=trainkit.train_env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and f"{hostile}: refused to load" in one_error_line(proc.stderr)
    assert not os.path.exists(marker)


@pytest.fixture
def hostile_export(setup, tmp_path):
    """A safetensors with the tiny model's own tensors whose embedded model_config adds an hf_text conditioner
    with `model_path` naming a module in the working directory that would create a marker when imported."""
    from pipeline.models.factory import create_model_from_config

    workdir = tmp_path / "work"
    workdir.mkdir()
    marker = tmp_path / "marker"
    (workdir / f"{HOSTILE_MODULE}.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    env = trainkit.train_env(PYTHONPATH=os.pathsep.join([REPO, str(workdir)]))
    trap = subprocess.run([sys.executable, "-c", f"import {HOSTILE_MODULE}"], env=env, cwd=workdir)
    assert trap.returncode == 0 and marker.exists()  # the trap is armed: importing the name runs the module
    marker.unlink()

    config = trainkit.tiny_dit_config()
    tensors = {k: v.contiguous() for k, v in create_model_from_config(config).state_dict().items()}
    config["model"]["conditioning"]["configs"].append(
        {"id": "prompt", "type": "hf_text", "config": {"model_path": HOSTILE_MODULE, "dim": 384}})
    config["model"]["diffusion"]["cross_attention_cond_ids"].append("prompt")
    path = str(tmp_path / "hostile.safetensors")
    save_file(tensors, path, metadata={"model_config": json.dumps(config), "format": "pt", "cantus_weights": "ema"})
    return {"path": path, "marker": marker, "env": env, "workdir": workdir}


def test_a_config_embedded_in_a_checkpoint_never_imports_a_module(setup, tmp_path, hostile_export):
    h = hostile_export
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "a flute", "seconds_start": 0, "seconds_total": 1}) + "\n")
    commands = {
        "render": ["-m", "pipeline.render", "run", "--checkpoints", h["path"], "--prompts", str(prompts),
                   "--output", str(tmp_path / "render"), "--steps", "2"],
        "probe": ["-m", "pipeline.probe", "--checkpoint", h["path"], "--data", setup["data"], "--num-clips", "2",
                  "--num-prompts", "0"],
        "export": ["-m", "pipeline.export", "--checkpoint", h["path"], "--out", str(tmp_path / "x.safetensors")],
    }
    for name, argv in commands.items():
        proc = subprocess.run([sys.executable, *argv], env=h["env"], cwd=h["workdir"], capture_output=True, text=True)
        assert proc.returncode == 2, (name, proc.stderr[-3000:])
        assert f'model.conditioning.configs[2].config.model_path="{HOSTILE_MODULE}": expected a local folder' in \
            one_error_line(proc.stderr), name
        assert h["path"] in one_error_line(proc.stderr), name
    # --pretrained-ckpt takes tensors only: the embedded config is never parsed, the matching tensors load.
    code, log = _train(setup, _train_argv(setup, tmp_path / "out", 2, 2, "--dry-run", "--pretrained-ckpt", h["path"],
                                          "--scratch-dir", str(tmp_path / "scratch")),
                       str(tmp_path / "logs"), style="none", env={"PYTHONPATH": h["env"]["PYTHONPATH"]})
    assert code == 0, log[-3000:]
    assert not h["marker"].exists() and not os.path.exists(tmp_path / "x.safetensors")
