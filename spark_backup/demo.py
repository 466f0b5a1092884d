"""``spark-backup demo``: the main job on the embedded defaults, end to end.

It builds a sample estate (DGX, Kubernetes and VPN configuration trees) and a demo age key under
the demo home, backs every source up by running the Dagster backup jobs against a persistent
SQLite instance (so ``dagster dev`` shows the runs, partitions and checks afterwards), verifies
every copy, restores each into a staging folder and compares it with the estate, lets the
``drill_new_copies`` sensor drill the new copies, prints the drills and the KPIs, opens one copy
with the standard ``age``/``zstd``/``tar`` tools if they are installed, and prints a summary.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import yaml
from rich.console import Console
from rich.table import Table

from spark_backup.cli.monitor import kpi_table
from spark_backup.engine.cadence import DEFAULT_PARTITIONS_START, utcnow
from spark_backup.engine.crypto import generate_identity
from spark_backup.errors import IntegrityError
from spark_backup.globs import matches_any
from spark_backup.plan import PLAN_ENV, load_plan
from spark_backup.service import BackupService

# path relative to the estate -> (mode, content); a content starting with '->' is a symlink.
ESTATE: dict[str, tuple[int, str]] = {
    "dgx/etc/nvidia/fabricmanager.cfg": (
        0o644,
        "LOG_LEVEL=4\nFABRIC_MODE=0\nFM_STAY_RESIDENT_ON_FAILURES=0\n",
    ),
    "dgx/etc/nvidia/nvidia-container-runtime/config.toml": (
        0o644,
        '[nvidia-container-cli]\nenvironment = []\nldconfig = "@/sbin/ldconfig.real"\n',
    ),
    "dgx/etc/nvidia/current.cfg": (0o777, "-> fabricmanager.cfg"),
    "dgx/etc/docker/daemon.json": (
        0o644,
        '{"default-runtime": "nvidia", "runtimes": {"nvidia": {"path": "nvidia-container-runtime"}}}\n',
    ),
    "dgx/etc/dcgm/dcgm.conf": (0o640, "--port 5555\n--bind-interface 127.0.0.1\n"),
    "dgx/etc/nvidia/.fabricmanager.cfg.swp": (0o600, "editor swap file: excluded by the plan\n"),
    "k8s/kube/config": (
        0o600,
        "apiVersion: v1\nkind: Config\nclusters:\n- name: spark\n  cluster: {server: https://10.0.0.1:6443}\n",
    ),
    "k8s/manifests/namespace.yaml": (
        0o644,
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: llm}\n",
    ),
    "k8s/manifests/vllm-deployment.yaml": (
        0o644,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: vllm, namespace: llm}\n"
        "spec:\n  replicas: 2\n  selector: {matchLabels: {app: vllm}}\n  template:\n"
        "    metadata: {labels: {app: vllm}}\n"
        "    spec: {containers: [{name: vllm, image: 'vllm/vllm-openai:v0.6.3'}]}\n",
    ),
    "k8s/helm/values/vllm.yaml": (
        0o644,
        "image: {tag: v0.6.3}\nresources: {limits: {nvidia.com/gpu: 1}}\n",
    ),
    "vpn/etc/wireguard/wg0.conf": (
        0o600,
        "[Interface]\nAddress = 10.8.0.1/24\nListenPort = 51820\nPrivateKey = <demo: not a real key>\n",
    ),
    "vpn/etc/openvpn/server.conf": (
        0o644,
        "port 1194\nproto udp\ndev tun\nserver 10.9.0.0 255.255.255.0\n",
    ),
    "vpn/etc/openvpn/ccd/client1": (0o644, "ifconfig-push 10.9.0.10 255.255.255.0\n"),
}


@dataclass
class DemoPaths:
    home: Path

    @property
    def demo(self) -> Path:
        return self.home / "demo"

    @property
    def estate(self) -> Path:
        return self.demo / "estate"

    @property
    def plan(self) -> Path:
        return self.demo / "spark_backup.yaml"

    @property
    def started(self) -> Path:
        """Holds the day the demo first ran: its partitions start there."""
        return self.demo / "started"

    @property
    def keys(self) -> Path:
        return self.home / "keys"

    @property
    def restore(self) -> Path:
        return self.demo / "restore"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster_home"


def prepare_demo(home: Path) -> DemoPaths:
    """Create (once) the estate, the demo key and the demo plan; refresh the plan each time."""
    paths = DemoPaths(home.absolute())
    for relative, (mode, content) in ESTATE.items():
        path = paths.estate / relative
        if os.path.lexists(path):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        if content.startswith("-> "):
            path.symlink_to(content[3:])
        else:
            path.write_text(content)
            path.chmod(mode)
    key = paths.keys / "demo-age.key"
    if not key.exists():
        public = generate_identity(key)
        (paths.keys / "demo-age.pub").write_text(f"{public}\n")
    if not paths.started.exists():
        paths.started.write_text(f"{utcnow().date().isoformat()}\n")
    first_day = paths.started.read_text().strip()
    paths.plan.write_text(
        demo_plan_template().replace(
            f"partitions_start: {DEFAULT_PARTITIONS_START}", f"partitions_start: {first_day}"
        )
    )
    return paths


def demo_plan_template() -> str:
    return resources.files("spark_backup").joinpath("demo_data/spark_backup.yaml").read_text()


def demo_trees(plan: Path) -> dict[str, tuple[list[Path], list[str]]]:
    """Per demo source, the estate folders it protects and what it excludes, as the demo's own
    plan file says."""
    data = yaml.safe_load(plan.read_text())
    return {
        entry["name"]: (
            [plan.parent / path for path in entry.get("paths", [])],
            entry.get("exclude", []),
        )
        for entry in data["sources"]
    }


def prepare_dagster_home(paths: DemoPaths) -> Path:
    """DAGSTER_HOME for the demo ($DAGSTER_HOME if set), with spark-backup's dagster.yaml."""
    from spark_backup.defs.instance import install_instance_config

    dagster_home = Path(os.environ.get("DAGSTER_HOME") or paths.dagster_home).absolute()
    install_instance_config(dagster_home)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return dagster_home


def run_demo(home: Path, console: Console) -> None:
    from spark_backup.defs.in_process import run_plan_once  # Dagster loads only for the demo

    paths = prepare_demo(home)
    dagster_home = prepare_dagster_home(paths)
    os.environ[PLAN_ENV] = str(paths.plan)
    loaded = load_plan(paths.plan)
    service = BackupService(loaded)
    console.print(
        f"estate: {paths.estate}\nplan:   {paths.plan}\nstore:  {service.all_stores()[0].uri}"
    )
    failures = run_plan_once(loaded, console.print)

    identities = service.identities()
    table = Table(title="spark-backup demo")
    for column in (
        "source",
        "copy",
        "files",
        "plaintext",
        "stored",
        "verified",
        "restored",
        "restore s",
    ):
        table.add_column(column)
    shutil.rmtree(paths.restore, ignore_errors=True)
    trees = demo_trees(paths.plan)
    for source in loaded.plan.sources:
        copies = service.copies(source.name)
        if not copies:
            failures.append(f"no copy of {source.name} was made")
            continue
        ref = copies[-1]
        outcome = service.verify(ref, identities)
        target = paths.restore / source.name
        summary = service.restore(ref.manifest.id, target)
        roots, exclude = trees[source.name]
        differences = compare_trees(roots, target, exclude=exclude)
        if not outcome.ok:
            failures.append(f"verify {ref.manifest.id}: {outcome.error}")
        failures += [f"restore {source.name}: {d}" for d in differences]
        table.add_row(
            source.name,
            ref.manifest.id,
            str(ref.manifest.source_metadata.get("files", "")),
            f"{ref.manifest.plaintext.bytes}",
            f"{ref.manifest.stored.bytes}",
            "ok" if outcome.ok else "FAILED",
            "identical" if not differences else f"{len(differences)} differences",
            f"{summary['seconds']:.2f}",
        )
    console.print(table)
    failures += print_drills(service, console)
    console.print(kpi_table(service.kpis()))
    console.print(open_with_standard_tools(service, paths))
    console.print(
        "\nSee it in the Dagster UI (assets, lineage, partitions, checks, runs):\n"
        f"  DAGSTER_HOME={dagster_home} {PLAN_ENV}={paths.plan} {_dagster_command()} dev\n"
        "then open http://127.0.0.1:3000/asset-groups.\n"
        "\nWork with the copies from the command line:\n"
        f"  export {PLAN_ENV}={paths.plan}\n"
        f"  {_installed_command('spark-backup')} list\n"
        f"  {_installed_command('spark-backup')} verify --deep\n"
        f"  {_installed_command('spark-backup')} restore COPY_ID --to /tmp/restore",
        highlight=False,
        soft_wrap=True,
    )
    if failures:
        raise IntegrityError("demo failed: " + "; ".join(failures))
    console.print(
        "[green]demo complete: every copy backed up, verified and restored identically[/green]"
    )


def print_drills(service: BackupService, console: Console) -> list[str]:
    """The restore drills the sensor ran: one line per source; a failed or missing one fails."""
    from spark_backup.engine.settings import format_duration

    failures = []
    console.print("\nRestore drills (run by the drill_new_copies sensor):")
    for source in service.plan.sources:
        last = service.last_drill(source.name)
        if last is None:
            failures.append(f"{source.name} was not drilled")
            console.print(f"  {source.name}: not drilled")
            continue
        verdict = "passed" if last.passed and last.within_rto else "FAILED"
        if verdict == "FAILED":
            failures.append(f"drill of {last.copy_id} failed: {last.description}")
        console.print(
            f"  {source.name}: {verdict} {last.drilled_at[:19]}  {last.copy_id}  "
            f"restore {last.drill_seconds:.2f} s of RTO {format_duration(source.rto)}  "
            f"({last.description})",
            highlight=False,
            soft_wrap=True,
        )
    journal = service.journal()
    console.print(f"  journal: {journal.directory}", highlight=False, soft_wrap=True)
    return failures


def _dagster_command() -> str:
    return _installed_command("dagster")


def _installed_command(name: str) -> str:
    """A command as the user can type it: the one installed beside this Python."""
    installed = Path(sys.executable).parent / name
    if not installed.exists():
        return name
    relative = os.path.relpath(installed)
    return relative if not relative.startswith("..") else str(installed)


def compare_trees(roots: list[Path], restored: Path, exclude: list[str]) -> list[str]:
    """Differences between the estate and its restore: missing files, content, mode, link target."""
    differences = []
    for root in roots:
        for directory, _dirs, files in os.walk(root):
            for name in files:
                original = Path(directory, name)
                if exclude and matches_any(str(original), exclude):
                    continue
                copy = restored / str(original).lstrip("/")
                if not os.path.lexists(copy):
                    differences.append(f"{original} missing")
                elif original.is_symlink():
                    if not copy.is_symlink() or os.readlink(copy) != os.readlink(original):
                        differences.append(f"{original}: link target differs")
                elif _digest(original) != _digest(copy):
                    differences.append(f"{original}: content differs")
                elif stat.S_IMODE(original.stat().st_mode) != stat.S_IMODE(copy.stat().st_mode):
                    differences.append(f"{original}: mode differs")
    return differences


def _digest(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def open_with_standard_tools(service: BackupService, paths: DemoPaths) -> str:
    """Open the newest copy with age, zstd and tar alone, as the runbook does by hand."""
    copies = service.all_listings()[0]
    if not copies:
        return "\nNo copy to open with standard tools."
    ref = copies[-1]
    data = Path(ref.store.object_uri(ref.manifest.data_key).removeprefix("file://"))
    key = paths.keys / "demo-age.key"
    command = f"age -d -i {key} {data} | zstd -d | tar -tv"
    if not (shutil.which("age") and shutil.which("zstd")):
        return f"\nOpen a copy without spark-backup (install age and zstd):\n  {command}"
    listing = subprocess.run(
        ["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, check=False
    )
    if listing.returncode != 0:
        raise IntegrityError(f"standard tools could not open {data}: {listing.stderr.strip()}")
    members = len(listing.stdout.splitlines())
    return f"\nOpened {ref.manifest.id} with standard tools ({members} members):\n  {command}"
