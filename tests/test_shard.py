"""Stage 1 `shard`: the bad-input corpus, local and S3, kill-and-resume, N tasks == 1 task, the CLI."""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import math
import os
import re
import signal
import struct
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline import manifest as mf
from pipeline import storage
from pipeline.data import audio as audio_io
from pipeline.data.shards import iter_samples
from pipeline.shard import main

import proctree  # tests/proctree.py

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "bad_audio"))
import generate  # noqa: E402  (the corpus generator, tests/fixtures/bad_audio/generate.py)

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--sample-rate", "16000", "--channels", "2", "--window-seconds", "4", "--max-reject-fraction", "1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, generate.build(root)


def shard(input_url, output_url, *extra, captions=True):
    argv = ["--input", str(input_url), "--output", output_url, *COMMON, *extra]
    if captions:
        argv += ["--captions", storage.join(str(input_url), generate.ROOT_CAPTIONS)]
    return main(argv)


def read_samples(out_url: str) -> dict[str, tuple[dict, bytes]]:
    """Every sample of the main and val manifests, by key; fails on a key seen twice."""
    found = {}
    for sub in ("", "val"):
        url = storage.join(out_url, sub, "manifest.json")
        if sub and not storage.exists(url):
            continue
        m = mf.read_manifest(url, stage="shard")
        for entry in m.outputs:
            assert storage.sha256_url(entry["url"]) == entry["sha256"]
            n = 0
            for key, members in iter_samples(entry["url"]):
                assert key not in found, f"{key} in two places"
                found[key] = (json.loads(members["json"]), members["flac"])
                n += 1
            assert n == entry["samples"]
    return found


def read_rejects(out_url: str) -> list[dict]:
    text = storage.read_bytes(storage.join(out_url, "rejects.jsonl")).decode()
    return [json.loads(line) for line in text.splitlines()]


def fingerprint(out_url: str) -> dict[str, tuple[str, str]]:
    return {k: (hashlib.sha256(flac).hexdigest(), json.dumps(meta, sort_keys=True))
            for k, (meta, flac) in read_samples(out_url).items()}


def test_every_corpus_file_is_sharded_or_rejected_with_its_reason(corpus, tmp_path, caplog):
    root, expected = corpus
    out = str(tmp_path / "out")
    assert shard(root, out) == 0
    samples = read_samples(out)
    by_path = collections.defaultdict(list)
    for meta, flac in samples.values():
        by_path[meta["source_path"]].append((meta, flac))
    file_rejects = {r["path"]: r["reason"] for r in read_rejects(out) if "key" not in r}
    planned = {it["path"] for it in mf.read_plan(out)}
    assert planned == set(expected), "sidecars, README, hidden files and metadata.jsonl are not inputs"
    for rel, outcome in expected.items():
        if outcome == "ok":
            assert by_path[rel] and rel not in file_rejects, (rel, file_rejects.get(rel))
        else:
            assert rel not in by_path, rel
            assert re.search(outcome, file_rejects[rel]), (rel, file_rejects[rel])
    assert "ignored 1 non-audio files" in caplog.text and "1 rows of" in caplog.text

    for (meta, flac) in (s for v in by_path.values() for s in v):
        audio, sr = audio_io.decode(flac)
        assert (sr, audio.shape[0]) == (16000, 2)
        assert audio.shape[1] == round(meta["duration"] * 16000)
        assert meta["seconds_start"] == math.floor(meta["offset_seconds"])
        assert meta["seconds_total"] == math.ceil(meta["source_duration"])
    long = sorted((m for m, _ in by_path["long/long.flac"]), key=lambda m: m["window_index"])
    assert [m["offset_seconds"] for m in long] == [4.0 * i for i in range(24)]
    assert [m["duration"] for m in long] == [4.0] * 23 + [3.0]
    assert long[0]["seconds_total"] == 95 and long[0]["composer"] == "nobody"
    six = by_path["rates/six_channels_96k.wav"][0][0]
    assert (six["original_sample_rate"], six["original_channels"], six["prompt"], six["genre"]) == \
        (96000, 6, "5.1 at 96 kHz", "test")
    assert by_path["rates/tone 8000 Hz.wav"][0][0]["prompt"] == "a tone from a txt sidecar"
    assert by_path["rates/tone_22050.flac"][0][0]["prompt"] == "stereo flac"
    assert by_path["broken/truncated.wav"][0][0]["source_duration"] == pytest.approx(1.5, abs=0.01)
    assert {m["window_index"] for m, _ in by_path["broken/half_silent.wav"]} == {2}
    silent_windows = [r for r in read_rejects(out) if r["path"] == "broken/half_silent.wav"]
    assert len(silent_windows) == 2 and all(r["reason"].startswith("silent") for r in silent_windows)
    keys_a = {k for k, (m, _) in samples.items() if m["source_path"] == "a/same.wav"}
    keys_b = {k for k, (m, _) in samples.items() if m["source_path"] == "b/same.wav"}
    assert keys_a and keys_b and not keys_a & keys_b
    assert all(re.fullmatch(r"[0-9a-f]{16}-\d{5}", k) for k in samples)

    assert shard(root, out) == 0, "a second run over a committed output is a no-op"
    assert fingerprint(out) == {k: (hashlib.sha256(f).hexdigest(), json.dumps(m, sort_keys=True))
                                for k, (m, f) in samples.items()}


def test_two_tasks_plus_commit_equal_one_task(corpus, tmp_path):
    root, _ = corpus
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert shard(root, one, "--val-fraction", "0.3") == 0
    assert shard(root, two, "--val-fraction", "0.3", "plan") == 0
    for k in (1, 0):
        assert shard(root, two, "--val-fraction", "0.3", "--task-index", str(k), "--num-tasks", "2") == 0
    assert shard(root, two, "--val-fraction", "0.3", "commit", "--num-tasks", "2") == 0
    assert fingerprint(one) == fingerprint(two)
    assert sorted(map(json.dumps, read_rejects(one))) == sorted(map(json.dumps, read_rejects(two)))
    val = mf.read_manifest(storage.join(two, "val", "manifest.json"))
    assert val.totals["samples"] > 0 and all("/val/shard-" in e["url"] for e in val.outputs)
    sides = collections.defaultdict(set)  # a source never straddles train and val
    for sub in ("", "val"):
        for e in mf.read_manifest(storage.join(two, sub, "manifest.json")).outputs:
            for _, members in iter_samples(e["url"]):
                sides[json.loads(members["json"])["source_path"]].add(sub)
    assert all(len(s) == 1 for s in sides.values()) and {"", "val"} == set().union(*sides.values())


def test_commit_before_every_task_finished_names_the_missing_task(corpus, tmp_path, capsys):
    root, _ = corpus
    out = str(tmp_path / "out")
    assert shard(root, out, "plan") == 0
    assert shard(root, out, "--task-index", "0", "--num-tasks", "2") == 0
    assert shard(root, out, "commit", "--num-tasks", "2") == 2
    assert "tasks 1" in capsys.readouterr().err and not os.path.exists(os.path.join(out, "manifest.json"))


@pytest.fixture
def small_input(store_url, tmp_path):
    """Three good files and one broken one, uploaded under the store (local dir or S3 prefix)."""
    src = storage.join(store_url, "input")
    files = {"x/one.flac": generate.encode(generate.tone(2.5, 22050, 2), 22050, "FLAC"),
             "x/two.wav": generate.encode(generate.tone(1.5, 44100), 44100, "WAV"),
             "y/three é.ogg": generate.encode(generate.tone(2.0, 16000, 2), 16000, "OGG"),
             "y/broken.wav": b"RIFF\x00\x00"}
    for rel, data in files.items():
        storage.write(storage.join(src, rel), data)
        storage.write(storage.join(src, rel.rsplit(".", 1)[0] + ".txt"), f"caption of {rel}".encode())
    return src, files


def test_shards_local_and_s3_input_and_output(small_input, store_url):
    src, files = small_input
    out = storage.join(store_url, "out")
    assert main(["--input", src, "--output", out, "--sample-rate", "16000", "--max-reject-fraction", "0.5"]) == 0
    samples = read_samples(out)
    assert sorted(m["prompt"] for m, _ in samples.values()) == [f"caption of {r}" for r in sorted(files)
                                                                 if "broken" not in r]
    assert all(m["source"].startswith(src) for m, _ in samples.values())
    assert [r["path"] for r in read_rejects(out)] == ["y/broken.wav"]
    m = mf.read_manifest(storage.join(out, "manifest.json"))
    assert m.properties == {"sample_rate": 16000, "channels": 2}
    assert m.input == mf.input_ref(mf.plan_url(out))
    assert m.outputs[0]["url"] == storage.join(out, "shard-00000-00000.tar")


def test_too_many_rejects_fail_after_writing_rejects_jsonl(small_input, store_url, capsys):
    src, _ = small_input
    out = storage.join(store_url, "out")
    assert main(["--input", src, "--output", out, "--sample-rate", "16000", "--max-reject-fraction", "0.2"]) == 2
    assert "1 of 4 input files gave no sample (25.0% > --max-reject-fraction 0.2)" in capsys.readouterr().err
    assert [r["path"] for r in read_rejects(out)] == ["y/broken.wav"]
    assert not storage.exists(storage.join(out, "manifest.json"))


def test_changed_settings_on_an_existing_output_are_refused(corpus, tmp_path, capsys):
    root, _ = corpus
    out = str(tmp_path / "out")
    assert shard(root, out, "plan") == 0
    assert shard(root, out, "--task-index", "0", "--num-tasks", "1", "--sample-rate", "22050") == 2
    assert "sample_rate: 16000 there, 22050 now" in capsys.readouterr().err


def test_malformed_captions_file_is_one_clear_error(corpus, tmp_path, capsys):
    root, _ = corpus
    bad = tmp_path / "captions.jsonl"
    bad.write_text('{"path": "a/same.wav", "prompt": "fine"}\n{"path": "b/same.wav", "prompt": \n')
    argv = ["--input", str(root), "--output", str(tmp_path / "out"), "--captions", str(bad), *COMMON]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2: not valid JSON" in err and "Traceback" not in err
    csv_bad = tmp_path / "captions.csv"
    csv_bad.write_text("file,prompt\na/same.wav,hello\n")
    assert main(argv[:-len(COMMON) - 1] + [str(csv_bad), *COMMON]) == 2
    assert "needs a header with a 'path' column" in capsys.readouterr().err


def test_dry_run_writes_nothing(corpus, tmp_path, caplog):
    root, expected = corpus
    out = tmp_path / "out"
    caplog.set_level(logging.INFO)
    assert shard(root, str(out), "--dry-run") == 0
    assert not out.exists() and f"dry run: {len(expected)} files" in caplog.text


def test_every_flag_has_help_and_defaults_are_shown(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    flags = re.findall(r"^  (--[a-z-]+)", out, flags=re.M)
    assert {"--input", "--output", "--captions", "--sample-rate", "--channels", "--shard-size-mb",
            "--window-seconds", "--min-seconds", "--silence-db", "--max-reject-fraction", "--val-fraction",
            "--task-index", "--num-tasks", "--dry-run", "--debug"} <= set(flags)
    blocks = re.split(r"\n  (?=--)", out.split("options:")[1])[1:]
    assert all(len(b.split(None, 2)) > 1 for b in blocks)
    assert "(default: 44100)" in out and "(default: 256" in out and "(default: -60.0)" in out


def test_a_task_killed_mid_run_resumes_without_duplicates_or_losses(tmp_path):
    src = tmp_path / "src"
    for i in range(24):  # 44.1 kHz stereo -> 48 kHz: slow enough to be killed between shards
        path = src / f"d{i % 3}" / f"clip {i:02d}.flac"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(generate.encode(generate.tone(6.0, 44100, 2, freq=200 + 20 * i), 44100, "FLAC"))
        path.with_suffix(".txt").write_text(f"clip {i}")
    out, ref = tmp_path / "out", tmp_path / "ref"
    argv = ["--input", str(src), "--output", str(out), "--sample-rate", "48000", "--shard-size-mb", "0.5"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.shard", *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "shard-00000-00000.tar"
    deadline = time.monotonic() + 120
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    run = proctree.descendants(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proctree.assert_all_exit(run)  # no process of the killed run is left
    assert first.exists() and not (out / "_parts").exists(), "the kill must land between shards"
    killed_sha = hashlib.sha256(first.read_bytes()).hexdigest()

    assert main(argv) == 0
    assert main(["--input", str(src), "--output", str(ref), "--sample-rate", "48000", "--shard-size-mb", "0.5"]) == 0
    got, want = fingerprint(str(out)), fingerprint(str(ref))
    assert got == want and len(got) == 24
    assert hashlib.sha256(first.read_bytes()).hexdigest() == killed_sha, "rewritten with identical bytes"
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def test_sample_json_carries_metadata_without_overwriting_computed_fields(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.wav").write_bytes(generate.encode(generate.tone(2.0, 16000), 16000, "WAV"))
    (src / "meta.csv").write_text("path,text,offset_seconds,mood\na.wav,calm tone,99,calm\n")
    out = str(tmp_path / "out")
    assert main(["--input", str(src), "--output", out, "--captions", str(src / "meta.csv"),
                 "--sample-rate", "16000"]) == 0
    (meta, flac), = read_samples(out).values()
    assert (meta["prompt"], meta["mood"], meta["meta_offset_seconds"], meta["offset_seconds"]) == \
        ("calm tone", "calm", "99", 0.0)
    assert np.abs(audio_io.decode(flac)[0]).max() > 0.1


# ------------------------------------------------------------------------------------- hostile inputs


# Runs the stage and reports its own peak RSS (VmHWM: this process image only). ru_maxrss would also count
# the pages shared with the forking test process before exec: a large pytest process reads as a large stage.
_MEASURED_STAGE = """
import runpy, sys
try:
    runpy.run_module("pipeline.shard", run_name="__main__")
finally:
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    sys.stderr.write(f"\\nCANTUS-PEAK-KIB {hwm.split()[1]}\\n")
"""


def run_stage(argv: list[str]) -> tuple[int, float, str]:
    """``python -m pipeline.shard`` in a child; -> (exit code, the child's own peak RSS in GiB, stderr)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", _MEASURED_STAGE, *argv], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err, _, peak = proc.stderr.rpartition("\nCANTUS-PEAK-KIB ")
    return proc.returncode, int(peak) / 2 ** 20, err


def test_a_one_hour_source_shards_with_peak_rss_under_one_gib(tmp_path):
    """Before blocks and the spool, this source needed 2.3 GiB with 30 s windows (4.6 GiB as one sample)."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    # One hour of 44.1 kHz stereo 16-bit WAV (606 MiB): a 7 s phrase of tones repeated, so writing is fast.
    phrase = np.concatenate([generate.tone(1.0, 44100, 2, freq=110 * 2 ** (k / 5)) for k in range(7)])
    with sf.SoundFile(src / "hour.wav", "w", 44100, 2, format="WAV", subtype="PCM_16") as f:
        for _ in range(3600 // 7):
            f.write(phrase)
        f.write(phrase[:(3600 % 7) * 44100])
    (src / "hour.txt").write_text("an hour of tones")
    code, rss, err = run_stage(["--input", str(src), "--output", str(out), "--window-seconds", "30"])
    assert code == 0, err[-2000:]
    m = mf.read_manifest(str(out / "manifest.json"))
    assert (m.totals["samples"], m.totals["seconds"]) == (120, pytest.approx(3600.0))
    assert rss < 1.0, f"peak RSS {rss:.2f} GiB"


def test_hostile_files_are_rejects_with_their_reasons_and_the_rest_shards(tmp_path, caplog):
    src, out = tmp_path / "src", str(tmp_path / "out")
    (src / "real").mkdir(parents=True)
    good = generate.encode(generate.tone(2.0, 16000), 16000, "WAV")
    (src / "real" / "good.wav").write_bytes(good)
    pcm = (3000 * np.sin(np.arange(20000) / 3)).astype("<i2").repeat(2).tobytes()  # 40 KB, stereo
    fmt = struct.pack("<HHIIHH", 1, 2, 1, 4, 4, 16)  # PCM, 2 channels, 1 Hz, 4 bytes/s, 4-byte frames, 16 bit
    body = b"WAVEfmt " + struct.pack("<I", 16) + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    (src / "one_hz.wav").write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)
    scaled = generate.tone(2.0, 16000) * 32767  # int16 values stored as float
    (src / "scaled.wav").write_bytes(generate.encode(scaled, 16000, "WAV", "FLOAT"))
    (src / "long.wav").write_bytes(generate.encode(generate.tone(12.0, 8000), 8000, "WAV"))
    os.symlink("loop_b.wav", src / "loop_a.wav")
    os.symlink("loop_a.wav", src / "loop_b.wav")
    os.symlink("gone.wav", src / "dangling.wav")
    os.symlink(src / "real", src / "linked")
    os.mkfifo(src / "fifo.wav")
    latin1 = os.path.join(os.fsencode(src), b"\xe9t\xe9.wav")
    with open(latin1, "wb") as f:
        f.write(good)
    for p in list(src.iterdir()) + [src / "real" / "good.wav"]:
        if p.suffix == ".wav":
            p.with_suffix(".txt").write_text("a caption")
    with open(latin1[:-3] + b"txt", "w") as f:
        f.write("a caption")
    assert main(["--input", str(src), "--output", out, "--sample-rate", "16000", "--max-seconds", "10",
                 "--max-reject-fraction", "1"]) == 0
    reasons = {r["path"]: r["reason"] for r in read_rejects(out)}
    assert reasons == {
        "\\xe9t\\xe9.wav": f"file name is not valid UTF-8: {latin1!r}; rename it",
        "dangling.wav": "dangling symbolic link (to 'gone.wav')",
        "fifo.wav": "not a regular file (a FIFO, socket or device)",
        "long.wav": "too long: the header says 12.0 s > --max-seconds 10.0",
        "loop_a.wav": "symbolic link loop (too many levels of links)",
        "loop_b.wav": "symbolic link loop (too many levels of links)",
        "one_hz.wav": "sample rate 1 Hz in the header is outside [1000, 384000] Hz",
        "scaled.wav": f"samples peak at {20 * math.log10(np.abs(scaled).max()):+.1f} dBFS (> +6 dBFS): a float "
                      "file on the wrong scale? (16-bit output would clip it to a square wave)"}
    assert [m["source_path"] for m, _ in read_samples(out).values()] == ["real/good.wav"]
    assert "skipped 1 symbolic links to folders (not followed)" in caplog.text


def test_running_out_of_memory_on_one_file_rejects_that_file_and_the_task_goes_on(tmp_path, monkeypatch):
    src, out = tmp_path / "src", str(tmp_path / "out")
    src.mkdir()
    for name in ("a.wav", "huge.wav", "z.wav"):
        (src / name).write_bytes(generate.encode(generate.tone(2.0, 16000), 16000, "WAV"))
        (src / name).with_suffix(".txt").write_text(f"caption of {name}")

    class Huge(audio_io.WindowStream):  # one piece decodes, then an allocation fails part-way
        def pieces(self):
            yield next(super().pieces())
            raise MemoryError

    real = audio_io.stream_windows
    monkeypatch.setattr(audio_io, "stream_windows",
                        lambda path, *a: (Huge if path.endswith("huge.wav") else real)(path, *a))
    assert main(["--input", str(src), "--output", out, "--sample-rate", "16000", "--max-reject-fraction", "0.5"]) == 0
    (rejected,) = read_rejects(out)
    assert rejected["path"] == "huge.wav" and rejected["reason"].startswith("out of memory while decoding this file")
    assert sorted(m["source_path"] for m, _ in read_samples(out).values()) == ["a.wav", "z.wav"]


def test_two_input_names_equal_after_nfc_normalisation_stop_the_plan_naming_both(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    for form in ("NFC", "NFD"):
        (src / unicodedata.normalize(form, "Beyoncé.wav")).write_bytes(b"RIFF")
    assert main(["--input", str(src), "--output", str(tmp_path / "out"), "plan"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "same name after Unicode NFC normalisation" in err
    assert repr(unicodedata.normalize("NFD", "Beyoncé.wav")) in err
    assert not (tmp_path / "out" / "_plan.json").exists()


def test_a_nan_in_a_caption_row_is_one_line_naming_the_file_and_line(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.wav").write_bytes(generate.encode(generate.tone(2.0, 16000), 16000, "WAV"))
    captions = tmp_path / "captions.jsonl"
    captions.write_text('{"path": "a.wav", "prompt": NaN}\n')
    argv = ["--input", str(src), "--output", str(tmp_path / "out"), "--captions", str(captions)]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {captions}:1: NaN is not a JSON value; write null, a number or a string\n"


@pytest.mark.parametrize("window_seconds", ["30", None])
def test_a_few_minute_source_shards_like_whole_file_processing(tmp_path, window_seconds):
    """Block-wise decode, streamed resampling and piecewise FLAC equal resampling the file in one go."""
    src, out = tmp_path / "src", str(tmp_path / "out")
    src.mkdir()
    x = np.concatenate([generate.tone(10.0, 44100, 2, freq=150 + 40 * k) for k in range(14)])  # 140 s
    (src / "three.wav").write_bytes(generate.encode(x, 44100, "WAV", "PCM_16"))
    (src / "three.txt").write_text("a few minutes")
    extra = ["--window-seconds", window_seconds] if window_seconds else []
    assert main(["--input", str(src), "--output", out, "--sample-rate", "48000", *extra]) == 0
    samples = sorted(read_samples(out).values(), key=lambda s: s[0]["window_index"])
    step = 30 * 48000 if window_seconds else None
    whole = audio_io.resample(audio_io.decode(generate.encode(x, 44100, "WAV", "PCM_16"))[0], 44100, 48000)
    assert len(samples) == (5 if step else 1)
    for i, (meta, flac) in enumerate(samples):
        audio, _ = audio_io.decode(flac)
        want = whole[:, i * step:(i + 1) * step] if step else whole
        assert audio.shape == want.shape
        np.testing.assert_allclose(audio, np.clip(want, -1, 1), atol=1e-4)  # 16-bit steps are 3e-5
        assert (meta["window_index"], meta["offset_seconds"], meta["seconds_start"]) == (i, 30.0 * i, 30 * i)
        assert (meta["seconds_total"], meta["source_duration"]) == (140, pytest.approx(140.0))
        assert meta["duration"] == want.shape[1] / 48000


def snapshot(out_url: str) -> dict[str, str]:
    """sha256 of every object under the output, by URL (the probe of check_put_if_absent comes and goes)."""
    return {o.url: storage.sha256_url(o.url) for o in storage.list_objects(out_url)}


def small_shard(src, out, *extra):
    return main(["--input", src, "--output", out, "--sample-rate", "16000", "--max-reject-fraction", "0.5", *extra])


def test_another_task_count_on_a_committed_output_is_refused_and_changes_nothing(small_input, store_url, capsys):
    src, _ = small_input
    out = storage.join(store_url, "out")
    assert small_shard(src, out, "plan") == 0
    for k in (0, 1):
        assert small_shard(src, out, "--task-index", str(k), "--num-tasks", "2") == 0
    assert small_shard(src, out, "commit", "--num-tasks", "2") == 0
    committed = mf.read_manifest(storage.join(out, "manifest.json"))
    assert committed.totals["tasks"] == 2 and len(committed.outputs) == 2
    before = snapshot(out)
    assert all(before[e["url"]] == e["sha256"] for e in committed.outputs)
    capsys.readouterr()

    for step in (["--task-index", "0", "--num-tasks", "3"], ["commit", "--num-tasks", "3"], []):
        assert small_shard(src, out, *step) == 2, step
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "is committed with other task count (2 there, " in err, err
    assert small_shard(src, out, "--task-index", "0", "--num-tasks", "2", "--sample-rate", "22050") == 2
    assert "settings (sample_rate: 16000 there, 22050 now)" in capsys.readouterr().err
    assert snapshot(out) == before, "nothing under the committed output was written"


def test_the_same_run_again_on_a_committed_output_is_a_no_op(small_input, store_url, tmp_path, capsys):
    src, _ = small_input
    out = storage.join(store_url, "out")
    assert small_shard(src, out) == 0
    before = snapshot(out)
    mtimes = {o.url: os.stat(o.url).st_mtime_ns for o in storage.list_objects(out)} if not storage.is_s3(out) else {}
    for step in ([], ["run", "--task-index", "0", "--num-tasks", "1"], ["commit"], ["plan"]):
        assert small_shard(src, out, *step) == 0, step
    assert snapshot(out) == before
    assert all(os.stat(url).st_mtime_ns == t for url, t in mtimes.items()), "a no-op rewrites nothing"
    storage.write(storage.join(src, "x", "four.wav"), generate.encode(generate.tone(1.5, 16000), 16000, "WAV"))
    capsys.readouterr()
    assert small_shard(src, out) == 2
    assert "is committed with other plan (4 items there, 5 now)" in capsys.readouterr().err
    assert snapshot(out) == before


def test_a_run_with_another_task_count_than_the_parts_already_written_is_refused(small_input, store_url, capsys):
    src, _ = small_input
    out = storage.join(store_url, "out")
    assert small_shard(src, out, "plan") == 0
    assert small_shard(src, out, "--task-index", "1", "--num-tasks", "2") == 0
    before = snapshot(out)
    capsys.readouterr()
    assert small_shard(src, out, "--task-index", "0", "--num-tasks", "3") == 2
    assert "1 part files of a run with 2 tasks exist" in capsys.readouterr().err
    assert snapshot(out) == before
    assert small_shard(src, out, "--task-index", "0", "--num-tasks", "2") == 0
    assert small_shard(src, out, "commit", "--num-tasks", "2") == 0
    assert mf.read_manifest(storage.join(out, "manifest.json")).totals["samples"] == 3
