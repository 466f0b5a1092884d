"""What every store offers the engine: create-only objects, streamed in and out.

Keys are relative, '/'-separated and never contain '..'; a store maps them under its own root
or prefix. Writes are all-or-nothing: ``open_write`` publishes the object only when its block
exits cleanly and leaves nothing visible (no file, no multipart parts) when it raises. Objects
are never overwritten, which is what lets a manifest's checksums stay true.
"""

from __future__ import annotations

import datetime as dt
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass

from spark_backup.engine.streams import Readable, Writable
from spark_backup.errors import NotFoundError, StoreError

_KEY_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


@dataclass(frozen=True)
class ObjectInfo:
    """An object as a store lists it."""

    key: str
    size: int
    modified: dt.datetime
    # The version this is, on a versioned store (S3 with Object Lock); None elsewhere.
    version_id: str | None = None


@dataclass(frozen=True)
class ObjectVersion:
    """One entry of a key's history on a versioned store: a data version or a delete marker."""

    key: str
    version_id: str
    latest: bool
    delete_marker: bool
    size: int
    modified: dt.datetime


def original_version(history: list[ObjectVersion]) -> ObjectVersion | None:
    """The first data version of a key (``history`` newest first, as S3 lists it): on a
    create-only store, the one spark-backup wrote; anything above it came later."""
    data = [version for version in history if not version.delete_marker]
    return data[-1] if data else None


def stacked_on(history: list[ObjectVersion], version_id: str | None, what: str) -> list[str]:
    """What was put over ``version_id`` (the version written) in a key's history: each other
    data version and each delete marker, named. Objects are create-only, so any is tampering."""
    problems = []
    if version_id is not None and not any(
        v.version_id == version_id and not v.delete_marker for v in history
    ):
        problems.append(f"{what}: recorded version {version_id} is gone")
    for version in history:
        if version.version_id == version_id:
            continue
        if version.delete_marker:
            problems.append(
                f"{what}: delete marker {version.version_id} of "
                f"{version.modified.isoformat()} hides the recorded version"
            )
        else:
            problems.append(
                f"{what}: version {version.version_id} of {version.modified.isoformat()} "
                f"({version.size} bytes) is stacked on the recorded version"
            )
    return problems


@dataclass(frozen=True)
class ObjectLock:
    """WORM retention on one object: it cannot be deleted or changed before ``retain_until``."""

    mode: str
    retain_until: dt.datetime

    def active(self, now: dt.datetime | None = None) -> bool:
        return self.retain_until > (now or dt.datetime.now(dt.UTC))


def check_key(key: str) -> str:
    if not _KEY_RE.match(key) or any(part in (".", "..") for part in key.split("/")):
        raise StoreError(f"invalid object key {key!r}")
    return key


def check_folder(prefix: str) -> str:
    """A folder prefix: "" (the store's root) or a valid key followed by "/"."""
    if prefix and not (prefix.endswith("/") and check_key(prefix[:-1])):
        raise StoreError(f"invalid folder {prefix!r} (a folder ends in '/')")
    return prefix


class ObjectStore(ABC):
    """A place that holds copies. Implementations: ``LocalStore``, ``S3Store``."""

    name: str

    @property
    @abstractmethod
    def uri(self) -> str:
        """Where the store is, for people (``file:///...``, ``s3://bucket/prefix``)."""

    @abstractmethod
    def object_uri(self, key: str) -> str: ...

    @property
    def default_lock(self) -> ObjectLockPolicy | None:
        """The Object Lock the store applies to every write, if it is a WORM store."""
        return None

    @abstractmethod
    def check(self) -> None:
        """Raise ``StoreError`` with one line if the store cannot be reached or used."""

    def give_to(self, prefix: str, os_user: str) -> list[str]:
        """Make the folders down to ``prefix`` and give them to ``os_user``, who must write
        below it (a server's archive_command); return what changed. Object storage has no
        owners: nothing to do by default."""
        return []

    def check_writable(self, prefix: str) -> None:
        """Raise ``StoreError`` with one line if this process could not write below ``prefix``;
        creates nothing. By default, what ``check`` finds."""
        self.check()

    @abstractmethod
    def open_write(
        self, key: str, *, lock: ObjectLock | None = None
    ) -> AbstractContextManager[Writable]:
        """A writer that publishes ``key`` when the block exits cleanly and nothing otherwise.

        Refuses (``StoreError``) if ``key`` already exists: objects are create-only.
        """

    def put_bytes(self, key: str, data: bytes, *, lock: ObjectLock | None = None) -> str | None:
        """Write a small object; return its version id on a versioned store, else None."""
        with self.open_write(key, lock=lock) as writer:
            writer.write(data)
        return written_version(writer)

    @property
    def multipart(self) -> bool:
        """Whether writes can leave incomplete multipart uploads behind (S3)."""
        return False

    def upload_abort_days(self) -> int | None:
        """Days after which a lifecycle rule of the store aborts an incomplete multipart upload
        below the store's prefix; None without one (or on a store without multipart uploads)."""
        return None

    @property
    def versioned(self) -> bool:
        """Whether the store keeps every version of a key (an S3 bucket with Object Lock): then
        a write's version id is recorded, reads name it, and ``versions`` shows what came after."""
        return False

    def versions(self, prefix: str) -> dict[str, list[ObjectVersion]]:
        """Each key starting with ``prefix`` and its history, newest first (versioned stores)."""
        raise StoreError(f"store {self.name!r} keeps no versions")

    @abstractmethod
    def open_read(
        self, key: str, version_id: str | None = None
    ) -> AbstractContextManager[Readable]:
        """Stream an object's bytes (its version ``version_id``, on a versioned store);
        ``NotFoundError`` if it does not exist."""

    def get_bytes(self, key: str, version_id: str | None = None) -> bytes:
        with self.open_read(key, version_id) as reader:
            return reader.read()

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        """Published objects whose key starts with ``prefix``, in key order."""

    @abstractmethod
    def list_folders(self, prefix: str = "") -> list[str]:
        """The names of the folders directly below ``prefix`` ("" or a folder ending in "/")
        that hold a published object, sorted: one source's copies are found without walking
        every source. A folder emptied by deletes may still be named (some S3 servers keep its
        entry); listing it finds nothing."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def lock_of(self, key: str, version_id: str | None = None) -> ObjectLock | None:
        """The object's retention (of version ``version_id``, on a versioned store; else of the
        version spark-backup wrote), or None where none applies (or the store has no locks);
        ``NotFoundError`` if there is no such object."""

    def locked(self, key: str, now: dt.datetime | None = None) -> bool:
        """Whether an active lock protects ``key`` now (a missing object is not locked)."""
        try:
            lock = self.lock_of(key)
        except NotFoundError:
            return False
        return bool(lock and lock.active(now))

    @abstractmethod
    def delete(self, key: str) -> None:
        """Delete an object; ``ObjectLockedError`` if a lock protects it. Missing is not an error."""

    @abstractmethod
    def cleanup_incomplete(
        self,
        older_than: dt.timedelta,
        owned: Callable[[str], bool],
        *,
        apply: bool = True,
        now: dt.datetime | None = None,
    ) -> list[str]:
        """Remove the leftovers of writes to keys ``owned`` accepts that never finished (a killed
        process) and saw no progress for ``older_than``; return their keys. Leftovers of other
        writers sharing the store are not touched. Without ``apply``, only list them."""


def written_version(writer: object) -> str | None:
    """The version id a finished ``open_write`` writer published, on a versioned store."""
    return getattr(writer, "version_id", None)


@dataclass(frozen=True)
class ObjectLockPolicy:
    """A store's WORM setting: every object written is locked for ``retain_days``."""

    mode: str
    retain_days: int

    def lock_from(self, now: dt.datetime) -> ObjectLock:
        return ObjectLock(self.mode, now + dt.timedelta(days=self.retain_days))
