"""Packs: many chunks in one object, ``<scope>/packs/<id[:2]>/<id>.zst.age``.

A pack's plaintext is the chunks' zstd frames one after another (each frame independent:
compressed with its checksum, or raw blocks for a chunk zstd cannot shrink, ``raw_frame``); the
pack is one age file of it, so ``age -d -i KEY < PACK | zstd -d`` gives the
chunks back concatenated, and one chunk is ``dd`` of its offset and length in ``age -d``'s
output, through ``zstd -d``. A pack's id is the sha256 of the object as stored (its OCI digest
for replication). New chunks fill a pack up to ``PACK_TARGET`` bytes of frames; one X25519
operation and one store object per pack instead of per chunk.

Beside each pack, its index ``<scope>/pack-index/<id>.idx`` lists the chunks in it (chunk id,
offset, length), sealed with a key derived from the source's chunk key (ChaCha20-Poly1305): a
backup reads the indexes to learn which chunks the store holds (one listing and one small GET
per pack), while the store sees only the number and sizes of packs. Restores never read
indexes: a version document records each chunk's pack, offset and length.

Write order: the pack, then its index, then (by the caller) the version that references it;
a crash leaves at most packs no version references, which prune removes. Prune deletes an
index before its pack, so an index never names a pack that is gone.

Memory: the pack being filled, ``SEALERS`` being sealed and stored (each with its sealed copy),
and ``IN_FLIGHT_BATCHES`` batches of chunks being compressed: about 5 x ``PACK_TARGET``. A
restore keeps ``PACK_CACHE`` decrypted packs, the ones being fetched, and a spare buffer of
each kind.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import mmap
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from itertools import pairwise
from typing import TYPE_CHECKING

import zstandard
from pyrage import x25519

from spark_backup.engine.blobs.chunks import (
    ChunkRef,
    chunk_key,
    inflate,
    is_hex_id,
    open_chunk,
)
from spark_backup.engine.blobs.keys import chunk_id
from spark_backup.engine.crypto import Recipients
from spark_backup.engine.stores.base import ObjectLock, ObjectStore
from spark_backup.errors import IntegrityError, NotFoundError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

    from spark_backup.engine.age_decrypt import Identities

PACK_TARGET = 16 * 1024 * 1024
PACK_CACHE = 3
WORKERS = 3
# Threads hashing and compressing a backup's chunks. Two rather than three: each chunk lets the
# interpreter lock go several times (its cut, its sha256, its zstd sample), and a third thread
# waiting for the lock added hand-overs without adding a core (500 MB of random weights: 1.01 s
# against 1.04 s; normal fp32 weights, compressed: 0.76 against 0.78 s; one thread: 1.01 s and
# 0.82 s, as zstd then compresses on one core).
COMPRESSORS = 2
# Packs sealed and stored at once. With one, the chunking stopped whenever a pack filled before
# the previous one was sealed, and the last pack sealed alone; with two, the chunking waits only
# when two are still being sealed, and the last two seal side by side.
SEALERS = 2
# Chunks handed to a thread at a time (hashed and compressed, or inflated and checked), and
# batches under way.
BATCH_BYTES = 1 << 20
IN_FLIGHT_BATCHES = 4
# A chunk whose first ``SAMPLE`` bytes zstd shrinks by less than 3% (random weights, vectors
# already compressed) goes into a frame of raw blocks, without compressing it: what zstd
# itself writes for such bytes, at a fifth of a try's CPU.
SAMPLE = 4096
_RAW_BLOCK = 128 * 1024  # zstd's largest block
_ZSTD_MAGIC = (0xFD2FB528).to_bytes(4, "little")
INDEX_FORMAT = "spark-backup.pack-index/v1"
_INDEX_MAGIC = b"SBPI1\n"
_INDEX_KEY_INFO = b"spark-backup.pack-index/v1"


def packs_prefix(scope: str) -> str:
    return f"{scope}/packs/"


def pack_key(scope: str, pid: str) -> str:
    return f"{scope}/packs/{pid[:2]}/{pid}.zst.age"


def index_prefix(scope: str) -> str:
    return f"{scope}/pack-index/"


def index_key(scope: str, pid: str) -> str:
    return f"{scope}/pack-index/{pid}.idx"


def id_of_pack_key(key: str) -> str | None:
    parts = key.split("/")
    if len(parts) < 3 or parts[-3] != "packs" or not parts[-1].endswith(".zst.age"):
        return None
    pid = parts[-1].removesuffix(".zst.age")
    return pid if is_hex_id(pid) and parts[-2] == pid[:2] else None


def id_of_index_key(key: str) -> str | None:
    name = key.rsplit("/", 1)[-1]
    pid = name.removesuffix(".idx")
    return pid if name.endswith(".idx") and is_hex_id(pid) else None


def existing_packs(store: ObjectStore, scope: str) -> dict[str, int]:
    """Every pack of the scope, with its stored size (one listing)."""
    return {
        pid: info.size
        for info in store.list(packs_prefix(scope))
        if (pid := id_of_pack_key(info.key)) is not None
    }


def _large_buffers_to_the_os() -> None:
    """glibc raises its mmap threshold after a large buffer is freed, so later packs land in
    the heap and its per-thread arenas, which keep their pages: a restore's RSS then grows to
    several times the packs it holds. A fixed threshold of 1 MiB maps every pack-sized buffer
    on its own and gives it back when freed (no effect elsewhere than glibc)."""
    global _TUNED
    if _TUNED:
        return
    _TUNED = True
    with suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
        # Below it, freed memory stays for reuse rather than going back at 128 KiB: each
        # chunk's 64 KiB of inflated bytes otherwise cost fresh zeroed pages.
        libc.mallopt(-1, 32 << 20)  # M_TRIM_THRESHOLD


_TUNED = False


class _Buffers:
    """Pack-sized buffers for reuse. A restore reads each pack into one buffer and decrypts it
    into another: fresh ones cost a page fault per 4 KiB (zeroed by the kernel), as much CPU as
    the decryption itself; reused ones cost nothing. At most ``keep`` wait here; each is
    mapped on its own, so one not kept goes back to the OS with its last reference."""

    def __init__(self, keep: int):
        self._keep = keep
        self._spare: list[mmap.mmap] = []
        self._lock = threading.Lock()

    def take(self, size: int) -> memoryview:
        """``size`` bytes (their contents undefined), a spare's when one is large enough."""
        with self._lock:
            for index, spare in enumerate(self._spare):
                if len(spare) >= size:
                    return memoryview(self._spare.pop(index))[:size]
        return memoryview(_private_mapping(max(size, PACK_TARGET + (1 << 20))))[:size]

    def give_back(self, view: memoryview) -> None:
        """Only once nothing reads ``view`` (or any view of its buffer) any more."""
        buffer = view.obj
        view.release()
        with self._lock:
            if len(self._spare) < self._keep:
                self._spare.append(buffer)  # type: ignore[arg-type]


def _private_mapping(size: int) -> mmap.mmap:
    """``size`` bytes of private anonymous memory in huge pages where the kernel has them
    (``madvise``): ``mmap.mmap(-1, n)`` alone maps shared memory, faulted in 4 KiB at a time
    (0.13 CPU-s for a backup's first five pack buffers against 0.03 s)."""
    mapping = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with suppress(AttributeError, OSError):
        mapping.madvise(mmap.MADV_HUGEPAGE)
    return mapping


def _read_whole(raw, buffers: _Buffers) -> memoryview:
    """A stored object's bytes, read into a buffer from ``buffers`` (a larger one as needed)."""
    buffer = buffers.take(PACK_TARGET + (1 << 20))
    filled = 0
    readinto = getattr(raw, "readinto", None)
    while True:
        if filled == len(buffer):
            larger = buffers.take(2 * len(buffer))
            larger[:filled] = buffer[:filled]
            buffers.give_back(buffer)
            buffer = larger
        view = buffer[filled:]
        if readinto is not None:
            count = readinto(view)
        else:
            data = raw.read(len(view))
            count = len(data)
            view[:count] = data
        view.release()
        if not count:
            return buffer[:filled]
        filled += count


def raw_frame(data: bytes | memoryview) -> tuple[bytes | memoryview, ...]:
    """A zstd frame holding ``data`` (1 byte to 4 GiB) in raw blocks, as pieces to write one
    after another (the data itself is not copied): single segment with its content size, no
    checksum (the chunk's sha256 is checked on every read). ``zstd -d`` and every reader of
    packs open it like any frame."""
    view = memoryview(data)
    pieces: list[bytes | memoryview] = [_ZSTD_MAGIC + b"\xa0" + len(view).to_bytes(4, "little")]
    for at in range(0, len(view), _RAW_BLOCK):
        block = view[at : at + _RAW_BLOCK]
        last = at + _RAW_BLOCK >= len(view)
        pieces += [(len(block) << 3 | last).to_bytes(3, "little"), block]
    return tuple(pieces)


# --- the pack index ----------------------------------------------------------------------------


def _index_cipher(mac_key: bytes) -> ChaCha20Poly1305:
    # Imported here, as keys.derive_chunk_key does: a plan naming a blob-layer source loads
    # this module for every command, and only a backup or a restore opens an index.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INDEX_KEY_INFO).derive(
        mac_key
    )
    return ChaCha20Poly1305(key)


def seal_index(mac_key: bytes, pid: str, size: int, entries: list[tuple[str, int, int]]) -> bytes:
    body = json.dumps(
        {"format": INDEX_FORMAT, "pack": pid, "size": size, "chunks": entries},
        separators=(",", ":"),
    ).encode()
    nonce = os.urandom(12)
    compressed = zstandard.ZstdCompressor(level=3).compress(body)
    return _INDEX_MAGIC + nonce + _index_cipher(mac_key).encrypt(nonce, compressed, pid.encode())


def open_index(mac_key: bytes, pid: str, sealed: bytes) -> tuple[int, list[list]] | None:
    """(pack size, [[chunk id, offset, length]]), or None for an index this key cannot open
    (written under another chunk key, or damaged: its chunks are then simply not reused)."""
    if not sealed.startswith(_INDEX_MAGIC):
        return None
    from cryptography.exceptions import InvalidTag

    nonce = sealed[len(_INDEX_MAGIC) : len(_INDEX_MAGIC) + 12]
    try:
        compressed = _index_cipher(mac_key).decrypt(
            nonce, sealed[len(_INDEX_MAGIC) + 12 :], pid.encode()
        )
        document = json.loads(zstandard.ZstdDecompressor().decompress(compressed))
    except (InvalidTag, zstandard.ZstdError, ValueError):
        return None
    if document.get("format") != INDEX_FORMAT or document.get("pack") != pid:
        return None
    return int(document["size"]), document["chunks"]


def known_chunks(
    store: ObjectStore,
    scope: str,
    mac_key: bytes,
    skip: set[str] = frozenset(),  # type: ignore[assignment]
) -> tuple[dict[str, tuple[str, int, int]], dict[str, int]]:
    """Chunk id -> (pack, offset, length) of every chunk in a pack of the scope whose index
    this key opens, and the packs' sizes; packs in ``skip`` (announced by a prune) and packs
    missing or of another size than their index says are left out."""
    packs = existing_packs(store, scope)
    located: dict[str, tuple[str, int, int]] = {}
    sizes: dict[str, int] = {}
    for info in store.list(index_prefix(scope)):
        pid = id_of_index_key(info.key)
        if pid is None or pid in skip or pid not in packs:
            continue
        try:
            opened = open_index(mac_key, pid, store.get_bytes(info.key))
        except NotFoundError:
            continue  # pruned meanwhile
        if opened is None or opened[0] != packs[pid]:
            continue
        sizes[pid] = packs[pid]
        for cid, offset, length in opened[1]:
            located.setdefault(cid, (pid, int(offset), int(length)))
    return located, sizes


# --- writing -----------------------------------------------------------------------------------

_Frame = tuple[bytes | memoryview, ...]  # a chunk's zstd frame, in pieces


class PackWriter:
    """Writes the new chunks of one backup into packs. ``add`` queues a chunk and returns its
    number at once; worker threads hash it (sha256, then the keyed id) and compress it
    (hashlib and zstd release the interpreter lock, so they run beside the caller's chunking);
    in the order chunks were added, a known chunk is referenced where it lies and a new one is
    appended to the pack being filled (compressing a chunk that turns out to be known costs
    little next to waiting for its id). A full pack is encrypted and stored on one of
    ``SEALERS`` threads while the next fills (OpenSSL's ChaCha20-Poly1305 through
    ``cryptography``, as backups of streams do: it holds the interpreter lock while it seals,
    and other threads take the lock at the switch interval).
    ``close`` writes the last pack, waits for every write and raises the first failure; then
    ``refs[n]`` is the n-th chunk's reference and ``location`` answers for every chunk."""

    def __init__(
        self,
        store: ObjectStore,
        scope: str,
        mac_key: bytes,
        recipients: Recipients,
        level: int = 3,
        lock: ObjectLock | None = None,
        skip_packs: set[str] = frozenset(),  # type: ignore[assignment]
        pack_target: int | None = None,
    ):
        """``lock``: the Object Lock new packs are written under (a WORM store's default);
        ``skip_packs``: packs a prune announced, whose chunks are written again if needed."""
        self.store, self.scope, self._key = store, scope, mac_key
        self._object_lock = lock
        self._recipients = recipients.public_keys
        self._level = level
        self._target = pack_target or PACK_TARGET
        _large_buffers_to_the_os()
        self.known, self.pack_sizes = known_chunks(store, scope, mac_key, skip_packs)
        self.locations: dict[str, tuple[str, int, int]] = {}
        self.refs: list[ChunkRef] = []
        self.reused_packs: set[str] = set()
        self.new_chunks = 0
        self.new_stored_bytes = 0
        self.new_packs: list[str] = []
        self._placed: set[str] = set()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(COMPRESSORS, thread_name_prefix="pack-compress")
        self._sealer = ThreadPoolExecutor(SEALERS, thread_name_prefix="pack-seal")
        self._compressing: deque[Future[list[tuple[ChunkRef, _Frame]]]] = deque()
        self._batch: list[bytes | memoryview] = []
        self._batched = 0
        self._added = 0
        self._sealing: deque[Future[None]] = deque()
        self._stored = threading.Lock()  # the sealers' bookkeeping of stored packs
        # The pack being filled (its frames one after another), those being sealed, and the
        # sealed ones being stored: buffers reused from pack to pack.
        self._plain_buffers = _Buffers(keep=SEALERS + 1)
        self._sealed_buffers = _Buffers(keep=SEALERS)
        self._pack: memoryview | None = None
        self._entries: list[tuple[str, int, int]] = []
        self._filled = 0

    def add(self, data: bytes | memoryview) -> int:
        """Queue a chunk; its number. Chunks go to the threads in batches of about
        ``BATCH_BYTES``: one hand-over per 64 KiB chunk cost more in switches of the
        interpreter lock than the chunk's hash."""
        self._batch.append(data)
        self._batched += len(data)
        self._added += 1
        if self._batched >= BATCH_BYTES:
            self._submit_batch()
        return self._added - 1

    def _submit_batch(self) -> None:
        if not self._batch:
            return
        self._compressing.append(self._pool.submit(self._prepare_batch, self._batch))
        self._batch, self._batched = [], 0
        self._collect(wait=len(self._compressing) >= IN_FLIGHT_BATCHES)

    def _prepare_batch(self, batch: list[bytes | memoryview]) -> list[tuple[ChunkRef, _Frame]]:
        return [self._prepare(data) for data in batch]

    def _prepare(self, data: bytes | memoryview) -> tuple[ChunkRef, _Frame]:
        digest = hashlib.sha256(data).digest()
        ref = ChunkRef(chunk_id(self._key, digest), digest.hex(), len(data))
        compressor = getattr(self._local, "compressor", None)
        if compressor is None:
            compressor = zstandard.ZstdCompressor(level=self._level, write_checksum=True)
            self._local.compressor = compressor
        if (
            len(data) > SAMPLE
            and len(compressor.compress(memoryview(data)[:SAMPLE])) > SAMPLE * 0.97
        ):
            return ref, raw_frame(data)
        return ref, (compressor.compress(data),)

    def _collect(self, wait: bool, everything: bool = False) -> None:
        """Place prepared chunks in the order they were added: the batches done, and with
        ``wait`` until fewer than ``IN_FLIGHT_BATCHES`` are left (``everything``: none)."""
        while self._compressing and (wait or everything or self._compressing[0].done()):
            prepared = self._compressing.popleft().result()
            wait = wait and len(self._compressing) >= IN_FLIGHT_BATCHES
            for ref, frame in prepared:
                self._place(ref, frame)

    def _place(self, ref: ChunkRef, frame: _Frame) -> None:
        self.refs.append(ref)
        cid = ref.id
        if cid in self._placed or cid in self.locations:
            return
        if cid in self.known:
            self.locations[cid] = self.known[cid]
            self.reused_packs.add(self.known[cid][0])
            return
        self._placed.add(cid)
        start = self._filled
        self._append(frame)
        self._entries.append((cid, start, self._filled - start))
        if self._filled >= self._target:
            self._seal()

    def _append(self, frame: _Frame) -> None:
        """Copy a frame's pieces to the end of the pack being filled (a larger buffer if it is
        full)."""
        end = self._filled + sum(len(piece) for piece in frame)
        if self._pack is None or end > len(self._pack):
            larger = self._plain_buffers.take(max(end, self._target + (1 << 20)))
            if self._pack is not None:
                larger[: self._filled] = self._pack[: self._filled]
                self._plain_buffers.give_back(self._pack)
            self._pack = larger
        for piece in frame:
            self._pack[self._filled : self._filled + len(piece)] = piece
            self._filled += len(piece)

    def _seal(self) -> None:
        if not self._entries:
            return
        while len(self._sealing) >= SEALERS:
            self._sealing.popleft().result()  # memory stays bounded
        assert self._pack is not None
        plain, entries = self._pack[: self._filled], self._entries
        full, self._pack, self._entries, self._filled = self._pack, None, [], 0
        self._sealing.append(self._sealer.submit(self._store_pack, full, plain, entries))

    def _store_pack(
        self, full: memoryview, plain: memoryview, entries: list[tuple[str, int, int]]
    ) -> None:
        from spark_backup.engine.age_encrypt import encrypt_into  # cryptography: backups only

        try:
            sealed = encrypt_into(plain, self._recipients, self._sealed_buffers.take)
        finally:
            plain.release()
            self._plain_buffers.give_back(full)
        try:
            pid = hashlib.sha256(sealed).hexdigest()
            self.store.put_bytes(pack_key(self.scope, pid), sealed, lock=self._object_lock)
            size = len(sealed)
        finally:
            self._sealed_buffers.give_back(sealed)
        index = seal_index(self._key, pid, size, [list(e) for e in entries])
        self.store.put_bytes(index_key(self.scope, pid), index, lock=self._object_lock)
        with self._stored:
            for cid, offset, length in entries:
                self.locations[cid] = (pid, offset, length)
            self.pack_sizes[pid] = size
            self.new_packs.append(pid)
            self.new_chunks += len(entries)
            self.new_stored_bytes += size + len(index)

    def close(self) -> None:
        try:
            self._submit_batch()
            self._collect(wait=True, everything=True)
            self._seal()
            while self._sealing:
                self._sealing.popleft().result()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._sealer.shutdown(wait=True, cancel_futures=True)

    def abort(self) -> None:
        for future in self._compressing:
            future.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._sealer.shutdown(wait=True, cancel_futures=True)
        with suppress(Exception):
            for sealing in self._sealing:
                sealing.exception()

    def location(self, cid: str) -> tuple[str, int, int]:
        """After ``close``: the pack, offset and length of a chunk this backup added."""
        return self.locations[cid]


# --- reading -----------------------------------------------------------------------------------


class PackCache:
    """Decrypted packs (their frames), the ``slots`` most recently used; each pack fetched and
    decrypted by one thread while others needing it wait. A pack's bytes are checked against
    its id (the sha256 of the stored object), then decrypted in this process with OpenSSL's
    ChaCha20-Poly1305 (``age_decrypt``: about five times pyrage's speed, and the interpreter
    lock is let go between 64 KiB chunks, so the threads reading ahead overlap).

    Readers ``borrow`` a pack: a pack evicted while borrowed is reused for another only once
    its last reader gave it back. Usable as a context manager, as when packs were decrypted in
    a worker process."""

    def __init__(
        self,
        store: ObjectStore,
        scope: str,
        identities: list[x25519.Identity],
        slots: int = PACK_CACHE,
    ):
        self.store, self.scope, self._identities, self._slots = store, scope, identities, slots
        _large_buffers_to_the_os()
        self._packs: OrderedDict[str, memoryview] = OrderedDict()
        self._loading: dict[str, Future[memoryview]] = {}
        self._readers: dict[int, int] = {}  # id of a borrowed pack's buffer -> its readers
        self._evicted: dict[int, memoryview] = {}  # borrowed when it left the cache
        self._lock = threading.Lock()
        self._opener: Identities | None = None
        self._sealed = _Buffers(keep=1)
        self._plain = _Buffers(keep=1)
        self.fetched = 0

    def __enter__(self) -> PackCache:
        return self

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._packs.clear()

    @contextmanager
    def borrow(self, pid: str, label: str) -> Iterator[memoryview]:
        """The pack's plaintext, not reused for another pack until the block ends."""
        while True:
            self.get(pid, label)
            with self._lock:
                plain = self._packs.get(pid)
                if plain is not None:  # else evicted meanwhile: load it again
                    key = id(plain.obj)
                    self._readers[key] = self._readers.get(key, 0) + 1
                    break
        try:
            yield plain
        finally:
            with self._lock:
                self._readers[key] -= 1
                done = self._readers[key] == 0
                if done:
                    del self._readers[key]
                evicted = self._evicted.pop(key, None) if done else None
            if evicted is not None:
                self._plain.give_back(evicted)

    def finished(self, pid: str) -> None:
        """The reader needs nothing more of the pack: it is the first to go when room is
        needed. A second version's new packs are needed again and again between the first
        version's, which LRU alone evicted in between (a fetch, check and decryption each)."""
        with self._lock:
            if pid in self._packs:
                self._packs.move_to_end(pid, last=False)

    def get(self, pid: str, label: str) -> memoryview:
        """Load the pack (for a reader ahead); its plaintext, for a caller that does not care
        whether it is reused (``borrow`` for one that does)."""
        with self._lock:
            if pid in self._packs:
                self._packs.move_to_end(pid)
                return self._packs[pid]
            pending = self._loading.get(pid)
            if pending is None:
                pending = self._loading[pid] = Future()
                owner = True
            else:
                owner = False
        if not owner:
            return pending.result()
        try:
            plain = self._load(pid, label)
        except BaseException as exc:
            with self._lock:
                self._loading.pop(pid, None)
            pending.set_exception(exc)
            raise
        free = []
        with self._lock:
            self._loading.pop(pid, None)
            self._packs[pid] = plain
            self.fetched += 1
            while len(self._packs) > self._slots:
                _old, evicted = self._packs.popitem(last=False)
                if id(evicted.obj) in self._readers:
                    self._evicted[id(evicted.obj)] = evicted
                else:
                    free.append(evicted)
        for evicted in free:
            self._plain.give_back(evicted)
        pending.set_result(plain)
        return plain

    def _load(self, pid: str, label: str) -> memoryview:
        # cryptography is imported by restores alone: every command loads this module.
        from spark_backup.engine.age_decrypt import AgeDecryptError, Identities, decrypt_bytes

        key = pack_key(self.scope, pid)
        try:
            with self.store.open_read(key) as raw:
                sealed = _read_whole(raw, self._sealed)
        except NotFoundError:
            raise IntegrityError(
                f"{label}: pack {pid[:16]}... is missing from the store ({key})"
            ) from None
        try:
            if hashlib.sha256(sealed).hexdigest() != pid:
                raise IntegrityError(f"{label}: pack {pid[:16]}... is damaged (its sha256 differs)")
            with self._lock:
                if self._opener is None:
                    self._opener = Identities(self._identities)
                opener = self._opener
            try:
                return decrypt_bytes(sealed, opener, self._plain.take)
            except AgeDecryptError as exc:
                reason = "encrypted to another key" if exc.kind == "no_matching_keys" else "damaged"
                raise IntegrityError(
                    f"{label}: pack {pid[:16]}... does not decrypt: {reason}"
                ) from None
        finally:
            self._sealed.give_back(sealed)


def _quietly(call, *args) -> None:
    """A fetch ahead: its failure is raised again where the chunk is read."""
    with suppress(Exception):
        call(*args)


def read_chunks(
    store: ObjectStore,
    scope: str,
    refs: Iterable[ChunkRef],
    identities: list[x25519.Identity],
    label: str,
    cache: PackCache | None = None,
    write_to: int | None = None,
) -> Iterator[bytes]:
    """The chunks' plaintexts in order, each checked; inflated ahead on worker threads in
    batches, at most ``IN_FLIGHT_BATCHES`` at once. Packed chunks come through ``cache`` (each
    pack fetched once while it stays among the recently used); chunk objects of the first
    release one GET each. ``write_to``: a file descriptor each checked chunk is also written
    to, at its offset (``os.pwrite``), by the thread that inflated it: the writes run beside
    each other and beside the caller, which gets the chunks once they are written."""
    cache = cache or PackCache(store, scope, identities)

    def fetch(ref: ChunkRef) -> bytes:
        if ref.pack is None:
            key = chunk_key(scope, ref.id)
            try:
                sealed = store.get_bytes(key)
            except NotFoundError:
                raise IntegrityError(
                    f"{label}: chunk {ref.id[:16]}... is missing from the store ({key})"
                ) from None
            return open_chunk(sealed, identities, ref, label)
        with cache.borrow(ref.pack, label) as frames:
            if ref.offset + ref.length > len(frames):
                raise IntegrityError(f"{label}: chunk {ref.id[:16]}... lies past its pack's end")
            return inflate(frames[ref.offset : ref.offset + ref.length], ref, label)

    def fetch_batch(batch: list[ChunkRef], start: int, finishing: list[str]) -> list[bytes]:
        chunks = [fetch(ref) for ref in batch]
        for pid in finishing:
            cache.finished(pid)
        if write_to is not None:
            _pwrite_all(write_to, chunks, start)
        return chunks

    refs = list(refs)
    last_needed = {ref.pack: number for number, ref in enumerate(refs) if ref.pack is not None}
    # Packs in the order the chunks first need them: when one is first needed, the next one is
    # fetched and decrypted ahead, so the chunks never wait for a whole pack at its boundary.
    order = list(dict.fromkeys(ref.pack for ref in refs if ref.pack is not None))
    following = dict(pairwise(order))
    started: set[str] = set()
    with (
        ThreadPoolExecutor(WORKERS, thread_name_prefix="pack-reader") as pool,
        ThreadPoolExecutor(1, thread_name_prefix="pack-ahead") as ahead,
    ):
        window: deque[Future[list[bytes]]] = deque()
        number = 0
        try:
            for batch, start in _batches(refs):
                finishing = []
                for ref in batch:
                    if ref.pack is not None and ref.pack not in started:
                        started.add(ref.pack)
                        if (upcoming := following.get(ref.pack)) is not None:
                            ahead.submit(_quietly, cache.get, upcoming, label)
                    if ref.pack is not None and last_needed[ref.pack] == number:
                        finishing.append(ref.pack)
                    number += 1
                window.append(pool.submit(fetch_batch, batch, start, finishing))
                if len(window) >= IN_FLIGHT_BATCHES:
                    yield from window.popleft().result()
            while window:
                yield from window.popleft().result()
        finally:
            for future in window:
                future.cancel()


def _batches(refs: list[ChunkRef]) -> Iterator[tuple[list[ChunkRef], int]]:
    """Consecutive chunks of about ``BATCH_BYTES`` of plaintext, each with the offset of its
    first byte: a thread inflates and checks a batch at a time, as handing each 64 KiB chunk to
    a thread of its own cost more in switches of the interpreter lock than the chunk's
    inflation and hash."""
    batch: list[ChunkRef] = []
    size = start = 0
    for ref in refs:
        batch.append(ref)
        size += ref.size
        if size - start >= BATCH_BYTES:
            yield batch, start
            batch, start = [], size
    if batch:
        yield batch, start


def _pwrite_all(fd: int, chunks: list[bytes], offset: int) -> None:
    """``chunks`` one after another at ``offset`` of ``fd`` (one ``pwritev`` for a batch,
    again for the rest after a short write)."""
    views = [memoryview(chunk) for chunk in chunks if chunk]
    while views:
        count = os.pwritev(fd, views, offset)
        offset += count
        while views and count >= len(views[0]):
            count -= len(views[0])
            views.pop(0)
        if views and count:
            views[0] = views[0][count:]
