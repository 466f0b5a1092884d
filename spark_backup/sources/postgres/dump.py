"""Logical dumps: ``pg_dump -Fc`` per database and ``pg_dumpall --globals-only``, and restoring a
dump into a new database.

Each database's dump runs in a snapshot exported by a REPEATABLE READ transaction of ours
(``pg_dump --snapshot``); the same transaction counts every table's rows, so the counts in the
manifest are exactly what the dump holds and a restore can be checked against them. pg_dump
writes uncompressed (``--compress=0``): the pipeline's zstd does the compressing, faster and
on more cores. A decrypted copy is a plain custom-format archive for ``pg_restore``.
"""

from __future__ import annotations

import datetime as dt
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from spark_backup.engine.manifest import Manifest
from spark_backup.engine.processes import first_error, streamed_tool
from spark_backup.engine.streams import CHUNK_SIZE, Readable, copy_stream
from spark_backup.errors import IntegrityError, RestoreRefused, SourceError
from spark_backup.sources.postgres.parts import (
    DATABASE_PART_PREFIX,
    GLOBALS_PART,
    KIND_NAME,
    database_part,
)
from spark_backup.sources.postgres.server import (
    Background,
    PostgresServer,
    first_line,
    server_major,
    server_version_text,
    table_row_counts,
    tool_version,
)

DUMP_LAYERS = ["pgdump"]
GLOBALS_LAYERS = ["sql"]


class DatabaseDumpReader:
    """A ``PlaintextSource``: one database as a pg_dump custom-format archive."""

    kind = KIND_NAME
    layers = DUMP_LAYERS

    def __init__(self, server: PostgresServer, database: str):
        self.server = server
        self.database = database
        self.part = database_part(database)
        self._metadata: dict[str, Any] = {}
        self._tools: dict[str, str] = {}

    @contextmanager
    def open(self) -> Iterator[Readable]:
        from psycopg import IsolationLevel  # loads with a connection (server.py says why)

        conn = self.server.connect(self.database)
        try:
            conn.isolation_level = IsolationLevel.REPEATABLE_READ
            conn.read_only = True
            with conn.cursor() as cursor:
                cursor.execute("SELECT pg_export_snapshot(), now()")
                snapshot, snapshot_time = cursor.fetchone()
                # What a restore must create the database with for text to sort and compare as
                # it did (pg_dump restores these only with --create).
                cursor.execute(
                    "SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database "
                    "WHERE datname = current_database()"
                )
                encoding, collate, ctype = cursor.fetchone()
                # The counts run beside pg_dump, which reads every row too and always takes
                # longer: parallel workers would only take cores from it, and cost a third
                # more CPU than one backend counting alone.
                cursor.execute("SET LOCAL max_parallel_workers_per_gather = 0")
            major = server_major(conn)
            pg_dump = self.server.tool("pg_dump", major)
            self._tools = {"pg_dump": tool_version(str(pg_dump))[1]}
            self._metadata = {
                "database": self.database,
                "server_version": server_version_text(conn),
                "snapshot_time": snapshot_time.astimezone(dt.UTC).isoformat(),
                "encoding": encoding,
                "lc_collate": collate,
                "lc_ctype": ctype,
                "format": "pg_dump custom format (-Fc, uncompressed inside zstd)",
            }
            # The counts run in our transaction, on the snapshot pg_dump reads, while it reads.
            counter = Background(lambda: table_row_counts(conn))
            args = with_large_writes(
                [
                    str(pg_dump),
                    "--format=custom",
                    "--compress=0",
                    f"--snapshot={snapshot}",
                    f"--dbname={self.server.dsn(self.database)}",
                ]
            )
            try:
                with (
                    self.server.tool_environment() as env,
                    streamed_tool(args, env, f"pg_dump of {self.database!r}") as output,
                ):
                    yield output
            except SourceError:
                # A failed count aborts our transaction, and with it the snapshot pg_dump
                # imports: then the count's error is the cause worth reporting.
                counter.result()
                raise
            counts = counter.result()
            self._metadata.update(
                {"tables": len(counts), "rows": sum(counts.values()), "row_counts": counts}
            )
        finally:
            with suppress(Exception):
                conn.rollback()
            conn.close()

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def tool_versions(self) -> dict[str, str]:
        return self._tools


def with_large_writes(args: list[str]) -> list[str]:
    """``args`` run with a 1 MiB stdout buffer. pg_dump writes its archive through stdio, which
    sizes its buffer by the pipe's block size: 4 KiB, so a 513 MB dump took 125,000 writes,
    most of pg_dump's system time, each one waking the reader. coreutils' ``stdbuf`` sets the
    buffer before pg_dump starts; where it is missing, pg_dump runs as it is."""
    stdbuf = shutil.which("stdbuf")
    return [stdbuf, f"--output={CHUNK_SIZE}", *args] if stdbuf else args


class GlobalsReader:
    """A ``PlaintextSource``: roles, role memberships and tablespaces as SQL (pg_dumpall)."""

    kind = KIND_NAME
    layers = GLOBALS_LAYERS
    part = GLOBALS_PART

    def __init__(self, server: PostgresServer, databases: list[str]):
        self.server = server
        # The databases this run dumps, recorded so that freshness can tell a database whose
        # dump failed from one that is gone.
        self.databases = databases
        self._metadata: dict[str, Any] = {}
        self._tools: dict[str, str] = {}

    @contextmanager
    def open(self) -> Iterator[Readable]:
        conn = self.server.connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")
                superuser = bool(cursor.fetchone()[0])
            major = server_major(conn)
            version = server_version_text(conn)
        finally:
            conn.close()
        pg_dumpall = self.server.tool("pg_dumpall", major)
        self._tools = {"pg_dumpall": tool_version(str(pg_dumpall))[1]}
        # Only a superuser may read password hashes; others still get roles and tablespaces.
        args = [str(pg_dumpall), "--globals-only", f"--dbname={self.server.dsn()}"]
        if not superuser:
            args.append("--no-role-passwords")
        self._metadata = {
            "server_version": version,
            "databases": self.databases,
            "role_passwords": superuser,
            "format": "SQL script (pg_dumpall --globals-only)",
        }
        with (
            self.server.tool_environment() as env,
            streamed_tool(args, env, "pg_dumpall --globals-only") as output,
        ):
            yield output

    def metadata(self) -> dict[str, Any]:
        return self._metadata

    def tool_versions(self) -> dict[str, str]:
        return self._tools


# --- restore -----------------------------------------------------------------------------------


def check_target_database(
    server: PostgresServer, manifest: Manifest, target: str, force: bool
) -> bool:
    """Refuse what a restore into ``target`` must not do; return whether it exists (and will be
    cleaned first, which only ``force`` allows)."""
    source_db = manifest.source_metadata.get("database")
    if not manifest.part.startswith(DATABASE_PART_PREFIX) or not source_db:
        raise RestoreRefused(
            f"copy {manifest.id} is not a database dump (part {manifest.part!r}); restore it "
            "with --to DIR"
        )
    conn = server.connect()
    try:
        with conn.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (target,))
            exists = cursor.fetchone() is not None
    finally:
        conn.close()
    if target == source_db and not force:
        raise RestoreRefused(
            f"database {target!r} is the one copy {manifest.id} was taken from; restore into a "
            "new database, or pass --force to replace its contents"
        )
    if exists and not force:
        raise RestoreRefused(
            f"database {target!r} already exists on {server.where}; choose a new name, or pass "
            "--force to replace its contents"
        )
    return exists


def staging_database_name(target: str) -> str:
    """A new database name beside ``target`` (within PostgreSQL's 63 bytes)."""
    prefix = target.encode()[:40].decode(errors="ignore")
    return f"{prefix}_spark_restore_{secrets.token_hex(4)}"


def publish_database(server: PostgresServer, staging: str, target: str, replace: bool) -> None:
    """Give the checked staging database the target's name. With ``replace``, the old database
    steps aside under a temporary name first and is dropped only once the new one holds the
    name; if that rename fails, the old one gets its name back."""
    if not replace:
        _outside_transaction(server, "ALTER DATABASE {} RENAME TO {}", staging, target)
        return
    aside = staging_database_name(f"{target}_old")
    _end_sessions(server, target)
    _outside_transaction(server, "ALTER DATABASE {} RENAME TO {}", target, aside)
    try:
        _outside_transaction(server, "ALTER DATABASE {} RENAME TO {}", staging, target)
    except BaseException:
        _outside_transaction(server, "ALTER DATABASE {} RENAME TO {}", aside, target)
        raise
    drop_database(server, aside)


def create_database(server: PostgresServer, name: str, like: Manifest | None = None) -> None:
    """A new database from template0, with the dumped database's encoding and locale."""
    meta = like.source_metadata if like else {}
    if not meta.get("encoding"):
        _outside_transaction(server, "CREATE DATABASE {} TEMPLATE template0", name)
        return
    _outside_transaction(
        server,
        "CREATE DATABASE {} TEMPLATE template0 ENCODING %s LC_COLLATE %s LC_CTYPE %s",
        name,
        params=(meta["encoding"], meta["lc_collate"], meta["lc_ctype"]),
    )


def _end_sessions(server: PostgresServer, database: str) -> None:
    """--force replaces a database: the sessions still on it are ended, as DROP ... FORCE would."""
    _outside_transaction(
        server,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        params=(database,),
    )


def drop_database(server: PostgresServer, name: str) -> None:
    _outside_transaction(server, "DROP DATABASE IF EXISTS {} WITH (FORCE)", name)


def _outside_transaction(
    server: PostgresServer, statement: str, *databases: str, params: tuple[str, ...] = ()
) -> None:
    """Run a statement that names databases (``{}``) and cannot run inside a transaction.
    ``params`` are bound on the client: CREATE DATABASE, like every utility statement, takes no
    server-side parameters."""
    import psycopg
    from psycopg import sql

    conn = server.connect()
    try:
        conn.autocommit = True
        with psycopg.ClientCursor(conn) as cursor:
            cursor.execute(sql.SQL(statement).format(*map(sql.Identifier, databases)), params)
    except psycopg.Error as exc:
        shown = statement.split(" {}", 1)[0]
        raise SourceError(
            f"{shown} {', '.join(databases)} on {server.where}: {first_line(str(exc))}"
        ) from None
    finally:
        conn.close()


def pg_restore_into(
    server: PostgresServer, plain: Readable, target: str, *, no_owner: bool
) -> None:
    """Stream a custom-format dump into ``pg_restore`` in one transaction: it applies all or
    nothing. ``SourceError`` with pg_restore's first error line if it fails."""
    conn = server.connect()
    try:
        major = server_major(conn)
    finally:
        conn.close()
    args = [
        str(server.tool("pg_restore", major)),
        "--exit-on-error",
        "--single-transaction",
        f"--dbname={server.dsn(target)}",
    ]
    if no_owner:
        args += ["--no-owner", "--no-privileges"]
    with server.tool_environment() as env, tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=stderr, env=env
        )
        assert process.stdin is not None
        try:
            copy_stream(plain, process.stdin)
            process.stdin.close()
        except BrokenPipeError:
            pass  # pg_restore stopped early; its status and stderr say why
        except BaseException:
            process.kill()
            raise
        finally:
            status = process.wait()
        stderr.seek(0)
        messages = stderr.read().decode(errors="replace").splitlines()
    if status != 0:
        raise SourceError(f"pg_restore into {target!r}: {first_error(messages, status)}")


def check_row_counts(
    server: PostgresServer, manifest: Manifest, restored_into: str, target: str
) -> dict[str, int]:
    """The restored database must hold exactly the rows the dump's snapshot held."""
    import psycopg

    recorded: dict[str, int] = manifest.source_metadata.get("row_counts", {})
    conn = server.connect(restored_into)
    try:
        restored = table_row_counts(conn)
    except psycopg.Error as exc:
        raise SourceError(
            f"restore of {manifest.id}: cannot count the rows of {restored_into!r}: "
            f"{first_line(str(exc))}"
        ) from None
    finally:
        conn.close()
    for table, rows in recorded.items():
        if restored.get(table) != rows:
            raise IntegrityError(
                f"restore of {manifest.id} into {target!r}: table {table} has "
                f"{restored.get(table, 'no')} rows, the dump recorded {rows}"
            )
    return restored
