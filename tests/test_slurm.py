"""The SLURM scripts (slurm/) on a real single-node SLURM started by the `slurm_cluster` fixture
(tests/slurmcluster.py; packages from tools/install_system.sh --test).

The first tests pin the scheduler behaviour the scripts rely on and the scripts' own logic (arrays and
`afterok`, task slots under arrays and srun, train.sh's signal forwarding and self-requeue, a failed
stage cancelling the rest of the chain). The chain tests run `slurm/pipeline.sh` end to end on the CPU
with the real stages on a tiny slice of real-ish audio: see `chain` below.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurmcluster import Cluster

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
import trainkit  # noqa: E402

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def sbatch(cluster: Cluster, *args: str, env: dict | None = None) -> str:
    """Submit; the job id."""
    out = subprocess.run(["sbatch", "--parsable", *args], env=cluster.env({**os.environ, **(env or {})}),
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def pipeline(cluster: Cluster, env: dict) -> dict[str, str]:
    """Run slurm/pipeline.sh; {`<stage>.<step>`: job id} from the lines it prints."""
    out = subprocess.run(["bash", str(REPO / "slurm" / "pipeline.sh")], env=cluster.env({**os.environ, **env}),
                         capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    return dict(re.findall(r"^(\w+\.\w+) (\d+)$", out.stdout, re.M))


def job_fields(cluster: Cluster, job_id: str) -> list[dict[str, str]]:
    """Every jobcomp record of a job (one per run: a requeued job has several), oldest first."""
    return [r for r in cluster.jobcomp() if r.get("JobId") == job_id]


def test_array_tasks_get_their_slots_and_afterok_waits_for_all_of_them(slurm_cluster, tmp_path):
    """Each of 2 array tasks runs `srun --ntasks=2`: pipeline.tasks gives the 4 processes slots 0..3 of 4;
    the job after `afterok:<array id>` starts only once every task has written its line."""
    script = tmp_path / "task.sh"
    script.write_text(f"#!/bin/bash\nsleep 1\nsrun --ntasks=2 {PYTHON} -c "
                      "'from pipeline.tasks import task_slot; s = task_slot(); print(s.index, s.count)' "
                      f">> {tmp_path}/slots-$SLURM_ARRAY_TASK_ID.txt\n")
    array = sbatch(slurm_cluster, "--array=0-1", "--ntasks=2", "--cpus-per-task=1", f"--output={tmp_path}/a-%j.log",
                   str(script))
    after = sbatch(slurm_cluster, f"--dependency=afterok:{array}", "--kill-on-invalid-dep=yes",
                   f"--output={tmp_path}/count.txt", "--wrap", f"cat {tmp_path}/slots-*.txt | sort")
    slurm_cluster.wait([array, after], timeout=120)
    assert (tmp_path / "count.txt").read_text().split("\n")[:4] == ["0 4", "1 4", "2 4", "3 4"]


def test_train_script_forwards_usr1_requeues_itself_and_holds_its_dependents(slurm_cluster, tmp_path):
    """slurm/train.sh with a stand-in trainer (CANTUS_PYTHON, a shell script that exits 75 on USR1 and 0
    on its second run): USR1 reaches both srun tasks, the job requeues itself under the same id, starts
    again within seconds (not after SLURM's 2-minute hold), and the `afterok` job runs only after it."""
    trace = tmp_path / "trace.txt"
    stub = tmp_path / "trainer.sh"
    stub.write_text(f"""#!/bin/bash
echo "start rank $SLURM_PROCID of $SLURM_NTASKS restart ${{SLURM_RESTART_COUNT:-0}}" >> {trace}
[ "${{SLURM_RESTART_COUNT:-0}}" = 0 ] || exit 0
trap 'echo "USR1 rank $SLURM_PROCID" >> {trace}; exit 75' USR1
touch {tmp_path}/ready-$SLURM_PROCID
for _ in $(seq 1200); do sleep 0.1; done
""")
    stub.chmod(0o755)
    env = {"CANTUS_PYTHON": str(stub), "CANTUS_DEVICE": "cpu", "DATA": "d", "OUTPUT": "o", "MODEL_CONFIG": "m",
           "MAX_STEPS": "5"}
    train = sbatch(slurm_cluster, "--gres=none", "--ntasks-per-node=2", "--cpus-per-task=1",
                   f"--output={tmp_path}/train.log", str(REPO / "slurm" / "train.sh"), env=env)
    after = sbatch(slurm_cluster, f"--dependency=afterok:{train}", "--kill-on-invalid-dep=yes",
                   f"--output={tmp_path}/after.log", "--wrap", f"echo after >> {trace}")
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{r}").exists() for r in (0, 1)):
        assert time.monotonic() < deadline, (tmp_path / "train.log").read_text()
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", train)
    slurm_cluster.wait([train, after], timeout=300)  # generous: a loaded machine is slow, not wrong
    lines = trace.read_text().splitlines()
    assert sorted(lines[:2]) == ["start rank 0 of 2 restart 0", "start rank 1 of 2 restart 0"]
    assert sorted(lines[2:4]) == ["USR1 rank 0", "USR1 rank 1"]
    assert sorted(lines[4:6]) == ["start rank 0 of 2 restart 1", "start rank 1 of 2 restart 1"]
    assert lines[6:] == ["after"]
    runs = job_fields(slurm_cluster, train)
    assert [r["JobState"] for r in runs] == ["PENDING", "COMPLETED"]  # requeued, then finished
    assert "requeueing job" in (tmp_path / "train.log").read_text()
    from datetime import datetime
    held = (datetime.fromisoformat(runs[1]["StartTime"]) - datetime.fromisoformat(runs[0]["EndTime"])).total_seconds()
    assert held < 100, f"the requeued job started {held:.0f} s after its first run ended: SLURM's 120 s hold was not lifted"


def test_train_script_requeues_at_most_max_requeues_times(slurm_cluster, tmp_path):
    """A trainer that always stops (exit 75): with MAX_REQUEUES=1 the job runs twice, then ends with 75 and
    says why; its `afterok` dependent is cancelled, not left pending."""
    stub = tmp_path / "trainer.sh"
    stub.write_text(f"#!/bin/bash\necho run >> {tmp_path}/runs.txt\nexit 75\n")
    stub.chmod(0o755)
    env = {"CANTUS_PYTHON": str(stub), "CANTUS_DEVICE": "cpu", "DATA": "d", "OUTPUT": "o", "MODEL_CONFIG": "m",
           "MAX_STEPS": "5", "MAX_REQUEUES": "1"}
    train = sbatch(slurm_cluster, "--gres=none", "--ntasks-per-node=1", "--cpus-per-task=1",
                   f"--output={tmp_path}/train.log", str(REPO / "slurm" / "train.sh"), env=env)
    after = sbatch(slurm_cluster, f"--dependency=afterok:{train}", "--kill-on-invalid-dep=yes", "--output=/dev/null",
                   "--wrap", "true")
    slurm_cluster.wait([train, after], timeout=300)
    assert (tmp_path / "runs.txt").read_text().split() == ["run", "run"]
    assert [r["JobState"] for r in job_fields(slurm_cluster, train)] == ["PENDING", "FAILED"]
    assert job_fields(slurm_cluster, train)[-1]["ExitCode"].startswith("75")
    assert "after 1 requeues (MAX_REQUEUES=1): not requeueing" in (tmp_path / "train.log").read_text()
    assert job_fields(slurm_cluster, after)[-1]["JobState"] == "CANCELLED"


def test_a_failing_stage_cancels_every_later_job_instead_of_leaving_it_pending(slurm_cluster, tmp_path):
    """The shard plan fails (its input does not exist): pipeline.sh's later jobs end CANCELLED, none pends."""
    jobs = pipeline(slurm_cluster, {
        "INPUT": str(tmp_path / "missing"), "OUT": str(tmp_path / "out"), "MODEL_CONFIG": str(tmp_path / "m.json"),
        "PRETRANSFORM_CKPT": str(tmp_path / "vae.safetensors"), "MAX_STEPS": "2", "PROMPTS": str(tmp_path / "p"),
        "CANTUS_DEVICE": "cpu", "SHARD_TASKS": "2", "PRE_ENCODE_TASKS": "2", "RENDER_TASKS": "2",
        "LOG_DIR": str(tmp_path / "logs"), "SBATCH_ARGS": "--cpus-per-task=1"})
    assert list(jobs) == ["shard.plan", "shard.run", "shard.commit",
                          "pre_encode.plan", "pre_encode.run", "pre_encode.commit",
                          "pre_encode_val.plan", "pre_encode_val.run", "pre_encode_val.commit",
                          "train.run", "render.plan", "render.run", "render.commit"]
    slurm_cluster.wait(list(jobs.values()), timeout=120)
    states = {name: job_fields(slurm_cluster, job)[-1]["JobState"] for name, job in jobs.items()}
    assert states.pop("shard.plan") == "FAILED"
    assert set(states.values()) == {"CANCELLED"}, states
    assert not (tmp_path / "out" / "shards" / "manifest.json").exists()


# ---------------------------------------------------------------------------------------------------
# The whole chain on the CPU: slurm/pipeline.sh with the real stages, outputs on the real S3 server.

SR = 8000
SAMPLE_SIZE = 512  # 64 ms windows: a 1 s clip is 16 latent samples
MAX_STEPS = 200
VAE = {"encoder": {"type": "oobleck", "config": {"in_channels": 1, "channels": 8, "c_mults": [1, 2], "strides": [2, 2],
                                                 "latent_dim": 8, "use_snake": True}},
       "decoder": {"type": "oobleck", "config": {"out_channels": 1, "channels": 8, "c_mults": [1, 2], "strides": [2, 2],
                                                 "latent_dim": 4, "use_snake": True, "final_tanh": False}},
       "bottleneck": {"type": "vae"}, "latent_dim": 4, "downsampling_ratio": 4, "io_channels": 1}
CLIPS = {  # name: (seconds, fundamental Hz or 0 for silence, caption)
    "flute_a": (1.0, 440, "a flute playing A"), "flute_c": (0.7, 523, "a flute playing C"),
    "cello_g": (1.3, 196, "a cello playing G"), "cello_d": (0.5, 147, "a cello playing D"),
    "horn_f": (0.9, 349, "a horn playing F"), "horn_e": (1.1, 330, "a horn playing E"),
    "bell_b": (0.6, 988, "a bell ringing B"), "oboe_g": (0.8, 392, "an oboe playing G"),
}
CLIPS.update({f"{name}_take2": (round(seconds * 0.8, 2), f0 * 2, f"{caption} an octave up")
              for name, (seconds, f0, caption) in CLIPS.items()})  # more files: pre_encode runs long enough to cancel
CLIPS["silence"] = (1.0, 0, "nothing at all")


def vae_config() -> dict:
    """VAE as a `model_type: autoencoder` config, with STFT losses and a discriminator sized for 64 ms clips."""
    return {"model_type": "autoencoder", "sample_size": SAMPLE_SIZE, "sample_rate": SR, "audio_channels": 1,
            "model": VAE, "training": trainkit.autoencoder_training(warmup_steps=2)}


def dit_config() -> dict:
    """A diffusion_cond DiT (1 block, width 64) on the VAE above, conditioned on timing."""
    timing = ["seconds_start", "seconds_total"]
    return {
        "model_type": "diffusion_cond", "sample_size": SAMPLE_SIZE, "sample_rate": SR, "audio_channels": 1,
        "model": {
            "pretransform": {"type": "autoencoder", "scale": 1.0, "config": VAE},
            "conditioning": {"configs": [{"id": k, "type": "number", "config": {"min_val": 0, "max_val": 512}}
                                         for k in timing], "cond_dim": 32},
            "diffusion": {"cross_attention_cond_ids": timing, "global_cond_ids": timing, "type": "dit",
                          "config": {"io_channels": 4, "embed_dim": 64, "depth": 1, "num_heads": 2,
                                     "cond_token_dim": 32, "global_cond_dim": 64, "project_cond_tokens": False,
                                     "transformer_type": "continuous_transformer"}},
            "io_channels": 4},
        "training": {"use_ema": True, "cfg_dropout_prob": 0.1,
                     "optimizer_configs": {"diffusion": {"optimizer": {"type": "AdamW", "config": {"lr": 1e-3}}}},
                     "demo": {"demo_every": 1000, "demo_steps": 4, "num_demos": 1,
                              "demo_cond": [{"seconds_start": 0, "seconds_total": 1}], "demo_cfg_scales": [1]}}}


def write_clips(folder: Path) -> Path:
    """Real-ish audio (a few harmonics, a vibrato, an attack/decay envelope and a little noise) as FLAC
    files plus a captions CSV (`path,prompt`); one clip is digital silence, for the shard stage to reject."""
    import numpy as np
    import soundfile as sf
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = ["path,prompt"]
    for name, (seconds, f0, caption) in CLIPS.items():
        t = np.arange(int(seconds * SR)) / SR
        if f0:
            phase = 2 * np.pi * f0 * t + 0.3 * np.sin(2 * np.pi * 5 * t)
            tone = sum(np.sin(k * phase) / k for k in (1, 2, 3))
            envelope = np.minimum(t / 0.02, 1) * np.exp(-t / (2 * seconds))
            audio = 0.3 * tone * envelope + 0.003 * rng.standard_normal(t.size)
        else:
            audio = np.zeros_like(t)
        sf.write(folder / f"{name}.flac", audio.astype(np.float32), SR, subtype="PCM_16")
        rows.append(f"{name}.flac,{caption}")
    captions = folder.parent / "captions.csv"
    captions.write_text("\n".join(rows) + "\n")
    return captions


def chain_env(root: Path, out: str) -> dict[str, str]:
    import json
    captions = write_clips(root / "audio")
    (root / "dit.json").write_text(json.dumps(dit_config()))
    (root / "vae.json").write_text(json.dumps(vae_config()))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"id": f"p{i}", "seconds_start": 0, "seconds_total": s}) + "\n"
                                                for i, s in enumerate((1, 2))))
    return {
        "OUT": out, "INPUT": str(root / "audio"), "CAPTIONS": str(captions),
        "MODEL_CONFIG": str(root / "dit.json"), "VAE_CONFIG": str(root / "vae.json"), "VAE_MAX_STEPS": "6",
        "PROMPTS": str(root / "prompts.jsonl"), "MAX_STEPS": str(MAX_STEPS),
        "CANTUS_DEVICE": "cpu", "CANTUS_PYTHON": PYTHON, "LOG_DIR": str(root / "logs"),
        "SHARD_TASKS": "2", "PRE_ENCODE_TASKS": "2", "RENDER_TASKS": "2",
        "SHARD_ARGS": f"--sample-rate {SR} --channels 1 --val-fraction 0.25 --shard-size-mb 0.01 --min-seconds 0.1 --max-reject-fraction 0.5",
        "PRE_ENCODE_ARGS": "--batch-size 1",
        "VAE_TRAIN_ARGS": "--batch-size 2 --num-workers 0 --checkpoint-every 6 --log-every 1 --wandb off",
        "TRAIN_ARGS": "--batch-size 2 --num-workers 0 --checkpoint-every 20 --log-every 10 --wandb off",
        "RENDER_ARGS": f"--checkpoint-steps {MAX_STEPS} --cfg-scales 1,3 --steps 4 --batch-size 2",
        "SBATCH_ARGS": "--cpus-per-task=1", "TRAIN_SBATCH_ARGS": "--ntasks-per-node=2",
        "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
    }


def _wait_for(what: str, condition, timeout: float, cluster: Cluster, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} after {timeout:.0f} s:\n" + cluster.run("squeue", "-o", "%i %j %T %r", check=False))
        time.sleep(poll)


def _queued(cluster: Cluster, job: str) -> bool:
    return bool(cluster.run("squeue", "-h", "-o", "%i", "-j", job, check=False).split())


@pytest.fixture(scope="module")
def chain(slurm_cluster, s3_bucket, tmp_path_factory):
    """slurm/pipeline.sh on the CPU with every URL on S3, in two submissions:

    1. the whole chain, the VAE trained first (VAE_CONFIG, no PRETRANSFORM_CKPT); once the pre_encode array has written a latent shard, `scancel` of that array
       (mid-run): its commit, train and render jobs end cancelled;
    2. the chain again from pre_encode (`START_AT=pre_encode`, the VAE given as its ledger); once the train job has listed a
       checkpoint, `scancel --signal=USR1 --batch` of it: it checkpoints, requeues itself, resumes and
       finishes, and only then does render start.
    """
    from pipeline import storage
    root = tmp_path_factory.mktemp("chain")
    out = f"s3://{s3_bucket}/chain"
    env = chain_env(root, out)
    cluster = slurm_cluster
    first = pipeline(cluster, env)
    latents = f"{out}/latents"
    _wait_for("no latent shard written", lambda: storage.list_objects(f"{latents}/_items")
              or not _queued(cluster, first["pre_encode.run"]), 300, cluster)
    running = _queued(cluster, first["pre_encode.run"])
    cluster.run("scancel", first["pre_encode.run"])
    cluster.wait(list(first.values()), timeout=120)

    second = pipeline(cluster, {**env, "START_AT": "pre_encode",
                                "PRETRANSFORM_CKPT": f"{out}/vae/checkpoints/manifest.json"})
    ledger = f"{out}/train/checkpoints/manifest.json"
    _wait_for("no checkpoint in the ledger", lambda: storage.exists(ledger) or not _queued(cluster, second["train.run"]),
              300, cluster, poll=0.2)
    cluster.run("scancel", "--signal=USR1", "--batch", second["train.run"])
    cluster.wait(list(second.values()), timeout=400)
    return {"out": out, "root": root, "first": first, "second": second, "cancelled_while_running": running,
            "cluster": cluster}


def _state(cluster: Cluster, job: str) -> str:
    records = job_fields(cluster, job)
    return records[-1]["JobState"] if records else "MISSING"


def _array_states(cluster: Cluster, array_id: str) -> list[str]:
    """Final states of every task of an array (the array's own id is one of its tasks), or of one job."""
    return [r["JobState"] for r in cluster.jobcomp() if array_id in (r.get("JobId"), r.get("ArrayJobId"))]


def test_cancelled_stage_cancels_the_rest_and_every_job_of_the_resubmission_completes(chain):
    cluster, first, second = chain["cluster"], chain["first"], chain["second"]
    assert chain["cancelled_while_running"], "the pre_encode array had finished before it could be cancelled"
    assert "CANCELLED" in _array_states(cluster, first["pre_encode.run"])
    for name in ("shard.plan", "shard.run", "shard.commit", "vae.run"):
        assert _state(cluster, first[name]) == "COMPLETED", name
    for name in ("pre_encode.commit", "train.run", "render.plan", "render.run", "render.commit"):
        assert _state(cluster, first[name]) == "CANCELLED", name
    assert set(second) == {"pre_encode.plan", "pre_encode.run", "pre_encode.commit", "pre_encode_val.plan",
                           "pre_encode_val.run", "pre_encode_val.commit", "train.run", "render.plan", "render.run",
                           "render.commit"}
    for name, job in second.items():
        assert set(_array_states(cluster, job)) == {"COMPLETED"} or name == "train.run", name


def test_each_manifest_names_the_sha256_of_the_manifest_before_it(chain):
    from pipeline import manifest, storage
    out = chain["out"]
    shards = manifest.read_manifest(f"{out}/shards/manifest.json", stage="shard")
    assert shards.input == manifest.input_ref(shards.input["url"])  # shard's input is its plan
    for sub in ("", "/val"):
        latents = manifest.read_manifest(f"{out}/latents{sub}/manifest.json", stage="pre_encode")
        assert latents.input == manifest.input_ref(f"{out}/shards{sub}/manifest.json")
        vae = manifest.read_ledger(f"{out}/vae/checkpoints/manifest.json").at_step()
        assert latents.properties["weights_url"] == vae.export_url  # the VAE job's newest export
    ledger = manifest.read_ledger(f"{out}/train/checkpoints/manifest.json")
    assert ledger.input == manifest.input_ref(f"{out}/latents/manifest.json")
    render = manifest.read_manifest(f"{out}/render/manifest.json", stage="render")
    assert render.input == manifest.input_ref(render.input["url"])
    final = ledger.at_step(MAX_STEPS)
    assert storage.sha256_url(final.export_url) == final.export_sha256
    items = manifest.read_plan(f"{out}/render")
    assert {(it["checkpoint_url"], it["checkpoint_identity"]["sha256"]) for it in items} == \
        {(final.export_url, final.export_sha256)}


def _samples(m) -> dict[str, dict[str, bytes]]:
    """Every sample of a manifest's shards, by key; a key seen twice fails."""
    from pipeline.data.shards import iter_samples
    found = {}
    for entry in m.outputs:
        for key, members in iter_samples(entry["url"]):
            assert key not in found, f"{key} twice"
            found[key] = members
    return found


def _rejects(m) -> list[dict]:
    import json

    from pipeline import storage
    if not m.rejects or not storage.exists(m.rejects):
        return []
    return [json.loads(line) for line in storage.read_bytes(m.rejects).decode().splitlines() if line.strip()]


def test_every_source_is_a_train_or_val_sample_or_rejected_and_every_window_a_latent_sample(chain):
    import json
    import math

    from pipeline import manifest
    from pipeline.data import audio as audio_io
    out = chain["out"]
    sources = set()
    for sub in ("", "/val"):
        audio = manifest.read_manifest(f"{out}/shards{sub}/manifest.json", stage="shard")
        latents = manifest.read_manifest(f"{out}/latents{sub}/manifest.json", stage="pre_encode")
        expected = {}
        for key, members in _samples(audio).items():
            meta = json.loads(members["json"])
            sources.add(Path(meta["source"]).stem)
            length = audio_io.decode(members["flac"])[0].shape[-1]
            windows = max(1, math.ceil(length / SAMPLE_SIZE))
            expected.update({key if windows == 1 else f"{key}_w{j}": key for j in range(windows)})
        got = _samples(latents)
        assert sorted(got) == sorted(expected), f"latents{sub}"
        assert latents.totals["samples"] == len(expected)
        assert not _rejects(latents)
    rejected = {Path(r["id"]).stem for r in _rejects(manifest.read_manifest(f"{out}/shards/manifest.json"))}
    assert "silence" in rejected
    assert sources | rejected == set(CLIPS) and not sources & rejected


def test_usr1_checkpoints_requeues_and_render_starts_only_after_the_finished_run(chain):
    from pipeline import manifest
    cluster, second = chain["cluster"], chain["second"]
    runs = job_fields(cluster, second["train.run"])
    assert [r["JobState"] for r in runs] == ["PENDING", "COMPLETED"]  # requeued once, then finished
    ledger = manifest.read_ledger(f"{chain['out']}/train/checkpoints/manifest.json")
    assert ledger.checkpoints[-1].step == MAX_STEPS
    log = (chain["root"] / "logs" / f"cantus-train-run-{second['train.run']}.log").read_text()
    assert "exiting with 75" in log and "requeueing job" in log and "restart 1:" in log
    assert re.search(r"resumed from \S+ at step \d+", log)
    render_start = job_fields(cluster, second["render.plan"])[0]["StartTime"]
    assert render_start >= runs[-1]["EndTime"]  # ISO timestamps compare as strings


def test_rendered_audio_decodes_and_is_not_silent(chain):
    import numpy as np

    from pipeline import manifest, storage
    from pipeline.data import audio as audio_io
    render = manifest.read_manifest(f"{chain['out']}/render/manifest.json", stage="render")
    assert len(render.outputs) == 2 * 2  # prompts x CFG scales
    for item in render.outputs:
        audio, sr = audio_io.decode(storage.read_bytes(item["audio"]))
        assert sr == SR and audio.shape[-1] > 0 and np.isfinite(audio).all()
        assert float(np.sqrt(np.mean(audio.astype(np.float64) ** 2))) > 1e-4, item["audio"]
