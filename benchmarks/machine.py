"""What the benchmarks report about the machine they ran on: figures mean little without it."""

from __future__ import annotations

import os
import platform
import subprocess
from contextlib import suppress
from pathlib import Path
from typing import Any


def first_line(command: list[str]) -> str:
    """The first line a command prints (a tool's ``--version``), or why there is none."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def load_average() -> str:
    """1/5/15-minute load average: other work on the machine skews every figure."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def basic_facts() -> dict[str, Any]:
    """CPU count and model, memory and platform."""
    cpu = mem = "unknown"
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory": mem, "platform": platform.platform()}


GNU_TIME = "/usr/bin/time"


def with_peak_rss(args: list[str], report: Path) -> list[str]:
    """``args`` under GNU time, which writes the peak RSS (KiB) of the command's largest
    process into ``report``. ``wait4``'s own figure cannot be used from a large parent: a
    forked child counts the parent's pages until it execs. Unchanged if GNU time is missing."""
    if not Path(GNU_TIME).exists():
        return args
    return [GNU_TIME, "-f", "%M", "-o", str(report), *args]


def peak_rss_mb(report: Path) -> float | None:
    """What ``with_peak_rss`` wrote (MB), or None; the report is removed."""
    try:
        text = report.read_text().strip().splitlines()[-1]
    except (OSError, IndexError):
        return None
    finally:
        report.unlink(missing_ok=True)
    return int(text) / 1024 if text.isdigit() else None


TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu() -> dict[int, tuple[str, float]]:
    """(name, CPU seconds) of each live thread of this process, by thread id."""
    found = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as handle:
                text = handle.read()
        except FileNotFoundError:
            continue  # ended meanwhile
        comm = text[text.index("(") + 1 : text.rindex(")")]
        fields = text.rsplit(")", 1)[1].split()
        found[int(tid)] = (comm, (int(fields[11]) + int(fields[12])) / TICK)
    return found
