"""What a model file must be, checked from its bytes as they stream by (deep verify reads them
from the chunks, the semantic check from a restored file): every safetensors header parsed
again and every tensor's bytes against the digest recorded at backup, the tokenizer loaded,
a NeMo archive read as tar. Memory: one chunk, a safetensors header, a tokenizer."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterator
from itertools import accumulate
from typing import Any

from spark_backup.engine.blobs.safetensors import (
    MAX_HEADER,
    TENSOR_DIGEST,
    TENSOR_DIGEST_OF_CHUNKS,
    SafetensorsError,
    parse_header,
    tensor_chunk_spans,
)
from spark_backup.engine.safe_tar import count_members
from spark_backup.engine.tar_stream import TarFormatError
from spark_backup.errors import IntegrityError

TOKENIZER_LIMIT = 256 * 1024 * 1024


def is_safetensors(name: str) -> bool:
    return name.endswith(".safetensors")


def is_nemo(name: str) -> bool:
    return name.endswith(".nemo")


def is_tokenizer_json(name: str) -> bool:
    return name.rsplit("/", 1)[-1] == "tokenizer.json"


class _IterReader:
    """A ``read(size)`` over an iterator of byte strings."""

    def __init__(self, parts: Iterator[bytes]):
        self._parts = parts
        self._buffer = b""

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            part = next(self._parts, None)
            if part is None:
                break
            self._buffer += part
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        return data


def check_file(entry: dict[str, Any], stream: Iterator[bytes], label: str) -> dict[str, int]:
    """Consume ``stream`` (the file's bytes) and check it as its kind of file; returns counts."""
    name = entry["path"]
    where = f"{label}: {name}"
    if is_safetensors(name) and "safetensors" in entry:
        return {"tensors": _check_safetensors(entry, stream, where)}
    if is_tokenizer_json(name):
        _check_tokenizer(stream, where)
        return {"tokenizers": 1}
    if is_nemo(name):
        try:
            members = count_members(_IterReader(stream))  # type: ignore[arg-type]
        except TarFormatError as exc:
            raise IntegrityError(f"{where}: not a readable NeMo (tar) archive: {exc}") from None
        for _rest in stream:
            pass
        return {"nemo_members": members.files}
    for _part in stream:
        pass
    return {}


def _check_safetensors(entry: dict[str, Any], stream: Iterator[bytes], where: str) -> int:
    recorded = entry["safetensors"]
    data_start = recorded["data_start"]
    if data_start - 8 > MAX_HEADER:
        raise IntegrityError(f"{where}: recorded safetensors header is impossibly long")
    head = b""
    parts = iter(stream)
    while len(head) < data_start:
        part = next(parts, None)
        if part is None:
            raise IntegrityError(f"{where}: the file ends inside its safetensors header")
        head += part
    (length,) = struct.unpack("<Q", head[:8])
    if 8 + length != data_start:
        raise IntegrityError(
            f"{where}: safetensors header length {length} differs from the one backed up"
        )
    try:
        header = parse_header(json.loads(head[8:data_start]), data_start, entry["size"], where)
    except (ValueError, SafetensorsError) as exc:
        raise IntegrityError(f"{where}: safetensors header no longer parses: {exc}") from None
    found = [[t.name, t.dtype, list(t.shape), t.begin, t.end] for t in header.tensors]
    expected = [row[:5] for row in recorded["tensors"]]
    if found != expected:
        raise IntegrityError(f"{where}: safetensors header lists other tensors than backed up")
    tensors = recorded["tensors"]
    # Where each tensor's bytes are cut to be hashed: at its end alone (a plain sha256, the
    # documents of earlier releases), or at the end of each of its chunks, whose sha256
    # digests its own digest is made of (the chunk sizes the document records).
    scheme = recorded.get(TENSOR_DIGEST)
    if scheme not in (None, TENSOR_DIGEST_OF_CHUNKS):
        raise IntegrityError(f"{where}: tensor digests of an unknown scheme {scheme!r}")
    of_chunks = scheme == TENSOR_DIGEST_OF_CHUNKS
    if of_chunks:
        sizes = [chunk[2] for chunk in entry["chunks"]]
        try:
            spans = tensor_chunk_spans(tensors, data_start, sizes)
        except ValueError as exc:
            raise IntegrityError(
                f"{where}: recorded chunks do not fit its tensors: {exc}"
            ) from None
        cuts = [
            list(accumulate(sizes[first:last], initial=row[3]))[1:]
            for row, (first, last) in zip(tensors, spans, strict=True)
        ]
    else:
        cuts = [[row[4]] for row in tensors]
    index = piece = 0
    position = data_start
    digest = hashlib.sha256()
    combined = hashlib.sha256()
    pending = [head[data_start:]]

    def feed(data: bytes) -> None:
        nonlocal index, piece, position, digest, combined
        view = memoryview(data)
        while view:
            if index >= len(tensors):
                raise IntegrityError(f"{where}: bytes after the last tensor")
            cut = cuts[index][piece]
            take = min(len(view), cut - position)
            digest.update(view[:take])
            position += take
            view = view[take:]
            if position < cut:
                continue
            piece += 1
            if of_chunks:
                combined.update(digest.digest())
                digest = hashlib.sha256()
            if piece < len(cuts[index]):
                continue
            name, sha = tensors[index][0], tensors[index][5]
            if (combined if of_chunks else digest).hexdigest() != sha:
                raise IntegrityError(
                    f"{where}: tensor {name!r} does not match the digest recorded at backup"
                )
            index, piece = index + 1, 0
            digest, combined = hashlib.sha256(), hashlib.sha256()
            # zero-length tensors end where they begin
            while index < len(tensors) and tensors[index][4] == tensors[index][3] == position:
                index += 1

    while index < len(tensors) and tensors[index][4] == tensors[index][3] == position:
        index += 1
    for data in pending:
        feed(data)
    for data in parts:
        feed(data)
    if index != len(tensors):
        raise IntegrityError(f"{where}: the file ends inside tensor {tensors[index][0]!r}")
    return len(tensors)


def _check_tokenizer(stream: Iterator[bytes], where: str) -> None:
    parts, size = [], 0
    for part in stream:
        size += len(part)
        if size > TOKENIZER_LIMIT:
            raise IntegrityError(f"{where}: larger than any tokenizer ({size} bytes read)")
        parts.append(part)
    text = b"".join(parts)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        try:
            json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise IntegrityError(f"{where}: the tokenizer is not JSON: {exc}") from None
        return
    try:
        Tokenizer.from_str(text.decode())
    except Exception as exc:  # tokenizers raises its own Exception subclass
        raise IntegrityError(f"{where}: the tokenizers library cannot load it: {exc}") from None


def tokenizer_loader() -> str:
    try:
        import tokenizers

        return f"tokenizers {tokenizers.__version__}"
    except ImportError:
        return "json"
