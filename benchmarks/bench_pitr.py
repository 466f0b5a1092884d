"""Point-in-time recovery: ``pg-pitr --to-time T`` against ``pgbackrest restore --type=time``
on the same cluster and the same target time (issue 13: our wall time at most 1.1 times
pgBackRest's).

One throwaway PostgreSQL 15 cluster archives every WAL segment into both tools
(``archive_command`` runs ``spark-backup wal-push`` and then ``pgbackrest archive-push``); both
take a base backup of it; ``pgbench -c 2`` runs for ``--load`` seconds, T is noted
``--after-target`` seconds before the load ends, the last segment is switched and archived,
and the cluster is stopped. Then, interleaved (ours, pgBackRest, ours, ...), ``--runs`` times:

* spark-backup: ``ops.pitr`` to T into a new folder, which restores the base backup, fetches and
  checks the WAL, replays it until the server is promoted and counts every table's rows;
* pgBackRest: ``pgbackrest restore --type=time --target=T --target-action=promote`` into a new
  data directory, then ``pg_ctl start`` and waiting until ``pg_is_in_recovery()`` is false. It
  runs as pgBackRest is tuned for speed: ``process-max`` 2, asynchronous ``archive-get`` (its
  prefetch queue), zstd level 3 and AES-256 encryption (ours: zstd and age).

Both recovered clusters must hold the same ``pgbench_history`` row count (the same target).
Reported: wall seconds, CPU seconds of this process and its children (the recovered server
runs detached, so its replay CPU is in neither figure), our breakdown, the ratio and the load
average. Needs root (the clusters run as ``postgres``) and ``pgbackrest``
(``benchmarks/install_tools.sh``). Exits 0; reports, does not judge.

    nice .venv/bin/python benchmarks/bench_pitr.py                 # ~3 min
    nice .venv/bin/python benchmarks/bench_pitr.py --load 60 --runs 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import closing, suppress
from pathlib import Path
from typing import Any

from machine import basic_facts, load_average

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spark_backup.service import BackupService
from spark_backup.sources.postgres import KIND as POSTGRES
from spark_backup.sources.postgres import ops
from spark_backup_tests.helpers import free_port
from spark_backup_tests.pg_cluster import (
    BIN_DIR,
    OS_USER,
    Cluster,
    archive_command,
    as_os_user,
    chown_tree,
    executable_for_postgres,
    postgres_plan,
    shared_dir,
)

SOURCE = "bench_pitr"
STANZA = "bench"
PGBACKREST = shutil.which("pgbackrest") or "/usr/bin/pgbackrest"


def cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def pgbackrest_conf(root: Path, data: Path, port: int) -> Path:
    conf = root / "pgbackrest.conf"
    conf.write_text(
        "[global]\n"
        f"repo1-path={root / 'pgbr-repo'}\n"
        "repo1-cipher-type=aes-256-cbc\n"
        "repo1-cipher-pass=bench-only-passphrase\n"
        "repo1-retention-full=2\n"
        "compress-type=zst\n"
        "compress-level=3\n"
        "process-max=2\n"
        "archive-async=y\n"
        f"spool-path={root / 'pgbr-spool'}\n"
        f"lock-path={root / 'pgbr-lock'}\n"
        f"log-path={root / 'pgbr-log'}\n"
        "log-level-console=warn\n"
        "log-level-file=info\n"
        "start-fast=y\n"
        f"\n[{STANZA}]\n"
        f"pg1-path={data}\n"
        f"pg1-port={port}\n"
        f"pg1-socket-path={root / 'cluster'}\n"
    )
    for folder in ("pgbr-repo", "pgbr-spool", "pgbr-lock", "pgbr-log"):
        (root / folder).mkdir(exist_ok=True)
    chown_tree(root)
    return conf


def pgbackrest(conf: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        as_os_user([PGBACKREST, f"--config={conf}", f"--stanza={STANZA}", *args]),
        check=True,
        capture_output=True,
        text=True,
    )


def prepare(root: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The cluster, both archives, both base backups, the load and the target time."""
    port = free_port()
    plan_path = postgres_plan(root, SOURCE, port)
    store = root / "store"
    (root / "cluster").mkdir()
    cluster = Cluster(root / "cluster", port)
    conf = pgbackrest_conf(root, cluster.data, port)
    ours = (
        archive_command(plan_path, SOURCE).strip("'").replace("wal-push", "wal-push --parallel 4")
    )
    theirs = f"{PGBACKREST} --config={conf} --stanza={STANZA} archive-push %p"
    cluster.init(
        {
            "wal_level": "replica",
            "archive_mode": "on",
            "archive_command": f"'{ours} && {theirs}'",
            "max_wal_size": "1GB",
        }
    ).start()
    pgbackrest(conf, "stanza-create")
    subprocess.run(
        [str(BIN_DIR / "pgbench"), "-i", "-s", str(args.scale), "-q",
         "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"],
        check=True, capture_output=True,
    )  # fmt: skip
    service = BackupService.from_path(plan_path)
    service.backup(SOURCE, artifact="base")
    pgbackrest(conf, "--type=full", "backup")
    load = subprocess.Popen(
        [str(BIN_DIR / "pgbench"), "-c", "2", "-T", str(int(args.load)), "-n",
         "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "postgres"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(max(args.load - args.after_target, 1))
    target = dt.datetime.now(dt.UTC)
    if load.wait():
        raise RuntimeError(f"pgbench failed: {load.stderr.read() if load.stderr else ''}")
    cluster.switch_wal_and_wait(timeout=600)
    wal_bytes = sum(p.stat().st_size for p in (store / SOURCE / "wal").rglob("*.age"))
    cluster.stop()
    return {
        "plan": plan_path,
        "conf": conf,
        "cluster": cluster,
        "target": target,
        "wal_stored_mb": round(wal_bytes / 1e6, 1),
    }


def run_ours(root: Path, setup: dict[str, Any], run: int) -> dict[str, Any]:
    service = BackupService.from_path(setup["plan"])
    folder = root / f"ours-{run}"
    cpu, started = cpu_seconds(), time.monotonic()
    report = ops.pitr(
        service, POSTGRES, service.source(SOURCE), setup["target"], folder, port=free_port()
    )
    wall, cpu = time.monotonic() - started, cpu_seconds() - cpu
    history = report.databases["postgres"]["row_counts"].get("public.pgbench_history")
    Cluster(folder, report.port).stop()
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "wall": wall,
        "cpu": cpu,
        "breakdown": report.seconds,
        "wal_files": report.wal_files,
        "history_rows": history,
    }


def base_restore_split(root: Path, setup: dict[str, Any]) -> str:
    """Our base backup restore alone, with the CPU of this process (reading the plaintext,
    hashing it, extracting the tar) apart from the decrypting worker's (age and zstd): which
    one limits it, and whether more threads could help."""
    import resource

    from spark_backup.sources.base import CopyRef, FolderRestore
    from spark_backup.sources.postgres.basebackup import BASE_PART

    service = BackupService.from_path(setup["plan"])
    source = service.source(SOURCE)
    [base] = [r.manifest for r in service.copies(SOURCE, BASE_PART)]
    folder = root / "base-split"
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    POSTGRES.restore_to_folder(
        CopyRef(service.store_for(source), base), service.identities(None), folder, FolderRestore()
    )
    wall = time.monotonic() - started
    own_after = resource.getrusage(resource.RUSAGE_SELF)
    children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    shutil.rmtree(folder, ignore_errors=True)
    main_cpu = own_after.ru_utime + own_after.ru_stime - own.ru_utime - own.ru_stime
    worker_cpu = (
        children_after.ru_utime + children_after.ru_stime - children.ru_utime - children.ru_stime
    )
    size = base.plaintext.bytes / 1e6
    return (
        f"base restore alone: {size:.0f} MB tar in {wall:.2f} s; CPU of the extracting process "
        f"{main_cpu:.2f} s, of the decrypting/decompressing worker {worker_cpu:.2f} s"
    )


def run_pgbackrest(root: Path, setup: dict[str, Any], run: int) -> dict[str, Any]:
    folder = root / f"pgbr-{run}"
    folder.mkdir()
    chown_tree(folder)
    data = folder / "data"
    cluster: Cluster = setup["cluster"]
    target = setup["target"].isoformat(sep=" ")
    cpu, started = cpu_seconds(), time.monotonic()
    pgbackrest(
        setup["conf"],
        f"--pg1-path={data}",
        "--type=time",
        f"--target={target}",
        "--target-action=promote",
        "--archive-mode=off",
        "restore",
    )
    restored = time.monotonic()
    subprocess.run(
        as_os_user(
            [str(BIN_DIR / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w",
             "-t", "3600", "-o", f"-c port={cluster.port} -c unix_socket_directories={folder}",
             "start"]
        ),
        check=True, capture_output=True,
    )  # fmt: skip
    import psycopg

    while True:
        with (
            suppress(psycopg.OperationalError),
            closing(psycopg.connect(host=str(folder), port=cluster.port, user="postgres")) as conn,
        ):
            if not conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                history = conn.execute("SELECT count(*) FROM pgbench_history").fetchone()[0]
                break
        time.sleep(0.1)
    wall, cpu = time.monotonic() - started, cpu_seconds() - cpu
    subprocess.run(
        as_os_user([str(BIN_DIR / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
        capture_output=True,
    )
    shutil.rmtree(folder, ignore_errors=True)
    return {
        "wall": wall,
        "cpu": cpu,
        "breakdown": {
            "restore": round(restored - started, 3),
            "start_and_replay": round(wall - (restored - started), 3),
        },
        "history_rows": history,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="runs of each tool, interleaved")
    parser.add_argument("--load", type=int, default=40, help="seconds of pgbench load")
    parser.add_argument("--after-target", type=float, default=3.0, help="load after T (s)")
    parser.add_argument("--scale", type=int, default=5, help="pgbench -i -s")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args(argv)
    if not OS_USER:
        print("bench_pitr needs root (the clusters run as postgres)")
        return 0
    if not Path(PGBACKREST).exists():
        print("pgbackrest not installed (benchmarks/install_tools.sh); skipped")
        return 0
    print(json.dumps(basic_facts()))
    print(f"load average before: {load_average()}")
    root = shared_dir("spark-backup-bench-pitr-")
    results: dict[str, list[dict[str, Any]]] = {"spark-backup": [], "pgbackrest": []}
    try:
        with executable_for_postgres():
            setup = prepare(root, args)
            print(
                f"target {setup['target'].isoformat()}, {setup['wal_stored_mb']} MB of WAL "
                f"stored (ours), load average {load_average()}"
            )
            print(base_restore_split(root, setup))
            for run in range(1, args.runs + 1):
                for tool, action in (("spark-backup", run_ours), ("pgbackrest", run_pgbackrest)):
                    result = action(root, setup, run)
                    result["load_average"] = load_average()
                    results[tool].append(result)
                    print(
                        f"run {run} {tool:<12} wall {result['wall']:6.2f} s  cpu "
                        f"{result['cpu']:5.2f} s  pgbench_history {result['history_rows']}  "
                        f"{result['breakdown']}  (load {result['load_average']})"
                    )
    finally:
        Cluster(root / "cluster", 0).stop()
        shutil.rmtree(root, ignore_errors=True)
    best = {tool: min(r["wall"] for r in runs) for tool, runs in results.items()}
    ratio = best["spark-backup"] / best["pgbackrest"]
    rows = {r["history_rows"] for runs in results.values() for r in runs}
    print(
        f"best wall: spark-backup {best['spark-backup']:.2f} s, pgbackrest "
        f"{best['pgbackrest']:.2f} s, ratio {ratio:.2f} (target <= 1.10: "
        f"{'met' if ratio <= 1.1 else 'MISS'}); same target: "
        f"{'yes' if len(rows) == 1 else f'NO, pgbench_history rows {sorted(rows)}'}"
    )
    print(f"load average after: {load_average()}")
    if args.json:
        args.json.write_text(
            json.dumps({"best": best, "ratio": ratio, "runs": results}, default=str, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
