"""Shared fixtures. The S3 ones run one real SeaweedFS server per test session; the Vault ones
one real OpenBao dev server (and a fresh one for a test that seals it)."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from spark_backup.engine.secrets.redact import REDACTOR
from spark_backup.service import BackupService
from spark_backup_tests.helpers import config_source, make_estate, make_key, plan_dict, write_plan
from spark_backup_tests.openbao import OpenBao, openbao_server
from spark_backup_tests.seaweedfs import SeaweedFS, seaweedfs_server

# The production-stack test (a 90-run backfill whose run processes mostly wait on each other,
# about 4 minutes) has a worker of its own from the start and nothing after it; every other
# test module is handed, whole (its module fixtures stay on one worker), to the next free
# worker: the suite's wall time is then about the longer of the stack test and half of the
# rest (``-n 3``), not their sum.
STACK_LANE_MODULES = ("test_deploy_postgres.py",)
# Modules that take a minute or more (dagster dev in a browser, the demo): started early so that
# none of them is the last one running.
LONG_MODULES = ("test_dagster_dev.py", "test_demo.py", "test_deploy_files.py")


def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    from xdist.scheduler import LoadScopeScheduling

    class Lanes(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return nodeid.split("::")[0]  # the module

        def _assign_work_unit(self, node: Any) -> None:
            # The stack test's module to the front, the long modules just behind it.
            for scope in sorted(self.workqueue, key=_start_order, reverse=True):
                if _start_order(scope) < 2:
                    self.workqueue.move_to_end(scope, last=False)
            stack_test = _start_order(next(iter(self.workqueue))) == 0
            super()._assign_work_unit(node)
            if stack_test:
                # A worker runs its last test only once it knows what follows; told that
                # nothing does, it runs the stack test at once and then stops.
                node.shutdown()

    return Lanes(config, log)


def _start_order(module: str) -> int:
    """0 for the stack test's module, 1 for the long modules, 2 for the rest."""
    if module.endswith(STACK_LANE_MODULES):
        return 0
    return 1 if module.endswith(LONG_MODULES) else 2


@pytest.fixture
def worker_starts(monkeypatch: pytest.MonkeyPatch) -> list[subprocess.Popen[bytes]]:
    """Every age worker process started from here on."""
    from spark_backup.engine import age_worker

    started: list[subprocess.Popen[bytes]] = []
    real = subprocess.Popen

    def recording(args, *rest, **kwargs):
        process = real(args, *rest, **kwargs)
        if "spark_backup.engine.age_worker" in args:
            started.append(process)
        return process

    monkeypatch.setattr(age_worker.subprocess, "Popen", recording)
    return started


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
