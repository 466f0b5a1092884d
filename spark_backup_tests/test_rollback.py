"""The rollback plan's way back to the Dagster instance (docs/runbooks/rollback.md): a SQLite
instance, snapshot while open, backed up by a config_archive source, lost, and restored with
spark-backup and cp alone; the restored instance opens with its run history."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from dagster import DagsterInstance, DagsterRunStatus, job, op

from spark_backup_tests.helpers import config_source, plan_dict, run_cli, write_plan
from spark_backup_tests.test_runbooks import DOCS, fenced_blocks

DAGSTER_YAML = Path(__file__).parents[1] / "spark_backup" / "defs" / "dagster.yaml"


@op
def counted() -> int:
    return 42


@job
def rollback_probe():
    counted()


def test_a_sqlite_instance_restores_from_its_own_backup_with_its_run_history(
    tmp_path, age_key, monkeypatch
) -> None:
    home = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(home))  # the storage's base_dir names it
    home.mkdir()
    shutil.copy(DAGSTER_YAML, home / "dagster.yaml")
    env = {"DAGSTER_HOME": str(home)}
    snapshot = tmp_path / "snapshots" / "dagster-instance"
    plan = write_plan(
        tmp_path,
        plan_dict([age_key[1]], [config_source("dagster_instance", [str(snapshot)])]),
    )
    with DagsterInstance.from_config(str(home)) as instance:
        runs = [rollback_probe.execute_in_process(instance=instance).run_id for _ in range(2)]
        events = len(instance.all_logs(runs[0]))
        # Snapshot while the instance is open, as a scheduled backup would.
        made = run_cli("dagster-snapshot", "--to", str(snapshot), "--json", env=env)
        assert made.returncode == 0, made.stderr
    report = json.loads(made.stdout)
    assert "history/runs.db" in report["databases"] and "dagster.yaml" in report["files"]
    assert not list(snapshot.rglob("*-wal"))
    refused = run_cli("dagster-snapshot", "--to", str(snapshot), env=env)
    assert refused.returncode != 0 and "already exists" in refused.stderr
    run_cli("--plan", str(plan), "backup", "dagster_instance", check=True)

    # The host is lost: the instance folder and the snapshot with it.
    shutil.rmtree(home)
    shutil.rmtree(snapshot.parent)
    [copy] = json.loads(run_cli("--plan", str(plan), "list", "--json", check=True).stdout)
    # The runbook's block, as an operator pastes it.
    (script,) = [
        block
        for block in fenced_blocks(DOCS / "runbooks" / "rollback.md", "bash")
        if block.startswith("# Restore the Dagster instance")
    ]
    restored = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={
            **os.environ,
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "PLAN": str(plan),
            "COPY_ID": copy["id"],
            "IDENTITY": str(age_key[0]),
            "SNAPSHOT": str(snapshot),
            "DAGSTER_HOME": str(home),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert restored.returncode == 0, restored.stdout + restored.stderr
    assert f"restored {copy['id']}" in restored.stdout
    for database in home.rglob("*.db"):
        with sqlite3.connect(database) as connection:
            assert connection.execute("pragma integrity_check").fetchone() == ("ok",)

    with DagsterInstance.from_config(str(home)) as instance:
        for run_id in runs:
            run = instance.get_run_by_id(run_id)
            assert run is not None and run.status == DagsterRunStatus.SUCCESS
            assert run.job_name == "rollback_probe"
        assert len(instance.all_logs(runs[0])) == events
        # The restored instance goes on working.
        assert rollback_probe.execute_in_process(instance=instance).success
        assert len(instance.get_runs()) == 3
