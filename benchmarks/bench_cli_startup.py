"""How long ``spark-backup`` takes to start and finish its quick commands.

Each command runs as the installed ``spark-backup`` console script, in a process of its own,
``--repeat`` times; the table shows the fastest and the median wall time, the CPU time (user +
system, from ``wait4``, which other load on the machine inflates less than wall time) and the
peak RSS. Commands:

* ``--help`` and ``--version``: nothing but the command line;
* ``list``: a plan with a local store holding a few copies (the plan is read and validated,
  every manifest parsed, a table printed);
* ``wal-push``: PostgreSQL's ``archive_command`` for one 16 MiB segment of a cluster at rest
  (mostly zeros), a new segment name every run: reading the plan, hashing, compressing,
  encrypting and storing it.

Run with the project's venv::

    .venv/bin/python benchmarks/bench_cli_startup.py
    .venv/bin/python benchmarks/bench_cli_startup.py --repeat 9 --json startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from machine import basic_facts, load_average

TARGET_SECONDS = 0.25
SEGMENT_BYTES = 16 * 1024 * 1024


@dataclass
class StartupResult:
    command: str
    best_s: float
    median_s: float
    cpu_s: float  # the fastest run's user + system time
    peak_rss_mb: float
    runs: int

    @property
    def passed(self) -> bool:
        return self.best_s <= TARGET_SECONDS


def spark_backup_script() -> str:
    """The console script installed beside this interpreter (what users run)."""
    script = Path(sys.executable).with_name("spark-backup")
    if not script.exists():
        raise SystemExit(f"{script} not found: run with the project's venv (pip install -e .)")
    return str(script)


def timed(args: list[str], cwd: Path) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one run of ``args``, which must succeed."""
    started = time.perf_counter()
    process = subprocess.Popen(
        args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_environment()
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.stderr is not None
    errors = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({process.returncode}): {errors.strip()}")
    return wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def _environment() -> dict[str, str]:
    # No terminal, no colour: what archive_command and scripts see.
    return {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}


def prepare(workdir: Path, copies: int) -> Path:
    """A plan with a local store, a config_archive source with ``copies`` copies, and a
    PostgreSQL source archiving WAL into the same store (no server is contacted by wal-push)."""
    from spark_backup.engine.crypto import generate_identity

    public = generate_identity(workdir / "age.key")
    estate = workdir / "estate" / "etc"
    estate.mkdir(parents=True)
    for index in range(20):
        (estate / f"service-{index}.conf").write_text(f"port = {8000 + index}\n" * 40)
    plan = {
        "encryption": {"recipients": [public], "identity_file": "age.key"},
        "stores": [{"name": "local", "kind": "local", "path": "store"}],
        "sources": [
            {
                "name": "etc",
                "kind": "config_archive",
                "cadence": "daily",
                "owner": "team:platform",
                "paths": [str(estate)],
            },
            {
                "name": "pg_main",
                "kind": "postgres",
                "cadence": "daily",
                "owner": "team:dba",
                "host": "127.0.0.1",
                "port": 5432,
                "user": "postgres",
            },
        ],
    }
    path = workdir / "spark_backup.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    (workdir / "store").mkdir()
    for _ in range(copies):
        done = subprocess.run(
            [spark_backup_script(), "--plan", str(path), "backup", "etc"],
            capture_output=True,
            text=True,
            env=_environment(),
        )
        if done.returncode != 0:
            raise SystemExit(f"backup for the listing failed: {done.stderr.strip()}")
    return path


def segment(workdir: Path, number: int) -> Path:
    """A 16 MiB WAL segment of timeline 1 (zeros with a short header, as an idle cluster
    writes them), named by ``number``."""
    wal = workdir / "pg_wal"
    wal.mkdir(exist_ok=True)
    path = wal / f"00000001{number >> 8:08X}{number & 0xFF:08X}"
    with path.open("wb") as handle:
        handle.write(number.to_bytes(8, "big") * 512)
        handle.truncate(SEGMENT_BYTES)
    return path


def measure(repeat: int, copies: int = 5, workdir: Path | None = None) -> list[StartupResult]:
    """Time every command ``repeat`` times in a fresh folder (removed afterwards)."""
    base = Path(tempfile.mkdtemp(prefix="spark-bench-cli-", dir=workdir))
    try:
        plan = prepare(base, copies)
        script = spark_backup_script()
        commands: dict[str, object] = {
            "--help": lambda n: [script, "--help"],
            "--version": lambda n: [script, "--version"],
            "list": lambda n: [script, "--plan", str(plan), "list"],
            "wal-push (16 MiB segment)": lambda n: [
                script,
                "--plan",
                str(plan),
                "wal-push",
                str(segment(base, n + 1)),
            ],
        }
        results = []
        for label, make_args in commands.items():
            runs = [timed(make_args(n), base) for n in range(repeat)]  # type: ignore[operator]
            walls = [r[0] for r in runs]
            fastest = min(runs)
            results.append(
                StartupResult(
                    label,
                    round(fastest[0], 3),
                    round(statistics.median(walls), 3),
                    round(fastest[1], 3),
                    round(max(r[2] for r in runs), 1),
                    repeat,
                )
            )
        return results
    finally:
        shutil.rmtree(base, ignore_errors=True)


def table(results: list[StartupResult]) -> str:
    header = f"{'command':<28}{'best s':>8}{'median s':>10}{'CPU s':>8}{'peak RSS MB':>13}  result"
    lines = [header, "-" * len(header)]
    for r in results:
        verdict = "PASS" if r.passed else f"MISS (target <= {TARGET_SECONDS} s)"
        lines.append(
            f"{r.command:<28}{r.best_s:>8.3f}{r.median_s:>10.3f}{r.cpu_s:>8.3f}"
            f"{r.peak_rss_mb:>13.1f}  {verdict}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs per command (default 7)")
    parser.add_argument("--copies", type=int, default=5, help="copies in the listed store")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    args = parser.parse_args()
    print(f"load average {load_average()}; {basic_facts()}")
    results = measure(args.repeat, args.copies)
    print(table(results))
    print(f"load average {load_average()}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"machine": basic_facts(), "results": [asdict(r) for r in results]}, indent=2
            )
        )


if __name__ == "__main__":
    main()
