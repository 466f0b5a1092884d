"""CPU seconds per thread of a faiss backup's copy, without the command's start-up.

Makes (once, in ``--workdir``) the 256 MB ``IndexFlatL2`` and the IVF index ``bench_faiss.py``
uses, then backs each up ``--repeat`` times into a fresh local store on the blob layer
(``--stream``: as a tar stream). Each round is a process of its own that has imported
spark-backup but not FAISS, as a backup command has when its copy starts; it times
``BackupService.backup`` (the copy: FAISS's import, the index's inspection and probes, the
chunking, compression, encryption and store) and prints its wall and CPU seconds with the CPU
of each thread pool (main thread, ``faiss-inspect``, ``file-hash``, ``pack-compress``,
``pack-seal``, OpenMP and OpenBLAS threads as ``other``), read from ``/proc/self/task/*/stat``
every 10 ms, the CPU of FAISS's inspection process (``inspection-process``: a child, not in
the round's own CPU), and the CPU seconds the machine's other processes used meanwhile (``others``: on
a shared machine, the rounds where they used little are the ones to compare).

``--code DIR`` (repeatable) runs each round once per spark-backup tree, interleaved, to compare
a change with a baseline (``git archive HEAD spark_backup | tar -x -C DIR``) in the same load::

    nice .venv/bin/python benchmarks/profile_faiss_threads.py --workdir /dev/shm/me \\
        --code /dev/shm/me/base --code . --repeat 5
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from machine import TICK, thread_cpu

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CHUNK_KEY = "profile-faiss-chunk-key-0123456789"


def busy_seconds() -> float:
    """CPU seconds every process of the machine has used so far (/proc/stat, all CPUs)."""
    with open("/proc/stat") as handle:
        fields = [int(x) for x in handle.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / TICK  # less idle and iowait


def child(plan: Path, source: str) -> None:
    """One round: the backup of ``source``, its wall and CPU and CPU per pool as JSON."""
    from spark_backup.service import BackupService

    service = BackupService.from_path(plan)
    start = thread_cpu()
    seen: dict[int, tuple[str, float]] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            names = {t.native_id: t.name for t in threading.enumerate()}
            for tid, (comm, cpu) in thread_cpu().items():
                name = names.get(tid) or seen.get(tid, (comm, 0.0))[0]
                seen[tid] = (name, cpu - start.get(tid, ("", 0.0))[1])
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, name="sampler")
    sampler.start()
    busy0, cpu0, wall0 = busy_seconds(), time.process_time(), time.perf_counter()
    children0 = _children_cpu()
    service.backup(source)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    children = _children_cpu() - children0
    others = max(0.0, busy_seconds() - busy0 - cpu - children)
    done.set()
    sampler.join()
    pools: dict[str, float] = {}
    known = (
        "MainThread",
        "faiss-inspect",
        "file-hash",
        "pack-compress",
        "pack-seal",
        "backup-zstd",
        "backup-age",
    )
    for tid, (name, used) in seen.items():
        if tid == sampler.native_id:
            continue
        pool = name.rstrip("_0123456789")
        pool = pool if pool in known else "other"
        pools[pool] = pools.get(pool, 0.0) + used
    if children:
        pools["inspection-process"] = children
    print(json.dumps({"wall": wall, "cpu": cpu, "others": others, "pools": pools}))


def _children_cpu() -> float:
    """CPU seconds of this process's children that ended (FAISS's inspection process)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def prepare(work: Path, stream: bool) -> Path:
    """The indexes, their sidecars and a plan with both sources (made once)."""
    sys.path.insert(0, str(HERE))
    import yaml
    from bench_faiss import MB, faiss_source, sidecars, write_flat, write_ivf

    key = work / "age.key"
    if not key.exists():
        subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    recipient = next(
        line.split(": ", 1)[1]
        for line in key.read_text().splitlines()
        if line.startswith("# public key")
    )
    flat, ivf = work / "flat", work / "ivf"
    if not (flat / "index.faiss").exists():
        flat.mkdir(exist_ok=True)
        write_flat(flat / "index.faiss", 256)
        sidecars(flat, 256 * MB // 1024)
    if not (ivf / "index.faiss").exists():
        ivf.mkdir(exist_ok=True)
        write_ivf(ivf / "index.faiss", 200_000, 1024, seed=2)
        sidecars(ivf, 200_000)

    chunk_key_env = None if stream else "PROFILE_FAISS_CHUNK_KEY"
    plan = work / ("plan-stream.yaml" if stream else "plan.yaml")
    plan.write_text(
        yaml.safe_dump(
            {
                "encryption": {"recipients": [recipient], "identity_file": str(key)},
                "stores": [{"name": "local", "kind": "local", "path": str(work / "store")}],
                "sources": [
                    faiss_source("flat", flat, chunk_key_env),
                    faiss_source("ivf", ivf, chunk_key_env, probes={"nprobe": 16}),
                ],
            },
            sort_keys=False,
        )
    )
    return plan


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--source", action="append", choices=["flat", "ivf"], default=None)
    parser.add_argument("--code", action="append", type=Path, default=None)
    parser.add_argument("--stream", action="store_true", help="tar streams, not the blob layer")
    parser.add_argument("--child", nargs=2, metavar=("PLAN", "SOURCE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child[0]), args.child[1])
        return 0
    if args.workdir is None:
        parser.error("--workdir is required")
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.workdir = args.workdir.resolve()  # the rounds run from it
    plan = prepare(args.workdir, args.stream)
    trees = [path.resolve() for path in args.code or [ROOT]]
    rows: dict[tuple[str, str], list[dict]] = {}
    print("load", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    for _ in range(args.repeat):
        for source in args.source or ["flat", "ivf"]:
            for tree in trees:
                shutil.rmtree(args.workdir / "store", ignore_errors=True)
                env = dict(os.environ, PYTHONPATH=str(tree), PROFILE_FAISS_CHUNK_KEY=CHUNK_KEY)
                # From the work folder: a worker started with ``python -m`` (FAISS's inspection
                # before ``-P``) puts its working directory ahead of PYTHONPATH, so a round run
                # from a checkout would import that checkout's worker whatever ``--code`` says.
                run = subprocess.run(
                    [
                        sys.executable,
                        str(HERE / Path(__file__).name),
                        "--child",
                        str(plan),
                        source,
                    ],
                    env=env,
                    cwd=args.workdir,
                    capture_output=True,
                    text=True,
                )
                if run.returncode != 0:
                    print(run.stderr, file=sys.stderr)
                    return 1
                row = json.loads(run.stdout.strip().splitlines()[-1])
                rows.setdefault((source, str(tree)), []).append(row)
                pools = "  ".join(f"{k} {v:.2f}" for k, v in sorted(row["pools"].items()))
                print(
                    f"{source:5} {tree.name:12} wall {row['wall']:.3f} s  CPU {row['cpu']:.3f} s"
                    f"  others {row['others']:.2f} s  |  {pools}",
                    flush=True,
                )
    print("load", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print("medians (and of the rounds the other processes used under 0.1 CPU seconds in):")
    for (source, tree), found in rows.items():
        wall = statistics.median(r["wall"] for r in found)
        cpu = statistics.median(r["cpu"] for r in found)
        quiet = [r["wall"] for r in found if r["others"] < 0.1]
        alone = f"{statistics.median(quiet):.3f} s ({len(quiet)} rounds)" if quiet else "none"
        print(f"{source:5} {Path(tree).name:12} wall {wall:.3f} s  CPU {cpu:.3f} s  quiet {alone}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
