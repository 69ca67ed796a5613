"""Build the small real-music demo set offline: music21 corpus scores rendered with FluidSynth.

    python tools/make_demo_dataset.py --out data/demo --num-clips 300 --seconds 5 --sample-rate 16000

Writes ``<out>/<collection>/<clip>.flac`` and ``<out>/metadata.jsonl`` (one line per clip: ``path``
relative to ``--out``, ``prompt``, ``instrument``, ``key``, ``composer``, ``genre``, ``tempo`` (beats
per minute), ``metre``, ``notes`` (``[onset_s, offset_s, midi_pitch]`` within the clip), and the score
it came from). The output depends only on the arguments, the music21 corpus and the soundfont.

Needs the ``demo`` extra (music21, pyfluidsynth) and Debian's ``libfluidsynth3`` plus a General MIDI
soundfont (``fluid-soundfont-gm``, or ``timgm6mb-soundfont`` for a light variant).

Choices that make the set useful, each learned from a worse first version (see ENVIRONMENT.md):
- a collection is drawn uniformly, then an unused score from it (else half the set is Bach);
- whole-file entries of multi-tune ABC files are skipped (parsing a whole opus takes ~40 s), except
  Josquin's, whose numbered "tunes" are the voices of one piece and are merged back;
- a window is redrawn until >= 80% of it has a sounding note and it holds >= 8 onsets;
- the key comes from the window's own notes (Krumhansl-Kessler), not from the whole score;
- polyphonic scores get ensembles, voices are panned across the stereo field;
- clips are normalised to about -20 dBFS RMS with peaks <= -1 dBFS.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import random
import re
import signal
import sys
import time

import numpy as np

log = logging.getLogger("make_demo_dataset")

SOUNDFONTS = ("/usr/share/sounds/sf2/FluidR3_GM.sf2", "/usr/share/sounds/sf2/TimGM6mb.sf2")
MIN_COVERAGE, MIN_ONSETS, WINDOW_TRIES = 0.8, 8, 12
PREROLL_SECONDS = 0.5  # rendered before the window so notes already sounding get their attack
TARGET_RMS_DB, PEAK_DB = -20.0, -1.0

# name -> General MIDI program (0-based)
GM = {"piano": 0, "harpsichord": 6, "church organ": 19, "accordion": 21, "nylon guitar": 24,
      "violin": 40, "viola": 41, "cello": 42, "harp": 46, "strings": 48, "choir": 52, "trumpet": 56,
      "trombone": 57, "tuba": 58, "french horn": 60, "oboe": 68, "bassoon": 70, "clarinet": 71,
      "flute": 73, "recorder": 74, "fiddle": 40, "tin whistle": 72, "banjo": 105}
# ensemble -> programs for voices from the top down (the last repeats for extra voices)
ENSEMBLES = {
    "string quartet": ("violin", "violin", "viola", "cello"),
    "string orchestra": ("strings",),
    "church organ": ("church organ",),
    "choir": ("choir",),
    "brass quartet": ("trumpet", "trumpet", "french horn", "trombone", "tuba"),
    "woodwind quartet": ("flute", "oboe", "clarinet", "bassoon"),
    "recorder consort": ("recorder",),
    "piano": ("piano",),
    "harpsichord": ("harpsichord",),
}
# --palette families: six timbres far apart, drawn uniformly for every clip whatever its score, so the
# instrument is a clean label a small model can learn (the score palette has 17, most with < 20 clips)
FAMILIES = ("piano", "church organ", "choir", "string orchestra", "flute", "brass quartet")


@dataclasses.dataclass(frozen=True)
class Collection:
    name: str
    genre: str
    composer: str | None  # None: traditional or taken per score
    tempo: tuple[int, int]  # beats per minute, drawn when the score has no metronome mark
    solo: tuple[str, ...]  # instruments for one-voice scores
    ensembles: tuple[str, ...]  # for polyphonic scores


FOLK_SOLO = ("fiddle", "flute", "tin whistle", "accordion", "harp", "piano", "clarinet", "nylon guitar")
RENAISSANCE = ("choir", "recorder consort", "church organ", "string quartet", "brass quartet")
COLLECTIONS = (
    Collection("essenFolksong", "German folk song", None, (80, 120), FOLK_SOLO, ("piano", "accordion")),
    Collection("oneills1850", "Irish folk tune", None, (90, 132), FOLK_SOLO, ("piano", "harp")),
    Collection("airdsAirs", "Scottish folk tune", None, (80, 126), FOLK_SOLO, ("piano", "harp")),
    Collection("ryansMammoth", "American fiddle tune", None, (96, 136), FOLK_SOLO + ("banjo",), ("piano",)),
    Collection("miscFolk", "folk tune", None, (84, 126), FOLK_SOLO, ("piano",)),
    Collection("bach", "Bach chorale", "Johann Sebastian Bach", (60, 84), ("church organ",),
               ("church organ", "choir", "string quartet", "brass quartet", "woodwind quartet", "piano")),
    Collection("palestrina", "Renaissance mass", "Giovanni Pierluigi da Palestrina", (48, 72), ("choir",),
               RENAISSANCE),
    Collection("monteverdi", "Italian madrigal", "Claudio Monteverdi", (66, 96), ("choir",),
               RENAISSANCE + ("harpsichord",)),
    Collection("josquin", "Renaissance chanson", "Josquin des Prez", (50, 76), ("recorder",), RENAISSANCE),
    Collection("trecento", "medieval song", None, (56, 84), ("recorder",),
               ("recorder consort", "choir", "harpsichord", "string quartet")),
    Collection("mozart", "Classical string quartet", "Wolfgang Amadeus Mozart", (72, 132), ("violin",),
               ("string quartet", "string quartet", "string orchestra", "piano")),
    Collection("haydn", "Classical string quartet", "Joseph Haydn", (72, 132), ("violin",),
               ("string quartet", "string quartet", "string orchestra", "piano")),
)
CLEAN_COMPOSERS = {"Johannes Ciconia", "Jacopo da Bologna", "Francesco Landini", "Guillaume de Machaut",
                   "Lorenzo da Firenze", "Gherardello da Firenze", "Donato da Cascia", "Bartolino da Padova",
                   "Andrea da Firenze", "Paolo da Firenze", "Niccolò da Perugia", "Vincenzo da Rimini"}
DANCES = ("slip jig", "jig", "reel", "hornpipe", "polka", "waltz", "march", "strathspey", "slide",
          "schottische", "quickstep", "minuet", "gavotte", "fling", "air", "clog", "lament")

# Krumhansl-Kessler key profiles (Krumhansl 1990), index 0 = tonic.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
MAJOR_NAMES = ("C", "Db", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
MINOR_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "G#", "A", "Bb", "B")


@dataclasses.dataclass(frozen=True)
class Candidate:
    collection: str
    path: str  # corpus-relative source path
    number: int | None  # tune number inside a multi-tune file, None for the whole file
    composer: str | None  # as the corpus metadata spells it
    title: str | None


# ------------------------------------------------------------------------------------ score choice


def list_candidates() -> dict[str, list[Candidate]]:
    """Every usable corpus entry, by collection, in a fixed order."""
    from music21 import corpus
    # bundle[:] in one call: iterating the bundle indexes a fresh list per item (quadratic, ~50 s).
    bundle = corpus.corpora.CoreCorpus().metadataBundle[:]
    numbered = {str(e.sourcePath) for e in bundle if e.number is not None}
    found: dict[str, list[Candidate]] = {c.name: [] for c in COLLECTIONS}
    for entry in bundle:
        path = str(entry.sourcePath)
        name = path.split("/")[0]
        if name not in found:
            continue
        if name == "josquin":  # voices of one piece: take the whole file, merge later
            if entry.number is not None:
                continue
        elif entry.number is None and path in numbered:
            continue  # whole-file entry of a multi-tune ABC file
        md = entry.metadata
        found[name].append(Candidate(name, path, None if entry.number is None else int(entry.number),
                                     md.composer if md else None, md.title if md else None))
    for name in found:
        found[name].sort(key=lambda c: (c.path, c.number or 0))
    return found


class ScorePicker:
    """Collection uniformly at random, then a score of it not used yet (a pass restarts when all are)."""

    def __init__(self, candidates: dict[str, list[Candidate]], seed: int):
        self._rng = random.Random(f"pick-{seed}")
        self._all = {k: v for k, v in candidates.items() if v}
        self._unused = {k: list(v) for k, v in self._all.items()}

    def next(self) -> Candidate:
        name = self._rng.choice(sorted(self._all))
        if not self._unused[name]:
            self._unused[name] = list(self._all[name])
        pool = self._unused[name]
        return pool.pop(self._rng.randrange(len(pool)))


# ------------------------------------------------------------------------------------ score -> notes


@dataclasses.dataclass
class Piece:
    voices: list[list[tuple[float, float, int]]]  # per part, top voice first: (onset_s, offset_s, pitch)
    seconds: float
    tempo: int  # beats per minute
    metre: str
    quarter_seconds: float


def load_piece(cand: Candidate, coll: Collection, rng: random.Random) -> Piece:
    from music21 import corpus, meter, stream, tempo
    score = corpus.parse(cand.path, number=cand.number) if cand.number is not None else corpus.parse(cand.path)
    if isinstance(score, stream.Opus):
        score = score.mergeScores()
    ts = score.recurse().getElementsByClass(meter.TimeSignature).first() or meter.TimeSignature("4/4")
    beat_ql = float(ts.beatDuration.quarterLength) or 1.0
    mark = score.recurse().getElementsByClass(tempo.MetronomeMark).first()
    quarter_bpm = mark.getQuarterBPM() if mark is not None and mark.number else None
    if not quarter_bpm:
        quarter_bpm = rng.randint(*coll.tempo) * beat_ql
    quarter_seconds = 60.0 / quarter_bpm
    parts = list(score.parts) or [score]
    voices = [v for v in (part_notes(part, quarter_seconds) for part in parts) if v]
    if not voices:
        raise ValueError("no pitched notes")
    seconds = max(off for v in voices for _, off, _ in v)
    return Piece(voices, seconds, round(quarter_bpm / beat_ql), ts.ratioString, quarter_seconds)


def part_notes(part, quarter_seconds: float) -> list[tuple[float, float, int]]:
    """(onset_s, offset_s, midi pitch) of a part, tied notes merged into one.

    Done here rather than with music21's ``stripTies``, which deep-copies the part and took two thirds
    of the build time.
    """
    notes: list[list] = []
    open_ties: dict[int, int] = {}  # pitch -> index in notes of the note its tie continues
    for n in part.flatten().notes:
        ql = float(n.duration.quarterLength)
        if ql <= 0 or not hasattr(n, "pitches"):  # grace notes, unpitched percussion
            continue
        on, off = float(n.offset) * quarter_seconds, (float(n.offset) + ql) * quarter_seconds
        tie = n.tie.type if n.tie is not None else None
        for p in n.pitches:
            pitch = int(p.midi)
            if tie in ("continue", "stop") and pitch in open_ties:
                notes[open_ties[pitch]][1] = off
                if tie == "stop":
                    del open_ties[pitch]
                continue
            notes.append([on, off, pitch])
            if tie == "start":
                open_ties[pitch] = len(notes) - 1
    return sorted(tuple(n) for n in notes)


def choose_window(piece: Piece, seconds: float, rng: random.Random) -> float | None:
    """A start time whose window is >= 80% covered by sounding notes and holds >= 8 onsets."""
    if piece.seconds < seconds:
        return None
    grid = 100  # coverage is measured on a 10 ms grid
    for _ in range(WINDOW_TRIES):
        start = rng.uniform(0.0, piece.seconds - seconds)
        covered = np.zeros(int(seconds * grid), dtype=bool)
        onsets = 0
        for voice in piece.voices:
            for on, off, _ in voice:
                if off <= start or on >= start + seconds:
                    continue
                onsets += on >= start
                covered[max(0, int((on - start) * grid)):int(math.ceil((off - start) * grid))] = True
        if onsets >= MIN_ONSETS and covered.mean() >= MIN_COVERAGE:
            return start
    return None


def estimate_key(notes: list[tuple[float, float, int]]) -> str:
    """Krumhansl-Kessler: correlate the duration-weighted pitch-class profile with 24 key profiles."""
    hist = np.zeros(12)
    for on, off, pitch in notes:
        hist[pitch % 12] += off - on
    best, name = -2.0, "C major"
    for tonic in range(12):
        for profile, names, mode in ((KK_MAJOR, MAJOR_NAMES, "major"), (KK_MINOR, MINOR_NAMES, "minor")):
            r = np.corrcoef(hist, np.roll(profile, tonic))[0, 1]
            if r > best:
                best, name = r, f"{names[tonic]} {mode}"
    return name


# ------------------------------------------------------------------------------------ rendering

_fluid = None


def _init_worker() -> None:
    global _fluid
    # A forked worker inherits its parent's handlers; one that catches SIGTERM (a trainer's stop flag, in a test
    # process) would make the worker outlive Pool.terminate(), and the pool's exit would wait for it forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    import fluidsynth
    lib = fluidsynth._fl  # float output: pyfluidsynth's get_samples gives dithered int16 only
    lib.fluid_synth_write_float.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                            ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    _fluid = (fluidsynth, lib)


def render(voices: list[list[tuple[float, float, int]]], programs: list[int], pans: list[float],
           velocities: list[list[int]], frames: int, sample_rate: int, soundfont: str) -> np.ndarray:
    """Render note lists (times relative to the render start) to ``(2, frames)`` float32.

    A fresh synth per clip: a reused one keeps reverb and chorus buffers from the previous clip even
    after a reset, so a clip's bytes would depend on which worker rendered what before it.
    """
    fluidsynth, lib = _fluid
    synth = fluidsynth.Synth(gain=0.4, samplerate=float(sample_rate))
    try:
        synth.setting("synth.cpu-cores", 1)
        sfid = synth.sfload(soundfont)
        if sfid < 0:
            raise RuntimeError(f"{soundfont}: FluidSynth cannot load this soundfont")
        if len(voices) > 15:  # 16 MIDI channels, one kept for percussion: fold extra voices into the last
            voices = voices[:14] + [sorted(n for v in voices[14:] for n in v)]
            velocities = velocities[:14] + [[v for vs in velocities[14:] for v in vs]]
        events = []  # (frame, order, channel, pitch, velocity): note-offs before note-ons at one frame
        for v, voice in enumerate(voices):
            channel = v if v < 9 else v + 1  # channel 9 is percussion in General MIDI
            synth.program_select(channel, sfid, 0, programs[v])
            synth.cc(channel, 10, int(round(64 + 63 * pans[v])))
            for (on, off, pitch), vel in zip(voice, velocities[v]):
                events.append((max(0, round(on * sample_rate)), 1, channel, pitch, vel))
                events.append((min(frames, round(off * sample_rate)), 0, channel, pitch, 0))
        events.sort()
        out = np.zeros((frames, 2), dtype=np.float32)
        pos = 0
        for frame, kind, channel, pitch, vel in events + [(frames, 0, -1, 0, 0)]:
            if frame > pos:
                view = out[pos:frame]
                lib.fluid_synth_write_float(synth.synth, frame - pos, view.ctypes.data, 0, 2,
                                            view.ctypes.data, 1, 2)
                pos = frame
            if channel < 0:
                break
            if kind:
                synth.noteon(channel, pitch, vel)
            else:
                synth.noteoff(channel, pitch)
    finally:
        synth.delete()
    return out.T.copy()


def normalise(audio: np.ndarray) -> np.ndarray:
    """Scale to TARGET_RMS_DB, then down further if the peak would exceed PEAK_DB."""
    rms = float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))
    gain = 10 ** (TARGET_RMS_DB / 20) / rms
    peak = float(np.abs(audio).max()) * gain
    gain *= min(1.0, 10 ** (PEAK_DB / 20) / peak)
    return (audio * gain).astype(np.float32)


# ------------------------------------------------------------------------------------ one clip


@dataclasses.dataclass(frozen=True)
class Job:
    slot: int
    attempt: int
    cand: Candidate
    out_dir: str
    seconds: float
    sample_rate: int
    channels: int
    seed: int
    soundfont: str
    palette: str = "score"


def make_clip(job: Job) -> tuple[int, dict | None, str]:
    """Render one clip; returns (slot, metadata line or None, reason for None)."""
    import soundfile as sf
    coll = next(c for c in COLLECTIONS if c.name == job.cand.collection)
    rng = random.Random(f"clip-{job.seed}-{job.slot}-{job.attempt}")
    try:
        piece = load_piece(job.cand, coll, rng)
    except Exception as e:  # noqa: BLE001 - any parse failure of a corpus file just means "draw another"
        return job.slot, None, f"cannot parse {job.cand.path}: {type(e).__name__}: {e}"
    start = choose_window(piece, job.seconds, rng)
    if start is None:
        return job.slot, None, f"{job.cand.path}: no window with enough sounding notes"
    t0, end = start - PREROLL_SECONDS, start + job.seconds
    voices, clip_notes = [], []
    for voice in piece.voices:
        kept = [(max(on, t0) - t0, off - t0, p) for on, off, p in voice if off > t0 and on < end]
        voices.append(kept)
        clip_notes += [(max(0.0, on - PREROLL_SECONDS), min(job.seconds, off - PREROLL_SECONDS), p)
                       for on, off, p in kept if off > PREROLL_SECONDS]
    polyphonic = len(piece.voices) > 1
    ensemble = rng.choice(FAMILIES if job.palette == "families" else coll.ensembles if polyphonic else coll.solo)
    names = ENSEMBLES.get(ensemble, (ensemble,))
    programs = [GM[names[min(v, len(names) - 1)]] for v in range(len(voices))]
    pans = list(np.linspace(-0.6, 0.6, len(voices))) if polyphonic else [0.0]
    if rng.random() < 0.5:
        pans.reverse()
    velocities = [[min(127, max(1, 84 + (8 if v == 0 else 0) + rng.randint(-8, 8))) for _ in voice]
                  for v, voice in enumerate(voices)]
    frames = round((job.seconds + PREROLL_SECONDS) * job.sample_rate)
    audio = render(voices, programs, pans, velocities, frames, job.sample_rate, job.soundfont)
    audio = audio[:, round(PREROLL_SECONDS * job.sample_rate):][:, :round(job.seconds * job.sample_rate)]
    if not np.isfinite(audio).all() or np.sqrt(np.mean(np.square(audio))) < 1e-4:
        return job.slot, None, f"{job.cand.path}: rendered audio is silent"
    audio = normalise(audio)
    if job.channels == 1:
        audio = audio.mean(axis=0, keepdims=True)
    rel = f"{coll.name}/{job.slot:05d}.flac"
    os.makedirs(os.path.join(job.out_dir, coll.name), exist_ok=True)
    sf.write(os.path.join(job.out_dir, rel), audio.T, job.sample_rate, format="FLAC", subtype="PCM_16")
    key = estimate_key(clip_notes)
    meta = {
        "path": rel, "instrument": ensemble, "key": key, "composer": composer_of(job.cand, coll),
        "genre": coll.genre, "dance": dance_of(job.cand.title), "tempo": piece.tempo, "metre": piece.metre,
        "title": job.cand.title, "score_path": job.cand.path, "score_number": job.cand.number,
        "score_offset_seconds": round(start, 4),
        "notes": [[round(a, 3), round(b, 3), p] for a, b, p in sorted(clip_notes)],
    }
    meta["prompt"] = caption(meta, rng)
    return job.slot, meta, ""


def composer_of(cand: Candidate, coll: Collection) -> str:
    if coll.composer:
        return coll.composer
    if cand.composer and "carolan" in cand.composer.lower():
        return "Turlough O'Carolan"
    if coll.name == "trecento":
        return cand.composer if cand.composer in CLEAN_COMPOSERS else "anonymous"
    return "traditional"


def dance_of(title: str | None) -> str | None:
    low = (title or "").lower()
    return next((d for d in DANCES if re.search(rf"\b{d}s?\b", low)), None)


def caption(meta: dict, rng: random.Random) -> str:
    kind = f"{meta['dance']}, {meta['genre']}" if meta["dance"] else meta["genre"]
    by = "" if meta["composer"] in ("traditional", "anonymous") else f" by {meta['composer']}"
    played = "sung by" if meta["instrument"] == "choir" else "played on"
    templates = (
        "{kind}{by} {played} {inst}, {key}, {metre}, {tempo} BPM",
        "{inst} performing {a} {kind}{by} in {key}, {tempo} BPM, {metre} time",
        "{a} {kind}{by}, {inst}, {key}, {metre}, {tempo} BPM",
    )
    text = rng.choice(templates).format(kind=kind, by=by, played=played, inst=meta["instrument"],
                                        key=meta["key"], metre=meta["metre"], tempo=meta["tempo"],
                                        a="an" if kind[0].lower() in "aeiou" else "a")
    return text[0].upper() + text[1:]


# ------------------------------------------------------------------------------------ main


def find_soundfont(path: str | None) -> str:
    for candidate in ([path] if path else SOUNDFONTS):
        if os.path.isfile(candidate):
            return candidate
    raise SystemExit(f"error: no soundfont at {path or ' or '.join(SOUNDFONTS)}; install one with "
                     "'apt-get install -y --no-install-recommends fluid-soundfont-gm' "
                     "(or timgm6mb-soundfont for the light variant), or pass --soundfont")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (created; existing clips are replaced)")
    p.add_argument("--num-clips", type=int, default=300, help="number of clips to write")
    p.add_argument("--seconds", type=float, default=5.0, help="length of each clip in seconds")
    p.add_argument("--sample-rate", type=int, default=16000, help="sample rate of the FLAC clips in Hz")
    p.add_argument("--channels", type=int, choices=(1, 2), default=2, help="1 = mono mix of the stereo render")
    p.add_argument("--seed", type=int, default=0, help="seed for score choice, windows, instruments, captions")
    p.add_argument("--soundfont", default=None, help=f"General MIDI .sf2 (default: first of {SOUNDFONTS})")
    p.add_argument("--palette", choices=("score", "families"), default="score",
                   help="instruments: each collection's own (17 classes) or six distinct families for every clip")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel render processes")
    args = p.parse_args(argv)
    if args.num_clips < 1 or args.seconds <= 0 or args.sample_rate < 8000 or args.workers < 1:
        p.error("--num-clips and --workers must be >= 1, --seconds > 0, --sample-rate >= 8000")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    try:
        import fluidsynth  # noqa: F401
        import music21  # noqa: F401
    except (ImportError, OSError) as e:
        raise SystemExit(f"error: {e}; install the demo extra (pip install -e '.[demo]') and "
                         "'apt-get install -y --no-install-recommends libfluidsynth3'") from e
    soundfont = find_soundfont(args.soundfont)
    os.makedirs(args.out, exist_ok=True)
    picker = ScorePicker(list_candidates(), args.seed)
    results: dict[int, dict] = {}
    pending = {slot: 0 for slot in range(args.num_clips)}
    failures, started = 0, time.monotonic()
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(args.workers, initializer=_init_worker) as pool:
        # Rounds keep the result independent of worker timing: every slot that failed in one round
        # draws its next score, in slot order, before the next round starts.
        while pending:
            jobs = [Job(slot, attempt, picker.next(), args.out, args.seconds, args.sample_rate, args.channels,
                        args.seed, soundfont, args.palette) for slot, attempt in sorted(pending.items())]
            for slot, meta, reason in pool.imap_unordered(make_clip, jobs, chunksize=1):
                if meta is None:
                    failures += 1
                    pending[slot] += 1
                    if pending[slot] > 50:
                        raise SystemExit(f"error: clip {slot}: 50 scores in a row failed; last: {reason}")
                    log.debug("slot %d: %s", slot, reason)
                    continue
                results[slot] = meta
                del pending[slot]
                if len(results) % 25 == 0 or len(results) == args.num_clips:
                    rate = len(results) / (time.monotonic() - started)
                    log.info("%d/%d clips | %.1f clips/s | %d scores redrawn", len(results), args.num_clips,
                             rate, failures)
    lines = "".join(json.dumps(results[s], ensure_ascii=False) + "\n" for s in range(args.num_clips))
    tmp = os.path.join(args.out, ".metadata.jsonl.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(lines)
    os.replace(tmp, os.path.join(args.out, "metadata.jsonl"))
    log.info("wrote %d clips (%.0f s of audio) in %.0f s with %s; %s", args.num_clips,
             args.num_clips * args.seconds, time.monotonic() - started, os.path.basename(soundfont),
             os.path.join(args.out, "metadata.jsonl"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
