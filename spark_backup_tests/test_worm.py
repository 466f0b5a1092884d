"""WORM proven per copy, against SeaweedFS (which enforces Object Lock): list and verify read
each copy's lock back from the store, the ``locked`` check fails for a copy that is not locked
as the store's policy says, and prune leaves locked copies alone."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from dagster import DagsterInstance

from spark_backup.defs.build import build_definitions
from spark_backup.defs.checks import LOCKED_CHECK
from spark_backup.engine.cadence import partition_key_for
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup_tests.helpers import config_source, plan_dict, run_cli, write_plan

KEY_ENV = "SB_TEST_WORM_KEY"
SECRET_ENV = "SB_TEST_WORM_SECRET"


def _plan(tmp_path: Path, seaweedfs, bucket: str, public: str, estate: Path, name: str, **store):
    config = {
        "name": "worm",
        "kind": "s3",
        "endpoint_url": seaweedfs.endpoint_url,
        "bucket": bucket,
        "region_name": seaweedfs.region,
        "access_key_id": f"env:{KEY_ENV}",
        "secret_access_key": f"env:{SECRET_ENV}",
        **store,
    }
    sources = [
        config_source(
            "vpn_config",
            [str(estate)],
            cadence="daily",
            retention={"daily": 1, "weekly": 0, "monthly": 0},
        )
    ]
    return write_plan(tmp_path, plan_dict([public], sources, stores=[config]), name)


def test_locks_are_read_back_per_copy_and_prune_keeps_locked_copies(
    tmp_path, seaweedfs, s3_lock_bucket, age_key, estate, monkeypatch
) -> None:
    env = {KEY_ENV: seaweedfs.access_key, SECRET_ENV: seaweedfs.secret_key}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    lock = {"object_lock": {"mode": "COMPLIANCE", "retain_days": 1}}
    plan = _plan(tmp_path, seaweedfs, s3_lock_bucket, age_key[1], estate, "worm.yaml", **lock)
    # The same bucket through a plan that forgot the lock: its copy is not WORM.
    unlocked_plan = _plan(tmp_path, seaweedfs, s3_lock_bucket, age_key[1], estate, "plain.yaml")
    assert run_cli("--plan", str(plan), "backup", "vpn_config", env=env).returncode == 0
    assert run_cli("--plan", str(plan), "backup", "vpn_config", env=env).returncode == 0

    listed = json.loads(run_cli("--plan", str(plan), "list", "--json", env=env, check=True).stdout)
    assert len(listed) == 2
    now = dt.datetime.now(dt.UTC)
    for row in listed:
        worm = row["worm"]
        assert worm["mode"] == "COMPLIANCE" and worm["active"] and worm["ok"], worm
        retain_until = dt.datetime.fromisoformat(worm["retain_until"])
        assert now + dt.timedelta(hours=23) < retain_until < now + dt.timedelta(days=1, hours=1)
        # What the store reports is what the manifest recorded when the copy was written.
        recorded = dt.datetime.fromisoformat(row["lock"]["retain_until"])
        assert retain_until == recorded.replace(microsecond=0)
    verified = run_cli("--plan", str(plan), "verify", "--json", env=env)
    assert verified.returncode == 0, verified.stdout
    for outcome in json.loads(verified.stdout):
        assert "COMPLIANCE Object Lock read back" in outcome["checks"]
        assert outcome["worm"]["ok"]

    # The locked check passes after a backup run.
    loaded = load_plan(plan)
    defs = build_definitions(loaded)
    partition = partition_key_for("daily", dt.datetime.now(dt.UTC))
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("daily_backups").execute_in_process(
            instance=instance, partition_key=partition, raise_on_error=False
        )
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations[LOCKED_CHECK].passed, evaluations[LOCKED_CHECK].description
    assert evaluations[LOCKED_CHECK].metadata["locked_copies"].value == 3

    # Prune: retention keeps one daily copy; the older ones are expired but locked, so stay.
    pruned = json.loads(
        run_cli("--plan", str(plan), "prune", "--apply", "--json", env=env, check=True).stdout
    )
    assert len(pruned["locked"]) == 2 and not pruned["expired"]
    assert len(BackupService.from_path(plan).copies("vpn_config")) == 3

    # A copy written without the lock is found out by verify and by the check.
    assert run_cli("--plan", str(unlocked_plan), "backup", "vpn_config", env=env).returncode == 0
    unlocked = run_cli("--plan", str(plan), "verify", "--json", env=env)
    assert unlocked.returncode == 3
    failed = [o for o in json.loads(unlocked.stdout) if not o["ok"]]
    assert len(failed) == 1 and "data object has no retention" in failed[0]["error"]
    with DagsterInstance.ephemeral() as instance:
        result = (
            build_definitions(loaded)
            .resolve_job_def("daily_backups")
            .execute_in_process(instance=instance, partition_key=partition, raise_on_error=False)
        )
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not evaluations[LOCKED_CHECK].passed
    assert "has no retention" in evaluations[LOCKED_CHECK].description


def test_plan_refuses_a_compliance_copy_on_a_store_that_is_not_worm_enough(tmp_path, age_key):
    import pytest

    from spark_backup.errors import PlanError

    def store(**lock):
        return {"name": "worm", "kind": "s3", "bucket": "b-1", **lock}

    cases = [
        ({}, "has no object_lock in COMPLIANCE mode"),
        (
            {"object_lock": {"mode": "GOVERNANCE", "retain_days": 400}},
            "has no object_lock in COMPLIANCE mode",
        ),
        (
            {"object_lock": {"mode": "COMPLIANCE", "retain_days": 30}},
            "kept up to 372 days by its retention, but store 'worm' locks copies for only 30 days",
        ),
    ]
    source = config_source("vpn_config", ["/etc"], compliance_copy=True)
    for index, (lock, expected) in enumerate(cases):
        plan = write_plan(
            tmp_path, plan_dict([age_key[1]], [source], stores=[store(**lock)]), f"p{index}.yaml"
        )
        with pytest.raises(PlanError, match=expected):
            load_plan(plan)
    good = {"object_lock": {"mode": "COMPLIANCE", "retain_days": 372}}
    load_plan(write_plan(tmp_path, plan_dict([age_key[1]], [source], stores=[store(**good)])))
