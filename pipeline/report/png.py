"""A minimal PNG encoder (8-bit RGB, no filtering) on zlib and struct.

Why our own: the page needs one image format that every browser decodes, and pulling in Pillow or
matplotlib for it would add a heavy dependency to every stage that writes a report. The format is
small: a signature, then length-prefixed chunks (``IHDR`` size and colour type, ``IDAT`` the
zlib-compressed scanlines, each prefixed with a filter byte, ``IEND``), each closed by a CRC-32 of its
type and data (PNG specification, ISO/IEC 15948, sections 5 and 11).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(rgb: np.ndarray, compression: int = 6) -> bytes:
    """PNG bytes of an image ``rgb`` of shape (height, width, 3) and dtype uint8, row 0 at the top."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"encode_png: expected a (height, width, 3) uint8 array, got {rgb.shape} {rgb.dtype}")
    height, width, _ = rgb.shape
    if height < 1 or width < 1:
        raise ValueError(f"encode_png: image must be at least 1x1, got {width}x{height}")
    # IHDR: width, height, bit depth 8, colour type 2 (truecolour), compression 0, filter 0, interlace 0.
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    # Each scanline starts with its filter type; 0 (None) keeps the encoder trivial and exact.
    rows = np.concatenate([np.zeros((height, 1), np.uint8), np.ascontiguousarray(rgb).reshape(height, -1)], axis=1)
    return (SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), compression)) + _chunk(b"IEND", b""))
