"""Secrets: references in the plan, the environment and Vault backends (a real OpenBao), the
rotation rule and check, a sealed or unreachable Vault, and no value anywhere a run leaves
something behind."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest
import yaml
from dagster import AssetCheckKey, DagsterInstance

from spark_backup.defs.assets import system_asset_key
from spark_backup.defs.build import build_definitions
from spark_backup.defs.checks import ROTATION_CHECK
from spark_backup.defs.schedules import ROTATION_JOB
from spark_backup.engine.cadence import partition_key_for
from spark_backup.engine.secrets import (
    EnvSecrets,
    Redactor,
    RotationPolicy,
    SecretResolver,
    SecretValue,
    VaultSecrets,
    parse_reference,
)
from spark_backup.errors import PlanError, SecretError, SecretsUnavailableError, SourceError
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup_tests.helpers import config_source, free_port, plan_dict, run_cli, write_plan
from spark_backup_tests.openbao import KV_MOUNT, OpenBao, bao_binary
from spark_backup_tests.pg_cluster import OS_USER, shared_dir, throwaway_cluster
from spark_backup_tests.test_runbooks import DOCS, fenced_blocks

DAY = dt.timedelta(days=1)


def _vault_plan(tmp_path: Path, openbao: OpenBao, public: str, estate: Path, **extra) -> Path:
    plan = plan_dict(
        [public],
        [config_source("dgx_config", [str(estate)])],
        secrets={"vault": {"address": openbao.address, "token_env": "SB_TEST_BAO_TOKEN"}},
        **extra,
    )
    return write_plan(tmp_path, plan)


# --- references ---------------------------------------------------------------------------------


def test_references_parse_and_inline_secrets_are_refused_by_field(tmp_path, age_key) -> None:
    assert str(parse_reference("env:PGPASSWORD_MAIN")) == "env:PGPASSWORD_MAIN"
    assert parse_reference("vault:kv/spark/pg#password").vault_parts == (
        "kv",
        "spark/pg",
        "password",
    )
    cases = [
        (
            {"encryption": {"recipients": [age_key[1]], "identity": "AGE-SECRET-KEY-1HUNTER2"}},
            "encryption.identity: inline secret is not allowed; write a reference",
        ),
        (
            {"secrets": {"vault": {"address": "ftp://x"}}},
            "secrets.vault.address",
        ),
        (
            {"encryption": {"recipients": [age_key[1]], "identity": "vault:kv#hunter2"}},
            "encryption.identity: expected vault:MOUNT/PATH#FIELD",
        ),
    ]
    for index, (extra, expected) in enumerate(cases):
        plan = plan_dict([age_key[1]], [config_source("dgx_config", ["/etc"])])
        plan.update(extra)
        path = write_plan(tmp_path, plan, f"plan{index}.yaml")
        with pytest.raises(PlanError) as raised:
            load_plan(path)
        message = str(raised.value)
        assert expected in message and "\n" not in message
        assert "HUNTER2" not in message.upper()


def test_old_env_fields_read_as_env_references(tmp_path, age_key) -> None:
    store = {
        "name": "s3",
        "kind": "s3",
        "bucket": "b-1",
        "access_key_id_env": "K",
        "secret_access_key_env": "S",
    }
    plan = plan_dict([age_key[1]], [config_source("dgx_config", ["/etc"])], stores=[store])
    loaded = load_plan(write_plan(tmp_path, plan))
    service = BackupService(loaded)
    assert [(p, str(r)) for p, r in service.secret_references()] == [
        ("stores[0].access_key_id", "env:K"),
        ("stores[0].secret_access_key", "env:S"),
    ]


# --- the redactor -------------------------------------------------------------------------------


def test_redactor_masks_values_in_errors_and_log_records(caplog) -> None:
    value = "pw-" + uuid.uuid4().hex
    resolver = SecretResolver({"env": EnvSecrets({"SB_PW": value})})
    assert resolver.resolve(parse_reference("env:SB_PW")) == value
    assert value not in str(SourceError(f"server said: password {value} is wrong"))
    with caplog.at_level(logging.INFO):
        logging.getLogger("spark_backup.test").info("connecting with %s", value)
        logging.getLogger("dagster.test").warning(f"inline {value}")
    assert value not in caplog.text and "[redacted]" in caplog.text
    secret = resolver.read(parse_reference("env:SB_PW"))
    assert value not in repr(secret) and value not in str(secret)

    local = Redactor()
    local.add("abc")  # too short to mask without masking ordinary words
    assert local.redact("abcdef") == "abcdef"


# --- Vault (OpenBao) ----------------------------------------------------------------------------


def test_vault_reads_value_version_and_age(openbao: OpenBao) -> None:
    path = f"spark/{uuid.uuid4().hex[:8]}"
    written = openbao.put(path, password="first-" + uuid.uuid4().hex)
    openbao.put(path, password="second-" + uuid.uuid4().hex)
    vault = VaultSecrets(openbao.address, openbao.root_token)
    secret = vault.read(parse_reference(f"vault:{KV_MOUNT}/{path}#password"))
    assert secret.reveal().startswith("second-")
    assert secret.version == written["version"] + 1
    assert secret.created_at is not None
    assert abs(secret.created_at - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)

    errors = {
        f"vault:{KV_MOUNT}/{path}#nope": "has no field 'nope' (fields: password)",
        f"vault:{KV_MOUNT}/spark/absent#x": "no secret 'spark/absent' under KV v2 mount",
    }
    for text, expected in errors.items():
        with pytest.raises(SecretError) as raised:
            vault.read(parse_reference(text))
        assert expected in str(raised.value) and raised.value.exit_code == 9
    with pytest.raises(SecretError, match="refused the token") as refused:
        VaultSecrets(openbao.address, "not-the-token").read(
            parse_reference(f"vault:{KV_MOUNT}/{path}#password")
        )
    assert not isinstance(refused.value, SecretsUnavailableError)


def test_sealed_and_unreachable_vault_fail_with_exit_10_and_no_fallback(
    tmp_path, sealable_openbao: OpenBao, age_key, estate, monkeypatch
) -> None:
    openbao = sealable_openbao
    openbao.put("spark/age", identity=age_key[0].read_text().splitlines()[1])
    plan = _vault_plan(tmp_path, openbao, age_key[1], estate)
    data = yaml.safe_load(plan.read_text())
    data["encryption"]["identity"] = f"vault:{KV_MOUNT}/spark/age#identity"
    plan.write_text(yaml.safe_dump(data))
    env = {"SB_TEST_BAO_TOKEN": openbao.root_token}
    assert run_cli("--plan", str(plan), "backup", "dgx_config", env=env).returncode == 0
    [copy] = json.loads(run_cli("--plan", str(plan), "list", "--json", check=True).stdout)
    restored = run_cli(
        "--plan", str(plan), "restore", copy["id"], "--to", str(tmp_path / "r1"), env=env
    )
    assert restored.returncode == 0, restored.stderr

    openbao.seal()
    # The identity file is right there, and $SPARK_BACKUP_IDENTITY is not set: nothing falls
    # back to a weaker source when the plan says the identity is in Vault.
    sealed = run_cli(
        "--plan", str(plan), "restore", copy["id"], "--to", str(tmp_path / "r2"), env=env
    )
    assert sealed.returncode == 10, sealed.stderr
    assert "is sealed" in sealed.stderr and "encryption.identity" in sealed.stderr
    assert len(sealed.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r2").exists() or not any((tmp_path / "r2").iterdir())
    status = run_cli("--plan", str(plan), "secrets", "status", env=env)
    assert status.returncode == 10 and "is sealed" in status.stderr

    data["secrets"]["vault"]["address"] = f"http://127.0.0.1:{free_port()}"
    plan.write_text(yaml.safe_dump(data))
    unreachable = run_cli(
        "--plan", str(plan), "restore", copy["id"], "--to", str(tmp_path / "r3"), env=env
    )
    assert unreachable.returncode == 10
    assert "cannot be reached" in unreachable.stderr


def test_rotation_fails_at_183_days_and_passes_after_rotation(
    tmp_path, openbao: OpenBao, age_key, estate, monkeypatch
) -> None:
    path = f"spark/{uuid.uuid4().hex[:8]}"
    first = openbao.put(path, password="one-" + uuid.uuid4().hex)
    plan = plan_dict(
        [age_key[1]],
        [
            {
                "kind": "postgres",
                "name": "pg_main",
                "cadence": "daily",
                "owner": "team:data",
                "host": "127.0.0.1",
                "user": "postgres",
                "password": f"vault:{KV_MOUNT}/{path}#password",
            }
        ],
        secrets={"vault": {"address": openbao.address, "token_env": "SB_TEST_BAO_TOKEN"}},
    )
    plan_path = write_plan(tmp_path, plan)
    monkeypatch.setenv("SB_TEST_BAO_TOKEN", openbao.root_token)

    written = dt.datetime.fromisoformat(first["created_time"][:26].rstrip("Z") + "+00:00")
    later = written + 183 * DAY
    [status] = BackupService.from_path(plan_path).secrets_status(now=later)
    assert status.path == "sources[0].password" and status.failed
    assert status.finding.verdict == "overdue" and status.finding.age.days == 183
    assert "over the rotation limit of 26w" in status.finding.reason

    second = openbao.put(path, password="two-" + uuid.uuid4().hex)
    rotated = dt.datetime.fromisoformat(second["created_time"][:26].rstrip("Z") + "+00:00")
    [status] = BackupService.from_path(plan_path).secrets_status(now=rotated + DAY)
    assert not status.failed and status.finding.verdict == "ok"
    assert status.finding.secret.version == first["version"] + 1

    # The same through the Dagster check, with the clock 183 days on.
    monkeypatch.setattr("spark_backup.service.secrets.utcnow", lambda: later)
    assert not _rotation_check(plan_path, "pg_main").passed
    monkeypatch.setattr("spark_backup.service.secrets.utcnow", lambda: rotated + DAY)
    result = _rotation_check(plan_path, "pg_main")
    assert result.passed
    assert result.metadata["oldest_days"].value == 1


def _rotation_check(plan_path: Path, source: str):
    """The Dagster rotation check of ``source``, run by the job its schedule runs."""
    defs = build_definitions(load_plan(plan_path))
    with DagsterInstance.ephemeral() as instance:
        run = defs.resolve_job_def(ROTATION_JOB).execute_in_process(
            instance=instance, raise_on_error=False
        )
    [evaluation] = run.get_asset_check_evaluations()
    assert evaluation.asset_check_key == AssetCheckKey(system_asset_key(source), ROTATION_CHECK)
    return evaluation


def test_unknown_age_fails_by_default_and_warns_when_allowed() -> None:
    secret = SecretValue(parse_reference("env:X"), "value")
    now = dt.datetime.now(dt.UTC)
    finding = RotationPolicy().judge(secret, now)
    assert finding.verdict == "unknown" and finding.failed
    assert not RotationPolicy(unknown_age_fails=False).judge(secret, now).failed


def test_secrets_status_lists_versions_and_ages_never_values(
    tmp_path, openbao: OpenBao, seaweedfs, s3_lock_bucket, age_key, estate
) -> None:
    """S3 credentials and the age identity come from OpenBao; a backup, list, verify and
    restore work with them, and no value appears in anything the run leaves behind."""
    base = f"spark/{uuid.uuid4().hex[:8]}"
    identity = age_key[0].read_text().splitlines()[1]
    openbao.put(f"{base}/s3", key_id=seaweedfs.access_key, secret=seaweedfs.secret_key)
    openbao.put(f"{base}/age", identity=identity)
    store = {
        "name": "worm",
        "kind": "s3",
        "endpoint_url": seaweedfs.endpoint_url,
        "bucket": s3_lock_bucket,
        "region_name": seaweedfs.region,
        "access_key_id": f"vault:{KV_MOUNT}/{base}/s3#key_id",
        "secret_access_key": f"vault:{KV_MOUNT}/{base}/s3#secret",
        "object_lock": {"mode": "COMPLIANCE", "retain_days": 1},
    }
    plan = plan_dict(
        [age_key[1]],
        [config_source("dgx_config", [str(estate)])],
        stores=[store],
        secrets={"vault": {"address": openbao.address, "token_env": "SB_TEST_BAO_TOKEN"}},
    )
    plan["encryption"]["identity"] = f"vault:{KV_MOUNT}/{base}/age#identity"
    plan_path = write_plan(tmp_path, plan)
    age_key[0].unlink()  # the identity exists only in OpenBao now
    env = {"SB_TEST_BAO_TOKEN": openbao.root_token}
    outputs = []
    for args in (
        ("backup", "dgx_config", "--json"),
        ("list", "--json"),
        ("verify", "--deep", "--json"),
        ("secrets", "status", "--json"),
        ("secrets", "status"),
    ):
        result = run_cli("--plan", str(plan_path), *args, env=env)
        assert result.returncode == 0, result.stderr
        outputs.append(result.stdout + result.stderr)
    [copy] = json.loads(outputs[1])
    verified = json.loads(outputs[2])
    assert verified[0]["ok"] and verified[0]["deep"]  # opened with the identity from OpenBao
    restored = run_cli(
        "--plan", str(plan_path), "restore", copy["id"], "--to", str(tmp_path / "out"), env=env
    )
    assert restored.returncode == 0, restored.stderr
    outputs.append(restored.stdout + restored.stderr)

    rows = {row["field"]: row for row in json.loads(outputs[3])}
    assert set(rows) == {
        "encryption.identity",
        "stores[0].access_key_id",
        "stores[0].secret_access_key",
    }
    for row in rows.values():
        assert row["backend"] == "vault" and row["version"] == 1 and row["age_days"] == 0
        assert row["rotation"] == "ok" and not row["failed"]
    assert "rotation limit 182 days" in outputs[4]

    values = [seaweedfs.secret_key, seaweedfs.access_key, identity]
    left_behind = "\n".join(outputs)
    for obj in seaweedfs.client().list_object_versions(Bucket=s3_lock_bucket).get("Versions", []):
        body = (
            seaweedfs.client()
            .get_object(Bucket=s3_lock_bucket, Key=obj["Key"], VersionId=obj["VersionId"])["Body"]
            .read()
        )
        left_behind += body.decode("latin-1")
    for file in tmp_path.rglob("*"):
        if file.is_file() and file.name != "age.key":
            left_behind += file.read_bytes().decode("latin-1")
    for value in values:
        assert value not in left_behind


def test_postgres_password_from_openbao_through_dagster_leaves_no_trace(
    tmp_path, openbao: OpenBao, age_key
) -> None:
    """A SCRAM cluster whose password is only in OpenBao: a Dagster run backs it up, and the
    password is nowhere in the store, the run's events, logs or the instance's storage."""
    password = "pg-" + uuid.uuid4().hex
    path = f"spark/{uuid.uuid4().hex[:8]}"
    openbao.put(path, password=password)
    root = shared_dir("spark-backup-vault-pw-")
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    if OS_USER:
        shutil.chown(pwfile, OS_USER)
    source = {
        "name": "pg_vault",
        "kind": "postgres",
        "cadence": "daily",
        "owner": "team:dba",
        "host": "127.0.0.1",
        "user": "postgres",
        "password": f"vault:{KV_MOUNT}/{path}#password",
        "databases": ["postgres"],
        "base_backup": {"enabled": False},
        "wal_archiving": False,
    }
    home = tmp_path / "dagster_home"
    home.mkdir()
    try:
        with throwaway_cluster(
            "spark-backup-vault-", initdb_args=("-A", "scram-sha-256", f"--pwfile={pwfile}")
        ) as cluster:
            source["port"] = cluster.port
            plan = plan_dict(
                [age_key[1]],
                [source],
                secrets={"vault": {"address": openbao.address, "token_env": "SB_TEST_BAO_TOKEN"}},
            )
            plan_path = write_plan(tmp_path, plan)
            os.environ["SB_TEST_BAO_TOKEN"] = openbao.root_token
            try:
                defs = build_definitions(load_plan(plan_path))
                partition = partition_key_for("daily", dt.datetime.now(dt.UTC))
                with DagsterInstance.local_temp(str(home)) as instance:
                    result = defs.resolve_job_def("daily_backups").execute_in_process(
                        instance=instance, partition_key=partition, raise_on_error=False
                    )
                    assert result.success, [e.message for e in result.all_events if e.is_failure]
                    events = "\n".join(repr(record) for record in instance.all_logs(result.run_id))
            finally:
                del os.environ["SB_TEST_BAO_TOKEN"]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    copies = BackupService.from_path(plan_path).copies("pg_vault")
    assert copies and all(c.manifest.source == "pg_vault" for c in copies)
    assert "pg_vault" in events and password not in events
    for file in tmp_path.rglob("*"):
        if file.is_file():
            assert password.encode() not in file.read_bytes(), file


def test_runbook_rotation_block_runs_against_openbao(tmp_path, openbao: OpenBao) -> None:
    (script,) = [
        b
        for b in fenced_blocks(DOCS / "runbooks" / "vault.md", "bash")
        if b.startswith("# Rotate a secret")
    ]
    path = f"spark/{uuid.uuid4().hex[:8]}"
    first = openbao.put(path, password="old-" + uuid.uuid4().hex)
    bin_dir = bao_binary().parent
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={
            **os.environ,
            "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "BAO_ADDR": openbao.address,
            "BAO_TOKEN": openbao.root_token,
            "MOUNT": KV_MOUNT,
            "SECRET_PATH": path,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"version {first['version'] + 1} written 20")
    secret = VaultSecrets(openbao.address, openbao.root_token).read(
        parse_reference(f"vault:{KV_MOUNT}/{path}#password")
    )
    assert secret.version == first["version"] + 1 and not secret.reveal().startswith("old-")


def test_rotate_key_adds_a_recipient_and_old_copies_still_restore(
    tmp_path, openbao: OpenBao, age_key, estate
) -> None:
    path = f"spark/{uuid.uuid4().hex[:8]}"
    first = openbao.put(path, identity=age_key[0].read_text().splitlines()[1])
    plan_path = _vault_plan(tmp_path, openbao, age_key[1], estate)
    data = yaml.safe_load(plan_path.read_text())
    data["encryption"]["identity"] = f"vault:{KV_MOUNT}/{path}#identity"
    plan_path.write_text(yaml.safe_dump(data))
    env = {"SB_TEST_BAO_TOKEN": openbao.root_token}
    assert run_cli("--plan", str(plan_path), "backup", "dgx_config", env=env).returncode == 0

    rotated = run_cli("--plan", str(plan_path), "secrets", "rotate-key", env=env)
    assert rotated.returncode == 0, rotated.stderr
    new = rotated.stdout.split("new recipient: ", 1)[1].split()[0]
    assert new.startswith("age1") and new != age_key[1]
    assert f"secret version {first['version'] + 1}" in rotated.stdout
    assert "AGE-SECRET-KEY" not in rotated.stdout + rotated.stderr

    data["encryption"]["recipients"] = [new]
    plan_path.write_text(yaml.safe_dump(data))
    assert run_cli("--plan", str(plan_path), "backup", "dgx_config", env=env).returncode == 0
    copies = json.loads(run_cli("--plan", str(plan_path), "list", "--json", check=True).stdout)
    assert len(copies) == 2
    for copy in copies:  # the old copy (old recipient) and the new one both open
        target = tmp_path / f"r-{copy['id']}"
        restored = run_cli(
            "--plan", str(plan_path), "restore", copy["id"], "--to", str(target), env=env
        )
        assert restored.returncode == 0, restored.stderr

    data["encryption"]["identity_file"] = str(age_key[0])
    del data["encryption"]["identity"]
    plan_path.write_text(yaml.safe_dump(data))
    refused = run_cli("--plan", str(plan_path), "secrets", "rotate-key", env=env)
    assert refused.returncode == 2 and "not a vault: reference" in refused.stderr


def test_a_stopped_vault_opens_a_ticket_instead_of_a_bare_failure(
    tmp_path, seaweedfs, s3_bucket, age_key, estate
) -> None:
    """OpenBao holds the store's S3 credentials and is stopped: the backup fails with exit 10 and
    opens a ticket through the plan's desk; ``alerts`` raises the same ticket for every source
    that needs the backend (a comment, not a second ticket); no value reaches either."""
    from spark_backup.notify.desk import LEDGER, OUTBOX
    from spark_backup.service.alerts import SECRETS_ALERT
    from spark_backup_tests.openbao import openbao_server

    base = f"spark/{uuid.uuid4().hex[:8]}"
    store = {
        "name": "offsite",
        "kind": "s3",
        "endpoint_url": seaweedfs.endpoint_url,
        "bucket": s3_bucket,
        "region_name": seaweedfs.region,
        "access_key_id": f"vault:{KV_MOUNT}/{base}/s3#key_id",
        "secret_access_key": f"vault:{KV_MOUNT}/{base}/s3#secret",
    }
    with openbao_server(tmp_path / "openbao") as bao:
        bao.put(f"{base}/s3", key_id=seaweedfs.access_key, secret=seaweedfs.secret_key)
        plan = plan_dict(
            [age_key[1]],
            [config_source("dgx_config", [str(estate)])],
            stores=[store],
            secrets={"vault": {"address": bao.address, "token_env": "SB_TEST_BAO_TOKEN"}},
        )
        plan["notifications"] = {"state_dir": "notifications"}
        plan_path = write_plan(tmp_path, plan)
        env = {"SB_TEST_BAO_TOKEN": bao.root_token}
        run_cli("--plan", str(plan_path), "backup", "dgx_config", env=env, check=True)
        token = bao.root_token
    # OpenBao is stopped now.
    outbox = tmp_path / "notifications" / OUTBOX
    assert not outbox.exists()
    failed = run_cli("--plan", str(plan_path), "backup", "dgx_config", env=env)
    assert failed.returncode == 10, failed.stderr
    assert "cannot be reached" in failed.stderr and "stores[0]" not in failed.stdout
    assert "ticket opened: OUTBOX-1 (secrets unavailable)" in failed.stderr
    [ticket] = [json.loads(line) for line in outbox.read_text().splitlines()]
    assert ticket["title"] == f"spark-backup: {SECRETS_ALERT} failed for dgx_config (no partition)"
    assert "backups of dgx_config cannot read their secrets" in ticket["body"]
    assert f"vault:{KV_MOUNT}/{base}/s3#" in ticket["body"]

    # The alerts run (cron, or a person) says the same without attempting a backup.
    alerts = run_cli("--plan", str(plan_path), "alerts", "--json", env=env)
    found = json.loads(alerts.stdout)
    assert [a["check"] for a in found if a["source"] == "dgx_config"] == [SECRETS_ALERT], found
    ledger = json.loads((tmp_path / "notifications" / LEDGER).read_text())
    assert list(ledger["tickets"]) == [f"dgx_config/-/{SECRETS_ALERT}"]
    left_behind = outbox.read_text() + (tmp_path / "notifications" / LEDGER).read_text()
    left_behind += failed.stdout + failed.stderr + alerts.stdout + alerts.stderr
    for value in (seaweedfs.secret_key, seaweedfs.access_key, token):
        assert value not in left_behind
