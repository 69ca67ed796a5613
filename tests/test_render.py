"""Stage 4 render: plan, run, commit; defaults from the checkpoint; resume; batch- and split-independence."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile

import renderkit
from pipeline import manifest as mf
from pipeline import render, storage
from pipeline.report.spectrogram import FIGURE_PIXELS

PROMPTS = [{"id": "flute", "prompt": "a solo flute", "seconds_start": 0, "seconds_total": 1,
            "negative_prompt": "noise"},
           {"prompt": "fast drums", "seconds_start": 0, "seconds_total": 1}]


@pytest.fixture(scope="module")
def config():
    return renderkit.tiny_config()


def write_prompts(url: str, prompts=PROMPTS) -> str:
    storage.write(url, "".join(json.dumps(p) + "\n" for p in prompts).encode())
    return url


def flac(url: str) -> tuple[np.ndarray, int]:
    return soundfile.read(io.BytesIO(storage.read_bytes(url)), dtype="int16", always_2d=True)


def test_render_writes_clips_page_and_manifest(store_url, config, tmp_path):
    ckpt = renderkit.export_checkpoint(storage.join(store_url, "in", "tiny-a.safetensors"), config, tmp_dir=str(tmp_path))
    del ckpt
    prompts = write_prompts(storage.join(store_url, "in", "prompts.jsonl"))
    out = storage.join(store_url, "render")
    rc = render.main(["--checkpoints", storage.join(store_url, "in", "tiny-a.safetensors"), "--prompts", prompts,
                      "--output", out, "--cfg-scales", "1,3", "--seeds", "0,1", "--steps", "2", "--seconds", "0.01",
                      "--batch-size", "3"])
    assert rc == 0
    m = mf.read_manifest(storage.join(out, "manifest.json"), stage="render")
    assert m.totals["outputs"] == 8 and m.totals["items"] == 8  # 2 prompts x 2 CFG x 2 seeds
    ids = sorted((e["prompt_id"], e["cfg"], e["seed"]) for e in m.outputs)
    assert ids == sorted((p, c, s) for p in ("flute", "p001") for c in (1.0, 3.0) for s in (0, 1))
    first = next(e for e in m.outputs if e["prompt_id"] == "flute" and e["cfg"] == 3.0 and e["seed"] == 1)
    assert first["audio"] == storage.join(out, "tiny-a", "flute", "cfg3-seed1.flac")
    audio, rate = flac(first["audio"])
    assert rate == 8000 and audio.shape == (80, 1)  # 0.01 s -> 20 latent frames x 4
    assert np.abs(audio).max() == 32767  # peak-normalised
    assert renderkit.decode_png(storage.read_bytes(first["image"])).shape[:2] == FIGURE_PIXELS[::-1]
    info = json.loads(storage.read_bytes(first["json"]))
    assert info["prompt"] == "a solo flute" and info["negative_metadata"]["prompt"] == "noise"
    assert (info["seed"], info["cfg"], info["sampler"], info["steps"], info["checkpoint"]) == (1, 3.0, "v-ddim", 2, "tiny-a")
    assert info["timings"]["batch_size"] >= 1 and info["timings"]["generate_seconds_per_item"] > 0
    page = storage.read_bytes(storage.join(out, "index.html")).decode()
    assert page.count("<audio") == 8 and 'src="tiny-a/flute/cfg3-seed1.flac"' in page
    assert "negative: noise" in page
    assert page.index("a solo flute") < page.index("fast drums")  # rows in the prompts file's order
    # committing again is a no-op; the clips differ by seed
    assert render.main(["commit", "--checkpoints", storage.join(store_url, "in", "tiny-a.safetensors"),
                        "--prompts", prompts, "--output", out, "--cfg-scales", "1,3", "--seeds", "0,1", "--steps", "2",
                        "--seconds", "0.01", "--batch-size", "3"]) == 0
    other = flac(storage.join(out, "tiny-a", "flute", "cfg3-seed0.flac"))[0]
    assert np.abs(other.astype(int) - audio.astype(int)).max() > 100


def test_defaults_come_from_the_checkpoint_config(config, tmp_path):
    ckpt = str(tmp_path / "tiny.safetensors")
    renderkit.export_checkpoint(ckpt, config)
    out = str(tmp_path / "out")
    assert render.main(["--checkpoints", ckpt, "--prompts", write_prompts(str(tmp_path / "p.jsonl"), PROMPTS[1:]),
                        "--output", out]) == 0
    (entry,) = mf.read_manifest(storage.join(out, "manifest.json")).outputs
    info = json.loads(storage.read_bytes(entry["json"]))
    # training.demo: demo_steps 4, demo_cfg_scales [3]; sample_size 256 = 64 latent frames; v -> v-ddim
    assert (info["steps"], info["cfg"], info["sampler"], info["length"], info["seed"]) == (4, 3.0, "v-ddim", 64, 0)
    assert flac(entry["audio"])[0].shape == (256, 1)


def args_for(ckpt, prompts, out, *extra):
    return ["--checkpoints", ckpt, "--prompts", prompts, "--output", out, "--cfg-scales", "3", "--seeds", "0,1,2",
            "--steps", "3", "--seconds", "0.008", "--sampler", "dpmpp-3m-sde", *extra]


def test_audio_does_not_depend_on_batch_size_or_task_split(config, tmp_path):
    ckpt = str(tmp_path / "tiny.safetensors")
    renderkit.export_checkpoint(ckpt, config)
    prompts = write_prompts(str(tmp_path / "p.jsonl"))
    one, split = str(tmp_path / "one"), str(tmp_path / "split")
    assert render.main(args_for(ckpt, prompts, one, "--batch-size", "1")) == 0
    assert render.main(["plan", *args_for(ckpt, prompts, split)]) == 0
    for k in (1, 0):
        assert render.main(args_for(ckpt, prompts, split, "--batch-size", "4", "--task-index", str(k),
                                    "--num-tasks", "2")) == 0
    assert not storage.exists(storage.join(split, "manifest.json"))  # tasks of many do not commit
    assert render.main(["commit", *args_for(ckpt, prompts, split, "--num-tasks", "2")]) == 0
    a, b = (mf.read_manifest(storage.join(d, "manifest.json")) for d in (one, split))
    assert len(a.outputs) == len(b.outputs) == 6
    for x, y in zip(sorted(a.outputs, key=lambda e: e["audio"]), sorted(b.outputs, key=lambda e: e["audio"])):
        ax, ay = flac(x["audio"])[0].astype(int), flac(y["audio"])[0].astype(int)
        assert np.abs(ax - ay).max() <= 1  # the same audio up to one 16-bit step of rounding


def test_resume_skips_finished_items_and_redoes_only_the_missing(config, tmp_path):
    ckpt = str(tmp_path / "tiny.safetensors")
    renderkit.export_checkpoint(ckpt, config)
    prompts = write_prompts(str(tmp_path / "p.jsonl"))
    out = str(tmp_path / "out")
    assert render.main(args_for(ckpt, prompts, out)) == 0
    # Play a task killed before its part file: one item lost its JSON, the others are complete.
    storage.delete(storage.join(out, "manifest.json"))
    storage.delete(mf.part_url(out, 0, 1))
    lost = storage.join(out, "tiny", "flute", "cfg3-seed1")
    storage.delete(lost + ".json")
    kept = storage.join(out, "tiny", "p001", "cfg3-seed2.flac")
    storage.write(kept, b"sentinel: must not be regenerated")
    before = flac(lost + ".flac")[0].astype(int)
    storage.write(lost + ".flac", b"half-written")
    assert render.main(args_for(ckpt, prompts, out)) == 0
    assert storage.read_bytes(kept) == b"sentinel: must not be regenerated"
    assert storage.exists(lost + ".json")  # regenerated alone now, in a batch before: equal up to rounding
    assert np.abs(flac(lost + ".flac")[0].astype(int) - before).max() <= 1
    assert mf.read_manifest(storage.join(out, "manifest.json")).totals["outputs"] == 6
    # A task whose part exists is finished: nothing is redone.
    storage.delete(lost + ".json")
    assert render.main(args_for(ckpt, prompts, out)) == 0
    assert not storage.exists(lost + ".json")


def test_ledger_input_renders_the_chosen_steps(config, tmp_path):
    entries = []
    for step in (100, 200):
        url = str(tmp_path / "train" / "checkpoints" / f"step-{step}" / "ema.safetensors")
        renderkit.export_checkpoint(url, config, seed=step)
        entries.append(mf.CheckpointEntry(step=step, tag=f"step-{step}", checkpoint_url=url.rsplit("/", 1)[0],
                                          export_url=url, export_sha256=storage.sha256_url(url), ema=True))
    ledger_url = str(tmp_path / "train" / "checkpoints" / "manifest.json")
    mf.write_ledger(ledger_url, mf.Ledger(stage="train", args={}, input={"url": "x", "sha256": "0" * 64},
                                          properties={"model_config_sha256": "c" * 64}, checkpoints=tuple(entries)))
    prompts = write_prompts(str(tmp_path / "p.jsonl"), PROMPTS[1:])
    out = str(tmp_path / "out")
    assert render.main(["--checkpoints", ledger_url, "--checkpoint-steps", "200", "--prompts", prompts,
                        "--output", out, "--steps", "1", "--seconds", "0.004"]) == 0
    m = mf.read_manifest(storage.join(out, "manifest.json"))
    assert {e["checkpoint"] for e in m.outputs} == {"step-200"}
    assert m.properties["checkpoints"]["step-200"]["step"] == 200
    assert m.properties["checkpoints"]["step-200"]["identity"]["sha256"] == entries[1].export_sha256
    everything = str(tmp_path / "all")
    assert render.main(["--checkpoints", ledger_url, "--prompts", prompts, "--output", everything, "--steps", "1",
                        "--seconds", "0.004"]) == 0
    page = storage.read_bytes(storage.join(everything, "index.html")).decode()
    assert page.index(">step-100<") < page.index(">step-200<")


def test_inputs_are_checked_with_a_message_that_says_what_to_change(config, tmp_path, capsys):
    bare = str(tmp_path / "sat.safetensors")
    renderkit.export_checkpoint(bare, config, with_config=False)
    prompts = write_prompts(str(tmp_path / "p.jsonl"), PROMPTS[1:])
    base = ["--prompts", prompts, "--steps", "1", "--seconds", "0.004"]
    assert render.main(["--checkpoints", bare, "--output", str(tmp_path / "a"), *base]) == 2
    assert "pass its config with --model-config" in capsys.readouterr().err
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    assert render.main(["--checkpoints", bare, "--model-config", str(config_file), "--output",
                        str(tmp_path / "a"), *base]) == 0
    no_total = write_prompts(str(tmp_path / "q.jsonl"), [{"prompt": "x", "seconds_start": 0}])
    assert render.main(["--checkpoints", bare, "--model-config", str(config_file), "--prompts", no_total,
                        "--output", str(tmp_path / "b"), "--dry-run"]) == 2
    assert "no 'seconds_total'" in capsys.readouterr().err
    assert render.main(["--checkpoints", bare, "--model-config", str(config_file), "--output",
                        str(tmp_path / "c"), "--sampler", "euler", *base]) == 2
    assert "samples 'rectified_flow' models" in capsys.readouterr().err
    deeper = {**config, "model": {**config["model"], "diffusion": {**config["model"]["diffusion"], "config": {
        **config["model"]["diffusion"]["config"], "depth": 2}}}}
    (tmp_path / "deeper.json").write_text(json.dumps(deeper))
    assert render.main(["--checkpoints", bare, "--model-config", str(tmp_path / "deeper.json"), "--output",
                        str(tmp_path / "d"), *base]) == 2
    err = capsys.readouterr().err
    assert "weights do not match the model config: " in err and " missing (e.g. ['model.model.transformer.layers.1." \
        in err and err.count("\n") == 1
    # Re-planning the same output with other settings is refused.
    assert render.main(["--checkpoints", bare, "--model-config", str(config_file), "--output",
                        str(tmp_path / "a"), *base[:-2], "--seconds", "0.008"]) == 2
    err = capsys.readouterr().err
    assert "is committed with other settings (seconds: 0.004 there, 0.008 now); plan (1 items there, 1 now, " \
        "other items)" in err


def test_dry_run_checks_everything_and_writes_nothing(config, tmp_path):
    ckpt = str(tmp_path / "tiny.safetensors")
    renderkit.export_checkpoint(ckpt, config)
    out = tmp_path / "out"
    assert render.main(["--checkpoints", ckpt, "--prompts", write_prompts(str(tmp_path / "p.jsonl")),
                        "--output", str(out), "--dry-run"]) == 0
    assert not out.exists()


def test_reference_clips_nearest_to_each_prompt_go_through_the_vae_onto_the_page(config, tmp_path):
    """``--reference``: per prompt, the real clips with the most equal labels (then caption words), encoded
    and decoded by the checkpoint's VAE, written under references/ and shown in a "real clips" column."""
    reference = tmp_path / "reference"
    reference.mkdir()
    t = np.arange(4000) / 8000
    rows = [("a.flac", "flute", "a flute tune"), ("b.flac", "drums", "a drum groove"), ("c.flac", "flute", "flute air")]
    with open(reference / "metadata.jsonl", "w") as f:
        for name, instrument, prompt in rows:
            soundfile.write(reference / name, 0.3 * np.sin(2 * np.pi * 440 * t), 8000)
            f.write(json.dumps({"path": name, "instrument": instrument, "prompt": prompt}) + "\n")
    ckpt = str(tmp_path / "tiny.safetensors")
    renderkit.export_checkpoint(ckpt, config, tmp_dir=str(tmp_path))
    prompts = write_prompts(str(tmp_path / "prompts.jsonl"),
                            [{"id": "fl", "prompt": "solo flute air", "instrument": "flute", "seconds_start": 0, "seconds_total": 1},
                             {"id": "dr", "prompt": "drums", "instrument": "drums", "seconds_start": 0, "seconds_total": 1}])
    out = str(tmp_path / "render")
    assert render.main(["--checkpoints", ckpt, "--prompts", prompts, "--output", out, "--cfg-scales", "1",
                        "--steps", "2", "--seconds", "0.01", "--reference", str(reference),
                        "--references-per-prompt", "2"]) == 0
    sources = {pid: [json.loads(storage.read_bytes(f"{out}/references/{pid}/{n}.json"))["source"].rsplit("/", 1)[1]
                     for n in range(2)] for pid in ("fl", "dr")}
    assert sources == {"fl": ["c.flac", "a.flac"], "dr": ["b.flac", "a.flac"]}  # labels first, then caption words
    audio, rate = flac(f"{out}/references/fl/0.flac")
    assert rate == 8000 and audio.shape == (4000, 1)  # 0.5 s through a ratio-4 VAE
    page = storage.read_bytes(storage.join(out, "index.html")).decode()
    assert "real clips" in page and 'src="references/fl/0.flac"' in page and "through the VAE" in page


def test_a_committed_render_is_never_rewritten(config, tmp_path, capsys):
    ckpt = str(tmp_path / "tiny.safetensors")
    renderkit.export_checkpoint(ckpt, config)
    prompts = write_prompts(str(tmp_path / "p.jsonl"))
    out = str(tmp_path / "out")
    assert render.main(["plan", *args_for(ckpt, prompts, out)]) == 0
    for k in (0, 1):
        assert render.main(args_for(ckpt, prompts, out, "--task-index", str(k), "--num-tasks", "2")) == 0
    assert render.main(["commit", *args_for(ckpt, prompts, out, "--num-tasks", "2")]) == 0
    files = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*") if p.is_file()}
    capsys.readouterr()
    for extra in (["--task-index", "0", "--num-tasks", "3"], []):
        assert render.main(args_for(ckpt, prompts, out, *extra)) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is committed with other task count (2 there, " in err
    assert render.main(["commit", *args_for(ckpt, prompts, out, "--num-tasks", "2", "--seeds", "0,1")]) == 2
    assert "settings (seeds: [0, 1, 2] there, [0, 1] now)" in capsys.readouterr().err
    assert render.main(args_for(ckpt, prompts, out, "--task-index", "1", "--num-tasks", "2", "--batch-size", "5")) == 0
    assert render.main(["commit", *args_for(ckpt, prompts, out, "--num-tasks", "2")]) == 0
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*") if p.is_file()} == files
