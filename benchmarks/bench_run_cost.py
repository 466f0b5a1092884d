"""What one backfill run costs on the production stack, phase by phase.

Starts the stack of ``spark_backup_tests/test_deploy_postgres.py`` (a PostgreSQL-backed instance
on 127.0.0.1:5432, a code server, ``dagster-webserver`` and ``dagster-daemon`` as separate
processes, the queued coordinator with a global limit and a pool per source), backfills
``--partitions`` daily partitions of ``--sources`` small configuration sources through GraphQL,
and reads every run's event log back from the instance. For each run it reports the time
between its events:

* **queued**: enqueued until the daemon dequeued it and marked it starting (the coordinator's
  limits and interval);
* **worker start**: until RUN_START (the code server starts the run worker, a fresh interpreter,
  which imports Dagster and this package and builds the plan's definitions);
* **to first step**: RUN_START until the first STEP_START (the executor: a step process, or
  none in process);
* **steps**: first STEP_START until the last step's end;
* **finish**: the last step's end until RUN_SUCCESS.

CPU seconds come from /proc, sampled every 0.1 s for every process of the stack's sessions (a
process's last tenth of a second is missed, so they are slight underestimates): the run
workers and every process they start, the code server itself, the daemon and the webserver.
They hold on a loaded machine, where wall times do not.

    .venv/bin/python benchmarks/bench_run_cost.py [--partitions 3] [--sources 3] [--limit 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # spark_backup_tests, from anywhere
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import basic_facts, load_average

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """CPU seconds of every process in the given sessions, by role, sampled in a thread."""

    def __init__(self, sessions: dict[int, str], code_server: int):
        self.sessions = sessions
        self.code_server = code_server
        self.seen: dict[tuple[int, str], tuple[str, float]] = {}
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _role(self, pid: int, session: int) -> str:
        role = self.sessions[session]
        if session != self.code_server or pid == self.code_server:
            return role
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return "runs"
        return "code server" if b"api\x00grpc" in command else "runs"

    def _loop(self) -> None:
        while not self.stopped.wait(0.1):
            for entry in os.listdir("/proc"):
                if not entry.isdigit():
                    continue
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()
                session = int(fields[3])
                if session not in self.sessions:
                    continue
                key = (int(entry), fields[19])  # pid and start time: pids are reused
                cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
                role = self.seen[key][0] if key in self.seen else self._role(int(entry), session)
                self.seen[key] = (role, cpu)

    def totals(self) -> dict[str, float]:
        result: dict[str, float] = {}
        for role, cpu in self.seen.values():
            result[role] = result.get(role, 0.0) + cpu
        return result

    def __enter__(self) -> CpuSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join()


def phases(instance, run_id: str) -> dict[str, float]:
    """Seconds between the run's lifecycle events (see the module's docstring)."""
    from dagster._core.events import DagsterEventType as E

    first: dict[str, float] = {}
    last: dict[str, float] = {}
    for record in instance.all_logs(run_id):
        if record.dagster_event is None:
            continue
        kind = record.dagster_event.event_type_value
        first.setdefault(kind, record.timestamp)
        last[kind] = record.timestamp
    step_ends = [last[k] for k in (E.STEP_SUCCESS.value, E.STEP_FAILURE.value) if k in last]
    return {
        "queued": first[E.PIPELINE_STARTING.value] - first[E.PIPELINE_ENQUEUED.value],
        "worker start": first[E.PIPELINE_START.value] - first[E.PIPELINE_STARTING.value],
        "to first step": first[E.STEP_START.value] - first[E.PIPELINE_START.value],
        "steps": max(step_ends) - first[E.STEP_START.value],
        "finish": first[E.PIPELINE_SUCCESS.value] - max(step_ends),
        "run": first[E.PIPELINE_SUCCESS.value] - first[E.PIPELINE_START.value],
        "starting to success": first[E.PIPELINE_SUCCESS.value] - first[E.PIPELINE_STARTING.value],
    }


def timeline(instance, run_id: str) -> list[str]:
    """Every event of one run, seconds after its first."""
    records = list(instance.all_logs(run_id))
    start = records[0].timestamp
    return [
        f"{r.timestamp - start:7.2f} "
        f"{r.dagster_event.event_type_value if r.dagster_event else 'log'} "
        f"{r.step_key or ''} {(r.user_message or '')[:70]}"
        for r in records
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--limit", type=int, default=2, help="global run limit")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    from dagster import DagsterInstance

    from spark_backup_tests.test_deploy_postgres import DONE_BACKFILL, production_stack

    report: dict = {"machine": basic_facts(), "load average before": load_average()}
    with (
        tempfile.TemporaryDirectory() as scratch,
        production_stack(Path(scratch), args.partitions, args.limit) as stack,
    ):
        stack.stop_drill_sensors()  # the figures are the backfill's runs alone
        sessions = {
            stack.code_server.pid: "code server",
            stack.daemon.pid: "daemon",
            stack.webserver.pid: "webserver",
        }
        sampler = CpuSampler(sessions, stack.code_server.pid).__enter__()
        time.sleep(0.5)
        cpu_before = sampler.totals()
        started = time.monotonic()
        backfills = stack.launch_backfills()
        while not all(status in DONE_BACKFILL for status in stack.backfill_statuses(backfills)):
            time.sleep(1)
        wall = time.monotonic() - started
        runs = stack.backfill_runs(backfills)
        # The last run's worker is reaped when it exits, right after RUN_SUCCESS.
        time.sleep(2)
        sampler.__exit__()
        cpu = {
            role: round((seconds - cpu_before.get(role, 0.0)) / len(runs), 2)
            for role, seconds in sampler.totals().items()
        }
        os.environ["DAGSTER_HOME"] = stack.env["DAGSTER_HOME"]
        os.environ["DAGSTER_PG_PASSWORD"] = ""
        with DagsterInstance.get() as instance:
            per_run = [phases(instance, r["runId"]) for r in runs if r["status"] == "SUCCESS"]
            example = timeline(instance, runs[-1]["runId"])
    report |= {
        "runs": len(runs),
        "succeeded": len(per_run),
        "global limit": args.limit,
        "backfill wall seconds": round(wall, 1),
        "wall seconds per run": round(wall / len(runs), 2),
        "CPU seconds per run, by process": cpu,
        "load average after": load_average(),
        "median seconds": {
            phase: round(statistics.median(p[phase] for p in per_run), 2) for phase in per_run[0]
        },
    }
    print("\n".join(example))
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
