"""The real thing: ``dagster dev`` with the project's workspace and instance config, driven over
GraphQL the way the UI drives it (queued runs, the daemon, pools)."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_backup.defs.schedules import OBSERVE_JOB
from spark_backup.engine.cadence import partition_key_for
from spark_backup.engine.pipeline import utcnow
from spark_backup_tests import browser, dagster_processes
from spark_backup_tests.dagster_processes import DagsterGraphQL
from spark_backup_tests.helpers import flip_last_byte, free_port, run_cli
from spark_backup_tests.notify_servers import Mailbox, smtp_server

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("dgx_config", "k8s_config", "vpn_config")  # the demo plan's


@pytest.fixture(scope="module")
def mailbox() -> Iterator[Mailbox]:
    with smtp_server() as box:
        yield box


@pytest.fixture(scope="module")
def demo_plan(tmp_path_factory: pytest.TempPathFactory, mailbox: Mailbox) -> Path:
    """The demo's estate and plan, mailing the security team through a local SMTP server."""
    from spark_backup.demo import prepare_demo

    paths = prepare_demo(tmp_path_factory.mktemp("demo"))
    with open(paths.plan, "a") as plan:
        plan.write(
            "\nnotifications:\n"
            f"  email: {{port: {mailbox.port}, sender: backup@example.com, "
            "to: [security@example.com]}\n"
        )
    return paths.plan


@pytest.fixture(scope="module")
def dagster_dev(
    tmp_path_factory: pytest.TempPathFactory, demo_plan: Path
) -> Iterator[DagsterGraphQL]:
    """The demo plan served by ``dagster dev``; every child is stopped after."""
    home = tmp_path_factory.mktemp("dagster_dev")
    dagster_home = home / "dagster_home"
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "SPARK_BACKUP_PLAN": str(demo_plan)}
    # As an operator deploys it: instance config and pools first, then the services.
    run_cli("dagster-init", cwd=ROOT, env=env, check=True)
    assert (dagster_home / "dagster.yaml").read_text() == (
        ROOT / "spark_backup" / "defs" / "dagster.yaml"
    ).read_text()
    port = free_port()
    log = home / "dagster_dev.log"
    process = dagster_processes.start(
        ["dagster", "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)],
        log,
        ROOT,
        env,
    )
    try:
        server = DagsterGraphQL(port)
        server.wait_ready(process, log)
        yield server
    finally:
        dagster_processes.stop_group(process)


def test_materialize_and_check_alone_through_the_webserver(dagster_dev: DagsterGraphQL) -> None:
    partition = partition_key_for("weekly", utcnow())
    backup = dagster_dev.wait(dagster_dev.launch("vpn_config", partition))
    assert backup["status"] == "SUCCESS"
    check = dagster_dev.wait(dagster_dev.launch("vpn_config", partition, checks=["checksum"]))
    assert check["status"] == "SUCCESS"
    result = dagster_dev.query(
        """{ assetNodes(assetKeys: [{path: ["backups", "vpn_config"]}]) {
             assetChecksOrError { ... on AssetChecks { checks { name
               executionForLatestMaterialization { status evaluation { success partition } } } } } } }"""
    )
    checks = {c["name"]: c for c in result["assetNodes"][0]["assetChecksOrError"]["checks"]}
    latest = checks["checksum"]["executionForLatestMaterialization"]
    assert latest["status"] == "SUCCEEDED" and latest["evaluation"]["partition"] == partition


def test_two_runs_never_back_up_the_same_source_at_once(dagster_dev: DagsterGraphQL) -> None:
    partition = partition_key_for("weekly", utcnow())
    first, second = (dagster_dev.launch("dgx_config", partition) for _ in range(2))
    runs = sorted((dagster_dev.wait(first), dagster_dev.wait(second)), key=lambda r: r["startTime"])
    assert [r["status"] for r in runs] == ["SUCCESS", "SUCCESS"]
    assert runs[1]["startTime"] >= runs[0]["endTime"]  # the pool held the second run in the queue


# Lineage edges as the UI draws them: an SVG path with the lineage colour and an arrow head.
_EDGE_RE = re.compile(r'<path d="M[^"]*" stroke="var\(--color-lineage-edge\)"[^>]*marker-end=')
SCREENSHOTS = ROOT / "docs" / "images"
UPDATE_SCREENSHOTS_ENV = "SPARK_BACKUP_UPDATE_SCREENSHOTS"


def test_lineage_shows_every_system_feeding_its_backups(
    dagster_dev: DagsterGraphQL, tmp_path: Path
) -> None:
    """In a real browser: the lineage page draws one edge from every protected system to its
    backups and one from the backups to their restore drill, and names every asset. The
    screenshot in docs/ is taken here."""
    observed = dagster_dev.wait(dagster_dev.launch_job(OBSERVE_JOB))
    assert observed["status"] == "SUCCESS"
    # The group's own page in its code location: /asset-groups/NAME shows every group collapsed
    # as soon as there is more than one (here also `kpis`).
    url = f"{dagster_dev.base}/locations/spark_backup/asset-groups/config_archive"
    # On a loaded machine the page may not have drawn the graph, or filled in the nodes'
    # observations, within the browser's virtual time budget: look again (at most three times)
    # before judging what it draws.
    for _ in range(3):
        dom = browser.rendered_dom(url)
        graph = dom.split("AssetGraphExplorer_svgContainer", 1)[-1].split("</svg>", 1)[0]
        edges = len(_EDGE_RE.findall(graph))
        if edges and "Observed" in dom:
            break
    assert edges == 2 * len(SOURCES), "two edges per source: system -> backups -> drills"
    for source in SOURCES:
        assert dom.count(f">{source}<") >= 3, source  # the system, its backups, its drill
    assert "Observed" in dom  # the systems are observable source assets
    shot = browser.screenshot(url, tmp_path / "lineage.png")
    if os.environ.get(UPDATE_SCREENSHOTS_ENV):
        shutil.copyfile(shot, SCREENSHOTS / "lineage.png")


def test_partitions_and_a_failed_check_in_the_browser(
    dagster_dev: DagsterGraphQL, tmp_path: Path
) -> None:
    """In a real browser: a source's partitions page shows the week that has a copy, and its
    checks page the failed check of a week without one, with the reason."""
    current = partition_key_for("weekly", utcnow())
    previous = (dt.date.fromisoformat(current) - dt.timedelta(weeks=1)).isoformat()
    assert dagster_dev.wait(dagster_dev.launch("k8s_config", current))["status"] == "SUCCESS"
    # Last week has no copy: its checksum check fails (the run itself succeeds).
    checked = dagster_dev.wait(dagster_dev.launch("k8s_config", previous, checks=["checksum"]))
    assert checked["status"] == "SUCCESS"
    asset = f"{dagster_dev.base}/assets/backups/k8s_config"
    pages = {"partitions": f"{asset}?view=partitions", "checks": f"{asset}?view=checks"}

    shown = (f"| {current} |", "| Materialized (1) |", "| Failed (0) |")
    partitions = browser.rendered_text(pages["partitions"], shown)
    for item in shown:
        assert item in partitions, item

    shown = (
        "| checksum | checksum | Failed |",
        "| freshness | freshness | Not evaluated |",
        f"| no committed copy of k8s_config for partition {previous} |",
        f"| Partition | {previous} |",
    )
    checks = browser.rendered_text(pages["checks"], shown)
    for item in shown:
        assert item in checks, item

    if os.environ.get(UPDATE_SCREENSHOTS_ENV):  # chromium takes seconds a page: only on demand
        for name, url in pages.items():
            shot = browser.screenshot(url, tmp_path / f"{name}.png")
            shutil.copyfile(shot, SCREENSHOTS / f"k8s_config_{name}.png")


def _wait_for(what: str, probe, timeout: float = 150):
    """Poll until ``probe()`` returns something true (the daemon evaluates sensors every
    30 s or so)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(2)
    raise AssertionError(f"{what}: not within {timeout}s")


def test_sensors_drill_a_new_copy_and_ticket_a_damaged_one(
    dagster_dev: DagsterGraphQL, demo_plan: Path, mailbox: Mailbox
) -> None:
    """Both end-to-end paths through the real daemon: a copy lands, drill_new_copies requests
    its drill, the drill passes and is journaled; then the copy is damaged, the checksum check
    fails, and check_failures opens exactly one ticket and sends exactly one mail."""
    partition = partition_key_for("weekly", utcnow())
    backup = dagster_dev.wait(dagster_dev.launch("k8s_config", partition))
    assert backup["status"] == "SUCCESS"
    plan = str(demo_plan)
    listed = json.loads(run_cli("--plan", plan, "list", "k8s_config", "--json", check=True).stdout)
    copy = [c for c in listed if c["partition"] == partition][-1]

    def drilled():
        rows = json.loads(run_cli("--plan", plan, "list", "k8s_config", "--json").stdout)
        return next((r["drill"] for r in rows if r["id"] == copy["id"] and r["drill"]), None)

    drill = _wait_for("the sensor's drill of the new copy", drilled)
    assert drill["passed"] and drill["within_rto"]
    result = dagster_dev.query(
        """{ assetNodes(assetKeys: [{path: ["drills", "k8s_config"]}]) {
             assetChecksOrError { ... on AssetChecks { checks { name
               executionForLatestMaterialization { status evaluation { success partition } } } } } } }"""
    )
    checks = {c["name"]: c for c in result["assetNodes"][0]["assetChecksOrError"]["checks"]}
    for name in ("restore_drill", "rto"):
        latest = checks[name]["executionForLatestMaterialization"]
        assert latest["status"] == "SUCCEEDED" and latest["evaluation"]["partition"] == partition
    journal = demo_plan.parent / "orchestration_journal" / "backups"
    assert list(journal.glob("drill-k8s_config-*.md"))

    data = Path(copy["uri"].removeprefix("file://"))
    data.write_bytes(flip_last_byte(data.read_bytes()))
    check = dagster_dev.wait(dagster_dev.launch("k8s_config", partition, checks=["checksum"]))
    assert check["status"] == "SUCCESS"  # the check ran; its verdict is a failure
    outbox = demo_plan.parent / ".spark_backup" / "notifications" / "outbox.jsonl"
    # This partition's failure only: an earlier test failed last week's check on purpose.
    subject = "checksum failed for k8s_config"

    def ticket():
        if not outbox.exists():
            return None
        return [
            entry
            for entry in map(json.loads, outbox.read_text().splitlines())
            if subject in entry.get("title", "") and partition in entry.get("title", "")
        ]

    (opened,) = _wait_for("the ticket for the failed checksum check", ticket)
    assert opened["action"] == "open"
    mails = [m for m in mailbox.messages if subject in m["Subject"] and partition in m["Subject"]]
    assert len(mails) == 1 and mails[0]["To"] == "security@example.com"
