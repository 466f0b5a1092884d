"""The ``postgres`` kind: what the contract asks of a kind, and the capabilities PostgreSQL has
(a continuous log, point-in-time recovery, restore into a database, row-count checks)."""

from __future__ import annotations

import datetime as dt
import os
import re
import secrets
import subprocess
from collections.abc import Mapping, Sequence
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyrage import x25519

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.processes import first_error, free_local_port, tool_environment
from spark_backup.engine.staging import remove_tree, staged_restore
from spark_backup.engine.streams import ProgressCallback, Readable, copy_stream
from spark_backup.errors import IntegrityError, NotFoundError, RestoreRefused, UsageError
from spark_backup.sources.base import (
    Artifact,
    CopyRef,
    Observable,
    PointInTimeRecovery,
    PushedLog,
    RestoreTargets,
    Runtime,
    SemanticCheck,
    SourceContext,
    SourceKind,
)
from spark_backup.sources.postgres.parts import (
    BASE,
    BASE_PART,
    DATABASE_PART_PREFIX,
    GLOBALS_PART,
    KIND_NAME,
    database_part,
)
from spark_backup.sources.postgres.settings import PostgresSource

# The pipeline loads where a copy is read, the kind's operations (``ops``, WAL) where they run:
# reading the plan and listing copies need none of them.
if TYPE_CHECKING:
    from spark_backup.engine.pipeline import PlaintextSource
    from spark_backup.sources.capability_values import (
        FolderRestore,
        LogCheck,
        LogRange,
        LogStatus,
        Observation,
        RecoveryTarget,
        RecoveryWindow,
        RestoreTarget,
        SemanticResult,
    )
    from spark_backup.sources.postgres.server import PostgresServer

DUMP = "dump"
WAL_ARCHIVE_ASSET_SUFFIX = "wal_archive"
DATABASE_TARGET = "database"
# A pg_dump custom archive starts with these bytes; a globals script with this comment.
_DUMP_MAGIC = b"PGDMP"
_GLOBALS_MARKER = b"PostgreSQL database cluster dump"


class PostgresKind(
    SourceKind[PostgresSource],
    Observable,
    PushedLog,
    PointInTimeRecovery,
    RestoreTargets,
    SemanticCheck,
):
    name = KIND_NAME
    settings = PostgresSource
    labels = frozenset({"postgres"})
    log_name = "wal"
    log_asset_suffix = WAL_ARCHIVE_ASSET_SUFFIX
    lag_check_name = "wal_archive_lag"
    base_artifact = BASE
    semantic_check_name = "row_counts"

    # --- the contract ---------------------------------------------------------------------------

    def artifacts(self, source: PostgresSource, context: SourceContext) -> list[Artifact]:
        found = [
            Artifact(
                DUMP,
                source.cadence,
                context.max_age,
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
                    settings.max_age or context.max_age,
                    primary=False,
                    description=f"{settings.cadence} physical base backups (pg_basebackup)",
                )
            )
        return found

    def artifact_of(self, manifest: Manifest) -> str:
        return BASE if manifest.part == BASE_PART else DUMP

    def expected_parts(self, artifact: str, copies: Sequence[Manifest]) -> set[str]:
        """The base backup; or the globals and every database the newest dump run set out to
        dump (recorded in its globals copy), so a database whose dump keeps failing shows up
        stale, and one dropped from the server stops being expected."""
        if artifact == BASE:
            return {BASE_PART}
        runs = [m for m in copies if m.part == GLOBALS_PART]
        newest = max(runs, key=lambda m: (m.finished_at, m.id), default=None)
        databases = newest.source_metadata.get("databases", []) if newest else []
        return {GLOBALS_PART, *(database_part(db) for db in databases)}

    def readers(
        self, source: PostgresSource, context: SourceContext, artifact: str
    ) -> list[PlaintextSource]:
        from spark_backup.sources.postgres.basebackup import BaseBackupReader
        from spark_backup.sources.postgres.dump import DatabaseDumpReader, GlobalsReader
        from spark_backup.sources.postgres.server import PostgresServer

        server = PostgresServer.from_source(source, context)
        if artifact == BASE:
            if not source.base_backup.enabled:
                raise UsageError(f"source {source.name!r}: base_backup is not enabled in the plan")
            return [BaseBackupReader(server, source.base_backup, f"spark-backup {source.name}")]
        if artifact != DUMP:
            raise UsageError(f"source {source.name!r} has no artifact {artifact!r} (dump, base)")
        wanted = databases(source, server)
        return [GlobalsReader(server, wanted), *(DatabaseDumpReader(server, db) for db in wanted)]

    def probe(self, source: PostgresSource, context: SourceContext) -> None:
        """Connect, and find client tools at least as new as the server."""
        from spark_backup.sources.postgres import ops
        from spark_backup.sources.postgres.server import PostgresServer, server_major

        server = PostgresServer.from_source(source, context)
        with closing(server.connect()) as conn:
            major = server_major(conn)
        for tool in ("pg_dump", "pg_dumpall", "pg_restore", "pg_basebackup"):
            server.tool(tool, major)
        databases(source, server)
        if source.base_backup.enabled:
            # Base backups need what pg_basebackup needs: a pg_hba.conf "replication" line and
            # a role with REPLICATION.
            with (
                closing(server.connect(replication=True)) as replication,
                replication.cursor() as cursor,
            ):
                cursor.execute("IDENTIFY_SYSTEM")
        if source.wal_archiving:
            # archive_command runs as the server's OS user: a venv it cannot reach (exit 126)
            # or a store folder it cannot write stalls archiving, found here, not by the server.
            ops.archive_command_as_server_user(server, source)

    def restore_to_folder(
        self,
        copy: CopyRef,
        identities: list[x25519.Identity],
        target: Path,
        options: FolderRestore,
    ) -> dict[str, Any]:
        """A base backup is extracted (a data directory); a dump or the globals land as one
        file for pg_restore or psql."""
        from spark_backup.engine.pipeline import open_copy
        from spark_backup.engine.safe_tar import extract_tar

        manifest = copy.manifest
        with (
            staged_restore(target, options.overwrite) as staging,
            open_copy(copy.store, manifest, identities, options.progress, options.worker) as plain,
        ):
            if manifest.part == BASE_PART:
                summary: dict[str, Any] = vars(extract_tar(plain, staging, options.skip_unsafe))
            else:
                name = dump_file_name(manifest)
                written = _write_file(plain, staging / name)
                summary = {
                    "files": 1,
                    "directories": 0,
                    "symlinks": 0,
                    "bytes": written,
                    "file": name,
                }
        return {"target": str(Path(os.path.abspath(target))), **summary}

    def check_plaintext(self, plain: Readable, manifest: Manifest) -> None:
        from spark_backup.sources.postgres.basebackup import check_base_plaintext

        if manifest.part == BASE_PART:
            check_base_plaintext(plain, manifest)
            return
        head = plain.read(256)
        if manifest.part == GLOBALS_PART:
            ok = _GLOBALS_MARKER in head
        else:
            ok = head.startswith(_DUMP_MAGIC)
        if not ok:
            raise IntegrityError(
                f"copy {manifest.id}: plaintext is not a {manifest.part} dump as pg_dump writes it"
            )

    def asset_suffixes(self, source: PostgresSource) -> tuple[str, ...]:
        return (BASE, WAL_ARCHIVE_ASSET_SUFFIX)

    def cli_commands(self) -> Sequence[Any]:
        from spark_backup.sources.postgres.cli import COMMANDS

        return COMMANDS

    # --- Observable -----------------------------------------------------------------------------

    def observe(self, source: PostgresSource, context: SourceContext) -> Observation:
        """The server's current WAL position: it moves with every change."""
        from spark_backup.sources.capability_values import Observation
        from spark_backup.sources.postgres.server import PostgresServer

        server = PostgresServer.from_source(source, context)
        with closing(server.connect()) as conn, conn.cursor() as cursor:
            cursor.execute(
                "SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
                "ELSE pg_current_wal_lsn() END, (SELECT system_identifier FROM pg_control_system())"
            )
            lsn, system_identifier = cursor.fetchone()
        return Observation(
            str(lsn), {"wal_lsn": str(lsn), "system_identifier": str(system_identifier)}
        )

    # --- PushedLog (a ContinuousLog) ---------------------------------------------------------------

    def log_enabled(self, source: PostgresSource) -> bool:
        return source.wal_archiving

    def push(self, runtime: Runtime, source: PostgresSource, path: Path) -> str:
        from spark_backup.sources.postgres import ops

        return ops.wal_push(runtime, source, path)

    def fetch(
        self,
        runtime: Runtime,
        source: PostgresSource,
        name: str,
        destination: Path,
        identity_file: str | Path | None = None,
    ) -> None:
        from spark_backup.sources.postgres import ops

        ops.wal_fetch(runtime, source, name, destination, identity_file)

    def lag(self, runtime: Runtime, source: PostgresSource, now: dt.datetime) -> LogStatus:
        from spark_backup.sources.capability_values import LogStatus
        from spark_backup.sources.postgres import ops

        status = ops.wal_archive_status(runtime, source, now)
        details: dict[str, Any] = {}
        if status.server:
            details = {
                "server_segment": status.server.current_segment,
                "archiver_failed_count": status.server.failed_count,
            }
        problems = []
        if receiver := status.receiver:
            details["receiver_slot"] = receiver.name
            details["receiver_active"] = receiver.active
            details["receiver_retained_bytes"] = receiver.retained_bytes or 0
            if problem := status.receiver_problem:
                problems.append(problem)
        return LogStatus(
            source=source.name,
            rpo=status.rpo,
            now=status.now,
            lag=status.lag,
            newest=status.newest.name if status.newest else None,
            details=details,
            source_error=status.server_error,
            problems=problems,
        )

    def expire(
        self,
        runtime: Runtime,
        source: PostgresSource,
        kept_bases: Sequence[Manifest],
        now: dt.datetime,
        dry_run: bool,
    ) -> list[str]:
        from spark_backup.sources.postgres import ops

        return ops.expire_wal(runtime, source, kept_bases, now, dry_run)

    def owns_key(self, key: str) -> bool:
        from spark_backup.sources.postgres.wal import is_wal_key

        return is_wal_key(key)

    def log_checks(self, source: PostgresSource) -> Sequence[LogCheck]:
        if source.wal_receive is None:
            return ()
        from spark_backup.sources.capability_values import LogCheck
        from spark_backup.sources.postgres.receive import WAL_RECEIVER_CHECK, receiver_check

        return [
            LogCheck(
                WAL_RECEIVER_CHECK,
                "Fails when wal-receive is not streaming (its slot unused or lost) or the "
                "store's streamed WAL is further behind the server than wal_receive.max_lag.",
                lambda runtime, now: receiver_check(runtime, source, now),
            )
        ]

    def log_ranges(
        self, runtime: Runtime, source: PostgresSource, bases: Sequence[Manifest]
    ) -> dict[str, LogRange]:
        from spark_backup.sources.postgres import ops

        return ops.wal_ranges(runtime, source, bases)

    # --- PointInTimeRecovery --------------------------------------------------------------------

    def recover(
        self,
        runtime: Runtime,
        source: PostgresSource,
        target: RecoveryTarget,
        target_dir: Path,
        *,
        identity_file: str | Path | None = None,
        stop_after: bool = False,
        progress: ProgressCallback | None = None,
    ) -> Any:
        from spark_backup.sources.postgres import ops

        return ops.pitr(
            runtime,
            self,
            source,
            target.time,
            target_dir,
            port=free_local_port(),
            identity_file=identity_file,
            stop_after=stop_after,
            progress=progress,
        )

    def recovery_window(self, runtime: Runtime, source: PostgresSource) -> RecoveryWindow:
        """From the end of the oldest base backup the archive continues without a gap, to the
        newest WAL segment reachable from the newest base backup."""
        from spark_backup.sources.capability_values import RecoveryWindow
        from spark_backup.sources.postgres import ops
        from spark_backup.sources.postgres import pitr as recovery
        from spark_backup.sources.postgres.wal import archived_wal

        bases = [ref.manifest for ref in runtime.copies(source.name, BASE)]
        if not bases:
            return RecoveryWindow(None, None, {"base_backups": 0})
        newest = max(bases, key=lambda m: (m.finished_at, m.id))
        archive = (
            archived_wal(
                runtime.store_for(source), source.name, None, ops.base_system_identifier(newest)
            )
            if source.wal_archiving
            else []
        )
        usable, gap = recovery.wal_to_fetch(newest, archive)
        segments = [entry for entry in usable if entry.is_segment]
        # A streamed partial segment (wal-receive) is where the WAL ends: it reaches further.
        reach = [entry for entry in usable if entry.is_segment or entry.is_partial]
        latest = max((entry.modified for entry in reach), default=newest.finished)
        earliest = min(bases, key=lambda m: (m.finished_at, m.id)).finished
        details: dict[str, Any] = {
            "base_backups": len(bases),
            "wal_segments": len(segments),
            "newest_base": newest.id,
        }
        if gap:
            details["gap"] = gap
        return RecoveryWindow(earliest, max(latest, newest.finished), details)

    # --- RestoreTargets -------------------------------------------------------------------------

    def restore_targets(self) -> Sequence[RestoreTarget]:
        from spark_backup.sources.capability_values import RestoreTarget

        return [
            RestoreTarget(
                DATABASE_TARGET,
                "--to-db",
                "NAME",
                "PostgreSQL dumps: a new database on the source's server.",
                {
                    "force": "--to-db: replace the contents of an existing database.",
                    "no_owner": "--to-db: skip ownership and grants (roles may be missing).",
                },
            )
        ]

    def restore_to_target(
        self,
        runtime: Runtime,
        target: str,
        copy: CopyRef,
        value: str,
        *,
        identity_file: str | Path | None = None,
        flags: Mapping[str, bool] | None = None,
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        from spark_backup.sources.postgres import ops

        if target != DATABASE_TARGET:
            raise UsageError(f"a {self.name} copy cannot be restored into a {target}")
        flags = flags or {}
        return ops.restore_to_database(
            runtime,
            copy,
            value,
            identity_file=identity_file,
            force=flags.get("force", False),
            no_owner=flags.get("no_owner", False),
            progress=progress,
        )

    def _verify_base_backup(
        self,
        server: PostgresServer,
        copy: CopyRef,
        identities: list[x25519.Identity],
        scratch: Path,
    ) -> SemanticResult:
        """Extract the base backup and let PostgreSQL's own ``pg_verifybackup`` check every file
        against the backup manifest the server wrote (and the WAL in it, when it holds some)."""
        from spark_backup.sources.capability_values import FolderRestore, SemanticResult

        manifest = copy.manifest
        data = scratch / "base"
        major = int(str(manifest.source_metadata["server_version"]).split(".")[0])
        tool = server.tool("pg_verifybackup", major)
        command = [str(tool), str(data)]
        if manifest.source_metadata.get("wal_method") != "fetch":
            command.insert(1, "--no-parse-wal")  # its WAL is in the archive, not in the backup
        try:
            self.restore_to_folder(copy, identities, data, FolderRestore())
            result = subprocess.run(
                command, capture_output=True, text=True, env=tool_environment(), check=False
            )
        finally:
            remove_tree(data)
        if result.returncode != 0:
            reason = first_error(result.stderr.splitlines(), result.returncode)
            return SemanticResult(False, f"pg_verifybackup refused {manifest.id}: {reason}", {})
        return SemanticResult(True, "pg_verifybackup confirmed every file of the base backup", {})

    # --- SemanticCheck --------------------------------------------------------------------------

    def semantic_check(
        self,
        runtime: Runtime,
        copy: CopyRef,
        identities: list[x25519.Identity],
        scratch: Path,
    ) -> SemanticResult:
        """A database dump is restored into a scratch database on the source's server (never
        touching the source database) and every table's rows are counted against the dump's
        snapshot; a base backup is extracted and checked with ``pg_verifybackup`` against its
        own manifest; the globals are a script whose shape the deep verify checks."""
        from spark_backup.engine.pipeline import open_copy
        from spark_backup.sources.capability_values import SemanticResult
        from spark_backup.sources.postgres import dump as pg_dump_restore
        from spark_backup.sources.postgres import ops

        manifest = copy.manifest
        source = runtime.source(manifest.source)
        assert isinstance(source, PostgresSource)
        server = ops.server_of(runtime, source)
        if manifest.part == BASE_PART:
            return self._verify_base_backup(server, copy, identities, scratch)
        if manifest.part == GLOBALS_PART:
            with open_copy(copy.store, manifest, identities) as plain:
                self.check_plaintext(plain, manifest)
            return SemanticResult(True, "globals script is complete", {})
        scratch_db = f"spark_check_{secrets.token_hex(6)}"
        pg_dump_restore.create_database(server, scratch_db, like=manifest)
        try:
            with open_copy(copy.store, manifest, identities) as plain:
                pg_dump_restore.pg_restore_into(server, plain, scratch_db, no_owner=True)
            counts = pg_dump_restore.check_row_counts(server, manifest, scratch_db, scratch_db)
        except IntegrityError as exc:
            return SemanticResult(False, str(exc), {})
        finally:
            pg_dump_restore.drop_database(server, scratch_db)
        return SemanticResult(
            True,
            f"{len(counts)} tables hold the {sum(counts.values())} rows the dump recorded",
            {"tables": len(counts), "rows": sum(counts.values())},
        )


def databases(source: PostgresSource, server: PostgresServer) -> list[str]:
    """The databases the plan asks for, checked against the server."""
    from spark_backup.sources.postgres.server import list_databases

    with closing(server.connect()) as conn:
        available = list_databases(conn)
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
