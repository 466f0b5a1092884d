"""GDPR erasure on locked copies, by crypto-shredding, against SeaweedFS with Object Lock: after
``erase``, exactly the targeted copies refuse to restore, with a clear message, while their
locked objects stay; every other copy still restores."""

from __future__ import annotations

import datetime as dt
import json

import yaml
from dagster import DagsterInstance

from spark_backup.defs.build import build_definitions
from spark_backup.defs.checks import DELETION_REVIEW_CHECK
from spark_backup.defs.schedules import ROTATION_JOB
from spark_backup.engine.datakeys import data_key_path
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup_tests.helpers import config_source, plan_dict, run_cli, write_plan
from spark_backup_tests.test_runbooks import DOCS

KEY_ENV = "SB_TEST_ERASE_KEY"
SECRET_ENV = "SB_TEST_ERASE_SECRET"


def test_erase_makes_exactly_the_targeted_copies_unreadable(
    tmp_path, seaweedfs, s3_lock_bucket, age_key, estate, monkeypatch
) -> None:
    env = {KEY_ENV: seaweedfs.access_key, SECRET_ENV: seaweedfs.secret_key}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    store = {
        "name": "worm",
        "kind": "s3",
        "endpoint_url": seaweedfs.endpoint_url,
        "bucket": s3_lock_bucket,
        "region_name": seaweedfs.region,
        "access_key_id": f"env:{KEY_ENV}",
        "secret_access_key": f"env:{SECRET_ENV}",
        "object_lock": {"mode": "COMPLIANCE", "retain_days": 1},
    }
    sources = [
        config_source("hr_config", [str(estate / "wireguard")], personal_data=True),
        config_source("dgx_config", [str(estate / "nvidia")]),
    ]
    plan = plan_dict([age_key[1]], sources, stores=[store])
    plan["encryption"]["identity_file"] = str(age_key[0])
    plan_path = write_plan(tmp_path, plan)

    now = dt.datetime.now(dt.UTC)
    last_month = (now.replace(day=1) - dt.timedelta(days=1)).replace(day=15)
    service = BackupService.from_path(plan_path)
    monkeypatch.setattr("spark_backup.service.copies.utcnow", lambda: last_month)
    [old] = service.backup("hr_config")
    monkeypatch.undo()
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    [current] = service.backup("hr_config")
    [other] = service.backup("dgx_config")
    assert old.encryption["data_key"] == data_key_path("hr_config", f"{last_month:%Y-%m}")
    assert current.encryption["data_key"] == data_key_path("hr_config", f"{now:%Y-%m}")
    assert "data_key" not in other.encryption
    # The copy is encrypted to the month's key, not to the plan's recipient.
    assert old.encryption["recipients"] != [age_key[1]]

    before = now.replace(day=1).date().isoformat()
    dry = run_cli("--plan", str(plan_path), "erase", "hr_config", "--before", before, "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout) == {
        "source": "hr_config",
        "months": [f"{last_month:%Y-%m}"],
        "copies": [old.id],
        "dry_run": True,
    }
    assert (
        run_cli(
            "--plan", str(plan_path), "restore", old.id, "--to", str(tmp_path / "r0")
        ).returncode
        == 0
    )
    applied = run_cli("--plan", str(plan_path), "erase", "hr_config", "--before", before, "--apply")
    assert applied.returncode == 0, applied.stderr
    assert f"destroyed the data key of hr_config {last_month:%Y-%m}" in applied.stdout

    refused = run_cli("--plan", str(plan_path), "restore", old.id, "--to", str(tmp_path / "r1"))
    assert refused.returncode == 8
    assert (
        f"copy {old.id} was erased on " in refused.stderr and "crypto-shredding" in refused.stderr
    )
    assert not (tmp_path / "r1").exists()
    deep = run_cli("--plan", str(plan_path), "verify", old.id, "--deep", "--json")
    assert deep.returncode != 0 and "was erased" in deep.stdout + deep.stderr
    # The locked objects stay, intact, until their retention ends.
    worm = service.store("worm")
    assert worm.locked(old.data_key) and service.verify(service.find(old.id)).ok

    for copy in (current, other):
        target = tmp_path / f"restore-{copy.id}"
        restored = run_cli("--plan", str(plan_path), "restore", copy.id, "--to", str(target))
        assert restored.returncode == 0, restored.stderr

    not_personal = run_cli("--plan", str(plan_path), "erase", "dgx_config", "--before", before)
    assert not_personal.returncode == 2 and "not marked personal_data" in not_personal.stderr


def test_deletion_concept_review_check_fails_after_a_year(tmp_path, age_key, estate) -> None:
    concept = tmp_path / "deletion-concept.md"
    old = dt.date.today() - dt.timedelta(days=400)
    concept.write_text(f"# Deletion concept\n\nLast reviewed: {old}\n")
    plan = plan_dict(
        [age_key[1]],
        [config_source("hr_config", [str(estate)], personal_data=True)],
        compliance={"deletion_concept": "deletion-concept.md"},
    )
    plan_path = write_plan(tmp_path, plan)

    def evaluate():
        defs = build_definitions(load_plan(plan_path))
        with DagsterInstance.ephemeral() as instance:
            run = defs.resolve_job_def(ROTATION_JOB).execute_in_process(
                instance=instance, raise_on_error=False
            )
        return {e.check_name: e for e in run.get_asset_check_evaluations()}[DELETION_REVIEW_CHECK]

    stale = evaluate()
    assert not stale.passed and "400 days ago" in stale.description
    concept.write_text(f"# Deletion concept\n\nLast reviewed: {dt.date.today()}\n")
    assert evaluate().passed

    # The project's own concept carries a date the check reads.
    repo_concept = DOCS / "compliance" / "deletion-concept.md"
    data = yaml.safe_load(plan_path.read_text())
    data["compliance"]["deletion_concept"] = str(repo_concept)
    plan_path.write_text(yaml.safe_dump(data))
    status = BackupService.from_path(plan_path).deletion_concept_review(
        now=dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
    )
    assert status.ok and status.reviewed == dt.date(2026, 11, 29)


def test_a_data_key_put_into_the_store_by_someone_else_is_refused(
    tmp_path, age_key, estate
) -> None:
    """With signing, a backup never encrypts to a month key it did not sign: an attacker who
    swaps the key object for one of their own (whose identity they hold) gets a refusal."""
    from pyrage import x25519

    from spark_backup.engine.signing import Signer

    signer, pem = Signer.generate()
    plan = plan_dict(
        [age_key[1]],
        [config_source("hr_config", [str(estate)], personal_data=True)],
        signing={"key": "env:SB_TEST_ERASE_SIGNING", "public_keys": [signer.public_key]},
    )
    plan_path = write_plan(tmp_path, plan)
    env = {"SB_TEST_ERASE_SIGNING": pem}
    assert run_cli("--plan", str(plan_path), "backup", "hr_config", env=env).returncode == 0
    month = f"{dt.datetime.now(dt.UTC):%Y-%m}"
    key_file = tmp_path / "store" / data_key_path("hr_config", month)
    document = json.loads(key_file.read_text())
    assert document["signature"]["public_key"] == signer.public_key
    document["recipient"] = str(x25519.Identity.generate().to_public())
    key_file.chmod(0o600)
    key_file.write_text(json.dumps(document))
    refused = run_cli("--plan", str(plan_path), "backup", "hr_config", env=env)
    assert refused.returncode == 11, refused.stderr
    assert "does not match its content" in refused.stderr
