"""The checkpoint sequence's promise to a resume: once the ledger lists a step, the stored metrics file holds it.

A rank killed on another node makes its peers fail at their next collective, which may be the barrier right after
rank 0 wrote the ledger; the resumed run keeps the metrics lines up to the listed step and redoes only the rest.
"""
import json
import os
import subprocess
import sys
import uuid

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import trainkit  # noqa: E402

SCRIPT = """
import sys
import torch
import deepspeed
from pipeline.distributed import ledger

out, scratch = sys.argv[1], sys.argv[2]
deepspeed.init_distributed("gloo")
torch.manual_seed(0)
model = torch.nn.Linear(4, 2)
ds = {"train_batch_size": 1, "zero_optimization": {"stage": 2},
      "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}
engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds)
outputs = ledger.RunOutputs(out=out, scratch=scratch, rank=0, world_size=1)
outputs.restart_metrics(0)
for step in (1, 2):
    engine.backward(engine(torch.randn(1, 4)).square().sum())
    engine.step()
    outputs.log_metrics({"step": step, "loss": 1.0 / step})

barriers = []
def peer_gone():  # the first barrier passes; the one after the ledger write finds the killed peer's socket closed
    barriers.append(1)
    if len(barriers) == 2:
        raise RuntimeError("Connection closed by peer")
ledger._barrier = peer_gone
try:
    ledger.save_and_publish(outputs, engine, step=2, client={}, config_sha256="x", generators={}, ema=None,
                            export_tensors=lambda ema: {k: v.detach().clone() for k, v in model.state_dict().items()},
                            model_config={"model_type": "test"}, keep_last=None,
                            ledger_header={"args": {}, "input": {"url": "data/manifest.json", "sha256": "0" * 64},
                                           "properties": {"model_config_sha256": "x"}})
except RuntimeError as e:
    print("failed at the barrier:", e)
"""


@pytest.mark.distributed
def test_a_rank_that_fails_after_the_ledger_write_leaves_the_listed_steps_in_the_stored_metrics(s3_bucket, tmp_path):
    from pipeline import manifest, storage
    out = f"s3://{s3_bucket}/ledger-metrics-{uuid.uuid4().hex[:8]}"
    env = trainkit.train_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                             MASTER_PORT=str(trainkit.free_port()))
    done = subprocess.run([sys.executable, "-c", SCRIPT, out, str(tmp_path / "scratch")], env=env, cwd=trainkit.REPO,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "failed at the barrier" in done.stdout, done.stderr[-3000:]
    listed = [c.step for c in manifest.read_ledger(f"{out}/checkpoints/manifest.json").checkpoints]
    assert listed == [2]
    stored = [json.loads(line)["step"] for line in storage.read_bytes(f"{out}/metrics.jsonl").decode().splitlines()]
    assert stored == [1, 2]
