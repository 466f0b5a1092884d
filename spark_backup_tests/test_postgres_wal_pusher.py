"""Asynchronous archiving (``wal-pusher``) against a throwaway cluster whose archive_command is
the hand-off script: segments arrive; with the pusher down or the store away archive_command
fails and the server keeps its WAL, then everything catches up; whatever the server was told
is archived is in the store, even with the pusher killed with -9 mid-upload."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from spark_backup.engine.pipeline import utcnow
from spark_backup.errors import SourceError
from spark_backup.service import BackupService
from spark_backup.sources.postgres import KIND as POSTGRES
from spark_backup.sources.postgres import ops, pusher
from spark_backup.sources.postgres.wal import archived_wal, fetch_wal
from spark_backup_tests.helpers import make_key, plan_dict, run_cli
from spark_backup_tests.pg_cluster import Cluster, shared_dir, throwaway_cluster

SPARK_BACKUP = [str(Path(os.sys.executable).with_name("spark-backup")), "--no-progress"]


class Async:
    def __init__(self, cluster: Cluster, root: Path, plan: Path, key: Path):
        self.cluster = cluster
        self.root = root
        self.plan = plan
        self.key = key
        self.spool = root / "spool"
        self.pushers: list[subprocess.Popen[str]] = []

    @property
    def service(self) -> BackupService:
        return BackupService.from_path(self.plan)

    def start_pusher(self) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [*SPARK_BACKUP, "--plan", str(self.plan), "wal-pusher", "pg_main"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.pushers.append(process)
        deadline = time.monotonic() + 60
        while not (self.spool / pusher.STATUS_FILE).exists() or not self._locked():
            if process.poll() is not None:
                raise AssertionError(process.stderr.read() if process.stderr else "ended")
            assert time.monotonic() < deadline, "wal-pusher did not start"
            time.sleep(0.05)
        return process

    def _locked(self) -> bool:
        probe = subprocess.run(["flock", "-n", "-s", str(self.spool / pusher.LOCK), "true"])
        return probe.returncode != 0

    def stored(self) -> set[str]:
        return {entry.name for entry in archived_wal(self.service.store("local"), "pg_main")}

    def archiver(self) -> tuple[str | None, str | None, int]:
        return self.cluster.execute(
            "SELECT last_archived_wal, last_failed_wal, failed_count FROM pg_stat_archiver"
        )[0]

    def switch(self, table: str) -> str:
        self.cluster.execute(f"CREATE TABLE {table} AS SELECT generate_series(1, 1000) AS x")
        return self.cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]

    def switch_and_wait(self, table: str, timeout: float = 60) -> str:
        """A new segment closed, and the server told it is archived (with all before it)."""
        segment = self.switch(table)
        deadline = time.monotonic() + timeout
        while (self.archiver()[0] or "") < segment:
            assert time.monotonic() < deadline, self.archiver()
            time.sleep(0.05)
        return segment

    def wait_failed(self, segment: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.archiver()[1] != segment:
            assert time.monotonic() < deadline, self.archiver()
            time.sleep(0.1)

    def done_in_pg_wal(self) -> set[str]:
        status = self.cluster.data / "pg_wal" / "archive_status"
        return {p.name.removesuffix(".done") for p in status.glob("*.done")}


@pytest.fixture
def asynchronous() -> Iterator[Async]:
    root = shared_dir("spark-backup-pusher-")
    key, public = make_key(root)
    (root / "spool").mkdir()
    shutil.chown(root / "spool", *(2 * [Path(root).owner()]))
    source = {
        "name": "pg_main",
        "kind": "postgres",
        "cadence": "daily",
        "owner": "team:dba",
        "host": "127.0.0.1",
        "port": 5432,
        "user": "postgres",
        "wal_pusher": {"spool": str(root / "spool"), "parallel": 3, "ack_timeout": 20},
    }
    plan = plan_dict(
        [public], [source], stores=[{"name": "local", "kind": "local", "path": str(root / "store")}]
    )
    plan["encryption"]["identity_file"] = str(key)
    (root / "store").mkdir()
    plan_path = root / "plan.yaml"
    plan_path.write_text(yaml.safe_dump(plan))
    service = BackupService.from_path(plan_path)
    command = ops.archiving_settings(service, service.source("pg_main"))["archive_command"]
    assert command.startswith("/bin/sh ") and "%p" in command
    pusher.prepare_spool(root / "spool")
    settings = {"archive_mode": "on", "archive_command": f"'{command}'", "wal_level": "replica"}
    with throwaway_cluster("spark-backup-pusher-pg-", settings) as cluster:
        source["port"] = cluster.port
        plan_path.write_text(yaml.safe_dump(plan))
        state = Async(cluster, root, plan_path, key)
        try:
            yield state
        finally:
            for process in state.pushers:
                if process.poll() is None:
                    process.kill()
                    process.wait()
    shutil.rmtree(root, ignore_errors=True)


def test_segments_arrive_and_a_dead_pusher_or_store_makes_the_server_keep_them(
    asynchronous: Async,
) -> None:
    cluster = asynchronous.cluster
    # No pusher: archive_command fails at once, and the server keeps the segment.
    first = asynchronous.switch("before_pusher")
    asynchronous.wait_failed(first)
    assert (cluster.data / "pg_wal" / first).exists() and first not in asynchronous.stored()
    # plan check --probe runs the spool's checks as the server's user, and names the dead pusher.
    service = asynchronous.service
    source, server = service.source("pg_main"), ops.server_of(service, service.source("pg_main"))
    with pytest.raises(SourceError, match="no wal-pusher is running"):
        ops.archive_command_as_server_user(server, source)
    process = asynchronous.start_pusher()
    assert ops.archive_command_as_server_user(server, source) == cluster.data.owner()
    segments = [first, *(asynchronous.switch(f"t{n}") for n in range(3))]
    asynchronous.switch_and_wait("caught_up")
    assert set(segments) <= asynchronous.stored()
    # The store goes away: the call fails fast, naming why, and the server keeps the file.
    store, away = asynchronous.root / "store", asynchronous.root / "store-away"
    store.rename(away)
    outage = asynchronous.switch("during_outage")
    asynchronous.wait_failed(outage)
    assert (asynchronous.spool / pusher.FAILING).exists()
    assert (cluster.data / "pg_wal" / outage).exists()
    status = run_cli("--plan", str(asynchronous.plan), "wal-pusher", "pg_main", "--status")
    assert '"failing": true' in status.stdout, status.stdout
    away.rename(store)
    asynchronous.switch_and_wait("after_outage")
    assert outage in asynchronous.stored()
    assert not (asynchronous.spool / pusher.FAILING).exists()
    # SIGTERM ends the service cleanly; then the server keeps WAL again until it is back.
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0 and "WAL files stored" in out
    stopped = asynchronous.switch("after_stop")
    asynchronous.wait_failed(stopped)
    asynchronous.start_pusher()
    asynchronous.switch_and_wait("restarted")
    assert stopped in asynchronous.stored()


def test_what_the_server_was_told_is_archived_is_in_the_store_after_kill_9(
    asynchronous: Async, tmp_path: Path
) -> None:
    """The pusher is killed with -9 while it stores a burst of segments; every segment the
    server marked done is in the store and fetches intact; a new pusher catches up."""
    cluster = asynchronous.cluster
    process = asynchronous.start_pusher()
    cluster.execute("CREATE TABLE burst (x int, pad text)")
    segments = []
    for n in range(6):
        cluster.execute(
            "INSERT INTO burst SELECT g, repeat('x', 200) FROM generate_series(1, 20000) g"
        )
        segments.append(cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0])
        if n == 3:
            process.send_signal(signal.SIGKILL)
            process.wait()
    told = asynchronous.done_in_pg_wal()
    stored = asynchronous.stored()
    assert told <= stored, told - stored
    asynchronous.start_pusher()
    asynchronous.switch_and_wait("after_kill")
    service = asynchronous.service
    store = service.store("local")
    identities = service.identities(str(asynchronous.key))
    for name in segments:
        fetch_wal(store, "pg_main", name, tmp_path / name, identities)
        assert (tmp_path / name).stat().st_size == 16 * 1024 * 1024
    assert POSTGRES.lag(service, service.source("pg_main"), utcnow()).lag is not None


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"wal_pusher": {}}, "wal_pusher.spool"),
        ({"wal_pusher": {"spool": "s", "parallel": 0}}, "wal_pusher.parallel"),
        ({"wal_pusher": {"spool": "s", "ack_timeout": 0}}, "wal_pusher.ack_timeout"),
        ({"wal_receive": {"max_lag": "soon"}}, "wal_receive.max_lag"),
    ],
)
def test_the_plan_refuses_bad_pusher_and_receiver_settings(
    tmp_path: Path, fields: dict, expected: str
) -> None:
    from spark_backup.errors import PlanError
    from spark_backup.plan import load_plan

    _key, public = make_key(tmp_path)
    source = {"name": "pg_main", "kind": "postgres", "cadence": "daily", "owner": "team:dba"}
    plan = plan_dict([public], [{**source, **fields}])
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(PlanError) as raised:
        load_plan(path)
    message = str(raised.value)
    assert expected in message and "\n" not in message, message
