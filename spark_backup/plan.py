"""The protection plan: what is protected, where copies go, who can open them, how long they stay.

One YAML file, validated into typed models. Every mistake is reported as a ``PlanError`` whose
message is one line: ``FILE: FIELD: what was expected``. Credentials never appear in the plan;
stores name the environment variables that hold them.
"""

from __future__ import annotations

import datetime as dt
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from spark_backup.errors import NotFoundError, PlanError
from spark_backup.globs import glob_to_regex

PLAN_ENV = "SPARK_BACKUP_PLAN"
DEFAULT_PLAN_PATH = "spark_backup.yaml"

# Source and store names become Dagster asset keys and object-key prefixes, so they are restricted
# to what both accept.
NAME_PATTERN = r"^[a-z][a-z0-9_]{0,62}$"
AGE_RECIPIENT_PATTERN = re.compile(r"^age1[02-9ac-hj-np-z]{58}$")
OWNER_PATTERN = re.compile(r"^(team:[A-Za-z0-9_.-]+|[^@\s]+@[^@\s]+\.[^@\s]+)$")
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
MAX_DURATION_SECONDS = 100 * 365 * 86400
MIN_ORPHAN_GRACE = dt.timedelta(hours=1)


def parse_duration(value: Any) -> dt.timedelta:
    """Read ``15m``, ``2h``, ``7d``, ``1w`` (or a number of seconds) as a positive timedelta."""
    if isinstance(value, dt.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool):
        raise ValueError("expected a duration such as 15m, 2h, 7d")
    elif isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION_RE.match(str(value))
        if not match:
            raise ValueError(f"expected a duration such as 15m, 2h, 7d, got {value!r}")
        amount, unit = match.groups()
        seconds = float(amount) * _DURATION_UNITS[unit]
    if not 0 < seconds <= MAX_DURATION_SECONDS:
        raise ValueError(f"expected a duration above 0 and at most 100 years, got {value!r}")
    return dt.timedelta(seconds=seconds)


def format_duration(value: dt.timedelta) -> str:
    seconds = int(value.total_seconds())
    for unit in ("w", "d", "h", "m"):
        size = _DURATION_UNITS[unit]
        if seconds and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


Duration = Annotated[dt.timedelta, BeforeValidator(parse_duration)]
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
EnvName = Annotated[str, Field(pattern=ENV_NAME_PATTERN)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Retention(_Model):
    """Grandfather-father-son retention: how many daily, weekly and monthly copies to keep."""

    daily: int = Field(7, ge=0)
    weekly: int = Field(4, ge=0)
    monthly: int = Field(12, ge=0)


class Compression(_Model):
    level: int = Field(3, ge=1, le=19)
    threads: int = Field(2, ge=0, le=64)


# --- stores -----------------------------------------------------------------------------------


class LocalStoreConfig(_Model):
    """A folder on this machine: the embedded default."""

    name: Name
    kind: Literal["local"]
    path: str = ".spark_backup/store"


class ObjectLockConfig(_Model):
    """S3 Object Lock applied to every object written: the WORM tier."""

    mode: Literal["COMPLIANCE", "GOVERNANCE"]
    retain_days: int = Field(ge=1, le=36500)


class S3StoreConfig(_Model):
    """Any S3-compatible object storage, configured like dagster-aws's ``S3Resource``.

    Credentials are named by environment variable, never written here; without them boto3's
    default chain (instance profile, ``AWS_*`` variables, shared config) applies.
    """

    name: Name
    kind: Literal["s3"]
    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.-]+[a-z0-9]$")
    prefix: str = ""
    endpoint_url: str | None = Field(None, pattern=r"^https?://")
    region_name: str | None = None
    access_key_id_env: EnvName | None = None
    secret_access_key_env: EnvName | None = None
    session_token_env: EnvName | None = None
    object_lock: ObjectLockConfig | None = None
    part_size_mb: int = Field(16, ge=5, le=5120)
    max_attempts: int = Field(5, ge=1, le=20)

    @model_validator(mode="before")
    @classmethod
    def _refuse_inline_credentials(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for inline, ref in (
                ("aws_access_key_id", "access_key_id_env"),
                ("access_key_id", "access_key_id_env"),
                ("aws_secret_access_key", "secret_access_key_env"),
                ("secret_access_key", "secret_access_key_env"),
                ("aws_session_token", "session_token_env"),
                ("session_token", "session_token_env"),
            ):
                if inline in data:
                    raise ValueError(
                        f"inline credential '{inline}' is not allowed; name the environment "
                        f"variable that holds it with '{ref}'"
                    )
        return data

    @field_validator("prefix")
    @classmethod
    def _clean_prefix(cls, value: str) -> str:
        value = value.strip("/")
        if ".." in value.split("/"):
            raise ValueError("expected a key prefix without '..'")
        return value

    @model_validator(mode="after")
    def _credentials_in_pairs(self) -> S3StoreConfig:
        if (self.access_key_id_env is None) != (self.secret_access_key_env is None):
            raise ValueError("set both access_key_id_env and secret_access_key_env, or neither")
        return self


StoreConfig = Annotated[LocalStoreConfig | S3StoreConfig, Field(discriminator="kind")]


# --- sources ----------------------------------------------------------------------------------

Cadence = Literal["daily", "weekly", "monthly"]


class _SourceBase(_Model):
    name: Name
    description: str = ""
    cadence: Cadence
    owner: str
    rpo: Duration = dt.timedelta(days=1)
    rto: Duration = dt.timedelta(hours=2)
    # Freshness: the newest committed copy must be at most this old. The plan's rule is "warn after
    # 24 hours without a backup"; weekly and monthly sources override it.
    max_age: Duration | None = None
    store: Name | None = None
    retention: Retention | None = None
    compression: Compression | None = None

    @field_validator("owner")
    @classmethod
    def _owner_format(cls, value: str) -> str:
        if not OWNER_PATTERN.match(value):
            raise ValueError(f"expected an email address or 'team:NAME', got {value!r}")
        return value


class ConfigArchiveSource(_SourceBase):
    """Configuration trees (DGX, Kubernetes, VPN) archived with tar, modes and links kept."""

    kind: Literal["config_archive"]
    paths: list[str] = Field(min_length=1)
    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)
    one_file_system: bool = True

    @field_validator("include", "exclude")
    @classmethod
    def _valid_globs(cls, value: list[str]) -> list[str]:
        for pattern in value:
            glob_to_regex(pattern)
        return value

    @field_validator("paths")
    @classmethod
    def _absolute_or_relative(cls, value: list[str]) -> list[str]:
        for path in value:
            if not path.strip():
                raise ValueError("expected non-empty paths")
        return value


class PostgresBaseBackup(_Model):
    """Physical base backups (``pg_basebackup``): the starting point of point-in-time recovery."""

    enabled: bool = True
    cadence: Cadence = "daily"
    # fetch: the WAL needed to make the backup consistent travels inside it (self-contained);
    # none: it comes from the WAL archive at restore time.
    wal_method: Literal["fetch", "none"] = "fetch"
    checkpoint: Literal["fast", "spread"] = "fast"
    max_age: Duration | None = None
    # Exact row counts of every table, taken while the backup runs, for the recovery report.
    # They read every table once more: switch off for clusters too large for that.
    count_rows: bool = True


class PostgresSource(_SourceBase):
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
    password_env: EnvName | None = None
    passfile: str | None = None
    databases: list[str] | Literal["all"] = "all"
    exclude_databases: list[str] = Field(default_factory=list)
    # Where pg_dump, pg_basebackup, pg_restore, pg_ctl live; default: the server's major version
    # under /usr/lib/postgresql, else PATH.
    bin_dir: str | None = None
    rpo: Duration = dt.timedelta(minutes=15)
    base_backup: PostgresBaseBackup = PostgresBaseBackup()
    wal_archiving: bool = True

    @model_validator(mode="before")
    @classmethod
    def _refuse_inline_password(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            if "password" in data:
                raise ValueError(
                    "inline password is not allowed; name the environment variable that holds "
                    "it with 'password_env' (or use 'passfile')"
                )
            dsn = data.get("dsn")
            if isinstance(dsn, str) and (secret := _dsn_secret(dsn)):
                raise ValueError(
                    f"dsn must not contain a {secret}; name the environment variable that holds "
                    "a password with 'password_env' (or use 'passfile'), and keep key passwords "
                    "out of the plan"
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
        if self.password_env and self.passfile:
            raise ValueError("set password_env or passfile, not both")
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
    from psycopg2 import ProgrammingError
    from psycopg2.extensions import parse_dsn

    try:
        params = parse_dsn(dsn)
    except ProgrammingError:
        raise ValueError("dsn is not a libpq connection string or URI") from None
    return next((name for name in ("password", "sslpassword") if name in params), None)


SourceConfig = Annotated[ConfigArchiveSource | PostgresSource, Field(discriminator="kind")]
SOURCE_KINDS = ("config_archive", "postgres")
# Suffixes of the assets a source has beside backups/<name> (defs/assets.py names them).
WAL_ARCHIVE_ASSET_SUFFIX = "wal_archive"
DERIVED_ASSET_SUFFIXES = {"postgres": ("base", WAL_ARCHIVE_ASSET_SUFFIX)}
STORE_KINDS = ("local", "s3")


class Encryption(_Model):
    """age X25519 recipients. Identities (private keys) are only needed where a restore runs."""

    recipients: list[str] = Field(default_factory=list)
    recipients_files: list[str] = Field(default_factory=list)
    identity_file: str | None = None

    @field_validator("recipients")
    @classmethod
    def _valid_recipients(cls, value: list[str]) -> list[str]:
        for recipient in value:
            if not AGE_RECIPIENT_PATTERN.match(recipient.strip()):
                raise ValueError(
                    f"expected an age X25519 public key (age1... , 62 characters), got "
                    f"{recipient[:16]!r}..."
                )
        return [r.strip() for r in value]

    @field_validator("identity_file")
    @classmethod
    def _identity_is_a_path(cls, value: str | None) -> str | None:
        if value and value.strip().startswith("AGE-SECRET-KEY-"):
            raise ValueError("expected a path to an identity file; never put a private key here")
        return value

    @model_validator(mode="after")
    def _has_recipients(self) -> Encryption:
        if not self.recipients and not self.recipients_files:
            raise ValueError("expected at least one entry in recipients or recipients_files")
        return self


class Defaults(_Model):
    store: Name | None = None
    retention: Retention = Retention()
    compression: Compression = Compression()
    max_age: Duration = dt.timedelta(hours=24)
    # Leftovers younger than this may belong to a backup still running; it must be longer than
    # the longest backup (an S3 object's time is when its upload started).
    orphan_grace: Duration = dt.timedelta(hours=24)

    @field_validator("orphan_grace")
    @classmethod
    def _grace_covers_running_backups(cls, value: dt.timedelta) -> dt.timedelta:
        if value < MIN_ORPHAN_GRACE:
            raise ValueError(
                "expected at least 1h: prune must not take the data of a backup still running"
            )
        return value


class Plan(_Model):
    version: Literal[1] = 1
    defaults: Defaults = Defaults()
    encryption: Encryption
    stores: list[StoreConfig] = Field(min_length=1)
    sources: list[SourceConfig] = Field(min_length=1)

    @model_validator(mode="after")
    def _references(self) -> Plan:
        store_names = [s.name for s in self.stores]
        _unique(store_names, "stores")
        _unique([s.name for s in self.sources], "sources")
        if self.defaults.store and self.defaults.store not in store_names:
            raise ValueError(
                f"defaults.store names unknown store {self.defaults.store!r} "
                f"(expected one of: {', '.join(store_names)})"
            )
        # A postgres source's other assets are named after it (backups/<name>_base, ...).
        derived = {
            f"{source.name}_{suffix}": source.name
            for source in self.sources
            for suffix in DERIVED_ASSET_SUFFIXES.get(source.kind, ())
        }
        for index, source in enumerate(self.sources):
            if source.name in derived:
                raise ValueError(
                    f"sources[{index}].name {source.name!r} is the name of an asset of source "
                    f"{derived[source.name]!r}; rename one of them"
                )
            if source.store and source.store not in store_names:
                raise ValueError(
                    f"sources[{index}].store names unknown store {source.store!r} "
                    f"(expected one of: {', '.join(store_names)})"
                )
        return self

    # Resolved views: a source's effective settings after defaults.

    def source(self, name: str) -> SourceConfig:
        for source in self.sources:
            if source.name == name:
                return source
        raise NotFoundError(
            f"source {name!r} is not in the plan (sources: "
            f"{', '.join(s.name for s in self.sources)})"
        )

    def store_for(self, source: SourceConfig) -> StoreConfig:
        wanted = source.store or self.defaults.store or self.stores[0].name
        return next(s for s in self.stores if s.name == wanted)

    def retention_for(self, source: SourceConfig) -> Retention:
        return source.retention or self.defaults.retention

    def compression_for(self, source: SourceConfig) -> Compression:
        return source.compression or self.defaults.compression

    def max_age_for(self, source: SourceConfig) -> dt.timedelta:
        return source.max_age or self.defaults.max_age


def _unique(names: list[str], field: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ValueError(f"{field}: name {name!r} is used twice")
        seen.add(name)


def resolve_plan_path(path: str | os.PathLike[str] | None = None) -> Path:
    return Path(path or os.environ.get(PLAN_ENV) or DEFAULT_PLAN_PATH)


def load_plan(path: str | os.PathLike[str] | None = None) -> LoadedPlan:
    """Read and validate the plan; raise ``PlanError`` with one line naming file and field."""
    plan_path = resolve_plan_path(path)
    try:
        text = plan_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PlanError(
            f"{plan_path}: plan file not found (pass --plan or set {PLAN_ENV})"
        ) from None
    except OSError as exc:
        raise PlanError(f"{plan_path}: cannot read plan: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise PlanError(f"{plan_path}: {where}invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise PlanError(f"{plan_path}: expected a mapping with encryption, stores and sources")
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(f"{plan_path}: {describe_validation_error(exc, data)}") from None
    return LoadedPlan(plan=plan, path=plan_path.resolve())


class LoadedPlan:
    """A validated plan and the file it came from; relative paths resolve against that file."""

    def __init__(self, plan: Plan, path: Path):
        self.plan = plan
        self.path = path

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, path: str) -> Path:
        expanded = Path(os.path.expanduser(os.path.expandvars(path)))
        return Path(
            os.path.normpath(expanded if expanded.is_absolute() else self.base_dir / expanded)
        )


def describe_validation_error(exc: ValidationError, data: Any) -> str:
    """First pydantic error as ``field.path: expectation``, plus how many more there are."""
    errors = exc.errors(include_url=False)
    first = errors[0]
    loc = _field_path(first["loc"], data)
    if first["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc = f"{loc}.kind" if loc else "kind"
    message = _expectation(first)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{loc}: {message}{more}" if loc else f"{message}{more}"


def _field_path(loc: tuple[Any, ...], data: Any) -> str:
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            node = node[item] if isinstance(node, list) and item < len(node) else None
            continue
        # Discriminated unions add the tag (e.g. 'config_archive') to the location: skip it.
        if isinstance(node, Mapping) and item not in node and item in (*SOURCE_KINDS, *STORE_KINDS):
            continue
        parts.append(f".{item}" if parts else str(item))
        node = node.get(item) if isinstance(node, Mapping) else None
    return "".join(parts)


def _expectation(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "missing":
        return "field required"
    if kind == "extra_forbidden":
        return "unknown field"
    if kind == "union_tag_invalid":
        tag = error.get("ctx", {}).get("tag")
        expected = error.get("ctx", {}).get("expected_tags", "")
        return f"unknown kind {tag!r} (expected one of: {expected.replace(chr(39), '')})"
    if kind == "union_tag_not_found":
        return "field required"
    message = str(error["msg"])
    return message.removeprefix("Value error, ").removeprefix("Assertion failed, ")
