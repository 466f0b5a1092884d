"""The streaming pipeline: plaintext -> zstd -> age -> store, and back.

Backup pulls plaintext from a source, compresses it with zstd (frame checksums on, so ``zstd -d``
verifies too), encrypts it to the age recipients, and streams it into the store, hashing the
plaintext and the stored bytes on the way; nothing is held in memory beyond a chunk or an
upload part. The commit protocol (docs/architecture.md) is: data object first, manifest last.
A copy without a manifest does not exist for list, verify or restore.

Restore streams the other way and compares both hashes and sizes with the manifest when the
stream ends; callers stage what they write and publish it only after that comparison.
"""

from __future__ import annotations

import functools
import platform
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, suppress
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from typing import Any, Protocol

import zstandard
from pyrage import x25519

from spark_backup.engine.age_worker import AgeWorker
from spark_backup.engine.cadence import utcnow
from spark_backup.engine.crypto import Recipients
from spark_backup.engine.manifest import Digest, Manifest, data_key, manifest_key, new_copy_id
from spark_backup.engine.processes import keep_freed_buffers
from spark_backup.engine.signing import Signer
from spark_backup.engine.stores.base import ObjectLock, ObjectStore, written_version
from spark_backup.engine.streams import (
    CHUNK_SIZE,
    ChunkReader,
    CountingReader,
    HashingReader,
    HashingWriter,
    ProgressCallback,
    Readable,
    Writable,
)
from spark_backup.errors import (
    CryptoError,
    IntegrityError,
    ObjectLockedError,
    SparkBackupError,
    StoreError,
)

# What the pipeline wraps around a source's own format, outermost first.
PIPELINE_LAYERS = ["age", "zstd"]


class PlaintextSource(Protocol):
    """What a source kind hands the pipeline: a stream of plaintext bytes for one copy."""

    kind: str
    # The plaintext's own format, outermost first (e.g. ["tar"]); the pipeline adds zstd and age.
    layers: list[str]

    def open(self) -> AbstractContextManager[Readable]:
        """Stream the plaintext. Raise ``SourceError`` if it cannot be read completely, also on
        exit (a producer's exit status is only known then): that aborts the copy."""
        ...

    def metadata(self) -> dict[str, Any]:
        """Source-specific facts for the manifest, valid after ``open()`` exited cleanly."""
        ...

    def tool_versions(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class CompressionSettings:
    """zstd's level and worker threads."""

    level: int = 3
    threads: int = 2


def write_copy(
    store: ObjectStore,
    source: PlaintextSource,
    *,
    source_name: str,
    partition: str,
    recipients: Recipients,
    compression: CompressionSettings,
    progress: ProgressCallback | None = None,
    signer: Signer | None = None,
    month_key: str | None = None,
) -> Manifest:
    """Back up one partition of a source as a new copy; return its committed manifest (signed
    with ``signer``, if given).

    A re-run of a partition makes a new copy beside the existing ones; it never replaces one.
    """
    started = utcnow()
    copy_id = new_copy_id(source_name, started)
    layers = [*PIPELINE_LAYERS, *source.layers]
    key = data_key(source_name, copy_id, ".".join(reversed(layers)).replace("zstd", "zst"))
    lock = store.default_lock.lock_from(started) if store.default_lock else None
    # The installed versions (importlib.metadata, about 5 ms) are looked up while the stream
    # runs, not after it.
    versions = threading.Thread(target=_engine_versions, name="engine-versions", daemon=True)
    versions.start()
    written = encrypt_to_store(
        store, key, source.open, recipients, compression, lock=lock, progress=progress
    )
    versions.join()
    manifest = Manifest(
        id=copy_id,
        source=source_name,
        kind=source.kind,
        partition=partition,
        store=store.name,
        data_key=key,
        layers=layers,
        started_at=started.isoformat(),
        finished_at=utcnow().isoformat(),
        plaintext=written.plaintext,
        stored=written.stored,
        compression={
            "algorithm": "zstd",
            "level": compression.level,
            "threads": compression.threads,
        },
        encryption={
            "algorithm": "age-x25519",
            "recipients": list(recipients.public_keys),
            # The month's data key (engine/datakeys.py) the recipients belong to, if any.
            **({"data_key": month_key} if month_key else {}),
        },
        tools={**_engine_versions(), **source.tool_versions()},
        host=socket.gethostname(),
        source_metadata=source.metadata(),
        lock=lock_summary(lock),
        part=getattr(source, "part", ""),
        data_version=written.version_id,
    )
    if signer is not None:
        manifest = signer.sign_manifest(manifest)
    committed = manifest_key(source_name, copy_id)
    try:
        store.put_bytes(committed, manifest.to_json(), lock=lock)
    except BaseException:
        # An interrupt can land after the manifest was published (while the store syncs its
        # folder): then the copy exists, and its data must stay.
        with suppress(StoreError):
            if store.exists(committed):
                raise
        _discard_uncommitted(store, key)
        raise
    return manifest


def encrypt_to_store(
    store: ObjectStore,
    key: str,
    open_plaintext: Callable[[], AbstractContextManager[Readable]],
    recipients: Recipients,
    compression: CompressionSettings,
    *,
    lock: ObjectLock | None = None,
    progress: ProgressCallback | None = None,
) -> Written:
    """Stream plaintext through zstd and age into a new object ``key``; return the plaintext and
    stored digests and the version written. The object is published only if everything, the
    source included, succeeded."""
    compressor = zstandard.ZstdCompressor(
        level=compression.level, threads=compression.threads, write_checksum=True
    )
    keep_freed_buffers()  # every chunk read and compressed is a fresh buffer of up to 1 MiB
    with store.open_write(key, lock=lock) as sink:
        stored = HashingWriter(sink)
        # The source closes (and reports a failed producer) before the store commits.
        with open_plaintext() as plain_stream:
            plain = HashingReader(plain_stream, progress)
            _OverlappedEncryption(compressor, stored, recipients).run(plain)
    return Written(
        Digest(plain.hexdigest(), plain.bytes),
        Digest(stored.hexdigest(), stored.bytes),
        written_version(sink),
    )


@dataclass(frozen=True)
class Written:
    """What a stream written to a store was: both digests and the version made."""

    plaintext: Digest
    stored: Digest
    # The store's version id of the new object, on a versioned store.
    version_id: str | None = None


class _Stopped(Exception):
    """Another stage failed or the run was interrupted: this stage ends quietly."""


class _OverlappedEncryption:
    """Read, compress and encrypt at once: the calling thread reads and hashes the plaintext
    while one thread compresses (zstd releases the interpreter lock, and uses its own worker
    threads) and another encrypts, writes and hashes the stored bytes. Bounded queues between
    the stages hold at most a few chunks each, so memory stays flat whatever the input.

    An interrupt (Ctrl-C) or a failure in any stage stops the others; the caller gets the first
    error as it was raised (a ``SourceError`` stays one, Ctrl-C stays ``KeyboardInterrupt``):
    the encryption runs off the main thread, where no interrupt can reach it and be reported
    as an encryption failure."""

    DEPTH = 4  # chunks in flight between two stages

    def __init__(self, compressor: zstandard.ZstdCompressor, stored: Writable, recipients):
        self._compressor = compressor
        self._stored = stored
        self._recipients = recipients
        self._stop = threading.Event()
        self._errors: list[BaseException] = []
        self._raw: queue.Queue[bytes | None] = queue.Queue(self.DEPTH)
        self._packed: queue.Queue[bytes | None] = queue.Queue(self.DEPTH)

    def run(self, plain: Readable) -> None:
        # Daemons: a stage that an interrupt left behind can never hold the process's exit.
        stages = [
            threading.Thread(
                target=self._stage, args=(self._compress,), name="backup-zstd", daemon=True
            ),
            threading.Thread(
                target=self._stage, args=(self._encrypt,), name="backup-age", daemon=True
            ),
        ]
        try:
            # Inside the try: Ctrl-C while a stage starts stops the one already running.
            for stage in stages:
                stage.start()
            try:
                while chunk := plain.read(CHUNK_SIZE):
                    self._put(self._raw, chunk)
                self._put(self._raw, None)
            except _Stopped:
                pass  # a stage failed; its error is raised below
            for stage in stages:
                stage.join()
        except BaseException:
            self._stop.set()
            for stage in stages:
                if stage.ident is not None:
                    stage.join()
            raise
        if self._errors:
            raise self._errors[0]

    def _stage(self, work: Callable[[], None]) -> None:
        try:
            work()
        except _Stopped:
            pass
        except BaseException as exc:
            if not self._stop.is_set():
                self._errors.append(exc)
            self._stop.set()

    def _put(self, channel: queue.Queue, item: bytes | None) -> None:
        while not self._stop.is_set():
            try:
                channel.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _get(self, channel: queue.Queue) -> bytes | None:
        while not self._stop.is_set():
            try:
                return channel.get(timeout=0.1)
            except queue.Empty:
                continue
        raise _Stopped

    def _compress(self) -> None:
        # A reader, not compressobj: with worker threads, compressobj hands out whole jobs (up
        # to 20 MB at once); a reader gives at most what is asked for.
        packer = self._compressor.stream_reader(
            ChunkReader(iter(lambda: self._get(self._raw), None)), read_size=CHUNK_SIZE
        )
        try:
            while packed := packer.read(CHUNK_SIZE):
                self._put(self._packed, packed)
        except zstandard.ZstdError as exc:
            raise SparkBackupError(f"zstd compression failed: {exc}") from None
        self._put(self._packed, None)

    def _encrypt(self) -> None:
        from spark_backup.engine.age_encrypt import AgeEncryptor  # cryptography: backups only

        try:
            encryptor = AgeEncryptor(self._stored, self._recipients.public_keys)
        except ValueError as exc:  # the plan's recipients were checked: this is a defect
            raise CryptoError(f"age encryption failed: {exc}") from None
        while (packed := self._get(self._packed)) is not None:
            encryptor.write(packed)
        encryptor.close()


def _discard_uncommitted(store: ObjectStore, key: str) -> None:
    """Best effort: a data object without a manifest is invisible anyway, and a locked one stays
    until its lock ends; ``prune`` removes what is left."""
    with suppress(ObjectLockedError, StoreError):
        store.delete(key)


@contextmanager
def open_copy(
    store: ObjectStore,
    manifest: Manifest,
    identities: list[x25519.Identity],
    progress: ProgressCallback | None = None,
    worker: AgeWorker | None = None,
) -> Iterator[Readable]:
    """Stream a copy's plaintext. On exit, having read the copy to its end, compare the stored
    and plaintext sha256 and sizes with the manifest: ``IntegrityError`` on any difference,
    ``CryptoError`` if no identity opens it. Callers must not publish what they read before the
    block has exited cleanly. ``worker``: see ``open_encrypted``."""
    if data_key := manifest.encryption.get("data_key"):
        from spark_backup.engine.datakeys import unwrap  # personal data's copies alone

        identities = unwrap(store, manifest.source, manifest.id, data_key, identities)
        if worker is not None and worker.identities is not None:
            # A resident worker holds the plan's identities: the month's key needs one of its
            # own (a worker still waiting for its identities gets the month's).
            worker = None
    _require_matching_identity(manifest, identities)
    with open_encrypted(
        store,
        manifest.data_key,
        identities,
        f"copy {manifest.id}",
        progress,
        worker,
        version_id=manifest.data_version,
    ) as opened:
        yield opened.plaintext
    assert opened.stored is not None  # set when the block exits cleanly
    compare_digest(manifest, "stored", opened.stored.sha256, opened.stored.bytes)
    compare_digest(manifest, "plaintext", opened.plaintext.hexdigest(), opened.plaintext.bytes)


class WorkerPlaintext(CountingReader):
    """The plaintext the age worker writes: counted here as it is read (with ``progress``),
    hashed by the worker as it writes it (``hexdigest`` is the worker's, once it has finished);
    ``open_encrypted`` checks that both counts agree."""

    def __init__(self, inner: Readable, progress: ProgressCallback | None = None):
        super().__init__(inner, progress)
        self.sha256: str | None = None

    def hexdigest(self) -> str:
        if self.sha256 is None:
            raise RuntimeError("the plaintext digest is known once the decryption has finished")
        return self.sha256


@dataclass
class Decrypted:
    """An object being decrypted: its plaintext stream, and once the block exits cleanly, the
    digest of the stored bytes that were read."""

    plaintext: WorkerPlaintext
    stored: Digest | None = None


@contextmanager
def open_encrypted(
    store: ObjectStore,
    key: str,
    identities: list[x25519.Identity],
    label: str,
    progress: ProgressCallback | None = None,
    worker: AgeWorker | None = None,
    *,
    version_id: str | None = None,
) -> Iterator[Decrypted]:
    """Stream an object's plaintext (age, then zstd, undone). On a clean exit the object was read
    to its end, age authenticated every chunk and zstd checked its frame checksums; ``label``
    names the object in errors.

    Decryption, decompression and both digests run in an ``age_worker`` process, on another
    core: ``worker``, one that serves many objects in turn (a deep verify of many copies) or
    one started ahead without identities (given ``identities`` here), else one started for
    this object alone. This process only reads the plaintext from a pipe and
    counts it: one thread, like the last command of ``age -d | zstd -d | tar -x`` (a
    decompressing thread here contended with the consumer for the interpreter lock, and on a
    busy machine doubled a restore's wall time); the count must agree with the worker's."""
    # Every read of the plaintext pipe is a fresh buffer of 1 MiB: without this, glibc hands
    # each back to the kernel, and the next read faults in zeroed pages (3,100 page faults in
    # a restore of the 20,000-file tree, 160 MB).
    keep_freed_buffers()
    with ExitStack() as stack:
        if worker is None:
            worker = stack.enter_context(AgeWorker(identities))
        elif worker.identities is None:
            worker.provide(identities)
        raw = stack.enter_context(store.open_read(key, version_id))
        decryption = stack.enter_context(worker.decrypting(raw, zstd=True))
        plain = WorkerPlaintext(decryption.plaintext, progress)
        opened = Decrypted(plain)
        try:
            yield opened
            plain.drain()
        except BaseException as exc:
            status = decryption.finish()
            if not isinstance(exc, Exception):
                raise  # an interrupt is reported as such, whatever the worker made of it
            # A failed decryption explains whatever the consumer then tripped over.
            _raise_decrypt_failure(label, status)
            raise
        status = decryption.finish()
        _raise_decrypt_failure(label, status)
        if status["plaintext_bytes"] != plain.bytes:
            raise IntegrityError(
                f"{label}: {plain.bytes} bytes of plaintext were read, but the age worker wrote "
                f"{status['plaintext_bytes']}"
            )
        plain.sha256 = status["plaintext_sha256"]
        opened.stored = Digest(status["sha256"], status["bytes"])


def _require_matching_identity(manifest: Manifest, identities: list[x25519.Identity]) -> None:
    """Say at once when no identity belongs to the copy's recipients, before reading anything:
    age itself cannot tell a wrong key from a damaged header."""
    recipients = set(manifest.encryption.get("recipients", []))
    if not {str(identity.to_public()) for identity in identities} & recipients:
        shown = ", ".join(f"{key[:12]}..." for key in sorted(recipients))
        raise CryptoError(
            f"copy {manifest.id}: none of the given age identities opens it (it is encrypted to {shown})"
        )


def _raise_decrypt_failure(label: str, status: dict[str, Any]) -> None:
    if status.get("ok") or status.get("error") == "reader_gone":
        return  # decrypted fine, or stopped because the reader stopped: its error is the one
    if not status:
        raise SparkBackupError(f"{label}: the age worker process failed")
    if status.get("error") == "zstd":
        raise IntegrityError(f"{label}: zstd stream is damaged: {status.get('detail')}")
    # Copies check the identity against their recipients first, so for them this means damage.
    raise IntegrityError(
        f"{label}: age could not authenticate the stored bytes near byte "
        f"{status.get('bytes')}: damaged, or encrypted to another key ({status.get('detail')})"
    )


def compare_digest(manifest: Manifest, layer: str, sha256: str, size: int) -> None:
    expected: Digest = getattr(manifest, layer)
    if size != expected.bytes or sha256 != expected.sha256:
        raise IntegrityError(
            f"copy {manifest.id}: {layer} bytes do not match the manifest "
            f"(sha256 {sha256[:16]}..., {size} bytes; manifest says "
            f"{expected.sha256[:16]}..., {expected.bytes} bytes)"
        )


@dataclass(frozen=True)
class Verification:
    """What verifying one copy read, and how long it took."""

    copy_id: str
    deep: bool
    bytes_read: int
    seconds: float


def verify_copy(
    store: ObjectStore, manifest: Manifest, progress: ProgressCallback | None = None
) -> Verification:
    """Re-read a copy's stored bytes and compare their sha256 and size with the manifest; no key
    is needed. (A deep verify decrypts with ``open_copy`` and checks the plaintext as well.)
    Raises ``IntegrityError``, ``NotFoundError`` or ``StoreError``."""
    started = utcnow()
    with store.open_read(manifest.data_key, manifest.data_version) as raw:
        stored = HashingReader(raw, progress)
        stored.drain()
    compare_digest(manifest, "stored", stored.hexdigest(), stored.bytes)
    return Verification(manifest.id, False, stored.bytes, (utcnow() - started).total_seconds())


@functools.cache
def _engine_versions() -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "zstd": ".".join(map(str, zstandard.ZSTD_VERSION)),
    }
    for package in ("spark-backup", "zstandard", "pyrage", "cryptography"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return versions


def lock_summary(lock: ObjectLock | None) -> dict[str, str] | None:
    return {"mode": lock.mode, "retain_until": lock.retain_until.isoformat()} if lock else None
