"""``wal-receive`` against a throwaway cluster that does not archive at all: every WAL byte
recovery gets comes through the stream (pg_receivewal, a replication slot, the partial segment
stored every interval)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, suppress
from pathlib import Path

import pytest
import yaml

from spark_backup.engine.pipeline import utcnow
from spark_backup.service import BackupService
from spark_backup.sources.postgres import KIND as POSTGRES
from spark_backup.sources.postgres import ops
from spark_backup.sources.postgres.wal import archived_wal
from spark_backup_tests.helpers import free_port, make_key, plan_dict, run_cli
from spark_backup_tests.pg_cluster import Cluster, shared_dir, throwaway_cluster

SPARK_BACKUP = [str(Path(os.sys.executable).with_name("spark-backup")), "--no-progress"]
INTERVAL = 0.5


class Streaming:
    def __init__(self, cluster: Cluster, root: Path, plan: Path):
        self.cluster = cluster
        self.root = root
        self.plan = plan
        self.spool = root / "spool"
        self.receivers: list[subprocess.Popen[str]] = []

    @property
    def service(self) -> BackupService:
        return BackupService.from_path(self.plan)

    def receive(self, *extra: str) -> subprocess.Popen[str]:
        process = subprocess.Popen(
            [
                *SPARK_BACKUP,
                "--plan",
                str(self.plan),
                "wal-receive",
                "pg_main",
                "--spool",
                str(self.spool),
                "--interval",
                str(INTERVAL),
                *extra,
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.receivers.append(process)
        return process

    def status(self) -> dict:
        with suppress(FileNotFoundError, json.JSONDecodeError):
            return json.loads((self.spool / "status.json").read_text())
        return {}

    def wait_running(self, process: subprocess.Popen[str], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(process.stderr.read() if process.stderr else "ended")
            if self.status().get("receiver_running") and self.slot_active():
                return
            time.sleep(0.1)
        raise TimeoutError("wal-receive did not start")

    def slot_active(self) -> bool:
        rows = self.cluster.execute(
            "SELECT active FROM pg_replication_slots WHERE slot_name = 'spark_backup_pg_main'"
        )
        return bool(rows and rows[0][0])

    def wait_stored(self, segment: str, timeout: float = 60) -> None:
        store = self.service.store("local")
        deadline = time.monotonic() + timeout
        while not archived_wal(store, "pg_main", segment):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{segment} not stored; {self.status()}")
            time.sleep(0.1)


@pytest.fixture
def streaming() -> Iterator[Streaming]:
    root = shared_dir("spark-backup-receive-")
    key, public = make_key(root)
    with throwaway_cluster("spark-backup-receive-pg-", {"archive_mode": "off"}) as cluster:
        source = {
            "name": "pg_main",
            "kind": "postgres",
            "cadence": "daily",
            "owner": "team:dba",
            "host": "127.0.0.1",
            "port": cluster.port,
            "user": "postgres",
        }
        plan = plan_dict(
            [public],
            [source],
            stores=[{"name": "local", "kind": "local", "path": str(root / "store")}],
        )
        plan["encryption"]["identity_file"] = str(key)
        (root / "store").mkdir()
        plan_path = root / "plan.yaml"
        plan_path.write_text(yaml.safe_dump(plan))
        streaming = Streaming(cluster, root, plan_path)
        try:
            yield streaming
        finally:
            for process in streaming.receivers:
                if process.poll() is None:
                    process.kill()
                    process.wait()
            for pid_file in root.glob("pitr*/data/postmaster.pid"):
                Cluster(pid_file.parent.parent, 0).stop()
            import shutil

            shutil.rmtree(root, ignore_errors=True)


def test_a_missing_slot_is_said_and_nothing_is_created(streaming: Streaming) -> None:
    process = streaming.receive("--slot", "no_such_slot")
    _, errors = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "replication slot 'no_such_slot' does not exist" in errors, errors
    assert len([line for line in errors.splitlines() if line.strip()]) == 1
    assert not streaming.cluster.execute("SELECT 1 FROM pg_replication_slots")


def test_streamed_wal_survives_a_killed_receiver_and_recovers_a_killed_server(
    streaming: Streaming,
) -> None:
    cluster = streaming.cluster
    receiver = streaming.receive("--create-slot")
    streaming.wait_running(receiver)
    cluster.execute("CREATE TABLE beat (id int PRIMARY KEY, at timestamptz DEFAULT now())")
    streaming.service.backup("pg_main", artifact="base")
    cluster.execute("INSERT INTO beat (id) SELECT generate_series(1, 1000)")
    first = cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    streaming.wait_stored(first)

    # The service is killed with -9: its pg_receivewal goes with it, the slot keeps the WAL,
    # and a new service resumes where the spool and the slot say, without a gap.
    os.kill(receiver.pid, signal.SIGKILL)
    receiver.wait()
    deadline = time.monotonic() + 30
    while streaming.slot_active() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not streaming.slot_active()
    cluster.execute("INSERT INTO beat (id) SELECT generate_series(1001, 2000)")
    missed = cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    restarted = streaming.receive()
    streaming.wait_running(restarted)
    streaming.wait_stored(missed)

    # Heartbeats, then the server dies with -9 and is never seen again.
    committed = 2000
    for beat in range(2001, 2031):
        cluster.execute(f"INSERT INTO beat (id) VALUES ({beat})")
        committed = beat
        time.sleep(0.1)
    killed_at = time.monotonic()
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    os.kill(postmaster, signal.SIGKILL)
    time.sleep(INTERVAL * 2 + 0.5)  # the partial segment's next store, with slack

    service = streaming.service
    source = service.source("pg_main")
    archive = archived_wal(service.store("local"), "pg_main")
    assert any(entry.is_partial for entry in archive)
    report = ops.pitr(
        service, POSTGRES, source, None, streaming.root / "pitr_latest", port=free_port()
    )
    try:
        assert report.ok, report.error
        recovered = report.databases["postgres"]["row_counts"]["public.beat"]
        assert recovered == committed, f"lost {committed - recovered} heartbeats"
    finally:
        Cluster(Path(report.target_dir), report.port).stop()
    assert time.monotonic() - killed_at < 120
    restarted.send_signal(signal.SIGTERM)
    out, errors = restarted.communicate(timeout=60)
    assert restarted.returncode == 0, errors
    assert "segments" in out
    with closing(open(streaming.spool / "status.json")) as handle:
        status = json.load(handle)
    assert status["segments_stored"] >= 1 and status["partials_stored"] >= 1


def test_a_store_outage_keeps_the_wal_in_the_spool_then_on_the_server(
    streaming: Streaming,
) -> None:
    """The store goes away: completed segments wait in the spool, never acknowledged as
    stored; at --max-spool-segments the receiver stops so the slot keeps the WAL on the server;
    the store comes back and everything arrives, without a gap."""
    cluster = streaming.cluster
    receiver = streaming.receive("--create-slot", "--max-spool-segments", "2")
    streaming.wait_running(receiver)
    store, away = streaming.root / "store", streaming.root / "store-away"
    store.rename(away)
    switched = []
    for n in range(4):
        cluster.execute(f"CREATE TABLE outage_{n} AS SELECT generate_series(1, 100) AS x")
        switched.append(cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0])
        if n == 1:
            deadline = time.monotonic() + 60
            while not streaming.status().get("paused_for_store"):
                assert time.monotonic() < deadline, streaming.status()
                time.sleep(0.2)
    status = streaming.status()
    assert status["pending_segments"] >= 2 and status["segments_stored"] == 0
    deadline = time.monotonic() + 30
    while streaming.slot_active():
        assert time.monotonic() < deadline
        time.sleep(0.2)
    # The lag check says the stream has stopped, and how much the server keeps for it.
    lag = POSTGRES.lag(streaming.service, streaming.service.source("pg_main"), utcnow())
    assert any("is not in use: streaming has stopped" in p for p in lag.problems), lag
    assert lag.details["receiver_retained_bytes"] > 0 and not lag.ok
    status = run_cli("--plan", str(streaming.plan), "wal-status", "pg_main")
    assert status.returncode == 3 and "streaming has stopped" in status.stdout, status.stdout
    # The server keeps what the receiver has not taken: the slot still points into it.
    [(restart_file,)] = cluster.execute(
        "SELECT pg_walfile_name(restart_lsn) FROM pg_replication_slots"
    )
    assert restart_file[8:] <= switched[-1][8:]
    away.rename(store)
    for segment in switched:
        streaming.wait_stored(segment, timeout=120)
    streaming.wait_running(receiver)
    assert not streaming.status()["paused_for_store"]
    assert not [p for p in (streaming.spool / "wal").iterdir() if not p.name.endswith(".partial")]


def test_a_slot_that_lost_wal_is_reported_never_papered_over(streaming: Streaming) -> None:
    cluster = streaming.cluster
    cluster.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
    cluster.execute("SELECT pg_reload_conf()")
    receiver = streaming.receive("--create-slot")
    streaming.wait_running(receiver)
    receiver.send_signal(signal.SIGTERM)
    assert receiver.wait(60) == 0
    deadline = time.monotonic() + 90
    while cluster.execute("SELECT wal_status FROM pg_replication_slots")[0][0] != "lost":
        assert time.monotonic() < deadline
        cluster.execute("CREATE TABLE IF NOT EXISTS churn AS SELECT 1 AS x")
        cluster.execute("INSERT INTO churn SELECT generate_series(1, 1000)")
        cluster.execute("SELECT pg_switch_wal()")
        cluster.execute("CHECKPOINT")
    again = streaming.receive()
    _, errors = again.communicate(timeout=60)
    assert again.returncode != 0
    assert "has lost WAL" in errors and "max_slot_wal_keep_size" in errors, errors


def test_wal_in_the_layout_of_earlier_releases_lists_and_restores(streaming: Streaming) -> None:
    """WAL keys without the system identifier (releases before it) still serve `list` and a
    point-in-time recovery of the cluster they belong to."""
    cluster = streaming.cluster
    receiver = streaming.receive("--create-slot")
    streaming.wait_running(receiver)
    cluster.execute("CREATE TABLE old_layout AS SELECT generate_series(1, 500) AS x")
    [base] = streaming.service.backup("pg_main", artifact="base")
    cluster.execute("INSERT INTO old_layout SELECT generate_series(501, 700)")
    last = cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    streaming.wait_stored(last)
    receiver.send_signal(signal.SIGTERM)
    assert receiver.wait(60) == 0
    wal = streaming.root / "store" / "pg_main" / "wal"
    [folder] = [p for p in wal.iterdir() if p.is_dir()]
    assert folder.name == base.source_metadata["system_identifier"]
    for path in folder.iterdir():
        if ".streamed-" in path.name:
            path.unlink()  # earlier releases had no streamed partial segments
        else:
            path.rename(wal / path.name)
    folder.rmdir()
    listed = subprocess.run(
        [*SPARK_BACKUP, "--plan", str(streaming.plan), "list", "pg_main", "--json"],
        capture_output=True,
        text=True,
    )
    rows = {row["id"]: row for row in json.loads(listed.stdout)}
    assert rows[base.id]["log"]["complete"] is True, rows[base.id]
    service = streaming.service
    report = ops.pitr(
        service,
        POSTGRES,
        service.source("pg_main"),
        None,
        streaming.root / "pitr_old",
        port=free_port(),
    )
    try:
        assert report.ok and report.databases["postgres"]["row_counts"]["public.old_layout"] == 700
    finally:
        Cluster(Path(report.target_dir), report.port).stop()


def test_the_wal_receiver_check_shows_the_lag_and_fails_when_the_receiver_is_down(
    streaming: Streaming,
) -> None:
    """The plan's wal_receive brings the ``wal_receiver`` check onto the WAL asset: it fails
    without a slot, passes while the receiver streams (with its lag as metadata), and fails once
    the receiver is killed."""
    from dagster import AssetCheckKey

    from spark_backup.defs.build import build_definitions
    from spark_backup.plan import load_plan
    from spark_backup.sources.postgres.receive import WAL_RECEIVER_CHECK, receiver_check

    plan = yaml.safe_load(streaming.plan.read_text())
    plan["sources"][0]["wal_receive"] = {"max_lag": "20s", "spool": str(streaming.spool)}
    streaming.plan.write_text(yaml.safe_dump(plan))
    definitions = build_definitions(load_plan(streaming.plan))
    check_keys = {key for spec in definitions.asset_checks or [] for key in spec.check_keys}
    assert any(key.name == WAL_RECEIVER_CHECK for key in check_keys), check_keys
    assert isinstance(next(iter(check_keys)), AssetCheckKey)
    service = streaming.service
    source = service.source("pg_main")
    missing = receiver_check(service, source, utcnow())
    assert not missing.passed and "does not exist" in missing.description
    receiver = streaming.receive("--create-slot")
    streaming.wait_running(receiver)
    streaming.cluster.execute("CREATE TABLE checked AS SELECT generate_series(1, 1000) AS x")
    segment = streaming.cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
    streaming.wait_stored(segment)
    deadline = time.monotonic() + 30
    while not (outcome := receiver_check(service, source, utcnow())).passed:
        assert time.monotonic() < deadline, outcome
        time.sleep(0.5)
    assert outcome.metadata["lag_seconds"] <= 20 and outcome.metadata["active"]
    assert "streams through slot" in outcome.description
    # A minute without a round that stored everything is beyond the plan's bound.
    later = receiver_check(service, source, utcnow() + dt.timedelta(minutes=1))
    assert not later.passed and later.metadata["lag_seconds"] > 20, later
    receiver.kill()
    receiver.wait()
    deadline = time.monotonic() + 30
    while (outcome := receiver_check(service, source, utcnow())).passed:
        assert time.monotonic() < deadline, outcome
        time.sleep(0.5)
    assert "is not in use: streaming has stopped" in outcome.description, outcome
