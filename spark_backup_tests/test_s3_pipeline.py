"""Backups through a real S3 server (SeaweedFS) with Object Lock: the WORM tier end to end."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from spark_backup.engine.catalog import list_copies
from spark_backup.engine.pipeline import CompressionSettings, write_copy
from spark_backup.errors import ObjectLockedError, SourceError
from spark_backup.service import BackupService
from spark_backup_tests.helpers import BytesSource, config_source, plan_dict, run_cli, write_plan

KEY_ENV = "SPARK_TEST_S3_KEY_ID"
SECRET_ENV = "SPARK_TEST_S3_SECRET"


@pytest.fixture
def s3_env(seaweedfs, monkeypatch):
    monkeypatch.setenv(KEY_ENV, seaweedfs.access_key)
    monkeypatch.setenv(SECRET_ENV, seaweedfs.secret_key)
    return {KEY_ENV: seaweedfs.access_key, SECRET_ENV: seaweedfs.secret_key}


def _worm_plan(tmp_path: Path, seaweedfs, bucket: str, public: str, estate: Path, **source) -> Path:
    store = {
        "name": "worm",
        "kind": "s3",
        "endpoint_url": seaweedfs.endpoint_url,
        "bucket": bucket,
        "prefix": "spark/prod",
        "region_name": seaweedfs.region,
        "access_key_id_env": KEY_ENV,
        "secret_access_key_env": SECRET_ENV,
        "object_lock": {"mode": "COMPLIANCE", "retain_days": 1},
        "part_size_mb": 5,
    }
    sources = [config_source("vpn_config", [str(estate)], **source)]
    return write_plan(tmp_path, plan_dict([public], sources, stores=[store]))


def test_worm_backup_verify_restore_and_prune(
    tmp_path, seaweedfs, s3_lock_bucket, s3_env, age_key, estate
):
    plan = _worm_plan(
        tmp_path,
        seaweedfs,
        s3_lock_bucket,
        age_key[1],
        estate,
        retention={"daily": 1, "weekly": 0, "monthly": 0},
    )
    service = BackupService.from_path(plan)
    service.store("worm").check()
    [first] = service.backup("vpn_config")
    [second] = service.backup("vpn_config")

    assert first.lock["mode"] == "COMPLIANCE"
    store = service.store("worm")
    for key in (first.data_key, f"vpn_config/manifests/{first.id}.json"):
        lock = store.lock_of(key)
        assert lock.mode == "COMPLIANCE" and lock.active()
    raw = seaweedfs.client().list_objects_v2(Bucket=s3_lock_bucket)["Contents"]
    assert all(o["Key"].startswith("spark/prod/vpn_config/") for o in raw)

    assert all(service.verify(r).ok for r in service.copies())
    summary = service.restore(second.id, tmp_path / "restore", identity_file=age_key[0])
    assert summary["files"] == 6
    assert (tmp_path / "restore" / str(estate).lstrip("/") / "wireguard/wg0.conf").read_text() == (
        estate / "wireguard/wg0.conf"
    ).read_text()

    # Retention keeps only the newest copy, but the lock protects the older one.
    report = service.prune(dry_run=False)
    assert report.expired == [] and report.locked == [first.id]
    assert [r.manifest.id for r in service.copies()] == [first.id, second.id]
    with pytest.raises(ObjectLockedError, match="COMPLIANCE retention until"):
        store.delete(first.data_key)
    assert service.verify(service.find(first.id)).ok


def test_failure_halfway_through_multipart_upload_leaves_nothing(
    tmp_path, seaweedfs, s3_lock_bucket, s3_env, age_key, estate
):
    service = BackupService.from_path(
        _worm_plan(tmp_path, seaweedfs, s3_lock_bucket, age_key[1], estate)
    )
    store = service.store("worm")
    # Incompressible, so that more than one 5 MiB part is uploaded before the source fails.
    with pytest.raises(SourceError, match="read error"):
        write_copy(
            store,
            BytesSource(os.urandom(16 << 20), fail_after=12 << 20),
            source_name="blob",
            partition="2026-11-27",
            recipients=service.recipients(),
            compression=CompressionSettings(level=1, threads=0),
        )
    client = seaweedfs.client()
    assert client.list_multipart_uploads(Bucket=s3_lock_bucket).get("Uploads", []) == []
    assert client.list_objects_v2(Bucket=s3_lock_bucket).get("KeyCount", 0) == 0
    assert list_copies(store) == []
    [good] = service.backup("vpn_config")
    assert [r.manifest.id for r in service.copies()] == [good.id]


def test_wrong_credentials_are_one_line_without_secrets(
    tmp_path, seaweedfs, s3_lock_bucket, age_key, estate
):
    plan = _worm_plan(tmp_path, seaweedfs, s3_lock_bucket, age_key[1], estate)
    wrong = "not-the-secret-Wq8Zk1"
    result = run_cli(
        "--plan",
        str(plan),
        "backup",
        "vpn_config",
        env={KEY_ENV: seaweedfs.access_key, SECRET_ENV: wrong},
    )
    assert result.returncode == 5
    assert result.stderr.strip().count("\n") == 0
    assert "store 'worm': credentials rejected by" in result.stderr
    assert wrong not in result.stderr + result.stdout

    result = run_cli(
        "--plan", str(plan), "plan", "check", "--probe", env={KEY_ENV: "", SECRET_ENV: ""}
    )
    assert result.returncode == 9
    assert (
        f"store 'worm': env:{KEY_ENV}: environment variable {KEY_ENV} is not set" in result.stderr
    )


def test_cli_round_trip_against_s3(tmp_path, seaweedfs, s3_lock_bucket, s3_env, age_key, estate):
    plan = str(_worm_plan(tmp_path, seaweedfs, s3_lock_bucket, age_key[1], estate))
    assert run_cli("--plan", plan, "backup", "vpn_config", env=s3_env).returncode == 0
    import json

    listed = json.loads(run_cli("--plan", plan, "list", "--json", env=s3_env, check=True).stdout)
    assert listed[0]["uri"].startswith(f"s3://{s3_lock_bucket}/spark/prod/vpn_config/data/")
    assert listed[0]["lock"]["mode"] == "COMPLIANCE"
    verified = run_cli(
        "--plan", plan, "verify", "--json", "--identity", str(age_key[0]), env=s3_env
    )
    assert verified.returncode == 0 and json.loads(verified.stdout)[0]["deep"] is True
    assert dt.datetime.fromisoformat(listed[0]["lock"]["retain_until"]) > dt.datetime.now(dt.UTC)
