"""Benchmark spark-backup's config_archive backup and restore against the plain shell pipeline.

On the same generated data, in one run, this measures

* ``BackupService.backup`` / ``BackupService.restore`` (each in its own Python subprocess, so its
  peak RSS is that process's alone), and
* ``tar -c | zstd -3 -T2 | age -r KEY > OUT`` and ``age -d -i KEY OUT | zstd -d | tar -x``,

for a tree of small configuration-like text files and for one large binary file resembling
model weights. Every figure is the best (fastest) of ``--repeat`` runs; peak RSS is the largest
seen over all runs. The script always exits 0: it reports, it does not judge (MISS lines say
where a target was not met).

Run with the project's venv, from anywhere::

    .venv/bin/python benchmarks/bench_config_archive.py
    .venv/bin/python benchmarks/bench_config_archive.py --only file --rss-check-gb 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from machine import basic_facts, first_line, load_average

MB = 1_000_000  # throughput and sizes are reported in decimal megabytes
MIB = 1 << 20
TARGET_RATIO = (
    0.90  # spark-backup must reach this share of the shell pipeline's throughput (issue 12)
)
TARGET_RSS_MB = 256.0  # and stay under this peak RSS
COMPRESSION_LEVEL = 3
COMPRESSION_THREADS = 2
SOURCE_NAMES = {"tree": "bench_tree", "file": "bench_file", "rss": "bench_rss"}


# --- data generation ---------------------------------------------------------------------------

_WORD_TEXT = (
    "server cluster node gpu driver fabric manager runtime container kube proxy dns route "
    "gateway peer tunnel cert key auth token timeout retry interval port host address pool "
    "replica volume mount storage cache log level metrics exporter scrape target rule alert "
    "policy network subnet mask vlan bond mtu queue worker thread limit memory cpu quota "
    "namespace service ingress egress secret config map label selector annotation image tag"
)
_WORDS = _WORD_TEXT.split()


def _value(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        return str(rng.randrange(0, 65536))
    if kind == 1:
        return rng.choice(("true", "false", "yes", "no", "on", "off"))
    if kind == 2:
        return f"{rng.randrange(10, 250)}.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
    if kind == 3:
        return "/" + "/".join(rng.choices(_WORDS, k=rng.randrange(2, 5)))
    if kind == 4:
        return f"{rng.getrandbits(64):016x}"
    return "-".join(rng.choices(_WORDS, k=rng.randrange(1, 4)))


def _key(rng: random.Random) -> str:
    return "_".join(rng.choices(_WORDS, k=rng.randrange(1, 4)))


def _line_pools(rng: random.Random, size: int) -> dict[str, list[str]]:
    """Pre-made lines per format; files are assembled from these, which keeps generation fast
    and gives the redundancy real configuration trees have (repeated keys, similar values)."""
    ini, yaml, json_lines = [], [], []
    for _ in range(size):
        key, value = _key(rng), _value(rng)
        ini.append(f"{key} = {value}\n" if rng.random() < 0.9 else f"# {key} {value}\n")
        indent = "  " * rng.randrange(0, 4)
        yaml.append(f"{indent}{key}: {value}\n" if rng.random() < 0.85 else f"{indent}- {value}\n")
        json_lines.append(f'    "{key}": "{value}",\n')
    return {"conf": ini, "yaml": yaml, "json": json_lines}


def generate_tree(root: Path, files: int, seed: int, file_size: int = 8000) -> int:
    """Write ``files`` text files of about ``file_size`` bytes in a few hundred directories;
    return the bytes written. Deterministic for a given seed."""
    rng = random.Random(seed)
    pools = _line_pools(rng, 20_000)
    line_size = {fmt: sum(map(len, lines)) / len(lines) for fmt, lines in pools.items()}
    directories = max(1, min(400, files // 50))
    top = max(1, round(directories**0.5))
    total = 0
    for index in range(files):
        d = index % directories
        folder = root / f"{_WORDS[d % top % len(_WORDS)]}-{d % top:02d}" / f"conf.d-{d // top:03d}"
        if index < directories:
            folder.mkdir(parents=True, exist_ok=True)
        fmt = ("conf", "yaml", "json")[index % 3]
        # A few lines per file are fresh (ids, serials; 33 bytes each) so no two files match.
        lines = rng.choices(pools[fmt], k=max(1, int((file_size - 4 * 33) / line_size[fmt])))
        fresh = [f"id_{n} = {rng.getrandbits(96):024x}\n" for n in range(4)]
        body = "".join(lines[:8] + fresh + lines[8:])
        if fmt == "json":
            body = '{\n    "_generated": true,\n' + body + '    "_end": null\n}\n'
        data = body.encode()
        (folder / f"{fmt}-{index:05d}.{fmt}").write_bytes(data)
        total += len(data)
    return total


def weights_chunks(total_bytes: int, seed: int, chunk: int = 8 * MIB) -> Iterator[bytes]:
    """Bytes resembling fp16 model weights, chunk by chunk (never all in memory).

    Low bytes (mantissa) are uniform random; high bytes (sign, exponent) take a few skewed values
    as in trained weights; and 1/8 of every chunk repeats a block from earlier in the same chunk
    (tied or padded tensors), within zstd's window. zstd -3 gains a little, not much.
    """
    rng = random.Random(seed)
    # Map 256 byte values onto 12 exponent-like values with a skewed distribution.
    weights = [48, 40, 30, 26, 22, 18, 16, 14, 12, 12, 10, 8]
    common = [0x2C, 0xAC, 0x30, 0xB0, 0x28, 0xA8, 0x34, 0xB4, 0x24, 0xA4, 0x38, 0xB8]
    table = bytes(v for v, w in zip(common, weights, strict=True) for _ in range(w))
    assert len(table) == 256
    remaining = total_bytes
    while remaining > 0:
        size = min(chunk, remaining)
        out = bytearray(size)
        fresh = size - size // 8
        half = fresh // 2
        out[0 : 2 * half : 2] = rng.randbytes(half)
        out[1 : 2 * half : 2] = rng.randbytes(half).translate(table)
        repeat = size - 2 * half
        if repeat:
            start = rng.randrange(0, max(1, 2 * half - repeat))
            out[2 * half :] = out[start : start + repeat]
        yield bytes(out)
        remaining -= size


def generate_file(path: Path, size_bytes: int, seed: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(path, "wb") as handle:
        for block in weights_chunks(size_bytes, seed):
            handle.write(block)
            written += len(block)
    return written


def tree_size(root: Path) -> tuple[int, int]:
    """(regular files, bytes) under root."""
    files = size = 0
    for directory, _dirs, names in os.walk(root):
        for name in names:
            st = os.lstat(os.path.join(directory, name))
            files += 1
            size += st.st_size
    return files, size


# --- plan, keys ----------------------------------------------------------------------------------


def make_key(workdir: Path) -> tuple[Path, str]:
    key = workdir / "age.key"
    subprocess.run(["age-keygen", "-o", str(key)], check=True, capture_output=True)
    public = subprocess.run(
        ["age-keygen", "-y", str(key)], check=True, capture_output=True, text=True
    ).stdout.strip()
    return key, public


def write_plan(workdir: Path, dataset: str, data_path: Path, public: str, key: Path) -> Path:
    plan = {
        "version": 1,
        "defaults": {
            "store": "local",
            "compression": {"level": COMPRESSION_LEVEL, "threads": COMPRESSION_THREADS},
        },
        "encryption": {"recipients": [public], "identity_file": str(key)},
        "stores": [{"name": "local", "kind": "local", "path": str(workdir / f"store-{dataset}")}],
        "sources": [
            {
                "name": SOURCE_NAMES[dataset],
                "kind": "config_archive",
                "cadence": "daily",
                "owner": "team:bench",
                "paths": [str(data_path)],
            }
        ],
    }
    path = workdir / f"plan-{dataset}.yaml"
    # JSON is YAML; no need to import a YAML writer here.
    path.write_text(json.dumps(plan, indent=2) + "\n", encoding="utf-8")
    return path


# --- the measured operations ---------------------------------------------------------------------


def child_main(spec_json: str) -> None:
    """Runs in the measured subprocess: one backup or restore, then its own figures as JSON."""
    spec = json.loads(spec_json)
    from spark_backup.service import BackupService  # imported here: not part of the parent

    started = time.perf_counter()
    if spec["op"] == "backup":
        service = BackupService.from_path(spec["plan"])
        [manifest] = service.backup(spec["source"])
        result = {"copy_id": manifest.id, "stored_bytes": manifest.stored.bytes}
    else:
        with restore_worker() as worker:
            # As `spark-backup restore` does: the worker starts before the plan is read.
            service = BackupService.from_path(spec["plan"])
            summary = service.restore(
                spec["copy_id"], Path(spec["target"]), **({"worker": worker} if worker else {})
            )
        result = {"files": summary["files"], "bytes": summary["bytes"]}
    seconds = time.perf_counter() - started
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"seconds": seconds, "rss_kib": own, **result}))


def restore_worker():
    """The age worker `spark-backup restore` starts before it reads the plan, as a context
    manager; a ``nullcontext`` for a version (``--baseline``) whose restore starts its own."""
    import inspect
    from contextlib import nullcontext

    from spark_backup.engine.age_worker import AgeWorker
    from spark_backup.service import BackupService

    if "worker" not in inspect.signature(BackupService.restore).parameters:
        return nullcontext()
    worker = AgeWorker()
    worker.start()
    return worker


@dataclass
class Run:
    seconds: float  # the operation, timed inside the child (plan load included, imports not)
    wall: float  # the whole subprocess, interpreter start and imports included
    rss_mb: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # CPU seconds (user + system) of the whole process tree, from wait4: for spark-backup the
    # interpreter start and imports and the age worker included, for the shell every command.
    cpu: float = 0.0


def run_timed(args: list[str], failure: str):
    """``bench_postgres.run_timed`` (wall and CPU seconds of the process tree from ``wait4``,
    stdout captured); a failure is ``failure`` and the command's stderr. Imported here, in the
    parent: the child (``--child``, possibly another version's interpreter) never needs it."""
    from bench_postgres import CommandFailed
    from bench_postgres import run_timed as timed

    try:
        return timed(args, capture=True)
    except CommandFailed as failed:
        raise RuntimeError(f"{failure}:\n{failed.stderr.strip()}") from None


def settle() -> None:
    """Untimed: flush the dirty pages earlier runs left, so that their write-back is not billed
    to the next run."""
    os.sync()


def run_ours(python: str, spec: dict[str, Any], baseline: Path | None = None) -> Run:
    """One backup or restore in a child; with ``baseline``, by the ``spark_backup`` package in
    that folder (put ahead of the installed one with ``PYTHONPATH``)."""
    settle()
    version = ["env", f"PYTHONPATH={baseline}"] if baseline else []
    timed = run_timed(
        [*version, python, os.path.abspath(__file__), "--child", json.dumps(spec)],
        f"spark-backup {spec['op']} failed" + (" (baseline)" if baseline else ""),
    )
    out = json.loads(timed.stdout.strip().splitlines()[-1])
    return Run(
        out.pop("seconds"), timed.seconds, out.pop("rss_kib") * 1024 / MB, out, timed.cpu_seconds
    )


def run_shell(command: str) -> Run:
    settle()
    timed = run_timed(
        ["bash", "-o", "pipefail", "-c", command], f"shell pipeline failed ({command})"
    )
    return Run(timed.seconds, timed.seconds, cpu=timed.cpu_seconds)


def fresh_dir(path: Path) -> Path:
    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    return path


@dataclass
class Measurement:
    dataset: str
    operation: str
    input_bytes: int
    ours: list[Run] = field(default_factory=list)
    shell: list[Run] = field(default_factory=list)
    base: list[Run] = field(default_factory=list)  # --baseline's runs, in the same rounds

    @property
    def ours_best(self) -> float:
        return min(r.seconds for r in self.ours)

    @property
    def ours_best_wall(self) -> float:
        return min(r.wall for r in self.ours)

    @property
    def shell_best(self) -> float:
        return min(r.seconds for r in self.shell)

    @property
    def ours_mbps(self) -> float:
        return self.input_bytes / MB / self.ours_best

    @property
    def ours_wall_mbps(self) -> float:
        return self.input_bytes / MB / self.ours_best_wall

    @property
    def shell_mbps(self) -> float:
        return self.input_bytes / MB / self.shell_best

    @property
    def ratio(self) -> float:
        return self.ours_mbps / self.shell_mbps

    @property
    def ours_cpu(self) -> float:
        return min(r.cpu for r in self.ours)

    @property
    def shell_cpu(self) -> float:
        return min(r.cpu for r in self.shell)

    @property
    def rss_mb(self) -> float:
        return max(r.rss_mb or 0.0 for r in self.ours)

    @property
    def misses(self) -> list[str]:
        found = []
        if self.ratio < TARGET_RATIO:
            found.append(
                f"throughput {self.ratio:.0%} of the shell pipeline (target >= {TARGET_RATIO:.0%})"
            )
        if self.rss_mb > TARGET_RSS_MB:
            found.append(f"peak RSS {self.rss_mb:.0f} MB (target <= {TARGET_RSS_MB:.0f} MB)")
        return found

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "operation": self.operation,
            "input_bytes": self.input_bytes,
            "spark_backup": {
                "best_seconds": round(self.ours_best, 4),
                "best_wall_seconds_incl_startup": round(self.ours_best_wall, 4),
                "mb_per_s": round(self.ours_mbps, 2),
                "mb_per_s_incl_startup": round(self.ours_wall_mbps, 2),
                "peak_rss_mb": round(self.rss_mb, 1),
                "best_cpu_seconds": round(self.ours_cpu, 3),
                "runs": [asdict(r) for r in self.ours],
            },
            "shell": {
                "best_seconds": round(self.shell_best, 4),
                "mb_per_s": round(self.shell_mbps, 2),
                "runs": [round(r.seconds, 4) for r in self.shell],
                "best_cpu_seconds": round(self.shell_cpu, 3),
                "cpu_runs": [round(r.cpu, 3) for r in self.shell],
            },
            "ratio": round(self.ratio, 4),
            **({"baseline": self.baseline_json()} if self.base else {}),
            "pass": not self.misses,
            "misses": self.misses,
        }

    def baseline_ratio(self) -> float:
        return self.shell_best / min(r.seconds for r in self.base)

    def round_ratios(self, runs: list[Run]) -> list[float]:
        """Throughput against the pipeline of the same round, round by round."""
        return [shell.seconds / run.seconds for run, shell in zip(runs, self.shell, strict=True)]

    def baseline_json(self) -> dict[str, Any]:
        return {
            "best_seconds": round(min(r.seconds for r in self.base), 4),
            "ratio": round(self.baseline_ratio(), 4),
            "round_ratios": [round(r, 4) for r in self.round_ratios(self.base)],
            "best_cpu_seconds": round(min(r.cpu for r in self.base), 3),
            "runs": [asdict(r) for r in self.base],
        }


def bench_dataset(
    dataset: str,
    data_path: Path,
    input_bytes: int,
    *,
    workdir: Path,
    plan: Path,
    key: Path,
    public: str,
    repeat: int,
    python: str,
    baseline: Path | None = None,
) -> list[Measurement]:
    backup = Measurement(dataset, "backup", input_bytes)
    restore = Measurement(dataset, "restore", input_bytes)
    store = workdir / f"store-{dataset}"
    shell_out = workdir / f"shell-{dataset}.tar.zst.age"
    ours_target = workdir / f"restore-ours-{dataset}"
    shell_target = workdir / f"restore-shell-{dataset}"
    q = shlex.quote
    backup_cmd = (
        f"tar -c -C {q(str(data_path.parent))} {q(data_path.name)}"
        f" | zstd -{COMPRESSION_LEVEL} -T{COMPRESSION_THREADS} -q"
        f" | age -r {q(public)} > {q(str(shell_out))}"
    )
    restore_cmd = (
        f"age -d -i {q(str(key))} {q(str(shell_out))}"
        f" | zstd -d -q"
        f" | tar -x -C {q(str(shell_target))}"
    )
    sides = ["ours", "shell", *(["base"] if baseline else [])]
    for i in range(repeat):
        # Each round starts with another side (rotating, so no side always follows another).
        order = sides[i % len(sides) :] + sides[: i % len(sides)]
        # Untimed: a clean store and no previous output, so every run writes the same.
        shutil.rmtree(store, ignore_errors=True)
        shell_out.unlink(missing_ok=True)

        copy_ids: dict[str, str] = {}
        for side in order:
            if side == "shell":
                backup.shell.append(run_shell(backup_cmd))
                continue
            version = baseline if side == "base" else None
            run = run_ours(
                python,
                {"op": "backup", "plan": str(plan), "source": SOURCE_NAMES[dataset]},
                version,
            )
            copy_ids[side] = run.extra["copy_id"]
            (backup.base if version else backup.ours).append(run)

        for side in order:
            if side != "shell":
                version = baseline if side == "base" else None
                fresh_dir(ours_target)
                spec = {"op": "restore", "plan": str(plan), "copy_id": copy_ids[side]}
                run = run_ours(python, {**spec, "target": str(ours_target)}, version)
                (restore.base if version else restore.ours).append(run)
                if run.extra["bytes"] != input_bytes:
                    raise RuntimeError(
                        f"{dataset}: spark-backup{' (baseline)' if version else ''} restored "
                        f"{run.extra['bytes']} bytes, expected {input_bytes}"
                    )
            else:
                fresh_dir(shell_target)
                restore.shell.append(run_shell(restore_cmd))
                restored = tree_size(shell_target)[1]
                if restored != input_bytes:
                    raise RuntimeError(
                        f"{dataset}: shell restored {restored} bytes, expected {input_bytes}"
                    )
        # Untimed: restore targets go before the next repeat.
        shutil.rmtree(ours_target, ignore_errors=True)
        shutil.rmtree(shell_target, ignore_errors=True)
        print(
            f"  [{dataset} {i + 1}/{repeat}] "
            f"backup ours {backup.ours[-1].seconds:.2f}s ({backup.ours[-1].cpu:.2f} CPU s) "
            f"shell {backup.shell[-1].seconds:.2f}s ({backup.shell[-1].cpu:.2f}) | "
            f"restore ours {restore.ours[-1].seconds:.2f}s ({restore.ours[-1].cpu:.2f} CPU s) "
            f"shell {restore.shell[-1].seconds:.2f}s ({restore.shell[-1].cpu:.2f})"
            + (
                f" | baseline backup {backup.base[-1].seconds:.2f}s ({backup.base[-1].cpu:.2f}) "
                f"restore {restore.base[-1].seconds:.2f}s ({restore.base[-1].cpu:.2f})"
                if baseline
                else ""
            ),
            flush=True,
        )
    shutil.rmtree(store, ignore_errors=True)
    shell_out.unlink(missing_ok=True)
    return [backup, restore]


def rss_check(
    workdir: Path, gigabytes: float, seed: int, public: str, key: Path, python: str
) -> dict[str, Any]:
    """Back up and restore one file of ``gigabytes`` GB once; report peak RSS only."""
    data = workdir / "data-rss" / "weights-large.bin"
    size = int(gigabytes * 1000 * MB)
    started = time.perf_counter()
    generate_file(data, size, seed + 2)
    print(f"  generated {size / MB:,.0f} MB in {time.perf_counter() - started:.1f}s", flush=True)
    plan = write_plan(workdir, "rss", data, public, key)
    target = fresh_dir(workdir / "restore-rss")
    try:
        backup = run_ours(
            python, {"op": "backup", "plan": str(plan), "source": SOURCE_NAMES["rss"]}
        )
        spec = {"op": "restore", "plan": str(plan), "copy_id": backup.extra["copy_id"]}
        restore = run_ours(python, {**spec, "target": str(target)})
    finally:
        shutil.rmtree(data.parent, ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.rmtree(workdir / "store-rss", ignore_errors=True)
    return {
        "input_bytes": size,
        "backup_peak_rss_mb": round(backup.rss_mb or 0, 1),
        "restore_peak_rss_mb": round(restore.rss_mb or 0, 1),
        "backup_seconds": round(backup.seconds, 2),
        "restore_seconds": round(restore.seconds, 2),
    }


# --- reporting -------------------------------------------------------------------------------------


def machine_facts(python: str, workdir: Path) -> dict[str, Any]:
    versions = subprocess.run(
        [
            python,
            "-c",
            "import importlib.metadata as m, platform, zstandard;"
            "print(platform.python_version(), m.version('spark-backup'), m.version('zstandard'),"
            " '.'.join(map(str, zstandard.ZSTD_VERSION)), m.version('pyrage'))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    usage = shutil.disk_usage(workdir)
    return {
        **basic_facts(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": versions[0],
        "spark_backup": versions[1],
        "zstandard": f"{versions[2]} (libzstd {versions[3]})",
        "pyrage": versions[4],
        "tar": first_line(["tar", "--version"]),
        "zstd": first_line(["zstd", "--version"]),
        "age": first_line(["age", "--version"]),
        "load_average": load_average(),
        "workdir": str(workdir),
        "workdir_free_gb": round(usage.free / 1e9, 1),
    }


def print_table(measurements: list[Measurement]) -> None:
    header = (
        f"{'dataset':<8} {'operation':<9} {'ours MB/s':>10} {'shell MB/s':>10} {'ratio':>7} "
        f"{'target':>7} {'peak RSS MB':>11} {'RSS target':>10} {'result':>6}   "
        f"{'ours MB/s incl. startup':>23} {'CPU s ours':>10} {'CPU s shell':>11}"
    )
    print(header)
    print("-" * len(header))
    for m in measurements:
        print(
            f"{m.dataset:<8} {m.operation:<9} {m.ours_mbps:>10.1f} {m.shell_mbps:>10.1f} "
            f"{m.ratio:>7.1%} {f'>= {TARGET_RATIO:.0%}':>7} {m.rss_mb:>11.1f} {'<= 256':>10} "
            f"{'PASS' if not m.misses else 'MISS':>6}   {m.ours_wall_mbps:>23.1f} "
            f"{m.ours_cpu:>10.2f} {m.shell_cpu:>11.2f}"
        )


# --- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, help="parent folder for the scratch data (/tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch data at the end")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best kept)")
    parser.add_argument("--big-file-mb", type=int, default=500, help="size of the binary file")
    parser.add_argument("--tree-files", type=int, default=20000, help="files in the text tree")
    parser.add_argument("--only", choices=("tree", "file", "all"), default="all")
    parser.add_argument("--seed", type=int, default=20240601, help="seed for the generated data")
    parser.add_argument(
        "--rss-check-gb",
        type=float,
        default=0,
        help="also back up and restore one file of this many GB, reporting peak RSS only",
    )
    parser.add_argument("--json", type=Path, help="write all figures to this file")
    parser.add_argument(
        "--python", default=sys.executable, help="interpreter with spark-backup installed"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        help="a folder holding another spark_backup package (git archive ... | tar -x), run in "
        "the same rounds",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.baseline:
        args.baseline = args.baseline.resolve()
        if not (args.baseline / "spark_backup" / "__init__.py").exists():
            parser.error(f"{args.baseline}: no spark_backup package in it")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child_main(args.child)
        return 0
    for tool in ("tar", "zstd", "age", "age-keygen", "bash"):
        if not shutil.which(tool):
            print(f"error: {tool} is not on PATH", file=sys.stderr)
            return 0
    parent = args.workdir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    # Always a fresh folder of our own, so cleaning up never touches anything else.
    workdir = Path(tempfile.mkdtemp(prefix="spark-bench-", dir=parent))
    try:
        run_benchmark(args, workdir)
    finally:
        if args.keep:
            print(f"\nscratch data kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


def run_benchmark(args: argparse.Namespace, workdir: Path) -> None:
    facts = machine_facts(args.python, workdir)
    print("machine")
    for name, value in facts.items():
        print(f"  {name:<16} {value}")
    print(
        f"settings: zstd level {COMPRESSION_LEVEL}, {COMPRESSION_THREADS} threads; "
        f"best of {args.repeat}; seed {args.seed}\n"
    )
    key, public = make_key(workdir)
    datasets = ("tree", "file") if args.only == "all" else (args.only,)
    measurements: list[Measurement] = []
    generated: dict[str, Any] = {}
    for dataset in datasets:
        started = time.perf_counter()
        if dataset == "tree":
            data = workdir / "data-tree" / "config-tree"
            generate_tree(data, args.tree_files, args.seed)
        else:
            data = workdir / "data-file" / "weights.bin"
            generate_file(data, args.big_file_mb * MB, args.seed + 1)
        files, size = tree_size(data) if data.is_dir() else (1, data.stat().st_size)
        seconds = time.perf_counter() - started
        generated[dataset] = {"files": files, "bytes": size, "generate_seconds": round(seconds, 2)}
        print(f"{dataset}: generated {files:,} files, {size / MB:,.1f} MB in {seconds:.1f}s")
        plan = write_plan(workdir, dataset, data, public, key)
        try:
            measurements += bench_dataset(
                dataset,
                data,
                size,
                workdir=workdir,
                plan=plan,
                key=key,
                public=public,
                repeat=args.repeat,
                python=args.python,
                baseline=args.baseline,
            )
        finally:
            if not args.keep:
                shutil.rmtree(data.parent, ignore_errors=True)

    rss: dict[str, Any] | None = None
    if args.rss_check_gb > 0:
        print(f"rss check: {args.rss_check_gb:g} GB single file")
        rss = rss_check(workdir, args.rss_check_gb, args.seed, public, key, args.python)

    print()
    print_table(measurements)
    if args.baseline:
        print(f"\nbaseline ({args.baseline}), in the same rounds:")
        for m in measurements:
            ours = ", ".join(f"{r:.0%}" for r in m.round_ratios(m.ours))
            base = ", ".join(f"{r:.0%}" for r in m.round_ratios(m.base))
            print(
                f"  {m.dataset} {m.operation}: this version {m.ratio:.1%} (per round {ours}), "
                f"baseline {m.baseline_ratio():.1%} (per round {base}); CPU s "
                f"{m.ours_cpu:.2f} against {min(r.cpu for r in m.base):.2f}"
            )
    print(
        "\nours MB/s = input bytes / time of BackupService.from_path + backup/restore in the child"
        "\n(interpreter start and imports excluded; the last column includes them)."
    )
    if rss:
        print(
            f"\nrss check ({rss['input_bytes'] / MB:,.0f} MB file): backup peak RSS "
            f"{rss['backup_peak_rss_mb']:.1f} MB ({rss['backup_seconds']:.1f}s), restore peak RSS "
            f"{rss['restore_peak_rss_mb']:.1f} MB ({rss['restore_seconds']:.1f}s)"
        )
        for op in ("backup", "restore"):
            if rss[f"{op}_peak_rss_mb"] > TARGET_RSS_MB:
                print(f"MISS rss-check {op}: peak RSS above {TARGET_RSS_MB:.0f} MB")
    print(f"\nload average at the end: {load_average()} (at the start: {facts['load_average']})")
    misses = [(m, text) for m in measurements for text in m.misses]
    print()
    for m, text in misses:
        print(f"MISS {m.dataset} {m.operation}: {text}")
    if not misses:
        print("all rows PASS")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": facts,
                    "settings": {
                        "repeat": args.repeat,
                        "seed": args.seed,
                        "zstd_level": COMPRESSION_LEVEL,
                        "zstd_threads": COMPRESSION_THREADS,
                        "target_ratio": TARGET_RATIO,
                        "target_rss_mb": TARGET_RSS_MB,
                    },
                    "datasets": generated,
                    "results": [m.to_json() for m in measurements],
                    "rss_check": rss,
                },
                indent=2,
            )
            + "\n",
            encoding="utf-8",
        )
        print(f"figures written to {args.json}")


if __name__ == "__main__":
    sys.exit(main())
