"""The real thing: ``dagster dev`` with the project's workspace and instance config, driven over
GraphQL the way the UI drives it (queued runs, the daemon, pools)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

import pytest

from spark_backup.defs.schedules import OBSERVE_JOB
from spark_backup.engine.cadence import partition_key_for
from spark_backup.engine.pipeline import utcnow
from spark_backup_tests import browser
from spark_backup_tests.helpers import flip_last_byte, free_port, run_cli
from spark_backup_tests.notify_servers import Mailbox, smtp_server

ROOT = Path(__file__).resolve().parents[1]
DONE = ("SUCCESS", "FAILURE", "CANCELED")
SOURCES = ("dgx_config", "k8s_config", "vpn_config")  # the demo plan's


class DagsterDev:
    def __init__(self, port: int, plan: Path | None = None, mailbox: Mailbox | None = None):
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/graphql"
        self.plan = plan
        self.mailbox = mailbox

    def query(self, text: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(
            self.url,
            json.dumps({"query": text, "variables": variables or {}}).encode(),
            {"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.load(response)
        assert "errors" not in body, body
        return body["data"]

    def launch(self, asset: str, partition: str, checks: list[str] | None = None) -> str:
        """Launch a run as the UI's Materialize (or a check's Execute, with ``checks``) does."""
        key = {"path": ["backups", asset]}
        selector = {
            "repositoryLocationName": "spark_backup",
            "repositoryName": "__repository__",
            "pipelineName": "__ASSET_JOB",
            "assetSelection": [] if checks else [key],
            "assetCheckSelection": [{"assetKey": key, "name": name} for name in checks or []],
        }
        data = self.query(
            """mutation($p: ExecutionParams!) { launchPipelineExecution(executionParams: $p) {
                 __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
            {
                "p": {
                    "selector": selector,
                    "executionMetadata": {
                        "tags": [{"key": "dagster/partition", "value": partition}]
                    },
                }
            },
        )["launchPipelineExecution"]
        assert data["__typename"] == "LaunchRunSuccess", data
        return data["run"]["runId"]

    def launch_job(self, job: str) -> str:
        """Launch a job of the code location, as the UI's Launchpad does."""
        selector = {
            "repositoryLocationName": "spark_backup",
            "repositoryName": "__repository__",
            "pipelineName": job,
        }
        data = self.query(
            """mutation($p: ExecutionParams!) { launchPipelineExecution(executionParams: $p) {
                 __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
            {"p": {"selector": selector}},
        )["launchPipelineExecution"]
        assert data["__typename"] == "LaunchRunSuccess", data
        return data["run"]["runId"]

    def wait(self, run_id: str, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.query(
                "query($id: ID!) { runOrError(runId: $id) { ... on Run { status startTime endTime } } }",
                {"id": run_id},
            )["runOrError"]
            if run["status"] in DONE:
                return run
            time.sleep(0.5)
        raise AssertionError(f"run {run_id} did not finish in {timeout}s")


@pytest.fixture(scope="module")
def mailbox() -> Iterator[Mailbox]:
    with smtp_server() as box:
        yield box


@pytest.fixture(scope="module")
def dagster_dev(tmp_path_factory: pytest.TempPathFactory, mailbox: Mailbox) -> Iterator[DagsterDev]:
    """The demo's estate and plan (mailing the security team through a local SMTP server),
    served by ``dagster dev``; every child is stopped after."""
    home = tmp_path_factory.mktemp("demo")
    from spark_backup.demo import prepare_demo

    paths = prepare_demo(home)
    with open(paths.plan, "a") as plan:
        plan.write(
            "\nnotifications:\n"
            f"  email: {{port: {mailbox.port}, sender: backup@example.com, "
            "to: [security@example.com]}\n"
        )
    dagster_home = home / "dagster_home"
    env = {**os.environ, "DAGSTER_HOME": str(dagster_home), "SPARK_BACKUP_PLAN": str(paths.plan)}
    # As an operator deploys it: instance config and pools first, then the services.
    run_cli("dagster-init", cwd=ROOT, env=env, check=True)
    assert (dagster_home / "dagster.yaml").read_text() == (
        ROOT / "spark_backup" / "defs" / "dagster.yaml"
    ).read_text()
    port = free_port()
    log = open(home / "dagster_dev.log", "wb")  # noqa: SIM115 - closed after the process
    process = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "dagster"),
            "dev",
            "-w",
            "workspace.yaml",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, so that every child can be stopped
        # dagster dev maps SIGTERM to its SIGINT handler; a SIGINT ignored by a shell without
        # job control (and inherited) would make it ignore SIGTERM too.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    server = DagsterDev(port, paths.plan, mailbox)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                server.query("{ version }")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError((home / "dagster_dev.log").read_text()[-3000:]) from None
                time.sleep(0.5)
        yield server
    finally:
        _stop_group(process)
        log.close()


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to dagster dev's whole process group, SIGKILL to whatever outlives it."""
    group = os.getpgid(process.pid)
    os.killpg(group, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    if not _wait_until_gone(group, 15):
        with suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        process.wait()
        assert _wait_until_gone(group, 10), f"processes of group {group} survived SIGKILL"


def _wait_until_gone(group: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while _live_members(group):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _live_members(group: int) -> list[int]:
    """Processes of ``group`` that still run (zombies waiting to be reaped do not count)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == group and state != "Z":
            members.append(int(entry))
    return members


def test_materialize_and_check_alone_through_the_webserver(dagster_dev: DagsterDev) -> None:
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


def test_two_runs_never_back_up_the_same_source_at_once(dagster_dev: DagsterDev) -> None:
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
    dagster_dev: DagsterDev, tmp_path: Path
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


def test_sensors_drill_a_new_copy_and_ticket_a_damaged_one(dagster_dev: DagsterDev) -> None:
    """Both end-to-end paths through the real daemon: a copy lands, drill_new_copies requests
    its drill, the drill passes and is journaled; then the copy is damaged, the checksum check
    fails, and check_failures opens exactly one ticket and sends exactly one mail."""
    assert dagster_dev.plan is not None and dagster_dev.mailbox is not None
    partition = partition_key_for("weekly", utcnow())
    backup = dagster_dev.wait(dagster_dev.launch("k8s_config", partition))
    assert backup["status"] == "SUCCESS"
    plan = str(dagster_dev.plan)
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
    journal = dagster_dev.plan.parent / "orchestration_journal" / "backups"
    assert list(journal.glob("drill-k8s_config-*.md"))

    data = Path(copy["uri"].removeprefix("file://"))
    data.write_bytes(flip_last_byte(data.read_bytes()))
    check = dagster_dev.wait(dagster_dev.launch("k8s_config", partition, checks=["checksum"]))
    assert check["status"] == "SUCCESS"  # the check ran; its verdict is a failure
    outbox = dagster_dev.plan.parent / ".spark_backup" / "notifications" / "outbox.jsonl"

    def ticket():
        if not outbox.exists():
            return None
        return [
            entry
            for entry in map(json.loads, outbox.read_text().splitlines())
            if "checksum failed for k8s_config" in entry.get("title", "")
        ]

    (opened,) = _wait_for("the ticket for the failed checksum check", ticket)
    assert opened["action"] == "open" and partition in opened["title"]
    mails = [
        m for m in dagster_dev.mailbox.messages if "checksum failed for k8s_config" in m["Subject"]
    ]
    assert len(mails) == 1 and mails[0]["To"] == "security@example.com"
