"""The MongoDB runbook's by-hand blocks, as an operator would paste them: age, zstd, tar and
jq give back mongodump's layout whose BSON files hold the documents the manifest counted and
digested; where ``mongorestore`` is on the PATH, it restores that folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_backup.service import BackupService
from spark_backup.sources.mongodb.bsonfile import CollectionDigest, iter_documents
from spark_backup_tests.contract.cases import fill_mongo_database
from spark_backup_tests.helpers import mongodb_source, plan_dict, write_plan
from spark_backup_tests.mongo_server import mongo_server
from spark_backup_tests.test_runbooks import DOCS, fenced_blocks

RUNBOOK = DOCS / "runbooks" / "mongodb.md"


def _block(starts: str) -> str:
    (script,) = [b for b in fenced_blocks(RUNBOOK, "bash") if b.startswith(starts)]
    return script


def _run(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def dumped(tmp_path: Path, age_key) -> Iterator[tuple[BackupService, str, dict[str, str]]]:
    database = f"sbrunbook_{uuid.uuid4().hex[:8]}"
    with mongo_server().client() as client:
        fill_mongo_database(client, database)
        source = mongodb_source(mongo_server().uri, [database])
        service = BackupService.from_path(write_plan(tmp_path, plan_dict([age_key[1]], [source])))
        service.backup("docs")
        env = {
            "STORE": str(service.store("local").root),
            "SOURCE": "docs",
            "KEY": str(age_key[0]),
            "DUMP": str(tmp_path / "dump"),
            "DB": database,
            "TARGET_URI": mongo_server().uri,
        }
        try:
            yield service, database, env
        finally:
            client.drop_database(database)
            client.drop_database(f"{database}_restored")


def test_dump_restored_by_hand_holds_what_the_manifest_counted(dumped) -> None:
    service, database, env = dumped
    [newest] = service.backup("docs")
    result = _run(_block("# What to restore"), env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert newest.id in result.stdout
    for namespace, recorded in newest.source_metadata["collections"].items():
        _db, _, collection = namespace.partition(".")
        digest = CollectionDigest()
        with open(Path(env["DUMP"]) / database / f"{collection}.bson", "rb") as handle:
            for raw in iter_documents(handle, namespace):
                digest.add(raw)
        assert digest.documents == recorded["documents"] and digest.digest == recorded["digest"]
        assert (Path(env["DUMP"]) / database / f"{collection}.metadata.json").is_file()


def test_mongorestore_restores_the_folder(dumped) -> None:
    if not shutil.which("mongorestore"):
        pytest.skip("mongorestore (MongoDB Database Tools) is not on the PATH here")
    _service, database, env = dumped
    assert _run(_block("# What to restore"), env).returncode == 0
    result = _run(_block("# 4."), env)
    assert result.returncode == 0, result.stderr
    with mongo_server().client() as client:
        assert client[f"{database}_restored"].orders.count_documents({}) == 300
