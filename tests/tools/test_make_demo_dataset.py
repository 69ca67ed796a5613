"""tools/make_demo_dataset.py: key finding, window choice, levels, and a deterministic tiny build."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_demo_dataset.py"
spec = importlib.util.spec_from_file_location("make_demo_dataset", TOOL)
demo = importlib.util.module_from_spec(spec)
sys.modules["make_demo_dataset"] = demo  # dataclasses and the worker pool look the module up by name
spec.loader.exec_module(demo)


def scale(pitches, step=0.5):
    return [(i * step, (i + 1) * step, p) for i, p in enumerate(pitches)]


def test_key_from_the_window_notes():
    c_major = [60, 62, 64, 65, 67, 69, 71, 72, 67, 64, 60]
    assert demo.estimate_key(scale(c_major)) == "C major"
    a_minor = [57, 59, 60, 62, 64, 65, 68, 69, 64, 60, 57, 57]
    assert demo.estimate_key(scale(a_minor)) == "A minor"
    d_major = [p + 2 for p in c_major]
    assert demo.estimate_key(scale(d_major)) == "D major"


def test_window_needs_sounding_notes_and_onsets():
    rng = random.Random(0)
    dense = demo.Piece([scale(range(60, 100), 0.25)], 10.0, 120, "4/4", 0.5)
    start = demo.choose_window(dense, 4.0, rng)
    assert start is not None and 0 <= start <= 6.0
    sparse = demo.Piece([[(0.0, 0.1, 60), (5.0, 5.1, 62), (9.0, 9.5, 64)]], 10.0, 120, "4/4", 0.5)
    assert demo.choose_window(sparse, 4.0, rng) is None
    assert demo.choose_window(dense, 12.0, rng) is None, "a piece shorter than the clip"


def test_normalise_hits_the_rms_target_unless_the_peak_would_clip():
    rng = np.random.default_rng(0)
    x = (0.01 * rng.standard_normal((2, 8000))).astype(np.float32)
    y = demo.normalise(x)
    assert 20 * np.log10(np.sqrt(np.mean(y.astype(np.float64) ** 2))) == pytest.approx(-20.0, abs=0.01)
    spiky = np.zeros((2, 8000), np.float32)
    spiky[:, ::800] = 1.0
    assert 20 * np.log10(np.abs(demo.normalise(spiky)).max()) == pytest.approx(-1.0, abs=0.01)


def test_captions_name_the_facts():
    meta = {"dance": "jig", "genre": "Irish folk tune", "composer": "traditional", "instrument": "fiddle",
            "key": "D major", "metre": "6/8", "tempo": 116}
    for seed in range(6):
        text = demo.caption(meta, random.Random(seed))
        assert all(s.lower() in text.lower() for s in ("jig", "Irish folk tune", "fiddle", "D major", "6/8", "116 BPM"))
        assert "traditional" not in text


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_tiny_build_is_real_music_and_deterministic(tmp_path):
    # music21 and pyfluidsynth come with the [demo] extra, the soundfont from tools/install_system.sh.
    assert any(os.path.isfile(s) for s in demo.SOUNDFONTS), "no General MIDI soundfont: run tools/install_system.sh"
    common = ["--num-clips", "3", "--seconds", "2", "--sample-rate", "8000", "--seed", "7"]
    assert demo.main(["--out", str(tmp_path / "a"), "--workers", "2", *common]) == 0
    assert demo.main(["--out", str(tmp_path / "b"), "--workers", "1", *common]) == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    lines = [json.loads(line) for line in (tmp_path / "a" / "metadata.jsonl").read_text().splitlines()]
    assert len(lines) == 3
    for meta in lines:
        assert {"path", "prompt", "instrument", "key", "composer", "genre", "tempo", "metre", "notes"} <= set(meta)
        audio, sr = sf.read(tmp_path / "a" / meta["path"])
        assert sr == 8000 and audio.shape == (16000, 2)
        rms_db = 20 * np.log10(np.sqrt(np.mean(audio ** 2)))
        assert -21.0 < rms_db < -19.0 or np.abs(audio).max() > 0.85  # -20 dBFS unless peak-limited
        assert np.abs(audio).max() <= 10 ** (-1 / 20) + 1e-3
        assert len(meta["notes"]) >= demo.MIN_ONSETS
        assert all(0 <= a <= b <= 2.0 and 0 <= p < 128 for a, b, p in meta["notes"])
        assert meta["key"].split()[1] in ("major", "minor") and meta["key"] in meta["prompt"]


def test_the_families_palette_gives_every_clip_one_of_the_six_families(tmp_path):
    common = ["--num-clips", "6", "--seconds", "2", "--sample-rate", "8000", "--seed", "3", "--workers", "2"]
    assert demo.main(["--out", str(tmp_path / "f"), "--palette", "families", *common]) == 0
    lines = [json.loads(line) for line in (tmp_path / "f" / "metadata.jsonl").read_text().splitlines()]
    assert {m["instrument"] for m in lines} <= set(demo.FAMILIES)
    assert all(m["instrument"] in m["prompt"] for m in lines)


def test_tied_notes_merge_like_music21s_strip_ties():
    from music21 import corpus
    score = corpus.parse("bach/bwv66.6.mxl")
    for part in score.parts:
        want = sorted((float(n.offset) * 0.5, (float(n.offset) + float(n.duration.quarterLength)) * 0.5, p.midi)
                      for n in part.stripTies().flatten().notes for p in n.pitches)
        assert demo.part_notes(part, 0.5) == want



def _sigterm_is_default() -> bool:
    import signal
    return signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_render_worker_dies_on_sigterm_even_when_its_parent_catches_it():
    """Pool.terminate() ends workers that missed its sentinel with SIGTERM. A parent that catches SIGTERM (a
    trainer's stop flag, in a test process) must not hand that handler to its forked workers, or the pool's exit
    waits for them forever (seen once in CI)."""
    import multiprocessing
    import signal
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        with multiprocessing.get_context("fork").Pool(1, initializer=demo._init_worker) as pool:
            in_worker = pool.apply(_sigterm_is_default)
            pool.close()
            pool.join()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert in_worker
