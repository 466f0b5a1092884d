"""The plan model of a ``postgres`` source."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from spark_backup.engine.secrets import SecretReference, env_reference
from spark_backup.engine.settings import Duration, SettingsModel
from spark_backup.plan.source import CadenceName, SourceSettings


class PostgresBaseBackup(SettingsModel):
    """Physical base backups (``pg_basebackup``): the starting point of point-in-time recovery."""

    enabled: bool = True
    cadence: CadenceName = "daily"
    # fetch: the WAL needed to make the backup consistent travels inside it (self-contained);
    # none: it comes from the WAL archive at restore time.
    wal_method: Literal["fetch", "none"] = "fetch"
    checkpoint: Literal["fast", "spread"] = "fast"
    max_age: Duration | None = None
    # Exact row counts of every table, taken while the backup runs, for the recovery report.
    # They read every table once more: switch off for clusters too large for that.
    count_rows: bool = True


class PostgresWalPusher(SettingsModel):
    """Asynchronous WAL archiving (``wal-pusher``): archive_command hands each WAL file to a
    resident pusher through ``spool`` and returns once the pusher has stored it."""

    # A folder the server's OS user can write (requests and acknowledgements, never WAL data).
    spool: str
    # Segments stored at once (the pusher reads ahead of the server's calls).
    parallel: int = Field(4, ge=1, le=32)
    # How long archive_command waits for the store before it fails (the server keeps the
    # file and calls again).
    ack_timeout: int = Field(60, ge=1, le=3600)


class PostgresWalReceive(SettingsModel):
    """A ``wal-receive`` service streams this source: its ``wal_receiver`` check watches it."""

    # Physical replication slot (default: spark_backup_<source>).
    slot: str | None = None
    # The receiver's spool (wal-receive --spool's default); on the check's host, its status
    # tells when the store last held everything received.
    spool: str | None = None
    # The check fails when the store's newest streamed WAL is further behind the server.
    max_lag: Duration = dt.timedelta(seconds=30)


class PostgresSource(SourceSettings):
    """A PostgreSQL cluster: logical dumps per database and globals, physical base backups and
    continuous WAL archiving for point-in-time recovery."""

    kind: Literal["postgres"]
    # libpq connection string or URI, without a password; or host/port/user below.
    dsn: str | None = None
    host: str | None = None
    port: int = Field(5432, ge=1, le=65535)
    user: str | None = None
    # The database connected to for listing databases and server facts.
    maintenance_db: str = "postgres"
    # A reference (env:NAME or vault:MOUNT/PATH#FIELD), never the password; the older
    # password_env: NAME reads as env:NAME.
    password: SecretReference | None = None
    passfile: str | None = None
    databases: list[str] | Literal["all"] = "all"
    exclude_databases: list[str] = Field(default=[])
    # Where pg_dump, pg_basebackup, pg_restore, pg_ctl live; default: the server's major version
    # under /usr/lib/postgresql, else PATH.
    bin_dir: str | None = None
    rpo: Duration = dt.timedelta(minutes=15)
    base_backup: PostgresBaseBackup = PostgresBaseBackup.default_instance()
    wal_archiving: bool = True
    # Set: archive_command hands WAL to a resident ``wal-pusher`` (see PostgresWalPusher).
    wal_pusher: PostgresWalPusher | None = None
    # Set: a ``wal-receive`` service streams the WAL, and its ``wal_receiver`` check runs.
    wal_receive: PostgresWalReceive | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_inline_password(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            data = env_reference(dict(data), "password_env", "password")
            dsn = data.get("dsn")
            if isinstance(dsn, str) and (secret := _dsn_secret(dsn)):
                raise ValueError(
                    f"dsn must not contain a {secret}; name where the password is with "
                    "'password: env:NAME' or 'password: vault:MOUNT/PATH#FIELD' (or use "
                    "'passfile'), and keep key passwords out of the plan"
                )
        return data

    @field_validator("databases", mode="before")
    @classmethod
    def _database_names(cls, value: Any) -> Any:
        if value != "all" and (
            not isinstance(value, list)
            or not value
            or not all(isinstance(name, str) and name for name in value)
        ):
            raise ValueError("expected 'all' or a non-empty list of database names")
        return value

    @model_validator(mode="after")
    def _dsn_or_host(self) -> PostgresSource:
        if self.dsn and ({"host", "port", "user"} & self.model_fields_set):
            raise ValueError("set either dsn or host/port/user, not both")
        if self.password and self.passfile:
            raise ValueError("set password or passfile, not both")
        if self.base_backup.wal_method == "none" and not self.wal_archiving:
            raise ValueError(
                "base_backup.wal_method none needs wal_archiving: such a base backup is "
                "consistent only with the archived WAL"
            )
        if self.wal_archiving and not self.base_backup.enabled:
            raise ValueError(
                "wal_archiving needs base_backup.enabled: WAL replays only onto a base backup"
            )
        return self


def _dsn_secret(dsn: str) -> str | None:
    """The secret a libpq connection string holds, if any (never echoed)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError:
        raise ValueError("dsn is not a libpq connection string or URI") from None
    return next((name for name in ("password", "sslpassword") if name in params), None)
