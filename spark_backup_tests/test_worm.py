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


def test_versions_stacked_on_a_locked_copy_are_tampering_and_change_nothing_for_restore(
    tmp_path, seaweedfs, s3_lock_bucket, age_key, estate, monkeypatch
) -> None:
    """The held-out attacks: a delete marker over a manifest, a new version over a data object
    and a forged manifest version. Each copy still lists and restores from the version the
    backup wrote (recorded by VersionId); verify and the locked check name what was stacked."""
    env = {KEY_ENV: seaweedfs.access_key, SECRET_ENV: seaweedfs.secret_key}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    lock = {"object_lock": {"mode": "COMPLIANCE", "retain_days": 1}}
    plan = _plan(tmp_path, seaweedfs, s3_lock_bucket, age_key[1], estate, "worm.yaml", **lock)
    for _ in range(5):
        run_cli("--plan", str(plan), "backup", "vpn_config", env=env, check=True)
    copies = BackupService.from_path(plan).copies("vpn_config")
    assert len(copies) == 5
    client = seaweedfs.client()
    for ref in copies:
        # The manifest records the version the backup wrote, which is the data object's first.
        history = client.list_object_versions(Bucket=s3_lock_bucket, Prefix=ref.manifest.data_key)
        assert [v["VersionId"] for v in history["Versions"]] == [ref.manifest.data_version]
    hidden, replaced, forged, data_hidden, intact = (ref.manifest for ref in copies)
    hidden_key = f"vpn_config/manifests/{hidden.id}.json"
    forged_key = f"vpn_config/manifests/{forged.id}.json"
    client.delete_object(Bucket=s3_lock_bucket, Key=hidden_key)
    client.put_object(Bucket=s3_lock_bucket, Key=replaced.data_key, Body=b"attacker's bytes")
    client.delete_object(Bucket=s3_lock_bucket, Key=data_hidden.data_key)
    forgery = json.loads(client.get_object(Bucket=s3_lock_bucket, Key=forged_key)["Body"].read())
    forgery["host"] = "attacker"
    client.put_object(Bucket=s3_lock_bucket, Key=forged_key, Body=json.dumps(forgery).encode())
    assert hidden_key not in [
        o["Key"]
        for o in client.list_objects_v2(Bucket=s3_lock_bucket, Prefix="vpn_config/").get(
            "Contents", []
        )
    ]

    listed = json.loads(run_cli("--plan", str(plan), "list", "--json", env=env, check=True).stdout)
    rows = {row["id"]: row for row in listed}
    assert set(rows) == {m.id for m in (hidden, replaced, forged, data_hidden, intact)}
    again = {
        ref.manifest.id: ref.manifest for ref in BackupService.from_path(plan).copies("vpn_config")
    }
    assert again[forged.id] == forged  # the version written, not the one stacked on it
    assert rows[intact.id]["worm"]["ok"]
    for manifest, key, what in (
        (hidden, hidden_key, "delete marker"),
        (replaced, replaced.data_key, "is stacked on the recorded version"),
        (forged, forged_key, "is stacked on the recorded version"),
        (data_hidden, data_hidden.data_key, "delete marker"),
    ):
        problems = " ".join(rows[manifest.id]["worm"]["problems"])
        assert "tampering: " in problems and key in problems and what in problems, problems

    verified = run_cli("--plan", str(plan), "verify", "--json", env=env)
    assert verified.returncode == 3, verified.stderr
    outcomes = {o["copy_id"]: o for o in json.loads(verified.stdout)}
    assert outcomes[intact.id]["ok"]
    for manifest, key in (
        (hidden, hidden_key),
        (replaced, replaced.data_key),
        (forged, forged_key),
        (data_hidden, data_hidden.data_key),
    ):
        outcome = outcomes[manifest.id]
        assert not outcome["ok"] and "tampering" in outcome["error"] and key in outcome["error"]

    # Restore reads the versions the backup wrote: the original files, not the attacker's.
    for manifest in (hidden, replaced, forged, data_hidden):
        target = tmp_path / f"restored-{manifest.id}"
        restored = run_cli(
            "--plan", str(plan), "restore", manifest.id, "--to", str(target),
            "--identity", str(age_key[0]), "--json", env=env,
        )  # fmt: skip
        assert restored.returncode == 0, restored.stderr
        wg0 = estate / "wireguard/wg0.conf"
        assert (target / wg0.relative_to("/")).read_text() == wg0.read_text()

    loaded = load_plan(plan)
    partition = partition_key_for("daily", dt.datetime.now(dt.UTC))
    with DagsterInstance.ephemeral() as instance:
        result = (
            build_definitions(loaded)
            .resolve_job_def("daily_backups")
            .execute_in_process(instance=instance, partition_key=partition, raise_on_error=False)
        )
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert not evaluations[LOCKED_CHECK].passed
    assert replaced.data_key in evaluations[LOCKED_CHECK].description

    # Prune keeps every locked copy, the hidden one included, and deletes none of its data.
    before = len(BackupService.from_path(plan).copies("vpn_config"))  # the job backed up too
    pruned = json.loads(
        run_cli("--plan", str(plan), "prune", "--apply", "--json", env=env, check=True).stdout
    )
    assert hidden.id not in pruned["expired"] and not pruned["orphans"]
    assert len(BackupService.from_path(plan).copies("vpn_config")) == before == 6


def test_upload_lifecycle_check_wants_a_rule_aborting_incomplete_uploads(
    tmp_path, seaweedfs, s3_bucket, age_key, estate, monkeypatch
) -> None:
    env = {KEY_ENV: seaweedfs.access_key, SECRET_ENV: seaweedfs.secret_key}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    plan = _plan(tmp_path, seaweedfs, s3_bucket, age_key[1], estate, "p.yaml", prefix="backups")
    service = BackupService.from_path(plan)
    client = seaweedfs.client()

    missing = service.upload_lifecycle("vpn_config")
    assert missing is not None and not missing.ok and missing.abort_after_days is None
    assert "store 'worm' has no enabled lifecycle rule" in missing.description

    def rules(*rules):
        client.put_bucket_lifecycle_configuration(
            Bucket=s3_bucket, LifecycleConfiguration={"Rules": list(rules)}
        )

    def abort(rule_id, prefix, days, status="Enabled"):
        return {
            "ID": rule_id,
            "Status": status,
            "Filter": {"Prefix": prefix},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": days},
        }

    # Rules that do not reach the store's prefix, or are disabled, do not count.
    rules(abort("other", "elsewhere/", 1), abort("off", "", 1, "Disabled"))
    assert service.upload_lifecycle("vpn_config").abort_after_days is None
    rules(abort("other", "elsewhere/", 1), abort("spark", "backups/", 3))

    # A backup killed mid-upload leaves an upload; one of another writer is not ours.
    ours = "backups/vpn_config/data/vpn_config-20260101T000000.000Z-0000abcd.tar.zst.age"
    for key in (ours, "backups/someone-else.bin"):
        upload = client.create_multipart_upload(Bucket=s3_bucket, Key=key)
        client.upload_part(
            Bucket=s3_bucket, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024
        )
    fresh = service.upload_lifecycle("vpn_config")
    assert fresh.ok and fresh.abort_after_days == 3 and not fresh.stale
    assert "aborted after 3 days" in fresh.description

    # Two days on: stale (prune aborts it); ten days on, the rule evidently was not enforced.
    now = dt.datetime.now(dt.UTC)
    later = service.upload_lifecycle("vpn_config", now=now + dt.timedelta(days=2))
    assert later.ok and later.stale == (ours[len("backups/") :],) and not later.overdue
    overdue = service.upload_lifecycle("vpn_config", now=now + dt.timedelta(days=10))
    assert not overdue.ok and overdue.overdue == (ours[len("backups/") :],)
    assert "older than the rule's 3 days" in overdue.description

    # The Dagster check, run by the daily compliance job.
    from dagster import AssetCheckKey

    from spark_backup.defs.assets import system_asset_key
    from spark_backup.defs.checks import UPLOAD_LIFECYCLE_CHECK
    from spark_backup.defs.schedules import ROTATION_JOB

    def evaluate():
        with DagsterInstance.ephemeral() as instance:
            run = (
                build_definitions(load_plan(plan))
                .resolve_job_def(ROTATION_JOB)
                .execute_in_process(instance=instance, raise_on_error=False)
            )
        found = {e.asset_check_key: e for e in run.get_asset_check_evaluations()}
        return found[AssetCheckKey(system_asset_key("vpn_config"), UPLOAD_LIFECYCLE_CHECK)]

    assert evaluate().passed
    client.delete_bucket_lifecycle(Bucket=s3_bucket)
    failed = evaluate()
    assert not failed.passed and "no enabled lifecycle rule" in failed.description
