"""The PostgreSQL runbook is also a test: its by-hand blocks (docs/runbooks/postgres.md) run as
an operator would paste them, with age, zstd, jq and the PostgreSQL tools alone, against
throwaway clusters that spark-backup backed up (and, for point-in-time recovery, archived
through ``wal-push``)."""

from __future__ import annotations

import datetime as dt
import getpass
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import yaml

from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup.sources.postgres.settings import PostgresSource
from spark_backup_tests.helpers import flip_last_byte, free_port, make_key, plan_dict, write_plan
from spark_backup_tests.pg_cluster import (
    BIN_DIR,
    OS_USER,
    Cluster,
    archive_command,
    as_os_user,
    chown_tree,
    executable_for_postgres,
    shared_dir,
    throwaway_cluster,
)

DOCS = Path(__file__).resolve().parents[1] / "docs"
RUNBOOK = DOCS / "runbooks" / "postgres.md"
PLAN_DOC = DOCS / "plan.md"
SOURCE = "maindb"
TOOLS = ["age", "zstd", "jq", "tar", "sha256sum", "date", *(["runuser"] if OS_USER else [])]
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None] + [
    str(BIN_DIR / name)
    for name in ("initdb", "pg_ctl", "psql", "pg_verifybackup")
    if not (BIN_DIR / name).exists()
]

# .ci/run installs every one of these: a missing tool fails the test rather than skipping it.
needs_tools = pytest.mark.usefixtures("runbook_tools")


@pytest.fixture
def runbook_tools() -> None:
    if MISSING:
        pytest.fail(f"the runbook's by-hand blocks need: {', '.join(MISSING)}")


def runbook_block(marker: str) -> str:
    blocks = re.findall(r"```bash\n(.*?)```", RUNBOOK.read_text(), flags=re.DOTALL)
    (block,) = [b for b in blocks if b.startswith(marker)]
    return block


def run_block(marker: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", runbook_block(marker)],
        env={**os.environ, "PATH": f"{BIN_DIR}:{os.environ['PATH']}", **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@dataclass
class Estate:
    cluster: Cluster
    service: BackupService
    key: Path
    store: Path

    def libpq_env(self) -> dict[str, str]:
        return {"PGHOST": "127.0.0.1", "PGPORT": str(self.cluster.port), "PGUSER": "postgres"}


@contextmanager
def postgres_estate(tmp_path: Path, archiving: bool) -> Iterator[Estate]:
    """A cluster and a plan with one postgres source on a local store. The plan and the store
    live where the cluster's OS user can reach them: its archive_command runs spark-backup."""
    home = shared_dir("spark-backup-runbook-")
    plan = home / "spark_backup.yaml"
    (home / "store" / SOURCE / "wal").mkdir(parents=True)
    chown_tree(home)
    key, public = make_key(tmp_path / "keys")
    settings = (
        {
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": archive_command(plan, SOURCE),
        }
        if archiving
        else {}
    )
    try:
        with executable_for_postgres(), throwaway_cluster(settings=settings) as cluster:
            source = {
                "name": SOURCE,
                "kind": "postgres",
                "cadence": "daily",
                "owner": "team:data",
                "host": "127.0.0.1",
                "port": cluster.port,
                "user": "postgres",
                "databases": ["app"],
            }
            write_plan(home, plan_dict([public], [source]))
            cluster.execute("CREATE DATABASE app")
            yield Estate(cluster, BackupService.from_path(plan), key, home / "store")
    finally:
        shutil.rmtree(home, ignore_errors=True)


def count(cluster: Cluster, table: str, dbname: str = "app") -> int:
    return cluster.execute(f"SELECT count(*) FROM {table}", dbname)[0][0]


@needs_tools
def test_database_globals_and_table_restore_by_hand(tmp_path: Path) -> None:
    """(a) and (b): the newest dump of a database into a new one with its row counts checked,
    a dropped role back from the globals, deleted rows of one table and then the dropped table
    (index, grant, sequence) back from the dump; a damaged copy stops before anything is made."""
    with postgres_estate(tmp_path, archiving=False) as estate:
        pg = estate.cluster
        pg.execute("CREATE ROLE auditor NOLOGIN; CREATE ROLE clerk NOLOGIN")
        pg.execute(
            "CREATE TABLE orders (id serial PRIMARY KEY, item text NOT NULL);"
            "CREATE INDEX orders_item_idx ON orders (item);"
            "GRANT SELECT ON orders TO clerk;"
            "INSERT INTO orders SELECT g, 'item ' || g FROM generate_series(1, 200) g;"
            'CREATE TABLE "Order Lines" (order_id int, qty int);'
            'INSERT INTO "Order Lines" SELECT g, g % 7 FROM generate_series(1, 30) g',
            "app",
        )
        estate.service.backup(SOURCE)
        pg.execute(
            "INSERT INTO orders SELECT g, 'late ' || g FROM generate_series(201, 210) g", "app"
        )
        newest = next(m for m in estate.service.backup(SOURCE) if m.part == "database:app")
        work = tmp_path / "work"
        common = {"STORE": str(estate.store), "SOURCE": SOURCE, "KEY": str(estate.key)}

        result = run_block(
            "# Restore one database by hand",
            {
                **common,
                **estate.libpq_env(),
                "DB": "app",
                "NEWDB": "app_restored",
                "WORK": str(work),
            },
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert newest.id in result.stdout  # step 1 picked the newest dump
        assert 'public."Order Lines": 30 rows (dump: 30)' in result.stdout
        assert count(pg, "orders", "app_restored") == 210
        assert count(pg, '"Order Lines"', "app_restored") == 30

        pg.execute("DROP ROLE auditor")
        result = run_block(
            "# Roles and tablespaces by hand", {**common, **estate.libpq_env(), "WORK": str(work)}
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert 'role "postgres" already exists' in result.stderr  # as the runbook says
        assert pg.execute("SELECT rolname FROM pg_roles WHERE rolname = 'auditor'") == [
            ("auditor",)
        ]

        table_env = {
            **estate.libpq_env(),
            "DUMPFILE": str(work / "app.dump"),
            "DB": "app",
            "TABLE": "orders",
        }
        pg.execute("DELETE FROM orders WHERE id % 3 = 0; UPDATE orders SET item = 'kept'", "app")
        result = run_block("# One table by hand", table_env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert count(pg, "orders") == 210
        assert count(pg, "orders WHERE item = 'kept'") == 140  # rows still there are left alone
        assert pg.execute("SELECT datname FROM pg_database WHERE datname = 'app_scratch'") == []
        assert pg.execute("SELECT to_regclass('public.orders_restored')", "app") == [(None,)]

        pg.execute("DROP TABLE orders", "app")
        result = run_block("# A dropped table by hand", table_env)
        assert result.returncode == 0, result.stdout + result.stderr
        assert count(pg, "orders") == 210
        assert pg.execute(
            "SELECT to_regclass('orders_item_idx') IS NOT NULL, "
            "has_table_privilege('clerk', 'orders', 'SELECT'), "
            "(SELECT count(*) FROM pg_constraint WHERE conrelid = 'orders'::regclass), "
            "pg_get_serial_sequence('orders', 'id')",
            "app",
        ) == [(True, True, 1, "public.orders_id_seq")]

        data = estate.store / newest.data_key
        data.write_bytes(flip_last_byte(data.read_bytes()))
        result = run_block(
            "# Restore one database by hand",
            {**common, **estate.libpq_env(), "DB": "app", "NEWDB": "app_again", "WORK": str(work)},
        )
        assert result.returncode != 0
        assert "did NOT match" in result.stderr  # step 2 stops before anything is restored
        assert pg.execute("SELECT datname FROM pg_database WHERE datname = 'app_again'") == []


def pitr_env(estate: Estate, target_time: dt.datetime, target: Path, port: int) -> dict[str, str]:
    return {
        "STORE": str(estate.store),
        "SOURCE": SOURCE,
        "KEY": str(estate.key),
        "TARGET_TIME": target_time.isoformat(sep=" "),
        "TARGET": str(target),
        "PORT": str(port),
        "PGBIN": str(BIN_DIR),
        "OS_USER": OS_USER or getpass.getuser(),
        "AS_POSTGRES": f"runuser -u {OS_USER} --" if OS_USER else "",
    }


def server_time(cluster: Cluster) -> dt.datetime:
    return cluster.execute("SELECT clock_timestamp()")[0][0].astimezone(dt.UTC)


@contextmanager
def recovery_folder() -> Iterator[Path]:
    """A folder the cluster's OS user can enter, for TARGET; the recovered server is stopped."""
    parent = shared_dir("spark-backup-pitr-")
    target = parent / "recovered"
    try:
        yield target
    finally:
        if (target / "data" / "postmaster.pid").exists():
            subprocess.run(
                as_os_user(
                    [str(BIN_DIR / "pg_ctl"), "-D", str(target / "data"), "-m", "immediate", "stop"]
                ),
                capture_output=True,
            )
        shutil.rmtree(parent, ignore_errors=True)


@needs_tools
def test_point_in_time_recovery_by_hand(tmp_path: Path) -> None:
    """(c): base backup before the target, WAL pushed by the server's archive_command; the
    by-hand block recovers exactly the rows committed before the damage."""
    with postgres_estate(tmp_path, archiving=True) as estate, recovery_folder() as target:
        pg = estate.cluster
        pg.execute(
            "CREATE TABLE orders (id int PRIMARY KEY, item text);"
            "INSERT INTO orders SELECT g, 'item ' || g FROM generate_series(1, 100) g",
            "app",
        )
        [base] = estate.service.backup(SOURCE, artifact="base")
        pg.execute(
            "INSERT INTO orders SELECT g, 'after base ' || g FROM generate_series(101, 150) g;"
            "CREATE TABLE notes AS SELECT g AS id FROM generate_series(1, 5) g",
            "app",
        )
        target_time = server_time(pg)
        time.sleep(0.2)
        pg.execute("DELETE FROM orders WHERE id > 20; DROP TABLE notes", "app")
        estate.service.backup(SOURCE, artifact="base")  # after the target: must not be chosen
        pg.switch_wal_and_wait()

        port = free_port()
        result = run_block(
            "# Point-in-time recovery by hand", pitr_env(estate, target_time, target, port)
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.startswith(f"{base.id}: finished ")
        assert "recovery stopping before commit of transaction" in result.stdout
        with (
            closing(
                psycopg.connect(host=str(target), port=port, user="postgres", dbname="app")
            ) as conn,
            conn.cursor() as cursor,
        ):
            cursor.execute("SELECT count(*), min(id), max(id) FROM orders")
            assert cursor.fetchone() == (150, 1, 150)
            cursor.execute("SELECT count(*) FROM notes")
            assert cursor.fetchone() == (5,)
            cursor.execute("SELECT pg_is_in_recovery()")
            assert cursor.fetchone() == (False,)
        assert pg.execute("SELECT count(*) FROM orders", "app") == [(20,)]  # production untouched


@needs_tools
def test_point_in_time_recovery_by_hand_stops_at_a_gap(tmp_path: Path) -> None:
    """A WAL file missing from the archive: recovery ends before the target, the block fails,
    and the log names the last reachable point as the runbook says."""
    with postgres_estate(tmp_path, archiving=True) as estate, recovery_folder() as target:
        pg = estate.cluster
        pg.execute("CREATE TABLE orders (id int PRIMARY KEY)", "app")
        estate.service.backup(SOURCE, artifact="base")
        pg.execute("INSERT INTO orders SELECT generate_series(1, 10)", "app")
        reachable = server_time(pg)
        pg.switch_wal_and_wait()
        pg.execute("INSERT INTO orders SELECT generate_series(11, 20)", "app")
        lost = pg.switch_wal_and_wait()
        pg.execute("INSERT INTO orders SELECT generate_series(21, 30)", "app")
        target_time = server_time(pg)
        pg.switch_wal_and_wait()
        [gap] = (estate.store / SOURCE / "wal").glob(f"*/{lost}-*.zst.age")
        gap.unlink()

        result = run_block(
            "# Point-in-time recovery by hand",
            pitr_env(estate, target_time, target, free_port()),
        )
        assert result.returncode != 0
        log = (target / "postgresql.log").read_text()
        assert "FATAL:  recovery ended before configured recovery target was reached" in log
        last = re.findall(r"last completed transaction was at log time (\S+ \S+)", log)
        assert last, log
        assert reachable - dt.timedelta(seconds=5) < dt.datetime.fromisoformat(last[-1]) < reachable
        # The missing file ended recovery as "not there" (exit 1), not as a failed copy.
        assert "exit code 255" not in log
        segments = sorted(f for f in os.listdir(target / "wal_archive") if len(f) == 24)
        assert lost not in segments and segments[0] < lost < segments[-1]  # a hole: a gap


def test_plan_reference_postgres_example_is_valid(tmp_path: Path) -> None:
    """docs/plan.md's postgres source example is a valid source, with the defaults it claims."""
    (example,) = [
        b
        for b in re.findall(r"```yaml\n(.*?)```", PLAN_DOC.read_text(), flags=re.DOTALL)
        if b.startswith("# A postgres source")
    ]
    [source] = yaml.safe_load(example)
    loaded = load_plan(write_plan(tmp_path, plan_dict([make_key(tmp_path)[1]], [source])))
    [parsed] = loaded.plan.sources
    assert isinstance(parsed, PostgresSource)
    assert parsed.model_dump(include={"rpo", "base_backup", "wal_archiving"}) == (
        PostgresSource(name="x", kind="postgres", cadence="daily", owner="team:a").model_dump(
            include={"rpo", "base_backup", "wal_archiving"}
        )
    )
