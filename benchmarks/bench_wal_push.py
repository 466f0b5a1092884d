"""WAL archiving as the server drives it: segments per second through ``archive_command`` and
the time from a completed segment to its object in the store, for

* ``sync``: ``spark-backup wal-push`` (one Python process per segment);
* ``parallel``: ``wal-push --parallel 4`` (WAL-G style: each call also pushes ready segments);
* ``pusher``: asynchronous archiving, the hand-off script plus the resident ``wal-pusher``
  (``parallel: 4``);
* ``pgbackrest``: ``pgbackrest archive-push`` with ``archive-async=y``, ``process-max=4``, zstd
  and aes-256-cbc into a repository on local disk (spark-backup: zstd and age, local store).

Each round builds a throwaway cluster per mode, in interleaved order (sync, parallel, pusher,
pgbackrest, then again), and:

* rate: ``--segments`` segments of real WAL (an INSERT of random-ish rows) pile up while
  archive_command is empty (the server marks them ready and waits); then the mode's command
  is set and the time until the server reports the last one archived is measured;
* latency: ``--samples`` times, a few rows and ``pg_switch_wal()`` (the segment is complete
  when it returns); the store's folder is polled every 5 ms for the object.

CPU seconds: the resident pusher's (its process), plus every ``wal-push`` process and
pgBackRest's async worker and its local processes, sampled from /proc every 50 ms while they
run (the last 50 ms of each may be missed), plus the archiver's waited-for children (the
hand-off script, pgBackRest's foreground ``archive-push``). The best round of
each mode is reported, and the load average. Targets (issue 13): the pusher at least
pgBackRest's rate, at most 0.3 s latency. Reports, does not judge; exits 0.

    nice .venv/bin/python benchmarks/bench_wal_push.py                 # ~3 min
    nice .venv/bin/python benchmarks/bench_wal_push.py --rounds 3 --segments 32
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from machine import basic_facts, first_line, load_average

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spark_backup.sources.postgres import pusher
from spark_backup_tests.helpers import free_port
from spark_backup_tests.pg_cluster import (
    SPARK_BACKUP,
    Cluster,
    as_os_user,
    executable_for_postgres,
    postgres_plan,
    shared_dir,
)

SOURCE = "bench_pg"
STANZA = "bench"
MODES = ("sync", "parallel", "pusher", "pgbackrest")
CLOCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int, children: bool = False) -> float:
    """utime+stime of a process (with ``children``: of its waited-for children)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    first = 13 if children else 11  # cutime, cstime / utime, stime (fields 16,17 / 14,15)
    return (int(fields[first]) + int(fields[first + 1])) / CLOCK


class Round:
    """One mode in one throwaway cluster."""

    def __init__(self, mode: str, args: argparse.Namespace):
        self.mode = mode
        self.args = args
        self.root = shared_dir(f"spark-backup-walbench-{mode}-")
        self.cluster = Cluster(self.root / "cluster", free_port())
        self.service_process: subprocess.Popen[bytes] | None = None
        self.workers: dict[int, float] = {}  # async workers' CPU seen, by pid

    # --- set-up ---------------------------------------------------------------------------------

    def start(self) -> None:
        (self.root / "cluster").mkdir()
        self._own(self.root / "cluster")
        self.cluster.init(
            {
                "wal_level": "replica",
                "archive_mode": "on",
                "archive_command": "''",
                "max_wal_size": "4GB",
                "checkpoint_timeout": "30min",
            }
        ).start()
        self.command = getattr(self, f"_prepare_{self.mode}")()

    def _own(self, path: Path) -> None:
        shutil.chown(path, self.root.owner(), self.root.group())

    def _plan(self, **source_extra: Any) -> Path:
        return postgres_plan(self.root, SOURCE, self.cluster.port, **source_extra)

    def _wal_push(self, *extra: str) -> str:
        plan = self._plan()
        return f"{SPARK_BACKUP} --plan {plan} wal-push {' '.join(extra)} --source {SOURCE} %p"

    def _prepare_sync(self) -> str:
        return self._wal_push()

    def _prepare_parallel(self) -> str:
        return self._wal_push("--parallel", "4")

    def _prepare_pusher(self) -> str:
        spool = self.root / "spool"
        spool.mkdir()
        self._own(spool)
        plan = self._plan(wal_pusher={"spool": str(spool), "parallel": 4, "ack_timeout": 60})
        pusher.prepare_spool(spool)
        self.service_process = subprocess.Popen(
            [SPARK_BACKUP, "--plan", str(plan), "wal-pusher", SOURCE],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while not (spool / pusher.STATUS_FILE).exists():
            if time.monotonic() > deadline or self.service_process.poll() is not None:
                raise RuntimeError("wal-pusher did not start")
            time.sleep(0.05)
        return pusher.archive_command(spool, _PusherSettings())

    def _prepare_pgbackrest(self) -> str:
        for name in ("repo", "spool", "lock", "log"):
            (self.root / name).mkdir()
            self._own(self.root / name)
        self.conf = self.root / "pgbackrest.conf"
        self.conf.write_text(
            "[global]\n"
            f"repo1-path={self.root / 'repo'}\n"
            "repo1-cipher-type=aes-256-cbc\n"
            "repo1-cipher-pass=bench-only-passphrase\n"
            "compress-type=zst\n"
            "archive-async=y\n"
            "process-max=4\n"
            f"spool-path={self.root / 'spool'}\n"
            f"lock-path={self.root / 'lock'}\n"
            f"log-path={self.root / 'log'}\n"
            "log-level-console=warn\n"
            "log-level-file=off\n"
            "start-fast=y\n"
            f"[{STANZA}]\n"
            f"pg1-path={self.cluster.data}\n"
            f"pg1-port={self.cluster.port}\n"
            f"pg1-socket-path={self.cluster.root}\n"
        )
        self.conf.chmod(0o644)
        subprocess.run(
            as_os_user(
                ["pgbackrest", f"--config={self.conf}", f"--stanza={STANZA}", "stanza-create"]
            ),
            check=True,
            capture_output=True,
        )
        return f"pgbackrest --config={self.conf} --stanza={STANZA} archive-push %p"

    # --- measurement ----------------------------------------------------------------------------

    def set_command(self, command: str) -> None:
        quoted = command.replace("'", "''")
        self.cluster.execute(f"ALTER SYSTEM SET archive_command = '{quoted}'")
        self.cluster.execute("SELECT pg_reload_conf()")

    def archiver_pid(self) -> int:
        rows = self.cluster.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'archiver'"
        )
        return int(rows[0][0])

    def last_archived(self) -> str:
        return self.cluster.execute("SELECT last_archived_wal FROM pg_stat_archiver")[0][0] or ""

    def backlog(self, segments: int) -> list[str]:
        """``segments`` complete segments of real WAL, ready and waiting."""
        self.cluster.execute("CREATE TABLE IF NOT EXISTS load (id bigint, pad text)")
        first = self.cluster.execute("SELECT pg_walfile_name(pg_current_wal_lsn())")[0][0]
        rows = segments * 16 * 1024 * 1024 // 190
        self.cluster.execute(
            f"INSERT INTO load SELECT g, md5(g::text) || md5((g * 7)::text) "
            f"FROM generate_series(1, {rows}) g"
        )
        last = self.cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
        status = self.cluster.data / "pg_wal" / "archive_status"
        ready = sorted(p.name.removesuffix(".ready") for p in status.glob("*.ready"))
        return [n for n in ready if len(n) == 24 and first <= n <= last]

    def sample_workers(self) -> None:
        """CPU of the mode's own processes, seen by their command line (our temp folder)."""
        marker = str(self.root).encode()
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                cmdline = Path(entry.path, "cmdline").read_bytes()
            except OSError:
                continue
            if marker in cmdline and (b"archive-push:" in cmdline or b"wal-push" in cmdline):
                pid = int(entry.name)
                self.workers[pid] = max(self.workers.get(pid, 0.0), cpu_seconds(pid))

    def rate(self) -> dict[str, Any]:
        names = self.backlog(self.args.segments)
        archiver = self.archiver_pid()
        cpu_before = cpu_seconds(archiver, children=True)
        service_before = cpu_seconds(self.service_process.pid) if self.service_process else 0.0
        started = time.monotonic()
        self.set_command(self.command)
        deadline = started + self.args.timeout
        polls = 0
        while self.last_archived() < names[-1]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.mode}: {names[-1]} not archived; see {self.root}")
            polls += 1
            if polls % 5 == 0:
                self.sample_workers()
            time.sleep(0.01)
        seconds = time.monotonic() - started
        cpu = cpu_seconds(archiver, children=True) - cpu_before + sum(self.workers.values())
        if self.service_process:
            cpu += cpu_seconds(self.service_process.pid) - service_before
        return {"segments": len(names), "seconds": seconds, "cpu": cpu}

    def latency(self) -> list[float]:
        found = []
        for n in range(self.args.samples):
            self.cluster.execute(
                f"INSERT INTO load SELECT g, 'sample {n}' FROM generate_series(1, 500) g"
            )
            segment = self.cluster.execute("SELECT pg_walfile_name(pg_switch_wal())")[0][0]
            completed = time.monotonic()
            folder, prefix = self.object_folder(segment)
            deadline = completed + self.args.timeout
            while not self._holds(folder, prefix):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{self.mode}: {segment} not in the store")
                time.sleep(0.005)
            found.append(time.monotonic() - completed)
            time.sleep(0.2)
        return found

    def object_folder(self, segment: str) -> tuple[Path, str]:
        if self.mode == "pgbackrest":
            archive = self.root / "repo" / "archive" / STANZA / "15-1" / segment[:16]
            return archive, f"{segment}-"
        sysid = self.cluster.execute("SELECT system_identifier::text FROM pg_control_system()")
        return self.root / "store" / SOURCE / "wal" / sysid[0][0], f"{segment}-"

    @staticmethod
    def _holds(folder: Path, prefix: str) -> bool:
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return False
        return any(n.startswith(prefix) and not n.endswith((".tmp", ".sig")) for n in names)

    def stop(self) -> None:
        if self.service_process and self.service_process.poll() is None:
            self.service_process.terminate()
            try:
                self.service_process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.service_process.kill()
        self.cluster.stop()
        shutil.rmtree(self.root, ignore_errors=True)


class _PusherSettings:
    ack_timeout = 60


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--segments", type=int, default=16)
    parser.add_argument("--samples", type=int, default=5, help="latency samples per round")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--modes", default=",".join(MODES))
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    print(f"machine: {basic_facts()}")
    print(f"pgbackrest: {first_line(['pgbackrest', 'version'])}")
    print(f"load average before: {load_average()}")
    rates: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
    latencies: dict[str, list[float]] = {m: [] for m in modes}
    with executable_for_postgres():
        for number in range(args.rounds):
            for mode in modes:
                bench = Round(mode, args)
                try:
                    bench.start()
                    rate = bench.rate()
                    rates[mode].append(rate)
                    latencies[mode] += bench.latency()
                finally:
                    bench.stop()
                print(
                    f"round {number + 1} {mode:<10} {rate['segments']} segments in "
                    f"{rate['seconds']:.2f} s ({rate['segments'] / rate['seconds']:.1f}/s, "
                    f"cpu {rate['cpu']:.1f} s), latency median "
                    f"{statistics.median(latencies[mode][-args.samples :]):.3f} s; "
                    f"load {load_average()}",
                    flush=True,
                )
    print(f"\nbest of {args.rounds} rounds; load {load_average()}")
    best_rate = {}
    for mode in modes:
        best = min(rates[mode], key=lambda r: r["seconds"])
        best_rate[mode] = best["segments"] / best["seconds"]
        median = statistics.median(latencies[mode])
        print(
            f"{mode:<10} {best_rate[mode]:6.1f} segments/s (cpu {best['cpu']:.1f} s for "
            f"{best['segments']}), latency median {median:.3f} s, max {max(latencies[mode]):.3f} s"
        )
    if "pusher" in best_rate and "pgbackrest" in best_rate:
        ratio = best_rate["pusher"] / best_rate["pgbackrest"]
        median = statistics.median(latencies["pusher"])
        print(
            f"pusher / pgbackrest rate: {ratio:.2f} (target >= 1){'' if ratio >= 1 else '  MISS'}"
        )
        print(
            f"pusher latency median {median:.3f} s (target <= 0.3 s)"
            + ("" if median <= 0.3 else "  MISS")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
