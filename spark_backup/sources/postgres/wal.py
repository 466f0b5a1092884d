"""Continuous WAL archiving: ``wal-push`` for ``archive_command``, ``wal-fetch`` for
``restore_command``.

Each WAL file (segments, timeline history files, backup history files) becomes one object
``<source>/wal/<system identifier>/<file name>-<sha256 of its content>.zst.age``, through the same zstd and age
layers as every copy and under the store's Object Lock. The content hash in the key makes a
push idempotent without a separate index (as pgBackRest does): pushing a file that is already
archived with the same content succeeds, with different content fails loudly and replaces
nothing. A WAL object needs no manifest: its name, its hash and age's authentication are its
own proof against damage, and ``age -d | zstd -d`` gives back the file. Against forgery (anyone
with the public recipient can encrypt) each object has a signed sidecar ``<key>.sig``
(``engine/signing.py``), written after the object; ``wal-fetch`` refuses an object whose
sidecar does not check, so recovery stops rather than replaying it.

The system identifier (``initdb`` draws it; every segment's first page header and
``global/pg_control`` carry it) keeps the WAL of two clusters archiving into one source apart:
each has its own folder, and recovery reads only the folder of its base backup's cluster.
Releases before it wrote ``<source>/wal/<file name>-<sha256>.zst.age``; those keys still list,
fetch and restore, as WAL of whichever cluster asks (a name archived with two contents across
the layouts is refused, as it always was).

A streamed partial segment (``wal-receive``) is ``<segment>.streamed``: unlike every other WAL
file it grows, so it may have several versions; the newest is the one recovery uses, and the
older ones are deleted once a newer one is in the store (unless a lock keeps them).
"""

from __future__ import annotations

import datetime as dt
import os
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pyrage import x25519

from spark_backup.engine.crypto import Recipients
from spark_backup.engine.manifest import SOURCE_NAME
from spark_backup.engine.signing import SIGNATURE_SUFFIX, Signer, Verifier
from spark_backup.engine.stores.base import ObjectLock, ObjectStore
from spark_backup.engine.streams import HashingReader, Readable, copy_stream
from spark_backup.errors import (
    IntegrityError,
    NotFoundError,
    SourceError,
    StoreError,
    UsageError,
)

# The pipeline loads where a WAL file is stored or fetched: listing the archive needs none of it.
if TYPE_CHECKING:
    from spark_backup.engine.age_worker import AgeWorker
    from spark_backup.engine.pipeline import CompressionSettings

WAL_FOLDER = "wal"
_WAL_NAME = r"[0-9A-F]{24}(?:\.partial|\.streamed|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history"
WAL_NAME_RE = re.compile(rf"^(?:{_WAL_NAME})$")
_WAL_KEY_RE = re.compile(
    rf"^(?P<source>{SOURCE_NAME})/{WAL_FOLDER}/(?:(?P<system_identifier>[0-9]{{1,20}})/)?"
    rf"(?P<name>{_WAL_NAME})-(?P<sha256>[0-9a-f]{{64}})\.zst\.age$"
)
PARTIAL_SUFFIX = ".spark-backup-partial"
# pg_receivewal's segment being filled, in the spool; in the store it is ``<segment>.streamed``
# (a ``.partial`` file there is PostgreSQL's own, archived at a promotion: a different thing).
RECEIVING_SUFFIX = ".partial"
STREAMED_PARTIAL = ".streamed"
# The first page of a segment (XLogLongPageHeaderData): magic, info, timeline, page address,
# remaining length, padding, then the system identifier, the segment size and the block size.
_LONG_HEADER = struct.Struct("<HHIQI4xQII")
_XLP_LONG_HEADER = 0x0002


class WalNotArchived(NotFoundError):
    """The archive does not hold the WAL file asked for: the one answer that lets PostgreSQL
    end recovery (restore_command's exit 1)."""


def wal_prefix(source: str) -> str:
    return f"{source}/{WAL_FOLDER}/"


def wal_key(source: str, name: str, sha256: str, system_identifier: str | None) -> str:
    """The key of a WAL file; without a system identifier, the layout of earlier releases."""
    folder = f"{system_identifier}/" if system_identifier else ""
    return f"{wal_prefix(source)}{folder}{name}-{sha256}.zst.age"


def segment_system_identifier(path: Path) -> str | None:
    """The system identifier in a segment's first page header, if the file starts with one."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_LONG_HEADER.size)
    except OSError:
        return None
    if len(head) < _LONG_HEADER.size:
        return None
    _magic, info, timeline, _address, _rem, sysid, seg_size, block = _LONG_HEADER.unpack(head)
    if not info & _XLP_LONG_HEADER or not timeline or not sysid:
        return None
    if not _power_of_two(seg_size, 1 << 20, 1 << 30) or not _power_of_two(block, 1024, 1 << 15):
        return None
    return str(sysid)


def control_file_system_identifier(data_directory: Path) -> str | None:
    """The system identifier in a data directory's ``global/pg_control`` (its first field)."""
    try:
        with open(data_directory / "global" / "pg_control", "rb") as handle:
            head = handle.read(8)
    except OSError:
        return None
    if len(head) < 8 or not (value := struct.unpack("<Q", head)[0]):
        return None
    return str(value)


def wal_file_system_identifier(path: Path) -> str | None:
    """Whose WAL a file is: a segment says so in its header; any other file (history, backup
    history, a segment without a header) takes it from the cluster whose ``pg_wal`` holds it.
    None when neither tells (the file then goes under the layout of earlier releases)."""
    if len(path.name) >= 24 and (found := segment_system_identifier(path)):
        return found
    return control_file_system_identifier(Path(os.path.abspath(path)).parent.parent)


def _segment_size_of(path: Path) -> int:
    with open(path, "rb") as handle:
        head = handle.read(_LONG_HEADER.size)
    if len(head) < _LONG_HEADER.size:
        raise IntegrityError(f"{path.name}: a streamed partial segment without a page header")
    size = _LONG_HEADER.unpack(head)[6]
    if not _power_of_two(size, 1 << 20, 1 << 30):
        raise IntegrityError(f"{path.name}: a streamed partial segment with a bad page header")
    return size


def written_prefix(source: Path, destination: Path, block: int = 8192) -> int:
    """Copy ``source`` (a segment being filled, zeros after what was written) to
    ``destination`` without its zero tail, in whole blocks (a written WAL page is never all
    zeros: it starts with its header); return the bytes copied."""
    with open(source, "rb") as handle:
        end = handle.seek(0, os.SEEK_END) // block * block
        while end > 0:
            handle.seek(end - block)
            if handle.read(block).strip(b"\0"):
                break
            end -= block
        handle.seek(0)
        with open(destination, "wb") as out:
            left = end
            while left > 0:
                chunk = handle.read(min(left, 1 << 20))
                if not chunk:
                    break
                out.write(chunk)
                left -= len(chunk)
    return end


def _power_of_two(value: int, low: int, high: int) -> bool:
    return low <= value <= high and value & (value - 1) == 0


def is_wal_key(key: str) -> bool:
    """A WAL object's key, or its signature sidecar's."""
    return _WAL_KEY_RE.match(key.removesuffix(SIGNATURE_SUFFIX)) is not None


def signature_key(key: str) -> str:
    return key + SIGNATURE_SUFFIX


@dataclass(frozen=True)
class ArchivedWal:
    """A WAL file in the archive, as its key tells it."""

    name: str
    sha256: str
    key: str
    modified: dt.datetime
    size: int
    # None: written by a release before WAL keys carried it.
    system_identifier: str | None = None

    @property
    def is_segment(self) -> bool:
        return len(self.name) == 24

    @property
    def is_partial(self) -> bool:
        return self.name.endswith(STREAMED_PARTIAL)

    @property
    def timeline(self) -> int:
        return int(self.name[:8], 16)

    @property
    def position(self) -> str:
        """Log and segment number: the part of the name that orders segments across timelines."""
        return self.name[8:24]


def archived_wal(
    store: ObjectStore,
    source: str,
    name: str | None = None,
    system_identifier: str | None = None,
) -> list[ArchivedWal]:
    """Archived WAL files of a source (or the versions of one file name), in name order: of
    the cluster ``system_identifier`` and those written without one by earlier releases, or,
    without ``system_identifier``, of every cluster."""
    base = wal_prefix(source)
    if not name:
        prefixes = [base]
    else:
        if system_identifier:
            folders = [system_identifier]
        else:
            folders = [folder for folder in store.list_folders(base) if folder.isdigit()]
        prefixes = [f"{base}{name}-", *(f"{base}{folder}/{name}-" for folder in folders)]
    found = []
    for prefix in prefixes:
        for info in store.list(prefix):
            match = _WAL_KEY_RE.match(info.key)
            if not match or match["source"] != source:
                continue
            owner = match["system_identifier"]
            if system_identifier and owner not in (None, system_identifier):
                continue
            found.append(
                ArchivedWal(
                    match["name"], match["sha256"], info.key, info.modified, info.size, owner
                )
            )
    unique = {entry.key: entry for entry in found}
    return sorted(unique.values(), key=lambda entry: (entry.name, entry.key))


def check_wal_name(name: str) -> str:
    if not WAL_NAME_RE.match(name):
        raise UsageError(
            f"{name!r} is not a WAL file name (a segment such as 000000010000000000000003, a "
            "NNNNNNNN.history or a .backup file)"
        )
    return name


def push_wal(
    store: ObjectStore,
    source: str,
    path: Path,
    recipients: Recipients,
    compression: CompressionSettings,
    lock: ObjectLock | None,
    signer: Signer | None = None,
    system_identifier: str | None = None,
    digest: WalDigest | None = None,
) -> str:
    """Archive one WAL file (and its signature, with ``signer``); return ``archived`` or
    ``already archived``. ``IntegrityError`` if the name is archived with other content
    (PostgreSQL then retries, and keeps the file). The key carries the cluster's system
    identifier: ``system_identifier``, else the one the file (or its ``pg_wal``) tells.
    ``digest``: the file's sha256, started earlier (else it is computed here)."""
    name = check_wal_name(path.name)
    if name.endswith(STREAMED_PARTIAL):
        raise UsageError(f"{name}: a partial segment is archived by wal-receive, not wal-push")
    sysid = system_identifier or wal_file_system_identifier(path)
    sha256 = (digest or WalDigest(path)).result()
    key = wal_key(source, name, sha256, sysid)
    existing = archived_wal(store, source, name, sysid)
    if same := next((entry for entry in existing if entry.sha256 == sha256), None):
        # A push killed between object and signature is completed by PostgreSQL's retry.
        _sign(store, same.key, signer, lock)
        return "already archived"
    if existing:
        raise IntegrityError(
            f"WAL file {name} is already archived for source {source!r} with other content "
            f"(sha256 {existing[0].sha256[:16]}..., this one {sha256[:16]}...): refusing to "
            "archive a second version; is another cluster archiving into this source?"
        )
    _upload(store, key, path, sha256, recipients, compression, lock, signer)
    return "archived"


def push_partial(
    store: ObjectStore,
    source: str,
    snapshot: Path,
    name: str,
    system_identifier: str,
    recipients: Recipients,
    compression: CompressionSettings,
    lock: ObjectLock | None,
    signer: Signer | None = None,
) -> str | None:
    """Archive a snapshot (a copy that no longer changes) of a streamed partial segment as a
    new version of ``name`` (``<segment>.streamed``); then delete the versions it supersedes
    that no lock keeps. Returns the new version's key, None if that content was archived."""
    check_wal_name(name)
    sha256 = _file_sha256(snapshot)
    older = archived_wal(store, source, name, system_identifier)
    if any(entry.sha256 == sha256 for entry in older):
        return None
    key = wal_key(source, name, sha256, system_identifier)
    _upload(store, key, snapshot, sha256, recipients, compression, lock, signer)
    now = dt.datetime.now(dt.UTC)
    for entry in older:
        if entry.system_identifier == system_identifier and not store.locked(entry.key, now):
            with suppress(StoreError):
                store.delete(entry.key)
                if store.exists(signature_key(entry.key)):
                    store.delete(signature_key(entry.key))
    return key


def _upload(
    store: ObjectStore,
    key: str,
    path: Path,
    sha256: str,
    recipients: Recipients,
    compression: CompressionSettings,
    lock: ObjectLock | None,
    signer: Signer | None,
) -> None:
    """The object (then its signature) under ``key``, durable when this returns."""
    from spark_backup.engine.pipeline import encrypt_to_store

    try:
        plaintext = encrypt_to_store(
            store, key, lambda: _open_file(path), recipients, compression, lock=lock
        ).plaintext
    except StoreError:
        if store.exists(key):
            _sign(store, key, signer, lock)
            return  # a concurrent push of the same content won the race
        raise
    if plaintext.sha256 != sha256:
        with suppress(StoreError):
            store.delete(key)
        raise IntegrityError(f"WAL file {path} changed while it was being archived")
    _sign(store, key, signer, lock)


def _sign(store: ObjectStore, key: str, signer: Signer | None, lock: ObjectLock | None) -> None:
    if signer is None or store.exists(signature_key(key)):
        return
    try:
        store.put_bytes(signature_key(key), signer.sign_wal(key), lock=lock)
    except StoreError:
        if not store.exists(signature_key(key)):  # else a concurrent push signed it
            raise


def check_wal_signature(store: ObjectStore, entry: ArchivedWal, verifier: Verifier) -> str:
    """The verdict on an archived WAL object's signature; ``SignatureError`` if refused."""
    if not verifier.enabled:
        return "not checked"
    try:
        sidecar: bytes | None = store.get_bytes(signature_key(entry.key))
    except NotFoundError:
        sidecar = None
    return verifier.check_wal(entry.key, sidecar, entry.modified, store.object_uri(entry.key))


def fetch_wal(
    store: ObjectStore,
    source: str,
    name: str,
    destination: Path,
    identities: list[x25519.Identity],
    entry: ArchivedWal | None = None,
    verifier: Verifier | None = None,
    system_identifier: str | None = None,
    worker: AgeWorker | None = None,
) -> None:
    """Restore one WAL file to ``destination``, which appears only complete and checked.
    ``WalNotArchived`` if the archive does not hold it; ``SignatureError`` if ``verifier``
    refuses its signature (nothing is written then); ``entry`` (from a listing the caller
    made) saves listing the archive again. The file is that of cluster ``system_identifier``
    (else of the cluster whose ``pg_wal`` ``destination`` is in, when it tells), or one
    archived without an identifier by an earlier release. ``worker``: a decrypting process
    that serves many files in turn (else one is started for this file)."""
    from spark_backup.engine.pipeline import open_encrypted

    check_wal_name(name)
    if system_identifier is None and entry is None:
        system_identifier = control_file_system_identifier(
            Path(os.path.abspath(destination)).parent.parent
        )
    versions = [entry] if entry else archived_wal(store, source, name, system_identifier)
    if name.endswith(STREAMED_PARTIAL) and versions:
        versions = [newest_version(versions)]
    if not versions:
        if not archived_wal(store, source):
            # An archive with no WAL at all is a store that is not there (an unmounted disk,
            # a wrong bucket): that must abort recovery, not end it.
            raise StoreError(
                f"the WAL archive of source {source!r} in store {store.name!r} holds no WAL at "
                "all; is the store reachable and the plan right?"
            )
        raise WalNotArchived(f"WAL file {name} is not in the archive of source {source!r}")
    if len(versions) > 1:
        owners = sorted({v.system_identifier or "none (an earlier release)" for v in versions})
        raise IntegrityError(
            f"WAL file {name} is archived with {len(versions)} different contents (system "
            f"identifiers: {', '.join(owners)})"
        )
    found = versions[0]
    check_wal_signature(store, found, verifier or Verifier())
    partial = destination.with_name(destination.name + PARTIAL_SUFFIX)
    try:
        with (
            _create(partial) as out,
            open_encrypted(
                store, found.key, identities, f"WAL file {name}", worker=worker
            ) as opened,
        ):
            copy_stream(opened.plaintext, out)
            if found.is_partial:
                # Stored without the zeros pg_receivewal fills the rest of the segment with:
                # PostgreSQL reads only whole-size segments.
                out.truncate(_segment_size_of(partial))
            out.flush()
            os.fsync(out.fileno())
        if opened.plaintext.hexdigest() != found.sha256:
            raise IntegrityError(f"WAL file {name}: content does not match its archived sha256")
        os.replace(partial, destination)
    finally:
        with suppress(FileNotFoundError):
            partial.unlink()


def newest_version(entries: list[ArchivedWal]) -> ArchivedWal:
    """Of the versions of a streamed partial segment, the newest: the last stored, and of two
    stored in the same second, the longer (a partial segment only grows)."""
    return max(entries, key=lambda entry: (entry.modified, entry.size))


def newest_segment(entries: list[ArchivedWal]) -> ArchivedWal | None:
    """The segment archived last (by store time), ignoring history and backup files."""
    segments = [entry for entry in entries if entry.is_segment]
    return max(segments, key=lambda entry: (entry.modified, entry.name), default=None)


def expendable_wal(entries: list[ArchivedWal], oldest_needed_segment: str) -> list[ArchivedWal]:
    """WAL files older than the oldest base backup still kept needs: no recovery can use them.
    Timeline history files are always kept (they are tiny, and recovery reads them all)."""
    limit = oldest_needed_segment[8:24]
    return [
        entry for entry in entries if not entry.name.endswith(".history") and entry.position < limit
    ]


class WalDigest:
    """A WAL file's sha256, computed in a thread of its own from the moment this is made:
    ``wal-push`` starts it before it reads the plan, so that the two overlap (reading and
    hashlib release the interpreter lock). The file is read and hashed again as it is stored,
    and the two digests must agree."""

    def __init__(self, path: Path):
        self._outcome: str | BaseException | None = None
        self._thread = threading.Thread(
            target=self._compute, args=(path,), name="wal-sha256", daemon=True
        )
        self._thread.start()

    def _compute(self, path: Path) -> None:
        try:
            self._outcome = _file_sha256(path)
        except BaseException as exc:  # raised in the caller's thread, by result()
            self._outcome = exc

    def result(self) -> str:
        self._thread.join()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome


def _file_sha256(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            reader = HashingReader(handle)
            reader.drain()
    except FileNotFoundError:
        raise NotFoundError(f"WAL file {path} does not exist") from None
    except OSError as exc:
        raise SourceError(f"cannot read WAL file {path}: {exc.strerror}") from None
    return reader.hexdigest()


@contextmanager
def _create(path: Path) -> Iterator[BinaryIO]:
    try:
        handle = open(path, "wb")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise SourceError(f"cannot write {path}: {exc.strerror}") from None
    with handle:
        yield handle


@contextmanager
def _open_file(path: Path) -> Iterator[Readable]:
    with open(path, "rb") as handle:
        yield handle
