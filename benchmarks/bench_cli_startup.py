"""How long ``spark-backup`` takes to start and finish its quick commands.

Each command runs as the installed ``spark-backup`` console script, in a process of its own,
once to warm up (bytecode cache, page cache) and then ``--repeat`` times; the table shows the fastest and the median wall time, the CPU time (user +
system, from ``wait4``, which other load on the machine inflates less than wall time) and the
peak RSS. Commands:

* ``--help`` and ``--version``: nothing but the command line;
* ``list``: a plan with a local store holding a few copies (the plan is read and validated,
  every manifest parsed, a table printed);
* ``wal-push``: PostgreSQL's ``archive_command`` for one 16 MiB segment of a cluster at rest
  (mostly zeros), a new segment name every run: reading the plan, hashing, compressing,
  encrypting and storing it;
* ``backup``, ``verify``, ``verify --deep`` and ``restore --to`` of the small source (20 files,
  30 KiB): the fixed cost of the commands that move data, which every copy pays (no target of
  their own; issue 12 compares the whole commands with ``tar | zstd | age``).

With ``--baseline DIR`` (a folder holding another version's ``spark_backup`` package, such as
``git archive REV spark_backup | tar -x -C DIR``), each command also runs with that version
first on ``PYTHONPATH``, interleaved run by run with this one, so that both see the same load.

Run with the project's venv::

    .venv/bin/python benchmarks/bench_cli_startup.py
    .venv/bin/python benchmarks/bench_cli_startup.py --repeat 9 --json startup.json
    .venv/bin/python benchmarks/bench_cli_startup.py --repeat 9 --baseline /tmp/before
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
from machine import basic_facts, load_average, peak_rss_mb, with_peak_rss

TARGET_SECONDS = 0.25
SEGMENT_BYTES = 16 * 1024 * 1024


@dataclass
class StartupResult:
    command: str
    best_s: float
    median_s: float
    cpu_s: float  # the least user + system time of the runs
    peak_rss_mb: float
    runs: int
    reference: bool = False  # libraries alone, not a spark-backup command: no target
    fixed_cost: bool = False  # a command that moves data, on a tiny source: no target

    @property
    def passed(self) -> bool:
        return self.best_s <= TARGET_SECONDS


def newest_copy(plan: Path) -> str:
    """The id of the newest copy ``list`` shows (the copies ``prepare`` made)."""
    done = subprocess.run(
        [spark_backup_script(), "--plan", str(plan), "list", "--json"],
        capture_output=True,
        text=True,
        env=_environment(),
        check=True,
    )
    return max(json.loads(done.stdout), key=lambda c: c["finished_at"])["id"]


def spark_backup_script() -> str:
    """The console script installed beside this interpreter (what users run)."""
    script = Path(sys.executable).with_name("spark-backup")
    if not script.exists():
        raise SystemExit(f"{script} not found: run with the project's venv (pip install -e .)")
    return str(script)


def timed(args: list[str], cwd: Path, baseline: Path | None = None) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and peak RSS (MB) of one run of ``args``, which must succeed.
    (GNU time adds about a millisecond.)"""
    report = cwd / "rss.txt"
    started = time.perf_counter()
    process = subprocess.Popen(
        with_peak_rss(args, report),
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=_environment(baseline),
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    assert process.stderr is not None
    errors = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed ({process.returncode}): {errors.strip()}")
    return wall, usage.ru_utime + usage.ru_stime, peak_rss_mb(report) or usage.ru_maxrss / 1024


def _environment(baseline: Path | None = None) -> dict[str, str]:
    # No terminal, no colour: what archive_command and scripts see. Bytecode is cached as an
    # installed package has it (pip compiles at install time); with PYTHONDONTWRITEBYTECODE set,
    # every run would compile spark-backup's modules again (about 0.1 CPU-seconds).
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if baseline is not None:  # ahead of the editable install's finder
        env["PYTHONPATH"] = str(baseline)
    return env


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


def measure(
    repeat: int, copies: int = 5, workdir: Path | None = None, baseline: Path | None = None
) -> list[StartupResult]:
    """Time every command ``repeat`` times in a fresh folder (removed afterwards); with
    ``baseline``, that version's runs alternate with this one's."""
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
        copy_id = newest_copy(plan)
        restored = base / "restored"
        fixed_costs: dict[str, object] = {
            "backup (20 files, 30 KiB)": lambda n: [script, "--plan", str(plan), "backup", "etc"],
            "verify (one copy)": lambda n: [script, "--plan", str(plan), "verify", copy_id],
            "verify --deep (one copy)": lambda n: [
                *(script, "--plan", str(plan), "verify", "--deep", copy_id)
            ],
            "restore --to (one copy)": lambda n: [
                *(script, "--plan", str(plan), "restore", copy_id, "--to"),
                str(restored / str(n)),
            ],
        }
        # What any command that reads a plan pays before spark-backup's own code: the
        # interpreter, click, PyYAML and pydantic with one model built (not a spark-backup
        # command; it shows how much of list and wal-push is libraries).
        floor = "import click, yaml, pydantic\nclass M(pydantic.BaseModel):\n    x: int = 1\nM()"
        references: dict[str, object] = {
            "interpreter alone (python -c pass)": lambda n: [sys.executable, "-c", "pass"],
            "click, PyYAML, pydantic (1 model)": lambda n: [sys.executable, "-c", floor],
        }
        versions: dict[str, Path | None] = {"": None}
        if baseline is not None:
            versions[" [baseline]"] = baseline
        results = []
        for label, make_args in {**commands, **fixed_costs, **references}.items():
            runs: dict[str, list[tuple[float, float, float]]] = {}
            numbers = iter(range(repeat * len(versions) + len(versions)))
            measured_versions = {"": None} if label in references else versions
            for version in measured_versions.values():  # warm-up: bytecode, page cache
                timed(make_args(next(numbers)), base, version)  # type: ignore[operator]
            for _ in range(repeat):
                for suffix, version in measured_versions.items():
                    args = make_args(next(numbers))  # type: ignore[operator]
                    runs.setdefault(suffix, []).append(timed(args, base, version))
            for suffix, measured in runs.items():
                fastest = min(measured)
                results.append(
                    StartupResult(
                        label + suffix,
                        round(fastest[0], 3),
                        round(statistics.median(r[0] for r in measured), 3),
                        round(min(r[1] for r in measured), 3),
                        round(max(r[2] for r in measured), 1),
                        repeat,
                        reference=label in references,
                        fixed_cost=label in fixed_costs,
                    )
                )
        return results
    finally:
        shutil.rmtree(base, ignore_errors=True)


def table(results: list[StartupResult]) -> str:
    header = f"{'command':<38}{'best s':>8}{'median s':>10}{'CPU s':>8}{'peak RSS MB':>13}  result"
    lines = [header, "-" * len(header)]
    for r in results:
        verdict = (
            "(reference)"
            if r.reference
            else "(fixed cost)"
            if r.fixed_cost
            else "PASS"
            if r.passed
            else f"MISS (target <= {TARGET_SECONDS} s)"
        )
        lines.append(
            f"{r.command:<38}{r.best_s:>8.3f}{r.median_s:>10.3f}{r.cpu_s:>8.3f}"
            f"{r.peak_rss_mb:>13.1f}  {verdict}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="runs per command (default 7)")
    parser.add_argument("--copies", type=int, default=5, help="copies in the listed store")
    parser.add_argument("--json", type=Path, help="write the figures as JSON")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a folder with another version's spark_backup package, run interleaved",
    )
    args = parser.parse_args()
    if args.baseline and not (args.baseline / "spark_backup" / "__init__.py").exists():
        parser.error(f"{args.baseline}: no spark_backup package in it")
    print(f"load average {load_average()}; {basic_facts()}")
    results = measure(args.repeat, args.copies, baseline=args.baseline)
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
