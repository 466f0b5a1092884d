"""A consistent copy of a Dagster instance folder ($DAGSTER_HOME) with SQLite storage, the
embedded default, for a ``config_archive`` source to back up: the rollback plan's way back to
the run history, schedules and sensor cursors (docs/runbooks/rollback.md).

Copying the live files is not enough: Dagster writes its SQLite databases while it runs, and a
file copied mid-transaction (or without its ``-wal`` file) can be torn. Each database is
copied with SQLite's online backup API, which reads a consistent state while writers go on;
every other file is copied as it is. The snapshot is built in a hidden sibling folder and
renamed into place, so an interrupted snapshot never looks complete. Standard SQLite files
come out: ``sqlite3 FILE 'pragma integrity_check'`` checks any of them.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from spark_backup.errors import SparkBackupError, UsageError

SQLITE_HEADER = b"SQLite format 3\x00"
# A database's side files: the backup API folds their content into the copy.
_SIDE_FILES = ("-wal", "-shm", "-journal")


@dataclass
class InstanceSnapshot:
    target: str
    databases: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


def is_sqlite(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


def snapshot_instance(home: Path, target: Path, busy_timeout: float = 30.0) -> InstanceSnapshot:
    """Copy the instance folder ``home`` to ``target`` (which must not exist), databases
    through SQLite's backup API; return what was copied, relative to ``home``."""
    home, target = home.absolute(), target.absolute()
    if not (home / "dagster.yaml").is_file() and not any(home.rglob("*.db")):
        raise UsageError(f"{home}: not a Dagster instance folder (no dagster.yaml, no *.db)")
    if target.exists():
        raise UsageError(f"{target} already exists: snapshot into a new folder")
    if target == home or home in target.parents:
        raise UsageError(f"{target} is inside the instance folder {home}")
    staging = target.parent / f".{target.name}.partial-{secrets.token_hex(4)}"
    report = InstanceSnapshot(str(target))
    try:
        staging.mkdir(parents=True)
        for directory, folders, files in os.walk(home):
            folders.sort()
            relative = Path(directory).relative_to(home)
            (staging / relative).mkdir(exist_ok=True)
            for name in sorted(files):
                source, copy = Path(directory, name), staging / relative / name
                if source.is_symlink() or not source.is_file():
                    continue  # sockets, fifos; links would point outside the snapshot
                if name.endswith(_SIDE_FILES) and is_sqlite(source.with_name(_base(name))):
                    continue
                if is_sqlite(source):
                    _backup_database(source, copy, busy_timeout)
                    report.databases.append(str(relative / name))
                else:
                    shutil.copy2(source, copy)
                    report.files.append(str(relative / name))
        os.rename(staging, target)
    except sqlite3.Error as exc:
        raise SparkBackupError(f"{home}: cannot snapshot a database: {exc}") from None
    except OSError as exc:
        raise SparkBackupError(
            f"cannot snapshot {home} to {target}: {exc.strerror} ({exc.filename})"
        ) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _base(name: str) -> str:
    for suffix in _SIDE_FILES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _backup_database(source: Path, copy: Path, busy_timeout: float) -> None:
    # Not read-only: a database in WAL mode needs its -shm file, which a reader may create.
    reader = sqlite3.connect(source, timeout=busy_timeout)
    try:
        writer = sqlite3.connect(copy)
        try:
            reader.backup(writer)
            # The copy stands alone: no -wal file beside it in the archive.
            writer.execute("pragma journal_mode=delete")
        finally:
            writer.close()
    finally:
        reader.close()
