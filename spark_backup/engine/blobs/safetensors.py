"""The safetensors header: 8 bytes little-endian header length N, N bytes of JSON (tensor name
-> dtype, shape, data_offsets relative to the data that follows), then the tensors' bytes.

Checked as strictly as the safetensors library checks it: every tensor's byte range matches
its dtype and shape, the ranges cover the data without holes or overlaps, and the data ends
where the file ends. A header that lies (a range past the end, a shape that does not fit) is
one ``SafetensorsError`` naming the file and the tensor.
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import BinaryIO

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit

# How a version document's tensor digests were made, named by the safetensors entry's
# ``tensor_digest``: the sha256 of the raw sha256 digests of the tensor's chunks, in file
# order (no pass over the tensors beyond the chunks' own). Absent in documents of earlier
# releases: each digest is then the plain sha256 of the tensor's bytes.
TENSOR_DIGEST = "tensor_digest"
TENSOR_DIGEST_OF_CHUNKS = "sha256-of-chunk-sha256s"

DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip


class SafetensorsError(ValueError):
    """A file that is not a well-formed safetensors file (the message names what is wrong)."""


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    data_start: int  # 8 + N
    tensors: list[Tensor]  # in file order
    metadata: dict[str, str]

    def regions(self, file_size: int) -> list[tuple[int, int]]:
        """The file cut at the header's end and at every tensor boundary."""
        cuts = [(0, self.data_start)]
        cuts += [(t.begin, t.end) for t in self.tensors if t.end > t.begin]
        if not self.tensors and file_size > self.data_start:
            cuts.append((self.data_start, file_size))
        return cuts


def read_header(handle: BinaryIO, file_size: int, label: str) -> SafetensorsHeader:
    """Parse and check the header of the file open in ``handle`` (``file_size`` bytes long)."""
    handle.seek(0)
    raw = handle.read(8)
    if len(raw) < 8:
        raise SafetensorsError(f"{label}: not a safetensors file (shorter than 8 bytes)")
    (length,) = struct.unpack("<Q", raw)
    if length > MAX_HEADER or 8 + length > file_size:
        raise SafetensorsError(
            f"{label}: safetensors header length {length} is impossible for a file of "
            f"{file_size} bytes"
        )
    try:
        header = json.loads(handle.read(length))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{label}: safetensors header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{label}: safetensors header is not a JSON object")
    return parse_header(header, 8 + length, file_size, label)


def parse_header(header: dict, data_start: int, file_size: int, label: str) -> SafetensorsHeader:
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise SafetensorsError(f"{label}: safetensors __metadata__ is not an object")
    data_size = file_size - data_start
    tensors = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        where = f"{label}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise SafetensorsError(f"{where}: header entry is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in DTYPE_BYTES:
            raise SafetensorsError(f"{where}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise SafetensorsError(f"{where}: shape {shape!r} is not a list of sizes")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]
        ):
            raise SafetensorsError(f"{where}: data_offsets {offsets!r} are not [begin, end]")
        needed = math.prod(shape) * DTYPE_BYTES[dtype]
        if offsets[1] - offsets[0] != needed:
            raise SafetensorsError(
                f"{where}: data_offsets {offsets} hold {offsets[1] - offsets[0]} bytes, but "
                f"{dtype} {shape} needs {needed}"
            )
        if offsets[1] > data_size:
            raise SafetensorsError(
                f"{where}: data_offsets {offsets} run past the end of the data ({data_size} bytes)"
            )
        tensors.append(
            Tensor(name, dtype, tuple(shape), data_start + offsets[0], data_start + offsets[1])
        )
    tensors.sort(key=lambda t: (t.begin, t.end))
    position = data_start
    for tensor in tensors:
        if tensor.begin != position:
            what = (
                "overlaps the one before" if tensor.begin < position else "leaves a hole before it"
            )
            raise SafetensorsError(
                f"{label}: tensor {tensor.name!r} {what} (at byte {tensor.begin})"
            )
        position = tensor.end
    if tensors and position != file_size:
        raise SafetensorsError(
            f"{label}: the tensors end at byte {position}, the file at {file_size}"
        )
    return SafetensorsHeader(data_start, tensors, {str(k): str(v) for k, v in metadata.items()})


def digest_of_chunks(chunk_digests: Iterable[bytes]) -> str:
    """A tensor's digest under ``TENSOR_DIGEST_OF_CHUNKS``: the sha256 of its chunks' raw
    sha256 digests, in order (of the empty string for a tensor without bytes)."""
    return hashlib.sha256(b"".join(chunk_digests)).hexdigest()


def tensor_chunk_spans(
    tensors: Sequence[Sequence], data_start: int, chunk_sizes: Sequence[int]
) -> list[tuple[int, int]]:
    """For each tensor row (``[name, dtype, shape, begin, end, ...]``, in file order), the
    chunks ``[first, last)`` of the file's list that hold exactly its bytes. ``ValueError``
    naming the tensor if a chunk crosses its begin or end (a tensor shares no chunk)."""
    spans = []
    number, position = 0, 0
    while number < len(chunk_sizes) and position < data_start:  # the header's chunks
        position += chunk_sizes[number]
        number += 1
    for row in tensors:
        name, begin, end = row[0], row[3], row[4]
        if position != begin:
            raise ValueError(f"no chunk begins where tensor {name!r} begins")
        first = number
        while number < len(chunk_sizes) and position < end:
            position += chunk_sizes[number]
            number += 1
        if position != end:
            raise ValueError(f"no chunk ends where tensor {name!r} ends")
        spans.append((first, number))
    return spans
