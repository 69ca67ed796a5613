"""The embedded default: every stage on local storage with the local launcher, one after another.

Builds the small real-music demo set, shards it, trains a small VAE (the train stage with
``model_type: autoencoder``), pre-encodes the train and validation sets, trains a small DiT, renders,
runs the probe, and prints a table per stage and the path of the demo page. A stage whose output
exists is skipped, so a second run finishes what a first one left. The same commands run on a cluster;
only the URLs and the launcher change.
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
PROMPTS = [  # one per instrument family of the demo set; labels pick the nearest real clips shown beside each
    {"id": "piano-chorale", "prompt": "Bach chorale by Johann Sebastian Bach played on piano, G major, 4/4, 80 BPM",
     "instrument": "piano", "key": "G major"},
    {"id": "organ-chorale", "prompt": "Bach chorale by Johann Sebastian Bach played on church organ, C major, 4/4, "
     "72 BPM", "instrument": "church organ", "key": "C major"},
    {"id": "choir-mass", "prompt": "Renaissance mass by Giovanni Pierluigi da Palestrina sung by choir, A minor, 4/2, "
     "60 BPM", "instrument": "choir", "key": "A minor"},
    {"id": "strings-quartet", "prompt": "Classical string quartet by Wolfgang Amadeus Mozart played on string "
     "orchestra, D major, 3/4, 120 BPM", "instrument": "string orchestra", "key": "D major"},
    {"id": "flute-reel", "prompt": "reel, Irish folk tune played on flute, D major, 4/4, 120 BPM", "instrument": "flute",
     "key": "D major"},
    {"id": "brass-march", "prompt": "march, German folk song played on brass quartet, F major, 2/4, 100 BPM",
     "instrument": "brass quartet", "key": "F major"},
]
for _p in PROMPTS:
    _p.update(seconds_start=0, seconds_total=5)  # the demo clips are 5 s long (the DiT's timing conditioning)


class Chain:
    """Runs stages in order and records (stage, items, seconds, throughput, status)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, str, float, str, str]] = []

    def run(self, name: str, cmd: list[str], done: Path, count=None, unit: str = "items", steps: int = 0) -> bool:
        """``done`` is the stage's output manifest; for a train run (``steps`` > 0) its ledger must also
        list the final step, else the trainer runs again and resumes."""
        def complete() -> bool:
            return done.exists() and (not steps or int(ledger_step(done)) >= steps)

        if complete():
            self.rows.append((name, count(done) if count else "-", 0.0, "-", "done before"))
            return True
        print(f"\n== {name}: {' '.join(cmd)}", flush=True)
        start = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        seconds = time.time() - start
        if proc.returncode != 0 or not complete():
            self.rows.append((name, "-", seconds, "-", f"failed (exit {proc.returncode})"))
            return False
        items = count(done) if count else "-"
        rate = f"{float(items) / seconds:.1f} {unit}/s" if items not in ("-", "0") else "-"
        self.rows.append((name, items, seconds, rate, "ok"))
        return True

    def table(self) -> str:
        lines = [f"{'stage':<16} {'items':>8} {'seconds':>9}  {'throughput':<18} status"]
        lines += [f"{n:<16} {i:>8} {s:>9.1f}  {r:<18} {st}" for n, i, s, r, st in self.rows]
        return "\n".join(lines)


def samples(path: Path) -> str:
    totals = json.loads(path.read_text())["totals"]
    return str(totals.get("samples", totals.get("outputs", 0)))


def lines(path: Path) -> str:
    return str(sum(1 for _ in path.open()))


def ledger_step(path: Path) -> str:
    checkpoints = json.loads(path.read_text())["checkpoints"]
    return str(max(c["step"] for c in checkpoints)) if checkpoints else "0"


def probe_summary(probe: dict) -> str:
    """The probe's verdict in a few lines (the whole report is probe.json)."""
    loss = probe["loss"]
    lines = [f"probe at step {probe['checkpoint']['step']}: validation loss {loss['mean_true_loss']:.4f} with the "
             f"true prompts vs {loss['mean_shuffled_loss']:.4f} shuffled (z = {loss['z']:.1f}; uses its prompts: "
             f"{'yes' if loss['uses_prompts'] else 'no'})"]
    audio = probe.get("audio") or {}
    for score in ("key", "instrument"):
        s = audio.get(score) or {}
        if "generated" in s:
            row = f"  {score:<10} generated {s['generated']['mean']:.2f}  chance {s['chance']['mean']:.2f}"
            for name, label in (("ceiling", "real clips"), ("through_vae", "real clips through the VAE")):
                if (s.get(name) or {}).get("mean") is not None:
                    row += f"  {label} {s[name]['mean']:.2f}"
            if (s.get("generated_minus_chance") or {}).get("se"):
                d = s["generated_minus_chance"]
                row += f"  (generated - chance {d['mean']:+.3f} +- {d['se']:.3f}, z = {d['mean'] / d['se']:.1f})"
            lines.append(row)
    spread = audio.get("spread") or {}
    if "ratio" in spread:
        lines.append(f"  clips differ between prompts {spread['ratio']:.2f}x as much as between seeds "
                     f"({spread['chance_ratio']:.2f} if the prompt changed nothing)")
    from pipeline.report.scores import format_confusion
    for name, table in ((audio.get("instrument") or {}).get("confusion") or {}).items():
        lines.append(format_confusion(f"  instrument confusion, {name.replace('_', ' ')} (rows: prompted, "
                                      "columns: predicted)", table))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "demo_out"), help="where everything is written")
    parser.add_argument("--num-clips", type=int, default=300, help="clips in the demo dataset")
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each clip")
    parser.add_argument("--palette", choices=("families", "score"), default="families",
                        help="instruments of the demo set: six distinct families, or each score's own (17)")
    parser.add_argument("--vae-steps", type=int, default=300, help="VAE training steps")
    parser.add_argument("--dit-steps", type=int, default=2000, help="DiT training steps")
    parser.add_argument("--batch-size", type=int, default=8, help="training batch size")
    args = parser.parse_args()
    out, py = Path(args.out), sys.executable
    data, shards, vae, dit = out / "dataset", out / "shards", out / "vae", out / "dit"
    latents, latents_val, render = out / "latents", out / "latents_val", out / "render"
    prompts = out / "prompts.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    train = [py, "pipeline/train.py", "--ds_config", "ds_configs/zero2_cpu.json", "--wandb", "off",
             "--batch-size", str(args.batch_size), "--num-workers", "1"]
    vae_ledger, dit_ledger = vae / "checkpoints" / "manifest.json", dit / "checkpoints" / "manifest.json"
    chain = Chain()
    stages = [
        ("dataset", [py, "tools/make_demo_dataset.py", "--out", str(data), "--num-clips", str(args.num_clips),
                     "--seconds", str(args.seconds), "--sample-rate", "16000", "--channels", "1", "--palette", args.palette],
         data / "metadata.jsonl", lines, "clips", 0),
        ("shard", [py, "-m", "pipeline.shard", "--input", str(data), "--captions", str(data / "metadata.jsonl"),
                   "--output", str(shards), "--sample-rate", "16000", "--channels", "1", "--val-fraction", "0.1"],
         shards / "manifest.json", samples, "clips", 0),
        ("train VAE", train + ["--model-config", "configs/demo_vae.json", "--data", str(shards / "manifest.json"),
                               "--output", str(vae), "--max-steps", str(args.vae_steps),
                               "--checkpoint-every", str(args.vae_steps)],
         vae_ledger, ledger_step, "steps", args.vae_steps),
    ]
    encode = [py, "-m", "pipeline.pre_encode", "--model-config", "configs/demo_dit.json",
              "--pretransform-ckpt", str(vae_ledger), "--batch-size", "16"]
    stages += [
        ("pre_encode", encode + ["--input", str(shards / "manifest.json"), "--output", str(latents)],
         latents / "manifest.json", samples, "windows", 0),
        ("pre_encode val", encode + ["--input", str(shards / "val" / "manifest.json"), "--output", str(latents_val)],
         latents_val / "manifest.json", samples, "windows", 0),
        ("train DiT", train + ["--model-config", "configs/demo_dit.json", "--data", str(latents / "manifest.json"),
                               "--val-data", str(latents_val / "manifest.json"), "--val-every", "250",
                               "--output", str(dit), "--max-steps", str(args.dit_steps),
                               "--checkpoint-every", str(args.dit_steps // 2)],
         dit_ledger, ledger_step, "steps", args.dit_steps),
        ("render", [py, "-m", "pipeline.render", "--checkpoints", str(dit_ledger), "--prompts", str(prompts),
                    "--output", str(render), "--cfg-scales", "1,3,6", "--seeds", "0", "--reference", str(data)],
         render / "manifest.json", samples, "clips", 0),
        ("probe", [py, "-m", "pipeline.probe", "--checkpoint", str(dit_ledger), "--data",
                   str(latents_val / "manifest.json"), "--reference", str(data), "--num-prompts", "8", "--seeds-per-prompt", "4",
                   "--cfg-scale", "6",  # bench/RESULTS.md: the probe at CFG 1, 3, 6
                   "--out", str(out / "probe.json")],
         out / "probe.json", None, "items", 0),
    ]
    for name, cmd, done, count, unit, steps in stages:
        if not chain.run(name, cmd, done, count, unit, steps):
            break
    print("\n" + chain.table())
    if (out / "probe.json").exists():
        print("\n" + probe_summary(json.loads((out / "probe.json").read_text())))
    if (render / "index.html").exists():
        print(f"\ndemo page: {render / 'index.html'}")
    if (dit / "demos" / "index.html").exists():
        print(f"training demos: {dit / 'demos' / 'index.html'}")
    return 0 if all(row[-1] in ("ok", "done before") for row in chain.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
