"""Copies written by earlier releases still list, verify (deep) and restore, unchanged."""

from __future__ import annotations

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
