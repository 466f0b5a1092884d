"""Small stream adapters that count and hash bytes as they pass, without holding them."""

from __future__ import annotations

import fcntl
import hashlib
from collections.abc import Callable, Iterable
from contextlib import suppress
from typing import Protocol

CHUNK_SIZE = 1 << 20

ProgressCallback = Callable[[int], None]


class Writable(Protocol):
    def write(self, data: bytes, /) -> int | None: ...


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class CountingReader:
    """Reads from ``inner``, counting every byte handed out (and reporting it to ``progress``)."""

    def __init__(self, inner: Readable, progress: ProgressCallback | None = None):
        self._inner = inner
        self._progress = progress
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        if data:
            self._passed(data)
        return data

    def _passed(self, data: bytes) -> None:
        self.bytes += len(data)
        if self._progress:
            self._progress(len(data))

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        """Read to the end, so the count covers everything, even what a consumer left unread."""
        while self.read(CHUNK_SIZE):
            pass


class HashingReader(CountingReader):
    """Reads from ``inner``, hashing (sha256) and counting every byte handed out."""

    def __init__(self, inner: Readable, progress: ProgressCallback | None = None):
        super().__init__(inner, progress)
        self.sha256 = hashlib.sha256()

    def _passed(self, data: bytes) -> None:
        self.sha256.update(data)
        super()._passed(data)

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


class HashingWriter:
    """Writes to ``inner``, hashing (sha256) and counting every byte written."""

    def __init__(self, inner: Writable, progress: ProgressCallback | None = None):
        self._inner = inner
        self._progress = progress
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def write(self, data: bytes) -> int:
        self._inner.write(data)
        self.sha256.update(data)
        self.bytes += len(data)
        if self._progress:
            self._progress(len(data))
        return len(data)

    def flush(self) -> None:
        flush = getattr(self._inner, "flush", None)
        if flush:
            flush()

    def writable(self) -> bool:
        return True

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


def widen_pipe(pipe_fd: int) -> None:
    """Let a pipe hold a whole chunk (1 MiB, Linux's limit for unprivileged users) instead of
    64 KiB: the writer and the reader then wake each other sixteen times less often. Best
    effort: the pipe works at any size."""
    with suppress(OSError, AttributeError):
        fcntl.fcntl(pipe_fd, fcntl.F_SETPIPE_SZ, CHUNK_SIZE)


def copy_stream(source: Readable, target: Writable) -> int:
    """Copy in chunks, never the whole stream in memory; return the bytes copied."""
    total = 0
    while chunk := source.read(CHUNK_SIZE):
        target.write(chunk)
        total += len(chunk)
    return total


def drain(source: Readable) -> int:
    """Read to the end in chunks; return the bytes read."""
    total = 0
    while chunk := source.read(CHUNK_SIZE):
        total += len(chunk)
    return total


class ChunkReader:
    """A readable stream over byte chunks pulled from ``chunks`` as the reader asks: a read
    gathers chunks up to ``size`` (a producer of small pieces still makes few reads), and
    whatever the iterator raises reaches the reader, so a producer's failure aborts the copy.
    ``iter(next_chunk, None)`` turns a function that hands out chunks into such an iterator."""

    def __init__(self, chunks: Iterable[bytes]):
        self._chunks = iter(chunks)
        self._chunk = memoryview(b"")  # what the last read left of the current chunk
        self._ended = False

    def read(self, size: int = -1) -> bytes:
        wanted = size if size >= 0 else -1
        parts: list[bytes | memoryview] = []
        while wanted:
            if not self._chunk:
                chunk = None if self._ended else next(self._chunks, None)
                if chunk is None:
                    self._ended = True
                    break
                if not parts and len(chunk) == wanted:
                    return bytes(chunk)  # the common case: a whole chunk as asked, not copied
                self._chunk = memoryview(chunk)
            piece = self._chunk if wanted < 0 else self._chunk[:wanted]
            self._chunk = self._chunk[len(piece) :]
            parts.append(piece)
            if wanted > 0:
                wanted -= len(piece)
        return b"".join(parts)

    def readable(self) -> bool:
        return True
