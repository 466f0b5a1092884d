"""PostgreSQL: logical dumps against the running server on 127.0.0.1:5432, base backups, WAL
archiving through ``archive_command`` and point-in-time recovery against throwaway clusters."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import psycopg
import pytest
import yaml
from dagster import AssetKey, DagsterInstance

from spark_backup.defs.build import build_definitions
from spark_backup.defs.drills import DRILL_CHECK, RTO_CHECK, drill_schedule_name
from spark_backup.defs.kpis import KPI_ASSET, KPI_JOB
from spark_backup.defs.schedules import log_checks_job_name
from spark_backup.engine.manifest import manifest_key
from spark_backup.errors import (
    IntegrityError,
    PlanError,
    RestoreRefused,
    SourceError,
    UsageError,
)
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup.sources.postgres import KIND as POSTGRES
from spark_backup.sources.postgres import ops
from spark_backup.sources.postgres.dump import with_large_writes
from spark_backup.sources.postgres.pitr import PgTarget
from spark_backup.sources.postgres.server import first_line
from spark_backup.sources.postgres.wal import archived_wal
from spark_backup_tests.helpers import (
    SPARK_BACKUP,
    flip_last_byte,
    free_port,
    make_key,
    plan_dict,
    run_cli,
    write_plan,
)
from spark_backup_tests.pg_cluster import (
    BIN_DIR,
    OS_USER,
    Cluster,
    archive_command,
    executable_for_postgres,
    shared_dir,
    throwaway_cluster,
)
from spark_backup_tests.pg_cluster import (
    SPARK_BACKUP as SPARK_BACKUP_BIN,
)

MAIN = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}
SAMPLE_SQL = """
CREATE SCHEMA app;
CREATE TABLE app.orders (
    id bigserial PRIMARY KEY, customer text, amount numeric(12, 2), payload jsonb, blob bytea,
    created timestamptz DEFAULT '2026-11-01 00:00:00+00'
);
INSERT INTO app.orders (customer, amount, payload, blob)
SELECT 'kunde-' || g || ' ü€', g * 1.25, jsonb_build_object('n', g), decode(md5(g::text), 'hex')
FROM generate_series(1, 5000) g;
CREATE TABLE "Mixed Case" (k int);
INSERT INTO "Mixed Case" SELECT generate_series(1, 10);
CREATE TABLE public.empty (x int);
"""


def main_conn(dbname: str = "postgres"):
    conn = psycopg.connect(dbname=dbname, connect_timeout=5, **MAIN)
    conn.autocommit = True
    return conn


def run_sql(statement: str, dbname: str = "postgres") -> list[tuple]:
    with closing(main_conn(dbname)) as conn, conn.cursor() as cursor:
        cursor.execute(statement)
        return cursor.fetchall() if cursor.description else []


def table_digests(query_conn) -> dict[str, tuple[int, str]]:
    """Row count and md5 of the ordered rows of every user table: equal digests, equal data."""
    with query_conn.cursor() as cursor:
        cursor.execute(
            "SELECT quote_ident(schemaname) || '.' || quote_ident(tablename) FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1"
        )
        tables = [row[0] for row in cursor.fetchall()]
        digests = {}
        for table in tables:
            cursor.execute(
                f"SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') "
                f"FROM {table} t"
            )
            digests[table] = cursor.fetchone()
    return digests


def drop_database(name: str) -> None:
    run_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sample_db() -> Iterator[str]:
    """A fresh database with a schema, odd names, unicode, bytea and jsonb; dropped after, with
    every database a test restored it into (named after it)."""
    name = f"sbtest_{uuid.uuid4().hex[:10]}"
    run_sql(f"CREATE DATABASE {name}")
    run_sql(SAMPLE_SQL, name)
    yield name
    for (other,) in run_sql(f"SELECT datname FROM pg_database WHERE datname LIKE '{name}%'"):
        drop_database(other)


def pg_source(name: str = "pg_main", **extra) -> dict:
    return {
        "name": name,
        "kind": "postgres",
        "cadence": "daily",
        "owner": "team:dba",
        **extra,
    }


@pytest.fixture
def dump_plan(tmp_path: Path, age_key, sample_db: str) -> Path:
    source = pg_source(
        **MAIN, databases=[sample_db], base_backup={"enabled": False}, wal_archiving=False
    )
    plan = plan_dict([age_key[1]], [source])
    plan["encryption"]["identity_file"] = str(age_key[0])
    return write_plan(tmp_path, plan)


# --- plan --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"password": "hunter2"}, "password: inline secret is not allowed"),
        ({"password": "vault:kv"}, "password: expected vault:MOUNT/PATH#FIELD"),
        ({"dsn": "postgresql://app:hunter2@db/app"}, "dsn must not contain a password"),
        ({"dsn": "host=db password=hunter2"}, "dsn must not contain a password"),
        ({"dsn": "host=db", "host": "db2"}, "set either dsn or host/port/user, not both"),
        ({"dsn": "host=db port='"}, "dsn is not a libpq connection string"),
        ({"password_env": "not-a-name"}, "password_env"),
        ({"base_backup": {"enabled": False}}, "wal_archiving needs base_backup.enabled"),
        ({"databases": []}, "databases: expected 'all' or a non-empty list of database names"),
        ({"dsn": "host=db sslpassword=hunter2"}, "dsn must not contain a sslpassword"),
        ({"dsn": "host=db", "port": 5999}, "set either dsn or host/port/user, not both"),
        ({"password_env": "PW", "passfile": "pgpass"}, "set password or passfile, not both"),
        ({"password_env": "PW", "password": "env:PW"}, "set password or password_env, not both"),
        (
            {"base_backup": {"wal_method": "none"}, "wal_archiving": False},
            "wal_method none needs wal_archiving",
        ),
        ({"databases": "everything"}, "databases: expected 'all' or a non-empty list"),
    ],
)
def test_plan_refuses_inline_secrets_and_contradictions(tmp_path, age_key, fields, expected):
    path = write_plan(tmp_path, plan_dict([age_key[1]], [pg_source(**fields)]))
    with pytest.raises(PlanError) as raised:
        load_plan(path)
    message = str(raised.value)
    assert expected in message and "\n" not in message
    assert "hunter2" not in message


def test_plan_refuses_a_source_named_like_another_sources_asset(tmp_path, age_key):
    sources = [pg_source(**MAIN), pg_source("pg_main_base", **MAIN)]
    path = write_plan(tmp_path, plan_dict([age_key[1]], sources))
    with pytest.raises(PlanError, match="'pg_main_base' is the name of an asset of source"):
        load_plan(path)


def test_plan_defaults_for_postgres(tmp_path, age_key):
    loaded = load_plan(write_plan(tmp_path, plan_dict([age_key[1]], [pg_source(**MAIN)])))
    source = loaded.plan.sources[0]
    assert source.rpo == dt.timedelta(minutes=15)
    assert source.databases == "all"
    assert source.base_backup.cadence == "daily" and source.wal_archiving
    artifacts = BackupService(loaded).artifacts(source)
    assert [(a.name, a.cadence, a.primary) for a in artifacts] == [
        ("dump", "daily", True),
        ("base", "daily", False),
    ]


# --- logical dumps -----------------------------------------------------------------------------


def test_dump_and_restore_round_trip(dump_plan: Path, sample_db: str, age_key) -> None:
    service = BackupService.from_path(dump_plan)
    manifests = service.backup("pg_main")
    assert [m.part for m in manifests] == ["globals", f"database:{sample_db}"]
    dump = manifests[1]
    meta = dump.source_metadata
    assert meta["row_counts"] == {
        'public."Mixed Case"': 10,
        "app.orders": 5000,
        "public.empty": 0,
    }
    assert meta["rows"] == 5010 and meta["database"] == sample_db
    assert meta["server_version"].startswith("15.")
    assert dump.tools["pg_dump"].startswith("pg_dump (PostgreSQL) 15")
    assert dump.data_key.endswith(".pgdump.zst.age") and dump.layers == ["age", "zstd", "pgdump"]
    assert "ROLE" in _plain_text(service, manifests[0])

    target = f"{sample_db}_restored"
    result = run_cli("--plan", str(dump_plan), "restore", dump.id, "--to-db", target, "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["rows"] == 5010 and summary["tables"] == 3
    with closing(main_conn(sample_db)) as original, closing(main_conn(target)) as restored:
        assert table_digests(restored) == table_digests(original)

    probe = run_cli("--plan", str(dump_plan), "plan", "check", "--probe")
    assert probe.returncode == 0, probe.stderr
    listing = json.loads(run_cli("--plan", str(dump_plan), "list", "--json").stdout)
    assert [row["part"] for row in listing] == ["globals", f"database:{sample_db}"]
    verify = run_cli("--plan", str(dump_plan), "verify", "--deep", "--json")
    assert verify.returncode == 0, verify.stderr
    assert all(row["ok"] for row in json.loads(verify.stdout))


@pytest.mark.parametrize("stdbuf", [True, False], ids=["stdbuf", "without-stdbuf"])
def test_a_dump_copy_restores_with_age_zstd_and_pg_restore_alone(
    dump_plan: Path, sample_db: str, age_key, monkeypatch, stdbuf: bool
) -> None:
    """The stored object is age over zstd over pg_dump's custom format, whether pg_dump wrote
    through stdbuf's large buffer or, where stdbuf is missing, its own: ``age -d | zstd -d |
    pg_restore`` gives back the database without spark-backup."""
    if not stdbuf:
        which = shutil.which
        monkeypatch.setattr(
            shutil,
            "which",
            lambda name, *a, **k: None if name == "stdbuf" else which(name, *a, **k),
        )
    assert (with_large_writes(["pg_dump"])[0] != "pg_dump") is stdbuf
    dump = BackupService.from_path(dump_plan).backup("pg_main")[1]
    [data] = (dump_plan.parent / "store").rglob(Path(dump.data_key).name)
    target = f"{sample_db}_plain"
    run_sql(f"CREATE DATABASE {target}")
    restored = subprocess.run(
        [
            "bash",
            "-o",
            "pipefail",
            "-c",
            f"age -d -i {age_key[0]} {data} | zstd -d | {BIN_DIR / 'pg_restore'} "
            f"--exit-on-error -h 127.0.0.1 -p 5432 -U postgres -d {target}",
        ],
        capture_output=True,
        text=True,
    )
    assert restored.returncode == 0, restored.stderr
    with closing(main_conn(sample_db)) as original, closing(main_conn(target)) as copy:
        assert table_digests(copy) == table_digests(original)


def _plain_text(service: BackupService, manifest) -> str:
    from spark_backup.engine.pipeline import open_copy

    ref = service.find(manifest.id)
    with open_copy(ref.store, ref.manifest, service.identities()) as plain:
        return plain.read().decode()


def test_row_counts_are_taken_in_the_dumps_snapshot(dump_plan: Path, sample_db: str) -> None:
    """Rows committed while the dump runs are neither in the dump nor in its counts: the
    restore's count check would fail if the counts came from another snapshot."""
    run_sql(
        "CREATE TABLE bulk AS SELECT g AS id, repeat(md5(g::text), 8) AS pad "
        "FROM generate_series(1, 150000) g",
        sample_db,
    )
    stop = threading.Event()
    inserted = []

    def writer() -> None:
        with closing(main_conn(sample_db)) as conn, conn.cursor() as cursor:
            while not stop.is_set():
                cursor.execute(
                    "INSERT INTO bulk VALUES (-1, 'x'); INSERT INTO app.orders DEFAULT VALUES"
                )
                inserted.append(1)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.3)
        service = BackupService.from_path(dump_plan)
        dump = service.backup("pg_main")[1]
    finally:
        stop.set()
        thread.join()
    assert len(inserted) > 10
    counts = dump.source_metadata["row_counts"]
    live = run_sql("SELECT count(*) FROM bulk", sample_db)[0][0]
    assert 150000 <= counts["public.bulk"] < live
    summary = service.restore_to("database", dump.id, f"{sample_db}_snap")
    assert summary["rows"] == dump.source_metadata["rows"]


def test_restore_refuses_existing_and_source_databases(dump_plan: Path, sample_db: str) -> None:
    service = BackupService.from_path(dump_plan)
    globals_copy, dump = service.backup("pg_main")
    with pytest.raises(RestoreRefused, match=r"is the one copy .* was taken from"):
        service.restore_to("database", dump.id, sample_db)
    run_sql(f"CREATE DATABASE {sample_db}_taken")
    result = run_cli("--plan", str(dump_plan), "restore", dump.id, "--to-db", f"{sample_db}_taken")
    assert result.returncode == 7
    assert "already exists" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    with pytest.raises(RestoreRefused, match="not a database dump"):
        service.restore_to("database", globals_copy.id, f"{sample_db}_globals")
    both = run_cli("--plan", str(dump_plan), "restore", dump.id, "--to", "x", "--to-db", "y")
    assert both.returncode == 2
    # --force replaces the contents of an existing database, and still checks the counts.
    run_sql("DELETE FROM app.orders WHERE id > 10", sample_db)
    forced = service.restore_to("database", dump.id, sample_db, flags={"force": True})
    assert forced["rows"] == 5010
    assert run_sql("SELECT count(*) FROM app.orders", sample_db)[0][0] == 5000


def test_failed_restore_leaves_no_database(dump_plan: Path, sample_db: str) -> None:
    service = BackupService.from_path(dump_plan)
    dump = service.backup("pg_main")[1]
    ref = service.find(dump.id)
    path = Path(ref.store.root, dump.data_key)  # type: ignore[attr-defined]
    path.chmod(0o644)
    path.write_bytes(flip_last_byte(path.read_bytes()))
    target = f"{sample_db}_damaged"
    result = run_cli("--plan", str(dump_plan), "restore", dump.id, "--to-db", target)
    assert result.returncode == 3, result.stderr
    assert run_sql(f"SELECT 1 FROM pg_database WHERE datname = '{target}'") == []
    # With --force, the database being replaced stays as it was until a checked copy is ready.
    run_sql("DELETE FROM app.orders WHERE id > 100", sample_db)
    with closing(main_conn(sample_db)) as conn:
        before = table_digests(conn)
    forced = run_cli("--plan", str(dump_plan), "restore", dump.id, "--to-db", sample_db, "--force")
    assert forced.returncode == 3, forced.stderr
    with closing(main_conn(sample_db)) as conn:
        assert table_digests(conn) == before
    assert run_sql("SELECT datname FROM pg_database WHERE datname LIKE '%spark_restore%'") == []


def test_bad_connections_and_tools_give_one_line(tmp_path: Path, age_key, sample_db) -> None:
    fake_bin = tmp_path / "oldbin"
    fake_bin.mkdir()
    for tool in ("pg_dump", "pg_dumpall"):
        old = fake_bin / tool
        old.write_text(f"#!/bin/sh\necho '{tool} (PostgreSQL) 9.6.24'\n")
        old.chmod(0o755)
    cases = [
        (pg_source(host="127.0.0.1", port=free_port(), user="postgres"), 6, "cannot connect"),
        (pg_source(**MAIN, databases=["no_such_db"]), 4, "'no_such_db' does not exist"),
        (
            pg_source(**MAIN, databases=[sample_db], bin_dir=str(fake_bin)),
            6,
            "older than the server",
        ),
        (pg_source(**MAIN, password_env="SB_TEST_UNSET_PW"), 9, "SB_TEST_UNSET_PW"),
    ]
    for index, (source, code, expected) in enumerate(cases):
        plan = write_plan(tmp_path, plan_dict([age_key[1]], [source]), f"plan{index}.yaml")
        result = run_cli("--plan", str(plan), "backup", "pg_main")
        assert result.returncode == code, (source, result.stderr)
        assert expected in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert not list((tmp_path / "store").rglob("*.json")) if (tmp_path / "store").exists() else True
    # The shared server allows no replication connection: --probe says so before a base backup.
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [pg_source(**MAIN)]), "replication.yaml")
    probe = run_cli("--plan", str(plan), "plan", "check", "--probe")
    assert probe.returncode == 6
    assert "cannot make a replication connection to 127.0.0.1:5432" in probe.stderr
    assert "no pg_hba.conf entry for replication" in probe.stderr


def test_connection_errors_keep_every_address_tried_on_one_line() -> None:
    """psycopg 3 words a refusal after several addresses as a heading and one line per address."""
    message = (
        "connection failed: Multiple connection attempts failed. All failures were:\n"
        "- host: 'db', port: '5432', hostaddr: '::1': connection failed: Connection refused\n"
        "\tIs the server running on that host and accepting TCP/IP connections?\n"
        "- host: 'db', port: '5432', hostaddr: '10.0.0.5': FATAL:  password authentication "
        'failed for user "app" s3cret'
    )
    assert first_line(message, "s3cret") == (
        "host: 'db', port: '5432', hostaddr: '::1': connection failed: Connection refused; "
        "host: 'db', port: '5432', hostaddr: '10.0.0.5': FATAL:  password authentication "
        'failed for user "app" ***'
    )
    assert first_line("connection failed: connection to server failed: FATAL:  no\nmore") == (
        "connection to server failed: FATAL:  no"
    )


def test_password_reaches_the_tools_and_never_the_output(tmp_path: Path, age_key) -> None:
    root = shared_dir("spark-backup-pw-")
    pwfile = root / "pw"
    pwfile.write_text("right-Pa55:word\n")
    if OS_USER:
        shutil.chown(pwfile, OS_USER)  # initdb reads it as the cluster's OS user
    try:
        with throwaway_cluster(
            "spark-backup-scram-", initdb_args=("-A", "scram-sha-256", f"--pwfile={pwfile}")
        ) as cluster:
            source = pg_source(
                host="127.0.0.1",
                port=cluster.port,
                user="postgres",
                password_env="SB_TEST_PW",
                databases=["postgres"],
                base_backup={"enabled": False},
                wal_archiving=False,
            )
            plan = write_plan(tmp_path, plan_dict([age_key[1]], [source]))
            wrong = run_cli(
                "--plan", str(plan), "backup", "pg_main", env={"SB_TEST_PW": "wrong-Secret-77"}
            )
            assert wrong.returncode == 6
            assert "password authentication failed" in wrong.stderr
            assert "wrong-Secret-77" not in wrong.stderr + wrong.stdout
            right = run_cli(
                "--plan",
                str(plan),
                "backup",
                "pg_main",
                "--json",
                env={"SB_TEST_PW": "right-Pa55:word"},
            )
            assert right.returncode == 0, right.stderr
            assert "right-Pa55" not in right.stdout + right.stderr
            stored = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*.json"))
            assert b"right-Pa55" not in stored
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- WAL push and fetch ------------------------------------------------------------------------


SEGMENT = "000000010000000000000007"


def test_wal_push_is_idempotent_and_refuses_other_content(dump_plan: Path, tmp_path) -> None:
    segment = tmp_path / "pg_wal" / SEGMENT
    segment.parent.mkdir()
    segment.write_bytes(bytes(range(256)) * 4096)
    plan = str(dump_plan)
    unmounted = run_cli("--plan", plan, "wal-push", str(segment))
    assert unmounted.returncode == 5 and "does not exist" in unmounted.stderr
    setup = run_cli("--plan", plan, "pg-setup-archiving")  # creates the store's folder
    assert setup.returncode == 0, setup.stderr
    first = run_cli("--plan", plan, "wal-push", str(segment))
    assert first.returncode == 0, first.stderr
    again = run_cli("--plan", plan, "wal-push", "--source", "pg_main", str(segment))
    assert again.returncode == 0 and "already archived" in again.stderr
    segment.write_bytes(b"other content")
    other = run_cli("--plan", plan, "wal-push", str(segment))
    assert other.returncode == 3 and "other content" in other.stderr
    service = BackupService.from_path(dump_plan)
    [archived] = archived_wal(service.store("local"), "pg_main")
    assert archived.name == SEGMENT

    fetched = tmp_path / "RECOVERYXLOG"
    ok = run_cli("--plan", plan, "wal-fetch", SEGMENT, str(fetched))
    assert ok.returncode == 0, ok.stderr
    assert fetched.read_bytes() == bytes(range(256)) * 4096
    missing = run_cli("--plan", plan, "wal-fetch", "000000010000000000000008", str(tmp_path / "x"))
    assert missing.returncode == 1 and not (tmp_path / "x").exists()
    history = run_cli("--plan", plan, "wal-fetch", "00000002.history", str(tmp_path / "h"))
    assert history.returncode == 1

    path = Path(service.store("local").root, archived.key)  # type: ignore[attr-defined]
    path.chmod(0o644)
    path.write_bytes(flip_last_byte(path.read_bytes()))
    damaged = run_cli("--plan", plan, "wal-fetch", SEGMENT, str(tmp_path / "d"))
    assert damaged.returncode == 255, damaged.stderr
    assert not list(tmp_path.glob("d*"))  # neither the file nor a partial one


def test_wal_fetch_aborts_recovery_when_the_store_is_unreachable(tmp_path, age_key) -> None:
    store = {
        "name": "s3",
        "kind": "s3",
        "bucket": "wal-archive",
        "endpoint_url": f"http://127.0.0.1:{free_port()}",
        "max_attempts": 1,
        "access_key_id_env": "SB_TEST_KEY",
        "secret_access_key_env": "SB_TEST_SECRET",
    }
    plan = plan_dict([age_key[1]], [pg_source(**MAIN)], stores=[store])
    plan["encryption"]["identity_file"] = str(age_key[0])
    path = write_plan(tmp_path, plan)
    result = run_cli(
        "--plan",
        str(path),
        "wal-fetch",
        SEGMENT,
        str(tmp_path / "seg"),
        env={"SB_TEST_KEY": "k", "SB_TEST_SECRET": "s"},
    )
    assert result.returncode == 255, result.stderr
    assert not (tmp_path / "seg").exists()


def test_wal_fetch_in_standby_mode_waits_out_a_brief_store_outage(
    dump_plan: Path, tmp_path: Path
) -> None:
    """The store's folder is gone (an unmounted disk) for two seconds: a standby's wal-fetch
    retries and restores the file; an outage longer than its retry window exits 1, which a
    standby answers by asking again later, never 255, which would stop it."""
    segment = tmp_path / "pg_wal" / SEGMENT
    segment.parent.mkdir()
    segment.write_bytes(os.urandom(64 * 1024))
    (tmp_path / "store").mkdir()  # as pg-setup-archiving leaves it
    assert run_cli("--plan", str(dump_plan), "wal-push", str(segment)).returncode == 0
    store, away = tmp_path / "store", tmp_path / "store-unmounted"
    store.rename(away)
    restored = tmp_path / "restored"
    fetch = ["wal-fetch", "--standby", "--retry-seconds", "60", SEGMENT, str(restored)]
    fetching = subprocess.Popen(
        [*SPARK_BACKUP, "--no-progress", "--plan", str(dump_plan), *fetch],
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2)
    assert fetching.poll() is None  # still retrying, quietly
    away.rename(store)
    _, errors = fetching.communicate(timeout=60)
    assert fetching.returncode == 0, errors
    assert restored.read_bytes() == segment.read_bytes() and errors == ""

    store.rename(away)
    started = time.monotonic()
    longer = run_cli(
        "--plan", str(dump_plan), "wal-fetch", "--standby", "--retry-seconds", "1",
        SEGMENT, str(tmp_path / "never"),
    )  # fmt: skip
    assert longer.returncode == 1, longer.stderr
    assert time.monotonic() - started >= 1
    assert "holds no WAL at all" in longer.stderr
    assert len(longer.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "never").exists()
    # Without --standby, the same outage aborts recovery at once (exit 255).
    aborted = run_cli("--plan", str(dump_plan), "wal-fetch", SEGMENT, str(tmp_path / "never"))
    assert aborted.returncode == 255


# --- archiving, base backups, PITR -------------------------------------------------------------


class Archiving:
    """A throwaway cluster archiving through ``spark-backup wal-push`` into a local store."""

    def __init__(self, cluster: Cluster, root: Path, plan: Path):
        self.cluster = cluster
        self.root = root
        self.plan = plan

    @property
    def service(self) -> BackupService:
        return BackupService.from_path(self.plan)

    def write_plan(self, name: str, **changes) -> Path:
        plan = yaml.safe_load(self.plan.read_text())
        plan["sources"][0].update(changes.pop("source", {}))
        plan.update(changes)
        path = self.root / name
        path.write_text(yaml.safe_dump(plan))
        path.chmod(0o644)
        return path


@pytest.fixture(scope="module")
def archiving() -> Iterator[Archiving]:
    root = shared_dir("spark-backup-archiving-")
    key, public = make_key(root)
    key.chmod(0o644)
    # archive_command runs as the cluster's OS user and writes below store/pg_main/wal.
    (root / "store" / "pg_main" / "wal").mkdir(parents=True)
    for folder in (root / "store", root / "store" / "pg_main", root / "store" / "pg_main" / "wal"):
        shutil.chown(folder, root.owner(), root.group())
    plan_path = root / "plan.yaml"
    port = free_port()
    source = pg_source(host="127.0.0.1", port=port, user="postgres")
    plan = plan_dict(
        [public], [source], stores=[{"name": "local", "kind": "local", "path": str(root / "store")}]
    )
    plan["encryption"]["identity_file"] = str(key)
    plan_path.write_text(yaml.safe_dump(plan))
    plan_path.chmod(0o644)
    settings = {
        "wal_level": "replica",
        "archive_mode": "on",
        "archive_timeout": "60s",
        "archive_command": archive_command(plan_path, "pg_main"),
        "max_wal_senders": "4",
    }
    cluster = Cluster(root / "cluster", port)
    (root / "cluster").mkdir()
    shutil.chown(root / "cluster", root.owner(), root.group())
    with executable_for_postgres():
        try:
            cluster.init(settings).start()
            yield Archiving(cluster, root, plan_path)
        finally:
            cluster.stop()
            for pid_file in root.glob("pitr*/data/postmaster.pid"):
                Cluster(pid_file.parent.parent, 0).stop()
            shutil.rmtree(root, ignore_errors=True)


def test_pitr_drill_recovers_exactly_the_rows_before_the_damage(archiving: Archiving) -> None:
    cluster = archiving.cluster
    cluster.execute("CREATE TABLE ledger (id int PRIMARY KEY, note text)")
    cluster.execute(
        "INSERT INTO ledger SELECT g, 'before base ' || g FROM generate_series(1, 100) g"
    )
    [base] = archiving.service.backup("pg_main", artifact="base")
    meta = base.source_metadata
    assert base.part == "base" and meta["timeline"] == 1
    assert (
        meta["start_lsn"]
        and meta["end_lsn"]
        and meta["row_counts"]["postgres"] == {"public.ledger": 100}
    )
    deep = archiving.service.verify(archiving.service.find(base.id), archiving.service.identities())
    assert deep.ok, deep.error
    cluster.execute(
        "INSERT INTO ledger SELECT g, 'after base ' || g FROM generate_series(101, 250) g"
    )
    cluster.execute("CREATE TABLE keep_me AS SELECT 42 AS answer")
    with closing(cluster.connect()) as conn:
        expected = table_digests(conn)
    time.sleep(1.1)
    target = dt.datetime.now(dt.UTC)
    time.sleep(1.1)
    cluster.execute("DELETE FROM ledger WHERE id > 50")
    cluster.execute("DROP TABLE keep_me")
    cluster.execute("CREATE TABLE after_target (x int)")
    cluster.switch_wal_and_wait()
    assert ops.wal_archive_status(archiving.service, archiving.service.source("pg_main")).ok

    target_dir = archiving.root / "pitr_drill"
    result = run_cli(
        "--plan",
        str(archiving.plan),
        "pg-pitr",
        "pg_main",
        "--to-time",
        target.isoformat(),
        "--target-dir",
        str(target_dir),
        "--port",
        str(free_port()),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] and report["base_copy_id"] == base.id and report["wal_files"] >= 1
    assert report["stopped"].startswith("before a transaction")
    assert report["databases"]["postgres"]["row_counts"] == {
        "public.keep_me": 1,
        "public.ledger": 250,
    }
    recovered = psycopg.connect(
        host=str(target_dir), port=report["port"], user="postgres", dbname="postgres"
    )
    with closing(recovered):
        assert table_digests(recovered) == expected
    assert json.loads((target_dir / "pitr.json").read_text())["ok"]
    assert not (target_dir / "wal_archive").exists()
    Cluster(target_dir, report["port"]).stop()


def test_pitr_to_a_restore_point_an_xid_an_lsn_and_immediate(archiving: Archiving) -> None:
    cluster = archiving.cluster
    service = archiving.service
    service.backup("pg_main", artifact="base")
    cluster.execute("CREATE TABLE steps (step int, xid bigint)")
    cluster.execute("INSERT INTO steps VALUES (1, txid_current())")
    cluster.execute("SELECT pg_create_restore_point('before two')")
    (lsn,) = cluster.execute("SELECT pg_current_wal_lsn()::text")[0]
    cluster.execute("INSERT INTO steps VALUES (2, txid_current())")
    cluster.execute("INSERT INTO steps VALUES (3, txid_current())")
    (xid,) = cluster.execute("SELECT xid FROM steps WHERE step = 2")[0]
    cluster.switch_wal_and_wait()

    def steps_after(target: PgTarget, folder: str) -> list[int] | None:
        port = free_port()
        report = ops.pitr(
            service, POSTGRES, service.source("pg_main"), target, archiving.root / folder, port=port
        )
        assert report.ok and report.target_time == target.describe()
        try:
            with (
                closing(
                    psycopg.connect(host=str(archiving.root / folder), port=port, user="postgres")
                ) as conn,
                conn.cursor() as cursor,
            ):
                cursor.execute("SELECT to_regclass('steps') IS NOT NULL")
                if not cursor.fetchone()[0]:
                    return None
                cursor.execute("SELECT step FROM steps ORDER BY step")
                return [row[0] for row in cursor.fetchall()]
        finally:
            Cluster(archiving.root / folder, port).stop()

    assert steps_after(PgTarget(name="before two"), "pitr_name") == [1]
    assert steps_after(PgTarget(xid=xid), "pitr_xid") == [1, 2]
    assert steps_after(PgTarget(xid=xid, inclusive=False), "pitr_xid_exclusive") == [1]
    assert steps_after(PgTarget(lsn=lsn), "pitr_lsn") == [1]
    # The base backup was taken before the table: consistent, and not a transaction more.
    assert steps_after(PgTarget(immediate=True), "pitr_immediate") is None


def test_pitr_target_options_are_checked_before_anything_is_touched(archiving: Archiving) -> None:
    never = archiving.root / "pitr_never"
    cases = [
        ([], "choose a recovery target"),
        (["--to-xid", "7", "--to-name", "x"], "choose one recovery target"),
        (["--to-lsn", "3000060"], "is not a WAL position such as 0/3000060"),
        (["--to-name", "n" * 64], "a restore point name has 1 to 63 bytes"),
        (["--immediate", "--exclusive"], "--exclusive applies to --to-time, --to-xid"),
        (["--to-time", "latest", "--immediate"], "--to-time latest is a recovery target"),
    ]
    for options, expected in cases:
        result = run_cli(
            "--plan", str(archiving.plan), "pg-pitr", *options, "--target-dir", str(never)
        )
        assert result.returncode == 2, (options, result.stderr)
        assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not never.exists()


def test_list_shows_the_wal_each_base_backup_needs(archiving: Archiving) -> None:
    (base,) = archiving.service.backup("pg_main", artifact="base")
    archiving.cluster.switch_wal_and_wait()
    listed = run_cli("--plan", str(archiving.plan), "list", "pg_main", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["id"]: row for row in json.loads(listed.stdout)}
    log = rows[base.id]["log"]
    meta = base.source_metadata
    assert (log["start"], log["stop"]) == (meta["start_lsn"], meta["end_lsn"])
    assert log["first"] <= log["last"] and log["complete"] and log["missing"] is None
    assert all("log" not in row for row in rows.values() if row["part"] != "base")

    # A copy of the archive without the base's first segment: the listing names it.
    store_copy = archiving.root / "store_without_first"
    shutil.copytree(archiving.root / "store", store_copy)
    for key in store_copy.glob(f"pg_main/wal/*/{log['first']}-*"):
        key.unlink()
    plan = archiving.write_plan(
        "without_first.yaml", stores=[{"name": "local", "kind": "local", "path": str(store_copy)}]
    )
    rows = {
        row["id"]: row for row in json.loads(run_cli("--plan", str(plan), "list", "--json").stdout)
    }
    assert rows[base.id]["log"]["complete"] is False
    assert rows[base.id]["log"]["missing"] == log["first"]
    text = run_cli("--plan", str(plan), "list", "pg_main").stdout  # the cell may wrap
    assert "MISSING" in text and f"{log['first']}.." in text


def test_pitr_refuses_bad_targets(archiving: Archiving) -> None:
    service = archiving.service
    if not service.copies("pg_main", "base"):
        service.backup("pg_main", artifact="base")
    busy = archiving.root / "busy"
    busy.mkdir()
    (busy / "something").write_text("x")
    with pytest.raises(RestoreRefused, match="is not empty"):
        ops.pitr(service, POSTGRES, service.source("pg_main"), dt.datetime.now(dt.UTC), busy)
    with pytest.raises(UsageError, match="before the oldest base backup"):
        ops.pitr(
            service,
            POSTGRES,
            service.source("pg_main"),
            dt.datetime(2026, 1, 2, tzinfo=dt.UTC),
            archiving.root / "early",
        )
    bad = run_cli(
        "--plan",
        str(archiving.plan),
        "pg-pitr",
        "--to-time",
        "yesterday",
        "--target-dir",
        str(archiving.root / "never"),
    )
    assert bad.returncode == 2 and "not an ISO 8601 time" in bad.stderr
    assert not (archiving.root / "early").exists() and not (archiving.root / "never").exists()


def test_pitr_reports_the_last_reachable_point_of_an_archive_with_a_gap(
    archiving: Archiving,
) -> None:
    """A copy of the archive with one segment missing: recovery must say where it can get to,
    not stop early in silence."""
    cluster = archiving.cluster
    archiving.service.backup("pg_main", artifact="base")
    cluster.execute("CREATE TABLE gap_test (x int)")
    cluster.execute("INSERT INTO gap_test VALUES (1)")
    cluster.switch_wal_and_wait()
    cluster.execute("INSERT INTO gap_test VALUES (2)")
    missing = cluster.switch_wal_and_wait()
    cluster.execute("INSERT INTO gap_test VALUES (3)")
    cluster.switch_wal_and_wait()
    target = dt.datetime.now(dt.UTC)
    cluster.execute("INSERT INTO gap_test VALUES (4)")
    cluster.switch_wal_and_wait()

    store_copy = archiving.root / "store_with_gap"
    shutil.copytree(archiving.root / "store", store_copy)
    for key in store_copy.glob(f"pg_main/wal/*/{missing}-*"):
        key.unlink()
    plan = archiving.write_plan(
        "gap.yaml", stores=[{"name": "local", "kind": "local", "path": str(store_copy)}]
    )
    gapped = BackupService.from_path(plan)
    with pytest.raises(IntegrityError) as raised:
        ops.pitr(
            gapped,
            POSTGRES,
            gapped.source("pg_main"),
            target,
            archiving.root / "pitr_gap",
            port=free_port(),
            stop_after=True,
        )
    message = str(raised.value)
    assert f"segment {missing} is missing" in message
    assert "the last reachable point is 20" in message  # a time from the server log
    assert "\n" not in message
    # "latest" must not pass a gap off as the end of the archive either.
    with pytest.raises(IntegrityError, match=f"stopped at a gap .* segment {missing} is missing"):
        ops.pitr(
            gapped,
            POSTGRES,
            gapped.source("pg_main"),
            None,
            archiving.root / "pitr_gap_latest",
            port=free_port(),
            stop_after=True,
        )


def test_wal_archive_lag_check_passes_then_fails_beyond_the_rpo(archiving: Archiving) -> None:
    cluster = archiving.cluster
    cluster.switch_wal_and_wait()
    strict = archiving.write_plan("strict.yaml", source={"rpo": "2s"})
    for plan, expect in ((archiving.plan, True), (strict, False)):
        if not expect:
            cluster.execute("CREATE TABLE IF NOT EXISTS lag_probe (x int)")
            cluster.execute("INSERT INTO lag_probe VALUES (1)")  # WAL the archive does not have
            time.sleep(3)
        defs = build_definitions(load_plan(plan))
        with DagsterInstance.ephemeral() as instance:
            result = defs.resolve_job_def(
                log_checks_job_name(POSTGRES.log_asset_suffix)
            ).execute_in_process(instance=instance, raise_on_error=False)
        [evaluation] = result.get_asset_check_evaluations()
        assert evaluation.check_name == POSTGRES.lag_check_name
        assert evaluation.passed is expect, evaluation.description
        lag = evaluation.metadata["lag_seconds"].value
        assert (lag < 5) if expect else (lag >= 2)
    status = run_cli("--plan", str(strict), "wal-status", "--json")
    assert status.returncode == 3 and json.loads(status.stdout)["ok"] is False


def test_prune_expires_wal_older_than_every_kept_base_backup(archiving: Archiving) -> None:
    service = archiving.service
    service.backup("pg_main", artifact="base")
    archiving.cluster.switch_wal_and_wait()
    [newest] = service.backup("pg_main", artifact="base")
    archiving.cluster.switch_wal_and_wait()
    one_a_day = archiving.write_plan(
        "keep_one.yaml", source={"retention": {"daily": 1, "weekly": 0, "monthly": 0}}
    )
    report = BackupService.from_path(one_a_day).prune(dry_run=True)
    assert newest.id in report.kept and report.expired
    start = newest.source_metadata["start_lsn"]
    from spark_backup.sources.postgres.walname import WalSegment

    first_needed = WalSegment.from_lsn(start, 1).position
    expired = {key.rsplit("/", 1)[1][:24] for key in report.log_expired}
    assert expired and all(name[8:] < first_needed for name in expired)
    remaining = {w.name for w in archived_wal(service.store("local"), "pg_main")} - expired
    assert any(name[8:24] >= first_needed for name in remaining)
    assert manifest_key("pg_main", newest.id)


def test_retention_keeps_each_part_as_its_own_series(dump_plan: Path, sample_db: str) -> None:
    """Two dump runs on one day: the newest globals and the newest database dump both stay
    (a rule over all copies of the source would keep only one of them)."""
    service = BackupService.from_path(dump_plan)
    service.backup("pg_main")
    newest = service.backup("pg_main")
    plan = yaml.safe_load(dump_plan.read_text())
    plan["sources"][0]["retention"] = {"daily": 1, "weekly": 0, "monthly": 0}
    dump_plan.write_text(yaml.safe_dump(plan))
    report = BackupService.from_path(dump_plan).prune(dry_run=False)
    assert sorted(report.kept) == sorted(m.id for m in newest)
    assert len(report.expired) == 2
    assert sorted(r.manifest.id for r in service.copies("pg_main")) == sorted(m.id for m in newest)


def test_definitions_for_a_postgres_source(tmp_path: Path, age_key) -> None:
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [pg_source(**MAIN)]))
    defs = build_definitions(load_plan(plan))
    graph = defs.get_repository_def().asset_graph
    assert {key.to_user_string() for key in graph.get_all_asset_keys()} == {
        "systems/pg_main",
        "backups/pg_main",
        "backups/pg_main_base",
        "backups/pg_main_wal_archive",
        "recovery/pg_main",
        "drills/pg_main",
        "drills/pg_main_base",
        KPI_ASSET.to_user_string(),
    }
    # Lineage: the system feeds its copies and its WAL; base backups and WAL feed recovery.
    assert graph.get(AssetKey.from_user_string("backups/pg_main")).parent_keys == {
        AssetKey.from_user_string("systems/pg_main")
    }
    assert graph.get(AssetKey.from_user_string("recovery/pg_main")).parent_keys == {
        AssetKey.from_user_string("backups/pg_main_base"),
        AssetKey.from_user_string("backups/pg_main_wal_archive"),
    }
    assert {(c.asset_key.to_user_string(), c.name) for c in graph.asset_check_keys} == {
        ("backups/pg_main", "checksum"),
        ("backups/pg_main", "freshness"),
        ("backups/pg_main", "retention"),
        ("backups/pg_main_base", "checksum"),
        ("backups/pg_main_base", "freshness"),
        ("backups/pg_main_base", "retention"),
        ("backups/pg_main_wal_archive", POSTGRES.lag_check_name),
        *(
            (f"drills/{a}", c)
            for a in ("pg_main", "pg_main_base")
            for c in (DRILL_CHECK, RTO_CHECK)
        ),
        ("systems/pg_main", "secret_rotation"),
    }
    repository = defs.get_repository_def()
    assert {s.name for s in repository.schedule_defs} == {
        "daily_backups_schedule",
        "freshness_checks_schedule",
        f"{log_checks_job_name(POSTGRES.log_asset_suffix)}_schedule",
        "observe_systems_schedule",
        "recovery_windows_schedule",
        drill_schedule_name("daily"),
        f"{KPI_JOB}_schedule",
        "secret_rotation_checks_schedule",
    }
    assert (
        repository.get_schedule_def(
            f"{log_checks_job_name(POSTGRES.log_asset_suffix)}_schedule"
        ).cron_schedule
        == "*/5 * * * *"
    )
    for key in ("backups/pg_main", "backups/pg_main_base"):
        node = graph.get(AssetKey.from_user_string(key))
        assert node.owners == ["team:dba"] and "postgres" in node.kinds
        assert node.group_name == "postgres" and node.partitions_def is not None


def test_backup_as_root_before_the_first_wal_push_leaves_the_wal_writable(tmp_path) -> None:
    """The store folder belongs to the server's user; a base backup run as root creates the
    source's folders first: wal-push, run by the server as that user, must still write."""
    root = shared_dir("spark-backup-firstpush-")
    try:
        _key, public = make_key(root)
        store = root / "store"
        store.mkdir()
        shutil.chown(store, root.owner(), root.group())  # as pg-setup-archiving leaves it
        port = free_port()
        plan_path = root / "plan.yaml"
        source = pg_source(host="127.0.0.1", port=port, user="postgres")
        plan = plan_dict(
            [public], [source], stores=[{"name": "local", "kind": "local", "path": str(store)}]
        )
        plan_path.write_text(yaml.safe_dump(plan))
        plan_path.chmod(0o644)
        settings = {
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": archive_command(plan_path, "pg_main"),
            "max_wal_senders": "4",
        }
        cluster = Cluster(root / "cluster", port)
        (root / "cluster").mkdir()
        shutil.chown(root / "cluster", root.owner(), root.group())
        with executable_for_postgres():
            try:
                # archive_command fails until the first backup: no segment is complete yet.
                cluster.init(settings).start()
                backup = run_cli(
                    "--plan", str(plan_path), "backup", "pg_main", "--artifact", "base"
                )
                assert backup.returncode == 0, backup.stderr
                for folder in (store / "pg_main", *(store / "pg_main").rglob("*")):
                    if folder.is_dir():
                        assert folder.owner() == store.owner(), folder
                segment = cluster.switch_wal_and_wait(timeout=60)
                assert (store / "pg_main" / "wal").is_dir()
                assert any(segment in path.name for path in (store / "pg_main" / "wal").rglob("*"))
            finally:
                cluster.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_pg_check_sends_a_segment_through_the_archive(archiving: Archiving) -> None:
    result = run_cli("--plan", str(archiving.plan), "pg-check", "--json", "--timeout", "60")
    assert result.returncode == 0, result.stderr
    check = json.loads(result.stdout)
    assert check["store"] == "local" and check["seconds"] < 60
    assert archived_wal(archiving.service.store("local"), "pg_main", check["segment"])
    # A plan whose store the server does not archive into: the segment never arrives there.
    (archiving.root / "elsewhere").mkdir()
    other = archiving.write_plan(
        "elsewhere.yaml",
        stores=[{"name": "local", "kind": "local", "path": str(archiving.root / "elsewhere")}],
    )
    missed = run_cli("--plan", str(other), "pg-check", "--timeout", "1")
    assert missed.returncode == 6
    assert missed.stderr.startswith("error: source 'pg_main': WAL segment ")
    assert "did not arrive in store 'local' within 1 s" in missed.stderr
    assert len(missed.stderr.strip().splitlines()) == 1


def test_pg_check_refuses_base_backups_of_another_cluster_or_major() -> None:
    def base(system_identifier: str, version: str) -> SimpleNamespace:
        meta = {"system_identifier": system_identifier, "server_version": version}
        return SimpleNamespace(id="20261129T000000Z-pg_main-base-0001", source_metadata=meta)

    ops.check_same_cluster("pg_main", "7001", "15.4", [base("7001", "15.2")])
    with pytest.raises(IntegrityError, match="system identifier 7001 is not that of base backup"):
        ops.check_same_cluster("pg_main", "7001", "15.4", [base("7002", "15.4")])
    with pytest.raises(IntegrityError, match=r"runs PostgreSQL 16\.1, base backup .* from 15\.4"):
        ops.check_same_cluster("pg_main", "7001", "16.1", [base("7001", "15.4")])


def test_probe_makes_a_replication_connection(archiving: Archiving) -> None:
    """A walsender takes replication commands only: the probe's IDENTIFY_SYSTEM must pass."""
    probe = run_cli("--plan", str(archiving.plan), "plan", "check", "--probe")
    assert probe.returncode == 0, probe.stderr
    assert "plan is valid" in probe.stdout


def test_probe_runs_archive_command_as_the_servers_user(archiving: Archiving) -> None:
    """The traps of archive_command, which runs as postgres: an interpreter under a folder that
    user cannot enter (exit 126), and a store folder it cannot write. plan check --probe runs
    the server's own command with --dry-run as that user and names the fix."""
    cluster = archiving.cluster
    (original,) = cluster.execute("SHOW archive_command")[0]
    closed = archiving.root / "closed"
    closed.mkdir(mode=0o700)
    shutil.chown(closed, "root", "root")
    wrapper = closed / "spark-backup"
    wrapper.write_text(f'#!/bin/sh\nexec {SPARK_BACKUP_BIN} "$@"\n')
    wrapper.chmod(0o755)
    root_store = archiving.root / "root_store"
    root_store.mkdir(mode=0o755)
    shutil.chown(root_store, "root", "root")
    unwritable = archiving.write_plan(
        "root_store.yaml", stores=[{"name": "local", "kind": "local", "path": str(root_store)}]
    )

    def probe_with(command: str):
        cluster.execute(f"ALTER SYSTEM SET archive_command = '{command}'")
        cluster.execute("SELECT pg_reload_conf()")
        return run_cli("--plan", str(archiving.plan), "plan", "check", "--probe")

    try:
        closed_venv = probe_with(f"{wrapper} --plan {archiving.plan} wal-push %p")
        assert closed_venv.returncode == 6, closed_venv.stderr
        assert "archive_command cannot start as OS user postgres (exit 126" in closed_venv.stderr
        assert "install spark-backup where postgres can run it" in closed_venv.stderr
        assert len(closed_venv.stderr.strip().splitlines()) == 1

        no_write = probe_with(f"{SPARK_BACKUP_BIN} --plan {unwritable} wal-push %p")
        assert no_write.returncode == 6, no_write.stderr
        assert "archive_command fails as OS user postgres" in no_write.stderr
        assert f"{root_store} is not writable by user postgres" in no_write.stderr
    finally:
        cluster.execute(f"ALTER SYSTEM SET archive_command = '{original}'")
        cluster.execute("SELECT pg_reload_conf()")
    ok = run_cli("--plan", str(archiving.plan), "plan", "check", "--probe")
    assert ok.returncode == 0, ok.stderr


def test_setup_archiving_prints_and_applies_the_settings(archiving: Archiving) -> None:
    printed = run_cli("--plan", str(archiving.plan), "pg-setup-archiving", "pg_main")
    assert printed.returncode == 0, printed.stderr
    lines = dict(line.split(" = ", 1) for line in printed.stdout.splitlines() if " = " in line)
    assert lines["wal_level"] == "replica" and lines["archive_mode"] == "on"
    assert lines["archive_timeout"] == "60s"
    assert f"--plan {archiving.plan} wal-push --source pg_main %p" in lines["archive_command"]
    applied = run_cli("--plan", str(archiving.plan), "pg-setup-archiving", "--apply")
    assert applied.returncode == 0, applied.stderr
    # Archiving was on already; only max_wal_senders (4 in the fixture) waits for a restart.
    assert applied.stdout.strip().endswith("restart PostgreSQL for max_wal_senders")
    assert archiving.cluster.execute("SHOW archive_timeout") == [("1min",)]
    archiving.cluster.switch_wal_and_wait()  # the applied archive_command works


def test_setup_archiving_gives_the_wal_folders_to_the_servers_user(archiving: Archiving) -> None:
    """Run as root, pg-setup-archiving makes a new local store's WAL folders and gives them to
    the server's OS user, so that its archive_command can write there."""
    fresh = archiving.root / "fresh_store"
    plan = archiving.write_plan(
        "fresh.yaml", stores=[{"name": "local", "kind": "local", "path": str(fresh)}]
    )
    printed = run_cli("--plan", str(plan), "pg-setup-archiving", "pg_main")
    assert printed.returncode == 0, printed.stderr
    wal = fresh / "pg_main" / "wal"
    for folder in (fresh, fresh / "pg_main", wal):
        assert folder.owner() == "postgres", folder
        assert f"# {folder} now belongs to postgres" in printed.stdout
    push = [str(SPARK_BACKUP_BIN), "--plan", str(plan), "wal-push", "--dry-run"]
    dry_run = subprocess.run(
        ["runuser", "-u", "postgres", "--", *push],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert dry_run.returncode == 0, dry_run.stderr
    assert f"wal-push would archive into {fresh.as_uri()}/pg_main/wal/" in dry_run.stdout
    again = run_cli("--plan", str(plan), "pg-setup-archiving", "pg_main")
    assert "now belongs to" not in again.stdout  # nothing left to change


def test_a_dump_cut_off_mid_stream_leaves_no_copy(dump_plan: Path, sample_db: str) -> None:
    """The server ends pg_dump's session while it streams: that database gets no copy, not
    even an invisible one; the globals copy made before it stays valid."""
    run_sql(
        "CREATE TABLE bulk AS SELECT g AS id, repeat(md5(g::text), 16) AS pad "
        "FROM generate_series(1, 400000) g",
        sample_db,
    )
    killed = []

    def terminate_the_dump() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not killed:
            rows = run_sql(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                "AND query LIKE 'COPY public.bulk%'",
                sample_db,
            )
            for (pid,) in rows:
                run_sql(f"SELECT pg_terminate_backend({pid})")
                killed.append(pid)
            time.sleep(0.01)

    thread = threading.Thread(target=terminate_the_dump)
    thread.start()
    service = BackupService.from_path(dump_plan)
    try:
        with pytest.raises(SourceError, match=f"pg_dump of '{sample_db}'"):
            service.backup("pg_main")
    finally:
        thread.join()
    assert killed
    [copy] = service.copies("pg_main")
    assert copy.manifest.part == "globals" and service.verify(copy).ok
    files = [p.name for p in (dump_plan.parent / "store").rglob("*") if p.is_file()]
    assert not [name for name in files if ".pgdump." in name]


def test_recovery_failure_names_the_startup_reason_not_our_refused_polls(tmp_path: Path) -> None:
    """While recovery runs our polls are refused with FATAL lines that can be logged after the
    startup process's own FATAL; the reason must stay the startup process's."""
    from spark_backup.sources.postgres import pitr as recovery

    log = tmp_path / recovery.LOG_FILE
    earlier = "2026-11-27 10:00:00.000 UTC [90] FATAL:  an earlier start's reason\n"
    log.write_text(
        earlier
        + "2026-11-27 10:00:01.100 UTC [101] LOG:  starting point-in-time recovery\n"
        + "2026-11-27 10:00:01.200 UTC [102] FATAL:  the database system is not yet accepting"
        " connections\n"
        + f"2026-11-27 10:00:01.300 UTC [101] FATAL:  {recovery.ENDED_EARLY}\n"
        + "2026-11-27 10:00:01.310 UTC [103] FATAL:  the database system is in recovery mode\n"
        + "2026-11-27 10:00:01.320 UTC [104] FATAL:  the database system is shutting down\n"
    )
    reason = recovery._log_failure(log, len(earlier))
    assert recovery.ENDED_EARLY in reason and "recovery mode" not in reason
    only_polls = tmp_path / "polls.log"
    only_polls.write_text("x [1] FATAL:  the database system is starting up\n")
    assert "it stopped" in recovery._log_failure(only_polls, 0)


def test_pitr_prefetches_a_bounded_window_ahead_of_replay(
    archiving: Archiving, monkeypatch
) -> None:
    """With a window of one segment the server is served file by file as it asks (and again a
    segment it asks for after it was deleted: PostgreSQL rereads the last one at promotion); it
    stops exactly at the target, the WAL far beyond it is never fetched, and the prefetch
    folder is gone afterwards."""
    from spark_backup.sources.postgres import pitr as recovery
    from spark_backup.sources.postgres import prefetch

    monkeypatch.setattr(prefetch, "PREFETCH_AHEAD", 1)
    cluster = archiving.cluster
    [base] = archiving.service.backup("pg_main", artifact="base")
    cluster.execute("CREATE TABLE windowed (x int)")
    cluster.execute("INSERT INTO windowed VALUES (1)")
    cluster.switch_wal_and_wait()
    time.sleep(1.1)
    target = dt.datetime.now(dt.UTC)
    time.sleep(1.1)
    cluster.execute("INSERT INTO windowed VALUES (2)")
    # Whole segments of WAL after the target: more than PostgreSQL's read-ahead (512 kB).
    for _ in range(2):
        cluster.execute("INSERT INTO windowed SELECT generate_series(3, 400000)")
        cluster.switch_wal_and_wait()
    report = ops.pitr(
        archiving.service,
        POSTGRES,
        archiving.service.source("pg_main"),
        target,
        archiving.root / "pitr_window",
        port=free_port(),
        stop_after=False,
    )
    try:
        assert report.ok and report.base_copy_id == base.id
        after_base = [
            w
            for w in archived_wal(archiving.service.store("local"), "pg_main")
            if w.is_segment and w.modified >= base.started
        ]
        assert report.wal_files <= len(after_base) - 2
        assert {"fetch_wal_busy", "recovery_waited_for_wal"} <= set(report.seconds)
        log = (Path(report.target_dir) / recovery.LOG_FILE).read_text()
        assert recovery.ENDED_EARLY not in log  # one start: the server waited for the files
        assert "the database system is" not in log  # waiting for promotion makes no connections
        assert not (Path(report.target_dir) / recovery.WAL_CACHE_FOLDER).exists()
        recovered = psycopg.connect(
            host=report.target_dir, port=report.port, user="postgres", dbname="postgres"
        )
        with closing(recovered), recovered.cursor() as cursor:
            cursor.execute("SELECT array_agg(x ORDER BY x) FROM windowed")
            assert cursor.fetchone()[0] == [1]
    finally:
        Cluster(Path(report.target_dir), report.port).stop()


def test_pitr_refuses_a_damaged_segment_and_never_replays_it(archiving: Archiving) -> None:
    """A segment whose stored object was damaged stops recovery with an error naming it; the
    server is stopped, never handed the file, and the prefetch folder is removed."""
    from spark_backup.sources.postgres import pitr as recovery

    cluster = archiving.cluster
    archiving.service.backup("pg_main", artifact="base")
    cluster.execute("CREATE TABLE damaged (x int)")
    cluster.execute("INSERT INTO damaged VALUES (1)")
    damaged = cluster.switch_wal_and_wait()
    cluster.execute("INSERT INTO damaged VALUES (2)")
    cluster.switch_wal_and_wait()
    [stored] = (archiving.root / "store" / "pg_main" / "wal").glob(f"*/{damaged}-*.zst.age")
    original = stored.read_bytes()
    spoiled = bytearray(original)
    spoiled[len(spoiled) // 2] ^= 0xFF
    stored.chmod(0o644)
    stored.write_bytes(bytes(spoiled))
    target_dir = archiving.root / "pitr_damaged"
    try:
        with pytest.raises(IntegrityError, match=damaged):
            ops.pitr(
                archiving.service,
                POSTGRES,
                archiving.service.source("pg_main"),
                None,
                target_dir,
                port=free_port(),
            )
    finally:
        stored.write_bytes(original)
    report = json.loads((target_dir / recovery.REPORT_FILE).read_text())
    assert not report["ok"] and damaged in report["error"]
    assert not (target_dir / recovery.WAL_CACHE_FOLDER).exists()
    assert not (target_dir / recovery.DATA_FOLDER / "postmaster.pid").exists()  # stopped
    log = (target_dir / recovery.LOG_FILE).read_text()
    assert f'restored log file "{damaged}"' not in log


def test_pitr_latest_replays_everything_whatever_the_umask(archiving: Archiving) -> None:
    """Fetched WAL is handed to the cluster's OS user: with root's umask 077 a `cp` that cannot
    read it would once have ended recovery early and silently."""
    cluster = archiving.cluster
    archiving.service.backup("pg_main", artifact="base")
    cluster.execute("CREATE TABLE umask_probe AS SELECT generate_series(1, 10) AS x")
    cluster.switch_wal_and_wait()
    cluster.execute("INSERT INTO umask_probe VALUES (11)")
    cluster.switch_wal_and_wait()
    previous = os.umask(0o077)
    try:
        report = ops.pitr(
            archiving.service,
            POSTGRES,
            archiving.service.source("pg_main"),
            None,
            archiving.root / "pitr_umask",
            port=free_port(),
        )
    finally:
        os.umask(previous)
    try:
        assert report.ok
        recovered = psycopg.connect(
            host=report.target_dir, port=report.port, user="postgres", dbname="postgres"
        )
        with closing(recovered), recovered.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM umask_probe")
            assert cursor.fetchone()[0] == 11
    finally:
        Cluster(Path(report.target_dir), report.port).stop()


def test_restore_keeps_encoding_and_replaces_a_busy_database(tmp_path: Path, age_key) -> None:
    """The restored database gets the dumped one's encoding and locale; --force ends the
    sessions on the database it replaces, and the old one goes only once the new one is in."""
    name = f"sbtest_{uuid.uuid4().hex[:10]}"
    run_sql(
        f"CREATE DATABASE {name} TEMPLATE template0 ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C'"
    )
    try:
        run_sql("CREATE TABLE t (s text); INSERT INTO t VALUES ('Grüße')", name)
        source = pg_source(
            **MAIN, databases=[name], base_backup={"enabled": False}, wal_archiving=False
        )
        plan = plan_dict([age_key[1]], [source])
        plan["encryption"]["identity_file"] = str(age_key[0])
        service = BackupService.from_path(write_plan(tmp_path, plan))
        dump = service.backup("pg_main")[1]
        assert dump.source_metadata["encoding"] == "LATIN1"
        target = f"{name}_copy"
        service.restore_to("database", dump.id, target)
        assert run_sql(
            f"SELECT pg_encoding_to_char(encoding), datcollate FROM pg_database WHERE datname = '{target}'"
        ) == [("LATIN1", "C")]
        busy = main_conn(target)  # a client still connected to the database being replaced
        try:
            summary = service.restore_to("database", dump.id, target, flags={"force": True})
        finally:
            busy.close()
        assert summary["rows"] == 1
        assert run_sql("SELECT s FROM t", target) == [("Grüße",)]
        leftovers = run_sql(f"SELECT datname FROM pg_database WHERE datname LIKE '{name}%'")
        assert sorted(row[0] for row in leftovers) == [name, target]
    finally:
        for (other,) in run_sql(f"SELECT datname FROM pg_database WHERE datname LIKE '{name}%'"):
            drop_database(other)


def test_setup_archiving_never_lowers_a_setting() -> None:
    from spark_backup.sources.postgres.server import raise_only

    wanted = {
        "wal_level": "replica",
        "archive_mode": "on",
        "archive_timeout": "60s",
        "archive_command": "spark-backup wal-push %p",
        "max_wal_senders": "10",
    }
    current = {
        "wal_level": "logical",
        "archive_mode": "off",
        "archive_timeout": "30",
        "archive_command": "(disabled)",
        "max_wal_senders": "20",
    }
    assert raise_only(wanted, current) == {
        "archive_mode": "on",
        "archive_command": "spark-backup wal-push %p",
    }
    lower = {"wal_level": "minimal", "archive_timeout": "0", "max_wal_senders": "0"}
    assert raise_only(wanted, lower) == wanted


def test_lag_of_an_idle_server_is_bounded_by_archive_timeout() -> None:
    """Idle: every completed segment archived, the open one holding only records that never
    force a switch. The lag is at most archive_timeout, not the time since the last switch."""
    from spark_backup.sources.postgres.ops import WalArchiveStatus
    from spark_backup.sources.postgres.server import ServerArchiveState
    from spark_backup.sources.postgres.wal import ArchivedWal

    now = dt.datetime(2026, 11, 27, 12, tzinfo=dt.UTC)
    archived = ArchivedWal(
        "000000010000000000000005", "0" * 64, "k", now - dt.timedelta(hours=3), 1
    )
    idle = ServerArchiveState("000000010000000000000006", None, None, None, 0, 16 << 20, 60)
    status = WalArchiveStatus("pg", dt.timedelta(minutes=15), now, archived, idle)
    assert status.lag == dt.timedelta(seconds=60) and status.ok
    behind = ServerArchiveState("000000010000000000000007", None, None, None, 0, 16 << 20, 60)
    status = WalArchiveStatus("pg", dt.timedelta(minutes=15), now, archived, behind)
    assert status.lag == dt.timedelta(hours=3) and not status.ok
    no_timeout = ServerArchiveState("000000010000000000000006", None, None, None, 0, 16 << 20, 0)
    status = WalArchiveStatus("pg", dt.timedelta(minutes=15), now, archived, no_timeout)
    assert status.lag == dt.timedelta(hours=3)


def test_a_missing_database_is_told_apart_by_asking_the_server(tmp_path: Path, age_key) -> None:
    """libpq gives no SQLSTATE for a refused connection: a missing database is found by asking
    the server, whatever words the message uses, and a missing maintenance database too."""
    from spark_backup.errors import NotFoundError
    from spark_backup.sources.postgres.ops import server_of

    plan = write_plan(
        tmp_path, plan_dict([age_key[1]], [pg_source(**MAIN, maintenance_db="gone_db")])
    )
    service = BackupService.from_path(plan)
    server = server_of(service, service.source("pg_main"))
    for database in ("gone_db", "another_missing_db"):
        with pytest.raises(NotFoundError, match=f"database '{database}' does not exist"):
            server.connect(database)
    assert server.connect("postgres").close() is None  # an existing database still connects
