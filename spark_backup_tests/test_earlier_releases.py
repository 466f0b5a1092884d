"""Copies written by earlier releases still list, verify (deep) and restore, unchanged."""

from __future__ import annotations

import hashlib
import json
import shutil
import uuid
from contextlib import closing
from pathlib import Path

import psycopg
import pytest

from spark_backup.service import BackupService
from spark_backup_tests.helpers import plan_dict, write_plan

FIXTURES = Path(__file__).parent / "fixtures"
RELEASE_0_1_0 = FIXTURES / "release-0.1.0"
PG = {"host": "127.0.0.1", "port": 5432, "user": "postgres"}


@pytest.fixture
def release_0_1_0(tmp_path: Path) -> tuple[BackupService, Path]:
    store = tmp_path / "store"
    shutil.copytree(RELEASE_0_1_0 / "store", store)
    key = RELEASE_0_1_0 / "age.key"
    public = next(
        line.split(": ", 1)[1]
        for line in key.read_text().splitlines()
        if line.startswith("# public key: ")
    )
    sources = [
        {
            "name": "release_config",
            "kind": "config_archive",
            "cadence": "weekly",
            "owner": "team:platform",
            "paths": ["estate"],
        },
        {
            "name": "release_pg",
            "kind": "postgres",
            "cadence": "daily",
            "owner": "team:dba",
            "databases": ["sbfixture_release"],
            "base_backup": {"enabled": False},
            "wal_archiving": False,
            **PG,
        },
    ]
    plan = plan_dict(
        [public], sources, stores=[{"name": "local", "kind": "local", "path": str(store)}]
    )
    return BackupService.from_path(write_plan(tmp_path, plan)), key


def test_release_0_1_0_copies_list_verify_and_restore(release_0_1_0, tmp_path: Path) -> None:
    service, key = release_0_1_0
    refs = service.copies()
    assert [(r.manifest.source, r.manifest.part) for r in refs] == [
        ("release_config", ""),
        ("release_pg", "globals"),
        ("release_pg", "database:sbfixture_release"),
    ]
    identities = service.identities(key)
    for ref in refs:
        assert service.verify(ref).ok
        assert service.verify(ref, identities).ok
    config = refs[0].manifest
    target = tmp_path / "restored"
    summary = service.restore(config.id, target, identity_file=key)
    assert summary["files"] == 2 and summary["symlinks"] == 1
    restored = next(target.rglob("wg0.conf"))
    assert restored.read_text() == "[Interface]\nListenPort = 51820\n"


def test_release_0_1_0_dump_restores_into_a_database(release_0_1_0) -> None:
    service, key = release_0_1_0
    dump = next(r for r in service.copies("release_pg") if r.manifest.part.startswith("database:"))
    database = f"sbrelease_{uuid.uuid4().hex[:10]}"
    try:
        summary = service.restore_to("database", dump.manifest.id, database, identity_file=key)
        assert summary["rows"] == 20
        with closing(psycopg.connect(dbname=database, **PG)) as conn, conn.cursor() as cursor:
            cursor.execute("SELECT count(*), max(name) FROM items")
            assert cursor.fetchone() == (20, "item 9")
    finally:
        with closing(psycopg.connect(dbname="postgres", **PG)) as conn:
            conn.autocommit = True
            with conn.cursor() as cursor:
                cursor.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")


BLOB_VERSIONS = FIXTURES / "blob-versions-ba6e858"
BLOB_SOURCES = ("release_flat", "release_ivf", "release_adapter")


def test_blob_versions_cut_by_fastcdc_list_verify_and_restore(tmp_path: Path, monkeypatch) -> None:
    """FAISS indexes and an adapter as the blob layer stored them before indexes were cut at
    their structure (no ``cut`` key): deep verify passes (tensor digests, probe answers) and
    every file restores with the digest it had."""
    store = tmp_path / "store"
    shutil.copytree(BLOB_VERSIONS / "store", store)
    monkeypatch.setenv("SPARK_FIXTURE_CHUNK_KEY", "fixture-chunk-key-of-release-ba6e858")
    key = BLOB_VERSIONS / "age.key"
    public = next(
        line.split(": ", 1)[1]
        for line in key.read_text().splitlines()
        if line.startswith("# public key: ")
    )
    gone = tmp_path / "gone"  # the sources' data is not needed to list, verify or restore
    faiss = {"kind": "faiss", "embedding_model": {"name": "bge-small-en", "version": "1.5"}}
    sources = [
        {
            **faiss,
            "name": name,
            "index": str(gone / name / "index.faiss"),
            "id_mapping": str(gone / name / "ids.json"),
            "document_store": str(gone / name / "docstore.jsonl"),
        }
        for name in BLOB_SOURCES[:2]
    ] + [{"kind": "llm_artifacts", "name": BLOB_SOURCES[2], "path": str(gone / "adapter")}]
    for source in sources:
        source.update(cadence="daily", owner="team:ml", chunk_key="env:SPARK_FIXTURE_CHUNK_KEY")
    plan = plan_dict(
        [public], sources, stores=[{"name": "local", "kind": "local", "path": str(store)}]
    )
    service = BackupService.from_path(write_plan(tmp_path, plan))
    expected = json.loads((BLOB_VERSIONS / "expected.json").read_text())
    refs = service.copies()
    assert sorted(r.manifest.id for r in refs) == sorted(e["copy"] for e in expected.values())
    identities = service.identities(key)
    for ref in refs:
        assert service.verify(ref).ok
        outcome = service.verify(ref, identities)
        assert outcome.ok, outcome.error
        target = tmp_path / "restored" / ref.manifest.source
        service.restore(ref.manifest.id, target, identity_file=key)
        restored = {
            path.name: hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(target.rglob("*"))
            if path.is_file()
        }
        files = expected[ref.manifest.source]["files"]  # the source's own (FAISS adds probes)
        assert {name: restored.get(name) for name in files} == files, ref.manifest.source
