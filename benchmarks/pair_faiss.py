"""Paired rounds: ``spark-backup backup`` of a faiss source per spark-backup tree, and the
reference (``faiss.write_index`` of the loaded index, then ``zstd -q -3 -T2 | age``), in the same
minute.

Uses the indexes and the plan of ``profile_faiss_threads.py`` (made once in ``--workdir``; the
blob layer). Each round times the reference, each tree's whole command (a process of its own,
wall and CPU from ``wait4``, the inspection process included; the copy's own time from its
manifest's ``started_at`` and ``finished_at``), then the reference again, and takes the faster
reference: the order of the trees alternates from round to round. The ratios are those of
``bench_faiss.py`` (snapshot bytes per second against the index's bytes per second through the
reference); it prints every round and the median of the per-round ratios::

    nice .venv/bin/python benchmarks/pair_faiss.py --workdir /dev/shm/me \\
        --code /dev/shm/me/base --code . --source ivf --repeat 8

Every command runs from the work folder, so a ``--code`` tree's own modules are the ones
imported (``python -m`` puts its working directory ahead of PYTHONPATH).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from profile_faiss_threads import CHUNK_KEY, ROOT, prepare

REFERENCE = """
import sys, time, faiss
index = faiss.read_index(sys.argv[1])
for _line in sys.stdin:
    started = time.perf_counter()
    faiss.write_index(index, sys.argv[2])
    print(time.perf_counter() - started, flush=True)
"""


def timed(args: list[str], env: dict[str, str] | None, cwd: Path) -> tuple[float, float]:
    """Wall and CPU seconds of one command tree (``wait4``: its waited-for children included)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        args, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    _pid, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(args)[:200]} failed")
    return time.perf_counter() - started, usage.ru_utime + usage.ru_stime


class Reference:
    """``write_index`` from an index loaded once (its load is not counted), then the pipe."""

    def __init__(self, index: Path, work: Path, recipient: str):
        self.written = work / "written.faiss"
        self.out = work / "reference.age"
        self.recipient = recipient
        self.work = work
        self.proc = subprocess.Popen(
            [sys.executable, "-c", REFERENCE, str(index), str(self.written)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=work,
        )

    def run(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        written = float(self.proc.stdout.readline())
        pipe = f"zstd -q -3 -T2 -c '{self.written}' | age -r {self.recipient} > '{self.out}'"
        wall, _cpu = timed(["sh", "-c", pipe], None, self.work)
        return written + wall

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait()
        self.written.unlink(missing_ok=True)
        self.out.unlink(missing_ok=True)


def backup(work: Path, plan: Path, source: str, tree: Path) -> tuple[float, float, float]:
    """(whole command's wall, its CPU, the copy's own time) of one backup into an empty store."""
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(tree), PROFILE_FAISS_CHUNK_KEY=CHUNK_KEY)
    command = [sys.executable, "-m", "spark_backup", "--no-progress", "--plan", str(plan)]
    wall, cpu = timed([*command, "backup", source], env, work)
    (manifest,) = (store / source / "manifests").glob("*.json")
    recorded = json.loads(manifest.read_text())
    own = dt.datetime.fromisoformat(recorded["finished_at"]) - dt.datetime.fromisoformat(
        recorded["started_at"]
    )
    return wall, cpu, own.total_seconds()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=6)
    parser.add_argument("--source", choices=["flat", "ivf"], default="ivf")
    parser.add_argument("--code", action="append", type=Path, default=None)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    work = args.workdir.resolve()
    plan = prepare(work, stream=False)
    trees = [path.resolve() for path in args.code or [ROOT]]
    recipient = next(
        line.split(": ", 1)[1]
        for line in (work / "age.key").read_text().splitlines()
        if line.startswith("# public key")
    )
    folder = work / args.source
    index_bytes = (folder / "index.faiss").stat().st_size
    snapshot_bytes = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
    scale = snapshot_bytes / index_bytes  # snapshot MB/s against the index's MB/s

    reference = Reference(folder / "index.faiss", work, recipient)
    rows: dict[Path, list[tuple[float, float, float, float]]] = {tree: [] for tree in trees}
    print("load", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    try:
        for number in range(args.repeat):
            order = trees if number % 2 == 0 else trees[::-1]
            before = reference.run()
            found = {tree: backup(work, plan, args.source, tree) for tree in order}
            ref = min(before, reference.run())
            line = [f"round {number}  reference {ref:.3f} s"]
            for tree in trees:
                wall, cpu, own = found[tree]
                rows[tree].append((wall, cpu, own, ref))
                line.append(
                    f"{tree.name}: copy {own:.3f} s ({100 * scale * ref / own:.0f}%), whole "
                    f"{wall:.3f} s ({100 * scale * ref / wall:.0f}%), {cpu:.2f} CPU s"
                )
            print("  |  ".join(line), flush=True)
    finally:
        reference.close()
        shutil.rmtree(work / "store", ignore_errors=True)
    print("load", " ".join(f"{x:.2f}" for x in os.getloadavg()))
    print(f"{args.source}: medians of {args.repeat} paired rounds")
    for tree, found in rows.items():
        copy = statistics.median(100 * scale * r[3] / r[2] for r in found)
        whole = statistics.median(100 * scale * r[3] / r[0] for r in found)
        print(
            f"{tree.name:12} copy {statistics.median(r[2] for r in found):.3f} s ({copy:.0f}%)  "
            f"whole {statistics.median(r[0] for r in found):.3f} s ({whole:.0f}%)  "
            f"CPU {statistics.median(r[1] for r in found):.2f} s  "
            f"reference {statistics.median(r[3] for r in found):.3f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
