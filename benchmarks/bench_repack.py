"""Benchmark prune's repacking of the blob layer: bytes reclaimed and repack throughput.

A generated LoRA adapter (``--size-mb`` MB of random fp32 weights in ``--tensors`` tensors) is
backed up; then ``--changed-percent`` of its tensors (spread over the file) are re-drawn and it
is backed up again, and retention keeps only the second version. The first ``prune --apply``
(through the service, with the identity) expires the first version and repacks every pack at
least ``defaults.repack_unused`` unused; a second one, past ``orphan_grace``, deletes the old
packs. Reported: the store's pack bytes before and after, the bytes reclaimed, the bytes the
repack read (old packs) and wrote (new packs), and the first prune's wall and CPU seconds
(this process, every thread) with the repack's throughput over the packs it read. Beside it,
restic (where installed) backs up the same two versions into its own repository, forgets the
first and runs ``restic prune`` (its default: repack until at most 5% of the repository is
unused): its data bytes before and after, wall and CPU seconds. Each round starts from a fresh
store and repository. It reports and never judges.

    nice .venv/bin/python benchmarks/bench_repack.py --workdir /dev/shm
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_llm import LAST_CPU, MB, measured_rss, redraw, tree_bytes, write_adapter
from machine import basic_facts, load_average

ROOT = Path(__file__).resolve().parents[1]


def both_back_up(service, model: Path, restic_env: dict[str, str] | None) -> None:
    """One version with spark-backup, and with restic where it is installed."""
    service.backup("adapter")
    if restic_env is not None:
        subprocess.run(
            ["restic", "backup", "--quiet", str(model)],
            env=restic_env,
            check=True,
            capture_output=True,
        )


def run(args: argparse.Namespace, workdir: Path) -> dict:
    sys.path.insert(0, str(ROOT))
    from spark_backup.engine.blobs.packs import existing_packs
    from spark_backup.service import BackupService

    key = workdir / "age.key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(
        ["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True
    ).stdout.strip()
    os.environ["BENCH_CHUNK_KEY"] = "bench-chunk-key-0123456789abcdef"
    figures: dict = {"machine": {**basic_facts(), "load_before": load_average()}, "rounds": []}
    for round_ in range(args.repeat):
        model, store = workdir / "adapter", workdir / "store"
        shutil.rmtree(model, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(workdir / "orchestration_journal", ignore_errors=True)
        tensors = write_adapter(model, args.size_mb, args.tensors, args.seed)
        plan = workdir / "plan.yaml"
        plan.write_text(
            json.dumps(
                {
                    "encryption": {"recipients": [public]},
                    "stores": [{"name": "local", "kind": "local", "path": str(store)}],
                    "defaults": {"repack_unused": args.unused},
                    "sources": [
                        {
                            "name": "adapter",
                            "kind": "llm_artifacts",
                            "cadence": "daily",
                            "owner": "team:bench",
                            "path": str(model),
                            "chunk_key": "env:BENCH_CHUNK_KEY",
                            "retention": {"daily": 1, "weekly": 0, "monthly": 0},
                        }
                    ],
                }
            )
        )
        service = BackupService.from_path(plan)
        local = service.store_for(service.source("adapter"))
        restic_repo = workdir / "restic"
        shutil.rmtree(restic_repo, ignore_errors=True)
        restic_env = {
            **os.environ,
            "RESTIC_REPOSITORY": str(restic_repo),
            "RESTIC_PASSWORD": "bench",
            "RESTIC_CACHE_DIR": str(workdir / "restic-cache"),
        }
        has_restic = shutil.which("restic") is not None
        if has_restic:
            subprocess.run(["restic", "init"], env=restic_env, check=True, capture_output=True)

        both_back_up(service, model, restic_env if has_restic else None)
        redraw(model, max(1, round(len(tensors) * args.changed_percent / 100)), args.seed + 1)
        both_back_up(service, model, restic_env if has_restic else None)
        before = sum(existing_packs(local, "adapter").values())
        now = dt.datetime.now(dt.UTC)
        wall, cpu = time.perf_counter(), time.process_time()
        report = service.prune(dry_run=False, now=now, identity_file=str(key))
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        service.prune(dry_run=False, now=now + dt.timedelta(days=2), identity_file=str(key))
        after = sum(existing_packs(local, "adapter").values())
        read = sum(p["size"] for p in report.repacked)
        figures["rounds"].append(
            {
                "packs_before_bytes": before,
                "packs_after_bytes": after,
                "reclaimed_bytes": before - after,
                "repack_reclaimed_bytes": report.repack_reclaimed_bytes,
                "packs_rewritten": len(report.repacked),
                "repack_read_bytes": read,
                "repack_new_packs": len(report.repack_new_packs),
                "prune_seconds": round(wall, 2),
                "prune_cpu_seconds": round(cpu, 2),
                "repack_read_mb_s": round(read / MB / wall, 1) if wall else None,
                "round": round_,
            }
        )
        if has_restic:
            # restic's own prune on the same two versions: forget the first, then prune with
            # its defaults (repack until at most 5% of the repository is unused).
            data = restic_repo / "data"
            subprocess.run(
                ["restic", "forget", "--keep-last", "1"],
                env=restic_env,
                check=True,
                capture_output=True,
            )
            restic_before = tree_bytes(data)
            seconds, rss, _ = measured_rss(["restic", "prune"], restic_env)
            figures["rounds"][-1]["restic"] = {
                "data_before_bytes": restic_before,
                "data_after_bytes": tree_bytes(data),
                "reclaimed_bytes": restic_before - tree_bytes(data),
                "prune_seconds": round(seconds, 2),
                "prune_cpu_seconds": round(LAST_CPU[0], 2),
                "prune_rss_mb": round(rss, 1),
            }
    figures["machine"]["load_after"] = load_average()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--tensors", type=int, default=120)
    parser.add_argument("--changed-percent", type=float, default=60.0)
    parser.add_argument("--unused", type=float, default=0.5, help="defaults.repack_unused")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="bench-repack-") as tmp:
        figures = run(args, Path(tmp))
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
