"""Audio I/O and pure transforms on ``(C, T)`` float32 arrays.

soundfile (libsndfile: WAV, FLAC, OGG/Vorbis/Opus, MP3) decodes, soxr resamples. Everything here takes
and returns numpy arrays shaped ``(channels, frames)`` so each transform can be tested on a tiny array.

`stream_windows` is the one entry point for a whole file: it decodes in blocks, so a very long source
never sits in memory as float samples, and it yields fixed-length windows at the target rate.
"""

from __future__ import annotations

import dataclasses
import io
import math
import re
from collections.abc import Iterator

import numpy as np
import soundfile as sf
import soxr

BLOCK_SECONDS = 30.0
"""Decode this much source audio per read in `stream_windows` (bounds memory for long files)."""

# ITU-R BS.775 downmix of 5.1 in WAV/SMPTE order (L, R, C, LFE, Ls, Rs) to stereo: centre and
# surrounds at -3 dB, LFE dropped. Rows are divided by their sum so a full-scale signal stays <= 1.
_ITU_51_TO_STEREO = np.array([
    [1.0, 0.0, 0.7071, 0.0, 0.7071, 0.0],
    [0.0, 1.0, 0.7071, 0.0, 0.0, 0.7071],
], dtype=np.float32)
_ITU_51_TO_STEREO /= _ITU_51_TO_STEREO.sum(axis=1, keepdims=True)


class AudioError(ValueError):
    """A source that cannot become samples; the message is the reject reason (one line)."""


@dataclasses.dataclass(frozen=True, slots=True)
class SourceInfo:
    sample_rate: int
    """The file's own sample rate in Hz."""
    channels: int
    frames: int
    """Length in frames at ``sample_rate`` as the container reports it (0 if unknown)."""
    format: str
    """libsndfile's format name, e.g. ``"FLAC"``, ``"WAV"``, ``"OGG"``, ``"MP3"``."""

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


@dataclasses.dataclass(frozen=True, slots=True)
class Window:
    audio: np.ndarray
    """``(C, T)`` float32 at the target rate."""
    index: int
    """Position of the window in its source (0, 1, ...)."""
    offset_seconds: float
    """Exact start of the window in the source, in seconds (``index * window_frames / sample_rate``)."""


# ------------------------------------------------------------------------------------ transforms


def resample(audio: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """``(C, T)`` -> ``(C, round(T * sr_out / sr_in))`` with soxr's HQ filter (band-limited, linear phase)."""
    if sr_in == sr_out:
        return audio
    out = soxr.resample(np.ascontiguousarray(audio.T), sr_in, sr_out, quality="HQ")
    return np.ascontiguousarray(out.T, dtype=np.float32)


def downmix_matrix(channels_in: int, channels_out: int) -> np.ndarray | None:
    """``(channels_out, channels_in)`` mixing matrix, or None when the count needs no mixing or grows.

    Policy: stereo -> mono is the mean; 5.1 (six channels, WAV order) -> stereo is ITU-R BS.775 without
    LFE; any other count above two becomes the mean of all channels (we cannot know the layout, and the
    mean neither clips nor favours a channel); a stereo target then duplicates that mean.
    """
    if channels_out >= channels_in:
        return None
    if channels_in == 6 and channels_out == 2:
        return _ITU_51_TO_STEREO
    if channels_in == 6 and channels_out == 1:
        return _ITU_51_TO_STEREO.mean(axis=0, keepdims=True)
    return np.full((channels_out, channels_in), 1.0 / channels_in, dtype=np.float32)


def set_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    """Apply the channel policy: mono -> stereo duplicates, fewer channels downmix (`downmix_matrix`)."""
    c = audio.shape[0]
    if c == channels:
        return audio
    if c < channels:
        if c != 1:
            raise AudioError(f"cannot map {c} channels to {channels} (only mono is widened)")
        return np.repeat(audio, channels, axis=0)
    return (downmix_matrix(c, channels) @ audio).astype(np.float32)


def rms_dbfs(audio: np.ndarray) -> float:
    """RMS level over all channels in dB relative to full scale; ``-inf`` for digital silence."""
    if audio.size == 0:
        return -math.inf
    mean_square = float(np.mean(np.square(audio, dtype=np.float64)))
    return 10.0 * math.log10(mean_square) if mean_square > 0 else -math.inf


def is_silent(audio: np.ndarray, threshold_db: float) -> bool:
    """True when the RMS level is below ``threshold_db`` dBFS (SAT skips clips below -60 dBFS)."""
    return rms_dbfs(audio) < threshold_db


def window_frames(window_seconds: float, sample_rate: int) -> int:
    """Frames per window at ``sample_rate``; offsets are multiples of this, so they are exact."""
    frames = round(window_seconds * sample_rate)
    if frames < 1:
        raise ValueError(f"window of {window_seconds} s at {sample_rate} Hz has no frames")
    return frames


# ------------------------------------------------------------------------------------- encode/decode


def probe(data: bytes) -> SourceInfo:
    """Read the header; `AudioError` when libsndfile cannot open the bytes."""
    with _open(data) as f:
        return SourceInfo(f.samplerate, f.channels, f.frames, f.format)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Whole file -> ``((C, T) float32, sample_rate)``; rejects non-finite samples."""
    with _open(data) as f:
        audio = _read_block(f, -1)
        return audio, f.samplerate


def encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    """``(C, T)`` float -> 16-bit FLAC bytes. Samples are clipped to [-1, 1] first: libsndfile's float
    to int conversion does not clip, and a resampler can overshoot full scale on a hot source."""
    buf = io.BytesIO()
    pcm = np.clip(audio.T, -1.0, 1.0)
    sf.write(buf, pcm, sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def stream_windows(data: bytes, sample_rate: int, channels: int, window_seconds: float | None) -> WindowStream:
    """Decode ``data`` block by block, set channels, resample to ``sample_rate`` and cut windows.

    With ``window_seconds=None`` the whole file is one window. Otherwise windows hold exactly
    ``window_frames(window_seconds, sample_rate)`` frames except the last, which holds the rest (the
    caller decides whether a short tail is kept). Iterating raises `AudioError` on a decode error or
    non-finite samples, possibly after some windows: callers must treat a file as all-or-nothing.
    """
    return WindowStream(data, sample_rate, channels, window_seconds)


class WindowStream:
    """Iterable of `Window`; ``info`` is the header, ``source_frames`` the frames decoded so far (after
    a full iteration: the true length, which a truncated file's header may overstate)."""

    def __init__(self, data: bytes, sample_rate: int, channels: int, window_seconds: float | None):
        self.info = probe(data)
        self.source_frames = 0
        self._data, self._sr, self._channels = data, sample_rate, channels
        self._step = None if window_seconds is None else window_frames(window_seconds, sample_rate)

    @property
    def source_seconds(self) -> float:
        return self.source_frames / self.info.sample_rate

    def __iter__(self) -> Iterator[Window]:
        info, step = self.info, self._step
        # Mix down before resampling (fewer channels to filter) and widen after it.
        mid_channels = min(info.channels, self._channels)
        stream = (None if info.sample_rate == self._sr else soxr.ResampleStream(
            info.sample_rate, self._sr, mid_channels, dtype="float32", quality="HQ"))
        pending: list[np.ndarray] = []
        pending_frames, index = 0, 0
        block = max(1, int(BLOCK_SECONDS * info.sample_rate))
        self.source_frames = 0
        with _open(self._data) as f:
            while True:
                audio = _read_block(f, block)
                self.source_frames += audio.shape[1]
                last = audio.shape[1] < block
                audio = set_channels(audio, mid_channels)
                if stream is not None:
                    audio = stream.resample_chunk(np.ascontiguousarray(audio.T), last=last).T
                if audio.shape[1]:
                    pending.append(audio)
                    pending_frames += audio.shape[1]
                while step is not None and pending_frames >= step:
                    joined = np.concatenate(pending, axis=1)
                    yield _window(joined[:, :step], self._channels, index, step, self._sr)
                    pending, pending_frames, index = [joined[:, step:]], pending_frames - step, index + 1
                if last:
                    break
        if pending_frames or index == 0:
            rest = np.concatenate(pending, axis=1) if pending else np.zeros((mid_channels, 0), np.float32)
            yield _window(rest, self._channels, index, step or 0, self._sr)


def _window(audio: np.ndarray, channels: int, index: int, step: int, sample_rate: int) -> Window:
    return Window(set_channels(np.ascontiguousarray(audio), channels), index, index * step / sample_rate)


def _open(data: bytes) -> sf.SoundFile:
    if not data:
        raise AudioError("empty file (0 bytes)")
    try:
        return sf.SoundFile(io.BytesIO(data))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"cannot decode: {_one_line(e)}") from e


def _read_block(f: sf.SoundFile, frames: int) -> np.ndarray:
    try:
        block = f.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"decode error: {_one_line(e)}") from e
    if not np.isfinite(block).all():
        raise AudioError("non-finite samples (NaN or Inf) in the decoded audio")
    return np.ascontiguousarray(block.T)


def _one_line(e: BaseException) -> str:
    # libsndfile names the stream object ("Error opening <_io.BytesIO object at 0x7f..>: ..."): drop the
    # address so the same bad file gives the same reason on every run (rejects.jsonl is write-once).
    text = re.sub(r"Error opening <[^>]*>: ", "", " ".join(str(e).split()))
    return text or type(e).__name__
