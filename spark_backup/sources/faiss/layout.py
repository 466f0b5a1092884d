"""The layout of a FAISS index file, read without FAISS: the regions the blob layer cuts it at
(``VersionBuilder.add_open_file``'s ``structure``), as safetensors files are cut at tensors.

* A flat index (``IxF2``, ``IxFI``, ``IxFl``): its header, then its vector array.
* An IVF index (a four-character code starting ``Iw`` or ``Iv``) whose inverted lists are
  FAISS's array lists (``ilar``): everything before the lists' data (header, coarse quantizer,
  direct map, list sizes), then each non-empty list (its codes, then its ids), then whatever
  follows the lists.

Vectors added to a flat index, or to some of an IVF index's lists, then change only the chunks
at the end of the array or of those lists. Anything else (HNSW, an ``IxMp`` id map around an
index, a layout this does not recognise) is ``None``: the file is cut by FastCDC as before.
The layout only decides where chunks are cut; a wrong one could cost deduplication, never
data (the chunks cover the file in order and its sha256 is checked on restore).

Formats (``faiss/impl/index_write.cpp``, little-endian): an index header is the code, then
``d`` (int32), ``ntotal`` (int64), two int64 placeholders, ``is_trained`` (uint8) and
``metric_type`` (int32), then ``metric_arg`` (float32) when the metric is above 1. A flat
index's vectors follow as a count of float32 values (uint64) and the values. An IVF header
goes on with ``nlist`` and ``nprobe`` (uint64), the quantizer (an index), the direct map and
type-specific fields; its array lists are ``ilar``, ``nlist``, ``code_size`` (uint64), the
sizes (``full``: a count and one uint64 per list; ``sprs``: a count and pairs of list number
and size for the non-empty lists), then each non-empty list's codes (size x code_size bytes)
and ids (size x 8 bytes).
"""

from __future__ import annotations

import os
import struct

_HEADER = struct.Struct("<iqqqBi")  # d, ntotal, two placeholders, is_trained, metric_type
_FLAT = frozenset({b"IxF2", b"IxFI", b"IxFl"})
_LISTS = b"ilar"
# How far past the quantizer the inverted lists are looked for (the direct map and the fields
# of IVF variants lie between; a maintained direct map of a large index can take longer).
_SEARCH = 16 * 1024 * 1024
_WINDOW = 1024 * 1024
_LARGEST_CODE = 1 << 20  # bytes per vector: a larger code_size is no real list header


def index_regions(fd: int, size: int) -> list[tuple[int, int]] | None:
    """The regions of the FAISS index open on ``fd`` (``size`` bytes), or None."""
    try:
        code = os.pread(fd, 4, 0)
        if code in _FLAT:
            end = _flat_end(fd, 0, size)
            return None if end != size else _regions(size, [_flat_data(fd, 0)])
        if code[:2] in (b"Iw", b"Iv"):
            return _ivf_regions(fd, size)
    except (OSError, struct.error, ValueError):
        pass
    return None


def _header_end(fd: int, at: int) -> int:
    """Where an index header starting at ``at`` (its code) ends."""
    fields = _HEADER.unpack(os.pread(fd, _HEADER.size, at + 4))
    return at + 4 + _HEADER.size + (4 if fields[5] > 1 else 0)


def _flat_data(fd: int, at: int) -> tuple[int, int]:
    """(start, length) of the vector array of the flat index whose code is at ``at``."""
    count_at = _header_end(fd, at)
    (count,) = struct.unpack("<Q", os.pread(fd, 8, count_at))
    return count_at + 8, 4 * count


def _flat_end(fd: int, at: int, size: int) -> int:
    start, length = _flat_data(fd, at)
    if start + length > size:
        raise ValueError("a vector array beyond the file's end")
    return start + length


def _ivf_regions(fd: int, size: int) -> list[tuple[int, int]] | None:
    after = _header_end(fd, 0)
    nlist, _nprobe = struct.unpack("<QQ", os.pread(fd, 16, after))
    quantizer = after + 16
    search_from = quantizer
    if os.pread(fd, 4, quantizer) in _FLAT:
        search_from = _flat_end(fd, quantizer, size)
    limit = min(size, search_from + _SEARCH)
    at = search_from
    while at < limit:
        window = os.pread(fd, min(_WINDOW, limit - at) + len(_LISTS) - 1, at)
        found = window.find(_LISTS)
        while found >= 0:
            lists = _array_lists(fd, at + found, nlist, size)
            if lists is not None:
                return _regions(size, lists)
            found = window.find(_LISTS, found + 1)
        at += _WINDOW
    return None


def _array_lists(fd: int, at: int, nlist: int, size: int) -> list[tuple[int, int]] | None:
    """(start, length) of each non-empty list of array lists whose ``ilar`` is at ``at``, if
    the bytes there are such lists of ``nlist`` lists that end within the file."""
    listed, code_size = struct.unpack("<QQ", os.pread(fd, 16, at + 4))
    if listed != nlist or not 0 < code_size <= _LARGEST_CODE or nlist > size // 8:
        return None
    kind = os.pread(fd, 4, at + 20)
    (count,) = struct.unpack("<Q", os.pread(fd, 8, at + 24))
    if count > size // 8:
        return None
    values = os.pread(fd, 8 * count, at + 32)
    if len(values) != 8 * count:
        return None
    numbers = struct.unpack(f"<{count}Q", values)
    if kind == b"full" and count == nlist:
        sizes = [(number, n) for number, n in enumerate(numbers) if n]
    elif kind == b"sprs" and count % 2 == 0:
        sizes = list(zip(numbers[0::2], numbers[1::2], strict=True))
        order = [number for number, _n in sizes]
        if order != sorted(set(order)) or (order and order[-1] >= nlist):
            return None
    else:
        return None
    start = at + 32 + 8 * count
    regions = []
    for _number, n in sizes:
        length = n * (code_size + 8)
        regions.append((start, length))
        start += length
    return regions if start <= size else None


def _regions(size: int, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The spans (start, length, in order) with the bytes before, between and after them:
    regions covering the whole file one after another."""
    regions, at = [], 0
    for start, length in spans:
        if start > at:
            regions.append((at, start))
        if length:
            regions.append((start, start + length))
        at = start + length
    if at < size:
        regions.append((at, size))
    return regions
