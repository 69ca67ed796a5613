"""Audio I/O and transforms, against closed forms and float64 references."""

from __future__ import annotations

import io
import math
import struct

import numpy as np
import pytest
import soundfile as sf

from pipeline.data import audio as A


def sine(freq: float, sr: int, seconds: float, channels: int = 1, level: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(sr * seconds))) / sr
    return np.stack([level * np.sin(2 * np.pi * freq * (c + 1) * t) for c in range(channels)]).astype(np.float32)


def wav(audio: np.ndarray, sr: int, subtype: str = "FLOAT", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, audio.T, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


@pytest.mark.parametrize("sr_in,sr_out", [(44100, 48000), (48000, 16000), (8000, 44100), (96000, 22050)])
def test_resample_gives_the_same_sine_at_the_new_rate(sr_in, sr_out):
    x = sine(440.0, sr_in, 0.5, channels=2)
    y = A.resample(x, sr_in, sr_out)
    assert y.dtype == np.float32 and y.shape == (2, round(x.shape[1] * sr_out / sr_in))
    want = sine(440.0, sr_out, y.shape[1] / sr_out, channels=2)
    middle = slice(sr_out // 20, -sr_out // 20)  # the filter's edges are not a sine
    assert np.abs(y[:, middle] - want[:, middle]).max() < 2e-3


def test_resample_removes_content_above_the_new_nyquist():
    x = sine(7000.0, 44100, 0.5)  # above 8 kHz / 2 = 4 kHz: must vanish
    assert A.rms_dbfs(A.resample(x, 44100, 8000)[:, 400:-400]) < -80


def test_channel_policy():
    mono = np.array([[0.1, -0.2, 0.3]], np.float32)
    np.testing.assert_array_equal(A.set_channels(mono, 2), np.concatenate([mono, mono]))
    stereo = np.array([[0.2, 0.4], [0.0, -0.4]], np.float32)
    np.testing.assert_allclose(A.set_channels(stereo, 1), [[0.1, 0.0]])
    six = np.arange(12, dtype=np.float64).reshape(6, 2) / 20  # L R C LFE Ls Rs
    g = 1 / math.sqrt(2)
    left = (six[0] + g * six[2] + g * six[4]) / (1 + 2 * g)
    right = (six[1] + g * six[2] + g * six[5]) / (1 + 2 * g)
    out = A.set_channels(six.astype(np.float32), 2)
    np.testing.assert_allclose(out, np.stack([left, right]), atol=1e-4)  # ITU-R BS.775, LFE dropped
    np.testing.assert_allclose(A.set_channels(six.astype(np.float32), 1)[0], (left + right) / 2, atol=1e-4)
    three = np.ones((3, 4), np.float32) * np.array([[0.3], [0.6], [0.9]], np.float32)
    np.testing.assert_allclose(A.set_channels(three, 2), np.full((2, 4), 0.6), atol=1e-6)
    with pytest.raises(A.AudioError, match="only mono is widened"):
        A.set_channels(stereo, 3)


def test_levels_and_silence():
    assert A.rms_dbfs(sine(1000.0, 48000, 1.0, level=1.0)) == pytest.approx(-3.0103, abs=1e-3)
    assert A.rms_dbfs(np.zeros((2, 100), np.float32)) == -math.inf
    assert A.is_silent(np.zeros((1, 10), np.float32), -60)
    quiet = sine(1000.0, 48000, 1.0, level=10 ** (-70 / 20) * math.sqrt(2))  # -70 dBFS RMS
    assert A.is_silent(quiet, -60) and not A.is_silent(quiet, -80)


def test_flac_round_trip_is_16_bit_exact_and_clips_overshoot():
    x = sine(300.0, 16000, 0.25, channels=2, level=0.9)
    x[0, 10] = 1.7  # a resampler overshoot: must clip, not wrap around
    y, sr = A.decode(A.encode_flac(x, 16000))
    assert sr == 16000 and y.shape == x.shape
    assert np.abs(y - np.clip(x, -1, 1)).max() <= 1 / 32768 + 1e-7
    assert y[0, 10] > 0.99


@pytest.mark.parametrize("fmt,subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", None), ("WAV", "PCM_24")])
def test_decodes_common_formats(fmt, subtype):
    x = sine(440.0, 44100, 0.5, channels=2)
    y, sr = A.decode(wav(x, 44100, subtype, fmt))
    assert sr == 44100 and y.shape[0] == 2 and abs(y.shape[1] - x.shape[1]) <= 2048
    assert A.probe(wav(x, 44100, subtype, fmt)).format == fmt


@pytest.mark.parametrize("data,reason", [
    (b"", "empty file"),
    (b"plain text, not audio\n" * 40, "cannot decode: Format not recognised"),
])
def test_undecodable_bytes_raise_audio_error_with_a_stable_reason(data, reason):
    with pytest.raises(A.AudioError, match=reason) as e:
        A.decode(data)
    assert "0x" not in str(e.value), "no object address in a reject reason"


def test_non_finite_samples_are_refused():
    x = sine(440.0, 8000, 0.5)
    x[0, 7] = np.nan
    with pytest.raises(A.AudioError, match="non-finite"):
        A.decode(wav(x, 8000))
    with pytest.raises(A.AudioError, match="non-finite"):
        list(A.stream_windows(wav(x, 8000), 16000, 1, None))


def test_stream_windows_equal_one_shot_resampling_and_have_exact_offsets(monkeypatch):
    monkeypatch.setattr(A, "BLOCK_SECONDS", 0.7)  # blocks straddle window edges
    x = sine(220.0, 44100, 5.3, channels=2)
    stream = A.stream_windows(wav(x, 44100), 48000, 2, 2.0)
    windows = list(stream)
    assert [w.index for w in windows] == [0, 1, 2]
    assert [w.offset_seconds for w in windows] == [0.0, 2.0, 4.0]
    assert [w.audio.shape[1] for w in windows] == [96000, 96000, round(5.3 * 48000) - 192000]
    assert stream.source_frames == x.shape[1] and stream.source_seconds == pytest.approx(5.3)
    joined = np.concatenate([w.audio for w in windows], axis=1)
    np.testing.assert_allclose(joined, A.resample(x, 44100, 48000), atol=1e-4)


def test_stream_windows_set_channels_and_report_the_true_length_of_a_truncated_file():
    data = wav(sine(440.0, 22050, 2.0), 22050, "PCM_16")
    stream = A.stream_windows(data[:len(data) // 2], 16000, 2, None)
    (window,) = list(stream)
    assert stream.info.channels == 1 and window.audio.shape[0] == 2
    assert stream.source_seconds == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_array_equal(window.audio[0], window.audio[1])


def test_window_frames_are_rounded_once():
    assert A.window_frames(2.5, 44100) == 110250
    assert A.window_frames(1 / 3, 48000) == 16000
    with pytest.raises(ValueError, match="no frames"):
        A.window_frames(1e-6, 8000)


def wav_header(sample_rate: int, channels: int, data: bytes) -> bytes:
    """A hand-made 16-bit PCM WAV, so the header can claim any rate."""
    fmt = struct.pack("<HHIIHH", 1, channels, sample_rate, sample_rate * channels * 2, channels * 2, 16)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


@pytest.mark.parametrize("rate", [1, 999, 384001])
def test_a_header_rate_outside_1_to_384_khz_is_refused_before_decoding(rate):
    data = wav_header(rate, 2, np.full(20000, 1000, "<i2").tobytes())  # 40 KB
    assert A.probe(data).sample_rate == rate
    with pytest.raises(A.AudioError, match=f"sample rate {rate} Hz in the header is outside \\[1000, 384000\\]"):
        A.stream_windows(data, 44100, 2, None)


def test_the_rate_limits_themselves_are_accepted():
    for rate in (1000, 384000):
        data = wav_header(rate, 1, (1000 * np.sin(np.arange(rate // 2) / 3)).astype("<i2").tobytes())
        (window,) = A.stream_windows(data, 16000, 1, None)
        assert window.audio.shape == (1, 8000)


def test_a_source_longer_than_max_seconds_is_refused_from_its_header():
    data = wav(sine(440.0, 8000, 3.0), 8000, "PCM_16")
    assert len(list(A.stream_windows(data, 8000, 1, 1.0, max_seconds=3.0))) == 3
    with pytest.raises(A.AudioError, match="too long: the header says 3.0 s > --max-seconds 2.5"):
        A.stream_windows(data, 8000, 1, 1.0, max_seconds=2.5)


def test_float_audio_far_above_full_scale_is_refused_naming_the_peak():
    x = sine(440.0, 8000, 1.0, level=0.5)
    hot = wav(x * 1.4, 8000)  # +2.9 dBFS: a hot master, clipped on output
    assert len(list(A.stream_windows(hot, 8000, 1, None))) == 1
    scaled = wav(x * 32767, 8000)  # int16 values stored as float: +84.3 dBFS
    with pytest.raises(A.AudioError, match=r"samples peak at \+84\.3 dBFS \(> \+6 dBFS\)"):
        list(A.stream_windows(scaled, 8000, 1, None))


@pytest.mark.parametrize("window_seconds", [None, 0.25, 1.0, 3.0])
def test_pieces_are_bounded_and_join_into_the_windows(monkeypatch, window_seconds):
    monkeypatch.setattr(A, "BLOCK_SAMPLES", 3000)  # tiny blocks: every window spans several pieces
    data = wav(sine(330.0, 22050, 2.3, channels=2), 22050)
    pieces = list(A.stream_windows(data, 16000, 1, window_seconds).pieces())
    windows = list(A.stream_windows(data, 16000, 1, window_seconds))
    assert max(p.audio.shape[1] for p in pieces) <= 3000
    assert [p.index for p in pieces if p.last] == [w.index for w in windows]
    for w in windows:
        joined = np.concatenate([p.audio for p in pieces if p.index == w.index], axis=1)
        np.testing.assert_array_equal(joined, w.audio)
    whole = A.set_channels(A.resample(A.set_channels(A.decode(data)[0], 1), 22050, 16000), 1)
    np.testing.assert_allclose(np.concatenate([w.audio for w in windows], axis=1), whole, atol=1e-4)


def test_blocks_stay_bounded_for_many_channels_and_large_upsampling(monkeypatch):
    seen = []
    original = A.WindowStream._blocks

    def spy(self):
        for block in original(self):
            seen.append(block.size)
            yield block
    monkeypatch.setattr(A.WindowStream, "_blocks", spy)
    monkeypatch.setattr(A, "BLOCK_SAMPLES", 1 << 16)
    data = wav(np.tile(sine(100.0, 1000, 20.0), (8, 1)), 1000, "PCM_16")  # 8 channels at 1 kHz
    (window,) = A.stream_windows(data, 48000, 1, None)  # 48-fold upsampling
    assert window.audio.shape == (1, 960000) and max(seen) <= 1 << 16


def test_streamed_flac_is_byte_identical_to_one_shot_encoding_and_measures_the_level():
    x = sine(440.0, 44100, 3.0, channels=2, level=0.9)
    x[1, 100] = 1.3  # clipped the same way
    enc = A.FlacEncoder(44100, 2)
    for start in range(0, x.shape[1], 10007):
        enc.write(x[:, start:start + 10007])
    assert enc.frames == x.shape[1] and enc.level_dbfs == pytest.approx(A.rms_dbfs(x), abs=1e-9)
    f = enc.finish()
    assert f.read() == A.encode_flac(x, 44100)
    enc.discard()


def test_a_local_path_decodes_like_its_bytes(tmp_path):
    data = wav(sine(440.0, 8000, 1.5), 8000, "PCM_16")
    (tmp_path / "a.wav").write_bytes(data)
    from_path = [w.audio for w in A.stream_windows(str(tmp_path / "a.wav"), 16000, 2, 1.0)]
    from_bytes = [w.audio for w in A.stream_windows(data, 16000, 2, 1.0)]
    assert len(from_path) == 2 and all(np.array_equal(a, b) for a, b in zip(from_path, from_bytes))
    (tmp_path / "text.wav").write_text("not audio\n" * 50)
    with pytest.raises(A.AudioError, match=r"^cannot decode: Format not recognised\.$"):
        A.stream_windows(str(tmp_path / "text.wav"), 16000, 2, None)
