"""PostgreSQL: logical dumps (``dump``), physical base backups (``base``) and continuous WAL
archiving, for restores of one database and point-in-time recovery of the whole cluster.

- ``dump.py``: ``pg_dump -Fc`` per database in one exported snapshot with row counts, plus
  ``pg_dumpall --globals-only``; restore into a new database.
- ``basebackup.py``: ``pg_basebackup`` tar streams with WAL positions and timeline.
- ``wal.py``: ``wal-push`` and ``wal-fetch`` for ``archive_command`` and ``restore_command``.
- ``pitr.py``: recovery to a point in time into a throwaway cluster.
- ``server.py``: connections, credentials for the client tools, versions.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from pyrage import x25519

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.pipeline import PlaintextSource, open_copy
from spark_backup.engine.safe_tar import extract_tar
from spark_backup.engine.staging import staged_restore
from spark_backup.engine.stores.base import ObjectStore
from spark_backup.engine.streams import ProgressCallback, Readable, copy_stream
from spark_backup.errors import IntegrityError, NotFoundError, RestoreRefused, UsageError
from spark_backup.plan import LoadedPlan, Plan, PostgresSource
from spark_backup.sources.artifacts import Artifact
from spark_backup.sources.postgres.basebackup import (
    BASE_PART,
    BaseBackupReader,
    check_base_plaintext,
)
from spark_backup.sources.postgres.dump import (
    DATABASE_PART_PREFIX,
    GLOBALS_PART,
    DatabaseDumpReader,
    GlobalsReader,
    database_part,
)
from spark_backup.sources.postgres.server import (
    KIND as KIND,
)
from spark_backup.sources.postgres.server import (
    PostgresServer,
    list_databases,
    server_major,
)

DUMP = "dump"
BASE = "base"
# A pg_dump custom archive starts with these bytes; a globals script with this comment.
_DUMP_MAGIC = b"PGDMP"
_GLOBALS_MARKER = b"PostgreSQL database cluster dump"


def artifacts(source: PostgresSource, plan: Plan) -> list[Artifact]:
    found = [
        Artifact(
            DUMP,
            source.cadence,
            plan.max_age_for(source),
            primary=True,
            description=f"{source.cadence} logical dumps (pg_dump -Fc per database, globals)",
        )
    ]
    if source.base_backup.enabled:
        settings = source.base_backup
        found.append(
            Artifact(
                BASE,
                settings.cadence,
                settings.max_age or plan.max_age_for(source),
                primary=False,
                description=f"{settings.cadence} physical base backups (pg_basebackup)",
            )
        )
    return found


def artifact_of(manifest: Manifest) -> str:
    return BASE if manifest.part == BASE_PART else DUMP


def expected_parts(artifact: str, copies: list[Manifest]) -> set[str]:
    """The base backup; or the globals and every database the newest dump run set out to dump
    (recorded in its globals copy), so a database whose dump keeps failing shows up stale, and
    one dropped from the server stops being expected."""
    if artifact == BASE:
        return {BASE_PART}
    runs = [m for m in copies if m.part == GLOBALS_PART]
    newest = max(runs, key=lambda m: (m.finished_at, m.id), default=None)
    databases = newest.source_metadata.get("databases", []) if newest else []
    return {GLOBALS_PART, *(database_part(db) for db in databases)}


def readers_for(source: PostgresSource, loaded: LoadedPlan, artifact: str) -> list[PlaintextSource]:
    server = PostgresServer.from_source(source, loaded)
    if artifact == BASE:
        if not source.base_backup.enabled:
            raise UsageError(f"source {source.name!r}: base_backup is not enabled in the plan")
        return [BaseBackupReader(server, source.base_backup, f"spark-backup {source.name}")]
    if artifact != DUMP:
        raise UsageError(f"source {source.name!r} has no artifact {artifact!r} (dump, base)")
    wanted = databases(source, server)
    return [GlobalsReader(server, wanted), *(DatabaseDumpReader(server, db) for db in wanted)]


def databases(source: PostgresSource, server: PostgresServer) -> list[str]:
    """The databases the plan asks for, checked against the server."""
    conn = server.connect()
    try:
        available = list_databases(conn)
    finally:
        conn.close()
    if source.databases == "all":
        wanted = available
    else:
        missing = [db for db in source.databases if db not in available]
        if missing:
            raise NotFoundError(
                f"source {source.name!r}: database {missing[0]!r} does not exist on "
                f"{server.where} (it has: {', '.join(available)})"
            )
        wanted = list(source.databases)
    return [db for db in wanted if db not in source.exclude_databases]


def probe(source: PostgresSource, loaded: LoadedPlan) -> None:
    """Connect, and find client tools at least as new as the server."""
    server = PostgresServer.from_source(source, loaded)
    conn = server.connect()
    try:
        major = server_major(conn)
    finally:
        conn.close()
    for tool in ("pg_dump", "pg_dumpall", "pg_restore", "pg_basebackup"):
        server.tool(tool, major)
    databases(source, server)
    if source.base_backup.enabled:
        # Base backups need what pg_basebackup needs: a pg_hba.conf "replication" line and a
        # role with REPLICATION.
        replication = server.connect(replication=True)
        try:
            with replication.cursor() as cursor:
                cursor.execute("IDENTIFY_SYSTEM")
        finally:
            replication.close()


def restore_copy(
    store: ObjectStore,
    manifest: Manifest,
    identities: list[x25519.Identity],
    target: Path,
    *,
    overwrite: bool = False,
    skip_unsafe: bool = False,
    progress: ProgressCallback | None = None,
) -> dict[str, Any]:
    """Into a folder: a base backup is extracted (a data directory), a dump or the globals
    land as one file for pg_restore or psql."""
    with (
        staged_restore(target, overwrite) as staging,
        open_copy(store, manifest, identities, progress) as plain,
    ):
        if manifest.part == BASE_PART:
            summary: dict[str, Any] = vars(extract_tar(plain, staging, skip_unsafe))
        else:
            name = dump_file_name(manifest)
            written = _write_file(plain, staging / name)
            summary = {"files": 1, "directories": 0, "symlinks": 0, "bytes": written, "file": name}
    return {"target": str(Path(os.path.abspath(target))), **summary}


def dump_file_name(manifest: Manifest) -> str:
    """``globals.sql`` or ``<database>.dump``; a database name may hold any character, so only
    a plain file name made of it is used (``../x`` becomes ``_.._x.dump``)."""
    if manifest.part == GLOBALS_PART:
        return "globals.sql"
    database = manifest.part.removeprefix(DATABASE_PART_PREFIX)
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", database)
    return f"{'_' + safe if safe.startswith('.') else safe}.dump"


def _write_file(plain: Readable, path: Path) -> int:
    """Write a restored file readable by its owner only: dumps and role hashes are secrets."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            return copy_stream(plain, out)
    except OSError as exc:
        raise RestoreRefused(f"cannot write {path}: {exc.strerror}") from None


def check_plaintext(plain: Readable, manifest: Manifest) -> None:
    if manifest.part == BASE_PART:
        check_base_plaintext(plain, manifest)
        return
    head = plain.read(256)
    ok = _GLOBALS_MARKER in head if manifest.part == GLOBALS_PART else head.startswith(_DUMP_MAGIC)
    if not ok:
        raise IntegrityError(
            f"copy {manifest.id}: plaintext is not a {manifest.part} dump as pg_dump writes it"
        )
