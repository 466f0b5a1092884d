"""CPU seconds per thread of an llm_artifacts first backup, in process (no command start-up).

Backs the adapter ``bench_llm.py`` generates up into a fresh local store ``--repeat`` times
and prints each round's wall and CPU seconds with the CPU of each thread pool (main thread
chunking, ``file-hash``, ``pack-compress``, ``pack-seal``), read from
``/proc/self/task/*/stat`` every 10 ms: which stage bounds a backup, and what a change saves.
``--timeline``: each pool's share of a core per 50 ms of the last round (where the cores sit
idle: the start, the steady phase, the end). ``--tree DIR``: the engine imported from DIR (a
baseline, ``git archive HEAD spark_backup | tar -x -C DIR``) instead of this checkout.
``--restore``: then the last version restored ``--repeat`` times, as ``restore`` does it
(the timeline is then the last restore's). ``--set NAME=N``: a constant of ``engine/blobs/packs.py`` changed for the run (``SEALERS=1``,
``COMPRESSORS=3``: the variants compared in benchmarks/README.md).

    .venv/bin/python benchmarks/profile_llm_threads.py --workdir /dev/shm/me --size-mb 500
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from bench_llm import ROOT, write_adapter
from machine import thread_cpu

if "--tree" in sys.argv:
    sys.path.insert(0, sys.argv[sys.argv.index("--tree") + 1])
else:
    sys.path.insert(0, str(ROOT))

from pyrage import x25519

from spark_backup.engine.blobs import packs
from spark_backup.engine.blobs.packs import PackCache
from spark_backup.engine.blobs.version import iter_file, new_version
from spark_backup.engine.crypto import Recipients
from spark_backup.engine.gc_pause import without_cyclic_gc
from spark_backup.engine.stores.local import LocalStore
from spark_backup.sources.blob_versions import _preallocate

BUCKET = 0.05  # seconds per line of the timeline


def pool_of(name: str) -> str:
    return name.rstrip("_0123456789")


def one_round(
    model: Path, store_root: Path, recipients: Recipients
) -> tuple[float, float, dict, list, list]:
    """A first backup into a fresh store; also returns the version's file entries."""
    shutil.rmtree(store_root, ignore_errors=True)
    store_root.mkdir(parents=True)
    store = LocalStore("profile", store_root)
    builder = new_version(store, "adapter", b"k" * 32, recipients, 3)

    def back_up() -> None:
        with builder.writing():
            for name in sorted(os.listdir(model)):
                builder.add_file(str(model / name), name, safetensors=name.endswith(".safetensors"))
        builder.commit_refs(store, "adapter")

    return (*sampled(back_up), builder.files)


def restore_round(
    store_root: Path, files: list, identity: x25519.Identity, target: Path
) -> tuple[float, float, dict, list]:
    """The version restored as ``restore`` does it (one pack cache, each file written at its
    offsets by the reading threads and hashed in order), without staging or the document."""
    store = LocalStore("profile", store_root)
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)

    def restore() -> None:
        with without_cyclic_gc(), PackCache(store, "adapter", [identity]) as cache:
            for entry in files:
                fd = os.open(target / entry["path"], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    _preallocate(fd, entry["size"])
                    for _data in iter_file(store, "adapter", entry, [identity], "p", cache, fd):
                        pass
                finally:
                    os.close(fd)

    try:
        return sampled(restore)
    finally:
        shutil.rmtree(target, ignore_errors=True)


def sampled(work) -> tuple[float, float, dict, list]:
    """Wall and CPU seconds of ``work()``, each pool's CPU, and the samples of the timeline."""
    start = thread_cpu()
    seen: dict[int, tuple[str, float]] = {}
    samples: list[tuple[float, dict[str, float]]] = []  # (time, CPU s by pool so far)
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            names = {t.native_id: t.name for t in threading.enumerate()}
            for tid, (_comm, cpu) in thread_cpu().items():
                name = names.get(tid) or seen.get(tid, ("?", 0.0))[0]
                seen[tid] = (name, cpu - start.get(tid, ("", 0.0))[1])
            by_pool: dict[str, float] = {}
            for tid, (name, used) in seen.items():
                if tid != threading.get_native_id():
                    by_pool[pool_of(name)] = by_pool.get(pool_of(name), 0.0) + used
            samples.append((time.perf_counter() - wall0, by_pool))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, name="sampler")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    sampler.start()
    work()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    done.set()
    sampler.join()
    pools: dict[str, float] = {}
    for tid, (name, used) in seen.items():
        if tid != sampler.native_id:
            pools[pool_of(name)] = pools.get(pool_of(name), 0.0) + used
    return wall, cpu, pools, samples


def print_timeline(samples: list[tuple[float, dict[str, float]]], pools: list[str]) -> None:
    """Each pool's CPU per ``BUCKET`` as a share of one core (the clock ticks are 10 ms, so a
    line is exact to about 20%); ``sum`` out of 2 cores."""
    print("  t s  " + "".join(f"{p[:12]:>13}" for p in pools) + "          sum")
    previous: dict[str, float] = {}
    edge = BUCKET
    for at, by_pool in samples:
        if at < edge and (at, by_pool) != samples[-1]:
            continue
        span = at - (edge - BUCKET)
        shares = [(by_pool.get(p, 0.0) - previous.get(p, 0.0)) / span for p in pools]
        print(f"{at:5.2f}  " + "".join(f"{s:13.2f}" for s in shares) + f"{sum(shares):13.2f}")
        previous, edge = by_pool, at + BUCKET


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--tensors", type=int, default=336)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--timeline", action="store_true", help="the last round, per 50 ms")
    parser.add_argument("--tree", help="import spark_backup from this directory (a baseline)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=N")
    parser.add_argument(
        "--restore", action="store_true", help="then restore the last version --repeat times"
    )
    args = parser.parse_args()
    for setting in args.set:
        name, value = setting.split("=", 1)
        if not hasattr(packs, name):
            parser.error(f"engine/blobs/packs.py has no {name}")
        setattr(packs, name, int(value))
    model = args.workdir / "model"
    if not model.exists():
        write_adapter(model, args.size_mb, args.tensors, seed=1)
    identity = x25519.Identity.generate()
    recipients = Recipients((str(identity.to_public()),))
    with open("/proc/loadavg") as handle:
        print("load", handle.read().strip())
    for _ in range(args.repeat):
        wall, cpu, pools, samples, files = one_round(model, args.workdir / "store", recipients)
        per_pool = "  ".join(f"{name} {used:.2f}" for name, used in sorted(pools.items()))
        print(f"wall {wall:.3f} s  CPU {cpu:.3f} s  |  {per_pool}")
    if args.restore:
        for _ in range(args.repeat):
            wall, cpu, pools, samples = restore_round(
                args.workdir / "store", files, identity, args.workdir / "restored"
            )
            per_pool = "  ".join(f"{name} {used:.2f}" for name, used in sorted(pools.items()))
            print(f"restore: wall {wall:.3f} s  CPU {cpu:.3f} s  |  {per_pool}")
    if args.timeline:
        print_timeline(samples, sorted(pools))
    return 0


if __name__ == "__main__":
    sys.exit(main())
