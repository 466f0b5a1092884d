"""Shared fixtures. The S3 ones run one real SeaweedFS server per test session; the Vault ones
one real OpenBao dev server (and a fresh one for a test that seals it)."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from spark_backup.engine.secrets.redact import REDACTOR
from spark_backup.service import BackupService
from spark_backup_tests.helpers import config_source, make_estate, make_key, plan_dict, write_plan
from spark_backup_tests.openbao import OpenBao, openbao_server
from spark_backup_tests.seaweedfs import SeaweedFS, seaweedfs_server

# The production-stack test (a 90-run backfill whose run processes mostly wait on each other)
# runs in a lane of its own, beside every other test in the second lane, one after another as
# without xdist: the suite's wall time is then the longer lane's, not the sum (``-n 2``).
STACK_LANE_MODULES = ("test_deploy_postgres.py",)


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return "stack" if nodeid.split("::")[0].endswith(STACK_LANE_MODULES) else "rest"

    return Lanes(config, log)


@pytest.fixture(autouse=True)
def _forget_resolved_secrets() -> Iterator[None]:
    """Each test starts with no secret registered for redaction: a value one test resolved
    (say ``secret``) must not mask another test's messages."""
    yield
    REDACTOR.clear()


# Restores record their staging folders for prune under $XDG_STATE_HOME: tests keep theirs
# out of the home folder of whoever runs them.
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="spark-backup-test-state-")
atexit.register(shutil.rmtree, os.environ["XDG_STATE_HOME"], True)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    with seaweedfs_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpenBao]:
    with openbao_server(tmp_path_factory.mktemp("openbao")) as server:
        yield server


@pytest.fixture
def sealable_openbao(tmp_path: Path) -> Iterator[OpenBao]:
    """An OpenBao server of this test's own, which it may seal."""
    with openbao_server(tmp_path / "openbao") as server:
        yield server


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedFS) -> str:
    """A fresh, empty, unversioned bucket."""
    return seaweedfs.make_bucket(f"test-{uuid.uuid4().hex[:20]}")


@pytest.fixture
def s3_lock_bucket(seaweedfs: SeaweedFS) -> str:
    """A fresh bucket created with Object Lock enabled (and so versioned)."""
    return seaweedfs.make_bucket(f"lock-{uuid.uuid4().hex[:20]}", object_lock=True)


# --- plans, keys and estates on the local store -----------------------------------------------


@pytest.fixture
def age_key(tmp_path):
    """(identity file, public key) of a fresh age X25519 key."""
    return make_key(tmp_path / "keys")


@pytest.fixture
def estate(tmp_path):
    return make_estate(tmp_path / "estate")


@pytest.fixture
def local_plan(tmp_path, age_key, estate):
    """A plan with one weekly configuration source on a local store, and its path."""
    plan = plan_dict([age_key[1]], [config_source("dgx_config", [str(estate)], exclude=["*.swp"])])
    return write_plan(tmp_path, plan)


@pytest.fixture
def service(local_plan):
    return BackupService.from_path(local_plan)
