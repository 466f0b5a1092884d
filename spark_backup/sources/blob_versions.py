"""Versions on the content-addressed blob layer (``engine/blobs``), as a kind serves them.

A kind whose copies are versions (the copy's plaintext is a version document, its manifest
names the version's chunk reference list) takes ``BlobVersions`` for the objects its versions
share: verify (every pack present; deep: every chunk decrypted and every file's digest), prune
(mark and sweep of packs no listed version needs), replication (the packs, the reference list,
the document and the manifest, last), and ``restore_version`` for its folder restore. A copy
whose manifest names no reference list (a kind's earlier stream format) shares nothing: it is
left to the archive pipeline, and replicates as its data object and manifest.
"""

from __future__ import annotations

import ctypes
import datetime as dt
import errno
import os
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import replace
from functools import cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyrage import x25519

from spark_backup.engine.blobs.chunks import id_of_chunk_key
from spark_backup.engine.blobs.keys import derive_chunk_key
from spark_backup.engine.blobs.packs import (
    PackCache,
    id_of_index_key,
    id_of_pack_key,
    index_prefix,
)
from spark_backup.engine.blobs.repack import (
    Moves,
    PackMove,
    RepackReport,
    moves_prefix,
    plan_repack,
    read_moves,
    relocate,
    repack,
    resolve_packs,
)
from spark_backup.engine.blobs.sweep import doomed_packs, sweep, sweeps_prefix
from spark_backup.engine.blobs.version import (
    REFS_KEY,
    REFS_SHA256,
    iter_file,
    missing_objects,
    needed_objects,
    parse_version,
    read_refs,
    refs_prefix,
)
from spark_backup.engine.gc_pause import without_cyclic_gc
from spark_backup.engine.manifest import Manifest, manifest_prefix
from spark_backup.engine.pipeline import open_copy
from spark_backup.engine.replication import ReplicaFile, ReplicaVersion, copy_version
from spark_backup.engine.staging import staged_restore
from spark_backup.engine.streams import HashingReader
from spark_backup.errors import IntegrityError, NotFoundError, RestoreRefused, SecretError
from spark_backup.sources.base import (
    CopyRef,
    FolderRestore,
    Replicable,
    Runtime,
    SharedObjects,
)

if TYPE_CHECKING:
    from spark_backup.engine.age_worker import AgeWorker

CHUNKS_PRESENT = "every chunk present"
CHUNKS_DEEP = "every chunk decrypted, file and tensor digests"

# Media types of a version's store objects in an OCI artifact (one layer per object).
PACK_MEDIA_TYPE = "application/vnd.spark-backup.pack.v1+age"
CHUNK_MEDIA_TYPE = "application/vnd.spark-backup.chunk.v1+age"  # first release's layout
REFS_MEDIA_TYPE = "application/vnd.spark-backup.chunk-refs.v1+json+zstd"
MOVE_MEDIA_TYPE = "application/vnd.spark-backup.pack-move.v1+json"


def read_document(
    copy: CopyRef,
    identities: list[x25519.Identity],
    moves: Moves | None = None,
    worker: AgeWorker | None = None,
) -> dict[str, Any]:
    """The copy's version document (small: names and chunk lists, never file contents), each
    chunk located where it lies now (a repack moved it: ``engine/blobs/repack.py``).
    ``worker``: see ``read_committed_document``."""
    document = read_committed_document(copy, identities, worker)
    if moves is None:
        moves = read_moves(copy.store, copy.manifest.source)
    return relocate(document, copy.manifest.id, moves, identities)


def read_committed_document(
    copy: CopyRef, identities: list[x25519.Identity], worker: AgeWorker | None = None
) -> dict[str, Any]:
    """The version document as the backup committed it. ``worker``: an age worker started
    ahead (a restore command starts one while it reads the plan), else one is started here."""
    with open_copy(copy.store, copy.manifest, identities, worker=worker) as plain:
        data = plain.read()
    return parse_version(data, f"version {copy.manifest.id}")


def restore_version(
    copy: CopyRef,
    identities: list[x25519.Identity],
    target: Path,
    options: FolderRestore,
    document: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Every file of the version reassembled from its chunks into staging, each chunk's and
    each file's sha256 checked, published only when all matched. Packs are fetched through
    one cache for the whole restore; the cyclic collector is paused (the document's lists and
    the chunks' references are in no cycle)."""
    with without_cyclic_gc():
        return _restore_version(copy, identities, target, options, document)


def _restore_version(
    copy: CopyRef,
    identities: list[x25519.Identity],
    target: Path,
    options: FolderRestore,
    document: dict[str, Any] | None,
) -> dict[str, Any]:
    # The worker the command started ahead: a second interpreter started here for the
    # document cost the restore about 0.1 s before its first pack.
    document = document or read_document(copy, identities, worker=options.worker)
    label = f"version {copy.manifest.id}"
    files = size = 0
    with (
        PackCache(copy.store, copy.manifest.source, identities) as cache,
        staged_restore(target, options.overwrite) as staging,
    ):
        for entry in document["files"]:
            path = staging / entry["path"]
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            except OSError as exc:
                raise RestoreRefused(
                    f"{label}: cannot restore {entry['path']}: {exc.strerror} (a name twice, "
                    "or a file where a folder must be)"
                ) from None
            try:
                _preallocate(fd, entry["size"])
                for data in iter_file(
                    copy.store, copy.manifest.source, entry, identities, label, cache, fd
                ):
                    if options.progress:
                        options.progress(len(data))
            finally:
                os.close(fd)
            os.chmod(path, entry.get("mode", 0o644) & 0o755)
            files += 1
            size += entry["size"]
    return {
        "target": str(Path(os.path.abspath(target))),
        "files": files,
        "directories": 0,
        "symlinks": 0,
        "bytes": size,
        "version_digest": document["digest"],
        "label": document.get("label"),
    }


_TMPFS_MAGIC = 0x01021994


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _in_memory(fd: int) -> bool:
    """Whether ``fd`` is a file on tmpfs (``fstatfs``; False where it cannot tell)."""
    with suppress(OSError, AttributeError, ValueError):
        found = ctypes.create_string_buffer(256)  # struct statfs, f_type first (a long)
        if _libc().fstatfs(fd, found) == 0:
            return ctypes.c_long.from_buffer(found).value == _TMPFS_MAGIC
    return False


def _preallocate(fd: int, size: int) -> None:
    """The file's blocks reserved before the chunks are written at their offsets (a full disk
    fails here, and the file is not fragmented by writes out of order); its size set where the
    file system reserves nothing, and on tmpfs: there ``posix_fallocate`` allocates and zeroes
    every page before the first write (0.12 s for 500 MB, on one thread while the other core
    waits), pages the writes overwrite at once; without it the reading threads' writes
    allocate them beside each other, and a full tmpfs fails the write."""
    if size:
        if _in_memory(fd):
            os.ftruncate(fd, size)
            return
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            os.ftruncate(fd, size)


class BlobVersions(SharedObjects, Replicable):
    """``SharedObjects`` and ``Replicable`` for a kind whose copies are blob-layer versions."""

    def is_version(self, manifest: Manifest) -> bool:
        """Whether the copy is a blob-layer version (a kind with an earlier stream format
        tells its copies apart); a version's manifest must name its reference list."""
        return True

    def check_version_file(
        self, entry: dict[str, Any], chunks: Iterator[bytes], label: str
    ) -> None:
        """Deep verify of one file: by default its chunks read (each chunk's and the file's
        sha256 checked on the way); a kind checks more (tensors, say)."""
        for _data in chunks:
            pass

    def version_refs(self, copy: CopyRef, moves: Moves | None = None) -> dict[str, int]:
        """The store objects (packs, first-release chunk objects) a version needs now, with
        sizes (its reference list's, with the packs repacks moved its chunks to); nothing for a
        copy that is not a blob-layer version."""
        return self._version_objects(copy, moves)[0]

    def _version_objects(
        self, copy: CopyRef, moves: Moves | None = None
    ) -> tuple[dict[str, int], list[PackMove]]:
        """``version_refs`` and the move records that lead there."""
        committed = self._committed_refs(copy)
        if not committed:
            return {}, []
        if moves is None:
            moves = read_moves(copy.store, copy.manifest.source)
        return resolve_packs(copy.manifest.source, committed, copy.manifest.id, moves)

    def _committed_refs(self, copy: CopyRef) -> dict[str, int]:
        """The version's reference list as its backup committed it."""
        metadata = copy.manifest.source_metadata
        if not self.is_version(copy.manifest):
            return {}
        try:
            return read_refs(
                copy.store,
                copy.manifest.source,
                metadata[REFS_KEY],
                metadata[REFS_SHA256],
                f"version {copy.manifest.id}",
            )
        except KeyError:
            raise IntegrityError(
                f"version {copy.manifest.id}: its manifest names no chunk reference list"
            ) from None
        except NotFoundError:
            raise IntegrityError(
                f"version {copy.manifest.id}: its chunk reference list "
                f"{metadata[REFS_KEY]} is missing from the store"
            ) from None

    def _broken_by(self, runtime: Runtime, copy: CopyRef, missing: list[str]) -> list[str]:
        """Every version of the source that needs one of the ``missing`` objects."""
        broken = []
        moves = read_moves(copy.store, copy.manifest.source)
        for other in runtime.copies(copy.manifest.source):
            try:
                refs = self.version_refs(other, moves)
            except IntegrityError:
                continue
            if refs.keys() & set(missing):
                broken.append(other.manifest.id)
        return broken

    def check_shared(
        self, runtime: Runtime, copy: CopyRef, identities: list[x25519.Identity] | None
    ) -> list[str]:
        if not self.is_version(copy.manifest):
            return []
        moves = read_moves(copy.store, copy.manifest.source)
        refs = self.version_refs(copy, moves)
        missing = missing_objects(copy.store, copy.manifest.source, refs)
        if missing:
            broken = self._broken_by(runtime, copy, missing)
            names = ", ".join(m.removeprefix(f"{copy.manifest.source}/") for m in missing[:3])
            raise IntegrityError(
                f"version {copy.manifest.id}: {len(missing)} pack(s) or chunk(s) missing or "
                f"damaged in the store ({names}); versions broken: {', '.join(broken)}"
            )
        if not identities:
            return [CHUNKS_PRESENT]
        with without_cyclic_gc():
            self._check_chunks(copy, identities, refs, moves)
        return [CHUNKS_PRESENT, CHUNKS_DEEP]

    def _check_chunks(
        self,
        copy: CopyRef,
        identities: list[x25519.Identity],
        refs: dict[str, int],
        moves: Moves,
    ) -> None:
        """Deep verify: every chunk of the version read (through its move records), each file
        checked by the kind."""
        document = read_committed_document(copy, identities)
        label = f"version {copy.manifest.id}"
        if needed_objects(document) != self._committed_refs(copy).keys():
            # Prune trusts the reference list: one that lacks a pack would let it go.
            raise IntegrityError(
                f"{label}: the chunk reference list does not list exactly the version's packs"
            )
        document = relocate(document, copy.manifest.id, moves, identities)
        if not needed_objects(document) <= refs.keys():
            # Prune follows the move records' packs: a chunk moved elsewhere would be lost.
            raise IntegrityError(f"{label}: a moved chunk lies in a pack its move record omits")
        with PackCache(copy.store, copy.manifest.source, identities) as cache:
            for entry in document["files"]:
                self.check_version_file(
                    entry,
                    iter_file(copy.store, copy.manifest.source, entry, identities, label, cache),
                    label,
                )

    def collect(
        self,
        runtime: Runtime,
        source: Any,
        now: dt.datetime,
        grace: dt.timedelta,
        dry_run: bool,
    ) -> list[str]:
        """Mark every pack (and first-release chunk object) a listed version needs (kept or
        locked: every manifest still in the store), sweep the rest; remove reference lists no
        manifest names and indexes whose pack is gone. Deletes nothing when a manifest or a
        reference list cannot be read."""
        store = runtime.store_for(source)
        copies = self._all_listed(runtime, source)
        if copies is None:
            return []  # a manifest that does not read: its packs are unknown, so keep all
        listed = {c.manifest.id for c in copies}
        referenced: set[str] = set()
        named: set[str] = set()
        try:
            moves = read_moves(store, source.name)
            for copy in copies:
                referenced |= self.version_refs(copy, moves).keys()
                if self.is_version(copy.manifest):
                    named.add(copy.manifest.source_metadata[REFS_KEY])
        except IntegrityError:
            return []
        report = sweep(store, source.name, referenced, now, grace, dry_run)
        removed = list(report.deleted)
        # A move record serves the versions listed when it was written; once none is listed,
        # nothing reads it.
        for records in moves.values():
            for record in records:
                if record.versions & listed or store.locked(record.key, now):
                    continue
                removed.append(record.key)
                if not dry_run:
                    store.delete(record.key)
        packs = {id_of_pack_key(i.key) for i in store.list(f"{source.name}/packs/")}
        for info in [*store.list(refs_prefix(source.name)), *store.list(index_prefix(source.name))]:
            if info.modified > now - grace:
                continue
            if info.key in named or id_of_index_key(info.key) in packs:
                continue
            removed.append(info.key)
            if not dry_run:
                store.delete(info.key)
        return removed

    def _all_listed(self, runtime: Runtime, source: Any) -> list[CopyRef] | None:
        """Every committed copy of the source; None when a manifest does not read."""
        store = runtime.store_for(source)
        copies = runtime.copies(source.name)
        keys = [i.key for i in store.list(manifest_prefix(source.name)) if i.key.endswith(".json")]
        return copies if len(keys) == len({c.manifest.id for c in copies}) else None

    def repack(
        self,
        runtime: Runtime,
        source: Any,
        identities: list[x25519.Identity],
        unused: float,
        now: dt.datetime,
        dry_run: bool,
        expiring: frozenset[str] = frozenset(),
    ) -> RepackReport:
        """Rewrite the chunks listed versions need out of packs at least ``unused`` of whose
        bytes no listed version needs (``engine/blobs/repack.py``); the sweep deletes the old
        packs afterwards. Needs the identities (to read the documents and the old packs) and the
        source's chunk key (to index the new packs). Nothing when a manifest does not read.
        ``expiring``: copies this prune deletes (a dry run's are still listed)."""
        store = runtime.store_for(source)
        copies = self._all_listed(runtime, source)
        if copies is None:
            return RepackReport(skipped="a manifest does not read: its chunks are unknown")
        copies = [c for c in copies if c.manifest.id not in expiring]
        versions = [c for c in copies if self.is_version(c.manifest)]
        moves = read_moves(store, source.name)
        documents = [read_document(c, identities, moves) for c in versions]
        doomed = doomed_packs(store, source.name)
        report = plan_repack(store, source.name, documents, unused, doomed, now)
        if not report.candidates:
            return report
        try:
            # A dry run too: it shows what --apply on this host would do.
            secret = runtime.context(source).secrets.resolve_for(
                f"source {source.name!r} chunk_key", self.chunk_key_reference(source)
            )
        except SecretError as exc:
            return RepackReport(locked=report.locked, skipped=f"no chunk key: {exc}")
        if dry_run:
            return report
        lock = store.default_lock.lock_from(now) if store.default_lock else None
        repack(
            store,
            source.name,
            report,
            [c.manifest.id for c in copies],
            identities,
            derive_chunk_key(secret, source.name),
            runtime.recipients(),
            runtime.compression(source).level,
            lock,
            now,
            doomed,
        )
        return report

    def chunk_key_reference(self, source: Any) -> Any:
        """The secret reference of the source's chunk key (its settings' ``chunk_key``)."""
        return source.chunk_key

    def owns_shared_key(self, key: str) -> bool:
        parts = key.split("/")
        return len(parts) >= 3 and (
            (parts[1] == "chunks" and id_of_chunk_key(key) is not None)
            or (parts[1] == "packs" and id_of_pack_key(key) is not None)
            or (parts[1] == "pack-index" and id_of_index_key(key) is not None)
            or key.startswith(
                (refs_prefix(parts[0]), sweeps_prefix(parts[0]), moves_prefix(parts[0]))
            )
        )

    def version_annotations(self, manifest: Manifest) -> dict[str, str]:
        """Annotations of the version's OCI artifact beside the copy's own."""
        return {}

    def replica_version(self, copy: CopyRef) -> ReplicaVersion:
        """Every pack the version needs, its chunk reference list, then its version document
        and manifest (``copy_version``): the manifest last, so a store replica lists a version
        only once it holds everything the version needs, and lists, verifies and restores it as
        the source store does. The objects as stored (encrypted): a replica reveals no more than
        the source store. A pack's id is its sha256, so packs are not read here (the push checks
        each one as it streams it); a first-release chunk object is read and hashed. An object
        missing from the source store fails with the version's name and the version stays
        unreplicated."""
        store, scope, label = copy.store, copy.manifest.source, f"version {copy.manifest.id}"
        base = copy_version(store, copy.manifest)
        if not self.is_version(copy.manifest):
            return base
        refs, records = self._version_objects(copy)
        missing = missing_objects(store, scope, refs)
        if missing:
            raise IntegrityError(
                f"{label}: {missing[0]} is missing from the store (or of another size): "
                "not replicated"
            )
        files = []
        for key, size in sorted(refs.items()):
            pid = id_of_pack_key(key)
            if pid is None:
                files.append(_stored_file(store, key, scope, CHUNK_MEDIA_TYPE, label))
                continue
            name = key.removeprefix(f"{scope}/")
            files.append(
                ReplicaFile(name, pid, size, PACK_MEDIA_TYPE, key, partial(store.open_read, key))
            )
        # A replica restores through the same move records.
        for record in records:
            files.append(_stored_file(store, record.key, scope, MOVE_MEDIA_TYPE, label))
        refs_key = copy.manifest.source_metadata[REFS_KEY]
        files.append(_stored_file(store, refs_key, scope, REFS_MEDIA_TYPE, label))
        annotations = {**base.annotations, **self.version_annotations(copy.manifest)}
        return replace(base, files=(*files, *base.files), annotations=annotations)


def _stored_file(store: Any, key: str, scope: str, media_type: str, label: str) -> ReplicaFile:
    """A store object as a replica file named by its key below the source (unique in the
    version), with the sha256 and size of its bytes as stored."""
    try:
        with store.open_read(key) as raw:
            reader = HashingReader(raw)
            reader.drain()
    except NotFoundError:
        raise IntegrityError(f"{label}: {key} is missing from the store: not replicated") from None
    return ReplicaFile(
        key.removeprefix(f"{scope}/"),
        reader.hexdigest(),
        reader.bytes,
        media_type,
        key,
        partial(store.open_read, key),
    )
