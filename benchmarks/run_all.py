"""The whole benchmark set in one run: spark-backup beside ``tar | zstd | age`` and restic.

On generated data of the shape issue 12 measured (many small configuration files, one large
index, one large model file; one ``config_archive`` source over the three folders):

* **backup**, **restore** and **full read** (``verify --deep``; ``restic check --read-data``;
  ``age -d | zstd -d > /dev/null`` for the pipeline), wall time, CPU time and peak RSS of each
  command, ratios against the pipeline (backup, restore) and restic (full read);
* **deep verify of many small copies** (one age worker for the whole run);
* **CLI start-up** (``bench_cli_startup.py``);
* **the daily PostgreSQL dump** beside ``pg_dump -Fc -Z0 | zstd -3 -T2 | age`` on a pgbench
  database in a throwaway cluster (needs root and the PostgreSQL 15 server binaries; skipped
  otherwise).

Every command runs as its own process, timed from start to exit (``bench_postgres.run_timed``:
CPU time from ``wait4``); peak RSS is the command's largest process, as GNU time reports it. Tools that are missing are skipped (``install_tools.sh``
installs them). The script reports, it does not judge: it always exits 0.

    .venv/bin/python benchmarks/run_all.py --quick        # ~100 MB, one run each: ~2 minutes
    .venv/bin/python benchmarks/run_all.py                # ~920 MB, best of 3, pgbench scale 50
    .venv/bin/python benchmarks/run_all.py --json all.json --workdir /dev/shm
    .venv/bin/python benchmarks/run_all.py --postgres-only --repeat 5 --workdir /dev/shm
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_cli_startup
from bench_config_archive import generate_file, generate_tree, make_key, tree_size
from bench_postgres import Run, conn_args, copy_seconds, pg_tool, run_timed, spark
from machine import basic_facts, first_line, load_average, peak_rss_mb, with_peak_rss

MB = 1_000_000
TARGET_RATIO = 0.90  # backup and restore: this share of the pipeline's throughput
TARGET_RSS_MB = 256.0
RESTIC_PASSWORD = "spark-bench"  # a throwaway repository in the work folder


@dataclass(frozen=True)
class Sizes:
    tree_files: int
    index_mb: int
    model_mb: int
    tiny_copies: int
    pgbench_scale: int
    repeat: int
    # The dump's rounds are short and spread widely on a 2-core machine (84% to 158% in one
    # run): more of them, each pairing our copy with the pipeline in the same minute.
    dump_repeat: int


QUICK = Sizes(
    tree_files=2_000,
    index_mb=24,
    model_mb=48,
    tiny_copies=50,
    pgbench_scale=5,
    repeat=1,
    dump_repeat=1,
)
FULL = Sizes(
    tree_files=20_000,
    index_mb=256,
    model_mb=505,
    tiny_copies=500,
    pgbench_scale=50,
    repeat=3,
    dump_repeat=5,
)


@dataclass
class Row:
    """One command, run ``repeat`` times; the fastest run is reported."""

    section: str
    operation: str
    tool: str
    input_bytes: int
    runs: list[Run] = field(default_factory=list)
    reference: bool = False
    # Against the reference run of the same round (the dump pairs its rounds): a figure that
    # one lucky or unlucky run cannot move the way it moves best against best.
    round_ratios: list[float] = field(default_factory=list)

    @property
    def best(self) -> Run:
        return min(self.runs, key=lambda r: r.seconds)

    @property
    def mbps(self) -> float:
        return self.input_bytes / MB / self.best.seconds

    @property
    def rss_mb(self) -> float:
        return max(r.rss_mb or 0.0 for r in self.runs)


# --- files: backup, restore, full read -----------------------------------------------------------


def generate(data: Path, sizes: Sizes, seed: int = 12) -> tuple[list[Path], int]:
    """The three folders (config tree, index, model) and their total bytes."""
    tree, index, model = data / "etc", data / "index", data / "model"
    generate_tree(tree, sizes.tree_files, seed)
    index.mkdir(parents=True)
    with (index / "vectors.faiss").open("wb") as handle:  # float32 vectors: barely compress
        for _ in range(sizes.index_mb):
            handle.write(os.urandom(MB))
    generate_file(model / "adapter_model.safetensors", sizes.model_mb * MB, seed + 1)
    return [tree, index, model], sum(tree_size(p)[1] for p in (tree, index, model))


def config_plan(workdir: Path, name: str, folders: list[Path], public: str, key: Path) -> Path:
    """A plan with one ``config_archive`` source over ``folders`` and a local store."""
    plan = {
        "defaults": {"compression": {"level": 3, "threads": 2}},
        "encryption": {"recipients": [public], "identity_file": str(key)},
        "stores": [{"name": "local", "kind": "local", "path": str(workdir / f"store-{name}")}],
        "sources": [
            {
                "name": name,
                "kind": "config_archive",
                "cadence": "daily",
                "owner": "team:bench",
                "paths": [str(p) for p in folders],
            }
        ],
    }
    path = workdir / f"plan-{name}.yaml"
    path.write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")  # JSON is YAML
    return path


def shell(command: str) -> list[str]:
    return ["bash", "-o", "pipefail", "-c", command]


def _env(values: dict[str, str]) -> list[str]:
    return [f"{k}={v}" for k, v in values.items()]


def timed(args: list[str], *, capture: bool = False) -> Run:
    """One run: wall and CPU time from ``run_timed``, peak RSS from GNU time."""
    os.sync()  # untimed: earlier runs' write-back is not billed to this one
    with tempfile.NamedTemporaryFile(prefix="spark-bench-rss-", delete=False) as handle:
        report = Path(handle.name)
    run = run_timed(with_peak_rss(args, report), capture=capture)
    run.rss_mb = peak_rss_mb(report)
    return run


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def bench_files(workdir: Path, sizes: Sizes, key: Path, public: str) -> list[Row]:
    folders, total = generate(workdir / "data", sizes)
    plan = config_plan(workdir, "bench_files", folders, public, key)
    q = shlex.quote
    parent = folders[0].parent
    names = " ".join(q(p.name) for p in folders)
    shell_out = workdir / "pipeline.tar.zst.age"
    restic_repo = workdir / "restic"
    restic_env = {
        "RESTIC_PASSWORD": RESTIC_PASSWORD,
        "RESTIC_REPOSITORY": str(restic_repo),
        "RESTIC_CACHE_DIR": str(workdir / "restic-cache"),
    }
    has_restic = shutil.which("restic") is not None
    rows = {
        (op, tool): Row("files", op, tool, total, reference=ref)
        for op, tool, ref in [
            ("backup", "spark-backup", False),
            ("backup", "tar | zstd -3 -T2 | age", True),
            ("backup", "restic", False),
            ("restore", "spark-backup", False),
            ("restore", "age -d | zstd -d | tar -x", True),
            ("restore", "restic", False),
            ("full read", "spark-backup verify --deep", False),
            ("full read", "spark-backup: the copy's read", False),
            ("full read", "age -d | zstd -d > /dev/null", False),
            ("full read", "restic check --read-data", True),
        ]
        if has_restic or tool.split()[0] != "restic"
    }
    for i in range(sizes.repeat):
        # Untimed between runs: empty store, repository and targets.
        shutil.rmtree(workdir / "store-bench_files", ignore_errors=True)
        shell_out.unlink(missing_ok=True)
        shutil.rmtree(restic_repo, ignore_errors=True)
        run = timed(spark(plan, "--no-progress", "backup", "bench_files", "--json"), capture=True)
        rows["backup", "spark-backup"].runs.append(run)
        copy_id = json.loads(run.stdout)[0]["id"]
        rows["backup", "tar | zstd -3 -T2 | age"].runs.append(
            timed(
                shell(
                    f"tar -c -C {q(str(parent))} {names} | zstd -3 -T2 -q"
                    f" | age -r {q(public)} > {q(str(shell_out))}"
                )
            )
        )
        if has_restic:
            subprocess.run(["restic", "init", "-q"], env={**os.environ, **restic_env}, check=True)
            rows["backup", "restic"].runs.append(
                timed(["env", *_env(restic_env), "restic", "backup", "-q", *map(str, folders)])
            )

        target = fresh(workdir / "restore-ours")
        rows["restore", "spark-backup"].runs.append(
            timed(spark(plan, "--no-progress", "restore", copy_id, "--to", str(target)))
        )
        _check_restored(target, total, "spark-backup")
        target = fresh(workdir / "restore-pipeline")
        rows["restore", "age -d | zstd -d | tar -x"].runs.append(
            timed(
                shell(
                    f"age -d -i {q(str(key))} {q(str(shell_out))} | zstd -d -q"
                    f" | tar -x -C {q(str(target))}"
                )
            )
        )
        _check_restored(target, total, "the pipeline")
        if has_restic:
            target = fresh(workdir / "restore-restic")
            rows["restore", "restic"].runs.append(
                timed(
                    [
                        "env",
                        *_env(restic_env),
                        "restic",
                        "restore",
                        "-q",
                        "latest",
                        "--target",
                        str(target),
                    ]
                )
            )
            _check_restored(target, total, "restic")
        for leftover in ("restore-ours", "restore-pipeline", "restore-restic"):
            shutil.rmtree(workdir / leftover, ignore_errors=True)

        run = timed(
            spark(plan, "--no-progress", "verify", "bench_files", "--deep", "--json"), capture=True
        )
        rows["full read", "spark-backup verify --deep"].runs.append(run)
        # The copy's own read, from the command's report: without interpreter start and plan.
        [outcome] = json.loads(run.stdout)
        rows["full read", "spark-backup: the copy's read"].runs.append(Run(outcome["seconds"]))
        rows["full read", "age -d | zstd -d > /dev/null"].runs.append(
            timed(shell(f"age -d -i {q(str(key))} {q(str(shell_out))} | zstd -d -q > /dev/null"))
        )
        if has_restic:
            rows["full read", "restic check --read-data"].runs.append(
                timed(["env", *_env(restic_env), "restic", "check", "-q", "--read-data"])
            )
        print(
            f"  [files {i + 1}/{sizes.repeat}] "
            + ", ".join(
                f"{op} {tool.split()[0]} {row.runs[-1].seconds:.1f}s"
                for (op, tool), row in rows.items()
            ),
            flush=True,
        )
    shutil.rmtree(workdir / "data", ignore_errors=True)
    shutil.rmtree(workdir / "store-bench_files", ignore_errors=True)
    shutil.rmtree(restic_repo, ignore_errors=True)
    shell_out.unlink(missing_ok=True)
    return list(rows.values())


def _check_restored(target: Path, expected: int, who: str) -> None:
    found = tree_size(target)[1]
    if found != expected:
        raise RuntimeError(f"{who} restored {found} bytes, expected {expected}")


def bench_tiny_copies(workdir: Path, sizes: Sizes, key: Path, public: str) -> list[Row]:
    """``verify --deep`` over many small copies (a few files each): what one worker per copy
    used to cost about 80 ms each."""
    from spark_backup.service import BackupService  # the parent makes the copies, untimed

    tiny = fresh(workdir / "tiny")
    for index in range(5):
        (tiny / f"service-{index}.conf").write_text(f"port = {8000 + index}\n" * 20)
    plan = config_plan(workdir, "bench_tiny", [tiny], public, key)
    service = BackupService.from_path(plan)
    made = [m for _ in range(sizes.tiny_copies) for m in service.backup("bench_tiny")]
    total = sum(m.plaintext.bytes for m in made)
    row = Row("tiny", f"deep verify, {len(made)} small copies", "spark-backup", total)
    for _ in range(sizes.repeat):
        row.runs.append(timed(spark(plan, "--no-progress", "verify", "bench_tiny", "--deep")))
    return [row]


# --- PostgreSQL: the daily dump ------------------------------------------------------------------


def bench_dump(workdir: Path, sizes: Sizes, key: Path, public: str) -> list[Row]:
    from bench_postgres import DATABASE, SOURCE, settle, write_plan

    from spark_backup_tests.pg_cluster import BIN_DIR, throwaway_cluster

    if os.geteuid() != 0 or not (BIN_DIR / "pg_ctl").exists():
        print(f"  skipped: needs root and {BIN_DIR}/pg_ctl", flush=True)
        return []
    q = shlex.quote
    plan = workdir / "plan-pg.yaml"
    out = workdir / "dump.pgdump.zst.age"
    with throwaway_cluster(prefix="spark-bench-all-pg-") as cluster:
        write_plan(plan, workdir / "store-pg", cluster.port, key, public)
        cluster.execute(f"CREATE DATABASE {DATABASE}")
        init = run_timed(
            [
                pg_tool("pgbench"),
                *conn_args(cluster),
                "-i",
                "-s",
                str(sizes.pgbench_scale),
                "-q",
                DATABASE,
            ]
        )
        size = cluster.execute(f"SELECT pg_database_size('{DATABASE}')")[0][0]
        print(
            f"  pgbench -i -s {sizes.pgbench_scale}: {init.seconds:.1f}s, {size / MB:.0f} MB",
            flush=True,
        )
        copy = Row("pg", "daily dump", "spark-backup: the database copy", size)
        whole = Row("pg", "daily dump", "spark-backup backup (whole command)", size)
        pipeline = Row(
            "pg", "daily dump", "pg_dump -Fc -Z0 | zstd -3 -T2 | age", size, reference=True
        )
        dump = " ".join(
            q(a) for a in [pg_tool("pg_dump"), *conn_args(cluster), "-d", DATABASE, "-Fc", "-Z0"]
        )
        for i in range(sizes.dump_repeat):
            server_cpu = {}  # the cluster's CPU seconds during each side's run
            for side in ("ours", "pipeline") if i % 2 == 0 else ("pipeline", "ours"):
                settle(cluster)
                before = cluster.cpu_seconds()
                if side == "ours":
                    run = timed(
                        spark(plan, "--no-progress", "backup", SOURCE, "--json"), capture=True
                    )
                    manifest = next(
                        m for m in json.loads(run.stdout) if m["part"] == f"database:{DATABASE}"
                    )
                    copy.runs.append(Run(copy_seconds(manifest)))
                    whole.runs.append(run)
                else:
                    pipeline.runs.append(
                        timed(
                            shell(f"{dump} | zstd -3 -T2 -q | age -r {q(public)} > {q(str(out))}")
                        )
                    )
                time.sleep(0.3)  # untimed: the run's backends exit and are reaped
                server_cpu[side] = cluster.cpu_seconds() - before
            out.unlink(missing_ok=True)
            ours, ref = whole.runs[-1], pipeline.runs[-1]
            copy.round_ratios.append(ref.seconds / copy.runs[-1].seconds)
            whole.round_ratios.append(ref.seconds / ours.seconds)
            print(
                f"  [dump {i + 1}/{sizes.dump_repeat}] ours: copy {copy.runs[-1].seconds:.2f}s, "
                f"whole {ours.seconds:.2f}s (CPU {ours.cpu_seconds:.2f}s, server "
                f"{server_cpu['ours']:.2f}s) | pipeline {ref.seconds:.2f}s (CPU "
                f"{ref.cpu_seconds:.2f}s, server {server_cpu['pipeline']:.2f}s) | copy at "
                f"{copy.round_ratios[-1]:.0%} of the pipeline, whole at "
                f"{whole.round_ratios[-1]:.0%} | load "
                f"{load_average()}",
                flush=True,
            )
        shutil.rmtree(workdir / "store-pg", ignore_errors=True)
    return [copy, whole, pipeline]


# --- reporting -----------------------------------------------------------------------------------


def ratio_rows(rows: list[Row]) -> list[tuple[Row, float | None]]:
    """Each row with its throughput against its operation's reference row."""
    refs = {(r.section, r.operation): r for r in rows if r.reference}
    out = []
    for row in rows:
        ref = refs.get((row.section, row.operation))
        out.append((row, None if ref is None or ref is row else row.mbps / ref.mbps))
    return out


def table(rows: list[Row]) -> str:
    header = (
        f"{'operation':<34}{'tool':<38}{'best s':>8}{'MB/s':>8}{'ratio':>8}{'CPU s':>7}"
        f"{'RSS MB':>8}{'runs':>5}"
    )
    lines = [header, "-" * len(header)]
    for row, ratio in ratio_rows(rows):
        shown = "ref" if row.reference else ("-" if ratio is None else f"{ratio:.0%}")
        cpu = row.best.cpu_seconds
        lines.append(
            f"{row.operation:<34}{row.tool:<38}{row.best.seconds:>8.2f}{row.mbps:>8.1f}"
            f"{shown:>8}{'-' if cpu is None else f'{cpu:.1f}':>7}"
            f"{'-' if not row.rss_mb else f'{row.rss_mb:.0f}':>8}{len(row.runs):>5}"
        )
    return "\n".join(lines)


def verdicts(rows: list[Row]) -> list[str]:
    """Issue 12's targets, row by row."""
    found = []
    for row, ratio in ratio_rows(rows):
        if not row.tool.startswith("spark-backup") or ratio is None:
            continue
        if row.tool.endswith(("(whole command)", "verify --deep")):
            continue  # judged on the copy's own time; the whole command is shown beside it
        target = 1.0 if row.operation == "full read" else TARGET_RATIO
        verdict = "PASS" if ratio >= target else "MISS"
        found.append(
            f"{verdict} {row.operation}: {ratio:.0%} of the reference (target >= {target:.0%})"
        )
        if len(row.round_ratios) > 1:
            median = statistics.median(row.round_ratios)
            verdict = "PASS" if median >= target else "MISS"
            rounds = "/".join(f"{r:.0%}" for r in row.round_ratios)
            found.append(
                f"{verdict} {row.operation}, median of {len(row.round_ratios)} paired rounds: "
                f"{median:.0%} (rounds {rounds}; target >= {target:.0%})"
            )
    for row in rows:
        if row.tool.startswith("spark-backup") and row.rss_mb:
            verdict = "PASS" if row.rss_mb <= TARGET_RSS_MB else "MISS"
            found.append(
                f"{verdict} peak RSS, {row.operation}: {row.rss_mb:.0f} MB (target <= {TARGET_RSS_MB:.0f})"
            )
    return found


def tool_versions() -> dict[str, str]:
    return {
        tool: first_line(command)
        for tool, command in {
            "tar": ["tar", "--version"],
            "zstd": ["zstd", "--version"],
            "age": ["age", "--version"],
            "restic": ["restic", "version"],
        }.items()
    }


def step(name: str, action: Callable[[], Any], errors: list[str]) -> Any:
    print(f"\n{name}", flush=True)
    started = time.monotonic()
    try:
        result = action()
    except Exception as exc:
        errors.append(f"{name}: {exc}")
        print(f"  FAILED: {exc}", flush=True)
        return None
    print(f"  ({time.monotonic() - started:.0f}s)", flush=True)
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~100 MB, one run each (~2 min)")
    parser.add_argument(
        "--repeat",
        type=int,
        help="runs per command (default 3, the dump 5; --quick 1)",
    )
    parser.add_argument("--workdir", type=Path, help="where the work folder is made")
    parser.add_argument("--skip-postgres", action="store_true", help="leave out the dump")
    parser.add_argument("--postgres-only", action="store_true", help="only the daily dump")
    parser.add_argument("--json", type=Path, help="write every figure as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.repeat:
        sizes = Sizes(**{**vars(sizes), "repeat": args.repeat, "dump_repeat": args.repeat})
    missing = [t for t in ("tar", "zstd", "age", "age-keygen") if not shutil.which(t)]
    if missing:
        print(f"error: not found: {', '.join(missing)} (benchmarks/install_tools.sh)")
        return 0
    facts = {**basic_facts(), "load_average": load_average(), **tool_versions()}
    print("machine: " + "; ".join(f"{k} {v}" for k, v in facts.items()))
    print(f"sizes: {sizes}")
    workdir = Path(tempfile.mkdtemp(prefix="spark-bench-all-", dir=args.workdir))
    errors: list[str] = []
    rows: list[Row] = []
    startup: list[bench_cli_startup.StartupResult] = []
    try:
        key, public = make_key(workdir)
        if not args.postgres_only:
            rows += (
                step(
                    "files: backup, restore, full read",
                    lambda: bench_files(workdir, sizes, key, public),
                    errors,
                )
                or []
            )
            rows += (
                step(
                    "deep verify of many small copies",
                    lambda: bench_tiny_copies(workdir, sizes, key, public),
                    errors,
                )
                or []
            )
            startup = (
                step(
                    "CLI start-up",
                    lambda: bench_cli_startup.measure(max(5, sizes.repeat * 3), workdir=workdir),
                    errors,
                )
                or []
            )
        if not args.skip_postgres:
            rows += (
                step(
                    "PostgreSQL daily dump", lambda: bench_dump(workdir, sizes, key, public), errors
                )
                or []
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    facts["load_average_end"] = load_average()
    print(
        f"\nload average: {facts['load_average']} at the start, {facts['load_average_end']} at the end\n"
    )
    print(table(rows))
    if startup:
        print()
        print(bench_cli_startup.table(startup))
    print()
    for line in verdicts(rows):
        print(line)
    for error in errors:
        print(f"ERROR {error.splitlines()[0]}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": facts,
                    "sizes": vars(sizes),
                    "rows": [
                        {
                            "section": r.section,
                            "operation": r.operation,
                            "tool": r.tool,
                            "input_bytes": r.input_bytes,
                            "best_seconds": round(r.best.seconds, 3),
                            "mb_per_s": round(r.mbps, 1),
                            "ratio": None if ratio is None else round(ratio, 3),
                            "cpu_seconds": r.best.cpu_seconds,
                            "peak_rss_mb": r.rss_mb,
                            "runs": [round(x.seconds, 3) for x in r.runs],
                            "round_ratios": [round(x, 3) for x in r.round_ratios],
                        }
                        for r, ratio in ratio_rows(rows)
                    ],
                    "startup": [vars(s) for s in startup],
                    "verdicts": verdicts(rows),
                    "errors": errors,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
