"""Key and instrument scores against synthetic music with known answers."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from pipeline.data.audio import encode_flac
from pipeline.report import scores
from pipeline.report.scores import Key, mirex_score, parse_key

SR = 22050
C_MAJOR = [[48, 64, 67, 72], [53, 65, 69, 72], [55, 62, 67, 71], [48, 64, 67, 72]]  # I IV V I
A_MINOR = [[45, 64, 69, 72], [50, 65, 69, 74], [52, 64, 68, 71], [45, 64, 69, 72]]  # i iv V i


def tone(midi: int, seconds: float, harmonics: int = 6, sr: int = SR, decay: float = 1.0) -> np.ndarray:
    """A note with harmonics of amplitude 1/k**decay and short attack/release ramps."""
    t = np.arange(int(seconds * sr)) / sr
    f = 440.0 * 2 ** ((midi - 69) / 12)
    x = sum(np.sin(2 * np.pi * k * f * t) / k ** decay for k in range(1, harmonics + 1) if k * f < sr / 2)
    return x * np.minimum(1, np.minimum(t / 0.02, (seconds - t) / 0.05))


def progression(chords, shift: int = 0, seconds: float = 0.5, sr: int = SR) -> np.ndarray:
    audio = np.concatenate([sum(tone(m + shift, seconds, sr=sr) for m in chord) for chord in chords])
    return 0.1 * audio / np.abs(audio).max()


def test_parse_key_reads_the_demo_datasets_spellings_and_names_a_bad_one():
    assert parse_key("C major") == Key(0, "major")
    assert parse_key("F# minor") == parse_key("Gb minor") == Key(6, "minor")
    assert parse_key("Bb major") == Key(10, "major") and parse_key("c# min") == Key(1, "minor")
    assert str(Key(3, "minor")) == "Eb minor"
    with pytest.raises(ValueError, match="'H dorian'.*F# minor"):
        parse_key("H dorian")


@pytest.mark.parametrize("estimated, reference, score", [
    ("C major", "C major", 1.0),
    ("G major", "C major", 0.5),   # a fifth above, same mode
    ("E minor", "A minor", 0.5),
    ("F major", "C major", 0.0),   # a fifth below: 0 in MIREX as mir_eval scores it by default
    ("A minor", "C major", 0.3),   # relative minor
    ("C major", "A minor", 0.3),   # relative major
    ("C minor", "C major", 0.2),   # parallel
    ("F# major", "C major", 0.0),
    ("Eb major", "C minor", 0.3),
])
def test_mirex_key_score(estimated, reference, score):
    assert mirex_score(parse_key(estimated), parse_key(reference)) == score


def test_a_c_major_progression_with_harmonics_scores_c_major_with_mirex_one():
    scale = [[60 + i] for i in (0, 2, 4, 5, 7, 9, 11, 12)]
    audio = progression(scale + C_MAJOR)
    assert scores.estimate_key(audio, SR) == Key(0, "major")
    assert mirex_score(scores.estimate_key(audio, SR), parse_key("C major")) == 1.0
    profile = scores.chroma(audio, SR)
    assert profile.sum() == pytest.approx(1.0) and profile.argmax() in (0, 7)  # C (or G, its fifth)


def test_every_transposition_is_found_and_the_relative_minor_scores_0_3():
    for shift in range(12):
        assert scores.estimate_key(progression(C_MAJOR, shift), SR) == Key(shift, "major")
        assert scores.estimate_key(progression(A_MINOR, shift), SR) == Key((9 + shift) % 12, "minor")
    a_minor = scores.estimate_key(progression(A_MINOR), SR)
    assert mirex_score(a_minor, parse_key("C major")) == 0.3


def test_key_does_not_depend_on_sample_rate_or_channels():
    mono = progression(C_MAJOR, 2, sr=44100)
    stereo = np.stack([mono, 0.5 * mono])
    assert scores.estimate_key(stereo, 44100) == scores.estimate_key(progression(C_MAJOR, 2, sr=8000), 8000) \
        == Key(2, "major")
    np.testing.assert_allclose(scores.chroma(mono, 44100), scores.chroma(progression(C_MAJOR, 2, sr=16000), 16000),
                               atol=0.02)


TIMBRES = {"flute": (2, 3.0), "brass": (8, 1.0)}
"""(harmonics, decay): nearly a sine; a bright tone with harmonics of amplitude 1/k."""


def timbre(kind: str, rng: np.random.Generator, seconds: float = 1.5) -> np.ndarray:
    """Three random notes of a `TIMBRES` kind at a random gain, with a little noise."""
    notes = rng.integers(55, 80, size=3)
    harmonics, decay = TIMBRES[kind]
    audio = np.concatenate([tone(int(m), seconds / 3, harmonics=harmonics, decay=decay) for m in notes])
    return audio * rng.uniform(0.01, 0.5) + rng.normal(0, 1e-4, audio.shape)


def test_nearest_centroid_separates_two_synthetic_timbres_whatever_the_loudness():
    rng = np.random.default_rng(0)
    labels = ["flute", "brass"] * 10
    fit = np.stack([scores.timbre_features(timbre(k, rng), SR) for k in labels])
    classifier = scores.NearestCentroid(fit, labels)
    assert classifier.classes == ["brass", "flute"]
    held_out = ["brass", "flute"] * 6
    assert classifier.predict(np.stack([scores.timbre_features(timbre(k, rng), SR) for k in held_out])) == held_out
    assert classifier.leave_one_out() == labels
    clip = timbre("flute", rng)
    louder = scores.timbre_features(clip * 20, SR)
    np.testing.assert_allclose(scores.timbre_features(clip, SR), louder, atol=1e-3)  # soxr resamples in float32


def test_leave_one_out_differs_from_refitting_when_a_clip_is_its_own_class():
    features = np.array([[0.0], [0.2], [10.0], [10.2], [4.0]])
    labels = ["a", "a", "b", "b", "c"]
    classifier = scores.NearestCentroid(features, labels)
    assert classifier.predict(features) == labels  # in-sample: perfect
    assert classifier.leave_one_out() == ["a", "a", "b", "b", "a"]  # "c" has no other clip: nearest is "a"


KEYS = ("C major", "A minor", "D major", "F# minor")
CHORDS = {"C major": (C_MAJOR, 0), "A minor": (A_MINOR, 0), "D major": (C_MAJOR, 2), "F# minor": (A_MINOR, 9)}


def music(key: str, instrument: str, rng: np.random.Generator) -> np.ndarray:
    chords, shift = CHORDS[key]
    harmonics, decay = TIMBRES[instrument]
    audio = np.concatenate([sum(tone(m + shift, 0.5, harmonics=harmonics, decay=decay) for m in chord)
                            for chord in chords])
    return audio / np.abs(audio).max() * rng.uniform(0.05, 0.5)


def test_prompt_following_puts_audio_that_follows_its_prompts_at_the_ceiling_and_far_above_chance():
    rng = np.random.default_rng(1)
    labels = [(k, i) for k in KEYS for i in ("flute", "brass")]
    reference = [scores.Clip(music(k, i, rng), SR, k, i) for k, i in labels * 2]
    generated = [scores.Clip(music(k, i, rng), SR, k, i) for k, i in labels]
    perm = [(n + 3) % len(labels) for n in range(len(labels))]  # each clip gets another clip's labels
    shuffled = [scores.Clip(g.audio, SR, generated[p].key, generated[p].instrument) for g, p in zip(generated, perm)]
    result = scores.prompt_following(generated, shuffled, reference)
    key, instrument = result["key"], result["instrument"]
    assert key["generated"] == {"mean": 1.0, "se": 0.0, "n": 8} and key["ceiling"]["mean"] == 1.0
    # The estimates are right, so chance is what the partners' labels score against the true ones.
    expected_chance = np.mean([mirex_score(parse_key(labels[n][0]), parse_key(labels[p][0]))
                               for n, p in enumerate(perm)])
    assert key["chance"]["mean"] == pytest.approx(expected_chance) and expected_chance < 0.5
    assert key["generated_minus_chance"]["mean"] == pytest.approx(1.0 - expected_chance)
    assert instrument["generated"]["mean"] == 1.0 and instrument["ceiling"]["mean"] == 1.0
    assert instrument["chance"]["mean"] == 0.0  # a shift of 3 flips flute <-> brass on every clip
    assert result["per_clip"][1] == {"key_prompted": "C major", "key_estimated": "C major",
                                     "instrument_predicted": "brass", "instrument_prompted": "brass"}
    table = scores.format_table(result)
    assert "key (MIREX)" in table and " 1.000 +- 0.000" in table and "through VAE" in table


def test_generated_audio_is_classified_by_centroids_of_the_reference_clips_through_the_vae():
    """A decoder that colours every sound (here hard saturation, which adds harmonics to the flute too)
    moves generated audio away from the real clips' centroids; centroids of the real clips through the
    same decoder do not."""
    rng = np.random.default_rng(4)
    labels = [(k, i) for k in KEYS for i in ("flute", "brass")]
    reference = [scores.Clip(music(k, i, rng), SR, k, i) for k, i in labels * 2]
    def decoder(audio):
        return np.tanh(10 * audio / np.abs(audio).max())
    through = [dataclasses.replace(c, audio=decoder(c.audio)) for c in reference]
    generated = [scores.Clip(decoder(music(k, i, rng)), SR, k, i) for k, i in labels]
    shuffled = generated[1:] + generated[:1]
    plain = scores.prompt_following(generated, shuffled, reference)
    result = scores.prompt_following(generated, shuffled, reference, through)
    assert plain["instrument"]["fitted_on"] == "reference" and "through_vae" not in plain["instrument"]
    assert result["instrument"]["fitted_on"] == "through_vae"
    assert result["instrument"]["generated"]["mean"] == 1.0 and plain["instrument"]["generated"]["mean"] <= 0.5
    assert result["instrument"]["through_vae"]["mean"] > 0.75
    assert result["instrument"]["ceiling"] == plain["instrument"]["ceiling"]  # real clips, their own classifier
    assert result["key"]["through_vae"]["n"] == len(through) and "through VAE" in scores.format_table(result)


def test_prompt_following_without_a_reference_scores_keys_and_skips_the_instrument():
    rng = np.random.default_rng(2)
    generated = [scores.Clip(music(k, "flute", rng), SR, k, "flute") for k in KEYS]
    result = scores.prompt_following(generated, generated[1:] + generated[:1], None)
    assert result["key"]["generated"]["mean"] == 1.0 and "ceiling" not in result["key"]
    assert "skipped" in result["instrument"] and "skipped: needs --reference" in scores.format_table(result)


def test_read_reference_reads_the_demo_datasets_layout(tmp_path):
    rng = np.random.default_rng(3)
    lines = []
    for n, (k, i) in enumerate([("C major", "flute"), ("A minor", "brass"), ("D major", "flute")]):
        rel = f"coll/{n:05d}.flac"
        (tmp_path / "coll").mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(encode_flac(music(k, i, rng)[None, :].astype(np.float32), SR))
        lines.append(json.dumps({"path": rel, "key": k, "instrument": i, "prompt": f"{i} in {k}"}))
    (tmp_path / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    clips = scores.read_reference(str(tmp_path), limit=2)
    assert [(c.key, c.instrument, c.sample_rate) for c in clips] == [("C major", "flute", SR), ("A minor", "brass", SR)]
    assert scores.estimate_key(clips[1].audio, clips[1].sample_rate) == Key(9, "minor")


def test_prompt_spread_is_the_distance_between_prompt_means_over_the_seed_to_seed_distance():
    from pipeline.report.scores import prompt_spread
    features = np.array([[0.0, 0.0], [0.0, 2.0], [4.0, 0.0], [4.0, 2.0]])
    spread = prompt_spread(features, [0, 0, 1, 1])
    assert spread["between"] == pytest.approx(4.0) and spread["within"] == pytest.approx(2.0)
    assert spread["ratio"] == pytest.approx(2.0) and spread["chance_ratio"] == pytest.approx(2 ** -0.5)
    assert "skipped" in prompt_spread(features, [0, 1, 2, 3])  # one seed per prompt: no spread to compare


def test_prompt_spread_of_prompt_free_noise_sits_near_its_chance_ratio():
    from pipeline.report.scores import prompt_spread
    rng = np.random.default_rng(0)
    spread = prompt_spread(rng.normal(size=(8 * 4, 200)), [p for p in range(8) for _ in range(4)])
    assert spread["ratio"] == pytest.approx(spread["chance_ratio"], rel=0.1)


def test_confusion_counts_prompted_against_predicted():
    from pipeline.report.scores import confusion
    assert confusion(["flute", "flute", "cello"], ["flute", "cello", "cello"]) == \
        {"cello": {"cello": 1}, "flute": {"cello": 1, "flute": 1}}


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.flac", "a/../../b.flac"])
def test_a_listing_row_whose_path_leaves_the_folder_is_refused(tmp_path, path):
    from pipeline.report.scores import read_listing
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"path": path}) + "\n")
    with pytest.raises(ValueError, match="must stay below"):
        read_listing(str(tmp_path))
