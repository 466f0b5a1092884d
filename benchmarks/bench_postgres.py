"""Benchmark spark-backup's PostgreSQL source against the PostgreSQL client tools, and measure
point-in-time recovery time and the RPO that WAL archiving with ``archive_timeout = 60s`` gives.

In one throwaway cluster with WAL archiving through ``spark-backup wal-push`` and a
``pgbench -i -s SCALE`` database, this measures

* dump: ``spark-backup backup`` beside ``pg_dump -Fc`` and ``pg_dump -Fc -Z0`` (to /dev/null);
* restore: ``spark-backup restore ID --to-db`` beside ``pg_restore -j2`` and
  ``pg_restore --single-transaction`` of a ``pg_dump -Fc`` file;
* base backup: ``spark-backup backup --artifact base`` beside ``pg_basebackup -Ft`` to stdout
  (/dev/null) and to a folder;
* PITR: ``spark-backup pg-pitr --to-time T`` after pgbench ran before and after T;
* RPO: a client commits a row every 0.5 s, the cluster is killed (``pg_ctl -m immediate``, its
  pg_wal deleted), ``pg-pitr --to-time latest`` recovers from the archive, and the newest row
  recovered is compared with the last row the client saw committed.

Every throughput figure is the best (fastest) of the runs. The script always exits 0: it reports,
it does not judge (MISS lines say where a target was not met). Needs root or the ``postgres``
OS user, the PostgreSQL server binaries (``SPARK_BACKUP_PG_BIN``, default
/usr/lib/postgresql/15/bin).

Run with the project's venv, from the checkout::

    .venv/bin/python benchmarks/bench_postgres.py                # scale 50, about 10 minutes
    .venv/bin/python benchmarks/bench_postgres.py --quick        # scale 2, about 2 minutes
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import closing, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from machine import basic_facts, first_line, load_average

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # spark_backup_tests, from anywhere

from spark_backup_tests.helpers import free_port, make_key
from spark_backup_tests.pg_cluster import (
    BIN_DIR,
    SPARK_BACKUP,
    Cluster,
    archive_command,
    as_os_user,
    chown_tree,
    executable_for_postgres,
    shared_dir,
    throwaway_cluster,
)

MB = 1_000_000  # throughput and sizes are reported in decimal megabytes
SOURCE = "bench_pg"
DATABASE = "bench"
TARGET_DUMP_RATIO = 0.85  # our dump must reach this share of raw pg_dump -Fc's throughput
TARGET_RPO_SECONDS = 60.0
RTO_SECONDS = 2 * 3600
ARCHIVE_TIMEOUT = "60s"
PROBE_INTERVAL = 0.5  # seconds between the RPO client's commits
SETTLE_TIMEOUT = 1800.0


# --- running and timing commands ---------------------------------------------------------------


class CommandFailed(RuntimeError):
    def __init__(self, args: list[str], status: int, stdout: str, stderr: str):
        self.status = status
        self.stdout = stdout
        self.stderr = stderr
        tail = "\n".join((stderr or stdout).strip().splitlines()[-5:])
        super().__init__(f"exit {status}: {' '.join(args)}\n{tail}")


@dataclass
class Run:
    seconds: float
    cpu_seconds: float | None = None  # user + system, the process and the children it waited for
    rss_mb: float | None = None  # ru_maxrss: the largest single process of that tree
    stdout: str = field(default="", repr=False)

    def plus(self, other: Run) -> Run:
        """Two commands run one after the other, as one."""
        return Run(
            self.seconds + other.seconds,
            (self.cpu_seconds or 0) + (other.cpu_seconds or 0),
            max(self.rss_mb or 0, other.rss_mb or 0),
        )


def run_timed(args: list[str], *, capture: bool = False, ok: tuple[int, ...] = (0,)) -> Run:
    """Run a command; wall time, CPU time and peak RSS from wait4 (so they are that process
    tree's alone). stdout goes to /dev/null unless captured."""
    with tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
            stderr=err,
        )
        out = proc.stdout.read() if proc.stdout else b""
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.stdout:
            proc.stdout.close()
        text = out.decode(errors="replace")
        if proc.returncode not in ok:
            err.seek(0)
            raise CommandFailed(args, proc.returncode, text, err.read().decode(errors="replace"))
    return Run(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, text)


def spark(plan: Path, *args: str) -> list[str]:
    return [str(SPARK_BACKUP), "--plan", str(plan), *args]


def pg_tool(name: str) -> str:
    return str(BIN_DIR / name)


def conn_args(cluster: Cluster) -> list[str]:
    return ["-h", "127.0.0.1", "-p", str(cluster.port), "-U", "postgres"]


def rotated(items: list[str], i: int) -> list[str]:
    """Each repeat starts with a different side, so none always runs on a warmer cache."""
    k = i % len(items)
    return items[k:] + items[:k]


def copy_seconds(manifest: dict[str, Any]) -> float:
    started = dt.datetime.fromisoformat(manifest["started_at"])
    return (dt.datetime.fromisoformat(manifest["finished_at"]) - started).total_seconds()


def settle(cluster: Cluster, timeout: float = SETTLE_TIMEOUT) -> float:
    """Outside every timed part: wait until the archiver has pushed every finished WAL segment
    (wal-push runs as processes of its own and would otherwise compete for the two cores), then
    CHECKPOINT and sync. Returns the seconds waited."""
    started = time.monotonic()
    status_dir = cluster.data / "pg_wal" / "archive_status"
    failed_before = cluster.execute("SELECT failed_count FROM pg_stat_archiver")[0][0]
    while any(status_dir.glob("*.ready")):
        failed, last = cluster.execute(
            "SELECT failed_count, last_failed_wal FROM pg_stat_archiver"
        )[0]
        if failed - failed_before >= 3:
            raise RuntimeError(f"archiving fails ({last}); see {cluster.log}:\n{log_tail(cluster)}")
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"archiver still busy after {timeout:.0f} s; see {cluster.log}")
        time.sleep(0.5)
    cluster.execute("CHECKPOINT")
    os.sync()
    return time.monotonic() - started


def log_tail(cluster: Cluster, lines: int = 10) -> str:
    try:
        text = cluster.log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


# --- plan, key, clusters -----------------------------------------------------------------------


def archiving_settings(plan: Path) -> dict[str, str]:
    return {
        "wal_level": "replica",
        "archive_mode": "on",
        "archive_timeout": ARCHIVE_TIMEOUT,
        "archive_command": archive_command(plan, SOURCE),
        "max_wal_senders": "10",
    }


def write_plan(plan: Path, store: Path, port: int, key: Path, public: str) -> None:
    """The plan (JSON is YAML) and a store both we and the cluster's OS user can write to."""
    (store / SOURCE / "wal").mkdir(parents=True, exist_ok=True)
    chown_tree(store)
    document = {
        "version": 1,
        "defaults": {"store": "local", "compression": {"level": 3, "threads": 2}},
        "encryption": {"recipients": [public], "identity_file": str(key)},
        "stores": [{"name": "local", "kind": "local", "path": str(store)}],
        "sources": [
            {
                "name": SOURCE,
                "kind": "postgres",
                "cadence": "daily",
                "owner": "team:dba",
                "host": "127.0.0.1",
                "port": port,
                "user": "postgres",
                "databases": [DATABASE],
            }
        ],
    }
    plan.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    os.chmod(plan, 0o644)


def stop_recovered(target: Path) -> None:
    """Stop a cluster pg-pitr left running in ``target`` (it is never left running here)."""
    data = target / "data"
    if (data / "postmaster.pid").exists():
        subprocess.run(
            as_os_user([pg_tool("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]),
            capture_output=True,
        )


def pitr(
    plan: Path, to_time: str, target: Path, query: str
) -> tuple[Run, dict[str, Any], tuple[Any, ...]]:
    """``pg-pitr`` (timed), then ``query`` in the recovered ``bench`` database, then stop it."""
    port = free_port()
    try:
        run = run_timed(
            spark(
                plan,
                "pg-pitr",
                SOURCE,
                "--to-time",
                to_time,
                "--target-dir",
                str(target),
                "--port",
                str(port),
                "--json",
            ),
            capture=True,
        )
        report = json.loads(run.stdout)
        with (
            closing(
                psycopg.connect(host=str(target), port=port, user="postgres", dbname=DATABASE)
            ) as conn,
            conn.cursor() as cursor,
        ):
            cursor.execute(query)
            row = cursor.fetchone()
    finally:
        stop_recovered(target)
    return run, report, row


# --- measurements ------------------------------------------------------------------------------


@dataclass
class Measurement:
    operation: str
    label: str
    size_bytes: int
    runs: list[Run] = field(default_factory=list)
    reference: bool = False  # the row the others' ratio is taken against

    @property
    def best(self) -> Run | None:
        return min(self.runs, key=lambda r: r.seconds, default=None)

    @property
    def mbps(self) -> float:
        best = self.best
        return self.size_bytes / MB / best.seconds if best and best.seconds > 0 else 0.0

    @property
    def rss_mb(self) -> float | None:
        seen = [r.rss_mb for r in self.runs if r.rss_mb is not None]
        return max(seen) if seen else None

    def to_json(self) -> dict[str, Any]:
        best = self.best
        return {
            "operation": self.operation,
            "label": self.label,
            "size_bytes": self.size_bytes,
            "best_seconds": round(best.seconds, 3) if best else None,
            "mb_per_s": round(self.mbps, 2),
            "peak_rss_mb": None if self.rss_mb is None else round(self.rss_mb, 1),
            "reference": self.reference,
            "runs": [
                {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(r).items()}
                | {"stdout": None}
                for r in self.runs
            ],
        }


@dataclass
class Context:
    args: argparse.Namespace
    workdir: Path
    plan: Path
    cluster: Cluster
    db_bytes: int = 0
    key: Path = Path()
    public: str = ""
    dump_copy_id: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def bench_dumps(ctx: Context) -> list[Measurement]:
    c, size = ctx.cluster, ctx.db_bytes
    ours_copy = Measurement("dump", "spark-backup backup: the database copy", size)
    ours_cmd = Measurement("dump", "spark-backup backup: whole command", size)
    fc = Measurement("dump", "pg_dump -Fc > /dev/null", size, reference=True)
    z0 = Measurement("dump", "pg_dump -Fc -Z0 > /dev/null", size)
    dump = [pg_tool("pg_dump"), *conn_args(c), "-d", DATABASE, "-Fc"]
    for i in range(ctx.args.repeat):
        for side in rotated(["ours", "fc", "z0"], i):
            settle(c)
            if side == "ours":
                run = run_timed(spark(ctx.plan, "backup", SOURCE, "--json"), capture=True)
                manifests = json.loads(run.stdout)
                db = next(m for m in manifests if m["part"] == f"database:{DATABASE}")
                ours_copy.runs.append(Run(copy_seconds(db)))
                ours_cmd.runs.append(run)
                ctx.dump_copy_id = db["id"]
                ctx.facts["dump_plaintext_bytes"] = db["plaintext"]["bytes"]
                ctx.facts["dump_stored_bytes"] = db["stored"]["bytes"]
                ctx.facts["dump_copies_per_run"] = [m["part"] for m in manifests]
            elif side == "fc":
                fc.runs.append(run_timed(dump))
            else:
                z0.runs.append(run_timed([*dump, "-Z0"]))
        print(
            f"  [dump {i + 1}/{ctx.args.repeat}] ours {ours_cmd.runs[-1].seconds:.1f}s "
            f"(database copy {ours_copy.runs[-1].seconds:.1f}s) | pg_dump -Fc "
            f"{fc.runs[-1].seconds:.1f}s | -Z0 {z0.runs[-1].seconds:.1f}s",
            flush=True,
        )
    return [ours_copy, ours_cmd, fc, z0]


def bench_restores(ctx: Context) -> list[Measurement]:
    c, size = ctx.cluster, ctx.db_bytes
    assert ctx.dump_copy_id, "no dump copy to restore"
    raw = ctx.workdir / "raw"
    raw.mkdir(exist_ok=True)
    dump_file, plain_file = raw / f"{DATABASE}.dump", raw / f"{DATABASE}-z0.dump"
    dump = [pg_tool("pg_dump"), *conn_args(c), "-d", DATABASE, "-Fc"]
    run_timed([*dump, "-f", str(dump_file)])
    run_timed([*dump, "-Z0", "-f", str(plain_file)])
    ctx.facts["pg_dump_fc_file_bytes"] = dump_file.stat().st_size
    ctx.facts["pg_dump_fc_z0_file_bytes"] = plain_file.stat().st_size
    ours = Measurement("restore", "spark-backup restore --to-db", size)
    j2 = Measurement("restore", "createdb + pg_restore -j2", size, reference=True)
    single = Measurement("restore", "createdb + pg_restore --single-transaction", size)
    # What our restore does without our pipeline: an uncompressed dump through a pipe.
    piped = Measurement("restore", "createdb + cat -Z0 dump | pg_restore -1", size)
    restore = [pg_tool("pg_restore"), *conn_args(c), "--exit-on-error"]
    rows = {"j2": j2, "single": single, "piped": piped}
    for i in range(ctx.args.restore_repeat):
        for side in rotated(["ours", "j2", "single", "piped"], i):
            settle(c)
            target = f"restore_{side}"
            try:
                if side == "ours":
                    argv = spark(ctx.plan, "restore", ctx.dump_copy_id, "--to-db", target, "--json")
                    run = run_timed(argv, capture=True)
                    ours.runs.append(run)
                    ctx.facts["restore_summary"] = json.loads(run.stdout)
                    continue
                created = run_timed([pg_tool("createdb"), *conn_args(c), target])
                if side == "piped":
                    command = " ".join(
                        shlex.quote(a) for a in [*restore, "--single-transaction", "-d", target]
                    )
                    shell = f"cat {shlex.quote(str(plain_file))} | {command}"
                    loaded = run_timed(["bash", "-o", "pipefail", "-c", shell])
                else:
                    flags = ["-j2"] if side == "j2" else ["--single-transaction"]
                    loaded = run_timed([*restore, *flags, "-d", target, str(dump_file)])
                rows[side].runs.append(created.plus(loaded))
                accounts = c.execute("SELECT count(*) FROM pgbench_accounts", target)[0][0]
                if accounts != ctx.args.scale * 100_000:
                    raise RuntimeError(f"{target}: {accounts} accounts after pg_restore")
            finally:
                c.execute(f"DROP DATABASE IF EXISTS {target} WITH (FORCE)")
        print(
            f"  [restore {i + 1}/{ctx.args.restore_repeat}] ours {ours.runs[-1].seconds:.1f}s | "
            f"pg_restore -j2 {j2.runs[-1].seconds:.1f}s | single transaction "
            f"{single.runs[-1].seconds:.1f}s | piped -Z0 {piped.runs[-1].seconds:.1f}s",
            flush=True,
        )
    dump_file.unlink()
    plain_file.unlink()
    return [ours, j2, single, piped]


def bench_base_backups(ctx: Context) -> list[Measurement]:
    c = ctx.cluster
    ours = Measurement("base backup", "spark-backup backup --artifact base", 0)
    out = Measurement("base backup", "pg_basebackup -Ft -D - > /dev/null", 0, reference=True)
    # What our base backup asks of pg_basebackup (backup_manifest with SHA256 checksums).
    sha = Measurement("base backup", "pg_basebackup -Ft -D - --manifest-checksums=SHA256", 0)
    folder = Measurement("base backup", "pg_basebackup -Ft -D DIR", 0)
    base = [pg_tool("pg_basebackup"), *conn_args(c), "-Ft", "-X", "fetch", "-c", "fast"]
    target = ctx.workdir / "raw" / "basebackup"
    for i in range(ctx.args.repeat):
        for side in rotated(["ours", "stdout", "sha", "dir"], i):
            settle(c)
            if side == "ours":
                argv = spark(ctx.plan, "backup", SOURCE, "--artifact", "base", "--json")
                run = run_timed(argv, capture=True)
                manifest = json.loads(run.stdout)[0]
                ours.runs.append(run)
                ctx.facts["base_plaintext_bytes"] = manifest["plaintext"]["bytes"]
                ctx.facts["base_stored_bytes"] = manifest["stored"]["bytes"]
                ctx.facts["base_copy_seconds"] = round(copy_seconds(manifest), 3)
            elif side == "stdout":
                out.runs.append(run_timed([*base, "-D", "-"]))
            elif side == "sha":
                sha.runs.append(run_timed([*base, "-D", "-", "--manifest-checksums=SHA256"]))
            else:
                shutil.rmtree(target, ignore_errors=True)
                try:
                    folder.runs.append(run_timed([*base, "-D", str(target)]))
                finally:
                    shutil.rmtree(target, ignore_errors=True)
        print(
            f"  [base {i + 1}/{ctx.args.repeat}] ours {ours.runs[-1].seconds:.1f}s | "
            f"-D - {out.runs[-1].seconds:.1f}s | SHA256 manifest {sha.runs[-1].seconds:.1f}s | "
            f"-D DIR {folder.runs[-1].seconds:.1f}s",
            flush=True,
        )
    # All of them copy the same cluster: measure them against the size of our tar stream.
    for m in (ours, out, sha, folder):
        m.size_bytes = ctx.facts["base_plaintext_bytes"]
    return [ours, out, sha, folder]


def bench_wal_push(ctx: Context) -> list[Measurement]:
    """One wal-push of a full pgbench segment (as archive_command runs it, per segment) into a
    scratch store: with archive_timeout, this is how much later than the switch a segment is
    safe, on top of the timeout."""
    c = ctx.cluster
    status = c.data / "pg_wal" / "archive_status"
    names = sorted(p.name.removesuffix(".done") for p in status.glob("*.done"))
    segments = [n for n in names if len(n) == 24 and (c.data / "pg_wal" / n).exists()]
    if not segments:
        raise RuntimeError("no archived segment left in pg_wal to push again")
    folder = ctx.workdir / "walpush"
    folder.mkdir()
    segment = folder / segments[-1]
    shutil.copyfile(c.data / "pg_wal" / segments[-1], segment)
    plan, store = ctx.workdir / "plan-walpush.yaml", ctx.workdir / "store-walpush"
    push = Measurement("wal-push", "spark-backup wal-push (one segment)", segment.stat().st_size)
    for _ in range(ctx.args.repeat):
        shutil.rmtree(store, ignore_errors=True)
        write_plan(plan, store, c.port, ctx.key, ctx.public)
        os.sync()
        push.runs.append(run_timed(spark(plan, "wal-push", "--source", SOURCE, str(segment))))
    stored = sum(p.stat().st_size for p in (store / SOURCE / "wal").iterdir())
    ctx.facts["wal_push_segment_stored_bytes"] = stored
    print(
        f"  {segment.name}: {', '.join(f'{r.seconds:.2f}s' for r in push.runs)}; "
        f"{segment.stat().st_size / MB:.1f} MB -> {stored / MB:.1f} MB stored",
        flush=True,
    )
    shutil.rmtree(folder, ignore_errors=True)
    shutil.rmtree(store, ignore_errors=True)
    return [push]


def pgbench_run(cluster: Cluster, seconds: int) -> str:
    argv = [pg_tool("pgbench"), *conn_args(cluster), "-T", str(seconds), "-c", "2", DATABASE]
    out = run_timed(argv, capture=True).stdout
    tps = [line for line in out.splitlines() if line.startswith("tps")]
    return tps[0] if tps else "?"


def bench_pitr(ctx: Context) -> dict[str, Any]:
    """A base backup, pgbench, note T, more pgbench, archive, then recover to T."""
    c, seconds = ctx.cluster, ctx.args.pgbench_seconds
    settle(c)
    base = run_timed(spark(ctx.plan, "backup", SOURCE, "--artifact", "base"), capture=True)
    print(f"  base backup {base.seconds:.1f}s; pgbench -T {seconds} -c 2 ...", flush=True)
    first = pgbench_run(c, seconds)
    noted, rows_at_noted = c.execute(
        "SELECT clock_timestamp(), (SELECT count(*) FROM pgbench_history)", DATABASE
    )[0]
    noted_iso = noted.astimezone(dt.UTC).isoformat()
    time.sleep(1)
    print(f"  noted {noted_iso} ({rows_at_noted} history rows); pgbench again ...", flush=True)
    second = pgbench_run(c, seconds)
    started = time.monotonic()
    c.switch_wal_and_wait(timeout=SETTLE_TIMEOUT)
    archived_in = time.monotonic() - started
    rows_now = c.execute("SELECT count(*) FROM pgbench_history", DATABASE)[0][0]
    print(f"  WAL archived {archived_in:.1f}s after pgbench; pg-pitr --to-time ...", flush=True)
    run, report, (rows, newest) = pitr(
        ctx.plan,
        noted_iso,
        ctx.workdir / "pitr",
        "SELECT count(*), max(mtime) FROM pgbench_history",
    )
    result = {
        "base_backup_seconds": round(base.seconds, 2),
        "pgbench_before": first,
        "pgbench_after": second,
        "target_time": noted_iso,
        "history_rows_at_target": rows_at_noted,
        "history_rows_at_end": rows_now,
        "history_rows_recovered": rows,
        "newest_history_row_recovered": newest.isoformat() if newest else None,
        "archive_wait_seconds": round(archived_in, 2),
        "pitr_wall_seconds": round(run.seconds, 2),
        "pitr_peak_rss_mb": round(run.rss_mb or 0, 1),
        "steps": report["seconds"],
        "wal_files": report["wal_files"],
        "recovered_to": report["recovered_to"],
        "stopped": report["stopped"],
        "ok": report["ok"],
    }
    shutil.rmtree(ctx.workdir / "pitr", ignore_errors=True)
    return result


class ProbeWriter(threading.Thread):
    """The RPO client: commits one row every PROBE_INTERVAL seconds until the server goes away;
    ``last`` is the newest row whose commit returned."""

    def __init__(self, port: int):
        super().__init__(daemon=True)
        self.port = port
        self.stopping = threading.Event()
        self.last: tuple[int, dt.datetime] | None = None
        self.committed = 0
        self.error: str | None = None

    def run(self) -> None:
        try:
            conn = psycopg.connect(
                host="127.0.0.1", port=self.port, user="postgres", dbname=DATABASE
            )
        except psycopg.Error as exc:
            self.error = str(exc).strip()
            return
        conn.autocommit = True
        try:
            with conn.cursor() as cursor:
                while not self.stopping.is_set():
                    cursor.execute(
                        "INSERT INTO rpo_probe DEFAULT VALUES RETURNING id, committed_at"
                    )
                    self.last = cursor.fetchone()
                    self.committed += 1
                    self.stopping.wait(PROBE_INTERVAL)
        except psycopg.Error as exc:  # the disaster
            self.error = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        finally:
            with suppress(psycopg.Error):
                conn.close()


def rpo_run(cluster: Cluster, plan: Path, target: Path, seconds: float) -> dict[str, Any]:
    """Commit rows for ``seconds``, kill the cluster, recover ``latest`` from the archive."""
    cluster.execute(
        "CREATE TABLE IF NOT EXISTS rpo_probe (id bigserial PRIMARY KEY, committed_at "
        "timestamptz NOT NULL DEFAULT clock_timestamp())",
        DATABASE,
    )
    writer = ProbeWriter(cluster.port)
    writer.start()
    time.sleep(max(0.0, seconds - 1.5))  # wal-status below takes about a second
    status = run_timed(spark(plan, "wal-status", SOURCE, "--json"), capture=True, ok=(0, 3))
    lag = json.loads(status.stdout).get("lag_seconds")
    crashed_at = dt.datetime.now(dt.UTC)
    cluster.stop()  # pg_ctl -m immediate stop
    writer.stopping.set()
    writer.join(timeout=30)
    # What the archiver had not pushed is lost with the machine: it must never be archived.
    shutil.rmtree(cluster.data / "pg_wal", ignore_errors=True)
    if writer.last is None:
        raise RuntimeError(f"the RPO client committed nothing ({writer.error})")
    last_id, last_at = writer.last
    print(
        f"  killed the cluster after {writer.committed} commits (last id {last_id} at "
        f"{last_at.astimezone(dt.UTC):%H:%M:%S.%f}); pg-pitr --to-time latest ...",
        flush=True,
    )
    run, report, (rows, newest_id, newest_at) = pitr(
        plan, "latest", target, "SELECT count(*), max(id), max(committed_at) FROM rpo_probe"
    )
    shutil.rmtree(target, ignore_errors=True)
    rpo = (last_at - newest_at).total_seconds() if newest_at else None
    return {
        "insert_seconds": seconds,
        "rows_committed": writer.committed,
        "last_committed_id": last_id,
        "last_committed_at": last_at.astimezone(dt.UTC).isoformat(),
        "crashed_at": crashed_at.isoformat(),
        "client_error": writer.error,
        "wal_status_lag_seconds_before_crash": lag,
        "rows_recovered": rows,
        "newest_recovered_id": newest_id,
        "newest_recovered_at": newest_at.astimezone(dt.UTC).isoformat() if newest_at else None,
        "rpo_seconds": None if rpo is None else round(rpo, 2),
        "pitr_wall_seconds": round(run.seconds, 2),
        "steps": report["seconds"],
        "wal_files": report["wal_files"],
        "recovered_to": report["recovered_to"],
    }


def rpo_on_small_cluster(ctx: Context, index: int, key: Path, public: str) -> dict[str, Any]:
    """A further RPO run needs a cluster of its own (the first one was killed): a fresh
    ``pgbench -i -s 1`` cluster with its own plan and store, and a base backup."""
    plan = ctx.workdir / f"plan-rpo{index}.yaml"
    store = ctx.workdir / f"store-rpo{index}"
    settings = archiving_settings(plan)
    with throwaway_cluster(prefix="spark-bench-pg-rpo-", settings=settings) as cluster:
        write_plan(plan, store, cluster.port, key, public)
        cluster.execute(f"CREATE DATABASE {DATABASE}")
        run_timed([pg_tool("pgbench"), *conn_args(cluster), "-i", "-s", "1", "-q", DATABASE])
        settle(cluster)
        run_timed(spark(plan, "backup", SOURCE, "--artifact", "base"), capture=True)
        result = rpo_run(cluster, plan, ctx.workdir / f"rpo{index}", ctx.args.rpo_seconds)
    shutil.rmtree(store, ignore_errors=True)
    return {"cluster": "pgbench scale 1 (fresh)", **result}


# --- reporting ---------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    return {
        **basic_facts(),
        "python": platform.python_version(),
        "spark_backup": first_line([str(SPARK_BACKUP), "--version"]),
        "postgres": first_line([pg_tool("postgres"), "--version"]),
        "load_average": load_average(),
    }


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(measurements: list[Measurement]) -> None:
    header = (
        f"{'operation':<12} {'command':<50} {'best s':>7} {'MB/s':>7} {'ratio':>7} "
        f"{'CPU s':>6} {'peak RSS MB':>11} {'runs':>4}"
    )
    print(header)
    print("-" * len(header))
    references = {m.operation: m for m in measurements if m.reference}
    for m in measurements:
        best, ref = m.best, references.get(m.operation)
        ratio = m.mbps / ref.mbps if ref and ref.mbps else None
        print(
            f"{m.operation:<12} {m.label:<50} {_opt(best and best.seconds, '7.2f'):>7} "
            f"{m.mbps:>7.1f} {_opt(ratio, '7.1%') if not m.reference else 'ref':>7} "
            f"{_opt(best and best.cpu_seconds, '6.1f'):>6} {_opt(m.rss_mb, '11.1f'):>11} "
            f"{len(m.runs):>4}"
        )


def print_pitr(result: dict[str, Any]) -> None:
    steps = ", ".join(f"{k} {v:.1f}s" for k, v in result["steps"].items())
    match = result["history_rows_recovered"] == result["history_rows_at_target"]
    print(
        f"PITR to {result['target_time']}: {result['pitr_wall_seconds']:.1f}s in all "
        f"({steps}); {result['wal_files']} WAL files; last transaction replayed "
        f"{result['recovered_to']}\n"
        f"  pgbench_history rows: {result['history_rows_at_target']} at the target, "
        f"{result['history_rows_recovered']} recovered ({'match' if match else 'MISMATCH'}), "
        f"{result['history_rows_at_end']} at the end; newest recovered row "
        f"{result['newest_history_row_recovered']}\n"
        f"  pgbench before: {result['pgbench_before']}; after: {result['pgbench_after']}"
    )


def print_rpo(runs: list[dict[str, Any]]) -> None:
    header = (
        f"{'run':<4} {'cluster':<26} {'commits':>7} {'last committed':>15} "
        f"{'newest recovered':>16} {'RPO s':>6} {'lag before':>10} {'pitr s':>7} {'WAL':>4}"
    )
    print(header)
    print("-" * len(header))
    for i, r in enumerate(runs, 1):
        if "error" in r:
            print(f"{i:<4} {r.get('cluster', ''):<26} error: {r['error']}")
            continue
        print(
            f"{i:<4} {r['cluster']:<26} {r['rows_committed']:>7} "
            f"{r['last_committed_at'][11:23]:>15} {(r['newest_recovered_at'] or '-')[11:23]:>16} "
            f"{_opt(r['rpo_seconds'], '6.1f'):>6} "
            f"{_opt(r['wal_status_lag_seconds_before_crash'], '10.1f'):>10} "
            f"{r['pitr_wall_seconds']:>7.1f} {r['wal_files']:>4}"
        )


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, help="pgbench scale (default 50; --quick: 2)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a functional run: scale 2, one run each, 5 s pgbench, one 70 s RPO run",
    )
    parser.add_argument("--repeat", type=int, help="runs per dump and base backup (default 3)")
    parser.add_argument("--restore-repeat", type=int, help="runs per restore (default 3)")
    parser.add_argument("--pgbench-seconds", type=int, help="each pgbench run for PITR (30)")
    parser.add_argument("--rpo-seconds", type=float, help="commits before the disaster (150)")
    parser.add_argument(
        "--rpo-runs", type=int, help="RPO runs; the 2nd and later on fresh clusters (2)"
    )
    parser.add_argument("--json", type=Path, help="write every figure to this file")
    args = parser.parse_args(argv)
    defaults = (
        {"scale": 2, "repeat": 1, "restore_repeat": 1, "pgbench_seconds": 5}
        | {"rpo_seconds": 70.0, "rpo_runs": 1}
        if args.quick
        else {"scale": 50, "repeat": 3, "restore_repeat": 3, "pgbench_seconds": 30}
        | {"rpo_seconds": 150.0, "rpo_runs": 2}
    )
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.repeat < 1 or args.restore_repeat < 1 or args.scale < 1:
        parser.error("--scale, --repeat and --restore-repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    missing = [t for t in ("runuser",) if not shutil.which(t)]
    missing += [n for n in ("pg_ctl", "pg_dump", "pgbench") if not (BIN_DIR / n).exists()]
    if missing or not SPARK_BACKUP.exists():
        print(f"error: not found: {', '.join(missing) or SPARK_BACKUP}", file=sys.stderr)
        return 0
    with executable_for_postgres():
        workdir = shared_dir("spark-bench-pg-")
        try:
            run_benchmark(args, workdir)
        finally:
            for target in workdir.glob("*/data"):
                stop_recovered(target.parent)
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def step(ctx: Context, name: str, action: Any) -> Any:
    """Run one part; a failure is reported and the parts that do not need it still run."""
    print(f"\n{name}", flush=True)
    started = time.monotonic()
    try:
        result = action()
    except Exception as exc:
        ctx.errors.append(f"{name}: {exc}")
        print(f"  FAILED: {exc}", flush=True)
        return None
    print(f"  ({time.monotonic() - started:.0f}s)", flush=True)
    return result


def run_benchmark(args: argparse.Namespace, workdir: Path) -> None:
    facts = machine_facts()
    print("machine")
    for name, value in facts.items():
        print(f"  {name:<14} {value}")
    print(
        f"settings: pgbench scale {args.scale}; best of {args.repeat} (dump, base backup), "
        f"{args.restore_repeat} (restore); archive_timeout {ARCHIVE_TIMEOUT}; zstd -3, 2 threads"
    )
    key, public = make_key(workdir)
    os.chmod(key, 0o644)  # wal-push runs as postgres and loads the plan, which names the key
    plan = workdir / "plan.yaml"
    store = workdir / "store"
    results: dict[str, Any] = {"machine": facts, "settings": vars(args) | {"json": None}}
    measurements: list[Measurement] = []
    rpo: list[dict[str, Any]] = []
    with throwaway_cluster(
        prefix="spark-bench-pg-cluster-", settings=archiving_settings(plan)
    ) as cluster:
        write_plan(plan, store, cluster.port, key, public)
        ctx = Context(args, workdir, plan, cluster, key=key, public=public)

        def load() -> None:
            cluster.execute(f"CREATE DATABASE {DATABASE}")
            argv = [pg_tool("pgbench"), *conn_args(cluster), "-i", "-s", str(args.scale), "-q"]
            run = run_timed([*argv, DATABASE])
            waited = settle(cluster)
            ctx.db_bytes = cluster.execute(f"SELECT pg_database_size('{DATABASE}')")[0][0]
            archived = cluster.execute("SELECT archived_count FROM pg_stat_archiver")[0][0]
            ctx.facts |= {
                "pgbench_init_seconds": round(run.seconds, 1),
                "archive_catch_up_seconds": round(waited, 1),
                "database_bytes": ctx.db_bytes,
                "wal_files_archived_after_load": archived,
            }
            print(
                f"  pgbench -i -s {args.scale}: {run.seconds:.1f}s; the archiver caught up "
                f"{waited:.1f}s later ({archived} WAL files); database {ctx.db_bytes / MB:.0f} MB"
            )

        step(ctx, f"load: pgbench -i -s {args.scale}", load)
        if ctx.db_bytes:
            measurements += step(ctx, "dump", lambda: bench_dumps(ctx)) or []
            if ctx.dump_copy_id:
                measurements += step(ctx, "restore", lambda: bench_restores(ctx)) or []
            measurements += step(ctx, "base backup", lambda: bench_base_backups(ctx)) or []
            results["pitr"] = step(ctx, "point-in-time recovery", lambda: bench_pitr(ctx))
            measurements += step(ctx, "wal-push", lambda: bench_wal_push(ctx)) or []
            if args.rpo_runs > 0:
                label = f"RPO run 1 (this cluster, {args.rpo_seconds:.0f} s of commits)"
                run = step(
                    ctx, label, lambda: rpo_run(cluster, plan, workdir / "rpo1", args.rpo_seconds)
                )
                rpo.append(
                    {"cluster": f"pgbench scale {args.scale}"} | (run or {"error": "failed"})
                )
    for index in range(2, args.rpo_runs + 1):
        label = f"RPO run {index} (fresh scale-1 cluster, {args.rpo_seconds:.0f} s of commits)"
        run = step(ctx, label, lambda i=index: rpo_on_small_cluster(ctx, i, key, public))
        rpo.append(run or {"cluster": "pgbench scale 1 (fresh)", "error": "failed"})

    facts["load_average_end"] = load_average()
    print(
        f"\nload average at the end: {facts['load_average_end']} (start: {facts['load_average']})"
    )
    print(
        f"database {DATABASE}: {ctx.db_bytes / MB:,.0f} MB (pg_database_size); our dump copy "
        f"{ctx.facts.get('dump_plaintext_bytes', 0) / MB:,.0f} MB plain -> "
        f"{ctx.facts.get('dump_stored_bytes', 0) / MB:,.1f} MB stored; pg_dump -Fc file "
        f"{ctx.facts.get('pg_dump_fc_file_bytes', 0) / MB:,.1f} MB; base backup "
        f"{ctx.facts.get('base_plaintext_bytes', 0) / MB:,.0f} MB tar -> "
        f"{ctx.facts.get('base_stored_bytes', 0) / MB:,.1f} MB stored\n"
    )
    print_table(measurements)
    print(
        "\nMB/s = pg_database_size (dump, restore) or our base backup's tar bytes (base backup)"
        " / best seconds;\nratio = that row's MB/s / the 'ref' row's. The database copy row is"
        " the copy's own time from its manifest; every other row is the whole command."
    )
    if results.get("pitr"):
        print()
        print_pitr(results["pitr"])
    if rpo:
        print()
        print_rpo(rpo)
        print(
            "RPO = last row the client saw committed - newest row in the recovered cluster;"
            " 'lag before' = wal-status lag_seconds just before the kill"
        )
        push = next((m.best for m in measurements if m.operation == "wal-push"), None)
        if push:
            print(
                f"bound: archive_timeout {ARCHIVE_TIMEOUT} + one wal-push ({push.seconds:.1f} s)"
                f" + the client's {PROBE_INTERVAL} s between commits"
            )

    misses = evaluate(measurements, results.get("pitr"), rpo)
    print()
    for line in misses:
        print(line)
    for error in ctx.errors:
        print(f"ERROR {error.splitlines()[0]}")
    if args.json:
        results |= {
            "facts": ctx.facts,
            "results": [m.to_json() for m in measurements],
            "rpo": rpo,
            "verdicts": misses,
            "errors": ctx.errors,
        }
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        print(f"figures written to {args.json}")


def evaluate(
    measurements: list[Measurement], pitr_result: dict[str, Any] | None, rpo: list[dict[str, Any]]
) -> list[str]:
    lines = []
    by_label = {m.label: m for m in measurements}
    copy, ref = (
        by_label.get("spark-backup backup: the database copy"),
        by_label.get("pg_dump -Fc > /dev/null"),
    )
    if copy and ref and ref.mbps:
        ratio = copy.mbps / ref.mbps
        whole = by_label["spark-backup backup: whole command"].mbps / ref.mbps
        verdict = "PASS" if ratio >= TARGET_DUMP_RATIO else "MISS"
        lines.append(
            f"{verdict} dump throughput: {ratio:.0%} of pg_dump -Fc (whole command {whole:.0%}; "
            f"target >= {TARGET_DUMP_RATIO:.0%})"
        )
    if pitr_result:
        seconds = pitr_result["pitr_wall_seconds"]
        verdict = "PASS" if seconds < RTO_SECONDS and pitr_result["ok"] else "MISS"
        lines.append(f"{verdict} PITR: {seconds:.0f} s (RTO {RTO_SECONDS // 3600} h)")
    for i, run in enumerate(rpo, 1):
        value = run.get("rpo_seconds")
        if value is None:
            lines.append(f"MISS RPO run {i}: no figure ({run.get('error', 'no rows recovered')})")
            continue
        verdict = "PASS" if value <= TARGET_RPO_SECONDS else "MISS"
        lines.append(f"{verdict} RPO run {i}: {value:.1f} s (target <= {TARGET_RPO_SECONDS:.0f} s)")
    return lines


if __name__ == "__main__":
    sys.exit(main())
