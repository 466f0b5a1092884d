"""Chunk objects: ``<scope>/chunks/<id[:2]>/<id>.zst.age``, each ``age(zstd(chunk))``, so
``age -d -i KEY < OBJECT | zstd -d`` gives a chunk back with standard tools.

Objects are create-only like every object of a store; a chunk is written once per scope and
referenced by every version that holds it. Writes and reads run on a small thread pool (zstd
and the store's I/O release the interpreter lock), with a bounded number in flight, so memory
stays at a few chunks whatever the file size.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass

import pyrage
import zstandard
from pyrage import x25519

from spark_backup.engine.blobs.keys import chunk_id
from spark_backup.engine.crypto import Recipients
from spark_backup.engine.stores.base import ObjectLock, ObjectStore
from spark_backup.errors import IntegrityError, NotFoundError, StoreError

CHUNK_LAYERS = ["age", "zstd"]
WORKERS = 4
IN_FLIGHT = 16


def chunks_prefix(scope: str) -> str:
    return f"{scope}/chunks/"


def chunk_key(scope: str, cid: str) -> str:
    return f"{scope}/chunks/{cid[:2]}/{cid}.zst.age"


def id_of_chunk_key(key: str) -> str | None:
    name = key.rsplit("/", 1)[-1]
    if not name.endswith(".zst.age"):
        return None
    cid = name.removesuffix(".zst.age")
    return cid if len(cid) == 64 and all(c in "0123456789abcdef" for c in cid) else None


def existing_chunks(store: ObjectStore, scope: str) -> dict[str, int]:
    """Every chunk of the scope in the store, with its stored size (one listing)."""
    found = {}
    for info in store.list(chunks_prefix(scope)):
        if (cid := id_of_chunk_key(info.key)) is not None:
            found[cid] = info.size
    return found


@dataclass(frozen=True)
class ChunkRef:
    id: str
    sha256: str  # of the plaintext
    size: int


class ChunkWriter:
    """Writes the chunks of one backup: ``add`` returns at once with the chunk's reference; the
    new ones are compressed, encrypted and stored on worker threads. ``close`` waits for them
    and raises the first failure."""

    def __init__(
        self,
        store: ObjectStore,
        scope: str,
        mac_key: bytes,
        recipients: Recipients,
        level: int = 3,
        lock: ObjectLock | None = None,
    ):
        """``lock``: the Object Lock new chunks are written under (a WORM store's default)."""
        self.store, self.scope, self._key = store, scope, mac_key
        self._object_lock = lock
        self._recipients = recipients.parsed()
        self._level = level
        self.known = existing_chunks(store, scope)  # id -> stored size
        self.new_chunks = 0
        self.new_stored_bytes = 0
        self.reused: set[str] = set()
        self.written: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="chunk-writer")
        self._slots = threading.BoundedSemaphore(IN_FLIGHT)
        self._pending: list[Future] = []
        self._lock = threading.Lock()

    def add(self, data: bytes) -> ChunkRef:
        digest = hashlib.sha256(data).digest()
        cid = chunk_id(self._key, digest)
        ref = ChunkRef(cid, digest.hex(), len(data))
        if cid in self.written or cid in self.known:
            if cid not in self.written:
                self.reused.add(cid)
            return ref
        self.written[cid] = -1
        self._raise_failed()
        self._slots.acquire()
        future = self._pool.submit(self._write, cid, data)
        future.add_done_callback(lambda _f: self._slots.release())
        self._pending.append(future)
        return ref

    def _write(self, cid: str, data: bytes) -> None:
        compressed = zstandard.ZstdCompressor(level=self._level, write_checksum=True).compress(data)
        sealed = pyrage.encrypt(compressed, self._recipients)
        key = chunk_key(self.scope, cid)
        stored = len(sealed)
        try:
            self.store.put_bytes(key, sealed, lock=self._object_lock)
        except StoreError:
            if not self.store.exists(key):
                raise
            # Another backup of the scope wrote it first: its object, its size (age headers
            # differ from one encryption to the next).
            stored = len(self.store.get_bytes(key))
        with self._lock:
            self.written[cid] = stored
            self.new_chunks += 1
            self.new_stored_bytes += stored

    def _raise_failed(self) -> None:
        done = [f for f in self._pending if f.done()]
        for future in done:
            future.result()
        self._pending = [f for f in self._pending if not f.done()]

    def close(self) -> None:
        try:
            for future in self._pending:
                future.result()
        finally:
            self._pending = []
            self._pool.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        with suppress(Exception):
            for future in self._pending:
                if future.done() and not future.cancelled():
                    future.exception()

    def stored_size(self, cid: str) -> int:
        """After ``close``: the stored size of a chunk this backup wrote or reused."""
        return self.written[cid] if cid in self.written else self.known[cid]


def open_chunk(
    sealed: bytes, identities: list[x25519.Identity], ref: ChunkRef, label: str
) -> bytes:
    """A stored chunk's plaintext, checked against its recorded sha256 and size."""
    try:
        compressed = pyrage.decrypt(sealed, identities)
    except pyrage.DecryptError:
        raise IntegrityError(
            f"{label}: chunk {ref.id[:16]}... does not decrypt: damaged, or encrypted to another key"
        ) from None
    try:
        plain = zstandard.ZstdDecompressor().decompress(compressed, max_output_size=ref.size)
    except zstandard.ZstdError as exc:
        raise IntegrityError(
            f"{label}: chunk {ref.id[:16]}... zstd stream is damaged: {exc}"
        ) from None
    if len(plain) != ref.size or hashlib.sha256(plain).hexdigest() != ref.sha256:
        raise IntegrityError(
            f"{label}: chunk {ref.id[:16]}... does not hold the bytes the version recorded"
        )
    return plain


def read_chunks(
    store: ObjectStore,
    scope: str,
    refs: Iterable[ChunkRef],
    identities: list[x25519.Identity],
    label: str,
) -> Iterator[bytes]:
    """The chunks' plaintexts in order, each checked; fetched ahead on worker threads, at most
    ``IN_FLIGHT`` at once."""

    def fetch(ref: ChunkRef) -> bytes:
        key = chunk_key(scope, ref.id)
        try:
            sealed = store.get_bytes(key)
        except NotFoundError:
            raise IntegrityError(
                f"{label}: chunk {ref.id[:16]}... is missing from the store ({key})"
            ) from None
        return open_chunk(sealed, identities, ref, label)

    with ThreadPoolExecutor(WORKERS, thread_name_prefix="chunk-reader") as pool:
        window: list[Future[bytes]] = []
        try:
            for ref in refs:
                window.append(pool.submit(fetch, ref))
                if len(window) >= IN_FLIGHT:
                    yield window.pop(0).result()
            while window:
                yield window.pop(0).result()
        finally:
            for future in window:
                future.cancel()
