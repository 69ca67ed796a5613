"""A source's finished samples parked on disk until the whole source has decoded.

The shard stage keeps a source all or nothing (a decode error in its last block rejects the file), yet a
long source must not sit in memory. So each window is encoded as soon as it is complete and its FLAC
bytes are appended to one unlinked temp file; only small per-window fields stay in memory. When the
source has decoded, `SampleSpool.samples` hands the samples on one at a time.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterator
from typing import BinaryIO


class SampleSpool:
    """Append-only store of ``(key, flac bytes, json fields, seconds)`` on an unlinked temp file."""

    def __init__(self):
        # TemporaryFile is unlinked at once on Linux: a killed process leaves nothing on disk.
        self._file = tempfile.TemporaryFile(prefix="cantus-spool-")
        self._entries: list[tuple[str, dict, int, int, float]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, key: str, flac: BinaryIO, fields: dict, seconds: float) -> None:
        """Copy the FLAC in ``flac`` (read from its position to the end) and remember its fields."""
        start = self._file.seek(0, 2)
        shutil.copyfileobj(flac, self._file, 1 << 20)
        self._entries.append((key, fields, start, self._file.tell() - start, seconds))

    def samples(self, common: dict) -> Iterator[tuple[str, dict[str, bytes], float]]:
        """``(key, {"flac", "json"}, seconds)`` in the order added; a sample's JSON is ``common`` plus its
        own fields. Closes the spool when done."""
        try:
            for key, fields, start, length, seconds in self._entries:
                self._file.seek(start)
                doc = json.dumps(dict(common, **fields), ensure_ascii=False, sort_keys=True)
                yield key, {"flac": self._file.read(length), "json": doc.encode()}, seconds
        finally:
            self.close()

    def close(self) -> None:
        self._file.close()
