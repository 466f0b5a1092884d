"""What reading every copy's WORM state costs on S3: ``list``'s work (the catalog listing, then
each copy's lock and the versions stacked on it) on a SeaweedFS bucket with Object Lock, in S3
requests per copy and wall time. A copy on a WORM store costs one ListObjectVersions per
source page, then, per copy, a ListObjectVersions and a HEAD for each of its two objects.

    .venv/bin/python benchmarks/bench_worm_list.py --copies 40

Needs the ``weed`` binary the tests use. Reports, does not judge: always exits 0.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup_tests.helpers import (
    config_source,
    make_estate,
    make_key,
    plan_dict,
    write_plan,
)
from spark_backup_tests.seaweedfs import seaweedfs_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=40)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, seaweedfs_server(Path(scratch, "s3")) as s3:
        root = Path(scratch)
        bucket = s3.make_bucket("bench-worm-list", object_lock=True)
        os.environ["SB_BENCH_KEY"], os.environ["SB_BENCH_SECRET"] = s3.access_key, s3.secret_key
        store = {
            "name": "worm",
            "kind": "s3",
            "endpoint_url": s3.endpoint_url,
            "bucket": bucket,
            "region_name": s3.region,
            "access_key_id": "env:SB_BENCH_KEY",
            "secret_access_key": "env:SB_BENCH_SECRET",
            "object_lock": {"mode": "COMPLIANCE", "retain_days": 1},
        }
        _identity, public = make_key(root / "keys")
        estate = make_estate(root / "estate")
        plan = write_plan(
            root, plan_dict([public], [config_source("vpn_config", [str(estate)])], stores=[store])
        )
        writer = BackupService(load_plan(plan))
        for _ in range(args.copies):
            writer.backup("vpn_config")
        service = BackupService(load_plan(plan))  # a fresh process's view: nothing cached
        calls: collections.Counter[str] = collections.Counter()
        client = service.store_for(service.plan.source("vpn_config")).client
        client.meta.events.register(
            "before-call.s3.*", lambda model, **_: calls.update([model.name])
        )
        started = time.perf_counter()
        refs = service.copies("vpn_config")
        listed = time.perf_counter() - started
        for ref in refs:
            service.lock_status(ref)
        total = time.perf_counter() - started
        print(f"copies: {len(refs)}")
        print(f"catalog listing: {listed:.3f} s")
        print(f"listing and every copy's lock and versions: {total:.3f} s")
        for name, count in sorted(calls.items()):
            print(f"  {name}: {count} ({count / len(refs):.2f} per copy)")


if __name__ == "__main__":
    main()
