"""Audio I/O and pure transforms on ``(C, T)`` float32 arrays.

soundfile (libsndfile: WAV, FLAC, OGG/Vorbis/Opus, MP3) decodes, soxr resamples. Everything here takes
and returns numpy arrays shaped ``(channels, frames)`` so each transform can be tested on a tiny array.

`stream_windows` is the one entry point for a whole file: it decodes and resamples in bounded blocks,
so a very long source never sits in memory as float samples, and it yields fixed-length windows at the
target rate, whole or as pieces; `FlacEncoder` encodes a window piece by piece.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import re
import tempfile
from collections.abc import Iterator
from typing import BinaryIO

import numpy as np
import soundfile as sf
import soxr

BLOCK_SECONDS = 30.0
"""Decode this much source audio per read in `stream_windows` (bounds memory for long files)..."""
BLOCK_SAMPLES = 1 << 22
"""...and at most this many samples (all channels, before or after resampling): 16 MiB of float32."""
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 384000
"""Source rates outside this range are rejected (a 1 Hz header would ask to upsample 44100-fold)."""
MAX_PEAK_DBFS = 6.0
"""A source peaking above this is rejected: float audio on the wrong scale, which 16 bits would clip."""

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


def probe(source: bytes | str) -> SourceInfo:
    """Read the header of bytes or a local file; `AudioError` when libsndfile cannot open it."""
    with _open(source) as f:
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


def stream_windows(source: bytes | str, sample_rate: int, channels: int, window_seconds: float | None,
                   max_seconds: float | None = None) -> WindowStream:
    """Decode ``source`` (bytes or a local path) block by block, set channels, resample to
    ``sample_rate`` and cut windows.

    With ``window_seconds=None`` the whole file is one window. Otherwise windows hold exactly
    ``window_frames(window_seconds, sample_rate)`` frames except the last, which holds the rest (the
    caller decides whether a short tail is kept). Opening raises `AudioError` for a header outside
    the limits (rate, ``max_seconds``); iterating raises it on a decode error, non-finite samples, a
    peak above `MAX_PEAK_DBFS` or more than ``max_seconds`` of audio, possibly after some windows:
    callers must treat a file as all-or-nothing.
    """
    return WindowStream(source, sample_rate, channels, window_seconds, max_seconds)


@dataclasses.dataclass(frozen=True, slots=True)
class Piece:
    """Consecutive audio of one window: windows arrive as pieces so none has to sit in memory whole."""
    audio: np.ndarray
    """``(C, T)`` float32 at the target rate (T may be 0)."""
    index: int
    """The window this piece belongs to."""
    last: bool
    """True on the window's final piece."""


class WindowStream:
    """Iterable of `Window` (each joined in memory), or of bounded `Piece`s through `pieces`.

    ``info`` is the header; ``source_frames`` the frames decoded so far (after a full iteration: the
    true length, which a truncated file's header may overstate); ``peak`` the largest absolute source
    sample seen so far.
    """

    def __init__(self, source: bytes | str, sample_rate: int, channels: int, window_seconds: float | None,
                 max_seconds: float | None = None):
        self.info = probe(source)
        if not MIN_SAMPLE_RATE <= self.info.sample_rate <= MAX_SAMPLE_RATE:
            raise AudioError(f"sample rate {self.info.sample_rate} Hz in the header is outside "
                             f"[{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz")
        if max_seconds is not None and self.info.seconds > max_seconds:
            raise AudioError(f"too long: the header says {self.info.seconds:.1f} s > --max-seconds {max_seconds}")
        self.source_frames, self.peak = 0, 0.0
        self._source, self._sr, self._channels, self._max_seconds = source, sample_rate, channels, max_seconds
        self._step = None if window_seconds is None else window_frames(window_seconds, sample_rate)

    @property
    def source_seconds(self) -> float:
        return self.source_frames / self.info.sample_rate

    def offset_seconds(self, index: int) -> float:
        """Exact start of window ``index`` in the source."""
        return index * (self._step or 0) / self._sr

    def __iter__(self) -> Iterator[Window]:
        parts: list[np.ndarray] = []
        for piece in self.pieces():
            parts.append(piece.audio)
            if piece.last:
                yield Window(np.concatenate(parts, axis=1), piece.index, self.offset_seconds(piece.index))
                parts = []

    def pieces(self) -> Iterator[Piece]:
        """Pieces of at most one decode block each, in order; every window ends with a ``last`` piece
        (an empty one closes the single window of ``window_seconds=None`` and a file with no audio)."""
        step, index = self._step, 0
        need = step  # frames still missing from the current window
        for block in self._blocks():
            pos, frames = 0, block.shape[1]
            while pos < frames:
                take = frames - pos if step is None else min(need, frames - pos)
                done = step is not None and take == need
                yield Piece(set_channels(block[:, pos:pos + take], self._channels), index, done)
                pos += take
                if step is not None:
                    need = step if done else need - take
                    index += done
        if step is None or need < step or index == 0:
            yield Piece(np.zeros((self._channels, 0), np.float32), index, True)

    def _blocks(self) -> Iterator[np.ndarray]:
        """``(C', T)`` float32 blocks at the target rate, C' = min(source, target) channels."""
        info = self.info
        # Mix down before resampling (fewer channels to filter) and widen after it.
        mid_channels = min(info.channels, self._channels)
        stream = (None if info.sample_rate == self._sr else soxr.ResampleStream(
            info.sample_rate, self._sr, mid_channels, dtype="float32", quality="HQ"))
        # Bounded in samples on both sides of the resampler, whatever the channel count or rate ratio.
        growth = max(1, math.ceil(self._sr / info.sample_rate))
        block = max(1, min(int(BLOCK_SECONDS * info.sample_rate), BLOCK_SAMPLES // (info.channels * growth)))
        max_frames = None if self._max_seconds is None else self._max_seconds * info.sample_rate
        self.source_frames, self.peak = 0, 0.0
        with _open(self._source) as f:
            while True:
                audio = _read_block(f, block)
                self.source_frames += audio.shape[1]
                if max_frames is not None and self.source_frames > max_frames:
                    raise AudioError(f"too long: more than --max-seconds {self._max_seconds} s of audio "
                                     f"(the header said {info.seconds:.1f} s)")
                if audio.size:
                    self.peak = max(self.peak, float(audio.max()), -float(audio.min()))
                    if self.peak > 10 ** (MAX_PEAK_DBFS / 20):
                        raise AudioError(f"samples peak at {20 * math.log10(self.peak):+.1f} dBFS "
                                         f"(> +{MAX_PEAK_DBFS:g} dBFS): a float file on the wrong scale? "
                                         "(16-bit output would clip it to a square wave)")
                last = audio.shape[1] < block
                audio = set_channels(audio, mid_channels)
                if stream is not None:
                    audio = stream.resample_chunk(np.ascontiguousarray(audio.T), last=last).T
                yield audio
                if last:
                    return


class FlacEncoder:
    """One 16-bit FLAC written piece by piece into a temp file that moves to disk past 16 MiB, so a
    long window never sits in memory; ``frames`` and ``mean_square`` describe what was written."""

    def __init__(self, sample_rate: int, channels: int):
        self.file = tempfile.SpooledTemporaryFile(max_size=16 << 20, prefix="cantus-flac-")
        self._sf = sf.SoundFile(self.file, "w", sample_rate, channels, format="FLAC", subtype="PCM_16")
        self.frames, self._sum_squares, self._values = 0, 0.0, 0

    def write(self, audio: np.ndarray) -> None:
        """Append ``(C, T)`` float samples, clipped as in `encode_flac`."""
        if audio.shape[1]:
            self._sf.write(np.clip(audio.T, -1.0, 1.0))
            self.frames += audio.shape[1]
            self._sum_squares += float(np.sum(np.square(audio, dtype=np.float64)))
            self._values += audio.size

    @property
    def level_dbfs(self) -> float:
        """RMS level of everything written, as `rms_dbfs` computes it."""
        mean_square = self._sum_squares / self._values if self._values else 0.0
        return 10.0 * math.log10(mean_square) if mean_square > 0 else -math.inf

    def finish(self) -> BinaryIO:
        """Close the FLAC; -> its file, positioned at the start (the caller closes it)."""
        self._sf.close()
        self.file.seek(0)
        return self.file

    def discard(self) -> None:
        self._sf.close()
        self.file.close()


def _open(source: bytes | str) -> sf.SoundFile:
    if (os.path.getsize(source) if isinstance(source, str) else len(source)) == 0:
        raise AudioError("empty file (0 bytes)")
    try:
        return sf.SoundFile(source if isinstance(source, str) else io.BytesIO(source))
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        # soundfile names what it opened: a path (the reject record has it) or a stream object.
        text = str(e).replace(f"Error opening {source!r}: ", "") if isinstance(source, str) else str(e)
        raise AudioError(f"cannot decode: {_one_line(text) or type(e).__name__}") from e


def _read_block(f: sf.SoundFile, frames: int) -> np.ndarray:
    try:
        block = f.read(frames, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError) as e:
        raise AudioError(f"decode error: {_one_line(str(e)) or type(e).__name__}") from e
    if not np.isfinite(block).all():
        raise AudioError("non-finite samples (NaN or Inf) in the decoded audio")
    return np.ascontiguousarray(block.T)


def _one_line(text: str) -> str:
    # libsndfile names the stream object ("Error opening <_io.BytesIO object at 0x7f..>: ..."): drop the
    # address so the same bad file gives the same reason on every run (rejects.jsonl is write-once).
    return re.sub(r"Error opening <[^>]*>: ", "", " ".join(text.split()))
