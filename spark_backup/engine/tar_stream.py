"""Writing a tar stream member by member, for sources that produce files as they go: each
member's header (pax, so any name and size fit), its bytes, and the padding tar expects.
The result reads with GNU tar and Python's tarfile alike."""

from __future__ import annotations

import tarfile
import time
from collections.abc import Iterator

from spark_backup.engine.streams import CHUNK_SIZE, Readable

BLOCK = tarfile.BLOCKSIZE
RECORD = tarfile.RECORDSIZE


class TarStream:
    """Yields the bytes of a tar archive; ``written`` counts them, for the closing padding."""

    def __init__(self) -> None:
        self.written = 0
        self.mtime = int(time.time())

    def _emit(self, data: bytes) -> bytes:
        self.written += len(data)
        return data

    def directory(self, name: str) -> Iterator[bytes]:
        info = tarfile.TarInfo(name.rstrip("/") + "/")
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o700, self.mtime
        yield self._emit(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def file(self, name: str, size: int, content: Readable) -> Iterator[bytes]:
        """A regular file of exactly ``size`` bytes read from ``content``."""
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o600, self.mtime
        yield self._emit(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
        remaining = size
        while remaining:
            chunk = content.read(min(CHUNK_SIZE, remaining))
            if not chunk:
                raise OSError(f"{name} ended {remaining} bytes early")
            remaining -= len(chunk)
            yield self._emit(chunk)
        if size % BLOCK:
            yield self._emit(b"\0" * (BLOCK - size % BLOCK))

    def end(self) -> Iterator[bytes]:
        """Two zero blocks, then zeros up to a whole record, as tar itself ends an archive."""
        yield self._emit(b"\0" * (2 * BLOCK))
        if self.written % RECORD:
            yield self._emit(b"\0" * (RECORD - self.written % RECORD))
