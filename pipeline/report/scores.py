"""Music scores for "does the model follow its prompt?": the key and the instrument of a clip.

Cheap and transparent (numpy only), as ENVIRONMENT.md "Checking that a model follows its prompt" asks:

- **Key**: an STFT chroma over 55 Hz - 4 kHz (each bin's magnitude added to the pitch class of its
  nearest equal-tempered semitone), correlated with the 24 rotated Krumhansl-Kessler key profiles
  (Krumhansl 1990, the same profiles `tools/make_demo_dataset.py` uses to label the demo clips from
  their notes); the best correlation is the key. Scored against the prompted key with the MIREX key
  score (MIREX 2005 "Audio Key Detection"; mir_eval ``key.weighted_score``): same key 1.0, estimate a
  perfect fifth above the reference in the same mode 0.5, relative major/minor 0.3, parallel
  major/minor 0.2, anything else 0.
- **Instrument**: per-clip statistics (mean and standard deviation over frames) of a 40-band log-mel
  spectrogram, after normalising the clip to unit RMS so loudness does not decide; a nearest-centroid
  classifier over features standardised on the fitting clips.

All analysis runs on a mono mix resampled to `ANALYSIS_RATE`, so clips at any sample rate are comparable.
"""
from __future__ import annotations

import dataclasses
import re

import numpy as np

ANALYSIS_RATE = 16000
"""Hz: every clip is mixed to mono and resampled to this rate before analysis."""
CHROMA_FMIN, CHROMA_FMAX = 55.0, 4000.0
CHROMA_N_FFT, CHROMA_HOP = 8192, 2048
"""0.51 s frames give 1.95 Hz bins: finer than the 3.3 Hz between A1 and A#1 at the chroma's low end."""
MEL_BANDS, MEL_N_FFT, MEL_HOP, MEL_FMIN, MEL_FMAX = 40, 1024, 256, 30.0, 8000.0

# Krumhansl-Kessler probe-tone profiles, index 0 = tonic.
KK_MAJOR = np.array([6.35, 2.23, 3.48, 2.33, 4.38, 4.09, 2.52, 5.19, 2.39, 3.66, 2.29, 2.88])
KK_MINOR = np.array([6.33, 2.68, 3.52, 5.38, 2.60, 3.53, 2.54, 4.75, 3.98, 2.69, 3.34, 3.17])
MODES = ("major", "minor")
_NAMES = ("C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B")
_LETTERS = {"C": 0, "D": 2, "E": 4, "F": 5, "G": 7, "A": 9, "B": 11}
_KEY_TEXT = re.compile(r"^\s*([A-Ga-g])\s*([#b\u266f\u266d]*)\s*(major|minor|maj|min)\s*$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True, slots=True)
class Key:
    tonic: int
    """Pitch class of the tonic, 0 = C ... 11 = B."""
    mode: str
    """"major" or "minor"."""

    def __post_init__(self) -> None:
        if not 0 <= self.tonic < 12 or self.mode not in MODES:
            raise ValueError(f"Key(tonic={self.tonic}, mode={self.mode!r}): tonic must be 0-11, mode one of {MODES}")

    def __str__(self) -> str:
        return f"{_NAMES[self.tonic]} {self.mode}"


def parse_key(text: str) -> Key:
    """``"C major"``, ``"F# minor"``, ``"Bb major"``, ``"Db min"`` -> `Key` (enharmonic spellings agree)."""
    match = _KEY_TEXT.match(str(text))
    if match is None:
        raise ValueError(f"key {text!r}: expected '<A-G>[#|b] major|minor', e.g. 'F# minor'")
    letter, accidentals, mode = match.groups()
    shift = sum(+1 if a in "#\u266f" else -1 for a in accidentals)
    return Key((_LETTERS[letter.upper()] + shift) % 12, "major" if mode.lower().startswith("maj") else "minor")


def mirex_score(estimated: Key, reference: Key) -> float:
    """The MIREX key score of ``estimated`` against ``reference`` (see the module docstring)."""
    interval = (estimated.tonic - reference.tonic) % 12
    if estimated.mode == reference.mode:
        if interval == 0:
            return 1.0
        return 0.5 if interval == 7 else 0.0  # mir_eval's default: only the fifth above counts
    if interval == 0:
        return 0.2  # parallel
    relative = 9 if reference.mode == "major" else 3  # C major <-> A minor
    return 0.3 if interval == relative else 0.0


# ------------------------------------------------------------------------------------- analysis


def to_analysis_rate(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """(T,) or (C, T) audio -> mono float64 at `ANALYSIS_RATE`."""
    x = np.asarray(audio, dtype=np.float64)
    if x.ndim == 2:
        x = x.mean(axis=0)
    if x.ndim != 1:
        raise ValueError(f"audio of shape {np.shape(audio)}: expected (T,) or (channels, T)")
    if sample_rate != ANALYSIS_RATE:
        import soxr
        x = soxr.resample(x, sample_rate, ANALYSIS_RATE, quality="HQ")
    return x


def _stft_magnitude(x: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """(frames, n_fft // 2 + 1) magnitudes with a periodic Hann window; short clips are zero-padded."""
    if len(x) < n_fft:
        x = np.pad(x, (0, n_fft - len(x)))
    frames = 1 + (len(x) - n_fft) // hop
    index = np.arange(n_fft)[None, :] + hop * np.arange(frames)[:, None]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    return np.abs(np.fft.rfft(x[index] * window, axis=1))


def chroma(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """(12,) pitch-class energy of the whole clip, C first, summing to 1 (all zeros for silence)."""
    x = to_analysis_rate(audio, sample_rate)
    magnitude = _stft_magnitude(x, CHROMA_N_FFT, CHROMA_HOP)  # (frames, bins)
    freqs = np.fft.rfftfreq(CHROMA_N_FFT, 1.0 / ANALYSIS_RATE)
    band = (freqs >= CHROMA_FMIN) & (freqs <= CHROMA_FMAX)
    pitch_class = np.round(69 + 12 * np.log2(freqs[band] / 440.0)).astype(int) % 12
    profile = np.bincount(pitch_class, weights=magnitude[:, band].sum(axis=0), minlength=12)
    total = profile.sum()
    return profile / total if total > 0 else profile


def key_correlations(profile: np.ndarray) -> np.ndarray:
    """(2, 12) Pearson correlation of a chroma with the major (row 0) and minor (row 1) profile of each tonic."""
    out = np.zeros((2, 12))
    if np.ptp(profile) == 0:
        return out
    for m, template in enumerate((KK_MAJOR, KK_MINOR)):
        for tonic in range(12):
            out[m, tonic] = np.corrcoef(profile, np.roll(template, tonic))[0, 1]
    return out


def estimate_key(audio: np.ndarray, sample_rate: int) -> Key:
    """The Krumhansl-Kessler key of a clip (C major for silence: it then scores as any guess would)."""
    r = key_correlations(chroma(audio, sample_rate))
    mode, tonic = np.unravel_index(int(np.argmax(r)), r.shape)
    return Key(int(tonic), MODES[mode])


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, fmin: float, fmax: float) -> np.ndarray:
    """(n_mels, n_fft // 2 + 1) triangular filters equally spaced on the HTK mel scale."""
    def mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    edges = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / sample_rate)
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs[None, :] - lower) / (centre - lower)
    falling = (upper - freqs[None, :]) / (upper - centre)
    return np.clip(np.minimum(rising, falling), 0.0, None)


_MEL = mel_filterbank(MEL_BANDS, MEL_N_FFT, ANALYSIS_RATE, MEL_FMIN, MEL_FMAX)


def timbre_features(audio: np.ndarray, sample_rate: int) -> np.ndarray:
    """(2 * MEL_BANDS,): mean and standard deviation over frames of the log-mel power, clip at unit RMS."""
    x = to_analysis_rate(audio, sample_rate)
    rms = np.sqrt(np.mean(x ** 2)) if len(x) else 0.0
    x = x / rms if rms > 0 else x
    power = _stft_magnitude(x, MEL_N_FFT, MEL_HOP) ** 2
    log_mel = np.log(power @ _MEL.T + 1e-8)  # (frames, bands)
    return np.concatenate([log_mel.mean(axis=0), log_mel.std(axis=0)])


class NearestCentroid:
    """Nearest class mean in feature space standardised by the fitting set's per-feature mean and std."""

    def __init__(self, features: np.ndarray, labels: list[str]):
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or len(features) != len(labels) or len(set(labels)) < 2:
            raise ValueError(f"NearestCentroid needs (N, D) features with one label each and >= 2 classes; got "
                             f"features {features.shape}, {len(labels)} labels, {len(set(labels))} classes")
        self.mean = features.mean(axis=0)
        self.std = features.std(axis=0) + 1e-6
        self._z = (features - self.mean) / self.std
        self._labels = list(labels)
        self.classes = sorted(set(labels))
        self._index = np.array([self.classes.index(label) for label in labels])
        self._sums = np.stack([self._z[self._index == c].sum(axis=0) for c in range(len(self.classes))])
        self._counts = np.bincount(self._index, minlength=len(self.classes)).astype(np.float64)

    def predict(self, features: np.ndarray) -> list[str]:
        z = (np.atleast_2d(np.asarray(features, dtype=np.float64)) - self.mean) / self.std
        centroids = self._sums / self._counts[:, None]
        distances = ((z[:, None, :] - centroids[None]) ** 2).sum(axis=-1)
        return [self.classes[i] for i in distances.argmin(axis=1)]

    def leave_one_out(self) -> list[str]:
        """Each fitting clip classified by centroids computed without it (an honest score on the fitting
        set; a class left with no other clip cannot be predicted for it)."""
        out = []
        for i, z in enumerate(self._z):
            sums, counts = self._sums.copy(), self._counts.copy()
            sums[self._index[i]] -= z
            counts[self._index[i]] -= 1
            alive = counts > 0
            centroids = sums[alive] / counts[alive, None]
            names = [c for c, a in zip(self.classes, alive) if a]
            out.append(names[int(((centroids - z) ** 2).sum(axis=1).argmin())])
        return out


# ------------------------------------------------------------------------------ prompt following


@dataclasses.dataclass(frozen=True, slots=True)
class Clip:
    """One clip and the labels it was prompted with (or, for a real clip, its own labels)."""
    audio: np.ndarray
    """(channels, samples) or (samples,) float."""
    sample_rate: int
    key: str | None
    instrument: str | None


def read_listing(url: str, limit: int | None = None) -> list[dict]:
    """Up to ``limit`` rows of ``<url>/metadata.jsonl``, each with a ``path`` relative to ``url`` (the demo
    dataset's layout, `tools/make_demo_dataset.py`: also ``prompt``, ``key``, ``instrument``, ...)."""
    import json

    from pipeline import storage
    listing = storage.join(url, "metadata.jsonl")
    rows = []
    for n, line in enumerate(storage.read_bytes(listing).decode("utf-8").splitlines(), 1):
        if limit is not None and len(rows) >= limit:
            break
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{listing}: line {n} is not JSON ({e})") from None
        if not isinstance(row, dict) or not isinstance(row.get("path"), str):
            raise ValueError(f"{listing}: line {n} needs a 'path' (relative to {url})")
        if row["path"].startswith("/") or ".." in row["path"].split("/"):
            raise ValueError(f"{listing}: line {n}: path {row['path']!r} must stay below {url}")
        rows.append(row)
    return rows


def read_reference(url: str, limit: int) -> list[Clip]:
    """Up to ``limit`` real clips of ``<url>/metadata.jsonl`` with their ``key`` and ``instrument``."""
    from pipeline import storage
    from pipeline.data.audio import decode
    clips = []
    for row in read_listing(url, limit):
        audio, sample_rate = decode(storage.read_bytes(storage.join(url, row["path"])))
        clips.append(Clip(audio, sample_rate, row.get("key"), row.get("instrument")))
    return clips


def mean_se(values) -> dict:
    """``{"mean", "se", "n"}``: the mean and its standard error (None where undefined)."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "se": None, "n": 0}
    se = float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else None
    return {"mean": float(v.mean()), "se": se, "n": int(len(v))}


def _key_score(estimated: Key, text: str | None) -> float | None:
    if text is None:
        return None
    try:
        return mirex_score(estimated, parse_key(text))
    except ValueError:
        return None  # an unparseable prompted key is counted out (n says how many were scored)


def confusion(prompted: list[str], predicted: list[str]) -> dict[str, dict[str, int]]:
    """``{prompted class: {predicted class: count}}`` (rows and columns in sorted order)."""
    table: dict[str, dict[str, int]] = {}
    for a, b in sorted(zip(prompted, predicted)):
        row = table.setdefault(a, {})
        row[b] = row.get(b, 0) + 1
    return table


def prompt_spread(features: np.ndarray, prompt_ids: list[int]) -> dict:
    """Do clips differ more between prompts than between seeds of one prompt? In standardised features:
    ``between``, the mean distance between the per-prompt mean features; ``within``, the mean distance
    between two clips of the same prompt; ``ratio = between / within``. If the prompt changed nothing, a
    mean of S clips would sit ``within / sqrt(S)`` from another (``chance_ratio``, for S seeds each)."""
    ids = np.asarray(prompt_ids)
    groups = [features[ids == p] for p in np.unique(ids)]
    if len(groups) < 2 or min(len(g) for g in groups) < 2:
        return {"skipped": "needs at least 2 prompts with at least 2 seeds each"}
    means = np.stack([g.mean(axis=0) for g in groups])

    def mean_distance(x: np.ndarray) -> float:
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        return float(d[np.triu_indices(len(x), 1)].mean())
    between = mean_distance(means)
    within = float(np.mean([mean_distance(g) for g in groups]))
    seeds = float(np.mean([len(g) for g in groups]))
    return {"between": between, "within": within, "ratio": between / within if within > 0 else float("inf"),
            "chance_ratio": 1.0 / np.sqrt(seeds), "prompts": len(groups)}


def prompt_following(generated: list[Clip], shuffled: list[Clip], reference: list[Clip] | None,
                     through_vae: list[Clip] | None = None, prompt_ids: list[int] | None = None) -> dict:
    """Key and instrument scores of ``generated`` against its prompts, of the same audio against the
    prompts in ``shuffled`` (chance: only the labels of ``shuffled`` are used), and of the ``reference``
    clips against their own labels (ceiling; the instrument by leave-one-out). ``through_vae``, the
    reference clips encoded and decoded by the model's pretransform, gives a second ceiling and, since
    generated audio comes out of the same decoder, the clips the instrument classifier is fitted on (a
    classifier fitted on real clips also scores the decoder's colouring of the sound). ``prompt_ids``
    (which prompt each generated clip came from) adds the between/within-prompt spread
    (`prompt_spread`) in the classifier's standardised timbre features, and confusion tables."""
    estimated = [estimate_key(c.audio, c.sample_rate) for c in generated]
    key_true = [_key_score(e, c.key) for e, c in zip(estimated, generated)]
    key_chance = [_key_score(e, c.key) for e, c in zip(estimated, shuffled)]
    out = {"clips": len(generated), "key": {
        "generated": mean_se(key_true), "chance": mean_se(key_chance),
        "generated_minus_chance": mean_se([a - b for a, b in zip(key_true, key_chance)
                                           if a is not None and b is not None])}}
    per_clip = [{"key_prompted": c.key, "key_estimated": str(e)} for c, e in zip(generated, estimated)]
    real = [c for c in (reference or []) if c.instrument is not None]
    decoded = [c for c in (through_vae or []) if c.instrument is not None]
    for name, clips in (("ceiling", reference), ("through_vae", through_vae)):
        if clips:  # each clip's key against its own label
            out["key"][name] = mean_se([_key_score(estimate_key(c.audio, c.sample_rate), c.key) for c in clips])
    if len({c.instrument for c in real}) < 2:
        out["instrument"] = {"skipped": "needs --reference with real clips of at least 2 instruments"}
    else:
        def features(clips: list[Clip]) -> np.ndarray:
            return np.stack([timbre_features(c.audio, c.sample_rate) for c in clips])

        def fit(clips: list[Clip]) -> NearestCentroid:
            return NearestCentroid(features(clips), [c.instrument for c in clips])

        def loo(classifier: NearestCentroid, clips: list[Clip]) -> dict:
            return mean_se([float(p == c.instrument) for p, c in zip(classifier.leave_one_out(), clips)])
        on_real = fit(real)
        classifier = fit(decoded) if len({c.instrument for c in decoded}) >= 2 else on_real

        def hits(labels: list[Clip]) -> list[float | None]:
            return [None if c.instrument not in classifier.classes else float(p == c.instrument)
                    for p, c in zip(predicted, labels)]
        generated_features = features(generated)
        predicted = classifier.predict(generated_features)
        true_hits, chance_hits = hits(generated), hits(shuffled)
        out["instrument"] = {
            "classes": classifier.classes, "generated": mean_se(true_hits), "chance": mean_se(chance_hits),
            "generated_minus_chance": mean_se([a - b for a, b in zip(true_hits, chance_hits)
                                               if a is not None and b is not None]),
            "ceiling": loo(on_real, real), "fitted_on": "reference" if classifier is on_real else "through_vae"}
        out["instrument"]["confusion"] = {"generated": confusion([c.instrument for c in generated], predicted)}
        if classifier is not on_real:
            out["instrument"]["through_vae"] = loo(classifier, decoded)
            out["instrument"]["confusion"]["through_vae"] = confusion([c.instrument for c in decoded],
                                                                      classifier.leave_one_out())
        if prompt_ids is not None:
            out["spread"] = prompt_spread((generated_features - classifier.mean) / classifier.std, prompt_ids)
        for row, p in zip(per_clip, predicted):
            row["instrument_predicted"] = p
        for row, c in zip(per_clip, generated):
            row["instrument_prompted"] = c.instrument
    out["per_clip"] = per_clip
    return out


def _cell(s: dict | None) -> str:
    if not s or s["mean"] is None:
        return f"{'-':>15}"
    se = f"{s['se']:.3f}" if s["se"] is not None else "-"
    return f"{s['mean']:6.3f} +- {se:>5}"


def format_table(audio: dict) -> str:
    """The audio part of the probe's printed table."""
    if "skipped" in audio:
        return f"audio scores skipped: {audio['skipped']}"
    lines = [f"audio scores over {audio['clips']} generated clips (mean +- standard error)",
             f"{'':12} {'generated':>15} {'chance':>15} {'gen - chance':>15} {'real clips':>15} {'through VAE':>15}"]
    for name, label in (("key", "key (MIREX)"), ("instrument", "instrument")):
        s = audio[name]
        if "skipped" in s:
            lines.append(f"{label:12} skipped: {s['skipped']}")
        else:
            lines.append(f"{label:12} {_cell(s['generated'])} {_cell(s['chance'])} {_cell(s['generated_minus_chance'])} "
                         f"{_cell(s.get('ceiling'))} {_cell(s.get('through_vae'))}")
    lines.append("(real clips: the reference clips against their own labels; through VAE: the same clips encoded "
                 "and decoded by the model's VAE, the most generated audio can score)")
    for name, table in (audio.get("instrument", {}).get("confusion") or {}).items():
        lines += ["", format_confusion(f"instrument confusion, {name.replace('_', ' ')} (rows: prompted/true, "
                                       "columns: predicted)", table)]
    spread = audio.get("spread")
    if spread and "skipped" not in spread:
        lines += ["", f"between-prompt / within-prompt spread of the generated clips (timbre features): "
                      f"{spread['ratio']:.2f} (between {spread['between']:.2f}, within {spread['within']:.2f}; "
                      f"{spread['chance_ratio']:.2f} if the prompt changed nothing)"]
    return "\n".join(lines)


def format_confusion(title: str, table: dict[str, dict[str, int]]) -> str:
    classes = sorted(set(table) | {c for row in table.values() for c in row})
    width = max(6, *(len(c) for c in classes))
    lines = [title, " " * width + "".join(f" {c[:width]:>{width}}" for c in classes)]
    for a in classes:
        row = table.get(a, {})
        lines.append(f"{a:<{width}}" + "".join(f" {row.get(b, 0):>{width}}" for b in classes))
    return "\n".join(lines)
