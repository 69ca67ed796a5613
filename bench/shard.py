"""Shard-stage throughput and peak memory: audio seconds per second on one core, where the time goes,
and the peak RSS of the stage on one long source.

    OMP_NUM_THREADS=1 python bench/shard.py [--files 16] [--seconds 30] [--input DIR] [--rss-hours 1]

Input: 44.1 kHz stereo FLAC (synthesised music-like tones with envelopes and noise, or the FLAC files
under ``--input``), output 48 kHz stereo, as a real run would reshape a CD-rate collection. Two
measurements on one process (one core):
1. the phases one by one over the same files: decode, resample (soxr HQ), encode (FLAC 16-bit), write
   (tar + sha256 + local upload);
2. the stage itself end to end (`python -m pipeline.shard`, plan + run + commit), which is the number
   that matters; the goal is >= 100x real time per core;
3. peak RSS (``ru_maxrss`` of the stage's own process, `os.wait4`) of ``python -m pipeline.shard`` on one
   synthesised source of ``--rss-hours`` hours (44.1 kHz stereo 16-bit WAV, written block by block to a
   temp folder), as one sample and cut into 30 s windows, at 44.1 and 48 kHz out; goal under 1 GiB.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
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
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def long_wav(path: str, hours: float) -> float:
    """Write ``hours`` of music-like 44.1 kHz stereo as a 16-bit WAV, a minute at a time; -> seconds."""
    minutes = max(1, round(hours * 60))
    with sf.SoundFile(path, "w", SR_IN, 2, format="WAV", subtype="PCM_16") as f:
        for m in range(minutes):
            f.write(music_like(60.0, m))
    with open(path[:-4] + ".txt", "w") as f:
        f.write("one long bench source")
    return minutes * 60.0


def peak_rss(src: str, out: str, *extra: str) -> tuple[float, float, int]:
    """Run the stage in a child process; -> (peak RSS in GiB, wall seconds, exit code)."""
    argv = [sys.executable, "-m", "pipeline.shard", "--input", src, "--output", out, *extra]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    t = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own rusage (ru_maxrss in KiB on Linux)
    wall = time.perf_counter() - t
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace").strip().splitlines()
    proc.stderr.close()
    if proc.returncode:
        print(f"   exit {proc.returncode}: {err[-1] if err else ''}")
    shutil.rmtree(out, ignore_errors=True)
    return usage.ru_maxrss / 2 ** 20, wall, proc.returncode


def rss_table(tmp: str, hours: float) -> None:
    src = os.path.join(tmp, "long")
    os.makedirs(src)
    t = time.perf_counter()
    seconds = long_wav(os.path.join(src, "long.wav"), hours)
    print(f"\npeak RSS on one {seconds / 3600:.2f} h 44.1 kHz stereo 16-bit WAV "
          f"({os.path.getsize(os.path.join(src, 'long.wav')) / 2 ** 20:.0f} MiB, written in "
          f"{time.perf_counter() - t:.0f} s); goal < 1 GiB")
    print(f"{'output':<30}{'peak RSS GiB':>14}{'wall s':>9}{'exit':>6}")
    for label, extra in (("44.1 kHz, one sample", []),
                         ("44.1 kHz, 30 s windows", ["--window-seconds", "30"]),
                         ("48 kHz, 30 s windows", ["--window-seconds", "30", "--sample-rate", "48000"])):
        rss, wall, code = peak_rss(src, os.path.join(tmp, "rss-out"), *extra)
        print(f"{label:<30}{rss:>14.2f}{wall:>9.0f}{code:>6}")


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
    p.add_argument("--rss-hours", type=float, default=1.0, help="length of the peak-RSS source; 0: skip")
    p.add_argument("--rss-only", action="store_true", help="only the peak-RSS table")
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="cantus-bench-shard-")
    try:
        if args.rss_only:
            rss_table(tmp, args.rss_hours)
            return
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
        if args.rss_hours > 0:
            rss_table(tmp, args.rss_hours)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
