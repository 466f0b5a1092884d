"""Benchmark the faiss kind's snapshot against ``faiss.write_index`` + ``zstd -T2 | age``.

On generated data, in one run:

* a 256 MB ``IndexFlatL2`` (``--quick``: 32 MB), and
* an IVF index (``IVF1024,Flat``; ``--quick``: ``IVF256,Flat``) trained, then re-trained on
  other vectors as a second version,

it measures, each command as a process of its own (wall and CPU time and peak RSS from
``wait4``):

* ``spark-backup backup`` of a faiss source (index, id mapping, document store; the catalogue
  and the probe queries included) and ``spark-backup restore``;
* the reference: ``faiss.write_index`` of the loaded index to a file, then
  ``zstd -3 -T2 | age -r KEY`` of that file (the two times added; loading the index is not
  counted), and ``age -d | zstd -d`` back;
* ``spark-backup drill``: the restore with the probe queries answered again;
* the bytes a second version of the IVF index adds to the store: grown (new vectors added to 5%
  of its inverted lists, the rest kept) and re-trained on other vectors (every list changes).

The sources go through the blob layer (``chunk_key``: packs shared between snapshots);
``--stream`` measures the tar-stream format instead (a source without ``chunk_key``).

It reports, it does not judge: the target (issue 9) is a snapshot throughput of at least 80%
of the reference, shown as the ratio. Always exits 0. Run it niced::

    nice .venv/bin/python benchmarks/bench_faiss.py [--quick] [--workdir DIR] [--json OUT]
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

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from machine import basic_facts, load_average, peak_rss_mb, with_peak_rss  # noqa: E402

PYTHON = sys.executable
SPARK_BACKUP = [PYTHON, "-m", "spark_backup", "--no-progress"]
MB = 1_000_000


def timed(args: list[str]) -> dict[str, float]:
    """Wall and CPU time of one command tree (wait4), and the peak RSS (MB) of its largest
    process (GNU time: wait4's figure would count this large parent's pages)."""
    report = Path(tempfile.mktemp(prefix="bench-faiss-rss-"))
    started = time.perf_counter()
    proc = subprocess.Popen(
        with_peak_rss(args, report), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
    )
    _pid, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{' '.join(map(str, args))[:200]} exited {code}")
    return {
        "seconds": time.perf_counter() - started,
        "cpu": usage.ru_utime + usage.ru_stime,
        "rss_mb": peak_rss_mb(report) or usage.ru_maxrss / 1024,
    }


def write_flat(path: Path, megabytes: int, dimension: int = 256, seed: int = 1) -> None:
    import faiss

    vectors = megabytes * MB // (4 * dimension)
    index = faiss.IndexFlatL2(dimension)
    rng = np.random.default_rng(seed)
    for start in range(0, vectors, 16384):
        index.add(rng.standard_normal((min(16384, vectors - start), dimension)).astype("float32"))
    faiss.write_index(index, str(path))


def write_ivf(path: Path, vectors: int, lists: int, seed: int, dimension: int = 128) -> None:
    import faiss

    rng = np.random.default_rng(seed)
    data = rng.standard_normal((vectors, dimension)).astype("float32")
    index = faiss.index_factory(dimension, f"IVF{lists},Flat")
    index.train(data[: max(lists * 40, 10000)])
    index.add(data)
    faiss.write_index(index, str(path))


def grow_ivf(path: Path, lists_share: float, seed: int = 4) -> None:
    """Add vectors near the centroids of ``lists_share`` of the inverted lists (2% more vectors
    in all): those lists grow, the others stay as they were."""
    import faiss

    index = faiss.read_index(str(path))
    ivf = faiss.extract_index_ivf(index)
    centroids = ivf.quantizer.reconstruct_n(0, ivf.nlist)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(ivf.nlist, max(1, int(ivf.nlist * lists_share)), replace=False)
    count = max(len(chosen), index.ntotal // 50)
    picks = chosen[rng.integers(0, len(chosen), count)]
    noise = 0.01 * rng.standard_normal((count, index.d)).astype("float32")
    index.add((centroids[picks] + noise).astype("float32"))
    faiss.write_index(index, str(path))


def sidecars(folder: Path, count: int) -> None:
    with open(folder / "ids.json", "w") as handle:
        json.dump({str(i): f"doc-{i}" for i in range(0, count, 7)}, handle)
    with open(folder / "docstore.jsonl", "w") as handle:
        for i in range(0, count, 7):
            handle.write(json.dumps({"id": f"doc-{i}", "text": f"passage {i}"}) + "\n")


REFERENCE = """
import sys, time, faiss
index = faiss.read_index(sys.argv[1])
started = time.perf_counter()
faiss.write_index(index, sys.argv[2])
print(time.perf_counter() - started)
"""


CHUNK_KEY_ENV = "BENCH_FAISS_CHUNK_KEY"  # the chunk key of the blob-layer sources


def faiss_source(name: str, folder: Path, chunk_key_env: str | None, **extra: object) -> dict:
    """A faiss source over ``folder``'s index and sidecars (``sidecars``): on the blob layer
    with the chunk key in ``chunk_key_env``, as one tar stream without."""
    return {
        "name": name,
        "kind": "faiss",
        "cadence": "daily",
        "owner": "team:ml",
        "index": str(folder / "index.faiss"),
        "id_mapping": str(folder / "ids.json"),
        "document_store": str(folder / "docstore.jsonl"),
        "embedding_model": {"name": "bench", "version": "1"},
        **({"chunk_key": f"env:{chunk_key_env}"} if chunk_key_env else {}),
        **extra,
    }


def reference_backup(index: Path, out: Path, recipient: str, work: Path) -> dict[str, float]:
    """write_index from a loaded index (its own process; the load is not counted), then
    zstd -3 -T2 | age to a file."""
    written = work / "written.faiss"
    probe = subprocess.run(
        [PYTHON, "-c", REFERENCE, str(index), str(written)],
        capture_output=True,
        text=True,
        check=True,
    )
    write_seconds = float(probe.stdout.strip())
    pipe = timed(["sh", "-c", f"zstd -q -3 -T2 -c '{written}' | age -r {recipient} > '{out}'"])
    written.unlink()
    return {
        "seconds": write_seconds + pipe["seconds"],
        "write_index_seconds": write_seconds,
        "cpu": pipe["cpu"],
        "rss_mb": pipe["rss_mb"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="32 MB flat, a small IVF index")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--stream", action="store_true", help="tar streams, not the blob layer")
    args = parser.parse_args()
    os.environ[CHUNK_KEY_ENV] = "bench-faiss-chunk-key-0123456789"
    for tool in ("zstd", "age", "age-keygen"):
        if shutil.which(tool) is None:
            print(f"{tool} is missing: apt-get install age zstd")
            return 0
    flat_mb = 32 if args.quick else 256
    ivf_vectors, ivf_lists = (20_000, 256) if args.quick else (200_000, 1024)
    work = Path(tempfile.mkdtemp(prefix="bench-faiss-", dir=args.workdir))
    results: dict[str, dict] = {"machine": basic_facts(), "load_before": load_average()}
    try:
        key = work / "age.key"
        subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
        recipient = next(
            line.split(": ", 1)[1]
            for line in key.read_text().splitlines()
            if line.startswith("# public key")
        )
        flat_dir, ivf_dir = work / "flat", work / "ivf"
        for folder in (flat_dir, ivf_dir):
            folder.mkdir()
        write_flat(flat_dir / "index.faiss", flat_mb)
        sidecars(flat_dir, flat_mb * MB // 1024)
        write_ivf(ivf_dir / "index.faiss", ivf_vectors, ivf_lists, seed=2)
        sidecars(ivf_dir, ivf_vectors)

        plan = work / "spark_backup.yaml"
        plan.write_text(
            yaml.safe_dump(
                {
                    "encryption": {"recipients": [recipient], "identity_file": str(key)},
                    "stores": [{"name": "local", "kind": "local", "path": str(work / "store")}],
                    "sources": [
                        faiss_source("flat", flat_dir, None if args.stream else CHUNK_KEY_ENV),
                        faiss_source(
                            "ivf",
                            ivf_dir,
                            None if args.stream else CHUNK_KEY_ENV,
                            probes={"nprobe": 16},
                        ),
                    ],
                },
                sort_keys=False,
            )
        )
        base = [*SPARK_BACKUP, "--plan", str(plan)]
        rows = []

        def measure(name: str, folder: Path) -> None:
            size = sum(f.stat().st_size for f in folder.iterdir())
            index_size = (folder / "index.faiss").stat().st_size
            ours = timed([*base, "backup", name])
            ref = reference_backup(
                folder / "index.faiss", work / f"{name}.ref.age", recipient, work
            )
            restored = work / f"restored-{name}"
            listed = subprocess.run(
                [*base, "list", name, "--json"], capture_output=True, text=True, check=True
            )
            copy = json.loads(listed.stdout)[-1]
            copy_id = copy["id"]
            # The copy's own time (snapshot, probes, tar, zstd, age, store), without the
            # command's start-up.
            own = (
                dt.datetime.fromisoformat(copy["finished_at"])
                - dt.datetime.fromisoformat(copy["started_at"])
            ).total_seconds()
            restore = timed([*base, "restore", copy_id, "--to", str(restored)])
            ref_restore = timed(
                [
                    "sh",
                    "-c",
                    f"age -d -i '{key}' '{work / f'{name}.ref.age'}' | zstd -q -d > '{work / 'r.faiss'}'",
                ]
            )
            drill = timed([*base, "drill", name])
            shutil.rmtree(restored)
            (work / "r.faiss").unlink()
            rows.append(
                {
                    "index": name,
                    "index_mb": index_size / MB,
                    "snapshot_mb": size / MB,
                    "backup": ours,
                    "reference_backup": ref,
                    "backup_mb_s": size / MB / ours["seconds"],
                    "copy_seconds": own,
                    "copy_mb_s": size / MB / own,
                    "reference_mb_s": index_size / MB / ref["seconds"],
                    "ratio": (size / ours["seconds"]) / (index_size / ref["seconds"]),
                    "copy_ratio": (size / own) / (index_size / ref["seconds"]),
                    "restore": restore,
                    "reference_restore": ref_restore,
                    "drill": drill,
                }
            )

        measure("flat", flat_dir)
        measure("ivf", ivf_dir)

        def second_version(change) -> dict:
            """The bytes the IVF source's next snapshot adds to the store after ``change``."""
            before = sum(f.stat().st_size for f in (work / "store").rglob("*") if f.is_file())
            change()
            run = timed([*base, "backup", "ivf"])
            after = sum(f.stat().st_size for f in (work / "store").rglob("*") if f.is_file())
            return {
                "backup": run,
                "bytes_added_mb": (after - before) / MB,
                "index_mb": (ivf_dir / "index.faiss").stat().st_size / MB,
            }

        results["grown_ivf"] = second_version(lambda: grow_ivf(ivf_dir / "index.faiss", 0.05))
        results["retrained_ivf"] = second_version(
            lambda: write_ivf(ivf_dir / "index.faiss", ivf_vectors, ivf_lists, seed=3)
        )
        results["rows"] = rows
        results["load_after"] = load_average()
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {results['machine']}")
    print(f"load average before/after: {results['load_before']} / {results['load_after']}")
    header = f"{'index':6} {'what':34} {'s':>7} {'MB/s':>7} {'CPU s':>6} {'RSS MB':>7}"
    print(header)
    print("-" * len(header))
    for row in rows:
        for label, run, rate in (
            ("spark-backup backup", row["backup"], row["backup_mb_s"]),
            (
                "spark-backup: the copy's own time",
                {"seconds": row["copy_seconds"], "cpu": float("nan"), "rss_mb": float("nan")},
                row["copy_mb_s"],
            ),
            ("write_index + zstd -T2 | age (ref)", row["reference_backup"], row["reference_mb_s"]),
            (
                "spark-backup restore",
                row["restore"],
                row["snapshot_mb"] / row["restore"]["seconds"],
            ),
            (
                "age -d | zstd -d",
                row["reference_restore"],
                row["index_mb"] / row["reference_restore"]["seconds"],
            ),
            (
                "spark-backup drill (probes)",
                row["drill"],
                row["snapshot_mb"] / row["drill"]["seconds"],
            ),
        ):
            print(
                f"{row['index']:6} {label:34} {run['seconds']:7.2f} {rate:7.1f} "
                f"{run['cpu']:6.2f} {run['rss_mb']:7.0f}"
            )
        print(
            f"{row['index']:6} snapshot throughput vs reference: whole command "
            f"{100 * row['ratio']:.0f}%, the copy itself {100 * row['copy_ratio']:.0f}% (target "
            f"80%); index {row['index_mb']:.0f} MB, snapshot {row['snapshot_mb']:.0f} MB"
        )
    layout = "tar streams" if args.stream else "blob layer"
    for label, key in (
        ("grown IVF (5% of lists get new vectors)", "grown_ivf"),
        ("re-trained IVF (other vectors)", "retrained_ivf"),
    ):
        r = results[key]
        print(
            f"{label}: second version adds {r['bytes_added_mb']:.1f} MB to the store "
            f"(index {r['index_mb']:.1f} MB; {layout})"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
