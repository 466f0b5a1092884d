"""A version: one backup of a set of files through the chunk store.

Its document (``spark-backup.version/v1``, JSON) is the copy's plaintext, so the pipeline
encrypts it like any copy (``<copy id>.json.zst.age``) and the copy's manifest commits it. It
lists every file with its size, mode, sha256 and chunks, and for safetensors files every
tensor with its digest: the sha256 of its chunks' sha256 digests (``tensor_digest`` names the
scheme; documents of earlier releases lack it and hold each tensor's plain sha256). A chunk is
``[id, plaintext sha256, size, pack, offset, length]`` (where its zstd frame lies in the
pack's plaintext); a version of the first release lists ``[id, plaintext sha256, size]``, a
chunk object of its own.

Beside it, in the clear, a reference list (``<scope>/chunk-refs/<stamp>-<hex>.json.zst``, named
with its sha256 in the copy's manifest) lets prune and a plain verify work without a key: the
packs the version needs with their stored sizes (``chunk-refs/v2``), or for a first-release
version its chunk ids and stored sizes (``chunk-refs/v1``). ``read_refs`` gives both as store
keys with sizes.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import stat
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import zstandard
from pyrage import x25519

from spark_backup.engine.blobs import chunker
from spark_backup.engine.blobs.chunks import CHUNK_LAYERS, ChunkRef, chunk_key
from spark_backup.engine.blobs.packs import (
    BATCH_BYTES,
    PackCache,
    PackWriter,
    existing_packs,
    id_of_pack_key,
    pack_key,
    read_chunks,
)
from spark_backup.engine.blobs.safetensors import (
    TENSOR_DIGEST,
    TENSOR_DIGEST_OF_CHUNKS,
    SafetensorsError,
    digest_of_chunks,
    read_header,
    tensor_chunk_spans,
)
from spark_backup.engine.blobs.sweep import doomed_packs
from spark_backup.engine.cadence import utcnow
from spark_backup.engine.crypto import Recipients
from spark_backup.engine.gc_pause import without_cyclic_gc
from spark_backup.engine.manifest import utc_stamp
from spark_backup.engine.stores.base import ObjectLock, ObjectStore
from spark_backup.errors import IntegrityError, SourceError

VERSION_FORMAT = "spark-backup.version/v1"
REFS_FORMAT = "spark-backup.chunk-refs/v2"
REFS_FORMAT_CHUNKS = "spark-backup.chunk-refs/v1"  # first release: one object per chunk
LAYOUT = "packs/v1"
# The manifest's source_metadata names the version's reference list and its sha256.
REFS_KEY = "chunk_refs"
REFS_SHA256 = "chunk_refs_sha256"


class ChangedDuringBackup(SourceError):
    """A file changed while it was read: the version would not be one state of the files."""


def _fingerprint(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass
class VersionBuilder:
    """Chunks files into ``writer`` and collects the version document."""

    writer: PackWriter
    files: list[dict[str, Any]] = field(default_factory=list)
    fingerprints: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)
    # The Object Lock the version's packs and reference list are written under.
    lock: ObjectLock | None = None

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Chunk files inside the block; leaving it writes the last pack and waits for every
        write, or on an error stops the writer. The cyclic collector is paused meanwhile: the
        references made per chunk are in no cycle, and walking them cost 3% of a backup."""
        try:
            with without_cyclic_gc():
                yield
                self.writer.close()
        except BaseException:
            self.writer.abort()
            raise

    def commit_refs(self, store: ObjectStore, scope: str) -> tuple[dict[str, int], str, str]:
        """After ``writing``: every chunk located, then the reference list written (the last
        object before the copy's own); returns the packs with their sizes, the list's key and
        sha256. Refused if a prune announced a reused pack while the backup ran."""
        packs = self.locate()
        reused_doomed = self.writer.reused_packs & doomed_packs(store, scope)
        if reused_doomed:
            raise SourceError(
                f"source {scope!r}: {len(reused_doomed)} pack(s) this version needs are being "
                "pruned; no copy was made: back up again"
            )
        key, sha256 = write_refs(store, scope, packs, utcnow(), self.lock)
        return packs, key, sha256

    def add_file(self, path: str, name: str, *, safetensors: bool = False) -> dict[str, Any]:
        try:
            return self._add_file(path, name, safetensors)
        except OSError as exc:
            raise SourceError(f"{path}: cannot read: {exc.strerror}") from None

    def _add_file(self, path: str, name: str, safetensors: bool) -> dict[str, Any]:
        before = os.stat(path)
        with open(path, "rb", buffering=0) as handle:
            size = os.fstat(handle.fileno()).st_size
            entry: dict[str, Any] = {
                "path": name,
                "size": size,
                "mode": stat.S_IMODE(before.st_mode),
            }
            regions = [(0, size)]
            header = None
            if safetensors:
                try:
                    header = read_header(handle, size, path)  # type: ignore[arg-type]
                except SafetensorsError as exc:
                    raise SourceError(str(exc)) from None
                regions = header.regions(size)
            whole = hashlib.sha256()
            chunks: list[list[Any]] = []
            try:
                with _Hashing() as hashing:
                    for _index, _offset, data, pieces in chunker.iter_blocks(handle, regions):  # type: ignore[arg-type]
                        hashing.update(whole, data)
                        chunks += [[self.writer.add(piece)] for piece in pieces]
            except EOFError:
                raise ChangedDuringBackup(
                    f"{path}: the file shrank while it was read (it is being written)"
                ) from None
            after = os.fstat(handle.fileno())
        if _fingerprint(after) != _fingerprint(before) or _fingerprint(
            os.stat(path)
        ) != _fingerprint(before):
            raise ChangedDuringBackup(
                f"{path}: the file changed while it was read (it is being written)"
            )
        entry["sha256"] = whole.hexdigest()
        entry["chunks"] = chunks
        if header is not None:
            # Each tensor's digest is made of its chunks' digests once the writer has them
            # (``resolve``): no pass over the tensors beyond the chunks' own.
            entry["safetensors"] = {
                "data_start": header.data_start,
                "metadata": header.metadata,
                TENSOR_DIGEST: TENSOR_DIGEST_OF_CHUNKS,
                "tensors": [
                    [t.name, t.dtype, list(t.shape), t.begin, t.end, None] for t in header.tensors
                ],
            }
        self.fingerprints[path] = _fingerprint(before)
        self.files.append(entry)
        return entry

    def add_open_file(
        self,
        handle: BinaryIO,
        name: str,
        label: str,
        structure: list[tuple[int, int]] | None = None,
    ) -> dict[str, Any]:
        """A file the caller holds open (and checks for changes itself), from its start.
        ``structure``: regions covering the file one after another (a FAISS index's header,
        vectors, inverted lists), each cut at fixed offsets (``chunker.iter_pieces``) rather
        than by FastCDC; the entry says so (``cut``)."""
        st = os.fstat(handle.fileno())
        entry: dict[str, Any] = {"path": name, "size": st.st_size, "mode": stat.S_IMODE(st.st_mode)}
        try:
            if structure is None:
                entry["sha256"], entry["chunks"] = self._chunked(handle, st.st_size)
            else:
                ends = [0] + [end for _begin, end in structure]
                if [begin for begin, _end in structure] != ends[:-1] or ends[-1] != st.st_size:
                    raise ChangedDuringBackup(  # read for another size than it has now
                        f"{label}: the file changed while it was read (it is being written)"
                    )
                entry["sha256"], entry["chunks"] = self._chunked(
                    handle, st.st_size, structure, chunker.iter_pieces
                )
                entry["cut"] = {"regions": len(structure), "every": chunker.MAXIMUM}
        except EOFError:
            raise ChangedDuringBackup(
                f"{label}: the file shrank while it was read (it is being written)"
            ) from None
        self.files.append(entry)
        return entry

    def add_bytes(self, name: str, data: bytes) -> dict[str, Any]:
        """A small file made at backup (a probe file, say)."""
        digest, chunks = self._chunked(io.BytesIO(data), len(data))
        entry = {"path": name, "size": len(data), "mode": 0o644, "sha256": digest, "chunks": chunks}
        self.files.append(entry)
        return entry

    def _chunked(
        self,
        handle: Any,
        size: int,
        regions: list[tuple[int, int]] | None = None,
        cut: Any = None,
    ) -> tuple[str, list[list[Any]]]:
        whole = hashlib.sha256()
        chunks: list[list[Any]] = []
        cut = cut or chunker.iter_blocks
        with _Hashing() as hashing:  # the file's digest beside the chunking, as in add_file
            for _index, _offset, data, pieces in cut(handle, regions or [(0, size)]):
                hashing.update(whole, data)
                chunks += [[self.writer.add(piece)] for piece in pieces]
        return whole.hexdigest(), chunks

    def document(self, scope: str, label: str, extra: dict[str, Any]) -> dict[str, Any]:
        return {
            "format": VERSION_FORMAT,
            "scope": scope,
            "label": label,
            "digest": version_digest(self.files),
            "chunker": {
                "algorithm": "fastcdc-2020",
                "average": chunker.AVERAGE,
                "minimum": chunker.MINIMUM,
                "maximum": chunker.MAXIMUM,
            },
            "chunk_layers": CHUNK_LAYERS,
            "layout": LAYOUT,
            "files": self.files,
            **extra,
        }

    def resolve(self) -> None:
        """After the writer closed: each chunk's number replaced by its id, sha256 and size,
        then each tensor's digest made of its chunks' sha256."""
        for entry in self.files:
            for chunk in entry["chunks"]:
                if len(chunk) == 1:
                    ref = self.writer.refs[chunk[0]]
                    chunk[:] = [ref.id, ref.sha256, ref.size]
            recorded = entry.get("safetensors")
            if recorded is not None and any(row[5] is None for row in recorded["tensors"]):
                chunks = entry["chunks"]
                spans = tensor_chunk_spans(
                    recorded["tensors"], recorded["data_start"], [c[2] for c in chunks]
                )
                for row, (first, last) in zip(recorded["tensors"], spans, strict=True):
                    row[5] = digest_of_chunks(bytes.fromhex(c[1]) for c in chunks[first:last])

    def locate(self) -> dict[str, int]:
        """After the writer closed: every chunk's id, sha256, size, pack, offset and length
        into the file entries; returns the packs the version needs with their stored sizes."""
        self.resolve()
        packs: dict[str, int] = {}
        for entry in self.files:
            for chunk in entry["chunks"]:
                pid, offset, length = self.writer.location(chunk[0])
                chunk[3:] = [pid, offset, length]
                packs[pid] = self.writer.pack_sizes[pid]
        return packs


def new_version(
    store: ObjectStore, scope: str, mac_key: bytes, recipients: Recipients, level: int
) -> VersionBuilder:
    """The builder of one backup's version: its packs written under the store's default
    Object Lock (a WORM store locks them like the copy they belong to), reusing no chunk of a
    pack a prune announced."""
    lock = store.default_lock.lock_from(utcnow()) if store.default_lock else None
    writer = PackWriter(
        store, scope, mac_key, recipients, level, lock=lock, skip_packs=doomed_packs(store, scope)
    )
    return VersionBuilder(writer, lock=lock)


class _Hashing:
    """A file's sha256 updated on a thread of its own, in order: hashlib releases the
    interpreter lock, so hashing runs beside the chunking; at most ``_AHEAD`` batches of
    chunks wait."""

    _AHEAD = 4

    def __enter__(self) -> _Hashing:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="file-hash")
        self._pending: deque[Future[None]] = deque()
        self._batch: list[tuple[Any, bytes]] = []
        self._batched = 0
        return self

    def update(self, digest: Any, data: bytes) -> None:
        # In batches of about 1 MiB: a hand-over per 64 KiB chunk cost more in switches of
        # the interpreter lock than the hashing.
        self._batch.append((digest, data))
        self._batched += len(data)
        if self._batched >= BATCH_BYTES:
            self._submit()

    def _submit(self) -> None:
        if self._batch:
            self._pending.append(self._pool.submit(_update_all, self._batch))
            self._batch, self._batched = [], 0
        while self._pending and (len(self._pending) > self._AHEAD or self._pending[0].done()):
            self._pending.popleft().result()

    def __exit__(self, *exc: object) -> None:
        try:
            if exc[0] is None:
                self._submit()
            while self._pending:
                self._pending.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)


def _update_all(batch: list[tuple[Any, bytes]]) -> None:
    for digest, data in batch:
        digest.update(data)


def version_digest(files: list[dict[str, Any]]) -> str:
    """The version's content: sha256 over every file's name, size and sha256, by name."""
    lines = sorted(f"{f['path']}\0{f['size']}\0{f['sha256']}\n" for f in files)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


# --- the clear reference list -----------------------------------------------------------------


def refs_prefix(scope: str) -> str:
    return f"{scope}/chunk-refs/"


def write_refs(
    store: ObjectStore, scope: str, packs: dict[str, int], now, lock: ObjectLock | None = None
) -> tuple[str, str]:
    """Write the reference list of a version about to be committed (the packs it needs, with
    their stored sizes); return its key and sha256."""
    key = f"{refs_prefix(scope)}{utc_stamp(now)}-{secrets.token_hex(4)}.json.zst"
    body = json.dumps(
        {
            "format": REFS_FORMAT,
            "scope": scope,
            "packs": sorted([p, s] for p, s in packs.items()),
        },
        separators=(",", ":"),
    ).encode()
    data = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(body)
    store.put_bytes(key, data, lock=lock)
    return key, hashlib.sha256(data).hexdigest()


def read_refs(store: ObjectStore, scope: str, key: str, sha256: str, label: str) -> dict[str, int]:
    """The store objects a version needs (packs, or a first-release version's chunk objects),
    as keys with their stored sizes; ``IntegrityError`` if the list is not the one its
    manifest names (``NotFoundError`` if it is gone)."""
    data = store.get_bytes(key)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise IntegrityError(f"{label}: chunk reference list {key} does not match its manifest")
    try:
        document = json.loads(zstandard.ZstdDecompressor().decompress(data))
        if document["format"] == REFS_FORMAT_CHUNKS:
            return {chunk_key(scope, cid): int(size) for cid, size in document["chunks"]}
        if document["format"] == REFS_FORMAT:
            return {pack_key(scope, pid): int(size) for pid, size in document["packs"]}
    except (zstandard.ZstdError, ValueError, KeyError, TypeError):
        pass
    raise IntegrityError(f"{label}: chunk reference list {key} is damaged")


# --- reading a version back -----------------------------------------------------------------


def parse_version(data: bytes, label: str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise IntegrityError(f"{label}: the version document is not JSON") from None
    if not isinstance(document, dict) or document.get("format") != VERSION_FORMAT:
        raise IntegrityError(f"{label}: not a {VERSION_FORMAT} document")
    files = document.get("files")
    if not isinstance(files, list):
        raise IntegrityError(f"{label}: the version document lists no files")
    for entry in files:
        name = entry.get("path") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not safe_relative(name):
            raise IntegrityError(f"{label}: the version lists an unsafe file name {name!r}")
        chunks = entry.get("chunks")
        if not isinstance(chunks, list) or any(
            not isinstance(c, list) or len(c) not in (3, 6) for c in chunks
        ):
            raise IntegrityError(f"{label}: {name}: its chunk list is malformed")
        if sum(chunk[2] for chunk in chunks) != entry.get("size"):
            raise IntegrityError(f"{label}: {name}: its chunks do not add up to its size")
    return document


def safe_relative(name: str) -> bool:
    parts = name.split("/")
    return (
        bool(name)
        and not name.startswith("/")
        and all(p not in ("", ".", "..") for p in parts)
        and "\0" not in name
    )


def file_chunks(entry: dict[str, Any]) -> list[ChunkRef]:
    return [ChunkRef(*chunk) for chunk in entry["chunks"]]


def needed_objects(document: dict[str, Any]) -> set[str]:
    """The store keys of the packs (and first-release chunk objects) a version document needs."""
    scope = document["scope"]
    return {
        pack_key(scope, chunk[3]) if len(chunk) == 6 else chunk_key(scope, chunk[0])
        for entry in document["files"]
        for chunk in entry["chunks"]
    }


def iter_file(
    store: ObjectStore,
    scope: str,
    entry: dict[str, Any],
    identities: list[x25519.Identity],
    label: str,
    cache: PackCache | None = None,
    write_to: int | None = None,
) -> Iterator[bytes]:
    """A file's bytes, chunk by chunk, each chunk checked; the file's sha256 and size are
    compared when the last chunk was read (``IntegrityError``). ``cache``: shared by the
    files of one restore, so a pack holding the end of one file and the start of the next is
    fetched once. ``write_to``: a descriptor the chunks are written to at their offsets by
    the reading threads (``read_chunks``); the file's digest is still of what they yield."""
    whole = hashlib.sha256()
    size = 0
    # Hashed here: the chunks come inflated and checked from other threads, and this thread
    # would wait for them anyway (hashlib lets the interpreter lock go).
    for data in read_chunks(
        store, scope, file_chunks(entry), identities, f"{label}: {entry['path']}", cache, write_to
    ):
        whole.update(data)
        size += len(data)
        yield data
    if size != entry["size"] or whole.hexdigest() != entry["sha256"]:
        raise IntegrityError(f"{label}: {entry['path']} does not match its recorded sha256")


def missing_objects(store: ObjectStore, scope: str, refs: dict[str, int]) -> list[str]:
    """Keys of ``refs`` (``read_refs``) the store lacks or holds with another size: one
    listing of the packs, and of the first release's chunk objects only if a version needs
    some."""
    present = {pack_key(scope, pid): size for pid, size in existing_packs(store, scope).items()}
    if any(id_of_pack_key(key) is None for key in refs):
        present |= {info.key: info.size for info in store.list(f"{scope}/chunks/")}
    return sorted(key for key, size in refs.items() if present.get(key) != size)
