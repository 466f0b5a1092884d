"""Content-defined chunking with FastCDC (``pyfastcdc``).

FastCDC's mask for 48 KiB, with 16 KiB skipped after every cut, gives chunks of about 64 KiB
on average (69 KiB measured on random weights), at least 16 KiB and at most 192 KiB. Regions (a safetensors file's
header and each tensor) are chunked separately, so a re-drawn tensor changes only its own
chunks and never one shared with its neighbours. Memory: the chunker's own window (a few
times the maximum chunk), never a whole file.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import BinaryIO

from pyfastcdc import FastCDC

AVERAGE = 48 * 1024
MINIMUM = 16 * 1024
MAXIMUM = 192 * 1024


def new_chunker() -> FastCDC:
    return FastCDC(AVERAGE, min_size=MINIMUM, max_size=MAXIMUM)


class _Window:
    """``length`` bytes of ``handle`` from its current position, for ``cut_stream``."""

    def __init__(self, handle: BinaryIO, length: int):
        self._handle = handle
        self._left = length

    def readinto(self, buffer: memoryview) -> int:
        if self._left <= 0:
            return 0
        view = memoryview(buffer)[: min(len(buffer), self._left)]
        count = self._handle.readinto(view)  # type: ignore[attr-defined]
        if not count:
            raise EOFError("the file ended early (it shrank while it was read)")
        self._left -= count
        return count


def iter_chunks(
    handle: BinaryIO, regions: list[tuple[int, int]], chunker: FastCDC | None = None
) -> Iterator[tuple[int, int, bytes]]:
    """(region index, offset, chunk bytes) in file order: each region cut by FastCDC."""
    chunker = chunker or new_chunker()
    for index, (begin, end) in enumerate(regions):
        if end <= begin:
            continue
        handle.seek(begin)
        for chunk in chunker.cut_stream(_Window(handle, end - begin)):
            yield index, begin + chunk.offset, bytes(chunk.data)
