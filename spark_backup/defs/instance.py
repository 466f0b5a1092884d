"""Preparing a Dagster instance for a plan: its config file and one pool per source.

Two configs ship with the package: ``dagster.yaml`` (SQLite under $DAGSTER_HOME, the embedded
default) and ``dagster_postgres.yaml`` (PostgreSQL, the queued coordinator's limits, run retries
and run monitoring: a shared installation, see docs/deploy.md), into which ``--postgres URL``
writes the server's address; the password always comes from the environment.

Each backup asset runs in its own pool (``defs/assets.py``); ``dagster.yaml`` limits pools to
one run at a time. Dagster 1.13 creates a pool's limit lazily, after the run queue has read the
configured pools, so in the very first queue pass that sees a new pool two runs of the same
source could both start. Setting every source's pool up front closes that gap.
"""

import json
import os
import shutil
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import sqlalchemy.exc
import yaml
from dagster import DagsterInstance

from spark_backup.defs.assets import source_pool
from spark_backup.errors import UsageError
from spark_backup.plan import Plan

SOURCE_POOL_LIMIT = 1
INSTANCE_CONFIG = "dagster.yaml"
POSTGRES_TEMPLATE = "dagster_postgres.yaml"
PASSWORD_ENV = "DAGSTER_PG_PASSWORD"
POSTGRES_SCHEMES = ("postgresql", "postgresql+psycopg2")


def packaged_config(name: str) -> Path:
    return Path(str(resources.files("spark_backup.defs").joinpath(name)))


def postgres_instance_config(url: str) -> str:
    """The PostgreSQL instance config with the server, port, user and database of ``url``
    written in (comments kept); the password stays an environment variable."""
    parts = urlsplit(url)
    if parts.scheme not in POSTGRES_SCHEMES:
        raise UsageError(f"--postgres {parts.scheme}://...: not a PostgreSQL URL (postgresql://)")
    if parts.password is not None:
        raise UsageError(
            f"--postgres: leave the password out of the URL; the services read it from {PASSWORD_ENV}"
        )
    database = unquote(parts.path.lstrip("/"))
    if not (parts.hostname and parts.username and database):
        raise UsageError("--postgres: give user, host and database: postgresql://USER@HOST:PORT/DB")
    try:
        port = parts.port or 5432
    except ValueError:
        raise UsageError(f"--postgres: {parts.netloc}: the port is not a number") from None
    text = packaged_config(POSTGRES_TEMPLATE).read_text()
    written = {
        ("hostname", "DAGSTER_PG_HOST"): parts.hostname,
        ("port", "DAGSTER_PG_PORT"): port,
        ("username", "DAGSTER_PG_USER"): unquote(parts.username),
        ("db_name", "DAGSTER_PG_DB"): database,
    }
    for (field, env), value in written.items():
        block = f"      {field}:\n        env: {env}\n"
        assert block in text, f"{POSTGRES_TEMPLATE} lost its {field} block"
        # JSON scalars are YAML scalars: a name with a colon or a quote stays one string.
        text = text.replace(block, f"      {field}: {json.dumps(value)}\n")
    params = dict(parse_qsl(parts.query))
    if params:
        scheme_line = "      scheme: postgresql+psycopg2\n"
        text = text.replace(scheme_line, f"{scheme_line}      params: {json.dumps(params)}\n")
    (storage,) = yaml.safe_load(text)["storage"].values()
    assert storage["postgres_db"]["hostname"] == parts.hostname
    assert storage["postgres_db"]["port"] == port
    return text


def install_instance_config(dagster_home: Path, template: Path | None = None) -> bool:
    """Copy ``template`` (default: spark-backup's dagster.yaml) into DAGSTER_HOME unless one is
    there; True if copied."""
    source = template or packaged_config(INSTANCE_CONFIG)
    if not source.is_file():
        raise UsageError(f"{source}: instance config not found")
    dagster_home.mkdir(parents=True, exist_ok=True)
    target = dagster_home / INSTANCE_CONFIG
    if target.exists():
        return False
    shutil.copyfile(source, target)
    return True


def install_postgres_config(dagster_home: Path, url: str) -> bool:
    """Write the PostgreSQL instance config for ``url`` into DAGSTER_HOME; True if written,
    False if the same config is there. A different config there is refused, never replaced."""
    text = postgres_instance_config(url)
    target = dagster_home / INSTANCE_CONFIG
    if target.exists():
        if target.read_text() == text:
            return False
        raise UsageError(
            f"{target}: an instance config is there already and differs; move it away to "
            "install the PostgreSQL one (runs recorded in SQLite stay in that folder)"
        )
    if PASSWORD_ENV not in os.environ:
        raise UsageError(f"set {PASSWORD_ENV} (empty for trust or peer authentication)")
    dagster_home.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    return True


def ensure_source_pools(instance: DagsterInstance, plan: Plan) -> list[str]:
    """Give every source's pool its limit, unless an operator set one; return the pools set."""
    explicit = {p.name for p in instance.event_log_storage.get_pool_limits() if not p.from_default}
    changed = []
    for source in plan.sources:
        pool = source_pool(source.name)
        if pool not in explicit:
            instance.event_log_storage.set_concurrency_slots(pool, SOURCE_POOL_LIMIT)
            changed.append(pool)
    return changed


def prepare_instance(
    dagster_home: Path, plan: Plan, template: Path | None = None, postgres: str | None = None
) -> tuple[bool, list[str]]:
    """Install the instance config (unless one is there; the PostgreSQL one for ``postgres``)
    and set every source's pool, which also creates the storage's tables; return whether the
    config was installed and the pools set."""
    if postgres:
        installed = install_postgres_config(dagster_home, postgres)
    else:
        installed = install_instance_config(dagster_home, template)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    try:
        with DagsterInstance.get() as instance:
            pools = ensure_source_pools(instance, plan)
    except Exception as exc:
        unreachable = _connection_error(exc)
        if unreachable is None:
            raise
        # psycopg2's first line names the server and why (refused, no such database, bad
        # password); it never carries the password.
        reason = str(unreachable.orig or unreachable).strip().splitlines()[0]
        raise UsageError(
            f"{dagster_home / INSTANCE_CONFIG}: the instance storage cannot be reached: {reason}"
        ) from None
    return installed, pools


def _connection_error(exc: BaseException | None) -> sqlalchemy.exc.OperationalError | None:
    """The database connection error behind ``exc`` (dagster-postgres wraps it after retrying)."""
    while exc is not None:
        if isinstance(exc, sqlalchemy.exc.OperationalError):
            return exc
        exc = exc.__cause__
    return None
