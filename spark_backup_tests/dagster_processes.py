"""Dagster's own processes as tests start them (``dagster dev``, ``dagster-webserver``,
``dagster-daemon``, a code server): each in its own process group, as a shell with job control
(``set -m``) starts a job, so that every child can be stopped; and the webserver's GraphQL,
driven the way the UI drives it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import suppress
from pathlib import Path

DONE = ("SUCCESS", "FAILURE", "CANCELED")
BIN = Path(sys.executable).parent


def start(args: list[str], log: Path, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    """Start a Dagster command from the venv in its own process group, output into ``log``."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [str(BIN / args[0]), *args[1:]],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so that every child can be stopped
            # dagster dev maps SIGTERM to its SIGINT handler; a SIGINT ignored by a shell without
            # job control (and inherited) would make it ignore SIGTERM too.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the whole process group of a started process, SIGKILL to whatever outlives it."""
    group = os.getpgid(process.pid)
    os.killpg(group, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(timeout=20)
    if not wait_until_gone(group, 15):
        with suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        process.wait()
        assert wait_until_gone(group, 10), f"processes of group {group} survived SIGKILL"


def wait_until_gone(group: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while live_members(group):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def live_members(group: int) -> list[int]:
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


class DagsterGraphQL:
    def __init__(self, port: int):
        self.base = f"http://127.0.0.1:{port}"
        self.url = f"{self.base}/graphql"

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

    def wait_ready(self, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
        """Until the webserver answers; its log in the failure if it died or never did."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.query("{ version }")
                return
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(log.read_text()[-3000:]) from None
                time.sleep(0.5)

    def wait_location_loaded(self, name: str, timeout: float = 90) -> None:
        """Until the code location ``name`` is loaded; one served by a code server that was still
        starting is reloaded, as the UI's Reload button does."""
        deadline = time.monotonic() + timeout
        while True:
            entries = self.query(
                "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus "
                "locationOrLoadError { __typename ... on PythonError { message } } } } } }"
            )["workspaceOrError"]["locationEntries"]
            entry = next(e for e in entries if e["name"] == name)
            loaded = entry["locationOrLoadError"] or {}
            if loaded.get("__typename") == "RepositoryLocation":
                return
            assert time.monotonic() < deadline, f"code location {name} did not load: {loaded}"
            if entry["loadStatus"] == "LOADED":
                self.query(
                    "mutation($n: String!) { reloadRepositoryLocation(repositoryLocationName: $n) "
                    "{ __typename } }",
                    {"n": name},
                )
            time.sleep(1)
