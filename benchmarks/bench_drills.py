"""Restore drill times of a demo-sized estate, the figures the disaster-recovery runbook's
timeline uses (docs/runbooks/disaster-recovery.md).

Backs up and drills, through the service as the ``drill`` command does:

* ``dgx_config``, ``k8s_config`` (manifests validated offline against the Kubernetes schemas)
  and ``vpn_config`` (the restored WireGuard configuration brought up with wireguard-go in two
  network namespaces and pinged through; parse only when not root or the tools are missing),
  on the demo's sample trees;
* ``pg_main``: a database of ``--rows`` rows on the PostgreSQL server at 127.0.0.1:5432
  (``pg_dump -Fc`` drill: restored into a scratch database, row counts compared, dropped);
  skipped when no server answers.

Prints the backup and drill time of each, and the sum. Reports, never judges: exits 0.

    .venv/bin/python benchmarks/bench_drills.py [--rows 100000] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import yaml

from spark_backup.demo import prepare_demo
from spark_backup.service import BackupService
from spark_backup.sources.config_archive.wireguard import tunnel_unavailable

PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


def _psql(sql: str, database: str = "postgres") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["psql", "-h", PG["host"], "-p", str(PG["port"]), "-U", PG["user"], "-d", database,
         "-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-drills-"))
    demo = prepare_demo(root / "home")  # the demo's sample trees and age key
    estate = demo.estate
    key = demo.keys / "demo-age.key"
    public = (demo.keys / "demo-age.pub").read_text().strip()
    # The demo's WireGuard key is a placeholder; a drill that brings it up needs a real one.
    wg = estate / "vpn" / "etc" / "wireguard" / "wg0.conf"
    wg.write_text(
        "[Interface]\nAddress = 10.8.0.1/24\nListenPort = 51820\n"
        f"PrivateKey = {base64.b64encode(os.urandom(32)).decode()}\n\n[Peer]\n"
        f"PublicKey = {base64.b64encode(os.urandom(32)).decode()}\nAllowedIPs = 10.8.0.2/32\n"
    )
    tunnel = tunnel_unavailable() is None
    common = {"kind": "config_archive", "cadence": "weekly", "owner": "team:platform"}
    sources = [
        {**common, "name": "dgx_config", "paths": [str(estate / "dgx" / "etc")]},
        {
            **common,
            "name": "k8s_config",
            "paths": [str(estate / "k8s")],
            "drill": {"kubernetes": {"manifests": ["k8s/manifests/*.yaml"]}},
        },
        {
            **common,
            "name": "vpn_config",
            "rto": "1h",
            "paths": [str(estate / "vpn" / "etc")],
            "drill": {"wireguard": {"configs": ["wireguard/*.conf"], "tunnel": tunnel}},
        },
    ]
    database = None
    if _psql("SELECT 1").returncode == 0:
        database = f"bench_drill_{uuid.uuid4().hex[:8]}"
        _psql(f"CREATE DATABASE {database}")
        _psql(
            "CREATE TABLE ledger (id bigint PRIMARY KEY, note text, amount numeric); "
            f"INSERT INTO ledger SELECT g, md5(g::text), g * 1.5 FROM generate_series(1, {args.rows}) g",
            database,
        )
        sources.append(
            {
                "name": "pg_main",
                "kind": "postgres",
                "cadence": "daily",
                "owner": "team:dba",
                **PG,
                "databases": [database],
                "base_backup": {"enabled": False},
                "wal_archiving": False,
            }
        )
    plan = {
        "encryption": {"recipients": [public], "identity_file": str(key)},
        "stores": [{"name": "local", "kind": "local", "path": str(root / "store")}],
        "sources": sources,
    }
    plan_path = root / "spark_backup.yaml"
    plan_path.write_text(yaml.safe_dump(plan, sort_keys=False))
    service = BackupService.from_path(plan_path)
    results = []
    try:
        for source in sources:
            clock = time.monotonic()
            service.backup(source["name"])
            backup = time.monotonic() - clock
            clock = time.monotonic()
            report = service.drill(source["name"])
            drill = time.monotonic() - clock
            results.append(
                {
                    "source": source["name"],
                    "backup_seconds": round(backup, 3),
                    "drill_seconds": round(drill, 3),
                    "restore_seconds": report.restore_seconds,
                    "rto_seconds": report.rto_seconds,
                    "passed": report.passed,
                    "check": "; ".join(s.description for s in report.steps)[:160],
                }
            )
    finally:
        if database:
            _psql(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
        subprocess.run(["rm", "-rf", str(root)], check=False)
    print(f"{'source':<12} {'backup s':>9} {'drill s':>8} {'restore s':>10} {'RTO s':>7}  passed")
    for r in results:
        print(
            f"{r['source']:<12} {r['backup_seconds']:>9.3f} {r['drill_seconds']:>8.3f} "
            f"{r['restore_seconds']:>10.3f} {r['rto_seconds']:>7.0f}  {r['passed']}  {r['check']}"
        )
    total = sum(r["drill_seconds"] for r in results)
    print(f"all drills one after another: {total:.3f} s (tunnel probe: {'on' if tunnel else 'off'}; "
          f"PostgreSQL rows: {args.rows if database else 'no server'})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
