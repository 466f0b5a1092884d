"""The kind contract suite, in the manner of restic's backend suite: one set of tests that every
registered kind passes unchanged, plus a toy kind defined only in the tests, which gets an
asset, its checks, a CLI listing and retention without a change anywhere in spark_backup."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from dagster import AssetCheckKey

from spark_backup.cli import cli
from spark_backup.defs.assets import backup_asset_key, system_asset_key
from spark_backup.defs.build import build_definitions
from spark_backup.defs.checks import CHECKSUM_CHECK, FRESHNESS_CHECK
from spark_backup.errors import IntegrityError
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup.sources import registry
from spark_backup.sources.base import SemanticCheck
from spark_backup_tests.contract import toy_kind
from spark_backup_tests.contract.cases import CASES, KindCase
from spark_backup_tests.helpers import flip_last_byte


@pytest.fixture(scope="module", autouse=True)
def toy_registered() -> Iterator[None]:
    registry.register(toy_kind.KIND)
    yield
    registry.unregister(toy_kind.TOY)


def _kind_names() -> list[str]:
    registry.register(toy_kind.KIND)  # parametrization runs before the fixture
    return sorted(registry.kinds())


@pytest.fixture(params=_kind_names())
def case(request, tmp_path: Path, age_key) -> Iterator[tuple[KindCase, Path]]:
    name = request.param
    assert name in CASES, f"kind {name!r} has no case in spark_backup_tests/contract/cases.py"
    with CASES[name](tmp_path, age_key[1]) as made:
        yield made, age_key[0]


def _local_path(ref) -> Path:
    return Path(ref.store.object_uri(ref.manifest.data_key).removeprefix("file://"))


def test_backup_list_verify_restore(case, tmp_path: Path) -> None:
    made, identity = case
    service = BackupService.from_path(made.plan)
    manifests = service.backup(made.source)
    assert manifests and all(m.source == made.source for m in manifests)
    refs = service.copies(made.source)
    assert sorted(r.manifest.id for r in refs) == sorted(m.id for m in manifests)

    listed = CliRunner().invoke(cli, ["--plan", str(made.plan), "list", made.source, "--json"])
    assert listed.exit_code == 0, listed.output
    assert {row["id"] for row in json.loads(listed.output)} == {m.id for m in manifests}

    identities = service.identities(identity)
    for ref in refs:
        assert service.verify(ref).ok
        deep = service.verify(ref, identities)
        assert deep.ok and deep.deep, deep.error
        target = tmp_path / "restored" / ref.manifest.id
        summary = service.restore(ref.manifest.id, target, identity_file=identity)
        assert summary["files"] >= 1 and any(target.iterdir())


def test_semantic_check_proves_a_copy_usable(case, tmp_path: Path) -> None:
    """Semantic checks are optional in the contract; every kind here has one."""
    made, identity = case
    service = BackupService.from_path(made.plan)
    kind = service.kind_of(service.source(made.source))
    assert isinstance(kind, SemanticCheck), f"{kind.name} declares no semantic check"
    service.backup(made.source)
    for ref in service.copies(made.source):
        scratch = tmp_path / "scratch" / ref.manifest.id
        scratch.mkdir(parents=True)
        result = kind.semantic_check(service, ref, service.identities(identity), scratch)
        assert result.passed, result.description
        assert list(scratch.iterdir()) == []  # the check cleans up after itself


def test_a_damaged_copy_is_refused(case, tmp_path: Path) -> None:
    made, identity = case
    service = BackupService.from_path(made.plan)
    service.backup(made.source)
    ref = service.copies(made.source)[-1]
    path = _local_path(ref)
    path.write_bytes(flip_last_byte(path.read_bytes()))
    assert not service.verify(ref).ok
    deep = service.verify(ref, service.identities(identity))
    assert not deep.ok and deep.error
    target = tmp_path / "never"
    with pytest.raises(IntegrityError):
        service.restore(ref.manifest.id, target, identity_file=identity)
    assert not target.exists()  # nothing published, not even an empty folder


def test_prune_keeps_what_retention_keeps(case) -> None:
    made, _identity = case
    service = BackupService.from_path(made.plan)
    first = service.backup(made.source)
    second = service.backup(made.source)
    dry = service.prune(dry_run=True)
    assert sorted(dry.expired) == sorted(m.id for m in first)
    assert len(service.copies(made.source)) == len(first) + len(second)
    applied = service.prune(dry_run=False)
    assert sorted(applied.expired) == sorted(m.id for m in first)
    assert sorted(r.manifest.id for r in service.copies(made.source)) == sorted(
        m.id for m in second
    )


def test_every_kind_gets_its_assets_and_checks(case) -> None:
    made, _identity = case
    loaded = load_plan(made.plan)
    defs = build_definitions(loaded)
    graph = defs.resolve_asset_graph()
    source = loaded.plan.source(made.source)
    primary = BackupService(loaded).artifact(source)
    key = backup_asset_key(made.source, primary)
    assert graph.get(key).parent_keys == {system_asset_key(made.source)}
    assert {AssetCheckKey(key, CHECKSUM_CHECK), AssetCheckKey(key, FRESHNESS_CHECK)} <= set(
        graph.asset_check_keys
    )
    assert graph.get(key).owners == [source.owner] and graph.get(key).group_name == source.kind
