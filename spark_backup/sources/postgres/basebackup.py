"""Physical base backups: ``pg_basebackup`` in tar format on stdout, streamed through the engine.

The tar holds the data directory with ``backup_label`` and PostgreSQL's ``backup_manifest``
(``pg_verifybackup`` checks an extracted copy), and with ``wal_method: fetch`` the WAL that
makes it consistent. The manifest records the WAL start and end positions and the timeline
(from pg_basebackup's own report) and each database's tables with their row counts when the
backup ran (in a thread beside the stream; ``count_rows: false`` skips them), which a
point-in-time recovery reports beside what it recovered.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.processes import streamed_tool
from spark_backup.engine.streams import Readable
from spark_backup.errors import IntegrityError, SourceError
from spark_backup.sources.postgres.parts import BASE_PART, KIND_NAME
from spark_backup.sources.postgres.server import (
    Background,
    PostgresServer,
    list_databases,
    server_major,
    server_version_text,
    table_row_counts,
    tool_version,
)
from spark_backup.sources.postgres.settings import PostgresBaseBackup

BASE_LAYERS = ["tar"]
# Members a usable base backup must hold.
REQUIRED_MEMBERS = ("backup_label", "backup_manifest", "global/pg_control", "PG_VERSION")
_START_RE = re.compile(r"write-ahead log start point: ([0-9A-F]+/[0-9A-F]+) on timeline (\d+)")
_END_RE = re.compile(r"write-ahead log end point: ([0-9A-F]+/[0-9A-F]+)")


class BaseBackupReader:
    """A ``PlaintextSource``: the cluster's data directory as one tar stream."""

    kind = KIND_NAME
    layers = BASE_LAYERS
    part = BASE_PART

    def __init__(self, server: PostgresServer, settings: PostgresBaseBackup, label: str):
        self.server = server
        self.settings = settings
        self.label = label
        self._metadata: dict[str, Any] = {}
        self._tools: dict[str, str] = {}

    @contextmanager
    def open(self) -> Iterator[Readable]:
        conn = self.server.connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute(
                    "SELECT system_identifier::text, current_setting('data_checksums'), "
                    "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size') "
                    "FROM pg_control_system()"
                )
                system_id, checksums, segment_size = cursor.fetchone()
            major = server_major(conn)
            version = server_version_text(conn)
            databases = list_databases(conn)
        finally:
            conn.close()
        counter = Background(
            lambda: (
                {database: self._row_counts(database) for database in databases}
                if self.settings.count_rows
                else {}
            )
        )
        pg_basebackup = self.server.tool("pg_basebackup", major)
        self._tools = {"pg_basebackup": tool_version(str(pg_basebackup))[1]}
        args = [
            str(pg_basebackup),
            "--pgdata=-",
            "--format=tar",
            f"--wal-method={self.settings.wal_method}",
            f"--checkpoint={self.settings.checkpoint}",
            f"--label={self.label}",
            "--manifest-checksums=SHA256",
            "--verbose",
            f"--dbname={self.server.dsn()}",
        ]
        with (
            self.server.tool_environment() as env,
            streamed_tool(args, env, "pg_basebackup") as output,
        ):
            yield output
        tables = counter.result()
        report = "\n".join(output.messages)
        start, end = _START_RE.search(report), _END_RE.search(report)
        if not start or not end:
            raise SourceError(f"pg_basebackup did not report its WAL positions: {report[-200:]!r}")
        self._metadata = {
            "server_version": version,
            "system_identifier": system_id,
            "data_checksums": checksums == "on",
            "wal_segment_size": int(segment_size),
            "wal_method": self.settings.wal_method,
            "start_lsn": start[1],
            "end_lsn": end[1],
            "timeline": int(start[2]),
            "label": self.label,
            "databases": databases,
            "row_counts": tables,
            "format": "tar of the data directory (pg_basebackup -Ft), backup_manifest inside",
        }

    def _row_counts(self, database: str) -> dict[str, int]:
        conn = self.server.connect(database)
        try:
            conn.read_only = True
            return table_row_counts(conn, logged_only=True)
        finally:
            conn.close()

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def tool_versions(self) -> dict[str, str]:
        return self._tools


def check_base_plaintext(plain: Readable, manifest: Manifest) -> None:
    """The tar must be readable to its end and hold what recovery needs."""
    import tarfile  # only a verify reads the tar: wal-push imports this module for its names

    names: set[str] = set()
    try:
        with tarfile.open(fileobj=plain, mode="r|") as archive:  # type: ignore[call-overload]
            for member in archive:
                names.add(member.name.removeprefix("./"))
    except tarfile.TarError as exc:
        raise IntegrityError(f"copy {manifest.id}: not a readable tar archive: {exc}") from None
    missing = [name for name in REQUIRED_MEMBERS if name not in names]
    if missing:
        raise IntegrityError(
            f"copy {manifest.id}: base backup lacks {', '.join(missing)}; it cannot be recovered"
        )
