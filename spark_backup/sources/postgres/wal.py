"""Continuous WAL archiving: ``wal-push`` for ``archive_command``, ``wal-fetch`` for
``restore_command``.

Each WAL file (segments, timeline history files, backup history files) becomes one object
``<source>/wal/<file name>-<sha256 of its content>.zst.age``, through the same zstd and age
layers as every copy and under the store's Object Lock. The content hash in the key makes a
push idempotent without a separate index (as pgBackRest does): pushing a file that is already
archived with the same content succeeds, with different content fails loudly and replaces
nothing. A WAL object needs no manifest: its name, its hash and age's authentication are its
own proof against damage, and ``age -d | zstd -d`` gives back the file. Against forgery (anyone
with the public recipient can encrypt) each object has a signed sidecar ``<key>.sig``
(``engine/signing.py``), written after the object; ``wal-fetch`` refuses an object whose
sidecar does not check, so recovery stops rather than replaying it.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pyrage import x25519

from spark_backup.engine.crypto import Recipients
from spark_backup.engine.manifest import SOURCE_NAME
from spark_backup.engine.pipeline import CompressionSettings, encrypt_to_store, open_encrypted
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

WAL_FOLDER = "wal"
_WAL_NAME = r"[0-9A-F]{24}(?:\.partial|\.[0-9A-F]{8}\.backup)?|[0-9A-F]{8}\.history"
WAL_NAME_RE = re.compile(rf"^(?:{_WAL_NAME})$")
_WAL_KEY_RE = re.compile(
    rf"^(?P<source>{SOURCE_NAME})/{WAL_FOLDER}/(?P<name>{_WAL_NAME})"
    r"-(?P<sha256>[0-9a-f]{64})\.zst\.age$"
)
PARTIAL_SUFFIX = ".spark-backup-partial"


class WalNotArchived(NotFoundError):
    """The archive does not hold the WAL file asked for: the one answer that lets PostgreSQL
    end recovery (restore_command's exit 1)."""


def wal_prefix(source: str) -> str:
    return f"{source}/{WAL_FOLDER}/"


def wal_key(source: str, name: str, sha256: str) -> str:
    return f"{wal_prefix(source)}{name}-{sha256}.zst.age"


def is_wal_key(key: str) -> bool:
    """A WAL object's key, or its signature sidecar's."""
    return _WAL_KEY_RE.match(key.removesuffix(SIGNATURE_SUFFIX)) is not None


def signature_key(key: str) -> str:
    return key + SIGNATURE_SUFFIX


@dataclass(frozen=True)
class ArchivedWal:
    name: str
    sha256: str
    key: str
    modified: dt.datetime
    size: int

    @property
    def is_segment(self) -> bool:
        return len(self.name) == 24

    @property
    def timeline(self) -> int:
        return int(self.name[:8], 16)

    @property
    def position(self) -> str:
        """Log and segment number: the part of the name that orders segments across timelines."""
        return self.name[8:24]


def archived_wal(store: ObjectStore, source: str, name: str | None = None) -> list[ArchivedWal]:
    """Archived WAL files of a source (or the versions of one file name), in name order."""
    prefix = wal_prefix(source) + (f"{name}-" if name else "")
    found = []
    for info in store.list(prefix):
        match = _WAL_KEY_RE.match(info.key)
        if match and match["source"] == source:
            found.append(
                ArchivedWal(match["name"], match["sha256"], info.key, info.modified, info.size)
            )
    return found


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
) -> str:
    """Archive one WAL file (and its signature, with ``signer``); return ``archived`` or
    ``already archived``. ``IntegrityError`` if the name is archived with other content
    (PostgreSQL then retries, and keeps the file)."""
    name = check_wal_name(path.name)
    sha256 = _file_sha256(path)
    key = wal_key(source, name, sha256)
    existing = archived_wal(store, source, name)
    if any(entry.sha256 == sha256 for entry in existing):
        # A push killed between object and signature is completed by PostgreSQL's retry.
        _sign(store, key, signer, lock)
        return "already archived"
    if existing:
        raise IntegrityError(
            f"WAL file {name} is already archived for source {source!r} with other content "
            f"(sha256 {existing[0].sha256[:16]}..., this one {sha256[:16]}...): refusing to "
            "archive a second version; is another cluster archiving into this source?"
        )
    try:
        plaintext = encrypt_to_store(
            store, key, lambda: _open_file(path), recipients, compression, lock=lock
        ).plaintext
    except StoreError:
        if store.exists(key):
            _sign(store, key, signer, lock)
            return "already archived"  # a concurrent push of the same content won the race
        raise
    if plaintext.sha256 != sha256:
        with suppress(StoreError):
            store.delete(key)
        raise IntegrityError(f"WAL file {path} changed while it was being archived")
    _sign(store, key, signer, lock)
    return "archived"


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
) -> None:
    """Restore one WAL file to ``destination``, which appears only complete and checked.
    ``WalNotArchived`` if the archive does not hold it; ``SignatureError`` if ``verifier``
    refuses its signature (nothing is written then); ``entry`` (from a listing the caller
    made) saves listing the archive again."""
    check_wal_name(name)
    versions = [entry] if entry else archived_wal(store, source, name)
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
        raise IntegrityError(f"WAL file {name} is archived with {len(versions)} different contents")
    found = versions[0]
    check_wal_signature(store, found, verifier or Verifier())
    partial = destination.with_name(destination.name + PARTIAL_SUFFIX)
    try:
        with (
            _create(partial) as out,
            open_encrypted(store, found.key, identities, f"WAL file {name}") as opened,
        ):
            copy_stream(opened.plaintext, out)
            out.flush()
            os.fsync(out.fileno())
        if opened.plaintext.hexdigest() != found.sha256:
            raise IntegrityError(f"WAL file {name}: content does not match its archived sha256")
        os.replace(partial, destination)
    finally:
        with suppress(FileNotFoundError):
            partial.unlink()


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
