"""pipeline.manifest: manifests, plans, parts, commit and the train ledger, on both backends."""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time

import pytest

from pipeline import manifest as mf
from pipeline import storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT = {"url": "s3://b/in/manifest.json", "sha256": "0" * 64}


def shard(url, samples=2):
    return mf.entry("shard", url=url, samples=samples, bytes=100 * samples, sha256="a" * 64, seconds=1.5 * samples)


def make_manifest(**changes):
    fields = dict(stage="shard", args={"sample_rate": 44100}, input=INPUT, properties={"channels": 2},
                  totals={"samples": 4}, rejects="s3://b/out/rejects.jsonl",
                  outputs=(shard("s3://b/out/shard-0-0.tar"), shard("s3://b/out/shard-1-0.tar")))
    return mf.Manifest(**{**fields, **changes})


def test_canonical_json_and_sha256_are_stable():
    assert mf.canonical_json({"b": 1, "a": [1, "é"]}) == '{"a":[1,"é"],"b":1}'
    assert mf.sha256_bytes(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_manifest_round_trips_and_rewriting_the_same_content_is_a_no_op(store_url):
    url = storage.join(store_url, "manifest.json")
    m = make_manifest()
    assert m.format == "cantus.manifest/1" and m.code_version and m.created
    assert mf.write_manifest(url, m) is True
    assert mf.read_manifest(url, stage="shard") == m
    later = dataclasses.replace(m, created="2099-01-01T00:00:00+00:00",
                                totals={**m.totals, "timing_seconds": 9.5, "seconds_elapsed": 3})
    assert mf.write_manifest(url, later) is False  # only volatile fields differ
    assert mf.read_manifest(url).created == m.created


def test_different_content_over_an_existing_manifest_is_an_error_naming_the_fields(store_url):
    url = storage.join(store_url, "manifest.json")
    mf.write_manifest(url, make_manifest())
    with pytest.raises(mf.ManifestError, match="a different manifest already exists .*: args, outputs"):
        mf.write_manifest(url, make_manifest(args={"sample_rate": 16000}, outputs=()))


def test_same_content_ignores_only_volatile_fields():
    a = {"created": 1, "x": {"load_timing": 2, "seconds_elapsed": 3, "seconds": 4}}
    assert mf.same_content(a, {"created": 9, "x": {"load_timing": 8, "seconds_elapsed": 7, "seconds": 4}})
    assert not mf.same_content(a, {"created": 1, "x": {"seconds": 5}})  # audio seconds are content


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("args"), r"missing fields \['args'\], unknown fields \[\]"),
    (lambda d: d.update(extra=1), r"missing fields \[\], unknown fields \['extra'\]"),
    (lambda d: d.update(format="cantus.manifest/0"), "format='cantus.manifest/0', expected 'cantus.manifest/1'"),
    (lambda d: d.update(stage="mix"), "stage='mix': expected one of"),
    (lambda d: d.update(input={"url": "x"}), "input=.*expected"),
    (lambda d: d["outputs"][1].pop("sha256"), r"outputs\[1\]: missing field 'sha256'"),
    (lambda d: d["outputs"][0].update(samples="2"), r"outputs\[0\].samples='2': expected int"),
])
def test_read_manifest_rejects_bad_content_naming_the_url(store_url, edit, message):
    url = storage.join(store_url, "manifest.json")
    d = make_manifest().to_dict()
    edit(d)
    storage.write(url, json.dumps(d).encode())
    with pytest.raises(mf.ManifestError, match=f"^{re.escape(url)}: .*{message}"):
        mf.read_manifest(url)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["outputs"][1].update(samples=-1), r"outputs\[1\].samples=-1: expected a finite number >= 0"),
    (lambda d: d["outputs"][0].update(bytes=-100), r"outputs\[0\].bytes=-100: expected a finite number >= 0"),
    (lambda d: d["outputs"][0].update(seconds=float("nan")), r"outputs\[0\].seconds=nan: expected a finite"),
    (lambda d: d["outputs"][0].update(sha256="A" * 64), r"outputs\[0\].sha256='A+': expected 64 lowercase hex"),
    (lambda d: d.update(outputs=[*d["outputs"], dict(d["outputs"][0])]),
     r"outputs\[2\].url='s3://b/out/shard-0-0.tar' is listed twice \(also outputs\[0\]\)"),
    (lambda d: d["totals"].update(samples=5), r"totals.samples=5, but the outputs hold 4"),
    (lambda d: d.update(outputs=[], totals={}), r"holds no sample \(0 outputs, 0 samples\)"),
    (lambda d: [e.update(samples=0) for e in d["outputs"]] and d.update(totals={}), r"holds no sample \(2 outputs"),
])
def test_read_manifest_refuses_impossible_counts_duplicates_and_empty_outputs(store_url, edit, message):
    url = storage.join(store_url, "manifest.json")
    d = make_manifest().to_dict()
    edit(d)
    storage.write(url, json.dumps(d).encode())
    with pytest.raises(mf.ManifestError, match=f"^{re.escape(url)}: {message}"):
        mf.read_manifest(url)


def test_a_render_manifest_listing_one_clip_twice_is_refused(tmp_path):
    clip = mf.entry("render", audio="o/a.flac", image="o/a.png", json="o/a.json", checkpoint="c", prompt_id="p",
                    cfg=3.0, seed=0)
    url = str(tmp_path / "manifest.json")
    storage.write(url, json.dumps(make_manifest(stage="render", totals={}, outputs=(clip, clip)).to_dict()).encode())
    with pytest.raises(mf.ManifestError, match=r"outputs\[1\].audio='o/a.flac' is listed twice"):
        mf.read_manifest(url)


def test_commit_refuses_an_output_without_samples_and_writes_no_manifest(store_url):
    run_tasks(store_url, 2, items=4, reject={f"src/{i:03d}.flac" for i in range(4)})
    with pytest.raises(mf.ManifestError, match=r"cannot commit: .*manifest.json: holds no sample .*rejects.jsonl"):
        mf.commit(store_url, stage="shard", num_tasks=2, args={}, input=INPUT, properties={})
    assert not storage.exists(storage.join(store_url, "manifest.json"))
    run_tasks(storage.join(store_url, "b"), 2, items=4)
    with pytest.raises(mf.ManifestError, match=r"cannot commit: .*/b/val/manifest.json: holds no sample"):
        mf.commit(storage.join(store_url, "b"), stage="shard", num_tasks=2, args={}, input=INPUT, properties={},
                  group=lambda es: {"": es, "val": []})
    assert not storage.exists(storage.join(store_url, "b", "manifest.json"))


def test_part_task_counts_lists_the_parts_by_task_count(store_url):
    run_tasks(store_url, 2, items=4)
    mf.write_part(store_url, mf.Part(task=1, num_tasks=3, items=(), outputs=()))
    counts = mf.part_task_counts(store_url)
    assert sorted(counts) == [2, 3] and counts[3] == [mf.part_url(store_url, 1, 3)] and len(counts[2]) == 2
    assert mf.part_task_counts(storage.join(store_url, "nothing")) == {}


def test_read_manifest_names_missing_partial_and_wrong_stage_manifests(store_url):
    url = storage.join(store_url, "manifest.json")
    with pytest.raises(mf.ManifestError, match=f"^{re.escape(url)}: no manifest here"):
        mf.read_manifest(url)
    storage.write(url, json.dumps(make_manifest().to_dict()).encode()[:-20])
    with pytest.raises(mf.ManifestError, match=f"^{re.escape(url)}: manifest is not valid JSON .* partial or corrupt"):
        mf.read_manifest(url)
    storage.write(url, json.dumps(make_manifest().to_dict()).encode())
    with pytest.raises(mf.ManifestError, match="a 'shard' manifest, expected the output of 'pre_encode'"):
        mf.read_manifest(url, stage="pre_encode")


def test_entry_checks_the_fields_of_each_stage():
    e = mf.entry("render", audio="a.flac", image="a.png", json="a.json", checkpoint="s3://c/ema.safetensors",
                 prompt_id="p0", cfg=7.0, seed=1, extra="allowed")
    assert e["cfg"] == 7.0
    with pytest.raises(mf.ManifestError, match="missing field 'seed'"):
        mf.entry("render", audio="a", image="a", json="a", checkpoint="c", prompt_id="p", cfg=1)
    with pytest.raises(mf.ManifestError, match="samples=True: expected int"):
        mf.entry("shard", url="u", samples=True, bytes=1, sha256="s", seconds=1)


def test_plan_is_written_once_sorted_and_split_by_modulo(store_url):
    items = [{"id": f"in/{c}.wav", "size": i} for i, c in enumerate("dbeac")]
    plan = mf.write_plan(store_url, items)
    assert [it["id"] for it in plan] == [f"in/{c}.wav" for c in "abcde"]
    assert mf.write_plan(store_url, reversed(items)) == plan  # same items: a no-op
    assert mf.read_plan(store_url) == plan
    with pytest.raises(mf.ManifestError, match="a different plan already exists"):
        mf.write_plan(store_url, items[:4])
    split = [mf.items_for_task(plan, k, 3) for k in range(3)]
    assert [[it["id"][3] for it in s] for s in split] == [["a", "d"], ["b", "e"], ["c"]]
    with pytest.raises(mf.ManifestError, match="ids must be unique, repeated: x"):
        mf.write_plan(storage.join(store_url, "other"), [{"id": "x"}, {"id": "x"}])


def run_tasks(out, n, items=8, skip_task=None, drop=(), dup=(), reject=()):
    """Plan ``items`` inputs and play ``n`` tasks: each writes one shard per owned item, except dropped
    items; ``dup`` items are also claimed by the next task; ``reject`` items are rejected."""
    plan = mf.write_plan(out, [{"id": f"src/{i:03d}.flac", "size": i} for i in range(items)])
    for k in range(n):
        if k == skip_task:
            continue
        mine = [it["id"] for it in mf.items_for_task(plan, k, n) if it["id"] not in drop]
        mine += [it["id"] for it in mf.items_for_task(plan, (k - 1) % n, n) if it["id"] in dup]
        done = [i for i in mine if i not in reject]
        part = mf.Part(task=k, num_tasks=n, items=done,
                       outputs=[shard(storage.join(out, f"shard-{k}-{j}.tar")) for j in range(len(done))],
                       rejects=[{"id": i, "reason": "silent"} for i in mine if i in reject])
        assert mf.write_part(out, part) is True
        assert mf.read_part(out, k, n) == part
    return plan


def test_commit_merges_parts_writes_manifest_and_rejects_and_is_a_no_op_when_repeated(store_url):
    run_tasks(store_url, 3, reject={"src/004.flac"})
    assert mf.read_part(store_url, 0, 4) is None  # a different task count: not finished
    m = mf.commit(store_url, stage="shard", num_tasks=3, args={"a": 1}, input=INPUT, properties={"sr": 44100})
    assert m == mf.read_manifest(storage.join(store_url, "manifest.json"))
    assert m.totals == {"outputs": 7, "samples": 14, "bytes": 1400, "seconds": 21.0, "items": 8, "rejects": 1,
                        "tasks": 3}
    assert m.rejects == storage.join(store_url, "rejects.jsonl")
    assert storage.read_bytes(m.rejects) == b'{"id":"src/004.flac","reason":"silent"}\n'
    again = mf.commit(store_url, stage="shard", num_tasks=3, args={"a": 1}, input=INPUT, properties={"sr": 44100})
    assert mf.same_content(again.to_dict(), m.to_dict())
    with pytest.raises(mf.ManifestError, match="a different manifest already exists .*: args"):
        mf.commit(store_url, stage="shard", num_tasks=3, args={"a": 2}, input=INPUT, properties={"sr": 44100})


def test_commit_writes_one_manifest_per_group(store_url):
    run_tasks(store_url, 2, items=4)
    val = {storage.join(store_url, "shard-1-0.tar")}
    m = mf.commit(store_url, stage="shard", num_tasks=2, args={}, input=INPUT, properties={},
                  group=lambda es: {"": [e for e in es if e["url"] not in val],
                                    "val": [e for e in es if e["url"] in val]})
    v = mf.read_manifest(storage.join(store_url, "val", "manifest.json"))
    assert [e["url"] for e in v.outputs] == sorted(val) and v.totals["outputs"] == 1
    assert len(m.outputs) == 3 and m.totals["items"] == 4


def test_commit_names_the_tasks_that_have_not_finished(store_url):
    run_tasks(store_url, 4, skip_task=2)
    with pytest.raises(mf.ManifestError, match=r"1 of 4 tasks have not finished .*part-2-of-4.json.*tasks 2;"):
        mf.commit(store_url, stage="shard", num_tasks=4, args={}, input=INPUT, properties={})


def test_commit_detects_an_item_that_no_task_finished(store_url):
    run_tasks(store_url, 3, drop={"src/005.flac"})
    with pytest.raises(mf.ManifestError, match="1 planned items neither finished nor rejected: src/005.flac; "
                                               "tasks owning missing items: 2"):
        mf.commit(store_url, stage="shard", num_tasks=3, args={}, input=INPUT, properties={})
    assert not storage.exists(storage.join(store_url, "manifest.json"))


def test_commit_detects_an_item_finished_twice(store_url):
    run_tasks(store_url, 3, dup={"src/001.flac"})
    with pytest.raises(mf.ManifestError, match=r"src/001.flac \(task 2, owner 1\).*1 items finished twice: src/001.flac"):
        mf.commit(store_url, stage="shard", num_tasks=3, args={}, input=INPUT, properties={})


def test_ledger_adds_checkpoints_keeps_the_last_and_round_trips(store_url):
    url = storage.join(store_url, "checkpoints", "manifest.json")
    ledger = mf.Ledger(stage="train", args={}, input=INPUT, properties={"model_config_sha256": "c" * 64})
    for step in (300, 100, 200, 400):
        ledger = ledger.add(mf.CheckpointEntry(
            step=step, tag=f"step-{step}", checkpoint_url=storage.join(store_url, "checkpoints", f"step-{step}"),
            export_url=f"step-{step}/ema.safetensors", export_sha256="e" * 64, ema=True))
        mf.write_ledger(url, ledger)
    assert [c.step for c in mf.read_ledger(url).checkpoints] == [100, 200, 300, 400]
    ledger = ledger.add(dataclasses.replace(ledger.at_step(400), export_sha256="f" * 64))  # re-saved step
    kept, removed = ledger.keep_last(2)
    assert [c.step for c in removed] == [100, 200] and [c.step for c in kept.checkpoints] == [300, 400]
    mf.write_ledger(url, kept)
    back = mf.read_ledger(url)
    assert back == kept and back.at_step().export_sha256 == "f" * 64
    with pytest.raises(mf.ManifestError, match=r"no checkpoint at step 100; the ledger has steps \[300, 400\]"):
        back.at_step(100)
    with pytest.raises(mf.ManifestError, match="properties need 'model_config_sha256'"):
        mf.Ledger(stage="train", args={}, input=INPUT)


COMMITTER = """
import pathlib, sys, time
from pipeline import manifest as mf, storage
storage.exists({out!r})  # warm up the client before the race
pathlib.Path({ready!r} + sys.argv[1]).touch()
while not pathlib.Path({go!r}).exists():
    time.sleep(0.005)
try:
    mf.commit({out!r}, stage="shard", num_tasks=2, args={{"run": sys.argv[1]}}, input={input!r}, properties={{}})
except mf.ManifestError as e:
    print(e)
    sys.exit(3)
"""


def test_two_processes_committing_at_once_exactly_one_wins(store_url, tmp_path):
    run_tasks(store_url, 2, items=6)
    script = COMMITTER.format(out=store_url, ready=str(tmp_path / "ready-"), go=str(tmp_path / "go"), input=INPUT)
    procs = [subprocess.Popen([sys.executable, "-c", script, name], cwd=REPO, stdout=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"ready-{n}").exists() for n in "ab"):
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.01)
    (tmp_path / "go").touch()
    codes = [p.wait(timeout=60) for p in procs]
    assert sorted(codes) == [0, 3], codes
    winner = "ab"[codes.index(0)]
    loser_says = procs[codes.index(3)].stdout.read()
    assert "a different manifest already exists" in loser_says
    m = mf.read_manifest(storage.join(store_url, "manifest.json"))
    assert m.args == {"run": winner} and m.totals["outputs"] == 6
