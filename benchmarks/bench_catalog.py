"""Benchmark listing and checking a source with 10 and with 5,000 copies (the catalog index).

For each count, one real backup of a small configuration tree is made, then cloned into
COUNT - 1 more copies 15 minutes apart (``clone_copies``: the same stored bytes under new data
keys, a manifest each, committed data first and manifest last, as a backup commits; every
clone verifies and restores), and the source's index is written as a backup writes it. Then,
each in a fresh process as a user or a Dagster check run pays it:

* ``list``: ``spark-backup list SOURCE``, output read through a pipe;
* ``checks``: open the plan, run the freshness check and the checksum check of the newest
  partition (list the copies, verify the partition's newest copy's stored bytes);

and, in-process, the listing call alone (``service.listing``) with the index and (for
comparison) the first listing after the index was lost, which reads every manifest and writes
the index again. Every figure is the best of ``--repeat`` runs. The ratio 5,000 / 10 is the
target (at most 1.5 for ``list`` and the checks). The script reports, it does not judge:
MISS lines say where a target was not met; it always exits 0.

    .venv/bin/python benchmarks/bench_catalog.py
    .venv/bin/python benchmarks/bench_catalog.py --counts 10 5000 20000 --repeat 5

The store sits in ``--workdir`` (default ``/dev/shm`` when it exists, so that generating
5,000 copies does not wait on fsync; the listing itself reads no manifest either way).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from machine import basic_facts, load_average

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # spark_backup_tests.helpers, which builds plans and clones

from spark_backup.engine.catalog import REWRITE_AFTER_READS, index_prefix  # noqa: E402
from spark_backup.service import BackupService  # noqa: E402
from spark_backup_tests.helpers import (  # noqa: E402
    clone_copies,
    config_source,
    make_estate,
    make_key,
    plan_dict,
    write_plan,
)

SOURCE = "bench_catalog"
STEP = dt.timedelta(minutes=15)
TARGET_RATIO = 1.5

# What the freshness and checksum checks (defs/checks.py) do, in a fresh process.
CHECKS = """
import sys, time
started = time.perf_counter()
from spark_backup.engine.catalog import latest_per_part
from spark_backup.service import BackupService
service = BackupService.from_path(sys.argv[1])
fresh = service.freshness(sys.argv[2])
refs = service.copies(sys.argv[2])
newest = latest_per_part((r.manifest for r in refs), refs[-1].manifest.partition)
outcomes = [service.verify(r) for r in refs if r.manifest in newest]
assert fresh.newest is not None and outcomes and all(o.ok for o in outcomes), outcomes
print(time.perf_counter() - started)
"""


def make_source(workdir: Path, count: int) -> Path:
    """A plan whose source has ``count`` copies and an index; returns the plan."""
    folder = workdir / f"copies-{count}"
    folder.mkdir(parents=True)
    _identity, public = make_key(folder / "keys")
    estate = make_estate(folder / "estate")
    plan = write_plan(
        folder,
        plan_dict([public], [config_source(SOURCE, [str(estate)], cadence="daily")]),
    )
    service = BackupService.from_path(plan)
    [made] = service.backup(SOURCE)
    store = service.store_for(service.plan.source(SOURCE))
    start = dt.datetime.now(dt.UTC) - count * STEP
    clone_copies(store, made, count - 1, start=start, step=STEP)
    service.update_index(store, SOURCE)
    return plan


def best(runs: int, measure) -> Figure:
    figures = [measure() for _ in range(runs)]
    return Figure(min(f.wall for f in figures), min(f.cpu for f in figures))


@dataclass(frozen=True)
class Figure:
    wall: float  # seconds
    cpu: float  # seconds of CPU (user and system) the process used


def timed_process(command: list[str]) -> Figure:
    """Wall time and CPU time of a fresh process: on a loaded machine the wall time is mostly
    waiting for a CPU, the CPU time is the work."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{command} failed: {done.stderr.decode(errors='replace')}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return Figure(wall, cpu)


def cli_list(plan: Path) -> Figure:
    return timed_process(
        [sys.executable, "-m", "spark_backup", "--no-progress", "--plan", str(plan), "list", SOURCE]
    )


def checks(plan: Path) -> Figure:
    return timed_process([sys.executable, "-c", CHECKS, str(plan), SOURCE])


def in_process_listing(plan: Path) -> Figure:
    service = BackupService.from_path(plan)
    started, cpu = time.perf_counter(), time.process_time()
    service.listing(SOURCE)
    return Figure(time.perf_counter() - started, time.process_time() - cpu)


def listing_without_index(plan: Path) -> tuple[Figure, int]:
    """The first listing after the index was lost: it reads every manifest and writes the
    index again."""
    service = BackupService.from_path(plan)
    store = service.store_for(service.plan.source(SOURCE))
    for segment in list(store.list(index_prefix(SOURCE))):
        store.delete(segment.key)
    started, cpu = time.perf_counter(), time.process_time()
    listing = service.catalog(store).listing(SOURCE)
    figure = Figure(time.perf_counter() - started, time.process_time() - cpu)
    return figure, listing.manifests_read


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    shm = Path("/dev/shm")
    parser.add_argument("--workdir", type=Path, default=shm if shm.is_dir() else None)
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 5000])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write every figure as JSON")
    args = parser.parse_args(argv)

    facts = {**basic_facts(), "load_average": load_average()}
    print("machine")
    for name, value in facts.items():
        print(f"  {name:<16} {value}")
    workdir = Path(tempfile.mkdtemp(prefix="spark-bench-catalog-", dir=args.workdir))
    results: dict[int, dict[str, Figure]] = {}
    try:
        for count in args.counts:
            started = time.perf_counter()
            plan = make_source(workdir, count)
            print(f"\n{count:,} copies made in {time.perf_counter() - started:.1f}s", flush=True)
            figures = {
                "list_cli": best(args.repeat, lambda plan=plan: cli_list(plan)),
                "checks_process": best(args.repeat, lambda plan=plan: checks(plan)),
                "listing_in_process": best(args.repeat, lambda plan=plan: in_process_listing(plan)),
            }
            rebuild, read = listing_without_index(plan)
            figures["listing_without_index"] = rebuild
            results[count] = figures
            for name, figure in figures.items():
                print(
                    f"  {name:<24} {figure.wall * 1000:9.1f} ms wall {figure.cpu * 1000:9.1f} ms CPU"
                )
            rewrote = " and wrote the index again" if read >= REWRITE_AFTER_READS else ""
            print(f"  (the listing without index read {read:,} manifests{rewrote})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    low, high = min(results), max(results)
    print(f"\nratio {high:,} / {low:,} copies (target for list and checks: <= {TARGET_RATIO})")
    misses = []
    for name in results[low]:
        ratios = []
        for measure in ("wall", "cpu"):
            a, b = getattr(results[low][name], measure), getattr(results[high][name], measure)
            per_copy = (b - a) / (high - low) * 1e6
            ratios.append(b / a)
            print(f"  {name:<24} {measure:<4} {b / a:7.2f}x   {per_copy:7.1f} us per added copy")
        wall_ratio, cpu_ratio = ratios
        if name in ("list_cli", "checks_process") and cpu_ratio > TARGET_RATIO:
            misses.append(f"MISS {name}: CPU {cpu_ratio:.2f}x > {TARGET_RATIO}x")
        elif name in ("list_cli", "checks_process") and wall_ratio > TARGET_RATIO:
            misses.append(f"note {name}: wall {wall_ratio:.2f}x > {TARGET_RATIO}x (CPU within)")
    print(f"\nload average at the end: {load_average()} (at the start: {facts['load_average']})")
    print("\n".join(misses))
    if not any(line.startswith("MISS") for line in misses):
        print("list and checks PASS")
    if args.json:
        seconds = {count: {k: asdict(v) for k, v in f.items()} for count, f in results.items()}
        args.json.write_text(json.dumps({"machine": facts, "seconds": seconds}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
