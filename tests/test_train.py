"""The train stage on 2 CPU ranks (gloo): ZeRO stages agree, resume is exact, a signal stops every rank.

DeepSpeed launches are expensive (~20 s each here), so module fixtures run each configuration once and the
tests compare their outputs.
"""
import json
import os
import re
import signal
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from pipeline import manifest, storage
from pipeline.train import main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
import trainkit  # noqa: E402

REPO = trainkit.REPO


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    ident = trainkit.write_vae(str(root / "vae.safetensors"))
    data = trainkit.write_latent_shards(str(root / "latents"), shards=1, per_shard=18, frames=24,
                                        valid_frames=20, properties=ident)
    config = trainkit.write_json(str(root / "model.json"), trainkit.tiny_dit_config())
    return {"root": root, "data": data, "config": config, "vae": str(root / "vae.safetensors")}


def _argv(setup, out, zero, max_steps, *extra):
    return ["--ds_config", os.path.join(REPO, "ds_configs", f"zero{zero}_cpu.json"), "--model-config", setup["config"],
            "--data", setup["data"], "--output", out, "--max-steps", str(max_steps), "--batch-size", "2",
            "--num-workers", "1", "--log-every", "1", "--wandb", "off", *extra]


def _run(setup, name, zero, max_steps, *extra, style="torchrun", out=None):
    out = out or str(setup["root"] / name)
    logs = str(setup["root"] / f"logs-{name}-{max_steps}")
    procs = trainkit.launch(_argv(setup, out, zero, max_steps, "--scratch-dir", str(setup["root"] / f"scratch-{name}"),
                                  *extra), style=style, log_dir=logs)
    codes = trainkit.wait_all(procs, logs)
    assert codes == [0, 0], trainkit.log_tail(logs, 0) + trainkit.log_tail(logs, 1)
    return out


@pytest.fixture(scope="module")
def zero0(setup):
    return _run(setup, "zero0", 0, 10, "--checkpoint-every", "10", "--keep-scratch")


@pytest.fixture(scope="module")
def zero2(setup):
    """20 uninterrupted steps, started the SLURM way (SLURM_PROCID/NTASKS/LOCALID)."""
    return _run(setup, "zero2", 2, 20, "--checkpoint-every", "5", "--keep-last", "2", style="slurm")


@pytest.fixture(scope="module")
def zero3(setup):
    """10 steps, then a second launch that resumes to 20."""
    out = _run(setup, "zero3", 3, 10, "--checkpoint-every", "10")
    first = trainkit.losses(out)
    _run(setup, "zero3", 3, 20, "--checkpoint-every", "10")
    return out, first


@pytest.mark.distributed
def test_zero_0_2_3_give_the_same_losses_for_10_steps(zero0, zero2, zero3):
    a, b, c = trainkit.losses(zero0), trainkit.losses(zero2), zero3[1]
    assert sorted(a) == list(range(1, 11))
    for step in range(1, 11):
        assert b[step] == pytest.approx(a[step], abs=1e-5) and c[step] == pytest.approx(a[step], abs=1e-5)
    assert a[1] != a[10]  # it trains


@pytest.mark.distributed
def test_zero3_resume_continues_within_1e_5(zero2, zero3):
    b, c = trainkit.losses(zero2), trainkit.losses(zero3[0])
    assert sorted(c) == list(range(1, 21))
    for step in range(11, 21):
        assert c[step] == pytest.approx(b[step], abs=1e-5)


@pytest.mark.distributed
@pytest.mark.parametrize("zero", [2, 3])
def test_compiled_blocks_give_the_eager_losses_for_5_steps(setup, request, zero):
    """--compile (regional torch.compile) under ZeRO-2 and under ZeRO-3's parameter hooks, with activation
    checkpointing on every block (the default), against the eager runs of the same seed."""
    eager = trainkit.losses(request.getfixturevalue("zero2") if zero == 2 else request.getfixturevalue("zero3")[0])
    out = _run(setup, f"compiled-zero{zero}", zero, 5, "--checkpoint-every", "5", "--compile")
    compiled = trainkit.losses(out)
    assert sorted(compiled) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        assert compiled[step] == pytest.approx(eager[step], abs=1e-5)


@pytest.mark.distributed
def test_ema_exports_agree_across_zero_stages_and_load_into_the_sat_layout(setup, zero0, zero2, zero3):
    from pipeline.config import load_model_config
    from pipeline.models.factory import create_model_from_config

    cfg = load_model_config(setup["config"])
    led = {name: manifest.read_ledger(os.path.join(out, "checkpoints", "manifest.json"))
           for name, out in (("z0", zero0), ("z2", zero2), ("z3", zero3[0]))}
    z0 = load_file(led["z0"].at_step(10).export_url)
    z3_10 = load_file(led["z3"].at_step(10).export_url)
    z2_20, z3_20 = load_file(led["z2"].at_step(20).export_url), load_file(led["z3"].at_step(20).export_url)
    model = create_model_from_config(cfg)
    assert set(z0) == set(model.state_dict())  # SAT's unwrapped layout, pretransform.* and conditioner.* included
    for name in z0:
        assert torch.allclose(z0[name], z3_10[name], atol=1e-5), name
        assert torch.allclose(z2_20[name], z3_20[name], atol=1e-5), name
    vae = load_file(setup["vae"])
    assert all(torch.equal(z0["pretransform.model." + k], v) for k, v in vae.items())  # copied unchanged
    # the EMA is not the raw weights, and it equals the consolidated per-rank shards
    from pipeline.distributed.ema import consolidate
    tag = led["z3"].at_step(20).checkpoint_url
    shards = consolidate([os.path.join(tag, f"ema-rank-{r:05d}.safetensors") for r in range(2)])
    assert all(torch.equal(z3_20[k], v) for k, v in shards.items()) and len(shards) > 10
    # loading the export reproduces the EMA model's outputs exactly
    model.load_state_dict(z3_20, strict=True)
    x, t = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0.3, 0.8])
    cond = model.conditioner([{"seconds_start": 1, "seconds_total": 9}] * 2, "cpu")
    other = create_model_from_config(cfg)
    other.load_state_dict({**{k: v.clone() for k, v in z3_20.items()}, **{k: v for k, v in shards.items()}})
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, cond), other.eval()(x, t, cond))


@pytest.mark.distributed
def test_keep_last_leaves_the_newest_checkpoints_and_removes_the_rest(zero2):
    ledger = manifest.read_ledger(os.path.join(zero2, "checkpoints", "manifest.json"))
    assert [c.step for c in ledger.checkpoints] == [15, 20]
    assert not os.path.exists(os.path.join(zero2, "checkpoints", "step-000000010"))
    for c in ledger.checkpoints:
        assert storage.sha256_url(c.export_url) == c.export_sha256 and c.ema
    config = json.load(open(os.path.join(zero2, "config.json")))
    assert config["sha256"] == ledger.properties["model_config_sha256"]


@pytest.mark.distributed
def test_a_finished_run_removes_its_scratch_folder_unless_keep_scratch(setup, zero0, zero2):
    assert not os.path.exists(setup["root"] / "scratch-zero2")
    assert os.path.isdir(setup["root"] / "scratch-zero0")  # --keep-scratch


@pytest.mark.distributed
def test_sigusr1_to_one_rank_checkpoints_both_exits_75_and_resumes_exactly(setup, zero2, s3_bucket):
    """On an S3 output: staged checkpoint files uploaded per rank, fetched back on resume."""
    out = f"s3://{s3_bucket}/train-signal"
    logs = str(setup["root"] / "logs-signal")
    argv = _argv(setup, out, 2, 20, "--checkpoint-every", "100", "--scratch-dir", str(setup["root"] / "scratch-sig"))
    procs = trainkit.launch(argv, log_dir=logs)
    metrics = str(setup["root"] / "scratch-sig" / "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and len(open(metrics).read().splitlines()) >= 3):
        assert time.time() < deadline and all(p.poll() is None for p in procs), trainkit.log_tail(logs, 0)
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGUSR1)
    codes = trainkit.wait_all(procs, logs)
    assert codes == [75, 75], trainkit.log_tail(logs, 0) + trainkit.log_tail(logs, 1)
    ledger = manifest.read_ledger(f"{out}/checkpoints/manifest.json")
    stopped = ledger.at_step().step
    assert 3 <= stopped < 20
    files = json.loads(storage.read_bytes(f"{out}/checkpoints/{ledger.at_step().tag}/files.json"))
    assert {"rank-00000.safetensors", "rank-00001.safetensors", "ema.safetensors"} <= set(files)
    procs = trainkit.launch(argv, log_dir=logs + "-resume")
    assert trainkit.wait_all(procs, logs) == [0, 0], trainkit.log_tail(logs + "-resume", 0)
    got = {r["step"]: r["loss"] for r in map(json.loads, storage.read_bytes(f"{out}/metrics.jsonl").decode().splitlines())}
    ref = trainkit.losses(zero2)
    assert sorted(got) == list(range(1, 21))
    assert [got[s] for s in range(stopped + 1, 21)] == [ref[s] for s in range(stopped + 1, 21)]  # ZeRO-2: exact
    final = load_file_url(manifest.read_ledger(f"{out}/checkpoints/manifest.json").at_step(20).export_url, setup)
    z2 = load_file(manifest.read_ledger(os.path.join(zero2, "checkpoints", "manifest.json")).at_step(20).export_url)
    assert all(torch.equal(final[k], z2[k]) for k in z2)
    assert not os.path.exists(setup["root"] / "scratch-sig")  # staged checkpoints, cached shards: all gone


def load_file_url(url, setup):
    path = str(setup["root"] / "download.safetensors")
    storage.download(url, path)
    return load_file(path)


def test_latents_of_another_pretransform_are_refused(setup, tmp_path):
    import signal
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    other = trainkit.write_vae(str(tmp_path / "other.safetensors"), seed=1)
    argv = _argv(setup, str(tmp_path / "out"), 2, 5, "--dry-run")
    assert main(argv) == 0  # the matching VAE passes
    with pytest.raises(ValueError, match="another pretransform.*weights_sha256"):
        main([*argv, "--pretransform-ckpt", other["weights_url"]])
    # neither the dry run nor the refusal leaves train's stop-signal handlers in this process
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    scaled = trainkit.write_json(str(tmp_path / "scaled.json"), trainkit.tiny_dit_config(scale=2.0))
    with pytest.raises(ValueError, match="another pretransform.*scale"):
        main([*argv, "--model-config", scaled])


def test_an_sat_pre_encoded_dataset_config_is_accepted_and_an_audio_one_is_refused(setup, tmp_path):
    import numpy as np
    (tmp_path / "pre").mkdir()
    for i in range(4):
        np.save(tmp_path / "pre" / f"{i}.npy", np.zeros((4, 20), dtype=np.float32))
        (tmp_path / "pre" / f"{i}.json").write_text(json.dumps({"seconds_start": 0, "seconds_total": 5}))
    sat = trainkit.write_json(str(tmp_path / "sat.json"), {"dataset_type": "pre_encoded",
                                                          "datasets": [{"id": "x", "path": str(tmp_path / "pre")}]})
    argv = _argv(setup, str(tmp_path / "out"), 2, 5, "--dry-run", "--pretransform-ckpt", setup["vae"])
    assert main([*argv, "--data", sat]) == 0
    audio = trainkit.write_json(str(tmp_path / "audio.json"), {"dataset_type": "audio_dir",
                                                              "datasets": [{"id": "x", "path": str(tmp_path)}]})
    with pytest.raises(ValueError, match="holds audio; shard and pre-encode it"):
        main([*argv, "--data", audio])


def test_pretrained_checkpoints_load_strictly_unless_allow_partial(setup, tmp_path):
    from safetensors.torch import save_file

    from pipeline.models.factory import create_model_from_config
    from pipeline.train_setup import load_pretrained
    torch.manual_seed(1)
    source = {k: v.clone() for k, v in create_model_from_config(setup["config"]).state_dict().items()}
    name = "model.model.to_timestep_embed.0.weight"
    source[name] = torch.zeros(3, 3)  # another shape
    del source["model.model.postprocess_conv.weight"]
    path = str(tmp_path / "pretrained.safetensors")
    save_file(source, path)
    torch.manual_seed(2)
    model = create_model_from_config(setup["config"])
    with pytest.raises(ValueError, match="(?s)1 missing, 1 of another shape, 0 unused.*"
                                         "postprocess_conv.weight.*to_timestep_embed.0.weight.*--allow-partial"):
        load_pretrained(model, path, allow_partial=False)
    before = model.state_dict()[name].clone()
    load_pretrained(model, path, allow_partial=True)
    after = model.state_dict()
    assert torch.equal(after[name], before)  # the mismatched tensor keeps its init
    key = "model.model.transformer.layers.0.self_attn.to_qkv.weight"
    assert key in after and torch.equal(after[key], source[key])


def _stderr_lines(logs: str, rank: int = 0) -> list[str]:
    return [line for line in trainkit.log_tail(logs, rank, n=20000).splitlines() if line.startswith("error: ")]


@pytest.mark.distributed
@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_second_trainer_on_one_output_exits_2_naming_the_holder(setup, backend, request):
    """Two real trainers (one rank each) on one output: the second exits 2 with one line naming the first; the
    first, stopped by a signal, releases its lease."""
    if backend == "s3":
        out = f"s3://{request.getfixturevalue('s3_bucket')}/two-trainers"
    else:
        out = str(setup["root"] / "two-trainers")
    first_logs, second_logs = str(setup["root"] / f"logs-first-{backend}"), str(setup["root"] / f"logs-second-{backend}")
    argv = _argv(setup, out, 2, 100000, "--checkpoint-every", "100000")
    first = trainkit.launch([*argv, "--scratch-dir", str(setup["root"] / f"scratch-first-{backend}")], world=1,
                            log_dir=first_logs, env={"SLURM_JOB_ID": "1001", "SLURM_RESTART_COUNT": "0"})
    try:
        lease_url = storage.join(out, "_lease.json")
        deadline = time.time() + 900  # a cold DeepSpeed op build on a loaded machine takes minutes
        while not storage.exists(lease_url):
            assert time.time() < deadline and first[0].poll() is None, trainkit.log_tail(first_logs, 0)
            time.sleep(0.2)
        second = trainkit.launch([*argv, "--scratch-dir", str(setup["root"] / f"scratch-second-{backend}")], world=1,
                                 log_dir=second_logs, env={"SLURM_JOB_ID": "1002", "SLURM_RESTART_COUNT": "0"})
        assert trainkit.wait_all(second, second_logs) == [2], trainkit.log_tail(second_logs, 0)
        line, = _stderr_lines(second_logs)
        assert re.match(rf"error: {re.escape(lease_url)}: output held by SLURM job 1001 \(restart 0\) on host .*, "
                        rf"pid {first[0].pid}, last heartbeat \d+ s ago", line), line
        assert "Traceback" not in trainkit.log_tail(second_logs, 0, n=20000)
        assert first[0].poll() is None  # the holder trains on
    finally:
        first[0].send_signal(signal.SIGUSR1)
    assert trainkit.wait_all(first, first_logs) == [75], trainkit.log_tail(first_logs, 0)
    assert not storage.exists(lease_url)  # released on the way out


@pytest.mark.distributed
def test_a_killed_s3_server_makes_train_exit_75_and_the_requeued_run_resumes(setup, tmp_path, monkeypatch):
    """A private S3 server, SIGKILLed while train runs (after its first checkpoint): the next upload makes no
    progress for CANTUS_S3_STALL_SECONDS, train exits 75 with one line; the server comes back on the same port and
    data, and the requeued job (same SLURM_JOB_ID, restart count 1) takes its own lease over and resumes."""
    import s3server

    server = s3server.start(str(tmp_path / "weed"))
    port = int(server.endpoint.rsplit(":", 1)[1])
    env = {**server.env(), "CANTUS_S3_STALL_SECONDS": "6", "SLURM_JOB_ID": "3003"}
    for k, v in server.env().items():
        monkeypatch.setenv(k, v)
    storage.reset()
    try:
        storage._client().create_bucket(Bucket="outage")
        out, scratch = "s3://outage/run", str(tmp_path / "scratch")
        argv = _argv(setup, out, 2, 100000, "--checkpoint-every", "3", "--scratch-dir", scratch)
        logs = str(tmp_path / "logs-outage")
        procs = trainkit.launch(argv, world=1, log_dir=logs, env={**env, "SLURM_RESTART_COUNT": "0"})
        deadline = time.time() + 300
        while not storage.exists(f"{out}/checkpoints/manifest.json"):
            assert time.time() < deadline and procs[0].poll() is None, trainkit.log_tail(logs, 0)
            time.sleep(0.2)
        os.kill(server.pid, signal.SIGKILL)
        os.waitpid(server.pid, 0)
        assert trainkit.wait_all(procs, logs, timeout=300) == [75], trainkit.log_tail(logs, 0)
        text = trainkit.log_tail(logs, 0, n=100000)
        assert re.search(r"WARNING pipeline\.storage: s3://outage/run/\S+: \w+.* attempt 1 failed", text)
        line, = _stderr_lines(logs)
        assert re.match(r"error: s3://outage/run/\S+: no progress for \d+ s \(.*\); stopped by "
                        r"CANTUS_S3_STALL_SECONDS=6$", line), line
        assert "Traceback" not in text

        server = s3server.start(str(tmp_path / "weed"), port=port)  # back, with its data
        storage.reset()
        stopped = manifest.read_ledger(f"{out}/checkpoints/manifest.json").at_step().step
        resume = [*argv[:argv.index("--max-steps") + 1], str(stopped + 2), *argv[argv.index("--max-steps") + 2:]]
        procs = trainkit.launch(resume, world=1, log_dir=logs + "-requeued", env={**env, "SLURM_RESTART_COUNT": "1"})
        assert trainkit.wait_all(procs, logs + "-requeued") == [0], trainkit.log_tail(logs + "-requeued", 0)
        text = trainkit.log_tail(logs + "-requeued", 0, n=100000)
        assert "taken over, this job's own lease, from before its requeue (restart 0)" in text
        assert f"resumed from {out}/checkpoints/step-{stopped:09d} at step {stopped}" in text
        ledger = manifest.read_ledger(f"{out}/checkpoints/manifest.json")
        assert ledger.at_step().step == stopped + 2
        steps = [json.loads(line)["step"] for line in storage.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()]
        assert steps[-2:] == [stopped + 1, stopped + 2] and steps == sorted(set(steps))
        assert not storage.exists(f"{out}/_lease.json") and not os.path.exists(scratch)  # released, scratch removed
    finally:
        s3server.stop(server.pid)
        monkeypatch.undo()
        storage.reset()
