"""Talking to a PostgreSQL server: connection strings, the password for the client tools, server
facts, and client binaries that are not older than the server.

The password is read from the secret the plan names (or libpq's passfile) and
reaches the client tools through a private passfile that lives only while the tool runs: it is
never put into a connection string, an argument, a log line or a manifest.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

# psycopg loads where a connection string is built or a connection made, not with the kind:
# ``list`` and ``wal-push`` (run for every WAL segment) never talk to the server.
if TYPE_CHECKING:
    import psycopg

from spark_backup.engine.processes import tool_environment
from spark_backup.engine.secrets import EnvSecrets, SecretRef, SecretResolver
from spark_backup.errors import NotFoundError, SourceError
from spark_backup.sources.base import SourceContext
from spark_backup.sources.postgres.settings import PostgresSource
from spark_backup.sources.postgres.walname import WalSegment

# Debian and Ubuntu keep one folder of binaries per major version.
DEBIAN_BIN_DIRS = "/usr/lib/postgresql/{major}/bin"
CONNECT_TIMEOUT_SECONDS = 10
# Asking whether a database exists after a refused connection: the server just answered.
EXISTS_TIMEOUT_SECONDS = 3
APPLICATION_NAME = "spark-backup"
# A segment's first page starts with a long header (SizeOfXLogLongPHD): an insert position no
# further than this into a segment means nothing was written to it yet.
WAL_PAGE_HEADER_BYTES = 40
# libpq's environment settings that reach the client tools; never PGPASSWORD or PGPASSFILE (the
# password travels in a private passfile) nor anything else that merely starts with PG.
LIBPQ_SETTINGS = frozenset(
    {
        "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE", "PGUSER", "PGSERVICE",
        "PGSERVICEFILE", "PGOPTIONS", "PGSSLMODE", "PGREQUIRESSL", "PGSSLCOMPRESSION",
        "PGSSLCERT", "PGSSLKEY", "PGSSLROOTCERT", "PGSSLCRL", "PGSSLCRLDIR", "PGSSLSNI",
        "PGREQUIREPEER", "PGSSLMINPROTOCOLVERSION", "PGSSLMAXPROTOCOLVERSION",
        "PGGSSENCMODE", "PGKRBSRVNAME", "PGGSSLIB", "PGCHANNELBINDING", "PGCLIENTENCODING",
        "PGTARGETSESSIONATTRS", "PGLOADBALANCEHOSTS", "PGTZ", "PGDATESTYLE", "PGSYSCONFDIR",
    }
)  # fmt: skip
# psycopg's heading of every refused connection: it says nothing the rest does not.
_CONNECTION_FAILED = "connection failed: "
_VERSION_RE = re.compile(r"\(PostgreSQL\) (\d+)(?:\.(\d+))?")
# Ordinary tables (leaf partitions included) outside the system schemas.
_TABLES_SQL = """
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname), c.relpersistence = 'p'
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r'
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
ORDER BY 1
"""


@dataclass(frozen=True)
class PostgresServer:
    """One PostgreSQL server as a plan source describes it."""

    source_name: str
    base_dsn: str
    maintenance_db: str
    password: SecretRef | None = None
    passfile: Path | None = None
    bin_dir: Path | None = None
    secrets: SecretResolver | None = None

    @classmethod
    def from_source(cls, source: PostgresSource, context: SourceContext) -> PostgresServer:
        from psycopg.conninfo import conninfo_to_dict, make_conninfo

        base = source.dsn or make_conninfo(host=source.host, port=source.port, user=source.user)
        return cls(
            source_name=source.name,
            base_dsn=base,
            # A database named in the dsn is the one to connect to for server facts.
            maintenance_db=conninfo_to_dict(base).get("dbname") or source.maintenance_db,
            password=source.password,
            passfile=context.resolve(source.passfile) if source.passfile else None,
            bin_dir=context.resolve(source.bin_dir) if source.bin_dir else None,
            secrets=context.secrets,
        )

    def dsn(self, dbname: str | None = None, **extra: Any) -> str:
        """A libpq connection string for one database (never with a password)."""
        from psycopg.conninfo import make_conninfo

        return make_conninfo(self.base_dsn, dbname=dbname or self.maintenance_db, **extra)

    @property
    def user(self) -> str | None:
        from psycopg.conninfo import conninfo_to_dict

        return conninfo_to_dict(self.base_dsn).get("user")

    @property
    def where(self) -> str:
        """host:port for messages, from the connection string (which holds no secret)."""
        from psycopg.conninfo import conninfo_to_dict

        params = conninfo_to_dict(self.base_dsn)
        host = params.get("host") or params.get("hostaddr") or "local socket"
        return f"{host}:{params.get('port', 5432)}"

    def _password(self) -> str | None:
        """The secret ``password`` names; else libpq's own PGPASSWORD, so that our connections
        and the tools (which get it through the passfile) agree."""
        if not self.password:
            return os.environ.get("PGPASSWORD")
        secrets = self.secrets or SecretResolver({"env": EnvSecrets()})
        return secrets.resolve_for(f"source {self.source_name!r}", self.password)

    def connect(self, dbname: str | None = None, replication: bool = False) -> psycopg.Connection:
        """A connection as the plan's user (a physical replication connection, as
        pg_basebackup makes, with ``replication``: in autocommit, since a walsender takes
        replication commands only); ``SourceError`` in one line if refused, ``NotFoundError`` if
        the database does not exist."""
        import psycopg

        database = dbname or self.maintenance_db
        try:
            return self._open(database, replication)
        except psycopg.OperationalError as exc:
            detail = first_line(str(exc), self._password())
            # libpq reports no SQLSTATE for a refused connection (3D000 stays on the server's
            # side), so whether the database exists is asked, not read from the message.
            if not replication and self._database_exists(database) is False:
                raise NotFoundError(
                    f"source {self.source_name!r}: database {database!r} does not exist on "
                    f"{self.where}"
                ) from None
            what = "make a replication connection to" if replication else "connect to"
            raise SourceError(
                f"source {self.source_name!r}: cannot {what} {self.where} "
                f"(database {database!r}): {detail}"
            ) from None

    def _open(
        self, database: str, replication: bool = False, timeout: int = CONNECT_TIMEOUT_SECONDS
    ) -> psycopg.Connection:
        import psycopg

        password = self._password()
        extra: dict[str, Any] = {"password": password} if password is not None else {}
        if self.passfile:
            extra["passfile"] = str(self.passfile)
        if replication:
            extra.update(replication="true", autocommit=True)
        return psycopg.connect(
            self.dsn(database),
            connect_timeout=timeout,
            application_name=APPLICATION_NAME,
            **extra,
        )

    def _database_exists(self, database: str) -> bool | None:
        """Whether ``database`` exists, asked through the maintenance database, else
        ``template1``; None if neither can be asked."""
        import psycopg

        for other in dict.fromkeys((self.maintenance_db, "template1")):
            if other == database:
                continue
            try:
                conn = self._open(other, timeout=EXISTS_TIMEOUT_SECONDS)
            except psycopg.Error:
                continue
            try:
                with conn.cursor() as cursor:
                    cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                    return cursor.fetchone() is not None
            except psycopg.Error:
                return None
            finally:
                conn.close()
        return None

    @contextmanager
    def tool_environment(self) -> Iterator[dict[str, str]]:
        """The environment for pg_dump and friends: the password in a passfile readable only by
        us, removed when the tool has finished."""
        env = tool_environment()
        # libpq's own settings (PGSSLMODE, PGSSLROOTCERT, PGSERVICE, ...) apply to the tools as
        # they apply to our connections; a password only ever travels in the passfile below.
        env.update((name, value) for name, value in os.environ.items() if name in LIBPQ_SETTINGS)
        env["PGAPPNAME"] = APPLICATION_NAME
        env["PGCONNECT_TIMEOUT"] = str(CONNECT_TIMEOUT_SECONDS)
        password = self._password()
        if password is None:
            if self.passfile:
                env["PGPASSFILE"] = str(self.passfile)
            yield env
            return
        with tempfile.TemporaryDirectory(prefix="spark-backup-pg-") as folder:
            passfile = Path(folder, "pgpass")
            fd = os.open(passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(f"*:*:*:*:{_passfile_escape(password)}\n")
            env["PGPASSFILE"] = str(passfile)
            yield env

    def tool(self, name: str, server_major: int) -> Path:
        """A client binary at least as new as the server: ``bin_dir``, else Debian's folder for
        the server's major version, else PATH. ``SourceError`` if older or missing."""
        candidates = []
        if self.bin_dir:
            candidates.append(self.bin_dir / name)
        else:
            candidates.append(Path(DEBIAN_BIN_DIRS.format(major=server_major), name))
            found = shutil.which(name)
            if found:
                candidates.append(Path(found))
        for path in candidates:
            if path.is_file() and os.access(path, os.X_OK):
                major, version = tool_version(str(path))
                if major < server_major:
                    raise SourceError(
                        f"source {self.source_name!r}: {path} is {version}, older than the "
                        f"server (major {server_major}); install the client of version "
                        f"{server_major} or newer, or set bin_dir"
                    )
                return path
        raise SourceError(
            f"source {self.source_name!r}: {name} not found "
            f"(looked in {', '.join(str(p.parent) for p in candidates) or 'PATH'})"
        )


@dataclass(frozen=True)
class ServerArchiveState:
    """What the server says about its WAL and its archiver (``pg_stat_archiver``)."""

    current_segment: str
    last_archived_wal: str | None
    last_failed_wal: str | None
    last_failed_time: dt.datetime | None
    failed_count: int
    segment_size: int = 16 * 1024 * 1024
    archive_timeout_seconds: int = 0

    def current_segment_archived(self, newest_archived: str) -> bool:
        """True when the archive holds the segment with the last byte the server wrote."""
        return newest_archived[8:24] >= self.current_segment[8:24]

    def completed_segments_archived(self, newest_archived: str) -> bool:
        """True when only the segment being written is missing from the archive."""
        previous = WalSegment.from_name(self.current_segment, self.segment_size).previous().name
        return newest_archived[8:24] >= previous[8:24]


def server_archive_state(server: PostgresServer) -> ServerArchiveState:
    import psycopg

    conn = server.connect()
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT w.file_name, w.file_offset, "
                "(SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'), "
                "(SELECT setting::int FROM pg_settings WHERE name = 'archive_timeout'), "
                "a.last_archived_wal, a.last_failed_wal, a.last_failed_time, a.failed_count "
                "FROM pg_walfile_name_offset(pg_current_wal_insert_lsn()) w, pg_stat_archiver a"
            )
            name, offset, segment_size, archive_timeout, *row = cursor.fetchone()
    except psycopg.Error as exc:
        raise SourceError(
            f"source {server.source_name!r}: cannot read the WAL position: "
            f"{first_line(str(exc), None)}"
        ) from None
    finally:
        conn.close()
    if offset <= WAL_PAGE_HEADER_BYTES:
        # Nothing but the page header written since the last switch: the WAL that matters ends
        # in the previous segment.
        name = WalSegment.from_name(name, segment_size).previous().name
    return ServerArchiveState(
        name, row[0], row[1], row[2], int(row[3]), int(segment_size), int(archive_timeout)
    )


def server_settings(server: PostgresServer, names: Sequence[str]) -> dict[str, str]:
    """The current values of ``names`` the plan's user may read (superuser-only ones are
    missing for others)."""
    import psycopg

    conn = server.connect()
    try:
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(names),)
            )
            return dict(cursor.fetchall())
    except psycopg.Error as exc:
        raise SourceError(
            f"source {server.source_name!r}: cannot read server settings: {first_line(str(exc))}"
        ) from None
    finally:
        conn.close()


@dataclass(frozen=True)
class SwitchedSegment:
    """What ``switch_wal`` made the server archive, and who the server is."""

    segment: str
    system_identifier: str
    server_version: str
    archive_mode: str


def switch_wal(server: PostgresServer) -> SwitchedSegment:
    """Close the current WAL segment so the archiver must archive it. A restore point first
    guarantees the segment holds a record, so that the switch is never a no-op (pgBackRest's
    check does the same). Needs a superuser, or EXECUTE on both functions."""
    import psycopg

    conn = server.connect()
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute(
                "SELECT system_identifier::text, current_setting('server_version'), "
                "current_setting('archive_mode') FROM pg_control_system()"
            )
            system_identifier, version, archive_mode = cursor.fetchone()
            if archive_mode == "off":
                raise SourceError(
                    f"source {server.source_name!r}: archive_mode is off on {server.where}; "
                    "see pg-setup-archiving"
                )
            cursor.execute("SELECT pg_create_restore_point(%s)", (f"{APPLICATION_NAME} check",))
            cursor.execute("SELECT pg_walfile_name(pg_switch_wal())")
            (segment,) = cursor.fetchone()
    except psycopg.Error as exc:
        raise SourceError(
            f"source {server.source_name!r}: cannot switch the WAL on {server.where}: "
            f"{first_line(str(exc))}"
        ) from None
    finally:
        conn.close()
    return SwitchedSegment(segment, system_identifier, version, archive_mode)


# Settings where a server may already have more than archiving needs: levels in order, and
# numbers where more is more (archive_timeout: less is more, 0 being off).
_LEVELS = {"wal_level": ["minimal", "replica", "logical"], "archive_mode": ["off", "on", "always"]}


def raise_only(wanted: dict[str, str], current: dict[str, str]) -> dict[str, str]:
    """The settings of ``wanted`` that would raise the server's, never lower one: a server
    with wal_level logical, more WAL senders or a shorter archive_timeout keeps them."""
    result = {}
    for name, value in wanted.items():
        now = current.get(name)
        if now is not None:
            if name in _LEVELS and now in _LEVELS[name] and value in _LEVELS[name]:
                if _LEVELS[name].index(now) >= _LEVELS[name].index(value):
                    continue
            elif (name == "max_wal_senders" and int(now) >= int(value)) or (
                name == "archive_timeout" and 0 < int(now) <= _seconds(value)
            ):
                continue
        result[name] = value
    return result


def _seconds(value: str) -> int:
    return int(value.removesuffix("s"))


def apply_settings(server: PostgresServer, settings: dict[str, str]) -> list[str]:
    """ALTER SYSTEM SET each setting, reload, and return those waiting for a restart."""
    import psycopg
    from psycopg import sql

    conn = server.connect()
    try:
        conn.autocommit = True
        with conn.cursor() as cursor:
            cursor.execute("SELECT pg_conf_load_time()")
            loaded_before = cursor.fetchone()[0]
            cursor.execute(
                "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)", (list(settings),)
            )
            settings = raise_only(settings, dict(cursor.fetchall()))
            for name, value in settings.items():
                # A utility statement takes no server-side parameters: the value is quoted here.
                cursor.execute(
                    sql.SQL("ALTER SYSTEM SET {} = {}").format(
                        sql.Identifier(name), sql.Literal(value)
                    )
                )
            cursor.execute("SELECT pg_reload_conf()")
    except psycopg.Error as exc:
        raise SourceError(
            f"source {server.source_name!r}: cannot change server settings: "
            f"{first_line(str(exc), None)}"
        ) from None
    finally:
        conn.close()
    # The reload is asynchronous: a new session sees it once the server has read the file.
    deadline = time.monotonic() + 10
    while True:
        conn = server.connect()
        try:
            with conn.cursor() as cursor:
                cursor.execute("SELECT pg_conf_load_time()")
                if cursor.fetchone()[0] > loaded_before or time.monotonic() > deadline:
                    cursor.execute(
                        "SELECT name FROM pg_settings WHERE pending_restart AND name = ANY(%s)",
                        (list(settings),),
                    )
                    return [row[0] for row in cursor.fetchall()]
        finally:
            conn.close()
        time.sleep(0.1)


def server_major(conn: psycopg.Connection) -> int:
    return conn.info.server_version // 10000


def server_version_text(conn: psycopg.Connection) -> str:
    with conn.cursor() as cursor:
        cursor.execute("SHOW server_version")
        return str(cursor.fetchone()[0])


def list_databases(conn: psycopg.Connection) -> list[str]:
    """Databases a dump can cover: those that accept connections, templates excluded."""
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate "
            "ORDER BY datname"
        )
        return [row[0] for row in cursor.fetchall()]


def table_row_counts(conn: psycopg.Connection, logged_only: bool = False) -> dict[str, int]:
    """Exact row counts of every ordinary table, in the connection's current snapshot."""
    counts: dict[str, int] = {}
    with conn.cursor() as cursor:
        cursor.execute(_TABLES_SQL)
        tables = [name for name, logged in cursor.fetchall() if logged or not logged_only]
        for table in tables:
            # The name comes from quote_ident, so it is safe to put into the statement.
            cursor.execute(f"SELECT count(*) FROM ONLY {table}")
            counts[table] = int(cursor.fetchone()[0])
    return counts


@functools.cache
def tool_version(path: str) -> tuple[int, str]:
    """(major, first line of --version) of a PostgreSQL client binary."""
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, check=True, env=tool_environment()
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SourceError(f"{path}: cannot read its version: {exc}") from None
    match = _VERSION_RE.search(out)
    if not match:
        raise SourceError(f"{path}: unexpected --version output {out[:80]!r}")
    return int(match[1]), out.splitlines()[0]


def _passfile_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def first_line(message: str, secret: str | None = None) -> str:
    """The first non-empty line of a driver's message, with ``secret`` masked. psycopg puts
    each address it tried on a line of its own ("- host: ...") after a heading line: those are
    kept, joined into one line."""
    lines = [part.strip() for part in message.splitlines() if part.strip()]
    attempts = [line.removeprefix("- ") for line in lines[1:] if line.startswith("- ")]
    line = "; ".join(attempts) if attempts else next(iter(lines), message)
    line = line.removeprefix(_CONNECTION_FAILED)
    return line.replace(secret, "***") if secret else line


class Background:
    """Run a function in a thread; ``result()`` waits and returns or re-raises."""

    def __init__(self, function: Callable[[], Any]):
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function: Any) -> None:
        try:
            self._value = function()
        except BaseException as exc:  # handed to result()
            self._error = exc

    def result(self) -> Any:
        import psycopg

        self._thread.join()
        if self._error is not None:
            detail = (
                first_line(str(self._error))
                if isinstance(self._error, psycopg.Error)
                else str(self._error)
            )
            raise SourceError(f"counting rows failed: {detail}") from None
        return self._value


def conf_value(value: str) -> str:
    """A value as postgresql.conf writes it: bare when it is a plain word or number, else in
    single quotes with quotes doubled."""
    if re.fullmatch(r"[A-Za-z0-9_.]+", value):
        return value
    return "'" + value.replace("'", "''") + "'"
