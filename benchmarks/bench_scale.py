"""Scale of the Dagster layer and the catalog: a plan of 200 sources, a store of 50,000 copies.

Measures, each in a fresh Python process (as a code server, a run or the CLI starts):

* **definitions**: import spark-backup and build the Dagster definitions of the plan (what
  every code server and every run does before anything else);
* **catalog**: list every copy of every source (``spark-backup list``'s work);
* **freshness**: the freshness check of every source (what the ``freshness_checks`` job does
  every 30 minutes);
* **checksum listing**: what one partition's ``checksum`` check reads before it re-reads the
  data: its source's copies, the newest per part.

The store is a local folder. One real copy is made with ``BackupService.backup``; the other
49,999 are that copy's manifest rewritten for other sources, times and partitions (and its
data object hard-linked), so the catalog reads 50,000 real manifest files. Store latency (S3)
is not part of it: one LIST per 1,000 keys and one GET per manifest come on top.

    .venv/bin/python benchmarks/bench_scale.py [--sources 200] [--copies 50000] [--json out.json]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import basic_facts, load_average

from spark_backup.engine.crypto import generate_identity
from spark_backup.engine.manifest import (
    Manifest,
    data_key,
    manifest_key,
    new_copy_id,
)

PROBES = {
    "definitions": (
        "from spark_backup.defs.build import build_definitions\n"
        "from spark_backup.plan import load_plan\n"
        "defs = build_definitions(load_plan(PLAN))\n"
        "defs.resolve_asset_graph()\n"
    ),
    "catalog": (
        "from spark_backup.service import BackupService\n"
        "n = len(BackupService.from_path(PLAN).copies())\n"
        "assert n == COPIES, n\n"
    ),
    "freshness": (
        "from spark_backup.service import BackupService\n"
        "s = BackupService.from_path(PLAN)\n"
        "[s.freshness(src.name) for src in s.plan.sources]\n"
    ),
    "checksum_listing": (
        "from spark_backup.engine.catalog import latest_per_part\n"
        "from spark_backup.service import BackupService\n"
        "s = BackupService.from_path(PLAN)\n"
        "src = s.plan.sources[0].name\n"
        "refs = s.copies(src)\n"
        "latest_per_part((r.manifest for r in refs), refs[-1].manifest.partition)\n"
    ),
}


def make_plan(root: Path, sources: int) -> Path:
    tree = root / "etc"
    tree.mkdir()
    (tree / "app.conf").write_text("key = value\n" * 100)
    public = generate_identity(root / "age.key")
    plan = {
        "encryption": {"recipients": [public]},
        "stores": [{"name": "local", "kind": "local", "path": str(root / "store")}],
        "defaults": {"partitions_start": "2026-01-01"},
        "sources": [
            {
                "name": f"node{i:03d}_config",
                "kind": "config_archive",
                "cadence": "daily",
                "owner": "team:platform",
                "paths": [str(tree)],
            }
            for i in range(sources)
        ],
    }
    path = root / "spark_backup.yaml"
    path.write_text(yaml.safe_dump(plan, sort_keys=False))
    return path


def fill_store(plan_path: Path, copies: int) -> None:
    """One real copy, then its manifest rewritten into ``copies`` copies across all sources."""
    from spark_backup.service import BackupService

    service = BackupService.from_path(plan_path)
    sources = [s.name for s in service.plan.sources]
    (template,) = service.backup(sources[0])
    store_root = plan_path.parent / "store"
    template_data = store_root / template.data_key
    suffix = template.data_key.removeprefix(f"{sources[0]}/data/{template.id}.")
    per_source = copies // len(sources)
    start = dt.datetime(2026, 1, 1, 1, tzinfo=dt.UTC)
    made = 1
    for index, source in enumerate(sources):
        (store_root / source / "data").mkdir(parents=True, exist_ok=True)
        (store_root / source / "manifests").mkdir(parents=True, exist_ok=True)
        for n in range(per_source - (1 if index == 0 else 0)):
            started = start + dt.timedelta(days=n % 330, minutes=n // 330, seconds=index)
            copy_id = new_copy_id(source, started)
            manifest = replace(
                template,
                id=copy_id,
                source=source,
                partition=started.date().isoformat(),
                data_key=data_key(source, copy_id, suffix),
                started_at=started.isoformat(),
                finished_at=(started + dt.timedelta(seconds=2)).isoformat(),
            )
            os.link(template_data, store_root / manifest.data_key)
            (store_root / manifest_key(source, copy_id)).write_bytes(manifest.to_json())
            made += 1
    assert made == per_source * len(sources), made
    Manifest.from_json((store_root / manifest_key(source, copy_id)).read_bytes(), "check")


def measure(name: str, plan: Path, copies: int, repeat: int) -> list[float]:
    code = f"PLAN = {str(plan)!r}\nCOPIES = {copies}\n" + PROBES[name]
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - began)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", type=int, default=200)
    parser.add_argument("--copies", type=int, default=50_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="spark-bench-scale-") as tmp:
        root = Path(tmp)
        plan = make_plan(root, args.sources)
        began = time.perf_counter()
        fill_store(plan, args.copies)
        print(f"store filled with {args.copies} copies in {time.perf_counter() - began:.1f} s")
        results = {}
        for name in PROBES:
            times = measure(name, plan, args.copies, args.repeat)
            results[name] = {"median_s": round(statistics.median(times), 2), "runs_s": times}
            print(
                f"{name:18s} median {statistics.median(times):6.2f} s  (runs: "
                + ", ".join(f"{t:.2f}" for t in times)
                + ")"
            )
        baseline = measure_import_only(args.repeat)
        results["python_and_import_only"] = {"median_s": round(statistics.median(baseline), 2)}
        print(f"{'import only':18s} median {statistics.median(baseline):6.2f} s")
        facts = {**basic_facts(), "load_average_after": load_average()}
        print(json.dumps(facts))
        if args.json:
            args.json.write_text(json.dumps({"results": results, "machine": facts}, indent=2))


def measure_import_only(repeat: int) -> list[float]:
    """Python and Dagster's import alone: what every probe pays before its own work."""
    times = []
    for _ in range(repeat):
        began = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import dagster, spark_backup.service"], check=True)
        times.append(time.perf_counter() - began)
    return times


if __name__ == "__main__":
    main()
