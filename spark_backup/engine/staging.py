"""Restores land in a hidden staging folder inside the target and are published only after the
copy's checksums matched; a failed or damaged restore leaves the target as it was.

A running restore holds an exclusive ``flock`` on its staging folder. A restore killed outright
(``kill -9``, a power cut) cannot remove its staging, which holds plaintext: the next restore
into the same target removes every staging folder nobody holds a lock on, and ``prune`` removes
those that restores of this user recorded (``$XDG_STATE_HOME/spark-backup/restores/``), wherever
they are.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import secrets
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from spark_backup.errors import RestoreRefused

STAGING_PREFIX = ".spark-backup-restore-"
_STAGING_RE = re.compile(rf"^{re.escape(STAGING_PREFIX)}[0-9a-f]{{8}}$")


@contextmanager
def staged_restore(
    target: Path, overwrite: bool = False, stale_removed: list[str] | None = None
) -> Iterator[Path]:
    """A hidden folder inside ``target`` to extract into. Its content is moved into ``target``
    when the block exits cleanly, and removed when it raises. Existing entries in the target are
    replaced only with ``overwrite``, and a real folder never gives way to a file or a link;
    the target's own links are never followed. The staging folders of killed restores found in
    ``target`` are removed first, and named in ``stale_removed``, for the restore to say so."""
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise RestoreRefused(f"restore target {target} exists and is not a directory")
    staging = target / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
    # Folders this restore creates: a failed restore removes them again, so that a wrong key or
    # a damaged copy leaves nothing behind, not even an empty target.
    created = [p for p in (target, *target.parents) if not os.path.lexists(p)]
    removed = remove_stale_staging(target)
    if stale_removed is not None:
        stale_removed.extend(removed)
    try:
        target.mkdir(parents=True, exist_ok=True)
        staging.mkdir(mode=0o700)
        lock = _lock(staging)
    except OSError as exc:
        raise RestoreRefused(f"cannot create restore target {target}: {exc.strerror}") from None
    if lock is None:  # another process's stale-staging clean-up took it in the instant between
        raise RestoreRefused(f"cannot lock the staging folder in {target}; try again")
    record = _record(staging)
    published = False
    try:
        yield staging
        collisions, folders = _collisions(staging, target)
        if folders:
            shown = ", ".join(str(target / f) for f in folders[:3])
            raise RestoreRefused(
                f"restore would replace the folder {shown} with a file or link of the copy, "
                "removing what is in it; move the folder away or restore into an empty folder"
            )
        if collisions and not overwrite:
            shown = ", ".join(str(target / c) for c in collisions[:3])
            more = f" and {len(collisions) - 3} more" if len(collisions) > 3 else ""
            raise RestoreRefused(
                f"restore would overwrite {shown}{more}; restore into an empty folder or pass --overwrite"
            )
        try:
            for entry in sorted(staging.iterdir()):
                _move(entry, target / entry.name)
        except OSError as exc:
            raise RestoreRefused(
                f"publishing into {target} failed at {exc.filename}: {exc.strerror}"
            ) from None
        published = True
    finally:
        with suppress(OSError):
            remove_tree(staging)
        os.close(lock)
        if record is not None:
            with suppress(OSError):
                record.unlink()
        if not published:
            for folder in created:  # innermost first; stops at the first that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _collisions(staging: Path, target: Path) -> tuple[list[str], list[str]]:
    """Entries of the target that publishing would replace (everything that exists where a
    staged file or link goes, anything but a real folder where a staged folder goes), and of
    those the real folders a staged file or link would replace. Only subtrees that exist in the
    target are walked, so a restore into a new folder costs one listing."""
    found: list[str] = []
    folders: list[str] = []
    pending = [""]
    while pending:  # not recursive: the depth of a tree is the archive's to choose
        relative = pending.pop()
        with os.scandir(staging / relative) as entries:
            for entry in entries:
                name = f"{relative}/{entry.name}" if relative else entry.name
                try:
                    existing = os.lstat(target / name)
                except FileNotFoundError:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if stat.S_ISDIR(existing.st_mode):
                        pending.append(name)
                    else:
                        found.append(name)
                else:
                    found.append(name)
                    if stat.S_ISDIR(existing.st_mode):
                        folders.append(name)
    return sorted(found), sorted(folders)


def _move(source: Path, destination: Path) -> None:
    """Put ``source`` at ``destination``: folders merge into real folders; a file or link there
    gives way (a link is replaced, never followed). A real folder never gives way to a file
    or link (``_collisions`` refused that before publishing began)."""
    if _is_real_dir(source) and _is_real_dir(destination):
        for child in sorted(source.iterdir()):
            _move(child, destination / child.name)
        return
    if os.path.lexists(destination) and _is_real_dir(source):
        destination.unlink()  # a directory cannot be renamed over a file or a link
    os.replace(source, destination)


def remove_tree(path: Path) -> None:
    """Remove a restored tree, folders restored without write permission included."""
    if not os.path.lexists(path):
        return
    if os.path.isdir(path) and not os.path.islink(path):
        for directory, folders, _files in os.walk(path):
            for name in folders:
                child = os.path.join(directory, name)
                if not os.path.islink(child):
                    os.chmod(child, 0o700)
        shutil.rmtree(path)
    else:
        os.unlink(path)


# --- staging left by restores that were killed ----------------------------------------------------


def _lock(staging: Path) -> int | None:
    """An exclusive lock on ``staging`` (its descriptor), or None if another process holds one.
    The kernel drops it when the holder exits, however it exits."""
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    if os.fstat(fd).st_nlink == 0:  # removed as stale between its mkdir and this lock
        os.close(fd)
        return None
    return fd


def _is_stale(path: Path, remove: bool) -> bool:
    """Whether ``path`` is a staging folder of ours that no running restore holds; with
    ``remove``, remove it while holding its lock."""
    try:
        info = os.lstat(path)
    except OSError:
        return False
    if not (
        _STAGING_RE.match(path.name) and stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
    ):
        return False
    try:
        fd = _lock(path)
    except OSError:
        return False
    if fd is None:
        return False  # a restore is running in it
    try:
        if remove:
            remove_tree(path)
    finally:
        os.close(fd)
    return True


def remove_stale_staging(target: Path) -> list[str]:
    """Remove the staging folders that restores killed earlier left in ``target``."""
    try:
        names = [n for n in os.listdir(target) if n.startswith(STAGING_PREFIX)]
    except OSError:
        return []
    return [str(target / n) for n in names if _is_stale(target / n, remove=True)]


def _records() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local/state"
    )
    return Path(state, "spark-backup", "restores")


def _record(staging: Path) -> Path | None:
    """Note where this restore stages, for ``prune``; a restore never fails for want of it."""
    record = _records() / hashlib.sha256(os.fsencode(staging)).hexdigest()[:24]
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_bytes(os.fsencode(staging))
    except OSError:
        return None
    return record


def stale_staging(remove: bool) -> list[str]:
    """Staging folders that restores of this user recorded and that no running restore holds:
    left by restores that were killed. With ``remove``, remove them (and their records)."""
    try:
        records = sorted(_records().iterdir())
    except OSError:
        return []
    found = []
    for record in records:
        try:
            staging = Path(os.fsdecode(record.read_bytes()))
        except OSError:
            continue
        if _is_stale(staging, remove):
            found.append(str(staging))
        elif os.path.lexists(staging):
            continue  # a restore is running in it
        if remove:
            with suppress(OSError):
                record.unlink()
    return found
