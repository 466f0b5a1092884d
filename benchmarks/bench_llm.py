"""Benchmark the llm_artifacts kind (the deduplicating blob layer) beside restic, in one run.

On a generated LoRA adapter in safetensors (fp32, ``--tensors`` tensors, ``--size-mb`` MB in
all, random weights), this measures:

* version 1: a full backup; version 2: the same adapter with ``--changed`` of its tensors
  re-drawn (5% by default), backed up again;
* the bytes version 2 added to the store, against the bytes truly changed (target: at most
  1.2 times);
* backup throughput of version 1 and restore throughput of version 2;
* peak RSS of each operation (each runs in its own process: ``spark-backup`` or ``restic``);

for spark-backup (``spark-backup backup`` / ``restore`` on a local store) and restic
(``restic backup`` / ``restore`` of a local repository, default compression) on the same data.
The first backup and the restore run ``--repeat`` times, interleaved (spark-backup, restic,
spark-backup, ...; a fresh store and repository for each first backup), and the best wall time
of each tool counts, with its CPU seconds beside it: on a shared machine the ratio of two
best-of-N figures from one run is what can be compared. spark-backup runs with its bytecode
compiled (as an installed package has it; ``PYTHONDONTWRITEBYTECODE`` is dropped for it).
It reports and never judges: the exit code is 0 unless a tool failed.

    nice .venv/bin/python benchmarks/bench_llm.py            # 500 MB, 336 tensors, 5% changed
    nice .venv/bin/python benchmarks/bench_llm.py --size-mb 2000 --repeat 1   # RSS at 2 GB
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import basic_facts, first_line, load_average

MB = 1_000_000
ROOT = Path(__file__).resolve().parents[1]
SPARK = str(Path(sys.executable).with_name("spark-backup"))


def write_adapter(model: Path, size_mb: int, tensors: int, seed: int) -> list[tuple[str, int]]:
    """adapter_config.json, tokenizer.json and adapter_model.safetensors; returns the tensors'
    names and sizes. Written tensor by tensor: never the whole file in memory."""
    sys.path.insert(0, str(ROOT))
    model.mkdir(parents=True, exist_ok=True)
    rank = 64
    columns = max(1, size_mb * MB // (tensors * rank * 4))
    names = [
        f"base_model.model.layers.{i // 4}.{'qkvo'[i % 4]}_proj.lora_{'AB'[i % 2]}.weight"
        for i in range(tensors)
    ]
    header: dict = {"__metadata__": {"format": "pt"}}
    size = rank * columns * 4
    for index, name in enumerate(names):
        header[name] = {
            "dtype": "F32",
            "shape": [rank, columns],
            "data_offsets": [index * size, (index + 1) * size],
        }
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    rng = random.Random(seed)
    with open(model / "adapter_model.safetensors", "wb") as out:
        out.write(len(raw).to_bytes(8, "little") + raw)
        for _name in names:
            out.write(rng.randbytes(size))
    (model / "adapter_config.json").write_text(
        json.dumps({"base_model_name_or_path": "bench/base", "r": rank, "peft_type": "LORA"})
    )
    (model / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {}}))
    return [(name, size) for name in names]


def redraw(model: Path, changed: int, seed: int) -> int:
    """Re-draw ``changed`` tensors, spread over the file; returns the bytes truly changed."""
    sys.path.insert(0, str(ROOT))
    from spark_backup.engine.blobs.safetensors import read_header

    path = model / "adapter_model.safetensors"
    rng = random.Random(seed)
    with open(path, "r+b") as handle:
        header = read_header(handle, path.stat().st_size, str(path))
        chosen = rng.sample(header.tensors, changed)
        for tensor in chosen:
            handle.seek(tensor.begin)
            handle.write(rng.randbytes(tensor.end - tensor.begin))
    return sum(t.end - t.begin for t in chosen)


LAST_CPU = [0.0]  # CPU seconds (user + system) of the last measured command


def measured_rss(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """Run ``command``: (seconds, peak RSS in MB of that one process (``wait4``), stdout); its
    CPU seconds in ``LAST_CPU``."""
    os.sync()
    environ = {**os.environ, **(env or {})}
    if command[0] == SPARK:
        environ.pop("PYTHONDONTWRITEBYTECODE", None)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(command, env=environ, stdout=out, stderr=err)
        _pid, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        LAST_CPU[0] = usage.ru_utime + usage.ru_stime
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({proc.returncode}):\n{err.read().strip()}"
            )
        return seconds, usage.ru_maxrss * 1024 / MB, out.read()


def _best(figures: dict, what: str, seconds: float, rss: float) -> None:
    """Keep the fastest round's wall and CPU seconds, and the highest peak RSS of all rounds."""
    if seconds < figures.get(f"{what}_seconds", float("inf")):
        figures[f"{what}_seconds"] = seconds
        figures[f"{what}_cpu_seconds"] = LAST_CPU[0]
    figures[f"{what}_rss_mb"] = max(rss, figures.get(f"{what}_rss_mb", 0.0))


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size-mb", type=int, default=500)
    parser.add_argument("--tensors", type=int, default=336)
    parser.add_argument("--changed-percent", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of first backup and restore")
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where the work folder is made (/tmp)"
    )
    parser.add_argument("--json", action="store_true", help="figures as JSON")
    args = parser.parse_args()

    # A folder of its own, always removed: a second run in the same --workdir found the first
    # one's key and age-keygen refused to overwrite it.
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-llm-", dir=args.workdir))
    try:
        return run(args, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def run(args: argparse.Namespace, workdir: Path) -> int:
    model = workdir / "adapter"
    tensors = write_adapter(model, args.size_mb, args.tensors, args.seed)
    size = tree_bytes(model)
    changed_count = max(1, round(len(tensors) * args.changed_percent / 100))

    key = workdir / "age.key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(
        ["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True
    ).stdout.strip()
    store = workdir / "store"
    plan = workdir / "plan.yaml"
    plan.write_text(
        json.dumps(
            {
                "encryption": {"recipients": [public], "identity_file": str(key)},
                "stores": [{"name": "local", "kind": "local", "path": str(store)}],
                "sources": [
                    {
                        "name": "adapter",
                        "kind": "llm_artifacts",
                        "cadence": "daily",
                        "owner": "team:bench",
                        "path": str(model),
                        "chunk_key": "env:BENCH_CHUNK_KEY",
                        "retention": {"daily": 5, "weekly": 0, "monthly": 0},
                    }
                ],
            }
        )
    )
    env = {"BENCH_CHUNK_KEY": "bench-chunk-key-0123456789abcdef"}
    restic_repo = workdir / "restic"
    restic_env = {
        "RESTIC_REPOSITORY": str(restic_repo),
        "RESTIC_PASSWORD": "bench",
        "RESTIC_CACHE_DIR": str(workdir / "restic-cache"),
    }
    has_restic = shutil.which("restic") is not None
    figures: dict = {
        "data": {
            "bytes": size,
            "tensors": len(tensors),
            "tensors_redrawn": changed_count,
        },
        "machine": {**basic_facts(), "load_before": load_average()},
        "tools": {"restic": first_line(["restic", "version"]) if has_restic else "not installed"},
    }

    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(ROOT / "spark_backup")], check=False
    )
    ours: dict = {}
    theirs: dict = {}
    for _round in range(args.repeat):
        shutil.rmtree(store, ignore_errors=True)
        shutil.rmtree(workdir / "orchestration_journal", ignore_errors=True)
        seconds, rss, _ = measured_rss(
            [SPARK, "--plan", str(plan), "--no-progress", "backup", "adapter"], env
        )
        _best(ours, "v1_backup", seconds, rss)
        ours["v1_store_bytes"] = tree_bytes(store)
        if has_restic:
            shutil.rmtree(restic_repo, ignore_errors=True)
            subprocess.run(
                ["restic", "init"],
                env={**os.environ, **restic_env},
                check=True,
                capture_output=True,
            )
            seconds, rss, _ = measured_rss(["restic", "backup", "--quiet", str(model)], restic_env)
            _best(theirs, "v1_backup", seconds, rss)
            theirs["v1_store_bytes"] = tree_bytes(restic_repo)

    truly_changed = redraw(model, changed_count, args.seed + 1)
    figures["data"]["truly_changed_bytes"] = truly_changed

    seconds, rss, _ = measured_rss(
        [SPARK, "--plan", str(plan), "--no-progress", "backup", "adapter"], env
    )
    ours["v2_backup_seconds"], ours["v2_backup_rss_mb"] = seconds, rss
    ours["v2_added_bytes"] = tree_bytes(store) - ours["v1_store_bytes"]
    versions = json.loads(
        measured_rss([SPARK, "--plan", str(plan), "versions", "adapter", "--json"], env)[2]
    )
    if has_restic:
        seconds, rss, _ = measured_rss(["restic", "backup", "--quiet", str(model)], restic_env)
        theirs["v2_backup_seconds"], theirs["v2_backup_rss_mb"] = seconds, rss
        theirs["v2_added_bytes"] = tree_bytes(restic_repo) - theirs["v1_store_bytes"]
    for _round in range(args.repeat):
        target = workdir / "restore-ours"
        command = [SPARK, "--plan", str(plan), "--no-progress", "restore", versions[-1]["id"]]
        seconds, rss, _ = measured_rss([*command, "--to", str(target)], env)
        _best(ours, "v2_restore", seconds, rss)
        assert tree_bytes(target) == size
        shutil.rmtree(target)
        if has_restic:
            target = workdir / "restore-restic"
            seconds, rss, _ = measured_rss(
                ["restic", "restore", "latest", "--target", str(target)], restic_env
            )
            _best(theirs, "v2_restore", seconds, rss)
            shutil.rmtree(target)

    for name, tool in (("spark-backup", ours), ("restic", theirs if has_restic else None)):
        if tool is None:
            continue
        tool["v1_backup_mb_s"] = size / MB / tool["v1_backup_seconds"]
        tool["v2_restore_mb_s"] = size / MB / tool["v2_restore_seconds"]
        tool["v2_added_over_changed"] = tool["v2_added_bytes"] / truly_changed
        figures[name] = tool
    figures["machine"]["load_after"] = load_average()

    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(
        f"adapter: {size / MB:.1f} MB, {len(tensors)} fp32 tensors; v2 re-drew {changed_count} "
        f"({truly_changed / MB:.1f} MB truly changed)"
    )
    print(
        f"machine: {figures['machine']['nproc']} CPUs, load {figures['machine']['load_before']} -> {figures['machine']['load_after']}"
    )
    print(
        f"{'tool':<13} {'v2 adds MB':>10} {'x changed':>9} {'backup MB/s':>11} "
        f"{'restore MB/s':>12} {'backup RSS MB':>13} {'restore RSS MB':>14}"
    )
    for name in ("spark-backup", "restic"):
        if name not in figures:
            continue
        t = figures[name]
        print(
            f"{name:<13} {t['v2_added_bytes'] / MB:>10.1f} {t['v2_added_over_changed']:>9.2f} "
            f"{t['v1_backup_mb_s']:>11.1f} {t['v2_restore_mb_s']:>12.1f} "
            f"{max(t['v1_backup_rss_mb'], t['v2_backup_rss_mb']):>13.1f} {t['v2_restore_rss_mb']:>14.1f}"
        )
    print(
        f"best of {args.repeat}, wall s (CPU s): first backup "
        + ", ".join(
            f"{n} {figures[n]['v1_backup_seconds']:.1f} ({figures[n]['v1_backup_cpu_seconds']:.1f})"
            for n in ("spark-backup", "restic")
            if n in figures
        )
        + "; restore "
        + ", ".join(
            f"{n} {figures[n]['v2_restore_seconds']:.1f} ({figures[n]['v2_restore_cpu_seconds']:.1f})"
            for n in ("spark-backup", "restic")
            if n in figures
        )
    )
    ratio = ours["v2_added_over_changed"]
    print(
        f"target: v2 adds <= 1.2x the changed bytes: {'met' if ratio <= 1.2 else 'MISS'} ({ratio:.2f}x)"
    )
    if "restic" in figures:
        r = figures["restic"]
        backup = ours["v1_backup_mb_s"] / r["v1_backup_mb_s"]
        restore = ours["v2_restore_mb_s"] / r["v2_restore_mb_s"]
        print(
            f"target: first backup >= 2x restic: {'met' if backup >= 2 else 'MISS'} ({backup:.2f}x)"
        )
        print(f"target: restore >= restic: {'met' if restore >= 1 else 'MISS'} ({restore:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
