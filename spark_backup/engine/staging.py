"""Restores land in a hidden staging folder inside the target and are published only after the
copy's checksums matched; a failed or damaged restore leaves the target as it was."""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from spark_backup.errors import RestoreRefused

STAGING_PREFIX = ".spark-backup-restore-"


@contextmanager
def staged_restore(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """A hidden folder inside ``target`` to extract into. Its content is moved into ``target``
    when the block exits cleanly, and removed when it raises. Existing entries in the target are
    replaced only with ``overwrite``; the target's own links are never followed."""
    target = Path(os.path.abspath(target))
    if target.exists() and not target.is_dir():
        raise RestoreRefused(f"restore target {target} exists and is not a directory")
    staging = target / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
    # Folders this restore creates: a failed restore removes them again, so that a wrong key or
    # a damaged copy leaves nothing behind, not even an empty target.
    created = [p for p in (target, *target.parents) if not os.path.lexists(p)]
    try:
        target.mkdir(parents=True, exist_ok=True)
        staging.mkdir(mode=0o700)
    except OSError as exc:
        raise RestoreRefused(f"cannot create restore target {target}: {exc.strerror}") from None
    published = False
    try:
        yield staging
        collisions = _collisions(staging, target)
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
        shutil.rmtree(staging, ignore_errors=True)
        if not published:
            for folder in created:  # innermost first; stops at the first that is not empty
                try:
                    folder.rmdir()
                except OSError:
                    break


def _is_real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _collisions(staging: Path, target: Path) -> list[str]:
    """Entries of the target that publishing would replace: everything that exists where a
    staged file or link goes, and anything but a real folder where a staged folder goes."""
    found = []
    for directory, dirs, files in os.walk(staging):
        relative = Path(directory).relative_to(staging)
        for name in [*files, *[d for d in dirs if Path(directory, d).is_symlink()]]:
            if os.path.lexists(target / relative / name):
                found.append(str(relative / name))
        for name in dirs:
            existing = target / relative / name
            if os.path.lexists(existing) and not _is_real_dir(existing):
                found.append(str(relative / name))
    return sorted(found)


def _move(source: Path, destination: Path) -> None:
    """Put ``source`` at ``destination``: folders merge into real folders; anything else there
    (a file, or a link, which is replaced rather than followed) gives way."""
    if _is_real_dir(source) and _is_real_dir(destination):
        for child in sorted(source.iterdir()):
            _move(child, destination / child.name)
        return
    if _is_real_dir(destination):
        shutil.rmtree(destination)
    elif os.path.lexists(destination) and _is_real_dir(source):
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
