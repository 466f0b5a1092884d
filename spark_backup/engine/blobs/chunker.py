"""Content-defined chunking with FastCDC (``pyfastcdc``).

FastCDC's mask for 48 KiB, with 16 KiB skipped after every cut, gives chunks of about 64 KiB
on average (69 KiB measured on random weights), at least 16 KiB and at most 192 KiB. Regions (a safetensors file's
header and each tensor) are chunked separately, so a re-drawn tensor changes only its own
chunks and never one shared with its neighbours. Memory: the blocks of about 1 MiB whose
chunks are still being hashed or packed, never a whole file.

A file whose structure the caller knows (a FAISS index: its header, its vector array, each
inverted list) is cut at fixed offsets instead (``iter_pieces``): every ``MAXIMUM`` bytes from
each region's start, without the rolling hash and without reading anything twice. Bytes
appended to a region change only its last chunk; bytes inserted or removed inside one change
its chunks from there to its end (FastCDC would find its cuts again after them).
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from typing import BinaryIO

from pyfastcdc import FastCDC

AVERAGE = 48 * 1024
MINIMUM = 16 * 1024
MAXIMUM = 192 * 1024
# Bytes read at a time: each chunk handed out is a view of its block (no copy per chunk). Below
# the 1 MiB mmap threshold packs.py sets, so blocks come from the heap, whose pages are reused,
# instead of fresh mappings faulted in page by page.
BLOCK = 960 * 1024


def new_chunker() -> FastCDC:
    return FastCDC(AVERAGE, min_size=MINIMUM, max_size=MAXIMUM)


def iter_blocks(
    handle: BinaryIO, regions: list[tuple[int, int]], chunker: FastCDC | None = None
) -> Iterator[tuple[int, int, memoryview, list[memoryview]]]:
    """(region index, offset, bytes, their chunks) in file order: each region read in blocks
    and cut by FastCDC with the cuts ``cut_stream`` makes; the bytes are a block up to its
    last cut, the chunks views of them. A block is cut up to where fewer than ``MAXIMUM``
    bytes follow a chunk's start (FastCDC then looks no further than the block, which a stream
    would not): the next block starts there, read again. The file's digest takes a block at a
    time: one hand-over of the interpreter lock per block rather than per chunk."""
    chunker = chunker or new_chunker()
    for index, (begin, end) in enumerate(regions):
        at = begin
        while at < end:
            wanted = min(BLOCK, end - at)
            block = memoryview(_read_exactly(handle, at, wanted))
            last = at + wanted == end
            chunks = []
            cut = 0
            for chunk in chunker.cut_buf(block):
                if not last and wanted - chunk.offset < MAXIMUM:
                    break
                chunks.append(chunk.data)
                cut = chunk.offset + chunk.length
            yield index, at, block[:cut], chunks
            at += cut


def iter_pieces(
    handle: BinaryIO, regions: list[tuple[int, int]]
) -> Iterator[tuple[int, int, memoryview, list[memoryview]]]:
    """What ``iter_blocks`` yields, for regions cut every ``MAXIMUM`` bytes from their start:
    a block of whole pieces read at a time (each piece one chunk, a region's last one
    shorter), every byte read once."""
    per_block = max(1, BLOCK // MAXIMUM) * MAXIMUM
    for index, (begin, end) in enumerate(regions):
        at = begin
        while at < end:
            wanted = min(per_block, end - at)
            block = memoryview(_read_exactly(handle, at, wanted))
            yield index, at, block, [block[o : o + MAXIMUM] for o in range(0, wanted, MAXIMUM)]
            at += wanted


def iter_chunks(
    handle: BinaryIO, regions: list[tuple[int, int]], chunker: FastCDC | None = None
) -> Iterator[tuple[int, int, memoryview]]:
    """(region index, offset, chunk bytes) in file order (``iter_blocks`` chunk by chunk)."""
    for index, at, _data, chunks in iter_blocks(handle, regions, chunker):
        for chunk in chunks:
            yield index, at, chunk
            at += len(chunk)


def _read_exactly(handle: BinaryIO, at: int, size: int) -> bytes:
    """``size`` bytes from offset ``at`` (one read on a local file; more after a short one);
    ``EOFError`` if the file ends first (it shrank while it was read). An unbuffered file is
    read with ``pread``: a seek and a read each let the interpreter lock go, and taking it back
    from the hashing threads cost the chunking a wait; other handles (wrapped, in memory) seek."""
    if type(handle) is io.FileIO:
        fd = handle.fileno()

        def read(count: int, got: int) -> bytes:
            return os.pread(fd, count, at + got)
    else:
        handle.seek(at)

        def read(count: int, got: int) -> bytes:
            return handle.read(count)

    parts: list[bytes] = []
    got = 0
    while got < size:
        more = read(size - got, got)
        if not more:
            raise EOFError("the file ended early (it shrank while it was read)")
        parts.append(more)
        got += len(more)
    return parts[0] if len(parts) == 1 else b"".join(parts)
    handle.seek(at)
    block = handle.read(size)
    if len(block) == size:
        return block
    parts = [block]
    while size > (got := sum(len(p) for p in parts)):
        more = handle.read(size - got)
        if not more:
            raise EOFError("the file ended early (it shrank while it was read)")
        parts.append(more)
    return b"".join(parts)
