"""Backup alone, interleaved: spark-backup beside ``tar -c | zstd -3 -T2 | age -r``, and
optionally beside another version of spark-backup, on the data ``run_all.py`` generates (many
small configuration files, one index, one model file; one ``config_archive`` source).

Rounds alternate the commands (this version, the baseline, the pipeline, then again, each
round starting with the next one), so a busy machine slows them alike; each command's wall
time, CPU time (user + system of it and its children) and peak RSS are printed per round, then
the best of each and the ratios per round.
It reports, it does not judge: it always exits 0.

    .venv/bin/python benchmarks/bench_backup.py --workdir /dev/shm --repeat 4
    git archive main spark_backup | tar -x -C /tmp/before
    .venv/bin/python benchmarks/bench_backup.py --baseline /tmp/before --small
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import tempfile
from pathlib import Path

from bench_config_archive import make_key
from bench_postgres import Run, run_timed
from machine import load_average
from run_all import FULL, QUICK, config_plan, generate, shell

MB = 1_000_000


def _spark(plan: Path, baseline: Path | None) -> list[str]:
    # PYTHONPATH goes ahead of the editable install (the commands run outside the worktree).
    version = [f"PYTHONPATH={baseline}"] if baseline else ["-u", "PYTHONPATH"]
    command = [sys.executable, "-m", "spark_backup", "--plan", str(plan), "--no-progress"]
    return ["env", *version, *command, "backup", "bench_files"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--small", action="store_true", help="run_all's --quick data (~90 MB)")
    parser.add_argument("--workdir", type=Path, help="where the work folder is made")
    parser.add_argument("--baseline", type=Path, help="a folder holding another spark_backup")
    args = parser.parse_args()
    if args.baseline and not (args.baseline / "spark_backup" / "__init__.py").exists():
        parser.error(f"{args.baseline}: no spark_backup package in it")
    sizes = QUICK if args.small else FULL
    work = Path(tempfile.mkdtemp(prefix="spark-bench-backup-", dir=args.workdir))
    try:
        folders, total = generate(work / "data", sizes)
        key, public = make_key(work)
        plan = config_plan(work, "bench_files", folders, public, key)
        out = work / "pipeline.tar.zst.age"
        names = " ".join(shlex.quote(p.name) for p in folders)
        commands = {"spark-backup": _spark(plan, None)}
        if args.baseline:
            commands["spark-backup [baseline]"] = _spark(plan, args.baseline.resolve())
        commands["tar | zstd -3 -T2 | age"] = shell(
            f"tar -c -C {shlex.quote(str(folders[0].parent))} {names} | zstd -3 -T2 -q"
            f" | age -r {shlex.quote(public)} > {shlex.quote(str(out))}"
        )
        print(f"{total / MB:.0f} MB, {len(commands)} commands x {args.repeat} rounds")
        print(f"load average before: {load_average()}", flush=True)
        runs: dict[str, list[Run]] = {name: [] for name in commands}
        os.chdir(work)
        for round_ in range(args.repeat):
            # Each round starts with another command: on a busy machine the first of a round
            # tended to run slower, whichever it was.
            names = list(commands)
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                command = commands[name]
                shutil.rmtree(work / "store-bench_files", ignore_errors=True)
                out.unlink(missing_ok=True)
                os.sync()  # untimed: the previous command's write-back is not billed to this one
                run = run_timed(command)
                runs[name].append(run)
                print(
                    f"  round {round_ + 1} {name}: {run.seconds:.2f} s wall, "
                    f"{run.cpu_seconds:.2f} s CPU, {run.rss_mb:.0f} MB peak RSS",
                    flush=True,
                )
        print(f"load average after: {load_average()}")
        pipeline = runs["tar | zstd -3 -T2 | age"]
        for name, measured in runs.items():
            best = min(measured, key=lambda r: r.seconds)
            line = (
                f"{name}: best {best.seconds:.2f} s ({total / MB / best.seconds:.0f} MB/s), "
                f"CPU {min(r.cpu_seconds or 0 for r in measured):.2f}-"
                f"{max(r.cpu_seconds or 0 for r in measured):.2f} s"
            )
            if measured is not pipeline:
                ratios = [p.seconds / r.seconds for r, p in zip(measured, pipeline, strict=True)]
                line += (
                    f", throughput vs the pipeline per round: "
                    f"{', '.join(f'{r:.2f}' for r in ratios)}"
                )
            print(line)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
