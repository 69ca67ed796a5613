"""Training and the stage chain on a two-node SLURM (`slurm_cluster_2nodes`: n1 and n2, two slurmd on this host,
NodeAddr 127.0.0.1, names that do not resolve) whose nodes share only the S3 server: every URL is on S3 and each
node keeps its scratch in a folder of its own (`SCRATCH_DIR=.../%n`, standing for node-local disks).

DeepSpeed launches cost ~20 s each here, so one module fixture submits the runs the tests compare: a 1-node x
2-task ZeRO-2 baseline (20 steps), a 2-node ZeRO-3 run (10 steps), and a 2-node start whose MASTER_ADDR is an
address where nothing listens.
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from slurmcluster import Cluster
from test_slurm import PYTHON, REPO, job_fields, sbatch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
import trainkit  # noqa: E402

pytestmark = pytest.mark.slurm
TOLERANCE = 1e-5  # ZeRO-3 and a resumed ZeRO-3 differ from ZeRO-2 by up to 6e-7 (ENVIRONMENT.md)


def _train_env(m: dict, name: str, zero: int, max_steps: int, *flags: str, **extra: str) -> dict:
    return {"CANTUS_PYTHON": PYTHON, "CANTUS_DEVICE": "cpu", "DATA": m["data"], "OUTPUT": f"{m['out']}/{name}",
            "MODEL_CONFIG": m["config"], "MAX_STEPS": str(max_steps),
            "DS_CONFIG": os.path.join(REPO, "ds_configs", f"zero{zero}_cpu.json"),
            "SCRATCH_DIR": str(m["root"] / f"scratch-{name}" / "%n"),
            # --cache-gb 0: every rank is its own loader group, so the data plan is the same whether the two
            # ranks share a node or not, and losses compare the distributed math across layouts. (With a node
            # cache the plan deals shards per node by design, and a resume on another node layout is refused.)
            "TRAIN_ARGS": " ".join(("--batch-size 2 --num-workers 0 --log-every 1 --wandb off --cache-gb 0 "
                                    "--collective-timeout 60 --rendezvous-timeout 120", *flags)),
            "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO),
            "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".cache", "torch_extensions")),
            **extra}


def _submit(m: dict, name: str, nodes: int, per_node: int, env: dict, *opts: str) -> str:
    return sbatch(m["cluster"], "--gres=none", f"--nodes={nodes}", f"--ntasks-per-node={per_node}", "--cpus-per-task=1",
                  f"--output={m['root']}/{name}-%j.log", *opts, str(REPO / "slurm" / "train.sh"), env=env)


def _log(m: dict, name: str, job: str) -> str:
    return (m["root"] / f"{name}-{job}.log").read_text()


def _metrics(url: str) -> list[dict]:
    from pipeline import storage
    return [json.loads(line) for line in storage.read_bytes(f"{url}/metrics.jsonl").decode().splitlines() if line.strip()]


def _losses(url: str) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(url) if "loss" in r}


def _state(cluster: Cluster, job: str) -> str:
    records = job_fields(cluster, job)
    return records[-1]["JobState"] if records else "MISSING"


@pytest.fixture(scope="module")
def mn(slurm_cluster_2nodes, s3_bucket, tmp_path_factory):
    """Data and model on S3, and the runs the tests compare (submitted together, waited for once)."""
    from pipeline import storage
    root = tmp_path_factory.mktemp("multinode")
    out = f"s3://{s3_bucket}/multinode"
    ident = trainkit.write_vae(str(root / "vae.safetensors"))
    storage.upload(str(root / "vae.safetensors"), f"{out}/vae.safetensors")
    data = trainkit.write_latent_shards(f"{out}/latents", shards=2, per_shard=9, frames=24, valid_frames=20,
                                        properties={**ident, "weights_url": f"{out}/vae.safetensors"})
    config = trainkit.write_json(str(root / "model.json"), trainkit.tiny_dit_config())
    m = {"root": root, "out": out, "data": data, "config": config, "cluster": slurm_cluster_2nodes}
    jobs = {"baseline": _submit(m, "baseline", 1, 2, _train_env(m, "baseline", 2, 20, "--checkpoint-every 10")),
            "zero3": _submit(m, "zero3", 2, 1, _train_env(m, "zero3", 3, 10, "--checkpoint-every 10")),
            "nowhere": _submit(m, "nowhere", 2, 1, _train_env(m, "nowhere", 2, 10, "--rendezvous-timeout 10",
                                                              MASTER_ADDR="192.0.2.1"))}
    t0 = time.monotonic()
    slurm_cluster_2nodes.wait(list(jobs.values()), timeout=900)
    m.update(jobs=jobs, seconds=time.monotonic() - t0)
    for name in ("baseline", "zero3"):
        assert _state(slurm_cluster_2nodes, jobs[name]) == "COMPLETED", _log(m, name, jobs[name])[-4000:]
    return m


def test_node_names_do_not_resolve_so_the_rendezvous_goes_through_nodeaddr(mn):
    for node in ("n1", "n2"):
        with pytest.raises(socket.gaierror):
            socket.getaddrinfo(node, 1)
    job = mn["jobs"]["zero3"]
    log = _log(mn, "zero3", job)
    assert f"master 127.0.0.1:{20000 + int(job) % 10000}" in log and "(n[1-2])" in log


def test_zero3_on_two_nodes_gives_the_losses_of_one_node_with_two_tasks(mn):
    base, two = _losses(f"{mn['out']}/baseline"), _losses(f"{mn['out']}/zero3")
    assert sorted(two) == list(range(1, 11))
    assert all(two[s] == pytest.approx(base[s], abs=TOLERANCE) for s in range(1, 11)), (two, base)
    assert base[1] != base[10]  # it trains


def test_a_master_address_where_nothing_listens_fails_every_rank_in_one_line_within_the_timeout(mn):
    job = mn["jobs"]["nowhere"]
    log = _log(mn, "nowhere", job)
    assert _state(mn["cluster"], job) == "FAILED"
    port = 20000 + int(job) % 10000
    for rank in (0, 1):
        lines = [x for x in log.splitlines() if x.startswith(f"error: rendezvous at 192.0.2.1:{port} failed (rank {rank} of 2")]
        assert len(lines) == 1, log[-3000:]
    assert "Traceback" not in log
    record = job_fields(mn["cluster"], job)[-1]
    assert _elapsed(record) < 10 + 110  # the timeout plus start-up on a loaded machine, not srun's 2-minute wait


def _elapsed(record: dict) -> float:
    from datetime import datetime
    return (datetime.fromisoformat(record["EndTime"]) - datetime.fromisoformat(record["StartTime"])).total_seconds()


def _wait(what: str, condition, timeout: float, cluster: Cluster) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} after {timeout:.0f} s:\n" + cluster.run("squeue", check=False)
        time.sleep(0.3)


def _ledger_steps(url: str) -> list[int]:
    from pipeline import manifest, storage
    ledger = f"{url}/checkpoints/manifest.json"
    return [c.step for c in manifest.read_ledger(ledger).checkpoints] if storage.exists(ledger) else []


def _scratch_files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")} if folder.exists() else set()


def test_usr1_on_two_nodes_saves_every_rank_requeues_resumes_exactly_and_only_then_releases_dependents(mn):
    cluster, name = mn["cluster"], "usr1"
    url = f"{mn['out']}/{name}"
    t0 = time.monotonic()
    job = _submit(mn, name, 2, 1, _train_env(mn, name, 2, 20, "--checkpoint-every 5"))
    trace = mn["root"] / "usr1-after.txt"
    after = sbatch(cluster, f"--dependency=afterok:{job}", "--kill-on-invalid-dep=yes", "--output=/dev/null",
                   "--wrap", f"date +%s.%N > {trace}")
    _wait("no checkpoint listed", lambda: _ledger_steps(url) or not cluster.job_ids(), 600, cluster)
    # each node's scratch root holds its own rank's work and nothing of the other's
    n1, n2 = (_scratch_files(mn["root"] / f"scratch-{name}" / n) for n in ("n1", "n2"))
    assert {"rank-00000", "metrics.jsonl"} <= n1 and not any(f.startswith("rank-00001") for f in n1), n1
    assert "rank-00001" in n2 and not any(f.startswith("rank-00000") for f in n2) and "metrics.jsonl" not in n2, n2
    assert any(f.startswith("shards/") for f in n1) and any(f.startswith("shards/") for f in n2)
    cluster.run("scancel", "--signal=USR1", "--batch", job)
    cluster.wait([job, after], timeout=600)
    log = _log(mn, name, job)
    assert [r["JobState"] for r in job_fields(cluster, job)] == ["PENDING", "COMPLETED"], log[-4000:]
    assert log.count("exiting with 75") == 2  # a warning from each rank, one per node
    assert "requeueing job" in log and "restart 1:" in log
    stopped = int(re.search(r"saved step (\d+) of 20", log).group(1))
    from pipeline import storage
    files = json.loads(storage.read_bytes(f"{url}/checkpoints/step-{stopped:09d}/files.json"))
    assert {"rank-00000.safetensors", "rank-00001.safetensors"} <= set(files)
    got, base = _losses(url), _losses(f"{mn['out']}/baseline")
    assert [r["step"] for r in _metrics(url) if "loss" in r] == list(range(1, 21))  # every step exactly once
    assert all(got[s] == pytest.approx(base[s], abs=TOLERANCE) for s in range(1, 21)), (stopped, got, base)
    assert float(trace.read_text()) >= _epoch(job_fields(cluster, job)[-1]["EndTime"]) - 1
    print(f"usr1 test: {time.monotonic() - t0:.0f} s, stopped at step {stopped}")


def _epoch(iso: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(iso).timestamp()


def _rank_pid(job: str, rank: int) -> int | None:
    """The trainer process of `rank` in `job` (srun execs it: the task itself)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(v.split("=", 1) for v in (proc / "environ").read_bytes().decode(errors="replace").split("\0") if "=" in v)
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if env.get("SLURM_JOB_ID") == job and env.get("SLURM_PROCID") == str(rank) and "pipeline/train.py" in cmd:
            return int(proc.name)
    return None


def test_sigkill_of_the_rank_on_n2_fails_the_job_in_bounded_time_and_a_resubmission_elsewhere_completes_every_step_once(mn):
    cluster, name = mn["cluster"], "sigkill"
    url = f"{mn['out']}/{name}"
    from pipeline.train import build_parser
    # the killed run leaves its output lease behind (issue 15): the resubmission takes it over once stale
    lease = ["--lease-timeout 5"] if "--lease-timeout" in build_parser().format_help() else []
    env = _train_env(mn, name, 2, 20, "--checkpoint-every 5", *lease)
    job = _submit(mn, name, 2, 1, env)
    _wait("no checkpoint listed", lambda: _ledger_steps(url) or not cluster.job_ids(), 600, cluster)
    pid = _rank_pid(job, 1)
    assert pid is not None, _log(mn, name, job)[-3000:]
    assert "SLURMD_NODENAME=n2" in Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    os.kill(pid, signal.SIGKILL)
    t0 = time.monotonic()
    cluster.wait([job], timeout=600)
    failed_after = time.monotonic() - t0
    assert _state(cluster, job) == "FAILED", _log(mn, name, job)[-3000:]
    # the peer fails at its next collective (gloo sees the closed connection; --collective-timeout 60 at the
    # latest), else srun ends the step 120 s after the first task exited
    assert failed_after < 60 + 120, failed_after
    saved = _ledger_steps(url)[-1]
    # resubmitted elsewhere: both ranks on n2 (rank 0 now where rank 1 was), resuming from S3 alone
    again = _submit(mn, name, 1, 2, env, "--nodelist=n2")
    cluster.wait([again], timeout=600)
    log = _log(mn, name, again)
    assert _state(cluster, again) == "COMPLETED", log[-4000:]
    assert f"at step {saved}" in log and "on 1 nodes (n2)" in log
    assert [r["step"] for r in _metrics(url) if "loss" in r] == list(range(1, 21))  # nothing lost or repeated
    got, base = _losses(url), _losses(f"{mn['out']}/baseline")
    assert all(got[s] == pytest.approx(base[s], abs=TOLERANCE) for s in range(1, 21)), (saved, got, base)
    print(f"sigkill test: the job failed {failed_after:.0f} s after the kill; resumed from step {saved}")


# ---------------------------------------------------------------------------------------------------
# slurm/pipeline.sh on both nodes, every URL on S3: each array stage runs one job on 2 nodes (2 tasks).

def test_the_chain_on_two_nodes_runs_every_array_stage_on_both_and_its_manifests_chain(slurm_cluster_2nodes, s3_bucket,
                                                                                        tmp_path):
    import test_slurm as chain
    from safetensors.torch import save_file

    from pipeline import manifest, storage
    from pipeline.config import load_model_config
    from pipeline.models.factory import create_model_from_config
    cluster = slurm_cluster_2nodes
    out = f"s3://{s3_bucket}/chain2"
    env = chain.chain_env(tmp_path, out)
    vae = create_model_from_config(load_model_config(env["MODEL_CONFIG"])).pretransform.model
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, str(tmp_path / "vae.safetensors"))
    storage.upload(str(tmp_path / "vae.safetensors"), f"{out}/vae.safetensors")
    steps = 4
    env.update({"PRETRANSFORM_CKPT": f"{out}/vae.safetensors", "MAX_STEPS": str(steps), "PRE_ENCODE_VAL": "0",
                "SHARD_TASKS": "1", "PRE_ENCODE_TASKS": "1", "RENDER_TASKS": "1",
                "SHARD_NODES": "2", "PRE_ENCODE_NODES": "2", "RENDER_NODES": "2",
                "TRAIN_NODES": "2", "TRAIN_TASKS_PER_NODE": "1", "TRAIN_SBATCH_ARGS": "",
                "SCRATCH_DIR": str(tmp_path / "scratch" / "%n"), "PYTHONPATH": str(REPO),
                "TRAIN_ARGS": f"--batch-size 2 --num-workers 0 --checkpoint-every {steps} --log-every 2 --wandb off",
                "RENDER_ARGS": f"--checkpoint-steps {steps} --cfg-scales 1,3 --steps 4 --batch-size 2"})
    t0 = time.monotonic()
    jobs = chain.pipeline(cluster, env)
    assert set(jobs) == {f"{s}.{p}" for s in ("shard", "pre_encode", "render") for p in ("plan", "run", "commit")} \
        | {"train.run"}
    cluster.wait(list(jobs.values()), timeout=900)
    logs = tmp_path / "logs"
    for name, job in jobs.items():
        assert _state(cluster, job) == "COMPLETED", (name, (logs / f"cantus-{name.replace('.', '-')}-{job}.log").read_text()[-3000:])
    for stage in ("shard", "pre_encode", "render"):
        log = (logs / f"cantus-{stage}-run-{jobs[stage + '.run']}.log").read_text()
        ran = set(re.findall(rf"{stage} task (\d) of 2 on node (n\d)", log))
        assert ran == {("0", "n1"), ("1", "n2")}, (stage, log[-2000:])
    train_log = (logs / f"cantus-train-run-{jobs['train.run']}.log").read_text()
    assert "srun 2 tasks on 2 nodes (n[1-2])" in train_log
    # counts add up: every source is a sample or a reject, every audio window a latent sample
    shards = manifest.read_manifest(f"{out}/shards/manifest.json", stage="shard")
    val = manifest.read_manifest(f"{out}/shards/val/manifest.json", stage="shard")
    latents = manifest.read_manifest(f"{out}/latents/manifest.json", stage="pre_encode")
    sources = {Path(json.loads(members["json"])["source"]).stem
               for m in (shards, val) for members in chain._samples(m).values()}
    rejected = {Path(r["id"]).stem for r in chain._rejects(shards)}
    assert sources | rejected == set(chain.CLIPS) and not sources & rejected
    assert latents.totals["samples"] == len(chain._samples(latents)) >= len(chain._samples(shards))
    # the sha256 chain
    assert shards.input == manifest.input_ref(shards.input["url"])
    assert latents.input == manifest.input_ref(f"{out}/shards/manifest.json")
    ledger = manifest.read_ledger(f"{out}/train/checkpoints/manifest.json")
    assert ledger.input == manifest.input_ref(f"{out}/latents/manifest.json")
    final = ledger.at_step(steps)
    assert storage.sha256_url(final.export_url) == final.export_sha256
    render = manifest.read_manifest(f"{out}/render/manifest.json", stage="render")
    assert render.input == manifest.input_ref(render.input["url"]) and len(render.outputs) == 2 * 2
    assert {(it["checkpoint_url"], it["checkpoint_identity"]["sha256"]) for it in manifest.read_plan(f"{out}/render")} \
        == {(final.export_url, final.export_sha256)}
    print(f"chain on two nodes: {time.monotonic() - t0:.0f} s")
