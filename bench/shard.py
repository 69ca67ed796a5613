"""Shard-stage throughput: seconds of audio sharded per second on one core, and where the time goes.

    OMP_NUM_THREADS=1 python bench/shard.py [--files 16] [--seconds 30] [--input DIR]

Input: 44.1 kHz stereo FLAC (synthesised music-like tones with envelopes and noise, or the FLAC files
under ``--input``), output 48 kHz stereo, as a real run would reshape a CD-rate collection. Two
measurements on one process (one core):
1. the phases one by one over the same files: decode, resample (soxr HQ), encode (FLAC 16-bit), write
   (tar + sha256 + local upload);
2. the stage itself end to end (`python -m pipeline.shard`, plan + run + commit), which is the number
   that matters; the goal is >= 100x real time per core.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import soundfile as sf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.data import audio as audio_io  # noqa: E402
from pipeline.data.shards import ShardWriter  # noqa: E402
from pipeline.shard import main as shard_main  # noqa: E402

SR_IN, SR_OUT = 44100, 48000


def music_like(seconds: float, seed: int) -> np.ndarray:
    """(frames, 2): a few notes at a time with harmonics and decays, panned, plus a little noise."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SR_IN)
    out = np.zeros((n, 2), np.float32)
    t0 = 0
    while t0 < n:
        length = int(rng.uniform(0.15, 0.8) * SR_IN)
        t = np.arange(min(length, n - t0)) / SR_IN
        f0 = 110 * 2 ** (rng.integers(0, 36) / 12)
        note = sum(np.sin(2 * np.pi * f0 * h * t) / h ** 1.5 for h in range(1, 7)) * np.exp(-3 * t)
        pan = rng.uniform(0.2, 0.8)
        out[t0:t0 + t.size, 0] += (1 - pan) * note
        out[t0:t0 + t.size, 1] += pan * note
        t0 += int(length * rng.uniform(0.3, 1.0))
    out += 0.003 * rng.standard_normal(out.shape).astype(np.float32)
    return (0.25 * out / np.abs(out).max()).astype(np.float32)


def make_inputs(folder: str, files: int, seconds: float) -> list[str]:
    paths = []
    for i in range(files):
        path = os.path.join(folder, f"track{i:03d}.flac")
        sf.write(path, music_like(seconds, i), SR_IN, format="FLAC", subtype="PCM_16")
        with open(path[:-5] + ".txt", "w") as f:
            f.write(f"bench track {i}")
        paths.append(path)
    return paths


def phases(paths: list[str], tmp: str) -> tuple[dict[str, float], float]:
    times = dict.fromkeys(("decode", "resample", "encode", "write"), 0.0)
    audio_seconds = 0.0
    with ShardWriter(lambda n: os.path.join(tmp, f"phase-{n}.tar"), 256 << 20) as writer:
        for i, path in enumerate(paths):
            data = open(path, "rb").read()
            t = time.perf_counter()
            audio, sr = audio_io.decode(data)
            t1 = time.perf_counter()
            audio = audio_io.resample(audio, sr, SR_OUT)
            t2 = time.perf_counter()
            flac = audio_io.encode_flac(audio, SR_OUT)
            t3 = time.perf_counter()
            writer.add(f"k{i:05d}", {"flac": flac, "json": b"{}"}, audio.shape[1] / SR_OUT)
            t4 = time.perf_counter()
            times["decode"] += t1 - t
            times["resample"] += t2 - t1
            times["encode"] += t3 - t2
            times["write"] += t4 - t3
            audio_seconds += audio.shape[1] / SR_OUT
        t = time.perf_counter()
    times["write"] += time.perf_counter() - t  # the last shard's upload happens on close
    return times, audio_seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--files", type=int, default=16, help="number of synthesised input files")
    p.add_argument("--seconds", type=float, default=30.0, help="length of each synthesised file")
    p.add_argument("--input", default=None, help="use the .flac files under this folder instead")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="cantus-bench-shard-")
    try:
        if args.input:
            paths = sorted(glob.glob(os.path.join(args.input, "**", "*.flac"), recursive=True))
            src = args.input
        else:
            src = os.path.join(tmp, "in")
            os.makedirs(src)
            paths = make_inputs(src, args.files, args.seconds)
        info = sf.info(paths[0])
        print(f"input: {len(paths)} files, first is {info.samplerate} Hz, {info.channels} ch, {info.format}; "
              f"output {SR_OUT} Hz stereo FLAC; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
        times, audio_seconds = phases(paths, tmp)
        total = sum(times.values())
        print(f"\n{'phase':<10}{'seconds':>10}{'share':>8}{'x realtime':>12}")
        for name, seconds in times.items():
            print(f"{name:<10}{seconds:>10.3f}{seconds / total:>8.1%}{audio_seconds / seconds:>12.0f}")
        print(f"{'sum':<10}{total:>10.3f}{1:>8.0%}{audio_seconds / total:>12.0f}")

        t = time.perf_counter()
        shard_main(["--input", src, "--output", os.path.join(tmp, "out"), "--sample-rate", str(SR_OUT)])
        wall = time.perf_counter() - t
        cpu = os.times()
        print(f"\nstage end to end (plan + run + commit, one process): {audio_seconds:.0f} s of audio in "
              f"{wall:.2f} s = {audio_seconds / wall:.0f}x real time per core "
              f"(process CPU so far {cpu.user + cpu.system:.1f} s; goal >= 100x)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
