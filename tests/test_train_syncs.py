"""No host sync of ours in the training step: between log steps, pipeline/ reads no tensor value.

The train stage runs (one rank, ZeRO-2, CPU) under a dispatch mode that records every `_local_scalar_dense`
(`.item()`, `float(t)`, `bool(t)`: on a GPU a device-to-host sync) with its Python stack. A read belongs to the
step when the stack passes through `train_diffusion` between the loop's `while` and its `# periodic work`
(log, stop check, checkpoint: once every --log-every steps); it is ours when the first frame outside torch is in
pipeline/, DeepSpeed's when it is in deepspeed/.
"""
import collections
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "distributed"))
import trainkit  # noqa: E402

REPO = trainkit.REPO
PIPELINE = os.path.join(REPO, "pipeline") + os.sep
TRAIN = os.path.join(PIPELINE, "train.py")

CPU_BY_DESIGN = {
    ("pipeline/diffusion/timesteps.py", "__call__"):
        "the uniform (Sobol) sampler seeds its scramble from the CPU generator once, on the first step",
    ("pipeline/diffusion/losses.py", "padding_mask_for_step"):
        "mask_padding_dropout's coin is drawn from the CPU generator",
    ("pipeline/data/latents.py", "__iter__"):
        "the loader's epoch order is a CPU tensor (seeded CPU generator) turned into sample indices",
    ("pipeline/data/latents.py", "<listcomp>"):
        "the same: one batch's sample indices as Python ints for the loader's workers",
}
"""Reads of tensors that stay on the CPU whatever the device (no device sync), by file and function."""


def _step_lines() -> range:
    """The lines of train.py's loop body before its periodic work: one training step."""
    lines = open(TRAIN).read().splitlines()
    start = next(i for i, line in enumerate(lines, 1) if line.strip() == "while step < args.max_steps:")
    end = next(i for i, line in enumerate(lines, 1) if i > start and line.strip().startswith("# periodic work"))
    return range(start, end)


def _cause(stack: list) -> tuple[str, int, str] | None:
    """The innermost frame outside torch: who asked for the value."""
    for filename, line, name in reversed(stack):
        if f"{os.sep}torch{os.sep}" not in filename and "<frozen" not in filename:
            return filename, line, name
    return None


@pytest.fixture(scope="module")
def reads(tmp_path_factory):
    root = tmp_path_factory.mktemp("syncs")
    ident = trainkit.write_vae(str(root / "vae.safetensors"))
    data = trainkit.write_latent_shards(str(root / "latents"), shards=1, per_shard=12, frames=24, properties=ident)
    config = trainkit.write_json(str(root / "model.json"), trainkit.tiny_dit_config())
    out = str(root / "reads.json")
    argv = ["--ds_config", os.path.join(REPO, "ds_configs", "zero2_cpu.json"), "--model-config", config,
            "--data", data, "--output", str(root / "run"), "--max-steps", "6", "--batch-size", "2",
            "--num-workers", "1", "--log-every", "3", "--checkpoint-every", "100", "--wandb", "off",
            "--scratch-dir", str(root / "scratch")]
    proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "distributed", "scalar_reads.py"), out, *argv],
                          env=trainkit.train_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out) as f:
        return json.load(f)["stacks"]


def _in_step(stack, lines: range) -> bool:
    return any(f == TRAIN and name == "train_diffusion" and line in lines for f, line, name in stack)


def test_between_log_steps_pipeline_code_reads_no_tensor_value(reads):
    lines = _step_lines()
    ours, deepspeed = collections.Counter(), collections.Counter()
    for stack in reads:
        if not _in_step(stack, lines):
            continue
        filename, line, name = _cause(stack)
        where = (os.path.relpath(filename, REPO), name)
        if filename.startswith(PIPELINE):
            ours[where] += 1
        elif f"{os.sep}deepspeed{os.sep}" in filename:
            deepspeed[(*where, line)] += 1
    unexpected = {w: n for w, n in ours.items() if w not in CPU_BY_DESIGN}
    assert not unexpected, f"host reads of tensor values in the step (a GPU sync each): {unexpected}"
    assert ours[("pipeline/diffusion/timesteps.py", "__call__")] == 1  # the recorder sees our reads
    print("DeepSpeed's reads in 6 steps:", json.dumps({f"{f}:{ln} {n}": c for (f, n, ln), c in deepspeed.items()}))


def test_the_log_steps_read_the_loss_and_the_stop_flag(reads):
    """The reads moved out of the step happen at log steps (3 and 6), not in between."""
    causes = collections.Counter(_cause(s)[2] for s in reads if any(f == TRAIN for f, _, _ in s))
    assert causes["should_stop"] == 2
