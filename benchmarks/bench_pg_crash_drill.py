"""Crash drill for PostgreSQL, as a DBA would run it: load, then the server is killed with -9
and its data directory deleted, then ``pg-pitr --to-time latest`` recovers from the store.

For each mode, in a throwaway cluster:

* ``archive``: WAL through ``archive_command`` (``wal-push --parallel 4``) with
  ``archive_timeout`` (``--archive-timeout``, default 10 s here; production uses 60 s);
* ``stream``: WAL through ``wal-receive`` (``pg_receivewal --synchronous`` with a slot, the
  partial segment stored every ``--interval`` s), archiving off; the receiver outlives the
  server, as it does on another host;
* ``stream-lost``: the same, but the receiver is killed with -9 together with the server and
  its spool deleted: only what it had stored before the crash counts.

Load: ``pgbench -c 2`` plus a heartbeat row committed every 100 ms. After ``--load`` seconds
the postmaster is killed with SIGKILL and ``pg_wal`` deleted with the rest of the data
directory; recovery starts at once (the worst case: nothing more reaches the store). Reported:

* RPO: the commit time of the last heartbeat the client saw committed minus that of the newest
  heartbeat recovered (server clock), and how many committed heartbeats were lost;
* RTO: the wall time of ``pg-pitr`` (base backup restore, WAL fetch, replay, verification).

Then ``wal-push`` segments per second as ``archive_command`` calls it, one process per segment
in name order, without and with ``--parallel 4`` (``--segments``, default 16).

Targets from issue 13: RPO at most 1 s with ``wal-receive``; at most ``archive_timeout`` + 1 s
with archiving alone. The script reports (MISS lines), it does not judge; it exits 0.

    nice .venv/bin/python benchmarks/bench_pg_crash_drill.py            # every mode, ~3 min
    nice .venv/bin/python benchmarks/bench_pg_crash_drill.py --mode stream --runs 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager, suppress
from pathlib import Path
from typing import Any

import yaml
from machine import basic_facts, load_average

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spark_backup.service import BackupService
from spark_backup.sources.postgres import KIND as POSTGRES
from spark_backup.sources.postgres import ops
from spark_backup_tests.helpers import free_port, make_key, plan_dict
from spark_backup_tests.pg_cluster import (
    BIN_DIR,
    SPARK_BACKUP,
    Cluster,
    archive_command,
    as_os_user,
    executable_for_postgres,
    postgres_plan,
    shared_dir,
)

SOURCE = "drill_pg"
HEARTBEAT_SECONDS = 0.1


class Heartbeat(threading.Thread):
    """Commits a row every 100 ms; remembers the last one the server confirmed."""

    def __init__(self, cluster: Cluster):
        super().__init__(daemon=True)
        self.cluster = cluster
        self.stop = threading.Event()
        self.last: tuple[int, dt.datetime] | None = None
        self.first_at: dt.datetime | None = None

    def run(self) -> None:
        beat = 0
        with suppress(Exception), closing(self.cluster.connect()) as conn:
            while not self.stop.is_set():
                beat += 1
                with conn.cursor() as cursor:
                    cursor.execute(
                        "INSERT INTO heartbeat VALUES (%s, clock_timestamp()) RETURNING at",
                        (beat,),
                    )
                    (at,) = cursor.fetchone()
                self.last = (beat, at)
                self.first_at = self.first_at or at
                time.sleep(HEARTBEAT_SECONDS)


def drill(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    root = shared_dir(f"spark-backup-drill-{mode}-")
    port = free_port()
    plan_path = postgres_plan(root, SOURCE, port)
    settings = {"wal_level": "replica", "max_wal_senders": "4", "fsync": "on"}
    if mode == "archive":
        command = archive_command(plan_path, SOURCE).replace("wal-push", "wal-push --parallel 4")
        settings |= {
            "archive_mode": "on",
            "archive_timeout": f"{args.archive_timeout}s",
            "archive_command": command,
        }
    (root / "cluster").mkdir()
    shutil.chown(root / "cluster", root.owner(), root.group())
    cluster = Cluster(root / "cluster", port)
    receiver: subprocess.Popen[str] | None = None
    result: dict[str, Any] = {"mode": mode}
    try:
        cluster.init(settings).start()
        service = BackupService.from_path(plan_path)
        if mode.startswith("stream"):
            receiver = subprocess.Popen(
                [str(SPARK_BACKUP), "--no-progress", "--plan", str(plan_path), "wal-receive",
                 SOURCE, "--spool", str(root / "spool"), "--create-slot",
                 "--interval", str(args.interval)],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            )  # fmt: skip
            wait_for(lambda: _status(root / "spool").get("receiver_running"), 60, "wal-receive")
        cluster.execute("CREATE TABLE heartbeat (id int PRIMARY KEY, at timestamptz)")
        subprocess.run(
            [str(BIN_DIR / "pgbench"), "-i", "-s", str(args.scale), "-q",
             "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"],
            check=True, capture_output=True,
        )  # fmt: skip
        service.backup(SOURCE, artifact="base")
        heartbeat = Heartbeat(cluster)
        heartbeat.start()
        load = subprocess.Popen(
            [str(BIN_DIR / "pgbench"), "-c", "2", "-T", str(args.load * 3), "-n",
             "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(args.load)
        postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
        os.kill(postmaster, signal.SIGKILL)
        if mode == "stream-lost" and receiver is not None:
            # The receiver's host goes too: only what its uploads had stored counts.
            os.kill(receiver.pid, signal.SIGKILL)
            receiver.wait()
            shutil.rmtree(root / "spool", ignore_errors=True)
        heartbeat.stop.set()
        heartbeat.join(5)
        load.kill()
        load.wait()
        subprocess.run(as_os_user(["pkill", "-9", "-P", str(postmaster)]), capture_output=True)
        shutil.rmtree(cluster.data, ignore_errors=True)
        assert heartbeat.last is not None, "no heartbeat committed"
        committed_id, committed_at = heartbeat.last
        started = time.monotonic()
        report = ops.pitr(
            service, POSTGRES, service.source(SOURCE), None, root / "pitr", port=free_port()
        )
        rto = time.monotonic() - started
        with closing(_socket_connect(root / "pitr", report.port)) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT coalesce(max(id), 0), max(at) FROM heartbeat")
            last_id, last_at = cursor.fetchone()
        # Nothing recovered: everything since the load began is lost.
        last_at = last_at or heartbeat.first_at
        Cluster(root / "pitr", report.port).stop()
        result.update(
            committed_heartbeats=committed_id,
            recovered_heartbeats=last_id,
            lost_heartbeats=committed_id - last_id,
            rpo_seconds=round((committed_at - last_at).total_seconds(), 3) if last_at else None,
            rto_seconds=round(rto, 2),
            pitr_breakdown=report.seconds,
            wal_files=report.wal_files,
        )
    finally:
        if receiver is not None and receiver.poll() is None:
            receiver.send_signal(signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                receiver.wait(60)
            if receiver.poll() is None:
                receiver.kill()
        cluster.stop()
        Cluster(root / "pitr", 0).stop()
        shutil.rmtree(root, ignore_errors=True)
    return result


def push_rate(args: argparse.Namespace) -> list[str]:
    """``wal-push`` segments per second as ``archive_command`` calls it (a process per segment,
    in name order), one at a time and with ``--parallel 4``, over real segments of a cluster."""
    lines = []
    root = shared_dir("spark-backup-push-")
    try:
        key, public = make_key(root)
        with _started(root) as cluster:
            for _ in range(args.segments):
                cluster.execute("CREATE TABLE IF NOT EXISTS fill (x text)")
                cluster.execute(
                    "INSERT INTO fill SELECT md5(g::text) FROM generate_series(1, 20000) g"
                )
                cluster.execute("SELECT pg_switch_wal()")
            cluster.execute("CHECKPOINT")
            names = sorted(p.name for p in (cluster.data / "pg_wal").iterdir() if len(p.name) == 24)
            names = names[: args.segments]
            for parallel in (1, 4):
                folder = root / f"data-{parallel}"
                pg_wal = folder / "pg_wal"
                (pg_wal / "archive_status").mkdir(parents=True)
                for name in names:
                    shutil.copyfile(cluster.data / "pg_wal" / name, pg_wal / name)
                    (pg_wal / "archive_status" / f"{name}.ready").touch()
                store = root / f"store-{parallel}"
                store.mkdir()
                plan = plan_dict(
                    [public],
                    [
                        {
                            "name": SOURCE,
                            "kind": "postgres",
                            "cadence": "daily",
                            "owner": "team:dba",
                            "host": "127.0.0.1",
                        }
                    ],
                    stores=[{"name": "local", "kind": "local", "path": str(store)}],
                )
                plan["encryption"]["identity_file"] = str(key)
                plan_path = root / f"plan-{parallel}.yaml"
                plan_path.write_text(yaml.safe_dump(plan))
                started = time.monotonic()
                for name in names:
                    subprocess.run(
                        [str(SPARK_BACKUP), "--no-progress", "--plan", str(plan_path), "wal-push",
                         "--parallel", str(parallel), str(pg_wal / name)],
                        check=True, capture_output=True,
                    )  # fmt: skip
                    (pg_wal / "archive_status" / f"{name}.ready").rename(
                        pg_wal / "archive_status" / f"{name}.done"
                    )  # as the server's archiver does after exit 0
                seconds = time.monotonic() - started
                lines.append(
                    f"wal-push --parallel {parallel}: {len(names)} segments in {seconds:.1f} s, "
                    f"{len(names) / seconds:.2f} segments/s"
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return lines


@contextmanager
def _started(root: Path) -> Iterator[Cluster]:
    (root / "cluster").mkdir()
    shutil.chown(root / "cluster", root.owner(), root.group())
    cluster = Cluster(root / "cluster", free_port())
    try:
        yield cluster.init({"archive_mode": "off"}).start()
    finally:
        cluster.stop()


def _socket_connect(folder: Path, port: int):  # type: ignore[no-untyped-def]
    import psycopg

    conn = psycopg.connect(host=str(folder), port=port, user="postgres", dbname="postgres")
    conn.autocommit = True
    return conn


def _status(spool: Path) -> dict[str, Any]:
    with suppress(FileNotFoundError, json.JSONDecodeError):
        return json.loads((spool / "status.json").read_text())
    return {}


def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--mode", choices=["archive", "stream", "stream-lost", "all"], default="all"
    )
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--load", type=float, default=25.0, help="seconds of load before the kill")
    parser.add_argument("--scale", type=int, default=2, help="pgbench -i -s")
    parser.add_argument("--archive-timeout", type=int, default=10)
    parser.add_argument("--interval", type=float, default=1.0, help="wal-receive --interval")
    parser.add_argument("--segments", type=int, default=16, help="segments for the push rate")
    parser.add_argument("--no-push-rate", action="store_true")
    args = parser.parse_args(argv)
    print(json.dumps(basic_facts()))
    print(f"load average before: {load_average()}")
    modes = ["archive", "stream", "stream-lost"] if args.mode == "all" else [args.mode]
    with executable_for_postgres():
        for mode in modes:
            for run in range(1, args.runs + 1):
                try:
                    result = drill(mode, args)
                except Exception as exc:
                    print(f"{mode} run {run}: FAILED {type(exc).__name__}: {exc}")
                    continue
                target = 1.0 if mode.startswith("stream") else args.archive_timeout + 1.0
                rpo = result["rpo_seconds"]
                verdict = "ok" if rpo is not None and rpo <= target else "MISS"
                print(
                    f"{mode} run {run}: RPO {rpo} s ({result['lost_heartbeats']} of "
                    f"{result['committed_heartbeats']} heartbeats lost; target <= {target:g} s: "
                    f"{verdict}), RTO {result['rto_seconds']} s {result['pitr_breakdown']}, "
                    f"{result['wal_files']} WAL files"
                )
    if not args.no_push_rate:
        with executable_for_postgres():
            for line in push_rate(args):
                print(line)
    print(f"load average after: {load_average()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
