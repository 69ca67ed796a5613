"""The files of one generated clip: ``<stem>.flac``, ``<stem>.png`` and ``<stem>.json``.

Shared by render and the train stage's demos, so both write the same three files the same way. The
caller writes them in the returned order: the JSON last, so its presence means the clip is complete
(render's resume test).
"""

from __future__ import annotations

import json
from typing import Any

import torch

from pipeline.report.audio_out import flac_bytes
from pipeline.report.spectrogram import spectrogram_png

EXTENSIONS = (".flac", ".png", ".json")


def clip_files(audio: torch.Tensor, sample_rate: int, info: dict[str, Any], bits: int = 16) -> dict[str, bytes]:
    """``{".flac": ..., ".png": ..., ".json": ...}`` (in write order) for ``audio`` (C, T) in [-1, 1].

    The FLAC is peak-normalised (as SAT's demos); the spectrogram is of the audio before normalising,
    so its dB scale shows the model's real level. ``info`` becomes the JSON (sorted keys, indented).
    """
    return {
        ".flac": flac_bytes(audio, sample_rate, bits=bits),
        ".png": spectrogram_png(audio, sample_rate),
        ".json": (json.dumps(info, indent=1, sort_keys=True, allow_nan=False) + "\n").encode(),
    }
