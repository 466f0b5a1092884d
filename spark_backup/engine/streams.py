"""Small stream adapters that count and hash bytes as they pass, without holding them."""

from __future__ import annotations

import contextlib
import hashlib
import queue
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

CHUNK_SIZE = 1 << 20

ProgressCallback = Callable[[int], None]


class Writable(Protocol):
    def write(self, data: bytes, /) -> int | None: ...


class Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class HashingReader:
    """Reads from ``inner``, hashing (sha256) and counting every byte handed out."""

    def __init__(self, inner: Readable, progress: ProgressCallback | None = None):
        self._inner = inner
        self._progress = progress
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        data = self._inner.read(size)
        if data:
            self.sha256.update(data)
            self.bytes += len(data)
            if self._progress:
                self._progress(len(data))
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        """Read to the end, so the hash covers everything, even what a consumer left unread."""
        while self.read(CHUNK_SIZE):
            pass

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


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


# How long leaving a ReadAhead block waits for its thread.
STOP_WAIT_SECONDS = 1.0


class ReadAhead:
    """Reads ``inner`` on a thread of its own, hashing (sha256) and counting every byte, up to
    ``depth`` chunks ahead of the consumer; a ``HashingReader`` whose producing side (zstd
    decompression, sha256: both release the interpreter lock) runs beside the consumer.

    Use it as a context manager: leaving the block stops the thread. An error of ``inner`` is
    raised by ``read``. ``sha256`` and ``bytes`` cover the whole stream once it was read to
    its end (``drain``)."""

    def __init__(self, inner: Readable, progress: ProgressCallback | None = None, depth: int = 4):
        self._inner = inner
        self._progress = progress
        self._queue: queue.Queue[bytes | _Failed] = queue.Queue(depth)
        self._stop = threading.Event()
        self._chunk = b""
        self._offset = 0
        self._ended = False
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self._thread = threading.Thread(target=self._produce, name="read-ahead", daemon=True)

    def __enter__(self) -> ReadAhead:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        # The producer may be blocked reading ``inner``, a pipe that only ends once the caller
        # closes what lies beneath (after this block): wait a moment, never for ever. It is a
        # daemon thread; a read on a closed source ends it.
        deadline = time.monotonic() + STOP_WAIT_SECONDS
        while self._thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                self._queue.get(timeout=0.05)  # unblock a producer waiting to put

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                chunk = self._inner.read(CHUNK_SIZE)
                if chunk:
                    self.sha256.update(chunk)
                    self.bytes += len(chunk)
                if not self._put(chunk) or not chunk:
                    return
        except BaseException as exc:
            self._put(_Failed(exc))

    def _put(self, item: bytes | _Failed) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            return b"".join(iter(lambda: self.read(CHUNK_SIZE), b""))
        if self._offset >= len(self._chunk):
            if self._ended:
                return b""
            item = self._queue.get()
            if isinstance(item, _Failed):
                self._ended = True
                raise item.error
            self._chunk, self._offset = item, 0
            if not item:
                self._ended = True
                return b""
        if self._offset == 0 and size >= len(self._chunk):
            data = self._chunk  # the common case: a whole chunk, not copied
        else:
            data = self._chunk[self._offset : self._offset + size]
        self._offset += len(data)
        if self._progress:
            self._progress(len(data))
        return data

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(CHUNK_SIZE):
            pass

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


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
