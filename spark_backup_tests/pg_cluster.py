"""Throwaway PostgreSQL clusters for tests and benchmarks: ``initdb`` and ``pg_ctl`` from the
server binaries, run as ``postgres`` when we are root (PostgreSQL refuses to run as root), on a
free port, with WAL archiving through ``spark-backup wal-push`` when asked.

The cluster's ``archive_command`` runs as the cluster's OS user, so that user must be able to
run this checkout's virtualenv: when the interpreter lives below a folder it cannot enter
(pyenv under /root), ``executable_for_postgres`` lets it traverse that folder and restores the
mode afterwards.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import psycopg
import yaml

from spark_backup.sources.postgres.pitr import as_user, default_os_user
from spark_backup_tests.helpers import free_port, make_key, plan_dict

BIN_DIR = Path(os.environ.get("SPARK_BACKUP_PG_BIN", "/usr/lib/postgresql/15/bin"))
OS_USER = default_os_user()
SPARK_BACKUP = Path(sys.executable).with_name("spark-backup")


def as_os_user(args: list[str]) -> list[str]:
    return as_user(args, OS_USER)


def shared_dir(prefix: str) -> Path:
    """A folder the cluster's OS user owns and we (root) can use too."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if OS_USER:
        shutil.chown(path, OS_USER, OS_USER)
    return path


def postgres_plan(root: Path, source: str, port: int, **source_extra: Any) -> Path:
    """``root/plan.yaml``: one PostgreSQL source on ``port`` backed up into a local store under
    ``root``, identity at ``root/age.key``; the plan, the key and the store are the cluster's OS
    user's to read (and its WAL folder to write), as ``archive_command`` runs as that user."""
    key, public = make_key(root)
    key.chmod(0o644)
    store = root / "store"
    (store / source / "wal").mkdir(parents=True)
    chown_tree(store)
    entry = {
        "name": source,
        "kind": "postgres",
        "cadence": "daily",
        "owner": "team:dba",
        "host": "127.0.0.1",
        "port": port,
        "user": "postgres",
        **source_extra,
    }
    plan = plan_dict(
        [public], [entry], stores=[{"name": "local", "kind": "local", "path": str(store)}]
    )
    plan["encryption"]["identity_file"] = str(key)
    path = root / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    path.chmod(0o644)
    return path


def chown_tree(path: Path) -> None:
    if OS_USER:
        for root, dirs, files in os.walk(path):
            for name in [*dirs, *files]:
                shutil.chown(os.path.join(root, name), OS_USER, OS_USER)
        shutil.chown(path, OS_USER, OS_USER)


@contextmanager
def executable_for_postgres() -> Iterator[None]:
    """Let the cluster's OS user run this virtualenv's spark-backup for the block."""
    if not OS_USER:
        yield
        return
    changed: list[tuple[Path, int]] = []
    target = Path(os.path.realpath(sys.executable))
    for folder in [*reversed(target.parents)]:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            os.chmod(folder, mode | stat.S_IXOTH)
            changed.append((folder, mode))
    try:
        yield
    finally:
        for folder, mode in reversed(changed):
            os.chmod(folder, stat.S_IMODE(mode))


class Cluster:
    """A cluster in ``root/data`` listening on 127.0.0.1:``port`` and a socket in ``root``."""

    def __init__(self, root: Path, port: int):
        self.root = root
        self.port = port
        self.data = root / "data"
        self.log = root / "postgresql.log"

    def init(
        self, settings: dict[str, str], initdb_args: tuple[str, ...] = ("-A", "trust")
    ) -> Cluster:
        subprocess.run(
            as_os_user(
                [
                    str(BIN_DIR / "initdb"),
                    "-D",
                    str(self.data),
                    *initdb_args,
                    "-U",
                    "postgres",
                    "--no-sync",
                ]
            ),
            check=True,
            capture_output=True,
        )
        lines = {
            "port": str(self.port),
            "listen_addresses": "'127.0.0.1'",
            "unix_socket_directories": f"'{self.root}'",
            "fsync": "off",  # a test cluster: durability against power loss is not tested here
            **settings,
        }
        with open(self.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.writelines(f"{name} = {value}\n" for name, value in lines.items())
        return self

    def start(self) -> Cluster:
        subprocess.run(
            as_os_user(
                [str(BIN_DIR / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start"]
            ),
            check=True,
            capture_output=True,
        )
        return self

    def stop(self) -> None:
        subprocess.run(
            as_os_user([str(BIN_DIR / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop"]),
            capture_output=True,
        )

    def connect(self, dbname: str = "postgres"):
        conn = psycopg.connect(
            host="127.0.0.1", port=self.port, user="postgres", dbname=dbname, connect_timeout=5
        )
        conn.autocommit = True
        return conn

    def execute(self, statement: str, dbname: str = "postgres") -> list[tuple]:
        with closing(self.connect(dbname)) as conn, conn.cursor() as cursor:
            cursor.execute(statement)
            return cursor.fetchall() if cursor.description else []

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the cluster has used so far: the postmaster's, its ended
        children's (the backends it reaped) and its live children's."""
        postmaster = int((self.data / "postmaster.pid").read_text().split()[0])
        total = sum(_proc_stat(postmaster)[10:14])  # utime, stime, cutime, cstime
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                fields = _proc_stat(int(entry))
                if len(fields) > 11 and fields[0] == postmaster:
                    total += fields[10] + fields[11]
        return total / os.sysconf("SC_CLK_TCK")

    def switch_wal_and_wait(self, timeout: float = 90) -> str:
        """Close the current segment and wait until the archiver has archived it."""
        segment = self.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            archived, failed = self.execute(
                "SELECT last_archived_wal, last_failed_wal FROM pg_stat_archiver"
            )[0]
            if archived and archived >= segment:
                return segment
            time.sleep(0.2)
        raise TimeoutError(
            f"segment {segment} not archived (last failed: {failed}); see {self.log}"
        )


def _proc_stat(pid: int) -> list[int]:
    """The numeric fields of /proc/PID/stat after the command name (ppid first); [] if gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return []
    return [int(field) for field in text.rsplit(")", 1)[1].split()[1:]]


def archive_command(plan: Path, source: str) -> str:
    return f"'{shlex.quote(str(SPARK_BACKUP))} --plan {shlex.quote(str(plan))} wal-push --source {source} %p'"


@contextmanager
def throwaway_cluster(
    prefix: str = "spark-backup-pg-",
    settings: dict[str, str] | None = None,
    initdb_args: tuple[str, ...] = ("-A", "trust"),
) -> Iterator[Cluster]:
    root = shared_dir(prefix)
    cluster = Cluster(root, free_port())
    try:
        cluster.init(settings or {}, initdb_args).start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
