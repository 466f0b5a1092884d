"""Replication to a second target: an OCI registry (Debian's docker-registry, real, on
127.0.0.1) through the oras client, and another store; the ``replicated`` check, outages that
leave versions unreplicated and retried, and the replica asset downstream of the backups."""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from dagster import AssetCheckKey, AssetKey, DagsterInstance

from spark_backup.defs.build import build_definitions
from spark_backup.defs.replication import REPLICATED_CHECK, replica_asset_key
from spark_backup.engine.cadence import partition_key_for
from spark_backup.engine.pipeline import utcnow
from spark_backup.engine.replication.oci import ARTIFACT_TYPE, CONFIG_MEDIA_TYPE
from spark_backup.engine.replication.records import replica_prefix
from spark_backup.plan import load_plan
from spark_backup.service import BackupService
from spark_backup_tests.helpers import config_source, plan_dict, run_cli, write_plan
from spark_backup_tests.oci_registry import Registry

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    made = Registry(tmp_path / "registry")
    made.start()
    try:
        yield made
    finally:
        made.stop()


def _targets(registry: Registry) -> list[dict]:
    return [
        {
            "name": "registry",
            "kind": "oci",
            "registry": registry.address,
            "repository": "spark-backup",
            "insecure": True,
            "timeout_seconds": 3,
        },
        {
            "name": "offsite",
            "kind": "store",
            "store": {"name": "offsite", "kind": "local", "path": "offsite"},
        },
    ]


def _plan(tmp_path: Path, age_key, estate: Path, registry: Registry, **source: object) -> Path:
    plan = plan_dict(
        [age_key[1]],
        [
            config_source(
                "vpn_config",
                [str(estate / "wireguard")],
                cadence="daily",
                replicate_to=["registry", "offsite"],
                **source,
            )
        ],
        replication=_targets(registry),
    )
    plan["encryption"]["identity_file"] = str(age_key[0])
    return write_plan(tmp_path, plan)


def _manifest(registry: Registry, reference: str) -> dict:
    import requests

    repository, tag = reference.split("/", 1)[1].rsplit(":", 1)
    answer = requests.get(
        f"http://{registry.address}/v2/{repository}/manifests/{tag}",
        headers={"Accept": "application/vnd.oci.image.manifest.v1+json"},
        timeout=5,
    )
    answer.raise_for_status()
    return answer.json()


def test_copies_replicate_to_a_registry_and_a_store(
    tmp_path: Path, age_key, estate: Path, registry: Registry
) -> None:
    plan = _plan(tmp_path, age_key, estate, registry)
    service = BackupService.from_path(plan)
    (manifest,) = service.backup("vpn_config")
    outcomes = service.replicate("vpn_config")
    assert {(o.target, o.replicated) for o in outcomes} == {("registry", True), ("offsite", True)}

    # The registry holds a ModelPack-style artifact: one layer per file, digests as OCI digests.
    reference = f"{registry.address}/spark-backup/vpn_config:{manifest.id}"
    found = _manifest(registry, reference)
    assert found["artifactType"] == ARTIFACT_TYPE
    assert found["config"]["mediaType"] == CONFIG_MEDIA_TYPE
    layers = {
        layer["annotations"]["org.opencontainers.image.title"]: layer for layer in found["layers"]
    }
    data_name = manifest.data_key.rsplit("/", 1)[-1]
    assert layers[data_name]["digest"] == f"sha256:{manifest.stored.sha256}"
    assert layers[data_name]["size"] == manifest.stored.bytes
    assert found["annotations"]["org.cncf.model.version"] == manifest.id

    # oras pulls it back: the very bytes of the copy and its manifest.
    import oras.client

    pulled = tmp_path / "pulled"
    oras.client.OrasClient(insecure=True).pull(target=reference, outdir=str(pulled))
    store_root = tmp_path / "store"
    assert (pulled / data_name).read_bytes() == (store_root / manifest.data_key).read_bytes()
    assert json.loads((pulled / f"{manifest.id}.json").read_text())["id"] == manifest.id

    # The store replica is a store of its own: a plan pointing at it lists and verifies the copy.
    replica_plan = plan_dict(
        [age_key[1]],
        [config_source("vpn_config", [str(estate)])],
        stores=[{"name": "offsite", "kind": "local", "path": str(tmp_path / "offsite")}],
    )
    (tmp_path / "elsewhere").mkdir()
    other = BackupService.from_path(write_plan(tmp_path / "elsewhere", replica_plan))
    (ref,) = other.copies("vpn_config")
    assert ref.manifest.id == manifest.id and other.verify(ref).ok

    checked = service.check_replicas("vpn_config")
    assert all(o.replicated for o in checked) and len(checked) == 2
    cli = run_cli("--plan", str(plan), "replicate", "vpn_config", "--check-only", "--json")
    assert cli.returncode == 0, cli.stderr
    assert {r["target"] for r in json.loads(cli.stdout)} == {"registry", "offsite"}


def test_a_registry_outage_leaves_versions_unreplicated_and_the_next_run_pushes_them(
    tmp_path: Path, age_key, estate: Path, registry: Registry
) -> None:
    plan = _plan(tmp_path, age_key, estate, registry)
    service = BackupService.from_path(plan)
    (first,) = service.backup("vpn_config")
    assert all(o.replicated for o in service.replicate("vpn_config"))

    registry.stop()
    (second,) = service.backup("vpn_config")
    outcomes = {(o.version, o.target): o for o in service.replicate("vpn_config")}
    down = outcomes[(second.id, "registry")]
    assert not down.replicated and "unreachable" in (down.problem or "")
    assert outcomes[(second.id, "offsite")].replicated
    assert (first.id, "registry") not in outcomes  # replicated before: not pushed again
    cli = run_cli("--plan", str(plan), "replicate", "vpn_config")
    assert cli.returncode == 5
    errors = cli.stderr.strip().splitlines()
    # The check names both copies (the registry could not be asked), one line each.
    assert len(errors) == 2 and all(registry.address in line for line in errors)
    assert any(f"{second.id} not replicated to registry" in line for line in errors)

    # Nothing was lost or deleted: both copies are listed, the record says unreplicated.
    assert {r.manifest.id for r in service.copies("vpn_config")} == {first.id, second.id}
    states = service.replica_states("vpn_config")
    assert states["registry"][second.id].replicated is False
    listed = json.loads(run_cli("--plan", str(plan), "list", "--json", check=True).stdout)
    row = next(r for r in listed if r["id"] == second.id)
    assert row["replicas"]["registry"]["replicated"] is False
    assert "unreachable" in row["replicas"]["registry"]["problem"]
    assert row["replicas"]["offsite"]["replicated"] is True

    registry.start()
    again = {(o.version, o.target): o for o in service.replicate("vpn_config")}
    assert again[(second.id, "registry")].replicated and again[(second.id, "registry")].pushed
    assert all(o.replicated for o in service.check_replicas("vpn_config"))


def test_a_missing_or_different_replica_fails_the_check_and_nothing_is_deleted(
    tmp_path: Path, age_key, estate: Path, registry: Registry
) -> None:
    plan = _plan(tmp_path, age_key, estate, registry)
    service = BackupService.from_path(plan)
    (manifest,) = service.backup("vpn_config")
    service.replicate("vpn_config")

    # The registry lost the repository; the store replica's manifest was changed.
    shutil.rmtree(registry.repository_folder("spark-backup/vpn_config"))
    replica_manifest = tmp_path / "offsite" / "vpn_config" / "manifests" / f"{manifest.id}.json"
    replica_manifest.chmod(0o600)
    replica_manifest.write_bytes(replica_manifest.read_bytes() + b" ")
    checked = {o.target: o for o in service.check_replicas("vpn_config")}
    assert not checked["registry"].replicated and checked["registry"].problem == "no replica"
    assert not checked["offsite"].replicated and "digest" in (checked["offsite"].problem or "")
    states = service.replica_states("vpn_config")
    assert not states["registry"][manifest.id].replicated
    assert not states["offsite"][manifest.id].replicated

    # The next run pushes the missing replica again; the changed one is left as found.
    again = {o.target: o for o in service.replicate("vpn_config")}
    assert again["registry"].replicated
    assert not again["offsite"].replicated
    assert replica_manifest.read_bytes().endswith(b" ")
    assert [r.manifest.id for r in service.copies("vpn_config")] == [manifest.id]

    # Prune removes a copy's records with it, never the replicas.
    store = service.store_for(service.source("vpn_config"))
    assert list(store.list(replica_prefix("vpn_config")))


def test_the_replica_asset_is_downstream_of_the_backups_with_its_check(
    tmp_path: Path, age_key, estate: Path, registry: Registry
) -> None:
    plan = _plan(tmp_path, age_key, estate, registry)
    defs = build_definitions(load_plan(plan))
    graph = defs.resolve_asset_graph()
    key = replica_asset_key("vpn_config")
    assert graph.get(key).parent_keys == {AssetKey(["backups", "vpn_config"])}
    assert AssetCheckKey(key, REPLICATED_CHECK) in graph.asset_check_keys
    assert (
        graph.get(key).owners == ["team:platform"] and graph.get(key).group_name == "config_archive"
    )
    partition = partition_key_for("daily", utcnow())
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("daily_backups").execute_in_process(
            instance=instance, partition_key=partition, run_config=QUIET
        )
        assert result.success
        (evaluation,) = [
            e
            for e in result.get_asset_check_evaluations()
            if e.asset_check_key.name == REPLICATED_CHECK
        ]
        assert evaluation.passed
        (materialization,) = result.asset_materializations_for_node("replicas__vpn_config")
        assert materialization.metadata["replicated"].value == 2

        registry.stop()
        failed = defs.resolve_job_def("daily_backups").execute_in_process(
            instance=instance, partition_key=partition, run_config=QUIET, raise_on_error=False
        )
        evaluations = [
            e
            for e in failed.get_asset_check_evaluations()
            if e.asset_check_key.name == REPLICATED_CHECK
        ]
        assert evaluations and not evaluations[0].passed
        assert materializations_unreplicated(failed) >= 1


def materializations_unreplicated(result) -> int:
    (materialization,) = result.asset_materializations_for_node("replicas__vpn_config")
    return materialization.metadata["unreplicated"].value


def test_prune_removes_an_expired_copys_records_and_never_its_replicas(
    tmp_path: Path, age_key, estate: Path, registry: Registry
) -> None:
    plan = _plan(
        tmp_path, age_key, estate, registry, retention={"daily": 1, "weekly": 0, "monthly": 0}
    )
    service = BackupService.from_path(plan)
    (first,) = service.backup("vpn_config")
    service.replicate("vpn_config")
    (second,) = service.backup("vpn_config")
    service.replicate("vpn_config")
    store = service.store_for(service.source("vpn_config"))
    recorded = {
        key.key.rsplit("/", 1)[-1].split(".")[0] for key in store.list(replica_prefix("vpn_config"))
    }
    assert recorded == {first.id.split(".")[0], second.id.split(".")[0]}

    report = service.prune(dry_run=False)
    assert report.expired == [first.id]
    left = [info.key for info in store.list(replica_prefix("vpn_config"))]
    assert left and all(second.id in key for key in left)
    # The replicas of the expired copy stay on both targets.
    offsite = tmp_path / "offsite" / "vpn_config"
    assert (offsite / "manifests" / f"{first.id}.json").exists()
    import oras.client

    reference = f"{registry.address}/spark-backup/vpn_config:{first.id}"
    assert oras.client.OrasClient(insecure=True).get_manifest(reference)["layers"]


def test_the_runbook_fetches_a_copy_back_from_the_registry_by_hand(
    tmp_path: Path, age_key, estate: Path, registry: Registry
) -> None:
    import os
    import re
    import subprocess

    plan = _plan(tmp_path, age_key, estate, registry)
    service = BackupService.from_path(plan)
    (manifest,) = service.backup("vpn_config")
    service.replicate("vpn_config")
    runbook = Path(__file__).resolve().parents[1] / "docs" / "runbooks" / "faiss.md"
    blocks = re.findall(r"```bash\n(.*?)```", runbook.read_text(), flags=re.DOTALL)
    (script,) = [b for b in blocks if b.startswith("REGISTRY=")]
    download = tmp_path / "download"
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={
            **os.environ,
            "REGISTRY": registry.address,
            "SCHEME": "http",
            "SOURCE": "vpn_config",
            "VERSION": manifest.id,
            "DOWNLOAD": str(download),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    store = tmp_path / "store"
    assert (download / manifest.data_key).read_bytes() == (store / manifest.data_key).read_bytes()
    key = f"vpn_config/manifests/{manifest.id}.json"
    assert (download / key).read_bytes() == (store / key).read_bytes()


def test_a_second_bucket_on_s3_is_a_replica_store(
    tmp_path: Path, age_key, estate: Path, seaweedfs, s3_bucket: str, monkeypatch
) -> None:
    """The store target on a real S3 server (SeaweedFS): the copy under the same keys, judged
    digest for digest; an object changed there fails the check and is left as found."""
    monkeypatch.setenv("SPARK_TEST_REPLICA_KEY", seaweedfs.access_key)
    monkeypatch.setenv("SPARK_TEST_REPLICA_SECRET", seaweedfs.secret_key)
    plan = plan_dict(
        [age_key[1]],
        [config_source("vpn_config", [str(estate)], cadence="daily", replicate_to=["bucket2"])],
        replication=[
            {
                "name": "bucket2",
                "kind": "store",
                "store": {
                    "name": "bucket2",
                    "kind": "s3",
                    "endpoint_url": seaweedfs.endpoint_url,
                    "bucket": s3_bucket,
                    "prefix": "replica",
                    "region_name": seaweedfs.region,
                    "access_key_id": "env:SPARK_TEST_REPLICA_KEY",
                    "secret_access_key": "env:SPARK_TEST_REPLICA_SECRET",
                },
            }
        ],
    )
    service = BackupService.from_path(write_plan(tmp_path, plan))
    (manifest,) = service.backup("vpn_config")
    (pushed,) = service.replicate("vpn_config")
    assert pushed.replicated and pushed.location.startswith("s3://")
    client = seaweedfs.client()
    stored = (tmp_path / "store" / manifest.data_key).read_bytes()
    body = client.get_object(Bucket=s3_bucket, Key=f"replica/{manifest.data_key}")["Body"].read()
    assert body == stored

    key = f"replica/vpn_config/manifests/{manifest.id}.json"
    client.put_object(Bucket=s3_bucket, Key=key, Body=b"{}")
    (checked,) = service.check_replicas("vpn_config")
    assert not checked.replicated and "digest" in (checked.problem or "")
    (again,) = service.replicate("vpn_config")
    assert not again.replicated  # create-only: the changed object stays as found
    assert client.get_object(Bucket=s3_bucket, Key=key)["Body"].read() == b"{}"


def test_llm_versions_replicate_chunk_for_chunk_and_the_store_replica_restores(
    tmp_path: Path, age_key, registry: Registry, monkeypatch
) -> None:
    """A deduplicated version replicates as the objects it is made of: its packs, its chunk
    reference list, its version document, its manifest; a second version pushes its own."""
    import hashlib
    import os
    import re
    import subprocess

    import requests

    from spark_backup.engine.blobs.packs import id_of_pack_key
    from spark_backup.engine.blobs.version import read_refs
    from spark_backup.sources.llm_artifacts.kind import PACK_MEDIA_TYPE
    from spark_backup.sources.llm_artifacts.reader import REFS_KEY, REFS_SHA256
    from spark_backup_tests.helpers import llm_source, make_model_dir

    monkeypatch.setenv("SPARK_TEST_CHUNK_KEY", "replica-chunk-key-0123456789")
    model = make_model_dir(tmp_path / "adapter")
    raw = plan_dict(
        [age_key[1]],
        [llm_source("adapter", str(model), replicate_to=["registry", "offsite"])],
        replication=_targets(registry),
    )
    plan = write_plan(tmp_path, raw)
    service = BackupService.from_path(plan)
    (first,) = service.backup("adapter")
    outcomes = service.replicate("adapter")
    assert {(o.target, o.replicated) for o in outcomes} == {("registry", True), ("offsite", True)}

    # The registry holds one layer per pack, the reference list, the document, the manifest,
    # each layer the stored object's bytes under its sha256 (a pack's id).
    store_root = tmp_path / "store"
    metadata = first.source_metadata
    refs = read_refs(
        service.store_for(service.source("adapter")),
        "adapter",
        metadata[REFS_KEY],
        metadata[REFS_SHA256],
        "test",
    )
    found = _manifest(registry, f"{registry.address}/spark-backup/adapter:{first.id}")
    layers = {
        layer["annotations"]["org.opencontainers.image.title"]: layer for layer in found["layers"]
    }
    chunk_layers = {n for n, layer in layers.items() if layer["mediaType"] == PACK_MEDIA_TYPE}
    assert chunk_layers == {key.removeprefix("adapter/") for key in refs}
    assert len(layers) == len(refs) + 3
    assert all(layers[n]["digest"] == f"sha256:{id_of_pack_key(n)}" for n in chunk_layers)
    assert found["annotations"]["dev.spark-backup.version-digest"] == metadata["version_digest"]
    name = sorted(chunk_layers)[0]
    stored = (store_root / "adapter" / name).read_bytes()
    assert layers[name]["digest"] == f"sha256:{hashlib.sha256(stored).hexdigest()}"
    blob = requests.get(
        f"http://{registry.address}/v2/spark-backup/adapter/blobs/{layers[name]['digest']}",
        timeout=5,
    )
    assert blob.content == stored

    # The runbook's by-hand fetch lays the artifact out as a store, which restores the version.
    runbook = Path(__file__).resolve().parents[1] / "docs" / "runbooks" / "llm_artifacts.md"
    blocks = re.findall(r"```bash\n(.*?)```", runbook.read_text(), flags=re.DOTALL)
    (script,) = [b for b in blocks if b.startswith("REGISTRY=")]
    download = tmp_path / "download"
    env = {"REGISTRY": registry.address, "SCHEME": "http", "SOURCE": "adapter"}
    fetched = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        env={**os.environ, **env, "VERSION": first.id, "DOWNLOAD": str(download)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert fetched.returncode == 0, fetched.stderr
    fetched_plan = plan_dict(
        [age_key[1]],
        [llm_source("adapter", str(model))],
        stores=[{"name": "download", "kind": "local", "path": str(download)}],
    )
    fetched_plan["encryption"]["identity_file"] = str(age_key[0])
    (tmp_path / "fetched").mkdir()
    BackupService.from_path(write_plan(tmp_path / "fetched", fetched_plan)).restore(
        first.id, tmp_path / "from-registry"
    )
    original = (model / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "from-registry" / "adapter_model.safetensors").read_bytes() == original

    # A second version (one tensor re-drawn) replicates too; the first is not pushed again.
    weights = model / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4096:] = bytes(4096)
    weights.write_bytes(bytes(data))
    (second,) = service.backup("adapter")
    # Built once for both targets.
    kind = service.kind_named("llm_artifacts")
    built: list[str] = []
    build = type(kind).replica_version
    monkeypatch.setattr(
        type(kind),
        "replica_version",
        lambda k, copy: built.append(copy.manifest.id) or build(k, copy),
    )
    again = {(o.version, o.target): o for o in service.replicate("adapter")}
    assert set(again) == {(second.id, "registry"), (second.id, "offsite")}
    assert all(o.replicated for o in again.values())
    assert built == [second.id]

    # The store replica is a store of its own: a plan on it verifies and restores each version.
    replica_plan = plan_dict(
        [age_key[1]],
        [llm_source("adapter", str(model))],
        stores=[{"name": "offsite", "kind": "local", "path": str(tmp_path / "offsite")}],
    )
    replica_plan["encryption"]["identity_file"] = str(age_key[0])
    (tmp_path / "elsewhere").mkdir()
    other = BackupService.from_path(write_plan(tmp_path / "elsewhere", replica_plan))
    refs_there = {r.manifest.id: r for r in other.copies("adapter")}
    assert set(refs_there) == {first.id, second.id}
    identities = other.identities()
    assert other.verify(refs_there[first.id], identities).ok
    other.restore(second.id, tmp_path / "restored")
    assert (tmp_path / "restored" / "adapter_model.safetensors").read_bytes() == bytes(data)

    # A pack lost on the store replica fails the check there, and the next run puts it back.
    lost = tmp_path / "offsite" / "adapter" / name
    lost.chmod(0o600)
    lost.unlink()
    checked = {(o.version, o.target): o for o in service.check_replicas("adapter")}
    assert not checked[(first.id, "offsite")].replicated
    assert name in (checked[(first.id, "offsite")].problem or "")
    assert checked[(first.id, "registry")].replicated
    service.replicate("adapter")
    assert lost.read_bytes() == stored
    assert all(o.replicated for o in service.check_replicas("adapter"))

    # A pack missing from the source store: the version stays unreplicated, named, retried.
    (store_root / "adapter" / name).chmod(0o600)
    (store_root / "adapter" / name).unlink()
    shutil.rmtree(registry.repository_folder("spark-backup/adapter"))
    checked = {(o.version, o.target): o for o in service.check_replicas("adapter")}
    assert not checked[(first.id, "registry")].replicated
    outcome = {(o.version, o.target): o for o in service.replicate("adapter")}
    missing = outcome[(first.id, "registry")]
    assert not missing.replicated and first.id in (missing.problem or "")
    assert name in (missing.problem or "") and "missing from the store" in missing.problem
    assert not service.replica_states("adapter")["registry"][first.id].replicated
    assert {r.manifest.id for r in service.copies("adapter")} == {first.id, second.id}


def test_prune_sweeps_an_expired_llm_versions_chunks_at_the_source_never_on_its_replica(
    tmp_path: Path, age_key, registry: Registry, monkeypatch
) -> None:
    import datetime as dt

    from spark_backup.engine.blobs import packs
    from spark_backup.engine.blobs.packs import existing_packs as existing_chunks
    from spark_backup_tests.helpers import llm_source, make_model_dir

    monkeypatch.setenv("SPARK_TEST_CHUNK_KEY", "replica-chunk-key-0123456789")
    monkeypatch.setattr(packs, "PACK_TARGET", 1)  # one chunk a pack: a pack only v1 needs
    model = make_model_dir(tmp_path / "adapter")
    retention = {"daily": 1, "weekly": 0, "monthly": 0}
    source = llm_source("adapter", str(model), replicate_to=["offsite"], retention=retention)
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [source], replication=_targets(registry)))
    service = BackupService.from_path(plan)
    (first,) = service.backup("adapter")
    weights = model / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8192] + bytes(8192))  # the last tensor changed
    (second,) = service.backup("adapter")
    outcomes = service.replicate("adapter")
    assert {(o.version, o.replicated) for o in outcomes} == {(first.id, True), (second.id, True)}
    store = service.store_for(service.source("adapter"))
    before = set(existing_chunks(store, "adapter"))

    now = dt.datetime.now(dt.UTC)
    assert service.prune(dry_run=False, now=now).expired == [first.id]
    swept = service.prune(dry_run=False, now=now + dt.timedelta(days=2))
    gone = before - set(existing_chunks(store, "adapter"))
    assert gone and swept.shared_expired  # the chunks only the first version had
    assert all(first.id not in info.key for info in store.list(replica_prefix("adapter")))

    # The replica store still holds the expired version whole: it verifies and restores there.
    replica_plan = plan_dict(
        [age_key[1]],
        [llm_source("adapter", str(model))],
        stores=[{"name": "offsite", "kind": "local", "path": str(tmp_path / "offsite")}],
    )
    replica_plan["encryption"]["identity_file"] = str(age_key[0])
    (tmp_path / "elsewhere").mkdir()
    other = BackupService.from_path(write_plan(tmp_path / "elsewhere", replica_plan))
    offsite = other.store_for(other.source("adapter"))
    assert gone <= set(existing_chunks(offsite, "adapter"))
    assert other.verify(other.find(first.id), other.identities()).ok
    other.restore(first.id, tmp_path / "first")
    assert (
        tmp_path / "first" / "adapter_model.safetensors"
    ).stat().st_size == weights.stat().st_size
    assert (tmp_path / "first" / "adapter_model.safetensors").read_bytes()[-8192:] != bytes(8192)
    # And the kept version still replicates as checked.
    assert all(o.replicated for o in service.check_replicas("adapter"))


def test_an_llm_version_of_many_chunks_replicates_to_a_registry_in_few_layers(
    tmp_path: Path, age_key, registry: Registry, monkeypatch
) -> None:
    """12,000 chunks: one layer per chunk object (the first release) made a manifest over the
    registry's 4 MB limit; packs make it a few layers, and the replicated check passes."""
    from spark_backup.engine.blobs import chunker
    from spark_backup_tests.helpers import llm_source

    monkeypatch.setenv("SPARK_TEST_CHUNK_KEY", "replica-chunk-key-0123456789")
    monkeypatch.setattr(chunker, "AVERAGE", 256)
    monkeypatch.setattr(chunker, "MINIMUM", 256)
    monkeypatch.setattr(chunker, "MAXIMUM", 1024)
    model = tmp_path / "adapter"
    model.mkdir()
    (model / "weights.bin").write_bytes(random.Random(5).randbytes(4_600_000))
    source = llm_source("adapter", str(model), replicate_to=["registry"])
    plan = write_plan(tmp_path, plan_dict([age_key[1]], [source], replication=_targets(registry)))
    service = BackupService.from_path(plan)
    (version,) = service.backup("adapter")
    chunks = version.source_metadata["chunks"]
    assert chunks > 11_000 and chunks * 410 > 4_000_000
    (outcome,) = service.replicate("adapter")
    assert outcome.replicated, outcome.problem
    found = _manifest(registry, f"{registry.address}/spark-backup/adapter:{version.id}")
    assert len(found["layers"]) == version.source_metadata["packs"] + 3
    assert all(o.replicated for o in service.check_replicas("adapter"))


def test_an_llm_sources_replica_asset_runs_after_its_versions_in_the_backup_job(
    tmp_path: Path, age_key, registry: Registry, monkeypatch
) -> None:
    """Lineage source -> version -> registry: ``replicas/adapter`` downstream of
    ``backups/adapter``, its ``replicated`` check passing on both targets."""
    from spark_backup_tests.helpers import llm_source, make_model_dir

    monkeypatch.setenv("SPARK_TEST_CHUNK_KEY", "replica-chunk-key-0123456789")
    model = make_model_dir(tmp_path / "adapter")
    source = llm_source("adapter", str(model), replicate_to=["registry", "offsite"])
    raw = plan_dict([age_key[1]], [source], replication=_targets(registry))
    raw["encryption"]["identity_file"] = str(age_key[0])
    plan = write_plan(tmp_path, raw)
    defs = build_definitions(load_plan(plan))
    key = replica_asset_key("adapter")
    assert defs.resolve_asset_graph().get(key).parent_keys == {AssetKey(["backups", "adapter"])}
    partition = partition_key_for("daily", utcnow())
    with DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("daily_backups").execute_in_process(
            instance=instance, partition_key=partition, run_config=QUIET
        )
    assert result.success
    (evaluation,) = [
        e
        for e in result.get_asset_check_evaluations()
        if e.asset_check_key == AssetCheckKey(key, REPLICATED_CHECK)
    ]
    assert evaluation.passed
    (materialization,) = result.asset_materializations_for_node("replicas__adapter")
    assert materialization.metadata["replicated"].value == 2
    service = BackupService.from_path(plan)
    (version,) = service.copies("adapter")
    states = service.replica_states("adapter")
    assert set(states) == {"registry", "offsite"}
    assert all(states[target][version.manifest.id].replicated for target in states)
