"""A folder on this machine: the embedded default store.

An object is written to a hidden partial file, fsynced, then hard-linked to its final name (which
fails if the name exists, so objects are create-only) and the directory fsynced. A crash leaves at
most a partial file, which ``list`` ignores and ``cleanup_incomplete`` removes.
"""

from __future__ import annotations

import datetime as dt
import errno
import os
import pwd
import re
import secrets
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from spark_backup.engine.stores.base import (
    ObjectInfo,
    ObjectLock,
    ObjectStore,
    check_folder,
    check_key,
)
from spark_backup.engine.streams import Readable, Writable
from spark_backup.errors import NotFoundError, StoreError

PARTIAL_MARKER = ".partial-"
_PARTIAL_RE = re.compile(r"^\.(?P<name>.+)\.partial-[0-9a-f]{8}$")
# A folder name a key can hold (check_key's parts).
_KEY_PART_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class LocalStore(ObjectStore):
    def __init__(self, name: str, root: Path):
        self.name = name
        self.root = Path(root).absolute()

    @property
    def uri(self) -> str:
        return self.root.as_uri()

    def object_uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def check(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"store {self.name!r}: cannot create {self.root}: {exc.strerror}"
            ) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise StoreError(f"store {self.name!r}: {self.root} is not writable")

    def give_to(self, prefix: str, os_user: str) -> list[str]:
        try:
            entry = pwd.getpwnam(os_user)
        except KeyError:
            raise StoreError(f"store {self.name!r}: OS user {os_user!r} does not exist") from None
        folders = [self.root]
        for part in [p for p in prefix.strip("/").split("/") if p]:
            folders.append(folders[-1] / part)
        changed = []
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for folder in folders:
                folder.mkdir(exist_ok=True)
                status = folder.stat()
                if (status.st_uid, status.st_gid) != (entry.pw_uid, entry.pw_gid):
                    os.chown(folder, entry.pw_uid, entry.pw_gid)
                    changed.append(str(folder))
        except OSError as exc:
            raise StoreError(
                f"store {self.name!r}: cannot give {exc.filename} to {os_user}: {exc.strerror}"
            ) from None
        return changed

    def check_writable(self, prefix: str) -> None:
        """The folder below which ``prefix`` lives, or the nearest one that exists, must be
        writable by this process (the store's root is never created here)."""
        if not self.root.is_dir():
            raise StoreError(f"store {self.name!r}: {self.root} does not exist (not mounted?)")
        folder = self.root / prefix.strip("/") if prefix.strip("/") else self.root
        while not folder.is_dir():
            folder = folder.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise StoreError(
                f"store {self.name!r}: {folder} is not writable by user {_user_name()}"
            )

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @contextmanager
    def open_write(self, key: str, *, lock: ObjectLock | None = None) -> Iterator[Writable]:
        if lock is not None:
            raise StoreError(f"store {self.name!r}: a local folder cannot hold Object Lock copies")
        final = self._path(key)
        if final.exists():
            raise StoreError(f"store {self.name!r}: object {key} already exists")
        partial = final.with_name(f".{final.name}{PARTIAL_MARKER}{secrets.token_hex(4)}")
        if not self.root.is_dir():
            # Never re-create the root here: an unmounted backup disk would quietly fill the
            # folder it is mounted on. check() creates it on first use.
            raise StoreError(f"store {self.name!r}: {self.root} does not exist (not mounted?)")
        try:
            _make_folders(final.parent)
            handle = open(partial, "xb")  # noqa: SIM115 - closed in the finally below
        except OSError as exc:
            raise StoreError(f"store {self.name!r}: cannot write {key}: {exc.strerror}") from None
        try:
            yield _StoreFileWriter(handle, self.name, key)
            handle.flush()
            os.fsync(handle.fileno())
            handle.close()
            try:
                os.link(partial, final)
            except FileExistsError:
                raise StoreError(f"store {self.name!r}: object {key} already exists") from None
            except OSError as exc:
                raise StoreError(
                    f"store {self.name!r}: cannot write {key}: {exc.strerror}"
                ) from None
            _fsync_dir(final.parent)
        finally:
            handle.close()
            partial.unlink(missing_ok=True)

    @contextmanager
    def open_read(self, key: str, version_id: str | None = None) -> Iterator[Readable]:
        # A folder keeps one version of each (create-only) object: ``version_id`` names it.
        try:
            handle = open(self._path(key), "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise NotFoundError(f"store {self.name!r}: object {key} not found") from None
        except OSError as exc:
            raise StoreError(f"store {self.name!r}: cannot read {key}: {exc.strerror}") from None
        with handle:
            yield handle

    def _unlistable(self, error: OSError) -> None:
        if not isinstance(error, FileNotFoundError):  # a prefix nobody wrote yet is just empty
            raise StoreError(
                f"store {self.name!r}: cannot list {error.filename}: {error.strerror}"
            ) from None

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        if not self.root.is_dir():
            return
        found: list[ObjectInfo] = []
        # Walk only below the prefix's folder: a WAL archive holds thousands of objects.
        start = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        root = str(self.root)
        # Keys by string operations, not pathlib: listing thousands of manifests is on the path
        # of every `list`.
        for directory, _dirs, files in os.walk(start, onerror=self._unlistable):
            folder = directory[len(root) + 1 :]
            for file_name in files:
                key = f"{folder}/{file_name}" if folder else file_name
                # An object being written is a hidden file; a key may hold ".partial-" itself
                # (PostgreSQL's own X.partial WAL files, archived at a promotion).
                if _PARTIAL_RE.match(file_name) or not key.startswith(prefix):
                    continue
                try:
                    stat = os.stat(f"{directory}/{file_name}")
                except FileNotFoundError:
                    continue  # deleted meanwhile
                found.append(
                    ObjectInfo(key, stat.st_size, dt.datetime.fromtimestamp(stat.st_mtime, dt.UTC))
                )
        yield from sorted(found, key=lambda info: info.key)

    def list_folders(self, prefix: str = "") -> list[str]:
        parent = self.root / check_folder(prefix)
        try:
            with os.scandir(parent) as entries:
                folders = [e for e in entries if e.is_dir(follow_symlinks=False)]
            return sorted(
                folder.name
                for folder in folders
                if _KEY_PART_RE.match(folder.name) and _holds_object(folder.path)
            )
        except FileNotFoundError:
            return []  # a folder nobody wrote yet is just empty
        except OSError as exc:
            raise StoreError(
                f"store {self.name!r}: cannot list {exc.filename or parent}: {exc.strerror}"
            ) from None

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def lock_of(self, key: str, version_id: str | None = None) -> ObjectLock | None:
        if not self.exists(key):
            raise NotFoundError(f"store {self.name!r}: object {key} not found")
        return None  # a folder cannot hold a lock

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise StoreError(f"store {self.name!r}: cannot delete {key}: {exc.strerror}") from None
        _remove_empty_parents(path.parent, self.root)

    def cleanup_incomplete(
        self,
        older_than: dt.timedelta,
        owned: Callable[[str], bool],
        *,
        apply: bool = True,
        now: dt.datetime | None = None,
    ) -> list[str]:
        if not self.root.is_dir():
            return []
        # A partial file's mtime moves with every write, so only a stalled write looks old.
        cutoff = (now or dt.datetime.now(dt.UTC)) - older_than
        removed = []
        for directory, _dirs, files in os.walk(self.root):
            for file_name in files:
                match = _PARTIAL_RE.match(file_name)
                path = Path(directory, file_name)
                if not match or not owned(
                    path.with_name(match["name"]).relative_to(self.root).as_posix()
                ):
                    continue
                try:
                    modified = dt.datetime.fromtimestamp(path.stat().st_mtime, dt.UTC)
                except FileNotFoundError:
                    continue  # the write finished meanwhile
                if modified < cutoff:
                    if apply:
                        path.unlink(missing_ok=True)
                    removed.append(path.relative_to(self.root).as_posix())
        return removed


class _StoreFileWriter:
    """The partial file, with write errors (a full disk) reported as the store's failure."""

    def __init__(self, handle, store: str, key: str):
        self._handle = handle
        self._store = store
        self._key = key

    def write(self, data: bytes) -> int:
        try:
            return self._handle.write(data)
        except OSError as exc:
            raise StoreError(
                f"store {self._store!r}: cannot write {self._key}: {exc.strerror}"
            ) from None

    def flush(self) -> None:
        self._handle.flush()


def _holds_object(directory: str) -> bool:
    """Whether a published object lies anywhere below ``directory`` (a folder holding only a
    write in progress is no folder yet, as on S3); stops at the first one, so a source folder
    of thousands of copies costs a few entries."""
    folders = []
    try:
        with os.scandir(directory) as entries:
            for entry in entries:
                if not entry.is_dir():
                    if not _PARTIAL_RE.match(entry.name):
                        return True
                elif not entry.is_symlink():  # as list(), which does not follow them
                    folders.append(entry.path)
    except FileNotFoundError:
        return False  # deleted meanwhile
    return any(_holds_object(folder) for folder in folders)


def _user_name() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def _make_folders(folder: Path) -> None:
    """Create ``folder`` and its missing parents. As root, each new folder gets the owner and
    group of the folder it is made in: a store prepared for another user (PostgreSQL's
    ``archive_command`` runs as ``postgres``) stays writable for that user below, whoever wrote
    first."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for new in reversed(missing):
        try:
            new.mkdir()
        except FileExistsError:
            continue  # made meanwhile by another writer
        if os.geteuid() == 0:
            parent = new.parent.stat()
            os.chown(new, parent.st_uid, parent.st_gid)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_empty_parents(directory: Path, root: Path) -> None:
    while directory != root and root in directory.parents:
        try:
            directory.rmdir()
        except OSError as exc:
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                return
            raise
        directory = directory.parent
